//! [`ScheduleStore`] on Postgres: cron schedules, and the exactly-once enqueue of their ticks
//! (G4), fenced by the leader's epoch in the same transaction.

use std::collections::HashSet;
use std::sync::LazyLock;

use async_trait::async_trait;
use keel_core::store::{ListParams, TickOutcome, TickParams};
use keel_core::{
    Job, NewJob, NewSchedule, Schedule, ScheduleName, ScheduleStore, StoreError, TenantId,
    Timestamp,
};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::leader::FENCE_SQL;
use super::rows::SCHEDULE_COLUMNS;
use super::{PgStore, commit, error, rows};
use crate::{MAINTENANCE_ROLE, codec, schedule_exists};

#[async_trait]
impl ScheduleStore for PgStore {
    async fn save_schedule(
        &self,
        schedule: NewSchedule,
        replace: bool,
    ) -> Result<(Schedule, bool), StoreError> {
        let NewSchedule {
            tenant,
            name,
            cron,
            timezone,
            job,
            paused,
            catch_up,
        } = schedule;
        let ctx = || format!("saving schedule {name} of tenant {tenant}");
        let now = self.clock.now();
        let template = codec::template_to_json(&job);
        let catch_up_ms = i64::try_from(catch_up.as_millis()).map_err(|e| {
            StoreError::permanent(format!("{}: catch_up of {catch_up:?}", ctx()), e)
        })?;
        let params: [&(dyn ToSql + Sync); 8] = [
            &tenant.as_str(),
            &name.as_str(),
            &cron,
            &timezone,
            &template,
            &paused,
            &catch_up_ms,
            &now,
        ];
        let sql = if replace {
            &SCHEDULE_REPLACE_SQL
        } else {
            &SCHEDULE_CREATE_SQL
        };
        let rows = self.query(sql, &params, &ctx).await?;
        let Some(row) = rows.first() else {
            return Err(schedule_exists(&tenant, &name));
        };
        let created = if replace {
            rows::get(row, 10, "created")?
        } else {
            true
        };
        Ok((rows::schedule_from_row(row)?, created))
    }

    async fn get_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<Schedule, StoreError> {
        let ctx = || format!("reading schedule {name} of tenant {tenant}");
        let rows = self
            .query(&SCHEDULE_GET_SQL, &[&tenant.as_str(), &name.as_str()], &ctx)
            .await?;
        match rows.first() {
            Some(row) => rows::schedule_from_row(row),
            None => Err(StoreError::ScheduleNotFound(tenant.clone(), name.clone())),
        }
    }

    async fn list_schedules(
        &self,
        tenant: Option<&TenantId>,
        after: Option<(TenantId, ScheduleName)>,
        limit: u32,
    ) -> Result<Vec<Schedule>, StoreError> {
        let limit = limit.min(ListParams::MAX_LIMIT);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let ctx = || match tenant {
            Some(t) => format!("listing schedules of tenant {t}"),
            None => "listing schedules".to_owned(),
        };
        let (after_tenant, after_name) = match &after {
            Some((t, n)) => (Some(t.as_str()), Some(n.as_str())),
            None => (None, None),
        };
        let rows = self
            .query(
                &SCHEDULE_LIST_SQL,
                &[
                    &tenant.map(TenantId::as_str),
                    &after_tenant,
                    &after_name,
                    &i64::from(limit),
                ],
                &ctx,
            )
            .await?;
        rows.iter().map(rows::schedule_from_row).collect()
    }

    async fn delete_schedule(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
    ) -> Result<(), StoreError> {
        let ctx = || format!("deleting schedule {name} of tenant {tenant}");
        let rows = self
            .query(
                SCHEDULE_DELETE_SQL,
                &[&tenant.as_str(), &name.as_str()],
                &ctx,
            )
            .await?;
        if rows.is_empty() {
            return Err(StoreError::ScheduleNotFound(tenant.clone(), name.clone()));
        }
        Ok(())
    }

    async fn set_schedule_paused(
        &self,
        tenant: &TenantId,
        name: &ScheduleName,
        paused: bool,
    ) -> Result<Schedule, StoreError> {
        let ctx = || {
            let verb = if paused { "pausing" } else { "resuming" };
            format!("{verb} schedule {name} of tenant {tenant}")
        };
        let rows = self
            .query(
                &SCHEDULE_PAUSE_SQL,
                &[&tenant.as_str(), &name.as_str(), &paused, &self.clock.now()],
                &ctx,
            )
            .await?;
        match rows.first() {
            Some(row) => rows::schedule_from_row(row),
            None => Err(StoreError::ScheduleNotFound(tenant.clone(), name.clone())),
        }
    }

    async fn enqueue_ticks(&self, params: TickParams) -> Result<TickOutcome, StoreError> {
        let TickParams {
            tenant,
            schedule,
            ticks,
            fence,
        } = params;
        if ticks.is_empty() {
            return Ok(TickOutcome::default());
        }
        for (index, (_, job)) in ticks.iter().enumerate() {
            job.validate(NewJob::DEFAULT_MAX_ARGS_BYTES)
                .map_err(|errors| StoreError::Invalid { index, errors })?;
        }
        let total = ticks.len();
        let ctx = || format!("enqueuing {total} tick(s) of schedule {schedule} of tenant {tenant}");
        let not_leader = || StoreError::NotLeader(fence.epoch.0);
        let epoch = i64::try_from(fence.epoch.0).map_err(|_| not_leader())?;
        let now = self.clock.now();
        let mut statements = vec![
            FENCE_SQL,
            SCHEDULE_LOCK_SQL,
            TICKS_RECORD_SQL,
            SCHEDULE_ADVANCE_SQL,
        ];
        statements.extend(commit::INSERT_STATEMENTS.iter());
        self.sql
            .ready(&statements)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let mut conn = self.conn(&ctx).await?;
        let tx = conn.transaction().await.map_err(|e| error::db(e, ctx()))?;
        let keys: [&(dyn ToSql + Sync); 2] = [&tenant.as_str(), &schedule.as_str()];

        let holds = self
            .sql
            .query_opt(
                &tx,
                FENCE_SQL,
                &[&MAINTENANCE_ROLE, &fence.owner.as_str(), &epoch, &now],
            )
            .await
            .map_err(|e| error::db(e, ctx()))?
            .is_some();
        if !holds {
            super::roll_back(tx, &ctx).await?;
            conn.answered();
            return Err(not_leader());
        }
        let live = match self
            .sql
            .query_opt(&tx, SCHEDULE_LOCK_SQL, &keys)
            .await
            .map_err(|e| error::db(e, ctx()))?
        {
            Some(row) => !rows::get::<bool>(&row, 0, "paused")?,
            None => false,
        };
        if !live {
            super::roll_back(tx, &ctx).await?;
            conn.answered();
            return Ok(TickOutcome {
                enqueued: Vec::new(),
                skipped: ticks.len(),
            });
        }

        let tick_ats: Vec<Timestamp> = ticks.iter().map(|(at, _)| *at).collect();
        let job_ids: Vec<Uuid> = ticks.iter().map(|(_, j)| *j.id.as_uuid()).collect();
        let recorded: HashSet<Uuid> = self
            .sql
            .query(
                &tx,
                TICKS_RECORD_SQL,
                &[keys[0], keys[1], &tick_ats, &job_ids],
            )
            .await
            .map_err(|e| error::db(e, ctx()))?
            .iter()
            .map(|row| rows::get::<Uuid>(row, 1, "job_id"))
            .collect::<Result<_, _>>()?;
        let latest = tick_ats.iter().max().copied();
        let mut enqueued = Vec::with_capacity(recorded.len());
        let mut jobs = Vec::with_capacity(recorded.len());
        for (at, job) in ticks {
            if recorded.contains(job.id.as_uuid()) {
                enqueued.push((at, job.id));
                jobs.push(job.into_job(now));
            }
        }
        let refs: Vec<&Job> = jobs.iter().collect();
        let holders = if refs.is_empty() {
            commit::Holders::new()
        } else {
            commit::insert_jobs(&self.sql, &tx, &refs, &ctx).await?
        };
        self.sql
            .execute(&tx, SCHEDULE_ADVANCE_SQL, &[keys[0], keys[1], &latest])
            .await
            .map_err(|e| error::db(e, ctx()))?;
        tx.commit().await.map_err(|e| error::db(e, ctx()))?;
        conn.answered();
        self.wakeups.wake(commit::woken(&refs, &holders));
        enqueued.sort_by_key(|(at, _)| *at);
        Ok(TickOutcome {
            skipped: total - enqueued.len(),
            enqueued,
        })
    }
}

/// Creates a schedule unless its name is taken (no row back). Templates travel as text and
/// are stored as json (not jsonb): verbatim.
static SCHEDULE_CREATE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO schedules AS s (tenant, name, cron, timezone, job, paused, \
           catch_up_ms, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5::text::json, $6, $7, $8, $8) \
         ON CONFLICT (tenant, name) DO NOTHING \
         RETURNING {SCHEDULE_COLUMNS}"
    )
});

/// Creates or replaces a schedule, template stored as in [`SCHEDULE_CREATE_SQL`].
/// created_at and last_tick_at are the existing row's. `xmax = 0` only on a row this
/// statement inserted (an updated row carries the updating transaction's id): whether the
/// schedule was created.
static SCHEDULE_REPLACE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO schedules AS s (tenant, name, cron, timezone, job, paused, \
           catch_up_ms, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5::text::json, $6, $7, $8, $8) \
         ON CONFLICT (tenant, name) DO UPDATE SET cron = excluded.cron, \
           timezone = excluded.timezone, job = excluded.job, paused = excluded.paused, \
           catch_up_ms = excluded.catch_up_ms, updated_at = excluded.updated_at \
         RETURNING {SCHEDULE_COLUMNS}, s.xmax = 0"
    )
});

/// One schedule by tenant and name.
static SCHEDULE_GET_SQL: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {SCHEDULE_COLUMNS} FROM schedules s WHERE s.tenant = $1 AND s.name = $2")
});

/// A page of schedules. $1: the tenant or NULL for all; $2, $3: the keyset cursor or NULLs.
/// Schedules are few (an operator writes each), so one statement serves every shape.
static SCHEDULE_LIST_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules s \
         WHERE ($1::text IS NULL OR s.tenant = $1) \
           AND ($2::text IS NULL OR (s.tenant, s.name) > ($2::text, $3::text)) \
         ORDER BY s.tenant, s.name \
         LIMIT $4"
    )
});

/// Deletes a schedule; no row back when there was none.
const SCHEDULE_DELETE_SQL: &str =
    "DELETE FROM schedules WHERE tenant = $1 AND name = $2 RETURNING 1";

/// Pauses or resumes a schedule (`$3`) at `$4`.
static SCHEDULE_PAUSE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE schedules s SET paused = $3, updated_at = $4 \
         WHERE s.tenant = $1 AND s.name = $2 \
         RETURNING {SCHEDULE_COLUMNS}"
    )
});

/// Locks the schedule for the tick transaction: concurrent enqueuers of one schedule take
/// turns (each then finds the other's ticks recorded), and a pause or delete waits for, or
/// is seen by, the enqueue.
const SCHEDULE_LOCK_SQL: &str = "SELECT paused FROM schedules WHERE tenant = $1 AND name = $2 \
     FOR UPDATE";

/// Moves the schedule's last tick to `$3` if later. GREATEST ignores a NULL, so the first
/// tick sets it.
const SCHEDULE_ADVANCE_SQL: &str = "UPDATE schedules SET last_tick_at = GREATEST(last_tick_at, $3) \
     WHERE tenant = $1 AND name = $2";

/// Records ticks (`$3`) with the ids of their jobs (`$4`). The exactly-once point (G4): a
/// tick recorded before, by anyone, is skipped; RETURNING names the ticks recorded now,
/// whose jobs are then inserted in the same transaction.
const TICKS_RECORD_SQL: &str = "INSERT INTO schedule_ticks (tenant, schedule, tick_at, job_id) \
     SELECT $1::text, $2::text, t.tick_at, t.job_id \
     FROM unnest($3::timestamptz[], $4::uuid[]) AS t(tick_at, job_id) \
     ORDER BY t.tick_at \
     ON CONFLICT (tenant, schedule, tick_at) DO NOTHING \
     RETURNING tick_at, job_id";
