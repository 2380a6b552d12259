//! A store that fails on demand, to test the runtime against database blips.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use async_trait::async_trait;
use keel_core::{Store, StoreError};
use keel_store::testkit::{Intercepted, Interceptor, Op, intercept};

/// The failures switched on here, in front of a real store (see [`Flaky::new`]).
pub(crate) struct Flaky {
    /// While set, every heartbeat fails transiently (leases stop being extended).
    pub(crate) fail_heartbeats: AtomicBool,
    /// This many next `complete` calls fail transiently.
    pub(crate) fail_completes: AtomicU32,
    /// This many next `lease` calls fail transiently.
    pub(crate) fail_leases: AtomicU32,
    /// While set, every campaign for leadership fails transiently (the database is gone).
    pub(crate) fail_campaigns: AtomicBool,
    /// While set, every `enqueue_ticks` is refused as if the caller's term were superseded.
    pub(crate) fence_ticks: AtomicBool,
    /// Campaigns made (failed ones included).
    pub(crate) campaigns: AtomicU32,
    /// `promote` calls made (one per maintenance pass).
    pub(crate) promotes: AtomicU32,
    /// `enqueue_ticks` calls refused by `fence_ticks`.
    pub(crate) refused_ticks: AtomicU32,
}

impl Flaky {
    /// `inner` with every switch off; the switches are reached through the returned store.
    pub(crate) fn new(inner: Arc<dyn Store>) -> Arc<Intercepted<Self>> {
        intercept(
            inner,
            Self {
                fail_heartbeats: AtomicBool::new(false),
                fail_completes: AtomicU32::new(0),
                fail_leases: AtomicU32::new(0),
                fail_campaigns: AtomicBool::new(false),
                fence_ticks: AtomicBool::new(false),
                campaigns: AtomicU32::new(0),
                promotes: AtomicU32::new(0),
                refused_ticks: AtomicU32::new(0),
            },
        )
    }
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl Interceptor for Flaky {
    async fn before(&self, op: Op) -> Result<(), StoreError> {
        let blip = || Err(StoreError::transient(op.doing(), "injected failure"));
        match op {
            Op::Lease if take(&self.fail_leases) => blip(),
            Op::Heartbeat if self.fail_heartbeats.load(Ordering::SeqCst) => blip(),
            Op::Complete if take(&self.fail_completes) => blip(),
            Op::Promote => {
                self.promotes.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Op::Campaign => {
                self.campaigns.fetch_add(1, Ordering::SeqCst);
                if self.fail_campaigns.load(Ordering::SeqCst) {
                    blip()
                } else {
                    Ok(())
                }
            }
            Op::EnqueueTicks(epoch) if self.fence_ticks.load(Ordering::SeqCst) => {
                self.refused_ticks.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::NotLeader(epoch.0))
            }
            _ => Ok(()),
        }
    }
}
