//! Maintenance: make due jobs available (promote), take back jobs whose lease expired
//! (rescue), and delete finished jobs, idempotency keys and cron tick records past
//! retention.
//!
//! Only the maintenance leader runs it (see `leader.rs`), so N replicas do not run N times
//! the same statements. That is for efficiency only: every step is a batched store call
//! that is safe to run from several replicas at once (the statements skip rows another
//! transaction holds), so a pass that overlaps a leadership handover does no harm. Each step
//! repeats while its batch comes back full, so a backlog drains in short transactions; a
//! failing step is logged and the pass moves on to the next one.

use std::sync::Arc;
use std::time::Duration;

use keel_core::NewSchedule;
use keel_core::clock::to_delta;
use keel_core::store::{PromoteParams, RescueParams, RetentionParams};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::handle::JobEvent;
use crate::runtime::Shared;
use crate::telemetry;

/// Most batches one step runs per pass, so a huge backlog in one step cannot starve the
/// others (the next pass continues it).
const MAX_BATCHES_PER_PASS: usize = 100;

/// Cron tick records are kept this much longer than the longest catch-up window: a tick
/// that old can never be due again, so its record no longer guards anything.
const TICK_RECORD_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// While this replica leads, runs a pass every `maintenance.interval`, the first one as
/// soon as it becomes leader; until `stop` fires.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut leadership = shared.handle.leadership.subscribe();
    'terms: loop {
        if leadership.borrow_and_update().is_none() {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                changed = leadership.changed() => if changed.is_err() { break },
            }
            continue;
        }
        // A fresh interval per term: its first tick fires at once.
        let mut tick = tokio::time::interval(shared.config.maintenance.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break 'terms,
                changed = leadership.changed() => {
                    if changed.is_err() {
                        break 'terms;
                    }
                    // Lost, or a new term: decide again.
                    continue 'terms;
                }
                _ = tick.tick() => pass(&shared, &stop).await,
            }
        }
    }
    tracing::debug!("maintenance stopped");
}

/// One pass of every step.
pub(crate) async fn pass(shared: &Shared, stop: &CancellationToken) {
    let batch = shared.config.maintenance.batch;
    let full = |n: u64| n >= u64::from(batch);

    for _ in 0..MAX_BATCHES_PER_PASS {
        match shared.store.promote(PromoteParams { limit: batch }).await {
            Ok(promoted) => {
                let mut total = 0;
                for p in &promoted {
                    total += p.count;
                    telemetry::promoted(shared.handle.catalog.queue_label(&p.queue), p.count);
                    shared.wake(&p.queue);
                }
                if !full(total) || stop.is_cancelled() {
                    break;
                }
            }
            Err(e) => {
                telemetry::store_error("promote");
                telemetry::report_store_error("promoting due jobs", &e);
                break;
            }
        }
    }

    for _ in 0..MAX_BATCHES_PER_PASS {
        match shared.store.rescue(RescueParams { limit: batch }).await {
            Ok(rescued) => {
                for r in &rescued {
                    telemetry::rescued(shared.handle.catalog.queue_label(&r.queue), r.state);
                    tracing::warn!(
                        job_id = %r.id,
                        queue = %r.queue,
                        owner = r.owner.as_ref().map_or("unknown", |o| o.as_str()),
                        state = %r.state,
                        "rescued a job whose lease expired"
                    );
                    shared.handle.events.publish(JobEvent {
                        id: r.id,
                        queue: r.queue.clone(),
                        state: r.state,
                    });
                }
                if !full(rescued.len() as u64) || stop.is_cancelled() {
                    break;
                }
            }
            Err(e) => {
                telemetry::store_error("rescue");
                telemetry::report_store_error("rescuing expired leases", &e);
                break;
            }
        }
    }

    let now = shared.clock.now();
    if let Some(finished_before) =
        now.checked_sub_signed(to_delta(shared.config.maintenance.retention))
    {
        for _ in 0..MAX_BATCHES_PER_PASS {
            let params = RetentionParams {
                finished_before,
                limit: batch,
            };
            match shared.store.delete_finished(params).await {
                Ok(n) => {
                    telemetry::deleted("jobs", n);
                    if !full(n) || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    telemetry::store_error("delete_finished");
                    telemetry::report_store_error("deleting finished jobs past retention", &e);
                    break;
                }
            }
        }
    }

    for _ in 0..MAX_BATCHES_PER_PASS {
        match shared.store.delete_expired_idempotency_keys(batch).await {
            Ok(n) => {
                telemetry::deleted("idempotency_keys", n);
                if !full(n) || stop.is_cancelled() {
                    break;
                }
            }
            Err(e) => {
                telemetry::store_error("delete_idempotency_keys");
                telemetry::report_store_error("deleting expired idempotency keys", &e);
                break;
            }
        }
    }

    if let Some(before) =
        now.checked_sub_signed(to_delta(NewSchedule::MAX_CATCH_UP + TICK_RECORD_MARGIN))
    {
        for _ in 0..MAX_BATCHES_PER_PASS {
            match shared.store.delete_old_ticks(before, batch).await {
                Ok(n) => {
                    telemetry::deleted("schedule_ticks", n);
                    if !full(n) || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    telemetry::store_error("delete_old_ticks");
                    telemetry::report_store_error("deleting old cron tick records", &e);
                    break;
                }
            }
        }
    }
}
