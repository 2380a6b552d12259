//! The worker protocol's business steps (docs/workers.md): lease with a long poll,
//! heartbeat (where a cancel reaches a remote worker), complete, fail and release, each
//! fenced by the lease token. HTTP and, later, gRPC adapters parse their input into the
//! types of [`crate::worker_in`] and call these; nothing here knows about a transport.

use std::time::Duration;

use futures_util::future::join_all;
use keel_core::store::{Completion, FailParams, HeartbeatParams, LeaseParams, LeaseRef};
use keel_core::{Job, JobId, JobState, QueueName, StoreError, Timestamp};
use keel_resilience::{RequestScope, Step};
use keel_runtime::JobEvent;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::ApiState;
use crate::worker_in::{CompleteIn, FailIn, HeartbeatIn, LeaseIn};
use crate::worker_registry::WorkerInfo;

/// How often a waiting lease looks again although nothing woke it: a wakeup can be lost
/// (a Postgres listener reconnecting, a job promoted by another replica's maintenance),
/// and this bounds how late such a job is noticed without polling the database in a loop.
const RECHECK: Duration = Duration::from_secs(1);

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// When the lease now expires (see [`keel_core::WorkStore::heartbeat`]), or `None` once the job
    /// was cancelled.
    pub expires_at: Option<Timestamp>,
    /// A user cancelled the job: the worker should stop its handler.
    pub cancel_requested: bool,
}

/// Leases up to `req.max` jobs of `queue` for an external worker, waiting up to
/// `req.wait` for the first one. Answers empty when the wait runs out or this process
/// stops leasing (shutdown).
pub async fn lease(
    state: &ApiState,
    caller: &Caller,
    queue: QueueName,
    req: LeaseIn,
) -> Result<Vec<Job>, ApiError> {
    lease_until(state, caller, queue, req, &CancellationToken::new()).await
}

/// [`lease`], also answering empty as soon as `give_up` is cancelled while it waits (a
/// streaming worker draining): only the wait is cut short, never a lease the store is
/// already making, so no job is leased to a caller that stopped listening.
pub async fn lease_until(
    state: &ApiState,
    caller: &Caller,
    queue: QueueName,
    req: LeaseIn,
    give_up: &CancellationToken,
) -> Result<Vec<Job>, ApiError> {
    if state.runtime.catalog.serves(&queue) {
        return Err(ApiError::QueueServedHere(queue));
    }
    let stopped = &state.runtime.leasing_stopped;
    let wakeups = state.runtime.wakeups.external(&queue);
    let until = Instant::now() + req.wait.min(state.config.max_lease_wait);
    let tenant = caller.scope().cloned();
    loop {
        if stopped.is_cancelled() || give_up.is_cancelled() {
            return Ok(Vec::new());
        }
        // Registered before looking, so a job enqueued between the look and the wait
        // still wakes this poll.
        let woken = wakeups.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        RequestScope::enter_current(Step::Store);
        let jobs = state
            .store
            .lease(LeaseParams {
                queue: queue.clone(),
                max: req.max,
                lease_for: req.lease_for,
                owner: req.worker.clone(),
                tenant: tenant.clone(),
                kinds: req.kinds.clone(),
            })
            .await?;
        let holder = caller.tenant_for(None)?;
        state.workers.leased(
            &holder,
            &req.worker,
            &queue,
            jobs.iter()
                .filter_map(|j| Some((j.id, j.lease.as_ref()?.expires_at))),
        );
        if !jobs.is_empty() {
            let label = state.workers.queue_label(&queue);
            metrics::counter!("keel_worker_leases_total", "queue" => label)
                .increment(jobs.len() as u64);
            return Ok(jobs);
        }
        let now = Instant::now();
        if now >= until {
            return Ok(Vec::new());
        }
        RequestScope::enter_current(Step::WaitJob);
        tokio::select! {
            () = &mut woken => {}
            () = tokio::time::sleep_until(until.min(now + RECHECK)) => {}
            () = stopped.cancelled() => return Ok(Vec::new()),
            () = give_up.cancelled() => return Ok(Vec::new()),
        }
    }
}

/// Extends a lease, or tells the worker its job was cancelled.
pub async fn heartbeat(
    state: &ApiState,
    caller: &Caller,
    id: JobId,
    req: HeartbeatIn,
) -> Result<Heartbeat, ApiError> {
    let outcome = state
        .store
        .heartbeat(HeartbeatParams {
            leases: vec![LeaseRef {
                id,
                token: req.token,
            }],
            lease_for: req.lease_for,
        })
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("the store answered no heartbeat outcome"))?;
    match outcome {
        Ok(expires_at) => {
            state.workers.heartbeat(id, expires_at);
            Ok(Heartbeat {
                expires_at: Some(expires_at),
                cancel_requested: false,
            })
        }
        Err(StoreError::StaleLease(_)) => {
            let job = fresh_visible_job(state, caller, id).await?;
            state.workers.released(id);
            if job.state == JobState::Cancelled {
                // Whoever can name the job can read its state anyway (GET /v1/jobs/{id}),
                // so telling a stale token that it was cancelled reveals nothing more.
                Ok(Heartbeat {
                    expires_at: None,
                    cancel_requested: true,
                })
            } else {
                Err(stale(&job))
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Records completions through the API's completer (the batched write the built-in
/// workers use); one answer per item, in order. Each successful one is announced, so
/// `/v1/process` waiters and the read cache see it.
pub async fn complete(
    state: &ApiState,
    caller: &Caller,
    items: Vec<CompleteIn>,
) -> Vec<Result<JobState, ApiError>> {
    let max = state.config.max_args_bytes;
    let writes = items.into_iter().map(|item| async move {
        if let Some(result) = &item.result {
            check_result(result.get(), max)?;
        }
        let written = state
            .completer()
            .complete(Completion {
                lease: LeaseRef {
                    id: item.id,
                    token: item.token,
                },
                result: item.result,
            })
            .await;
        match written {
            Ok(()) => {
                finished(state, item.id, JobState::Completed, None).await;
                Ok(JobState::Completed)
            }
            Err(e) => Err(explain(state, caller, item.id, e).await),
        }
    });
    join_all(writes).await
}

/// Records failed attempts; one answer per item, in order: the job as it is now
/// (`retryable` or `discarded`).
pub async fn fail(
    state: &ApiState,
    caller: &Caller,
    items: Vec<FailIn>,
) -> Vec<Result<Job, ApiError>> {
    let writes = items.into_iter().map(|item| async move {
        let retry_at = item
            .retry_in
            .map(|d| chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default());
        let written = state
            .store
            .fail(FailParams {
                lease: LeaseRef {
                    id: item.id,
                    token: item.token,
                },
                error: item.error,
                permanent: item.permanent,
                retry_at,
            })
            .await;
        match written {
            Ok(job) => {
                finished(state, job.id, job.state, Some(&job)).await;
                Ok(job)
            }
            Err(e) => Err(explain(state, caller, item.id, e).await),
        }
    });
    join_all(writes).await
}

/// Gives a job back unrun: `available` again, the attempt not counted.
pub async fn release(
    state: &ApiState,
    caller: &Caller,
    id: JobId,
    token: keel_core::LeaseToken,
) -> Result<Job, ApiError> {
    let outcome = state
        .store
        .release(vec![LeaseRef { id, token }])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::internal("the store answered no release outcome"))?;
    if let Err(e) = outcome {
        return Err(explain(state, caller, id, e).await);
    }
    let job = state.store.get(id).await?;
    finished(state, id, job.state, Some(&job)).await;
    state.runtime.wakeups.job_available(&job.queue);
    Ok(job)
}

/// The one answer of a single-outcome call to [`complete`] or [`fail`].
pub fn one<T>(answers: Vec<Result<T, ApiError>>) -> Result<T, ApiError> {
    answers
        .into_iter()
        .next()
        .unwrap_or_else(|| Err(ApiError::internal("no outcome was recorded")))
}

/// The workers the caller may see.
pub fn workers(state: &ApiState, caller: &Caller) -> Vec<WorkerInfo> {
    state.workers.list(caller.scope())
}

/// Reads a job from the store (not the cache: a refused outcome is explained by the job's
/// state now) as the caller may see it: `404` for another tenant's.
pub async fn fresh_visible_job(
    state: &ApiState,
    caller: &Caller,
    id: JobId,
) -> Result<Job, ApiError> {
    let job = state.store.get(id).await?;
    if caller.may_see(&job.tenant) {
        Ok(job)
    } else {
        Err(ApiError::job_not_found(id))
    }
}

/// A result must fit the same bounds as `args`: what a client could not read back is
/// refused now, while the worker can still report something else.
fn check_result(text: &str, max_bytes: usize) -> Result<(), ApiError> {
    if text.len() > max_bytes {
        return Err(ApiError::PayloadTooLarge {
            limit: Some(max_bytes),
        });
    }
    keel_core::json_text::check(text).map_err(|e| {
        ApiError::Validation(vec![keel_core::FieldError {
            field: "result".to_owned(),
            message: e.to_string(),
        }])
    })
}

/// After an outcome was written: forget the lease, refresh the read cache, announce it.
async fn finished(state: &ApiState, id: JobId, to: JobState, job: Option<&Job>) {
    let queue = match job {
        Some(j) => Some(j.queue.clone()),
        None => state.workers.queue_of(id),
    };
    state.workers.released(id);
    state.job_cache.invalidate(id).await;
    let queue = match queue {
        Some(q) => Some(q),
        // Leased through another replica: read it to announce it with its queue.
        None => state.store.get(id).await.ok().map(|j| j.queue),
    };
    if let Some(queue) = queue {
        // Built-in runs are counted by the runtime (`keel_jobs_finished_total`, by kind);
        // an external worker's kinds are the client's own names, so these count by queue,
        // under the same bounded labels as the leases.
        let outcome = match to {
            JobState::Completed => "completed",
            JobState::Retryable | JobState::Scheduled => "retryable",
            JobState::Discarded => "discarded",
            JobState::Cancelled => "cancelled",
            JobState::Available | JobState::Running => "released",
        };
        metrics::counter!(
            "keel_worker_outcomes_total",
            "queue" => state.workers.queue_label(&queue),
            "outcome" => outcome,
        )
        .increment(1);
        state.runtime.events.publish(JobEvent {
            id,
            queue,
            state: to,
        });
    }
}

/// Turns a refused outcome into the answer the worker gets: a stale token says why.
async fn explain(state: &ApiState, caller: &Caller, id: JobId, e: StoreError) -> ApiError {
    match e {
        StoreError::StaleLease(_) => {
            state.workers.released(id);
            match fresh_visible_job(state, caller, id).await {
                Ok(job) => stale(&job),
                Err(not_visible) => not_visible,
            }
        }
        StoreError::NotFound(_) => ApiError::job_not_found(id),
        other => other.into(),
    }
}

/// The `409` for a token that no longer holds `job`, saying what happened to it.
fn stale(job: &Job) -> ApiError {
    let why = match job.state {
        JobState::Cancelled => "the job was cancelled",
        JobState::Completed => "the job already completed",
        JobState::Discarded => "the job was discarded",
        JobState::Running => "the lease lapsed and the job was rescued; another lease holds it now",
        JobState::Available | JobState::Retryable | JobState::Scheduled => {
            "the lease lapsed or was given up; the job will run again"
        }
    };
    ApiError::StaleLease {
        job_id: job.id,
        detail: format!("job {}: the lease token is stale: {why}", job.id),
    }
}
