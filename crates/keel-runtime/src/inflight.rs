//! The leases this process holds — jobs running here, and jobs prefetched into a queue's
//! buffer waiting for a slot: what the heartbeat task extends, and how it (or a user's
//! cancel) reaches a job whose lease turned out to be lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use keel_core::store::LeaseRef;
use keel_core::{JobId, QueueName};
use tokio_util::sync::CancellationToken;

use crate::runtime::Shared;

/// Why a running job's token fired. The first cause recorded wins; a token fired by
/// [`crate::RunningJobs::cancel`] records none and is read as a user cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopCause {
    /// A user cancelled the job.
    Cancelled,
    /// A heartbeat found the lease gone without the job being cancelled.
    LeaseLost,
    /// The attempt ran past the job's timeout.
    TimedOut,
    /// Shutdown's second phase.
    Shutdown,
}

/// Shared between a job's worker and whoever stops it.
pub(crate) type Cause = Arc<OnceLock<StopCause>>;

/// One job whose lease this process holds (running, or prefetched and waiting).
#[derive(Debug, Clone)]
pub(crate) struct Running {
    pub(crate) lease: LeaseRef,
    pub(crate) queue: QueueName,
    pub(crate) token: CancellationToken,
    pub(crate) cause: Cause,
    /// The handler is done and its outcome is being written: keep extending the lease (the
    /// write may be retried), but a stale answer now only means the write won the race.
    pub(crate) finishing: bool,
}

/// Every job running here, by id. Only whole-entry updates under a short lock; never held
/// across an await.
#[derive(Debug, Default)]
pub(crate) struct Inflight {
    jobs: Mutex<HashMap<JobId, Running>>,
}

impl Inflight {
    fn lock(&self) -> MutexGuard<'_, HashMap<JobId, Running>> {
        // Entries are inserted, flagged and removed whole, so a panic while the lock was
        // held cannot have left one half-written.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn insert(&self, job: Running) {
        self.lock().insert(job.lease.id, job);
    }

    pub(crate) fn remove(&self, id: JobId) {
        self.lock().remove(&id);
    }

    pub(crate) fn mark_finishing(&self, id: JobId) {
        if let Some(r) = self.lock().get_mut(&id) {
            r.finishing = true;
        }
    }

    /// The leases to extend.
    pub(crate) fn leases(&self) -> Vec<LeaseRef> {
        self.lock().values().map(|r| r.lease).collect()
    }

    /// The job still running under `lease`, unless it is already writing its outcome.
    pub(crate) fn still_running(&self, lease: LeaseRef) -> Option<Running> {
        self.lock()
            .get(&lease.id)
            .filter(|r| r.lease == lease && !r.finishing)
            .cloned()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A leased job's registration, from the lease until its outcome is written or it is
/// released: in [`Inflight`] (so the heartbeat extends its lease, also while it waits in a
/// prefetch buffer) and in [`crate::RunningJobs`] (so a user's cancel reaches it) for
/// exactly as long as the claim lives. Dropping it — a buffer emptied, a task aborted —
/// unregisters the job, so no entry outlives its job.
pub(crate) struct Claim {
    shared: Arc<Shared>,
    pub(crate) lease: LeaseRef,
    pub(crate) queue: QueueName,
    /// Fires on a user's cancel, a lost lease, a timeout or shutdown's second phase.
    pub(crate) token: CancellationToken,
    pub(crate) cause: Cause,
}

impl Claim {
    pub(crate) fn new(shared: &Arc<Shared>, lease: LeaseRef, queue: QueueName) -> Self {
        let token = shared.hard_stop.child_token();
        let cause = Cause::default();
        shared.inflight.insert(Running {
            lease,
            queue: queue.clone(),
            token: token.clone(),
            cause: Arc::clone(&cause),
            finishing: false,
        });
        shared.handle.running.insert(lease.id, token.clone());
        Self {
            shared: Arc::clone(shared),
            lease,
            queue,
            token,
            cause,
        }
    }

    /// The runtime this claim belongs to.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.shared.inflight.remove(self.lease.id);
        self.shared.handle.running.remove(self.lease.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::LeaseToken;

    #[test]
    fn finishing_jobs_are_heartbeated_but_not_reported_lost() {
        let inflight = Inflight::default();
        let lease = LeaseRef {
            id: JobId::new(),
            token: LeaseToken::new(),
        };
        inflight.insert(Running {
            lease,
            queue: QueueName::default(),
            token: CancellationToken::new(),
            cause: Cause::default(),
            finishing: false,
        });
        assert!(inflight.still_running(lease).is_some());
        let other_token = LeaseRef {
            id: lease.id,
            token: LeaseToken::new(),
        };
        assert!(inflight.still_running(other_token).is_none());
        inflight.mark_finishing(lease.id);
        assert_eq!(inflight.leases(), vec![lease]);
        assert!(inflight.still_running(lease).is_none());
        inflight.remove(lease.id);
        assert_eq!(inflight.len(), 0);
    }
}
