//! Cron (G4): while this replica leads, enqueue each due tick of every schedule.
//!
//! Exactly once per tick rests on the store, not on this loop: [`ScheduleStore::enqueue_ticks`]
//! records the `(schedule, tick)` key in the same transaction as the job and refuses a write
//! fenced with a superseded term ([`StoreError::NotLeader`]). So two leaders during a
//! handover, or a retry after an ambiguous failure, cannot enqueue a tick twice; and a tick
//! missed while no replica led is enqueued by the next leader from the schedule's
//! `last_tick_at` (within its catch-up window, oldest first).
//!
//! Precision comes from sleeping until the earliest next tick of any schedule (never longer
//! than `cron_refresh`, so schedules created or changed elsewhere are seen), and re-reading
//! every schedule at each pass. "Now" is the store's clock.
//!
//! [`ScheduleStore::enqueue_ticks`]: keel_core::ScheduleStore::enqueue_ticks

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use keel_core::store::{Fence, TickParams};
use keel_core::{Schedule, ScheduleName, StoreError, TenantId, Timestamp};
use tokio_util::sync::CancellationToken;

use crate::runtime::Shared;
use crate::{leader, telemetry};

/// Most ticks of one schedule enqueued per store call; a longer backlog (a catch-up) is
/// continued at once by the next pass, in short transactions.
const TICKS_PER_CALL: usize = 100;
/// Schedules read per page.
const SCHEDULES_PER_PAGE: u32 = 500;
/// Wake this long after a tick, so the store's clock has certainly passed it.
const TICK_SLACK: Duration = Duration::from_millis(2);

/// Schedules whose stored expression no longer parses: each is reported once (not at every
/// pass) until it parses again or this replica stops leading.
type Unparsable = HashSet<(TenantId, ScheduleName)>;

/// Runs passes while this replica leads, until `stop` fires.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut leadership = shared.handle.leadership.subscribe();
    let mut unparsable = Unparsable::new();
    loop {
        let current = *leadership.borrow_and_update();
        let Some(epoch) = current else {
            unparsable.clear();
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                changed = leadership.changed() => if changed.is_err() { break },
            }
            continue;
        };
        let fence = Fence {
            owner: shared.config.worker_id.clone(),
            epoch,
        };
        let wait = pass(&shared, &fence, &mut unparsable, &stop).await;
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            // Lost (or won a new term): look again at once.
            changed = leadership.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(wait) => {}
        }
    }
    tracing::debug!("cron stopped");
}

/// What one schedule needs next.
enum Next {
    /// Look again at this tick.
    At(Timestamp),
    /// More ticks are due now (a backlog longer than one call).
    Now,
    /// Nothing to wait for (paused, unparsable, never fires again, or a failed call that
    /// the next refresh retries).
    Nothing,
    /// The store refused the fence: this replica no longer leads.
    NotLeader,
}

/// One pass over every schedule; returns how long to sleep before the next one.
async fn pass(
    shared: &Shared,
    fence: &Fence,
    unparsable: &mut Unparsable,
    stop: &CancellationToken,
) -> Duration {
    let refresh = shared.config.cron_refresh;
    let now = shared.clock.now();
    let mut earliest: Option<Timestamp> = None;
    let mut after = None;
    loop {
        let page = match shared
            .store
            .list_schedules(None, after.take(), SCHEDULES_PER_PAGE)
            .await
        {
            Ok(page) => page,
            Err(e) => {
                telemetry::store_error("list_schedules");
                telemetry::report_store_error("reading cron schedules", &e);
                return refresh;
            }
        };
        let full = page.len() >= SCHEDULES_PER_PAGE as usize;
        after = page.last().map(|s| (s.tenant.clone(), s.name.clone()));
        for schedule in &page {
            if stop.is_cancelled() {
                return Duration::ZERO;
            }
            match run_schedule(shared, fence, schedule, now, unparsable).await {
                Next::At(t) => earliest = Some(earliest.map_or(t, |e| e.min(t))),
                Next::Now => earliest = Some(now),
                Next::Nothing => {}
                Next::NotLeader => return Duration::ZERO,
            }
        }
        if !full {
            break;
        }
    }
    match earliest {
        Some(t) => (t - shared.clock.now())
            .to_std()
            .map_or(Duration::ZERO, |d| d + TICK_SLACK)
            .min(refresh),
        None => refresh,
    }
}

/// Enqueues the due ticks of one schedule; says when it is next due.
async fn run_schedule(
    shared: &Shared,
    fence: &Fence,
    schedule: &Schedule,
    now: Timestamp,
    unparsable: &mut Unparsable,
) -> Next {
    if schedule.paused {
        return Next::Nothing;
    }
    let Some(spec) = schedule.spec() else {
        if unparsable.insert((schedule.tenant.clone(), schedule.name.clone())) {
            tracing::error!(
                tenant = %schedule.tenant,
                schedule = %schedule.name,
                cron = %schedule.cron,
                timezone = %schedule.timezone,
                "schedule's cron expression or time zone no longer parses; skipping it until it is replaced"
            );
        }
        return Next::Nothing;
    };
    if !unparsable.is_empty() {
        unparsable.remove(&(schedule.tenant.clone(), schedule.name.clone()));
    }
    let due = schedule.due_ticks(&spec, now, TICKS_PER_CALL);
    let backlog = due.len() >= TICKS_PER_CALL;
    if !due.is_empty() {
        let params = TickParams {
            tenant: schedule.tenant.clone(),
            schedule: schedule.name.clone(),
            ticks: due
                .iter()
                .map(|t| (*t, schedule.job.job_for(&schedule.tenant, *t)))
                .collect(),
            fence: fence.clone(),
        };
        match shared.store.enqueue_ticks(params).await {
            Ok(outcome) => {
                let at = shared.clock.now();
                for (tick, id) in &outcome.enqueued {
                    let late = (at - *tick).to_std().unwrap_or(Duration::ZERO);
                    telemetry::cron_lateness(late.as_secs_f64());
                    tracing::debug!(
                        tenant = %schedule.tenant,
                        schedule = %schedule.name,
                        %tick,
                        job_id = %id,
                        "cron tick enqueued"
                    );
                }
                telemetry::cron_ticks("enqueued", outcome.enqueued.len());
                telemetry::cron_ticks("skipped", outcome.skipped);
                if !outcome.enqueued.is_empty() {
                    shared.wake(&schedule.job.queue);
                }
            }
            Err(StoreError::NotLeader(_)) => {
                leader::step_down(
                    shared,
                    fence.epoch,
                    "the store refused a cron write fenced with this term",
                );
                return Next::NotLeader;
            }
            Err(e) => {
                // Not enqueued (or not known to be): the ticks stay due, and the next pass
                // (within `cron_refresh`) tries again; the tick key makes that safe.
                telemetry::store_error("enqueue_ticks");
                telemetry::report_store_error(
                    &format!("enqueuing cron ticks of schedule {}", schedule.name),
                    &e,
                );
                return Next::Nothing;
            }
        }
    }
    if backlog {
        return Next::Now;
    }
    spec.next_after(now).map_or(Next::Nothing, Next::At)
}
