use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keel_core::{Clock, Job, JobKind, NewJob, QueueName, Store, SystemClock};
use keel_runtime::{
    Handlers, MaintenanceConfig, QueueConfig, Runtime, RuntimeConfig, RuntimeHandle, WebhookConfig,
};
use keel_store::{SqliteOptions, SqliteStore};
use serde_json::value::RawValue;
use tempfile::TempDir;

/// Longest any wait in these tests may take before the test fails.
pub(crate) const DEADLINE: Duration = Duration::from_secs(20);

/// A fresh, migrated SQLite store in a temporary directory (kept alive by the `TempDir`).
pub(crate) async fn store() -> (TempDir, Arc<dyn Store>) {
    store_with_clock(Arc::new(SystemClock)).await
}

/// [`store`] on `clock`.
pub(crate) async fn store_with_clock(clock: Arc<dyn Clock>) -> (TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("keel.db"), SqliteOptions::default(), clock)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    (dir, Arc::new(store))
}

pub(crate) fn queue(name: &str) -> QueueName {
    QueueName::parse(name).unwrap()
}

pub(crate) fn kind(name: &str) -> JobKind {
    JobKind::parse(name).unwrap()
}

/// A config for tests: the given queues, fast polling and maintenance.
pub(crate) fn config(queues: &[(&str, usize)]) -> RuntimeConfig {
    RuntimeConfig {
        queues: queues
            .iter()
            .map(|(name, concurrency)| QueueConfig {
                name: queue(name),
                concurrency: *concurrency,
            })
            .collect(),
        poll_interval: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(5),
        maintenance: MaintenanceConfig {
            interval: Duration::from_millis(20),
            ..MaintenanceConfig::default()
        },
        webhook: WebhookConfig {
            allow_private: false,
            ..WebhookConfig::default()
        },
        ..RuntimeConfig::default()
    }
}

/// Starts a runtime with a handle covering the configured queues.
pub(crate) fn start(store: &Arc<dyn Store>, config: RuntimeConfig, handlers: Handlers) -> Runtime {
    start_with_clock(store, config, handlers, Arc::new(SystemClock))
}

/// [`start`] with the clock the store was built with.
pub(crate) fn start_with_clock(
    store: &Arc<dyn Store>,
    config: RuntimeConfig,
    handlers: Handlers,
    clock: Arc<dyn Clock>,
) -> Runtime {
    let handle = RuntimeHandle::new(config.queues.iter().map(|q| q.name.clone()), 1024);
    Runtime::start_with_clock(Arc::clone(store), config, handlers, handle, clock)
}

/// A job of `kind` with JSON `args` on `queue`.
pub(crate) fn job(queue_name: &str, kind_name: &str, args: &str) -> NewJob {
    NewJob::new(kind(kind_name))
        .queue(queue(queue_name))
        .args(RawValue::from_string(args.to_owned()).unwrap())
}

/// Inserts `jobs` and wakes their dispatchers, as the API does.
pub(crate) async fn enqueue(rt: &Runtime, store: &Arc<dyn Store>, jobs: Vec<NewJob>) -> Vec<Job> {
    let jobs = store.insert(jobs).await.unwrap();
    for j in &jobs {
        rt.handle().wakeups.job_available(&j.queue);
    }
    jobs
}

/// Polls `check` every 10 ms until it returns `Some`, failing the test after [`DEADLINE`]
/// with `what` and the last observation.
pub(crate) async fn eventually<T, O, F, Fut>(what: &str, mut check: F) -> T
where
    O: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, O>>,
{
    // The last observation, for the failure message; a hang guard, not a timing claim.
    let mut last: Option<O> = None;
    let polled = tokio::time::timeout(DEADLINE, async {
        loop {
            match check().await {
                Ok(v) => return v,
                Err(o) => last = Some(o),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    polled.unwrap_or_else(|_| panic!("gave up waiting for {what}; last saw {last:?}"))
}

/// Waits until `rt` runs no job (`what` names the wait in a failure).
pub(crate) async fn until_idle(rt: &Runtime, what: &str) {
    eventually(what, || async {
        match rt.running_jobs() {
            0 => Ok(()),
            n => Err(n),
        }
    })
    .await;
}

/// Waits until the job satisfies `pred`; returns it.
pub(crate) async fn wait_for(
    store: &Arc<dyn Store>,
    id: keel_core::JobId,
    what: &str,
    pred: impl Fn(&Job) -> bool,
) -> Job {
    eventually(what, || async {
        let job = store.get(id).await.unwrap();
        if pred(&job) { Ok(job) } else { Err(job) }
    })
    .await
}

/// Enqueues `job` and waits until it reaches `state` (`what` names the wait in a failure);
/// returns it then.
pub(crate) async fn run_until(
    rt: &Runtime,
    store: &Arc<dyn Store>,
    job: NewJob,
    state: keel_core::JobState,
    what: &str,
) -> Job {
    let id = enqueue(rt, store, vec![job]).await[0].id;
    wait_for(store, id, what, |j| j.state == state).await
}

/// The store's idea of now.
pub(crate) fn now() -> keel_core::Timestamp {
    SystemClock.now()
}
