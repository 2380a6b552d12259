//! [`MaintenanceStore`] on Postgres: promote due jobs, rescue expired leases, and delete what
//! retention no longer keeps (finished jobs, expired idempotency keys, old tick records).
//! Each is a bounded batch that is safe to run from several replicas at once.

use async_trait::async_trait;
use keel_core::store::{PromoteParams, Promoted, RescueParams, Rescued, RetentionParams};
use keel_core::{
    AttemptError, JobId, MaintenanceStore, QueueName, StoreError, Timestamp, Transition, WorkerId,
    next_attempt_at,
};

use super::sql::SQL;
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
                &SQL.promote,
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
        let mut conn = self.conn(&ctx).await?;
        let tx = conn.transaction().await.map_err(|e| error::db(e, ctx()))?;
        let lock = tx
            .prepare_cached(&SQL.rescue_lock)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let expired = tx
            .query(&lock, &[&now, &i64::from(params.limit)])
            .await
            .map_err(|e| error::db(e, ctx()))?;
        if expired.is_empty() {
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
        let update = tx
            .prepare_cached(&SQL.rescue_update)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        tx.execute(
            &update,
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
        Ok(rescued)
    }

    async fn delete_finished(&self, params: RetentionParams) -> Result<u64, StoreError> {
        if params.limit == 0 {
            return Ok(0);
        }
        let ctx = || "deleting finished jobs past retention".to_owned();
        let conn = self.conn(&ctx).await?;
        let stmt = conn
            .prepare_cached(&SQL.delete_finished)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        conn.execute(&stmt, &[&params.finished_before, &i64::from(params.limit)])
            .await
            .map_err(|e| error::db(e, ctx()))
    }

    async fn delete_expired_idempotency_keys(&self, limit: u32) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let ctx = || "deleting expired idempotency keys".to_owned();
        let conn = self.conn(&ctx).await?;
        let stmt = conn
            .prepare_cached(&SQL.idempotency_delete_expired)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        conn.execute(&stmt, &[&self.clock.now(), &i64::from(limit)])
            .await
            .map_err(|e| error::db(e, ctx()))
    }

    async fn delete_old_ticks(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let ctx = || "deleting old cron tick records".to_owned();
        let conn = self.conn(&ctx).await?;
        let stmt = conn
            .prepare_cached(&SQL.ticks_delete_old)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        conn.execute(&stmt, &[&before, &i64::from(limit)])
            .await
            .map_err(|e| error::db(e, ctx()))
    }
}
