//! What the rest of Keel (the API, the binary) holds to talk to a running runtime, without
//! reaching into its tasks: wake a queue's dispatcher after an enqueue, cancel a job that is
//! running here, follow job state changes (for `POST /v1/process`, and later `Watch`), and
//! see whether this replica is the maintenance leader.
//!
//! All four are cheap to clone and share; none holds a lock across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use keel_core::store::{LeaderEpoch, LeaseRef};
use keel_core::{Job, JobId, JobState, QueueName};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::inflight::{Cause, Running};

/// A job changed state. Carries no payload: a subscriber that cares reads the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// The job.
    pub id: JobId,
    /// Its queue.
    pub queue: QueueName,
    /// The state it moved to.
    pub state: JobState,
}

impl JobEvent {
    /// The event announcing `job`'s current state.
    pub fn of(job: &Job) -> Self {
        Self {
            id: job.id,
            queue: job.queue.clone(),
            state: job.state,
        }
    }
}

/// In-process fan-out of [`JobEvent`]s. Bounded: a subscriber that falls more than
/// `capacity` events behind sees `RecvError::Lagged` and must re-read what it waits for from
/// the store rather than block publishers (G5).
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<JobEvent>,
}

impl Events {
    /// A channel keeping at most `capacity` undelivered events per subscriber.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self { tx }
    }

    /// Announces a state change. Never blocks; with no subscribers it is a no-op.
    pub fn publish(&self, event: JobEvent) {
        let _ = self.tx.send(event);
    }

    /// Follows state changes from now on. Subscribe *before* the action whose outcome you
    /// wait for, or the event may pass before you listen.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.tx.subscribe()
    }
}

/// One `Notify` per queue served by this process, so an enqueue wakes the dispatcher of
/// its queue at once instead of waiting for the next poll. The set of served queues is
/// fixed at start-up, so their lookups take no lock.
///
/// Queues served by external workers (docs/workers.md) are not known in advance: a long
/// poll registers its queue with [`Wakeups::external`] and holds the `Notify` while it
/// waits; the registry keeps only a weak reference, so a queue nobody polls costs nothing
/// and the map never outgrows the polls in flight.
#[derive(Debug, Clone, Default)]
pub struct Wakeups {
    queues: Arc<HashMap<QueueName, Arc<Notify>>>,
    external: Arc<Mutex<HashMap<QueueName, Weak<Notify>>>>,
}

impl Wakeups {
    /// Wakeups for exactly these queues.
    pub fn new(queues: impl IntoIterator<Item = QueueName>) -> Self {
        Self {
            queues: Arc::new(
                queues
                    .into_iter()
                    .map(|q| (q, Arc::new(Notify::new())))
                    .collect(),
            ),
            external: Arc::default(),
        }
    }

    /// Wakes the dispatcher of `queue` if this process serves it (a wakeup sent while the
    /// dispatcher is busy is remembered, one permit, so none is lost); otherwise wakes every
    /// external worker's long poll waiting on it.
    pub fn job_available(&self, queue: &QueueName) {
        if let Some(n) = self.queues.get(queue) {
            n.notify_one();
            return;
        }
        let waiting = self.lock_external().get(queue).and_then(Weak::upgrade);
        if let Some(n) = waiting {
            n.notify_waiters();
        }
    }

    /// The `Notify` a dispatcher waits on, if `queue` is served here.
    pub fn for_queue(&self, queue: &QueueName) -> Option<Arc<Notify>> {
        self.queues.get(queue).cloned()
    }

    /// The `Notify` external workers' long polls on `queue` wait on, shared by every poll
    /// of that queue in this process. Enable a `notified()` future before looking for jobs,
    /// so a job made available in between is not missed.
    pub fn external(&self, queue: &QueueName) -> Arc<Notify> {
        let mut map = self.lock_external();
        if let Some(n) = map.get(queue).and_then(Weak::upgrade) {
            return n;
        }
        // Forget queues nobody waits on any more before adding one.
        map.retain(|_, w| w.strong_count() > 0);
        let n = Arc::new(Notify::new());
        map.insert(queue.clone(), Arc::downgrade(&n));
        n
    }

    fn lock_external(&self) -> std::sync::MutexGuard<'_, HashMap<QueueName, Weak<Notify>>> {
        // Whole-entry inserts and removes only: a panic cannot leave the map half-updated.
        self.external.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every job whose lease this process holds — running, or prefetched and waiting for a slot
/// — by id: what the heartbeat extends, and how a user's cancel (or a lost lease) reaches
/// the worker running it. One table, so the jobs the heartbeat keeps alive and the jobs a
/// cancel can reach are the same jobs. Only whole-entry updates under a short lock, never
/// held across an await.
#[derive(Debug, Clone, Default)]
pub struct RunningJobs {
    jobs: Arc<Mutex<HashMap<JobId, Running>>>,
}

impl RunningJobs {
    /// Registers a job held here under `lease`; its worker watches `token`. The runtime
    /// registers the jobs it leases itself; this is for a job run outside its dispatchers.
    pub fn register(&self, lease: LeaseRef, queue: QueueName, token: CancellationToken) {
        self.insert(Running {
            lease,
            queue,
            token,
            cause: Cause::default(),
            finishing: false,
        });
    }

    pub(crate) fn insert(&self, job: Running) {
        self.lock().insert(job.lease.id, job);
    }

    /// Forgets a job that is no longer held here.
    pub fn remove(&self, id: JobId) {
        self.lock().remove(&id);
    }

    /// Cancels the job if it is held here; returns whether it was.
    pub fn cancel(&self, id: JobId) -> bool {
        match self.lock().get(&id) {
            Some(job) => {
                job.token.cancel();
                true
            }
            None => false,
        }
    }

    /// The handler is done and its outcome is being written: the lease is still extended
    /// (the write may be retried), but a stale answer now only means the write won the race.
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

    /// How many jobs are held here.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no job is held here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Running>> {
        // Entries are inserted, flagged and removed whole, so a panic while the lock was
        // held cannot have left one half-written.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether this replica is the maintenance leader, and under which term: `Some(epoch)` while
/// it leads, `None` otherwise (including before the first campaign and after shutdown).
///
/// Written only by the runtime's leader task (and by the loops that find out from the store
/// that the term is gone); everyone else reads. A `watch` rather than a flag so a loop can
/// sleep until leadership changes instead of polling it.
#[derive(Debug, Clone)]
pub struct LeaderWatch {
    tx: Arc<watch::Sender<Option<LeaderEpoch>>>,
}

impl Default for LeaderWatch {
    fn default() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(None)),
        }
    }
}

impl LeaderWatch {
    /// The term this replica leads under now, if it leads.
    pub fn current(&self) -> Option<LeaderEpoch> {
        *self.tx.borrow()
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        self.current().is_some()
    }

    /// Follows changes: `changed().await` returns when this replica gains or loses the lead.
    pub fn subscribe(&self) -> watch::Receiver<Option<LeaderEpoch>> {
        self.tx.subscribe()
    }

    /// Publishes `state`; returns the previous one. Subscribers are woken only when it
    /// differs, so a renewal (same term) wakes nobody.
    pub(crate) fn set(&self, state: Option<LeaderEpoch>) -> Option<LeaderEpoch> {
        let mut previous = None;
        self.tx.send_if_modified(|current| {
            previous = *current;
            if *current == state {
                false
            } else {
                *current = state;
                true
            }
        });
        previous
    }

    /// Publishes `None` if the current term is still `epoch` (a later term, won meanwhile,
    /// is not undone by news about an earlier one); returns whether it did.
    pub(crate) fn clear_if(&self, epoch: LeaderEpoch) -> bool {
        self.tx.send_if_modified(|state| {
            if *state == Some(epoch) {
                *state = None;
                true
            } else {
                false
            }
        })
    }
}

/// Everything outside the runtime needs from it. Clone freely.
#[derive(Debug, Clone)]
pub struct RuntimeHandle {
    /// Job state changes.
    pub events: Events,
    /// Dispatcher wakeups.
    pub wakeups: Wakeups,
    /// Jobs running in this process.
    pub running: RunningJobs,
    /// Whether this replica is the maintenance leader (for readiness reports, the API and
    /// tests).
    pub leadership: LeaderWatch,
    /// What runs here: served queues, handled kinds and their args checks, metric labels.
    /// Empty (serves nothing, accepts every job) until [`RuntimeHandle::with_catalog`].
    pub catalog: Catalog,
    /// Cancelled once this process takes no more leases (shutdown began): external
    /// workers' long polls answer at once and lease nothing from then on (G6).
    pub leasing_stopped: CancellationToken,
}

impl RuntimeHandle {
    /// A handle for a runtime serving `queues`, with an event channel of `event_capacity`.
    pub fn new(queues: impl IntoIterator<Item = QueueName>, event_capacity: usize) -> Self {
        Self {
            events: Events::new(event_capacity),
            wakeups: Wakeups::new(queues),
            running: RunningJobs::default(),
            leadership: LeaderWatch::default(),
            catalog: Catalog::default(),
            leasing_stopped: CancellationToken::new(),
        }
    }

    /// The same handle with the catalog of what this process runs: set it once the
    /// handlers are all registered, before the runtime and the API are started with it.
    pub fn with_catalog(mut self, catalog: Catalog) -> Self {
        self.catalog = catalog;
        self
    }
}

#[cfg(test)]
mod tests {
    use keel_core::LeaseToken;

    use super::*;

    fn q(s: &str) -> QueueName {
        QueueName::parse(s).unwrap()
    }

    #[tokio::test]
    async fn a_wakeup_sent_before_waiting_is_not_lost() {
        let w = Wakeups::new([q("a")]);
        w.job_available(&q("a"));
        w.job_available(&q("unknown")); // no dispatcher here: ignored
        let n = w.for_queue(&q("a")).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), n.notified())
            .await
            .expect("the stored permit wakes the waiter");
        assert!(w.for_queue(&q("unknown")).is_none());
    }

    #[test]
    fn cancel_reaches_only_registered_jobs() {
        let r = RunningJobs::default();
        let id = JobId::new();
        let token = CancellationToken::new();
        r.register(lease(id), QueueName::default(), token.clone());
        assert!(!r.cancel(JobId::new()));
        assert!(r.cancel(id));
        assert!(token.is_cancelled());
        r.remove(id);
        assert!(r.is_empty());
    }

    #[test]
    fn finishing_jobs_are_heartbeated_but_not_reported_lost() {
        let held = RunningJobs::default();
        let lease = LeaseRef {
            id: JobId::new(),
            token: LeaseToken::new(),
        };
        held.insert(Running {
            lease,
            queue: QueueName::default(),
            token: CancellationToken::new(),
            cause: Cause::default(),
            finishing: false,
        });
        assert!(held.still_running(lease).is_some());
        let other_token = LeaseRef {
            id: lease.id,
            token: LeaseToken::new(),
        };
        assert!(held.still_running(other_token).is_none());
        held.mark_finishing(lease.id);
        assert_eq!(held.leases(), vec![lease]);
        assert!(held.still_running(lease).is_none());
        held.remove(lease.id);
        assert_eq!(held.len(), 0);
    }

    fn lease(id: JobId) -> LeaseRef {
        LeaseRef {
            id,
            token: LeaseToken::new(),
        }
    }

    #[tokio::test]
    async fn news_of_a_lost_term_does_not_undo_a_later_one() {
        let l = LeaderWatch::default();
        let mut rx = l.subscribe();
        assert!(!l.is_leader());
        assert_eq!(l.set(Some(LeaderEpoch(3))), None);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), Some(LeaderEpoch(3)));
        assert_eq!(l.set(Some(LeaderEpoch(3))), Some(LeaderEpoch(3)));
        assert!(!rx.has_changed().unwrap(), "a renewal wakes nobody");
        assert!(!l.clear_if(LeaderEpoch(2)), "an older term");
        assert_eq!(l.current(), Some(LeaderEpoch(3)));
        assert!(l.clear_if(LeaderEpoch(3)));
        assert!(!l.is_leader());
        assert!(rx.has_changed().unwrap());
    }

    #[tokio::test]
    async fn subscribers_see_events_published_after_they_subscribe() {
        let e = Events::new(4);
        let mut rx = e.subscribe();
        let ev = JobEvent {
            id: JobId::new(),
            queue: q("a"),
            state: JobState::Completed,
        };
        e.publish(ev.clone());
        assert_eq!(rx.recv().await.unwrap(), ev);
    }
}
