//! One dispatcher per queue: leases as many jobs as there are free worker slots, and hands
//! each to a task that holds its slot.
//!
//! Slots are the permits of a per-queue semaphore, moved into the spawned task, so the pool
//! can never run more than `concurrency` jobs and a slot comes back however the task ends.
//! The dispatcher sleeps while the queue is empty and wakes on an in-process notify (an
//! enqueue or promotion here), on the poll interval (work from elsewhere), or on shutdown.

use std::sync::Arc;
use std::time::Duration;

use keel_core::store::LeaseParams;
use rand::Rng;
use tokio::sync::{Notify, Semaphore};

use crate::config::QueueConfig;
use crate::runtime::Shared;
use crate::telemetry;
use crate::worker;

/// First delay after a failed lease; doubles per consecutive failure.
const LEASE_RETRY_BASE: Duration = Duration::from_millis(100);
/// Longest delay between lease attempts while the store keeps failing, so the queue is
/// picked up again soon after the store recovers.
const LEASE_RETRY_CAP: Duration = Duration::from_secs(30);
/// Longest a dispatcher with a backlog waits for more free slots before leasing.
const BATCH_WINDOW: Duration = Duration::from_millis(2);

/// Runs until shutdown's first phase ([`Shared::draining`]). Jobs already leased when it
/// fires are still started: they were handed to us, and the shutdown decides their fate.
pub(crate) async fn run(shared: Arc<Shared>, queue: QueueConfig, wake: Arc<Notify>) {
    let semaphore = Arc::new(Semaphore::new(queue.concurrency));
    let stop = shared.draining.clone();
    let mut failures: u32 = 0;
    // Whether the last lease came back full, i.e. there is probably a backlog.
    let mut backlog = false;
    // Under a backlog, wait for this many free slots (briefly) before leasing again.
    let batch = u32::try_from((queue.concurrency / 4).max(1)).unwrap_or(u32::MAX);
    loop {
        // Wait for a free slot, then take every free slot: one lease call fills them all.
        let mut permits = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            permit = Arc::clone(&semaphore).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // never closed; nothing to lease for if it were
            },
        };
        if backlog && batch > 1 {
            // Jobs are waiting and workers finish one by one: leasing at every freed slot
            // would make many one-job leases, each a round trip and a commit. Give more
            // slots a moment to free up so one lease fills many. Bounded by BATCH_WINDOW,
            // so slow jobs never leave free workers idle for long.
            let more = Arc::clone(&semaphore).acquire_many_owned(batch - 1);
            if let Ok(Ok(more)) = tokio::time::timeout(BATCH_WINDOW, more).await {
                permits.merge(more);
            }
        }
        let free = semaphore.available_permits();
        if free > 0
            && let Ok(more) = Arc::clone(&semaphore).try_acquire_many_owned(free as u32)
        {
            permits.merge(more);
        }
        let max = permits.num_permits();
        let leased = shared
            .store
            .lease(LeaseParams {
                queue: queue.name.clone(),
                max: u32::try_from(max).unwrap_or(u32::MAX),
                lease_for: shared.config.lease_for,
                owner: shared.config.worker_id.clone(),
                tenant: None,
                kinds: Vec::new(),
            })
            .await;
        match leased {
            Ok(jobs) => {
                failures = 0;
                let filled = jobs.len() >= max;
                backlog = filled;
                if !jobs.is_empty() {
                    telemetry::jobs_leased(&queue.name, jobs.len());
                    telemetry::store_batch("lease", jobs.len());
                }
                for job in jobs {
                    let permit = permits.split(1);
                    if permit.is_none() {
                        tracing::error!(
                            queue = %queue.name,
                            max,
                            "store leased more jobs than asked for; running the extra one anyway"
                        );
                    }
                    shared
                        .jobs
                        .spawn(worker::run_job(Arc::clone(&shared), job, permit));
                }
                // Slots the lease did not fill go back now.
                drop(permits);
                if filled {
                    // Probably more waiting: lease again as soon as a slot frees up.
                    continue;
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = wake.notified() => {}
                    () = tokio::time::sleep(shared.config.poll_interval) => {}
                }
            }
            Err(e) => {
                drop(permits);
                backlog = false;
                failures = failures.saturating_add(1);
                telemetry::store_error("lease");
                telemetry::report_store_error(
                    &format!("leasing jobs from queue {}", queue.name),
                    &e,
                );
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(retry_delay(failures)) => {}
                }
            }
        }
    }
    tracing::debug!(queue = %queue.name, "dispatcher stopped");
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
}
