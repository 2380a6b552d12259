//! Running one leased job: the handler in a task of its own (so a panic is a failed attempt,
//! not a dead worker) under the job's timeout and cancellation token, then its outcome
//! written back — complete, fail, or release at shutdown — and announced.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keel_core::store::{Completion, FailParams, LeaseRef};
use keel_core::{Job, JobId, JobState, QueueName, StoreError};
use rand::Rng;
use serde_json::value::RawValue;
use tokio::task::JoinError;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dispatcher::Slot;
use crate::handle::JobEvent;
use crate::handler::{JobContext, JobError};
use crate::inflight::{Cause, Claim, StopCause};
use crate::runtime::Shared;
use crate::telemetry::{self, BusyGuard, Outcome, QueueMetrics};

/// How long a handler whose token fired may take to return before its task is aborted.
/// Cooperative cancellation first (the handler can stop cleanly), then a hard stop, so a
/// handler that ignores its token cannot hold a worker slot or shutdown forever.
const ABANDON_AFTER: Duration = Duration::from_secs(2);

/// Attempts at writing an outcome when the store fails transiently. The lease stays ours
/// (the heartbeat keeps extending it) while we retry, so a blip does not lose a result.
const WRITE_ATTEMPTS: u32 = 6;
/// First delay between write attempts; doubles each time, with full jitter.
const WRITE_BACKOFF: Duration = Duration::from_millis(50);

/// Runs `job`, leased by this process and registered by `claim`, on `slot` (one worker slot
/// of its queue), counted in `metrics` (its queue's series). The slot is given back as soon as the outcome is handed to the completer
/// (or, for the rarer failures and releases, written), so the next job starts while this
/// one's write is in flight; the claim lasts until the write is done, so the lease is kept
/// alive that long.
pub(crate) async fn run_job(job: Job, claim: Claim, slot: Slot, metrics: Arc<QueueMetrics>) {
    let span = tracing::info_span!(
        "job",
        job_id = %job.id,
        queue = %job.queue,
        kind = %job.kind,
        attempt = job.attempt,
        tenant = %job.tenant,
    );
    run_claimed(job, claim, slot, metrics)
        .instrument(span)
        .await;
}

/// What the job's attempt came to, before it is written.
enum Verdict {
    Complete(Option<Box<RawValue>>),
    Fail(JobError),
    Release,
}

/// The identity of the job, kept after the job itself moved into the handler.
struct Meta {
    id: JobId,
    queue: QueueName,
    lease: LeaseRef,
}

async fn run_claimed(job: Job, claim: Claim, slot: Slot, metrics: Arc<QueueMetrics>) {
    let shared = Arc::clone(claim.shared());
    let meta = Meta {
        id: job.id,
        queue: job.queue.clone(),
        lease: claim.lease,
    };
    let series = metrics.kind(&job.kind);
    let busy = BusyGuard::new(&metrics);
    if let Some(started) = job.started_at {
        let wait = (started - job.run_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
        metrics.job_wait(wait);
    }
    tracing::debug!("job started");

    let started = Instant::now();
    let verdict = execute(&shared, job, &claim.token, &claim.cause).await;
    series.job_duration(started.elapsed());
    drop(busy);

    shared.handle.running.mark_finishing(meta.id);
    let outcome = record(&shared, &meta, verdict, &claim.cause, slot).await;
    series.job_finished(outcome);
    if shared.draining.is_cancelled() {
        let counter = if outcome == Outcome::Released {
            &shared.released
        } else {
            &shared.finished_in_grace
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    drop(claim);
}

/// Runs the handler and decides what to write.
async fn execute(shared: &Shared, job: Job, token: &CancellationToken, cause: &Cause) -> Verdict {
    let Some(handler) = shared.handlers.get(&job.kind).cloned() else {
        // Retryable, not permanent: during a rolling deploy an older replica may lease a kind
        // only newer ones know; a later attempt will likely land on one of those.
        return Verdict::Fail(JobError::retry(format!(
            "no handler for job kind {} is registered on worker {}",
            job.kind, shared.config.worker_id
        )));
    };
    let timeout = job.timeout;
    let ctx = JobContext {
        job,
        cancel: token.clone(),
    };
    let mut task = shared
        .jobs
        .spawn(async move { handler.run(ctx).await }.in_current_span());

    let deadline = tokio::time::sleep(timeout);
    let returned = tokio::select! {
        biased;
        joined = &mut task => Some(verdict_of(joined)),
        () = token.cancelled() => None,
        () = deadline => {
            let _ = cause.set(StopCause::TimedOut);
            token.cancel();
            None
        }
    };
    let late = match returned {
        // The normal case: the handler finished on its own.
        Some(verdict) if !token.is_cancelled() => return verdict,
        // It returned because its token fired (a cancelled sleep): the stop decides.
        Some(verdict) => Some(verdict),
        // The token fired first: give the handler a moment to notice, then abort it.
        None => match tokio::time::timeout(ABANDON_AFTER, &mut task).await {
            Ok(joined) => Some(verdict_of(joined)),
            Err(_) => {
                tracing::warn!(
                    "handler ignored its cancellation for {} ms; aborting it",
                    ABANDON_AFTER.as_millis()
                );
                task.abort();
                None
            }
        },
    };
    let why = *cause.get_or_init(|| {
        if shared.hard_stop.is_cancelled() {
            StopCause::Shutdown
        } else {
            StopCause::Cancelled
        }
    });
    match (why, late) {
        (StopCause::TimedOut, _) => Verdict::Fail(JobError::retry(format!(
            "timed out after {} ms",
            timeout.as_millis()
        ))),
        // Done after all: keep the work. Anything else goes back to the queue uncounted.
        (StopCause::Shutdown, Some(Verdict::Complete(result))) => Verdict::Complete(result),
        (StopCause::Shutdown, _) => Verdict::Release,
        // The store decides: the write is rejected as stale if the job really was cancelled
        // or taken over, and recorded otherwise.
        (_, Some(verdict)) => verdict,
        (StopCause::Cancelled, None) => Verdict::Fail(JobError::retry("cancelled while running")),
        (StopCause::LeaseLost, None) => Verdict::Fail(JobError::retry("lease lost while running")),
    }
}

fn verdict_of(joined: Result<Result<Option<Box<RawValue>>, JobError>, JoinError>) -> Verdict {
    match joined {
        // A result is stored as sent and read back by every client: it meets the same rules
        // as a client's args (depth, Unicode), or the attempt fails saying why. Permanent:
        // the same code would produce the same result again.
        Ok(Ok(result)) => match result
            .as_deref()
            .map(|r| keel_core::json_text::check(r.get()))
        {
            Some(Err(e)) => Verdict::Fail(JobError::permanent(format!(
                "the handler's result was refused: it {e}"
            ))),
            _ => Verdict::Complete(result),
        },
        Ok(Err(e)) => Verdict::Fail(e),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic payload".to_owned());
            Verdict::Fail(JobError::retry(format!("handler panicked: {message}")))
        }
        Err(_) => Verdict::Fail(JobError::retry("handler task was aborted")),
    }
}

/// Writes the verdict, announces the new state, and says how the run ended. `slot` is given
/// back once a completion is queued for its write, or once any other outcome is written.
async fn record(
    shared: &Shared,
    meta: &Meta,
    verdict: Verdict,
    cause: &Cause,
    slot: Slot,
) -> Outcome {
    let mut slot = Some(slot);
    let written = match verdict {
        Verdict::Complete(result) => {
            let r = with_retries("complete", || {
                let completion = Completion {
                    lease: meta.lease,
                    result: result.clone(),
                };
                let slot = slot.take();
                async move {
                    let receipt = shared.completer.submit(completion).await?;
                    drop(slot);
                    receipt.outcome().await
                }
            })
            .await;
            r.map(|()| {
                tracing::debug!("job completed");
                JobState::Completed
            })
        }
        Verdict::Fail(error) => {
            // Fixed once, so a retried write asks for the same time. Capped like a configured
            // backoff, so no handler's hint can park a job for years (or overflow the date).
            let retry_at = error.retry_after.map(|after| {
                shared.clock.now() + keel_core::clock::to_delta(after.min(keel_core::Backoff::MAX))
            });
            let r = with_retries("fail", || {
                shared.store.fail(FailParams {
                    lease: meta.lease,
                    error: error.message.clone(),
                    permanent: error.permanent,
                    retry_at,
                })
            })
            .await;
            r.map(|job| {
                // Expected failures are warnings; `error` is kept for the store failing.
                tracing::warn!(
                    error = %error.message,
                    permanent = error.permanent,
                    state = %job.state,
                    "job attempt failed"
                );
                job.state
            })
        }
        Verdict::Release => {
            let r = with_retries("release", || async {
                let mut items = shared.store.release(vec![meta.lease]).await?;
                items
                    .pop()
                    .unwrap_or(Err(StoreError::NotFound(meta.lease.id)))
            })
            .await;
            r.map(|()| {
                tracing::info!("job released at shutdown; its attempt does not count");
                JobState::Available
            })
        }
    };
    drop(slot);
    match written {
        Ok(state) => {
            shared.handle.events.publish(JobEvent {
                id: meta.id,
                queue: meta.queue.clone(),
                state,
            });
            match state {
                JobState::Completed => Outcome::Completed,
                JobState::Retryable => Outcome::Retryable,
                JobState::Available => Outcome::Released,
                _ => Outcome::Discarded,
            }
        }
        Err(StoreError::StaleLease(_) | StoreError::NotFound(_)) => {
            stale(shared, meta, cause).await
        }
        Err(e) => {
            telemetry::report_store_error(
                "recording a job's outcome (the lease will expire and the job will be rescued)",
                &e,
            );
            Outcome::Unrecorded
        }
    }
}

/// The outcome write was refused: the job was cancelled, or its lease lapsed and it was
/// rescued (and perhaps run again) meanwhile. Never retried: the store already holds the
/// truth, and it is not ours.
async fn stale(shared: &Shared, meta: &Meta, cause: &Cause) -> Outcome {
    let cancelled = match cause.get() {
        Some(StopCause::Cancelled) => true,
        Some(StopCause::LeaseLost) => false,
        // Nobody told us why: ask the store (one read, on a rare path).
        _ => matches!(
            shared.store.get(meta.id).await,
            Ok(Job {
                state: JobState::Cancelled,
                ..
            })
        ),
    };
    if cancelled {
        tracing::info!("job was cancelled while it ran; its outcome was dropped");
        Outcome::Cancelled
    } else {
        if cause.set(StopCause::LeaseLost).is_ok() {
            // Not yet counted by the heartbeat task.
            telemetry::lease_lost(&meta.queue);
        }
        tracing::info!(
            "job's lease was lost before its outcome was recorded; the outcome was dropped"
        );
        Outcome::LeaseLost
    }
}

/// Runs `op` until it succeeds, fails for a reason retrying cannot fix, or
/// [`WRITE_ATTEMPTS`] transient failures, with capped exponential backoff and full jitter.
pub(crate) async fn with_retries<T, F, Fut>(op: &'static str, mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match f().await {
            Err(e) if e.is_transient() && attempt < WRITE_ATTEMPTS => {
                telemetry::store_error(op);
                let window = WRITE_BACKOFF * 2u32.pow(attempt - 1);
                let delay = rand::rng().random_range(Duration::ZERO..=window);
                tracing::warn!(op, attempt, error = %telemetry::ErrorChain(&e), "store write failed; retrying");
                tokio::time::sleep(delay).await;
            }
            Err(e) => {
                if !matches!(e, StoreError::StaleLease(_) | StoreError::NotFound(_)) {
                    telemetry::store_error(op);
                }
                return Err(e);
            }
            Ok(v) => return Ok(v),
        }
    }
}
