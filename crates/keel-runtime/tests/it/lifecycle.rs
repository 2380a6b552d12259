//! One job's life on a worker: retries, panics, timeouts, concurrency, wakeups, cancel,
//! lease loss and store blips.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::{Backoff, JobState, Store, Timestamp};
use keel_runtime::{Handler, Handlers, JobContext, JobError, WebhookConfig, executors};
use serde_json::value::RawValue;

use crate::flaky::Flaky;
use crate::helpers::{
    config, enqueue, eventually, job, kind, run_until, start, store, until_idle, wait_for,
};

fn builtins() -> Handlers {
    Handlers::builtin(&WebhookConfig::default())
}

/// Wraps a handler and records when each attempt started.
struct RecordStarts {
    inner: executors::Fail,
    starts: Mutex<Vec<(u32, Option<Timestamp>)>>,
}

#[async_trait]
impl Handler for RecordStarts {
    async fn run(&self, ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        self.starts
            .lock()
            .unwrap()
            .push((ctx.job.attempt, ctx.job.started_at));
        self.inner.run(ctx).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_is_retried_after_its_backoff_until_it_completes() {
    let (_dir, store) = store().await;
    let recorder = Arc::new(RecordStarts {
        inner: executors::Fail,
        starts: Mutex::new(Vec::new()),
    });
    let mut handlers = builtins();
    handlers.register(kind("fail"), recorder.clone());
    let rt = start(&store, config(&[("default", 2)]), handlers);
    assert!(rt.is_healthy());

    let new = job("default", "fail", r#"{"times": 2}"#)
        .backoff(Backoff::Fixed { delay_ms: 50 })
        .max_attempts(5);
    let done = run_until(&rt, &store, new, JobState::Completed, "the job to complete").await;

    assert_eq!(done.attempt, 3);
    assert_eq!(done.result.as_ref().unwrap().get(), r#"{"attempts":3}"#);
    assert_eq!(done.errors.len(), 2, "{:?}", done.errors);
    for (i, e) in done.errors.iter().enumerate() {
        let attempt = i as u32 + 1;
        assert_eq!(e.attempt, attempt);
        assert!(
            e.message.contains(&format!("attempt {attempt}")),
            "{}",
            e.message
        );
    }
    let starts = recorder.starts.lock().unwrap().clone();
    assert_eq!(
        starts.iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "{starts:?}"
    );
    for (attempt, started) in &starts[1..] {
        let previous_failure = done.errors[*attempt as usize - 2].at;
        let started = started.unwrap();
        assert!(
            started >= previous_failure + chrono::TimeDelta::milliseconds(50),
            "attempt {attempt} started at {started}, previous failure at {previous_failure}"
        );
    }
    rt.shutdown().await;
}

struct Panics;

#[async_trait]
impl Handler for Panics {
    async fn run(&self, _ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        panic!("boom in handler");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_failed_attempt_and_the_pool_keeps_working() {
    let (_dir, store) = store().await;
    let mut handlers = builtins();
    handlers.register(kind("panics"), Arc::new(Panics));
    let rt = start(&store, config(&[("default", 1)]), handlers);

    let failed = run_until(
        &rt,
        &store,
        job("default", "panics", "null").max_attempts(1),
        JobState::Discarded,
        "the panicking job to be discarded",
    )
    .await;
    assert_eq!(failed.errors.len(), 1);
    assert!(
        failed.errors[0]
            .message
            .contains("handler panicked: boom in handler"),
        "{}",
        failed.errors[0].message
    );

    let good = enqueue(&rt, &store, vec![job("default", "noop", "null")]).await[0].id;
    wait_for(&store, good, "the next job to complete", |j| {
        j.state == JobState::Completed
    })
    .await;
    assert!(rt.is_healthy());
    rt.shutdown().await;
}

/// Returns what the job's args say, as its result: a handler with a bug in its output.
struct Returns;

#[async_trait]
impl Handler for Returns {
    async fn run(&self, ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        let text: String = serde_json::from_str(ctx.job.args.get()).unwrap();
        Ok(Some(RawValue::from_string(text).unwrap()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_no_client_could_read_fails_the_job_permanently() {
    let (_dir, store) = store().await;
    let mut handlers = builtins();
    handlers.register(kind("returns"), Arc::new(Returns));
    let rt = start(&store, config(&[("default", 1)]), handlers);
    let deep = format!("{}0{}", "[".repeat(100), "]".repeat(100));
    for (bad, why) in [
        (deep.as_str(), "deeper than 64"),
        (r#""\ud800""#, "surrogate"),
    ] {
        let args = serde_json::to_string(bad).unwrap();
        let failed = run_until(
            &rt,
            &store,
            job("default", "returns", &args).max_attempts(5),
            JobState::Discarded,
            "the job to be discarded",
        )
        .await;
        // One attempt, not five: the same code would return the same result again.
        assert_eq!(failed.attempt, 1);
        assert_eq!(failed.errors.len(), 1);
        let message = &failed.errors[0].message;
        assert!(
            message.contains("the handler's result was refused") && message.contains(why),
            "{message}"
        );
        assert!(failed.result.is_none(), "nothing unreadable was stored");
    }
    let done = run_until(
        &rt,
        &store,
        job("default", "returns", r#""{\"ok\":1}""#),
        JobState::Completed,
        "a readable result to complete",
    )
    .await;
    assert_eq!(done.result.unwrap().get(), r#"{"ok":1}"#);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_its_timeout_fails_retryably() {
    let (_dir, store) = store().await;
    let rt = start(&store, config(&[("default", 2)]), builtins());
    let new = job("default", "sleep", r#"{"ms": 10000}"#)
        .timeout(Duration::from_millis(100))
        .max_attempts(3)
        .backoff(Backoff::Fixed {
            delay_ms: 3_600_000,
        });
    let job = run_until(
        &rt,
        &store,
        new,
        JobState::Retryable,
        "the attempt to time out",
    )
    .await;
    assert_eq!(job.errors.len(), 1);
    assert!(
        job.errors[0].message.contains("timed out after 100 ms"),
        "{}",
        job.errors[0].message
    );
    // The worker slot came back: nothing is left running here.
    until_idle(&rt, "the worker to finish").await;
    rt.shutdown().await;
}

/// Counts how many runs overlap.
#[derive(Default)]
struct Overlap {
    now: AtomicUsize,
    max: AtomicUsize,
}

#[async_trait]
impl Handler for Overlap {
    async fn run(&self, _ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(15)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_never_runs_more_jobs_than_its_concurrency() {
    let (_dir, store) = store().await;
    let overlap = Arc::new(Overlap::default());
    let mut handlers = builtins();
    handlers.register(kind("overlap"), overlap.clone());
    // Another queue with room to spare shares the process but not the limit.
    let rt = start(&store, config(&[("narrow", 3), ("other", 8)]), handlers);
    let jobs = (0..30)
        .map(|_| job("narrow", "overlap", "null"))
        .collect::<Vec<_>>();
    let ids: Vec<_> = enqueue(&rt, &store, jobs)
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    for id in ids {
        wait_for(&store, id, "every job to complete", |j| {
            j.state == JobState::Completed
        })
        .await;
    }
    let max = overlap.max.load(Ordering::SeqCst);
    assert!((1..=3).contains(&max), "max concurrent runs: {max}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wakeup_starts_a_job_long_before_the_poll_interval() {
    let (_dir, store) = store().await;
    let mut cfg = config(&[("default", 2)]);
    cfg.poll_interval = Duration::from_secs(3600);
    let rt = start(&store, cfg, builtins());
    let mut events = rt.handle().events.subscribe();

    // The first job may be picked up by the dispatcher's initial lease; the second is
    // enqueued after the dispatcher went idle, so only the wakeup can start it.
    for round in 0..2 {
        let id = enqueue(&rt, &store, vec![job("default", "echo", r#"{"round": 1}"#)]).await[0].id;
        let done = wait_for(&store, id, &format!("job {round} to complete"), |j| {
            j.state == JobState::Completed
        })
        .await;
        assert_eq!(done.result.unwrap().get(), r#"{"round": 1}"#);
        // Its completion was announced.
        let event = eventually("the completion event", || {
            let r = events.try_recv();
            async move {
                match r {
                    Ok(e) if e.id == id => Ok(e),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
        assert_eq!(event.state, JobState::Completed);
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cancel_stops_the_handler_and_the_job_stays_cancelled() {
    let (_dir, store) = store().await;
    let rt = start(&store, config(&[("default", 2)]), builtins());
    let id = enqueue(
        &rt,
        &store,
        vec![job("default", "sleep", r#"{"ms": 60000}"#)],
    )
    .await[0]
        .id;
    wait_for(&store, id, "the job to run", |j| {
        j.state == JobState::Running
    })
    .await;
    eventually("the job to be registered as running", || async {
        if rt.running_jobs() == 1 {
            Ok(())
        } else {
            Err(rt.running_jobs())
        }
    })
    .await;

    // What the API does: cancel in the store, then reach the worker.
    store.cancel(id).await.unwrap();
    assert!(rt.handle().running.cancel(id));

    until_idle(&rt, "the handler to stop").await;
    let job = store.get(id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(
        job.errors.is_empty(),
        "the stale write was not recorded: {:?}",
        job.errors
    );
    assert!(rt.handle().running.is_empty());
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_made_elsewhere_reaches_the_handler_through_the_heartbeat() {
    let (_dir, store) = store().await;
    let mut cfg = config(&[("default", 2)]);
    cfg.lease_for = Duration::from_secs(2);
    cfg.heartbeat_every = Duration::from_millis(100);
    let rt = start(&store, cfg, builtins());
    let id = enqueue(
        &rt,
        &store,
        vec![job("default", "sleep", r#"{"ms": 60000}"#)],
    )
    .await[0]
        .id;
    wait_for(&store, id, "the job to run", |j| {
        j.state == JobState::Running
    })
    .await;

    // Cancelled in the store only (another replica's API): no RunningJobs::cancel here.
    store.cancel(id).await.unwrap();
    until_idle(&rt, "the heartbeat to stop the handler").await;
    let job = store.get(id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert!(job.errors.is_empty());
    rt.shutdown().await;
}

/// Waits for its token and records that it fired.
#[derive(Default)]
struct Watchful {
    stopped: AtomicBool,
}

#[async_trait]
impl Handler for Watchful {
    async fn run(&self, ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        ctx.cancel.cancelled().await;
        self.stopped.store(true, Ordering::SeqCst);
        Err(JobError::retry("stopped by its token"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_cancels_the_running_handler() {
    let (_dir, real) = store().await;
    let flaky = Flaky::new(Arc::clone(&real));
    let store: Arc<dyn Store> = flaky.clone();
    let watchful = Arc::new(Watchful::default());
    let mut handlers = builtins();
    handlers.register(kind("watch"), watchful.clone());
    let mut cfg = config(&[("default", 2)]);
    cfg.lease_for = Duration::from_secs(1);
    cfg.heartbeat_every = Duration::from_millis(100);
    let rt = start(&store, cfg, handlers);

    let new = job("default", "watch", "null").backoff(Backoff::Fixed {
        delay_ms: 3_600_000,
    });
    let id = enqueue(&rt, &store, vec![new]).await[0].id;
    wait_for(&store, id, "the job to run", |j| {
        j.state == JobState::Running
    })
    .await;

    // The database stops answering heartbeats (a partition): the lease lapses and the
    // maintenance loop rescues the job.
    flaky.fail_heartbeats.store(true, Ordering::SeqCst);
    wait_for(&store, id, "the job to be rescued", |j| {
        j.state == JobState::Retryable
    })
    .await;
    assert!(!watchful.stopped.load(Ordering::SeqCst));

    // Heartbeats come back, find the lease gone, and stop the handler.
    flaky.fail_heartbeats.store(false, Ordering::SeqCst);
    eventually("the handler's token to fire", || async {
        if watchful.stopped.load(Ordering::SeqCst) && rt.running_jobs() == 0 {
            Ok(())
        } else {
            Err(rt.running_jobs())
        }
    })
    .await;
    let job = store.get(id).await.unwrap();
    assert_eq!(job.state, JobState::Retryable);
    assert_eq!(
        job.errors.len(),
        1,
        "only the rescue is recorded: {:?}",
        job.errors
    );
    assert!(
        job.errors[0].message.contains("lease expired"),
        "{}",
        job.errors[0].message
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_blips_on_lease_and_complete_lose_no_work() {
    let (_dir, real) = store().await;
    let flaky = Flaky::new(Arc::clone(&real));
    let store: Arc<dyn Store> = flaky.clone();
    flaky.fail_leases.store(3, Ordering::SeqCst);
    flaky.fail_completes.store(2, Ordering::SeqCst);
    let rt = start(&store, config(&[("default", 2)]), builtins());
    let done = run_until(
        &rt,
        &store,
        job("default", "echo", "[1,2]"),
        JobState::Completed,
        "the job to complete",
    )
    .await;
    assert_eq!(done.result.unwrap().get(), "[1,2]");
    assert_eq!(
        done.attempt, 1,
        "the result was written on the same attempt"
    );
    assert!(done.errors.is_empty());
    assert_eq!(flaky.fail_leases.load(Ordering::SeqCst), 0);
    assert_eq!(flaky.fail_completes.load(Ordering::SeqCst), 0);
    assert!(rt.is_healthy());
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_without_handler_fails_retryably_naming_the_kind() {
    let (_dir, store) = store().await;
    let rt = start(&store, config(&[("default", 2)]), builtins());
    let job = run_until(
        &rt,
        &store,
        job("default", "no_such_kind", "null").max_attempts(1),
        JobState::Discarded,
        "the job to be discarded",
    )
    .await;
    assert!(
        job.errors[0]
            .message
            .contains("no handler for job kind no_such_kind"),
        "{}",
        job.errors[0].message
    );
    rt.shutdown().await;
}
