//! [`WorkStore`] on Postgres: lease (`FOR UPDATE SKIP LOCKED`), heartbeat, complete, fail and
//! release. Every write after the lease is fenced by the lease token; the batched ones go
//! through `commit.rs`.

use async_trait::async_trait;
use keel_core::clock::to_delta;
use keel_core::store::{Completion, FailParams, HeartbeatParams, LeaseParams, LeaseRef};
use keel_core::{
    AttemptError, Backoff, Job, JobKind, StoreError, TenantId, Timestamp, Transition, WorkStore,
};
use uuid::Uuid;

use super::sql::SQL;
use super::{PgStore, error, next_state, rows, split};
use crate::codec;

#[async_trait]
impl WorkStore for PgStore {
    async fn lease(&self, params: LeaseParams) -> Result<Vec<Job>, StoreError> {
        if params.max == 0 {
            return Ok(Vec::new());
        }
        let ctx = || format!("leasing jobs from queue {}", params.queue);
        let now = self.clock.now();
        let expires_at = now + to_delta(params.lease_for);
        let rows = if params.tenant.is_none() && params.kinds.is_empty() {
            self.query_fresh(
                &SQL.lease,
                &[
                    &params.queue.as_str(),
                    &i64::from(params.max),
                    &params.owner.as_str(),
                    &expires_at,
                    &now,
                ],
                &ctx,
            )
            .await?
        } else {
            let tenant = params.tenant.as_ref().map(TenantId::as_str);
            let kinds: Vec<&str> = params.kinds.iter().map(JobKind::as_str).collect();
            self.query_fresh(
                &SQL.lease_filtered,
                &[
                    &params.queue.as_str(),
                    &i64::from(params.max),
                    &params.owner.as_str(),
                    &expires_at,
                    &now,
                    &tenant,
                    &kinds,
                ],
                &ctx,
            )
            .await?
        };
        let mut jobs = rows
            .iter()
            .map(rows::job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        // UPDATE … RETURNING does not keep the CTE's order.
        jobs.sort_by_key(|j| (j.priority, j.run_at, j.id));
        Ok(jobs)
    }

    async fn heartbeat(
        &self,
        params: HeartbeatParams,
    ) -> Result<Vec<Result<Timestamp, StoreError>>, StoreError> {
        if params.leases.is_empty() {
            return Ok(Vec::new());
        }
        let ctx = || format!("extending leases (batch of {})", params.leases.len());
        let expires_at = self.clock.now() + to_delta(params.lease_for);
        let (ids, tokens) = split(&params.leases);
        let outcomes = self
            .fenced_batch(
                &params.leases,
                &SQL.heartbeat,
                &[&ids, &tokens, &expires_at],
                &ctx,
            )
            .await?;
        Ok(outcomes
            .into_iter()
            .map(|r| r.map(|()| expires_at))
            .collect())
    }

    async fn complete(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        crate::complete_checked(completions, |c| self.write_completions(c)).await
    }

    async fn fail(&self, params: FailParams) -> Result<Job, StoreError> {
        let id = params.lease.id;
        let ctx = || format!("recording a failed attempt of job {id}");
        let now = self.clock.now();
        let mut conn = self.conn(&ctx).await?;
        let tx = conn.transaction().await.map_err(|e| error::db(e, ctx()))?;
        let lock = tx
            .prepare_cached(&SQL.fail_lock)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let Some(row) = tx
            .query_opt(&lock, &[id.as_uuid()])
            .await
            .map_err(|e| error::db(e, ctx()))?
        else {
            return Err(StoreError::NotFound(id));
        };
        let state = rows::state(rows::get(&row, 0, "state")?)?;
        let token: Option<Uuid> = rows::get(&row, 1, "lease_token")?;
        if token.as_ref() != Some(params.lease.token.as_uuid())
            || !(Transition::Fail { retry: true })
                .sources()
                .contains(&state)
        {
            return Err(StoreError::StaleLease(id));
        }
        let attempt = rows::count("attempt", rows::get(&row, 2, "attempt")?)?;
        let max_attempts = rows::count("max_attempts", rows::get(&row, 3, "max_attempts")?)?;
        let backoff: Backoff = codec::backoff_from_json(rows::get(&row, 4, "backoff")?)?;
        let run_at = params.next_run_at(attempt, max_attempts, &backoff, now, &mut rand::rng());
        let to = next_state(
            id,
            state,
            Transition::Fail {
                retry: run_at.is_some(),
            },
        )?;
        let finished_at = run_at.is_none().then_some(now);
        let entry = codec::attempt_error_to_json(&AttemptError::new(attempt, now, &params.error));
        let update = tx
            .prepare_cached(&SQL.fail_update)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let row = tx
            .query_one(
                &update,
                &[id.as_uuid(), &to.as_str(), &run_at, &finished_at, &entry],
            )
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let job = rows::job_from_row(&row)?;
        tx.commit().await.map_err(|e| error::db(e, ctx()))?;
        Ok(job)
    }

    async fn release(
        &self,
        leases: Vec<LeaseRef>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ctx = || format!("releasing jobs (batch of {})", leases.len());
        let (ids, tokens) = split(&leases);
        self.fenced_batch(&leases, &SQL.release, &[&ids, &tokens, &self.channel], &ctx)
            .await
    }
}
