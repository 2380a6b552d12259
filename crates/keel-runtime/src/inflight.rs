//! A leased job's registration ([`Claim`]) and why its token fired ([`StopCause`]); the table
//! of the leases this process holds is [`crate::RunningJobs`], on the handle.

use std::sync::{Arc, OnceLock};

use keel_core::QueueName;
use keel_core::store::LeaseRef;
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

/// A leased job's registration, from the lease until its outcome is written or it is
/// released: in [`crate::RunningJobs`] (so the heartbeat extends its lease, also while it
/// waits in a prefetch buffer, and a user's cancel reaches it) for exactly as long as the
/// claim lives. Dropping it — a buffer emptied, a task aborted —
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
        shared.handle.running.insert(Running {
            lease,
            queue: queue.clone(),
            token: token.clone(),
            cause: Arc::clone(&cause),
            finishing: false,
        });
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
        self.shared.handle.running.remove(self.lease.id);
    }
}
