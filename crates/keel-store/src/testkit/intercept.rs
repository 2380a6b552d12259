//! A real store with a hook in front of every operation, for tests that need the database
//! to fail, stall or be counted on demand.
//!
//! A test supplies an [`Interceptor`] that sees each [`Op`] before it reaches the real store
//! and may answer an error instead, sleep, or count. The forwarding itself is keel-core's
//! [`Layered`], the same one the database guard uses, so a new store operation reaches the
//! interceptors without a line here.

use std::ops::Deref;
use std::sync::Arc;

use async_trait::async_trait;
pub use keel_core::store::Op;
use keel_core::store::{Call, Layered, StoreLayer};
use keel_core::{Store, StoreError};

/// Decides, before each operation, whether it reaches the real store.
#[async_trait]
pub trait Interceptor: Send + Sync + 'static {
    /// Called before `op` runs; an error is answered in its place.
    async fn before(&self, op: Op) -> Result<(), StoreError>;
}

/// An [`Interceptor`] as a [`StoreLayer`]. Dereferences to the interceptor.
pub struct Intercept<I>(I);

impl<I> Deref for Intercept<I> {
    type Target = I;
    fn deref(&self) -> &I {
        &self.0
    }
}

impl<I: Interceptor> StoreLayer for Intercept<I> {
    fn write<'a, T: Send + 'a>(&'a self, op: Op, call: Call<'a, T>) -> Call<'a, T> {
        Box::pin(async move {
            self.0.before(op).await?;
            call.await
        })
    }

    fn read<'a, T: Send + 'a>(
        &'a self,
        op: Op,
        mut call: Box<dyn FnMut() -> Call<'a, T> + Send + 'a>,
    ) -> Call<'a, T> {
        Box::pin(async move {
            self.0.before(op).await?;
            call().await
        })
    }
}

/// `inner` behind an interceptor. Dereferences (through [`Layered`] and [`Intercept`]) to
/// the interceptor, so a test flips its switches and reads its counters through the store
/// handle it gave the code under test; [`Layered::inner`] reaches the real store.
pub type Intercepted<I> = Layered<Intercept<I>>;

/// `inner` behind `interceptor`.
pub fn intercept<I: Interceptor>(inner: Arc<dyn Store>, interceptor: I) -> Arc<Intercepted<I>> {
    Arc::new(Layered::new(inner, Intercept(interceptor)))
}
