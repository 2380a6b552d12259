//! [`MaintenanceStore`] on Postgres: promote due jobs, rescue expired leases, and delete what
//! retention no longer keeps (finished jobs, expired idempotency keys, old tick records).
//! Each is a bounded batch that is safe to run from several replicas at once.

use std::sync::LazyLock;

use async_trait::async_trait;
use keel_core::store::{PromoteParams, Promoted, RescueParams, Rescued, RetentionParams};
use keel_core::{
    AttemptError, JobId, JobState, MaintenanceStore, QueueName, StoreError, Timestamp, Transition,
    WorkerId, next_attempt_at,
};

use super::sql::{announce, guard, state_list, target};
use super::{PgStore, error, next_state, rows};
use crate::codec;

#[async_trait]
impl MaintenanceStore for PgStore {
    async fn promote(&self, params: PromoteParams) -> Result<Vec<Promoted>, StoreError> {
        if params.limit == 0 {
            return Ok(Vec::new());
        }
        let ctx = || "promoting due jobs".to_owned();
        let now = self.clock.now();
        let rows = self
            .query(
                &PROMOTE_SQL,
                &[&now, &i64::from(params.limit), &self.channel],
                &ctx,
            )
            .await?;
        rows.iter()
            .map(|row| {
                let queue: &str = rows::get(row, 0, "queue")?;
                let count: i64 = rows::get(row, 1, "count")?;
                Ok(Promoted {
                    queue: rows::parsed("queue", queue, QueueName::parse)?,
                    count: u64::try_from(count).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn rescue(&self, params: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        if params.limit == 0 {
            return Ok(Vec::new());
        }
        let ctx = || "rescuing jobs with expired leases".to_owned();
        let now = self.clock.now();
        self.sql
            .ready(&[&RESCUE_LOCK_SQL, &RESCUE_UPDATE_SQL])
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let mut conn = self.conn(&ctx).await?;
        let tx = conn.transaction().await.map_err(|e| error::db(e, ctx()))?;
        let expired = self
            .sql
            .query(&tx, &RESCUE_LOCK_SQL, &[&now, &i64::from(params.limit)])
            .await
            .map_err(|e| error::db(e, ctx()))?;
        if expired.is_empty() {
            super::roll_back(tx, &ctx).await?;
            conn.answered();
            return Ok(Vec::new());
        }
        let n = expired.len();
        let mut rescued = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut states = Vec::with_capacity(n);
        let mut run_ats = Vec::with_capacity(n);
        let mut finished_ats = Vec::with_capacity(n);
        let mut errors = Vec::with_capacity(n);
        for row in &expired {
            let id = JobId::from_uuid(rows::get(row, 0, "id")?);
            let queue: &str = rows::get(row, 1, "queue")?;
            let attempt = rows::count("attempt", rows::get(row, 2, "attempt")?)?;
            let max_attempts = rows::count("max_attempts", rows::get(row, 3, "max_attempts")?)?;
            let backoff = codec::backoff_from_json(rows::get(row, 4, "backoff")?)?;
            let owner: Option<&str> = rows::get(row, 5, "lease_owner")?;
            let owner = owner
                .map(|o| rows::parsed("lease_owner", o, WorkerId::parse))
                .transpose()?;
            let run_at = next_attempt_at(
                attempt,
                max_attempts,
                &backoff,
                false,
                now,
                &mut rand::rng(),
            );
            let from = rows::state(rows::get(row, 6, "state")?)?;
            let state = next_state(
                id,
                from,
                Transition::Rescue {
                    retry: run_at.is_some(),
                },
            )?;
            let message = match &owner {
                Some(o) => format!("lease expired: worker {o} stopped renewing it"),
                None => "lease expired: its worker stopped renewing it".to_owned(),
            };
            ids.push(*id.as_uuid());
            states.push(state.as_str());
            run_ats.push(run_at);
            finished_ats.push(run_at.is_none().then_some(now));
            errors.push(codec::attempt_error_to_json(&AttemptError::new(
                attempt, now, &message,
            )));
            rescued.push(Rescued {
                id,
                queue: rows::parsed("queue", queue, QueueName::parse)?,
                state,
                owner,
            });
        }
        self.sql
            .execute(
                &tx,
                &RESCUE_UPDATE_SQL,
                &[
                    &ids,
                    &states,
                    &run_ats,
                    &finished_ats,
                    &errors,
                    &self.changes_channel,
                ],
            )
            .await
            .map_err(|e| error::db(e, ctx()))?;
        tx.commit().await.map_err(|e| error::db(e, ctx()))?;
        conn.answered();
        Ok(rescued)
    }

    async fn delete_finished(&self, params: RetentionParams) -> Result<u64, StoreError> {
        if params.limit == 0 {
            return Ok(0);
        }
        let ctx = || "deleting finished jobs past retention".to_owned();
        self.execute(
            &DELETE_FINISHED_SQL,
            &[&params.finished_before, &i64::from(params.limit)],
            &ctx,
        )
        .await
    }

    async fn delete_expired_idempotency_keys(&self, limit: u32) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let ctx = || "deleting expired idempotency keys".to_owned();
        self.execute(
            IDEMPOTENCY_DELETE_EXPIRED_SQL,
            &[&self.clock.now(), &i64::from(limit)],
            &ctx,
        )
        .await
    }

    async fn delete_old_ticks(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let ctx = || "deleting old cron tick records".to_owned();
        self.execute(TICKS_DELETE_OLD_SQL, &[&before, &i64::from(limit)], &ctx)
            .await
    }

    async fn vacuum(&self) -> Result<Vec<String>, StoreError> {
        let ctx = || "vacuuming the job tables".to_owned();
        let due = self.query(&VACUUM_DUE_SQL, &[], &ctx).await?;
        let mut done = Vec::new();
        for row in &due {
            let table: &str = rows::get(row, 0, "relname")?;
            let vacuum: bool = rows::get(row, 1, "vacuum")?;
            let analyze: bool = rows::get(row, 2, "analyze")?;
            let Some(table) = VACUUMED_TABLES.iter().find(|t| **t == table) else {
                continue;
            };
            let statement = match (vacuum, analyze) {
                (true, true) => format!("VACUUM (TRUNCATE false, ANALYZE) {table}"),
                (true, false) => format!("VACUUM (TRUNCATE false) {table}"),
                (false, true) => format!("ANALYZE {table}"),
                (false, false) => continue,
            };
            // TRUNCATE false: giving empty pages at the end of the table back to the file
            // system takes an exclusive lock, and every lease and enqueue would wait on it
            // (a stall of 300 ms in `keel bench` W2p); a queue table fills them again soon.
            let ctx = || format!("running {statement}");
            let conn = self.conn(&ctx).await?;
            // A vacuum of a large table may outlast the statement timeout meant for
            // requests. It runs at autovacuum's pace (vacuum_cost_delay 2 ms per 200 units
            // of page cost), not flat out, so it leaves a shared server's disk and cores to
            // its other work. Unthrottled, each pass took a core for up to half a second
            // (benchmarks.md, sixth pass); on the leaner schema it is 3-5 times shorter but
            // `keel bench` W2p's tail did not move either way (thirteenth pass). Behind a
            // transaction pooler a session setting would leak to other clients, so there
            // the role's settings apply.
            let session = !self.sql.are_unnamed();
            let ran = async {
                if session {
                    conn.batch_execute("SET statement_timeout = 0; SET vacuum_cost_delay = 2")
                        .await?;
                }
                // Alone in its message: VACUUM refuses to run inside a multi-statement one.
                conn.batch_execute(&statement).await?;
                if session {
                    conn.batch_execute("RESET statement_timeout; RESET vacuum_cost_delay")
                        .await?;
                }
                Ok::<_, tokio_postgres::Error>(())
            }
            .await;
            if let Err(e) = ran {
                // Its settings are unknown now: the connection is not given back.
                conn.discard();
                return Err(error::db(e, ctx()));
            }
            conn.answered();
            tracing::debug!(%table, vacuum, analyze, "vacuumed a job table");
            done.push((*table).to_owned());
        }
        Ok(done)
    }
}

/// Makes up to `$2` jobs due by `$1` available.
///
/// `id = ANY(ARRAY(subquery))` rather than `id IN (subquery)`: the array is computed first
/// and the outer statement becomes primary-key lookups whatever the planner guesses about
/// the LIMIT (a semi-join could otherwise be planned as a hash join over the whole table).
///
/// Each queue that received jobs is notified once ($3 is the channel), in the same
/// statement, so listeners hear of exactly the promotions that committed.
pub(super) static PROMOTE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH promoted AS ( \
           UPDATE jobs j SET state = '{to}' \
           WHERE j.id = ANY(ARRAY( \
             SELECT id FROM jobs \
             WHERE state IN ({from}) AND run_at <= $1 \
             ORDER BY run_at \
             LIMIT $2 \
             FOR UPDATE SKIP LOCKED)) \
           AND j.state IN ({from}) \
           RETURNING j.queue \
         ) \
         SELECT queue, count(*), pg_notify($3, queue) FROM promoted \
         GROUP BY queue ORDER BY queue",
        to = target(Transition::Promote),
        from = guard(Transition::Promote),
    )
});

/// The first step of `rescue`: locks up to `$2` jobs whose lease expired before `$1`, and
/// reads what decides each one's next state. SKIP LOCKED: rescuers on several replicas split
/// the work.
pub(super) static RESCUE_LOCK_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT j.id, j.queue, j.attempt, j.max_attempts, j.backoff::text, j.lease_owner, \
           j.state \
         FROM jobs j \
         WHERE j.state IN ({rescue_sources}) AND j.lease_expires_at < $1 \
         ORDER BY j.lease_expires_at \
         LIMIT $2 \
         FOR UPDATE SKIP LOCKED",
        rescue_sources = guard(Transition::Rescue { retry: true }),
    )
});

/// The second step of `rescue`: each locked job to the state decided in Rust. The rescues
/// are announced on $6 (the data-modifying CTE runs whatever the outer query reads).
pub(super) static RESCUE_UPDATE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH rescued AS ( \
           UPDATE jobs j SET state = r.state, run_at = COALESCE(r.run_at, j.run_at), \
             finished_at = r.finished_at, \
             errors = j.errors || jsonb_build_array(r.error::jsonb), \
             lease_token = NULL, lease_expires_at = NULL \
           FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[], \
             $5::text[]) AS r(id, state, run_at, finished_at, error) \
           WHERE j.id = r.id AND j.state IN ({rescue_sources}) \
           RETURNING j.id, j.state, j.queue \
         ) \
         {announce}",
        rescue_sources = guard(Transition::Rescue { retry: true }),
        announce = announce("rescued", "$6"),
    )
});

/// Deletes up to `$2` jobs finished before `$1`.
///
/// The inner SELECT picks and locks the rows (its state term is rechecked on a row changed
/// before the lock), so the DELETE finds them by primary key alone. A state term on the
/// DELETE too let the planner AND the pkey probe with a bitmap of the whole finished index
/// (the term matches its predicate): 4-13 ms per maintenance pass with 200k finished jobs,
/// to delete nothing.
pub(super) static DELETE_FINISHED_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "DELETE FROM jobs j WHERE j.id = ANY(ARRAY( \
           SELECT id FROM jobs \
           WHERE state IN ({finished}) AND finished_at < $1 \
           ORDER BY finished_at \
           LIMIT $2 \
           FOR UPDATE SKIP LOCKED))",
        finished = state_list(&JobState::FINISHED),
    )
});

/// Deletes up to `$2` idempotency keys expired by `$1`. Here rather than in
/// `idempotency.rs`: it is retention, run by the cleaner with the other deletions.
///
/// SKIP LOCKED: two cleaners split the work instead of queueing behind each other, and a key
/// being replaced by a claimer right now is left to that claimer. The locked rows are
/// addressed by ctid through an array (as in [`PROMOTE_SQL`]), so the delete is a TID scan
/// of exactly those rows; a join on (tenant, key) is planned as a hash join over the whole
/// table. A ctid is stable while its row is locked, and keys are never updated, only
/// inserted and deleted.
pub(super) const IDEMPOTENCY_DELETE_EXPIRED_SQL: &str = "DELETE FROM idempotency_keys k \
     WHERE k.ctid = ANY(ARRAY( \
       SELECT ctid FROM idempotency_keys \
       WHERE expires_at <= $1 \
       ORDER BY expires_at \
       LIMIT $2 \
       FOR UPDATE SKIP LOCKED)) \
     AND k.expires_at <= $1";

/// Deletes up to `$2` tick records older than `$1`. As
/// [`IDEMPOTENCY_DELETE_EXPIRED_SQL`]: locked rows by ctid, SKIP LOCKED between cleaners.
const TICKS_DELETE_OLD_SQL: &str = "DELETE FROM schedule_ticks t \
     WHERE t.ctid = ANY(ARRAY( \
       SELECT ctid FROM schedule_ticks \
       WHERE tick_at < $1 \
       ORDER BY tick_at \
       LIMIT $2 \
       FOR UPDATE SKIP LOCKED)) \
     AND t.tick_at < $1";

/// The tables [`MaintenanceStore::vacuum`] looks after: the two whose rows turn over with
/// traffic (the others change a row at a time, in place).
const VACUUMED_TABLES: [&str; 2] = ["jobs", "idempotency_keys"];

/// Which of [`VACUUMED_TABLES`] need a vacuum or an analysis that nothing else will run: the
/// server's or the table's autovacuum is off, no vacuum of it is in progress, and its dead or
/// newly inserted rows, or the rows changed since its last analysis, passed the thresholds
/// migration 4 sets for autovacuum (a vacuum after 1000 rows and 2 % of the table, an
/// analysis after 1000 and 5 %), so Keel does what autovacuum would have done. Only a
/// table's owner may vacuum it: one Keel's role does not own is left alone.
static VACUUM_DUE_SQL: LazyLock<String> = LazyLock::new(|| {
    let tables: Vec<String> = VACUUMED_TABLES
        .iter()
        .map(|t| format!("'{t}'::regclass"))
        .collect();
    format!(
        "SELECT c.relname::text, \
           s.n_dead_tup >= 1000 + 0.02 * s.n_live_tup \
             OR s.n_ins_since_vacuum >= 1000 + 0.02 * s.n_live_tup, \
           s.n_mod_since_analyze >= 1000 + 0.05 * s.n_live_tup \
         FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid \
         WHERE c.oid IN ({tables}) \
           AND (current_setting('autovacuum') = 'off' \
                OR coalesce(c.reloptions @> ARRAY['autovacuum_enabled=false'], false)) \
           AND NOT EXISTS (SELECT 1 FROM pg_stat_progress_vacuum p WHERE p.relid = c.oid) \
           AND pg_has_role(c.relowner, 'USAGE')",
        tables = tables.join(", "),
    )
});
