//! The external workers this process has heard from, for `GET /v1/workers` and the
//! `keel_workers_connected` gauge, and the bounded set of queue labels their metrics use.
//!
//! Worker names and queue names are chosen by clients, so both are bounded here: at most
//! [`MAX_WORKERS`] workers are remembered (the least recently seen is forgotten first, and
//! anyone unseen for [`FORGET_AFTER`] is dropped), and at most [`MAX_QUEUE_LABELS`]
//! external queues get a metric label of their own; later ones count under `other`.
//! A worker's held jobs are tracked by lease expiry, so a worker that vanished stops
//! counting them once its leases lapse, without anyone telling the registry.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use keel_core::{JobId, QueueName, TenantId, Timestamp, WorkerId};

/// Most workers remembered at once.
pub const MAX_WORKERS: usize = 10_000;
/// Most jobs remembered per worker (a worker holds at most its concurrency; this only
/// bounds what a misbehaving client can make us keep).
const MAX_HELD: usize = 10_000;
/// A worker unseen for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(300);
/// A worker seen within this long counts as connected in `keel_workers_connected`.
pub const CONNECTED_WITHIN: Duration = Duration::from_secs(60);
/// Most external queues with a metric label of their own.
pub const MAX_QUEUE_LABELS: usize = 64;

/// One worker, as `GET /v1/workers` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The name it leases under.
    pub id: WorkerId,
    /// The tenant whose key it uses.
    pub tenant: TenantId,
    /// Queues it leased from.
    pub queues: Vec<QueueName>,
    /// Its latest lease or heartbeat.
    pub last_seen: Timestamp,
    /// Jobs whose lease it holds and that have not lapsed.
    pub jobs_held: usize,
}

#[derive(Debug)]
struct Entry {
    queues: BTreeSet<QueueName>,
    last_seen: Timestamp,
    /// Job → lease expiry.
    held: HashMap<JobId, Timestamp>,
}

#[derive(Debug, Default)]
struct Inner {
    workers: HashMap<(TenantId, WorkerId), Entry>,
    /// Which worker leased each job and from which queue, so an outcome (which names
    /// only the job) can drop it and be announced with its queue.
    holders: HashMap<JobId, ((TenantId, WorkerId), QueueName)>,
    labels: BTreeSet<QueueName>,
}

/// Shared by every request of this process. Cheap to clone; no lock is held across an
/// await.
#[derive(Debug, Clone, Default)]
pub struct WorkerRegistry {
    inner: Arc<Mutex<Inner>>,
}

impl WorkerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is a whole-entry insert, update or remove: a panic cannot leave an
        // entry half-written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `worker` asked `queue` for jobs and got `leased` (job, lease expiry).
    pub fn leased(
        &self,
        tenant: &TenantId,
        worker: &WorkerId,
        queue: &QueueName,
        leased: impl IntoIterator<Item = (JobId, Timestamp)>,
    ) {
        let now = Utc::now();
        let mut inner = self.lock();
        let key = (tenant.clone(), worker.clone());
        let inner = &mut *inner;
        if !inner.workers.contains_key(&key) {
            make_room(inner, now);
        }
        let entry = inner.workers.entry(key.clone()).or_insert_with(|| Entry {
            queues: BTreeSet::new(),
            last_seen: now,
            held: HashMap::new(),
        });
        entry.last_seen = now;
        if !entry.queues.contains(queue) && entry.queues.len() < MAX_QUEUE_LABELS {
            entry.queues.insert(queue.clone());
        }
        let lapsed: Vec<JobId> = entry
            .held
            .iter()
            .filter(|(_, expires)| **expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in lapsed {
            entry.held.remove(&id);
            inner.holders.remove(&id);
        }
        for (id, expires) in leased {
            if entry.held.len() < MAX_HELD {
                entry.held.insert(id, expires);
                inner.holders.insert(id, (key.clone(), queue.clone()));
            }
        }
    }

    /// A heartbeat for `job` moved its lease to `expires`.
    pub fn heartbeat(&self, job: JobId, expires: Timestamp) {
        let now = Utc::now();
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some((key, _)) = inner.holders.get(&job)
            && let Some(entry) = inner.workers.get_mut(key)
        {
            entry.last_seen = now;
            entry.held.insert(job, expires);
        }
    }

    /// `job` ended (an outcome was recorded, or its lease turned out stale).
    pub fn released(&self, job: JobId) {
        let now = Utc::now();
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some((key, _)) = inner.holders.remove(&job)
            && let Some(entry) = inner.workers.get_mut(&key)
        {
            entry.last_seen = now;
            entry.held.remove(&job);
        }
    }

    /// The queue `job` was leased from through this process, if it was.
    pub fn queue_of(&self, job: JobId) -> Option<QueueName> {
        self.lock().holders.get(&job).map(|(_, q)| q.clone())
    }

    /// The workers seen within [`FORGET_AFTER`], those of `tenant` only when given, by id.
    pub fn list(&self, tenant: Option<&TenantId>) -> Vec<WorkerInfo> {
        let now = Utc::now();
        let cutoff = now - FORGET_AFTER;
        let inner = self.lock();
        let mut out: Vec<WorkerInfo> = inner
            .workers
            .iter()
            .filter(|((t, _), e)| tenant.is_none_or(|want| want == t) && e.last_seen > cutoff)
            .map(|((t, id), e)| WorkerInfo {
                id: id.clone(),
                tenant: t.clone(),
                queues: e.queues.iter().cloned().collect(),
                last_seen: e.last_seen,
                jobs_held: e.held.values().filter(|x| **x > now).count(),
            })
            .collect();
        out.sort_by(|a, b| (&a.tenant, &a.id).cmp(&(&b.tenant, &b.id)));
        out
    }

    /// The metric label for an external `queue`: its own name while fewer than
    /// [`MAX_QUEUE_LABELS`] queues have one, else `other`.
    pub fn queue_label(&self, queue: &QueueName) -> String {
        let mut inner = self.lock();
        if inner.labels.contains(queue) {
            return queue.to_string();
        }
        if inner.labels.len() < MAX_QUEUE_LABELS {
            inner.labels.insert(queue.clone());
            return queue.to_string();
        }
        "other".to_owned()
    }

    /// Sets `keel_workers_connected{queue}` for every labelled queue (0 for a queue whose
    /// workers went away), and forgets workers unseen for [`FORGET_AFTER`].
    pub fn record_gauges(&self) {
        let now = Utc::now();
        let connected_since = now - CONNECTED_WITHIN;
        let mut inner = self.lock();
        let inner = &mut *inner;
        forget_stale(inner, now);
        let mut counts: HashMap<String, usize> =
            inner.labels.iter().map(|q| (q.to_string(), 0)).collect();
        for entry in inner.workers.values() {
            if entry.last_seen <= connected_since {
                continue;
            }
            for q in &entry.queues {
                let label = if inner.labels.contains(q) {
                    q.to_string()
                } else {
                    "other".to_owned()
                };
                *counts.entry(label).or_default() += 1;
            }
        }
        for (queue, n) in counts {
            metrics::gauge!("keel_workers_connected", "queue" => queue).set(n as f64);
        }
    }
}

fn forget_stale(inner: &mut Inner, now: Timestamp) {
    let cutoff = now - FORGET_AFTER;
    inner.workers.retain(|_, e| e.last_seen > cutoff);
    let workers = &inner.workers;
    inner
        .holders
        .retain(|_, (key, _)| workers.contains_key(key));
}

/// Frees a slot for a new worker: drops the stale ones, and when still full the least
/// recently seen.
fn make_room(inner: &mut Inner, now: Timestamp) {
    if inner.workers.len() < MAX_WORKERS {
        return;
    }
    forget_stale(inner, now);
    if inner.workers.len() < MAX_WORKERS {
        return;
    }
    if let Some(oldest) = inner
        .workers
        .iter()
        .min_by_key(|(_, e)| e.last_seen)
        .map(|(k, _)| k.clone())
    {
        inner.workers.remove(&oldest);
        let workers = &inner.workers;
        inner
            .holders
            .retain(|_, (key, _)| workers.contains_key(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str) -> QueueName {
        QueueName::parse(name).unwrap()
    }

    #[test]
    fn held_jobs_follow_leases_outcomes_and_tenants() {
        let r = WorkerRegistry::new();
        let (a, b) = (TenantId::parse("a").unwrap(), TenantId::parse("b").unwrap());
        let w = WorkerId::parse("w1").unwrap();
        let later = Utc::now() + chrono::Duration::seconds(60);
        let (j1, j2) = (JobId::new(), JobId::new());
        r.leased(&a, &w, &q("mail"), [(j1, later), (j2, later)]);
        r.leased(&b, &w, &q("mail"), []);
        let seen = r.list(Some(&a));
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].jobs_held, 2);
        assert_eq!(seen[0].queues, vec![q("mail")]);
        r.released(j1);
        assert_eq!(r.list(Some(&a))[0].jobs_held, 1);
        // A lapsed lease no longer counts, though nobody reported an outcome.
        r.heartbeat(j2, Utc::now() - chrono::Duration::seconds(1));
        assert_eq!(r.list(Some(&a))[0].jobs_held, 0);
        assert_eq!(r.list(None).len(), 2, "an operator sees both tenants");
        assert_eq!(r.list(Some(&b))[0].tenant, b);
    }

    #[test]
    fn queue_labels_and_workers_are_bounded() {
        let r = WorkerRegistry::new();
        for i in 0..MAX_QUEUE_LABELS {
            assert_eq!(r.queue_label(&q(&format!("q{i}"))), format!("q{i}"));
        }
        assert_eq!(r.queue_label(&q("one-too-many")), "other");
        assert_eq!(
            r.queue_label(&q("q0")),
            "q0",
            "a labelled queue keeps its label"
        );

        let t = TenantId::parse("t").unwrap();
        for i in 0..MAX_WORKERS + 5 {
            r.leased(&t, &WorkerId::parse(format!("w{i}")).unwrap(), &q("x"), []);
        }
        assert_eq!(r.list(None).len(), MAX_WORKERS);
    }
}
