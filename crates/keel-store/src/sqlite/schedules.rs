//! Cron schedules and their tick records on SQLite.
//!
//! Writes run on the writer thread inside its batch transaction; reads on the read pool.
//! A tick's `schedule_ticks` row and its job are written in the same transaction, and the
//! job only when the row was new, so a tick is enqueued once however often it is offered
//! (G4) — the primary key decides, not the caller.

use std::sync::Arc;

use async_trait::async_trait;
use keel_core::store::{TickOutcome, TickParams};
use keel_core::{
    NewJob, NewSchedule, Schedule, ScheduleName, ScheduleStore, StoreError, TenantId, Timestamp,
};
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{SCHEDULE_COLUMNS, micros, schedule_from_row};
use super::{SqliteStore, insert_rows, leader, map_err};
use crate::{codec, schedule_exists};

fn not_found(tenant: &TenantId, name: &ScheduleName) -> StoreError {
    StoreError::ScheduleNotFound(tenant.clone(), name.clone())
}

fn query_one(
    conn: &Connection,
    context: &str,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Option<Schedule>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(|e| map_err(context, &e))?;
    let mut rows = stmt.query(params).map_err(|e| map_err(context, &e))?;
    rows.next()
        .map_err(|e| map_err(context, &e))?
        .map(schedule_from_row)
        .transpose()
}

/// Creates the schedule, or replaces the existing one's definition when `replace` (its
/// `created_at` and `last_tick_at` stay, so a replaced schedule neither re-enqueues ticks
/// nor forgets them). Returns it and whether it was created.
pub(super) fn save(
    conn: &Connection,
    s: &NewSchedule,
    replace: bool,
    now: Timestamp,
) -> Result<(Schedule, bool), StoreError> {
    const CTX: &str = "saving a schedule";
    let exists = conn
        .prepare_cached("SELECT 1 FROM schedules WHERE tenant = ?1 AND name = ?2")
        .and_then(|mut st| st.exists(params![s.tenant.as_str(), s.name.as_str()]))
        .map_err(|e| map_err(CTX, &e))?;
    if exists && !replace {
        return Err(schedule_exists(&s.tenant, &s.name));
    }
    let catch_up_ms = i64::try_from(s.catch_up.as_millis()).unwrap_or(i64::MAX);
    let job = codec::template_to_json(&s.job);
    let sql = if exists {
        format!(
            "UPDATE schedules SET cron = ?3, timezone = ?4, job = ?5, paused = ?6,
                    catch_up_ms = ?7, updated_at = ?8
             WHERE tenant = ?1 AND name = ?2 RETURNING {SCHEDULE_COLUMNS}"
        )
    } else {
        format!(
            "INSERT INTO schedules (tenant, name, cron, timezone, job, paused, catch_up_ms,
                 created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8) RETURNING {SCHEDULE_COLUMNS}"
        )
    };
    let saved = query_one(
        conn,
        CTX,
        &sql,
        params![
            s.tenant.as_str(),
            s.name.as_str(),
            s.cron,
            s.timezone,
            job,
            s.paused,
            catch_up_ms,
            micros(now)
        ],
    )?
    .ok_or_else(|| not_found(&s.tenant, &s.name))?;
    Ok((saved, !exists))
}

/// One schedule.
pub(super) fn get(
    conn: &Connection,
    tenant: &TenantId,
    name: &ScheduleName,
) -> Result<Schedule, StoreError> {
    let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE tenant = ?1 AND name = ?2");
    query_one(
        conn,
        "reading a schedule",
        &sql,
        params![tenant.as_str(), name.as_str()],
    )?
    .ok_or_else(|| not_found(tenant, name))
}

/// A page of schedules by (tenant, name). Each combination of filters has its own statement,
/// so every one is a range scan of the primary key rather than a filter over the table.
pub(super) fn list(
    conn: &Connection,
    tenant: Option<&TenantId>,
    after: Option<(TenantId, ScheduleName)>,
    limit: u32,
) -> Result<Vec<Schedule>, StoreError> {
    const CTX: &str = "listing schedules";
    let (where_, args): (&str, Vec<String>) = match (tenant, after) {
        (None, None) => ("", vec![]),
        (Some(t), None) => ("WHERE tenant = ?2", vec![t.to_string()]),
        (None, Some((at, an))) => (
            "WHERE (tenant, name) > (?2, ?3)",
            vec![at.to_string(), an.to_string()],
        ),
        (Some(t), Some((at, an))) => (
            "WHERE tenant = ?2 AND (tenant, name) > (?3, ?4)",
            vec![t.to_string(), at.to_string(), an.to_string()],
        ),
    };
    let sql =
        format!("SELECT {SCHEDULE_COLUMNS} FROM schedules {where_} ORDER BY tenant, name LIMIT ?1");
    let mut values: Vec<rusqlite::types::Value> = vec![i64::from(limit).into()];
    values.extend(args.into_iter().map(Into::into));
    let mut stmt = conn.prepare_cached(&sql).map_err(|e| map_err(CTX, &e))?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(values))
        .map_err(|e| map_err(CTX, &e))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| map_err(CTX, &e))? {
        out.push(schedule_from_row(row)?);
    }
    Ok(out)
}

/// Deletes the schedule and its tick records (a schedule created later under the same name
/// starts afresh from its own creation time). The jobs it enqueued stay.
pub(super) fn delete(
    conn: &Connection,
    tenant: &TenantId,
    name: &ScheduleName,
) -> Result<(), StoreError> {
    const CTX: &str = "deleting a schedule";
    let n = conn
        .prepare_cached("DELETE FROM schedules WHERE tenant = ?1 AND name = ?2")
        .and_then(|mut s| s.execute(params![tenant.as_str(), name.as_str()]))
        .map_err(|e| map_err(CTX, &e))?;
    if n == 0 {
        return Err(not_found(tenant, name));
    }
    conn.prepare_cached("DELETE FROM schedule_ticks WHERE tenant = ?1 AND schedule = ?2")
        .and_then(|mut s| s.execute(params![tenant.as_str(), name.as_str()]))
        .map_err(|e| map_err(CTX, &e))?;
    Ok(())
}

/// Pauses or resumes a schedule; returns it.
pub(super) fn set_paused(
    conn: &Connection,
    tenant: &TenantId,
    name: &ScheduleName,
    paused: bool,
    now: Timestamp,
) -> Result<Schedule, StoreError> {
    let sql = format!(
        "UPDATE schedules SET paused = ?3, updated_at = ?4
         WHERE tenant = ?1 AND name = ?2 RETURNING {SCHEDULE_COLUMNS}"
    );
    query_one(
        conn,
        "pausing or resuming a schedule",
        &sql,
        params![tenant.as_str(), name.as_str(), paused, micros(now)],
    )?
    .ok_or_else(|| not_found(tenant, name))
}

/// Enqueues the ticks not recorded before, each with its job, after checking the fence; see
/// [`keel_core::ScheduleStore::enqueue_ticks`]. The caller validated the jobs.
pub(super) fn enqueue_ticks(
    conn: &Connection,
    p: TickParams,
    now: Timestamp,
) -> Result<TickOutcome, StoreError> {
    const CTX: &str = "enqueuing cron ticks";
    leader::check_fence(conn, &p.fence, now)?;
    let tenant = p.tenant.as_str();
    let schedule = p.schedule.as_str();
    let paused: Option<bool> = conn
        .prepare_cached("SELECT paused FROM schedules WHERE tenant = ?1 AND name = ?2")
        .and_then(|mut s| {
            s.query_row(params![tenant, schedule], |r| r.get(0))
                .optional()
        })
        .map_err(|e| map_err(CTX, &e))?;
    if paused != Some(false) {
        // Paused or deleted since the leader read it: nothing is enqueued or recorded.
        return Ok(TickOutcome {
            enqueued: Vec::new(),
            skipped: p.ticks.len(),
        });
    }
    let latest = p.ticks.iter().map(|(tick, _)| *tick).max();
    let mut out = TickOutcome::default();
    for (tick, job) in p.ticks {
        let asked = job.id;
        let recorded = conn
            .prepare_cached(
                "INSERT INTO schedule_ticks (tenant, schedule, tick_at, job_id)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![tenant, schedule, micros(tick), asked.as_bytes()]))
            .map_err(|e| map_err(CTX, &e))?;
        if recorded == 0 {
            out.skipped += 1;
            continue;
        }
        let stored = insert_rows(conn, vec![job], now)?
            .pop()
            .expect("insert_rows returns one job per job given");
        if stored.id != asked {
            // A unique key in the template: the job holding it stands for this tick.
            conn.prepare_cached(
                "UPDATE schedule_ticks SET job_id = ?4
                 WHERE tenant = ?1 AND schedule = ?2 AND tick_at = ?3",
            )
            .and_then(|mut s| {
                s.execute(params![
                    tenant,
                    schedule,
                    micros(tick),
                    stored.id.as_bytes()
                ])
            })
            .map_err(|e| map_err(CTX, &e))?;
        }
        out.enqueued.push((tick, stored.id));
    }
    if let Some(latest) = latest {
        conn.prepare_cached(
            "UPDATE schedules SET last_tick_at = max(coalesce(last_tick_at, ?3), ?3)
             WHERE tenant = ?1 AND name = ?2",
        )
        .and_then(|mut s| s.execute(params![tenant, schedule, micros(latest)]))
        .map_err(|e| map_err(CTX, &e))?;
    }
    Ok(out)
}

/// Deletes up to `limit` tick records older than `before`, oldest first.
pub(super) fn delete_old_ticks(
    conn: &Connection,
    before: Timestamp,
    limit: u32,
) -> Result<u64, StoreError> {
    // `schedule_ticks` is WITHOUT ROWID: rows are picked by their primary key.
    conn.prepare_cached(
        "DELETE FROM schedule_ticks WHERE (tenant, schedule, tick_at) IN (
             SELECT tenant, schedule, tick_at FROM schedule_ticks
             WHERE tick_at < ?1 ORDER BY tick_at LIMIT ?2)",
    )
    .and_then(|mut s| s.execute(params![micros(before), limit]))
    .map(|n| n as u64)
    .map_err(|e| map_err("deleting old tick records", &e))
}

#[async_trait]
impl ScheduleStore for SqliteStore {
    async fn save_schedule(
        &self,
        schedule: NewSchedule,
        replace: bool,
    ) -> Result<(Schedule, bool), StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("saving a schedule", move |conn| {
                save(conn, &schedule, replace, clock.now())
            })
            .await
    }

    async fn get_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<Schedule, StoreError> {
        let (tenant, name) = (tenant.clone(), name.clone());
        self.read("reading a schedule", move |conn| get(conn, &tenant, &name))
            .await
    }

    async fn list_schedules(
        &self,
        tenant: Option<&TenantId>,
        after: Option<(TenantId, ScheduleName)>,
        limit: u32,
    ) -> Result<Vec<Schedule>, StoreError> {
        let tenant = tenant.cloned();
        self.read("listing schedules", move |conn| {
            list(conn, tenant.as_ref(), after, limit)
        })
        .await
    }

    async fn delete_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<(), StoreError> {
        let (tenant, name) = (tenant.clone(), name.clone());
        self.writer
            .write("deleting a schedule", move |conn| {
                delete(conn, &tenant, &name)
            })
            .await
    }

    async fn set_schedule_paused(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
        paused: bool,
    ) -> Result<Schedule, StoreError> {
        let clock = Arc::clone(&self.clock);
        let (tenant, name) = (tenant.clone(), name.clone());
        self.writer
            .write("pausing or resuming a schedule", move |conn| {
                set_paused(conn, &tenant, &name, paused, clock.now())
            })
            .await
    }

    async fn enqueue_ticks(&self, params: TickParams) -> Result<TickOutcome, StoreError> {
        for (index, (_, job)) in params.ticks.iter().enumerate() {
            job.validate(NewJob::DEFAULT_MAX_ARGS_BYTES)
                .map_err(|errors| StoreError::Invalid { index, errors })?;
        }
        let clock = Arc::clone(&self.clock);
        // Jobs due now are not announced from here: as with every other insert on SQLite,
        // the caller (the runtime's maintenance, in this process) wakes the dispatchers of
        // the queues it enqueued into.
        self.writer
            .write("enqueuing cron ticks", move |conn| {
                enqueue_ticks(conn, params, clock.now())
            })
            .await
    }
}
