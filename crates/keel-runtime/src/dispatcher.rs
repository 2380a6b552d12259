//! One dispatcher per queue: keeps a small buffer of leased jobs ahead of its worker slots,
//! and starts a buffered job the moment a slot frees up.
//!
//! A slot that had to wait for a lease round trip after every job would spend most of its
//! time waiting for the database when jobs are short (a noop job costs a lease and a commit
//! of a few milliseconds, and nothing of its own). So the dispatcher leases ahead: it holds
//! up to `concurrency + prefetch` jobs (running plus buffered), leases again in the
//! background while slots drain the buffer, and a worker hands its outcome to the completer
//! and gives its slot back before the write is done ([`crate::worker`]). How far ahead
//! follows the queue's pace ([`Pace`]: jobs started per second × the lease round trip),
//! capped by [`crate::RuntimeConfig::prefetch`]. With few leases in flight at a time, a
//! busy queue's leases batch themselves: whatever room opened up during one round trip is
//! asked for by the next. Up to [`MAX_LEASES`] are in flight when the room allows: a
//! second lease runs while the first is still being answered (on Postgres, the walk and
//! update of one batch are CPU on one backend, and a single lease at a time left the
//! second core idle; `SKIP LOCKED` keeps the two batches apart). A second lease is only
//! sent for at least half the prefetch, so a quiet queue still leases one call at a time.
//!
//! Buffered jobs are leased jobs like running ones: the heartbeat extends their leases, a
//! user's cancel (or a lost lease) fires their token and the dispatcher drops them instead
//! of starting them, and when shutdown begins they are released at once, without using an
//! attempt, so another replica (or the next start) runs them.
//!
//! Slots are the permits of a per-queue semaphore, moved into the task running the job, so
//! the pool never runs more than `concurrency` jobs and a slot comes back however the task
//! ends. The dispatcher sleeps while the queue is empty and wakes on an in-process notify
//! (an enqueue or promotion here), on the poll interval (work from elsewhere), or on
//! shutdown.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use keel_core::pace::Pace;
use keel_core::store::{LeaseParams, LeaseRef};
use keel_core::{Job, StoreError};
use rand::Rng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::QueueConfig;
use crate::handle::JobEvent;
use crate::inflight::{Claim, StopCause};
use crate::runtime::Shared;
use crate::telemetry::{self, QueueMetrics};
use crate::worker;

/// Most leases of one queue in flight at once (see the module documentation).
const MAX_LEASES: usize = 2;
/// First delay after a failed lease; doubles per consecutive failure.
const LEASE_RETRY_BASE: Duration = Duration::from_millis(100);
/// Longest delay between lease attempts while the store keeps failing, so the queue is
/// picked up again soon after the store recovers.
const LEASE_RETRY_CAP: Duration = Duration::from_secs(30);

/// One worker slot of a queue, held by the task running a job. Dropping it — however that
/// task ends — gives the slot back and tells the dispatcher, which starts a buffered job on
/// it at once.
pub(crate) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.freed.notify_one();
    }
}

/// A leased job waiting in the buffer for a slot.
struct Buffered {
    job: Job,
    claim: Claim,
}

type LeaseCall = Pin<Box<dyn Future<Output = Result<Vec<Job>, StoreError>> + Send>>;

/// A lease in flight: the call, how many jobs it asked for (counted against the room, so
/// leases in flight never ask for more than the queue can hold), and when it was sent (its
/// round trip feeds [`Pace`]).
struct Leasing {
    call: LeaseCall,
    asked: usize,
    sent: Instant,
}

/// Runs until shutdown's first phase ([`Shared::draining`]), then releases what it holds
/// but has not started (including a lease that was in flight) and returns.
pub(crate) async fn run(shared: Arc<Shared>, queue: QueueConfig, wake: Arc<Notify>) {
    let slots = Arc::new(Semaphore::new(queue.concurrency));
    let freed = Arc::new(Notify::new());
    let mut pace = Pace::new(shared.config.prefetch_cap(), std::time::Instant::now());
    let metrics = Arc::new(QueueMetrics::new(&queue.name, shared.handlers.kinds()));
    let stop = shared.draining.clone();
    let mut buffer: VecDeque<Buffered> = VecDeque::new();
    let mut leasing: Vec<Leasing> = Vec::new();
    // Whether the queue may have more work: the last lease came back full, or something
    // woke us since. While false, only a wakeup or the poll interval leads to a lease.
    let mut more = true;
    // While the queue looks empty: when to look again without a wakeup.
    let mut poll_at: Option<Instant> = None;
    let mut failures: u32 = 0;
    let mut retry_at: Option<Instant> = None;
    let mut reported = usize::MAX;
    loop {
        let started = start_buffered(&shared, &metrics, &slots, &freed, &mut buffer);
        pace.started(started, std::time::Instant::now());
        if buffer.len() != reported {
            reported = buffer.len();
            metrics.prefetched(reported);
        }
        let capacity = queue.concurrency + pace.prefetch();
        let running = queue.concurrency - slots.available_permits();
        let asked: usize = leasing.iter().map(|l| l.asked).sum();
        let room = capacity.saturating_sub(running + buffer.len() + asked);
        // With work buffered or a lease in flight, wait until half the prefetch is free
        // before leasing again, so a busy queue does not lease one job per finished job,
        // yet the rest of the buffer still covers the round trip. With nothing buffered or
        // asked for, lease at once: a worker is idle, or will be as soon as one finishes.
        if leasing.len() < MAX_LEASES
            && more
            && retry_at.is_none()
            && room > 0
            && ((leasing.is_empty() && buffer.is_empty()) || room >= (pace.prefetch() / 2).max(1))
        {
            leasing.push(Leasing {
                call: lease_call(&shared, &queue, room),
                asked: room,
                sent: Instant::now(),
            });
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            (leased, asked, took) = finish(&mut leasing) => match leased {
                Ok(jobs) => {
                    pace.leased(took);
                    failures = 0;
                    more = jobs.len() >= asked;
                    pace.answered(
                        more,
                        buffer.is_empty() && slots.available_permits() > 0,
                    );
                    if !more {
                        poll_at = Some(Instant::now() + shared.config.poll_interval);
                    }
                    take_lease(&shared, &queue, jobs, asked, &mut buffer);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    retry_at = Some(Instant::now() + retry_delay(failures));
                    telemetry::store_error("lease");
                    telemetry::report_store_error(
                        &format!("leasing jobs from queue {}", queue.name),
                        &e,
                    );
                }
            },
            () = freed.notified() => {}
            () = wake.notified() => {
                more = true;
                poll_at = None;
            }
            () = sleep_until(poll_at) => {
                more = true;
                poll_at = None;
            }
            () = sleep_until(retry_at) => retry_at = None,
        }
    }
    // Leases still in flight were granted to us: their jobs join the buffer and go back
    // with it.
    for Leasing { call, asked, .. } in leasing {
        if let Ok(jobs) = call.await {
            take_lease(&shared, &queue, jobs, asked, &mut buffer);
        }
    }
    release_buffer(&shared, &queue, buffer).await;
    metrics.prefetched(0);
    tracing::debug!(queue = %queue.name, "dispatcher stopped");
}

/// Starts buffered jobs on the free slots, returning how many; drops (without running) those whose token fired
/// while they waited: cancelled by a user, or found lost by the heartbeat.
fn start_buffered(
    shared: &Arc<Shared>,
    metrics: &Arc<QueueMetrics>,
    slots: &Arc<Semaphore>,
    freed: &Arc<Notify>,
    buffer: &mut VecDeque<Buffered>,
) -> usize {
    let mut started = 0;
    while let Some(next) = buffer.front() {
        if next.claim.token.is_cancelled() {
            if let Some(b) = buffer.pop_front() {
                dropped_unstarted(&b);
            }
            continue;
        }
        let Ok(permit) = Arc::clone(slots).try_acquire_owned() else {
            break;
        };
        let Some(Buffered { job, claim }) = buffer.pop_front() else {
            break;
        };
        let slot = Slot {
            permit: Some(permit),
            freed: Arc::clone(freed),
        };
        shared
            .jobs
            .spawn(worker::run_job(job, claim, slot, Arc::clone(metrics)));
        started += 1;
    }
    started
}

fn dropped_unstarted(b: &Buffered) {
    match b.claim.cause.get() {
        Some(StopCause::LeaseLost) => tracing::info!(
            job_id = %b.job.id,
            queue = %b.claim.queue,
            "a prefetched job's lease was lost before it started; dropped"
        ),
        _ => tracing::info!(
            job_id = %b.job.id,
            queue = %b.claim.queue,
            "a prefetched job was cancelled before it started; dropped"
        ),
    }
}

fn lease_call(shared: &Arc<Shared>, queue: &QueueConfig, max: usize) -> LeaseCall {
    let store = Arc::clone(&shared.store);
    let params = LeaseParams {
        queue: queue.name.clone(),
        max: u32::try_from(max).unwrap_or(u32::MAX),
        lease_for: shared.config.lease_for,
        owner: shared.config.worker_id.clone(),
        tenant: None,
        kinds: Vec::new(),
    };
    Box::pin(async move { store.lease(params).await })
}

/// Registers freshly leased jobs (heartbeats, cancels) and appends them to the buffer.
fn take_lease(
    shared: &Arc<Shared>,
    queue: &QueueConfig,
    jobs: Vec<Job>,
    asked: usize,
    buffer: &mut VecDeque<Buffered>,
) {
    if jobs.is_empty() {
        return;
    }
    if jobs.len() > asked {
        tracing::error!(
            queue = %queue.name,
            asked,
            leased = jobs.len(),
            "store leased more jobs than asked for; running the extra ones anyway"
        );
    }
    telemetry::jobs_leased(&queue.name, jobs.len());
    telemetry::store_batch("lease", jobs.len());
    for job in jobs {
        let Some(lease) = LeaseRef::of(&job) else {
            tracing::error!(job_id = %job.id, "store returned a leased job without a lease; skipping it");
            continue;
        };
        let claim = Claim::new(shared, lease, job.queue.clone());
        buffer.push_back(Buffered { job, claim });
    }
}

/// Gives back, without using an attempt, every buffered job no slot started: the process
/// is stopping, and another replica (or the next start) should run them rather than this
/// one start them late and cut them short.
async fn release_buffer(shared: &Arc<Shared>, queue: &QueueConfig, buffer: VecDeque<Buffered>) {
    let buffer: Vec<Buffered> = buffer
        .into_iter()
        .filter(|b| !b.claim.token.is_cancelled())
        .collect();
    if buffer.is_empty() {
        return;
    }
    let leases: Vec<LeaseRef> = buffer.iter().map(|b| b.claim.lease).collect();
    let answers = match worker::with_retries("release", || shared.store.release(leases.clone()))
        .await
    {
        Ok(answers) => answers,
        Err(e) => {
            telemetry::report_store_error(
                &format!(
                    "releasing {} prefetched jobs of queue {} at shutdown (their leases will lapse and they will be rescued)",
                    leases.len(),
                    queue.name
                ),
                &e,
            );
            return;
        }
    };
    let mut released = 0;
    for (b, answer) in buffer.iter().zip(answers) {
        if answer.is_ok() {
            released += 1;
            shared.handle.events.publish(JobEvent {
                id: b.job.id,
                queue: b.job.queue.clone(),
                state: keel_core::JobState::Available,
            });
        }
    }
    shared
        .released_unstarted
        .fetch_add(released, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        queue = %queue.name,
        released,
        "released the prefetched jobs no worker had started; their attempts do not count"
    );
    // The claims drop here, after the release: the heartbeat kept the leases until then.
    drop(buffer);
}

/// The first answer among the leases in flight, with how many jobs it asked for and its
/// round trip; that lease leaves `leasing`, the others stay. Never resolves when no lease
/// is in flight. Cancel-safe: dropped before an answer, every call stays in `leasing` and
/// is polled again next time (the loop drops this future on every freed slot, which is why
/// the send time lives in [`Leasing`], not here).
async fn finish(leasing: &mut Vec<Leasing>) -> (Result<Vec<Job>, StoreError>, usize, Duration) {
    // With nothing in flight the loop finds nothing ready and nothing registers a wakeup:
    // pending for good, as wanted.
    std::future::poll_fn(|cx| {
        for i in 0..leasing.len() {
            if let std::task::Poll::Ready(answer) = leasing[i].call.as_mut().poll(cx) {
                let done = leasing.swap_remove(i);
                return std::task::Poll::Ready((answer, done.asked, done.sent.elapsed()));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Sleeps until `at`; forever when there is no `at`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Capped exponential backoff with "equal jitter" (half fixed, half random): replicas that
/// failed together spread out, and a delay is never zero, so a down store is not spun on.
fn retry_delay(failures: u32) -> Duration {
    let window = LEASE_RETRY_BASE
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(LEASE_RETRY_CAP);
    let half = window / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_caps() {
        for failures in 1..40 {
            let d = retry_delay(failures);
            assert!(d > Duration::ZERO);
            assert!(d <= LEASE_RETRY_CAP, "{failures}: {d:?}");
        }
        assert!(retry_delay(1) <= LEASE_RETRY_BASE);
        assert!(retry_delay(30) >= LEASE_RETRY_CAP / 2);
    }

    /// The dispatcher's select drops `finish` whenever a slot frees up or a wakeup arrives;
    /// the round trip must still count from the send, or a busy queue measures a tiny round
    /// trip and prefetches almost nothing.
    #[tokio::test(start_paused = true)]
    async fn a_lease_round_trip_counts_from_the_send_across_interruptions() {
        let answer_after = Duration::from_millis(30);
        let mut leasing = vec![Leasing {
            call: Box::pin(async move {
                tokio::time::sleep(answer_after).await;
                Ok(Vec::new())
            }),
            asked: 7,
            sent: Instant::now(),
        }];
        let mut interrupted = 0;
        let (answer, asked, took) = loop {
            tokio::select! {
                done = finish(&mut leasing) => break done,
                () = tokio::time::sleep(Duration::from_millis(1)) => interrupted += 1,
            }
        };
        assert!(interrupted >= 20, "{interrupted}");
        assert!(answer.is_ok());
        assert_eq!(asked, 7);
        assert!(took >= answer_after, "{took:?}");
        assert!(leasing.is_empty());
    }

    /// With two leases in flight, the first to answer comes out and the other stays in
    /// flight, still counted from its own send.
    #[tokio::test(start_paused = true)]
    async fn the_first_of_two_leases_to_answer_comes_out_first() {
        let lease = |after_ms: u64, asked: usize| Leasing {
            call: Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                Ok(Vec::new())
            }),
            asked,
            sent: Instant::now(),
        };
        let mut leasing = vec![lease(50, 1), lease(20, 2)];
        let (answer, asked, took) = finish(&mut leasing).await;
        assert!(answer.is_ok());
        assert_eq!(asked, 2);
        assert!(took >= Duration::from_millis(20) && took < Duration::from_millis(50));
        assert_eq!(leasing.len(), 1);
        assert_eq!(leasing[0].asked, 1);
        let (_, asked, took) = finish(&mut leasing).await;
        assert_eq!(asked, 1);
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(leasing.is_empty());
        // Nothing in flight: no answer, ever.
        let idle = tokio::time::timeout(Duration::from_secs(3600), finish(&mut leasing)).await;
        assert!(idle.is_err());
    }
}
