//! The leases of the jobs running in this process: what the heartbeat task extends, and how
//! it reaches a job whose lease turned out to be lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use keel_core::store::LeaseRef;
use keel_core::{JobId, QueueName};
use tokio_util::sync::CancellationToken;

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

/// One running job.
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
