//! Maintenance: make due jobs available (promote), take back jobs whose lease expired
//! (rescue), and delete finished jobs, idempotency keys and cron tick records past
//! retention; in a loop of its own, vacuum the job tables when the database does not.
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
use keel_core::store::{LeaderEpoch, PromoteParams, RescueParams, RetentionParams};
use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};
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
    let mut ticks = LeaderTicks::new(&shared, shared.config.maintenance.interval);
    while ticks.next(&stop).await {
        pass(&shared, &stop).await;
    }
    tracing::debug!("maintenance stopped");
}

/// Time between two looks at whether the job tables need a vacuum nothing else will run
/// (see [`keel_core::MaintenanceStore::vacuum`]); autovacuum's own pause is a minute. A
/// vacuum of a large table can take seconds, so it has a loop of its own: promotion and
/// rescue never wait for it.
const VACUUM_NAP: Duration = Duration::from_secs(10);

/// While this replica leads, asks the store every [`VACUUM_NAP`] to vacuum what needs it;
/// until `stop` fires.
pub(crate) async fn run_vacuum(shared: Arc<Shared>, stop: CancellationToken) {
    let mut ticks = LeaderTicks::new(&shared, VACUUM_NAP);
    while ticks.next(&stop).await {
        // Shutdown does not wait for a vacuum: the server carries on with one given up here
        // (a backend notices its client gone only when it next talks to it), and the next
        // leader's first look finds whatever is left.
        let vacuumed = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            vacuumed = shared.store.vacuum() => vacuumed,
        };
        match vacuumed {
            Ok(tables) => tables.iter().for_each(|t| telemetry::vacuumed(t)),
            Err(e) => {
                telemetry::store_error("vacuum");
                telemetry::report_store_error("vacuuming the job tables", &e);
            }
        }
    }
    tracing::debug!("vacuum stopped");
}

/// Ticks every `every` while this replica leads, the first time as soon as it becomes
/// leader (a fresh interval per term), and not at all while it does not.
struct LeaderTicks {
    leadership: watch::Receiver<Option<LeaderEpoch>>,
    every: Duration,
    /// The current term's interval; `None` between terms.
    tick: Option<Interval>,
}

impl LeaderTicks {
    fn new(shared: &Shared, every: Duration) -> Self {
        Self {
            leadership: shared.handle.leadership.subscribe(),
            every,
            tick: None,
        }
    }

    /// Waits for the next tick of a term; `false` once `stop` fires or leadership can no
    /// longer change.
    async fn next(&mut self, stop: &CancellationToken) -> bool {
        loop {
            let Some(tick) = self.tick.as_mut() else {
                if self.leadership.borrow_and_update().is_some() {
                    let mut tick = tokio::time::interval(self.every);
                    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    self.tick = Some(tick);
                    continue;
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return false,
                    changed = self.leadership.changed() => if changed.is_err() { return false },
                }
                continue;
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => return false,
                changed = self.leadership.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                    // Lost, or a new term: decide again.
                    self.tick = None;
                }
                _ = tick.tick() => return true,
            }
        }
    }
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
