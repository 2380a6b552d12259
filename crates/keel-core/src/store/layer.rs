//! One generic forwarding layer for wrappers that treat every store call alike.
//!
//! The database guard (bulkhead, breaker, retries) and the tests' fault injectors do not
//! care what an operation does, only whether it is a read or a write and what to call it.
//! Each used to be its own thirty-method implementation of [`Store`] forwarding to the real
//! one, so adding an operation meant editing every wrapper. Here the forwarding is written
//! once, for [`Layered`] (beside each role trait, in `roles.rs`); a wrapper is a
//! [`StoreLayer`]: two methods that see an [`Op`] and the call to make.

use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;

use super::{ChangeStream, Op, PoolStats, Store, WakeupStream};
use crate::error::StoreError;

/// One call to the wrapped store, not yet started (the shape `async_trait` methods return).
pub type Call<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// What a wrapper does around every call to the store it wraps.
///
/// Reads and writes arrive apart because they may be treated differently: a read may be
/// made again (its closure builds a fresh call each time), a write is handed over once,
/// since a write that failed in flight may have committed and only its owner knows whether
/// repeating it is safe.
pub trait StoreLayer: Send + Sync + 'static {
    /// Runs a write: `call` at most once, or an error in its place.
    fn write<'a, T: Send + 'a>(&'a self, op: Op, call: Call<'a, T>) -> Call<'a, T>;

    /// Runs a read: `call()` once or more, or an error in its place.
    fn read<'a, T: Send + 'a>(
        &'a self,
        op: Op,
        call: Box<dyn FnMut() -> Call<'a, T> + Send + 'a>,
    ) -> Call<'a, T>;

    /// Runs a readiness probe ([`Store::ping`]); by default like any write.
    fn ping<'a>(&'a self, call: Call<'a, ()>) -> Call<'a, ()> {
        self.write(Op::Ping, call)
    }
}

/// A store with a [`StoreLayer`] around every operation. Dereferences to the layer, so its
/// owner reads the layer's state (a breaker, a counter) through the store handle.
///
/// The streams ([`Store::wakeups`], [`Store::changes`]), [`Store::pool_stats`] and
/// [`Store::close`] pass straight through: they are not calls to bound or fail.
pub struct Layered<L> {
    pub(super) inner: Arc<dyn Store>,
    pub(super) layer: L,
}

impl<L: StoreLayer> Layered<L> {
    /// `inner` behind `layer`.
    pub fn new(inner: Arc<dyn Store>, layer: L) -> Self {
        Self { inner, layer }
    }

    /// The wrapped store, to reach the data behind the layer's back (tests).
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// The layer.
    pub fn layer(&self) -> &L {
        &self.layer
    }
}

impl<L> Deref for Layered<L> {
    type Target = L;
    fn deref(&self) -> &L {
        &self.layer
    }
}

impl<L: std::fmt::Debug> std::fmt::Debug for Layered<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Layered").field(&self.layer).finish()
    }
}

#[async_trait]
impl<L: StoreLayer> Store for Layered<L> {
    async fn ping(&self) -> Result<(), StoreError> {
        self.layer.ping(self.inner.ping()).await
    }

    fn pool_stats(&self) -> PoolStats {
        self.inner.pool_stats()
    }

    fn wakeups(&self) -> Option<Box<dyn WakeupStream>> {
        self.inner.wakeups()
    }

    fn changes(&self) -> Option<Box<dyn ChangeStream>> {
        self.inner.changes()
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}
