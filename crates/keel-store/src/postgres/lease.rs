//! [`WorkStore`] on Postgres: lease (`FOR UPDATE SKIP LOCKED`), heartbeat, complete, fail and
//! release, and the statements they run. Every write after the lease is fenced by the lease
//! token; the batched ones (heartbeat, complete, release) go through
//! [`fenced_batch`](PgStore::fenced_batch).
//!
//! A lease is live while the job can still complete; the token is the fence. The batched
//! statements RETURN the submitted (id, token) pairs, which lets the caller match outcomes to
//! items even when a batch names the same job twice with different tokens. They are
//! functions of the migrations (`keel_extend_leases`, `keel_complete`, `keel_release`). A
//! completion and a release lock their rows in id order: two batches over the same running
//! jobs would otherwise lock them in whatever order each join visits them, and deadlock. A
//! release locks them in a statement of its own first; a completion, the most frequent,
//! takes each lock as its update reaches the row, walking the batch sorted by id (migration
//! 14). A heartbeat waits for no lock at all: it skips the rows another transaction holds
//! (almost always their outcome being written) and reports those leases as held until their
//! current expiry, so it never stalls behind completion commits, nor stalls them (migration
//! 13). The updates look each id up by primary key, a plan linear in the batch (migration 12
//! tells what a join to the locked rows cost).
//!
//! They find their rows by primary key only, and have no state predicate: a live token means
//! the job is running (CHECK jobs_lease_iff_running), and a `state = 'running'` term would
//! let the planner choose the partial running index (jobs_expired_lease_idx) when its
//! statistics say few jobs run, and walk every dead entry a busy table leaves in it until the
//! next vacuum.
//!
//! Completions and failures are *not* announced on the changes channel. A transaction that
//! notifies takes a database-wide lock at commit and holds it through its WAL flush, so
//! notifying transactions commit one at a time; on the completion path that cost `keel bench`
//! 15–20 % (Postgres, 2 cores: W1 drain 15.7–18.7k jobs/s with completions announced in their
//! statements, 20.0–20.8k without; announcing them from separate `synchronous_commit = off`
//! transactions after the commit was no better, 15.1–15.3k). A replica waiting for a job that
//! another replica finishes re-reads it on a timer instead (`/v1/process`: every 250 ms).

use std::sync::LazyLock;

use async_trait::async_trait;
use keel_core::clock::to_delta;
use keel_core::store::{Completion, FailParams, HeartbeatParams, LeaseParams, LeaseRef};
use keel_core::{
    AttemptError, Backoff, Job, JobKind, StoreError, TenantId, Timestamp, Transition, WorkStore,
};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::rows::COLUMNS;
use super::sql::guard;
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
        let tenant = params.tenant.as_ref().map(TenantId::as_str);
        let kinds: Vec<&str> = params.kinds.iter().map(JobKind::as_str).collect();
        let all: [&(dyn ToSql + Sync); 7] = [
            &params.queue.as_str(),
            &i64::from(params.max),
            &params.owner.as_str(),
            &expires_at,
            &now,
            &tenant,
            &kinds,
        ];
        // The unfiltered statement takes only the first five parameters.
        let (sql, bound) = if tenant.is_none() && kinds.is_empty() {
            (&*LEASE_SQL, &all[..5])
        } else {
            (&*LEASE_FILTERED_SQL, &all[..])
        };
        let rows = self.query(sql, bound, &ctx).await?;
        let mut jobs = rows
            .iter()
            .map(rows::job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        // UPDATE … RETURNING does not keep the walk's order.
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
        // Per lease, its expiry now: `expires_at`, or an earlier one for a lease whose row
        // another transaction is writing (migrations/postgres/0013_heartbeat_skips_busy_rows.sql).
        self.fenced_batch(
            &params.leases,
            HEARTBEAT_SQL,
            &[&ids, &tokens, &expires_at],
            |row| row.try_get(2),
            &ctx,
        )
        .await
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
        self.sql
            .ready(&[FAIL_LOCK_SQL, &FAIL_UPDATE_SQL])
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let mut conn = self.conn(&ctx).await?;
        let tx = conn.transaction().await.map_err(|e| error::db(e, ctx()))?;
        let Some(row) = self
            .sql
            .query_opt(&tx, FAIL_LOCK_SQL, &[id.as_uuid()])
            .await
            .map_err(|e| error::db(e, ctx()))?
        else {
            super::roll_back(tx, &ctx).await?;
            conn.answered();
            return Err(StoreError::NotFound(id));
        };
        let state = rows::state(rows::get(&row, 0, "state")?)?;
        let token: Option<Uuid> = rows::get(&row, 1, "lease_token")?;
        if token.as_ref() != Some(params.lease.token.as_uuid())
            || !(Transition::Fail { retry: true })
                .sources()
                .contains(&state)
        {
            super::roll_back(tx, &ctx).await?;
            conn.answered();
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
        let row = self
            .sql
            .query_one(
                &tx,
                &FAIL_UPDATE_SQL,
                &[id.as_uuid(), &to.as_str(), &run_at, &finished_at, &entry],
            )
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let job = rows::job_from_row(&row)?;
        tx.commit().await.map_err(|e| error::db(e, ctx()))?;
        conn.answered();
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
        self.fenced_batch(
            &leases,
            RELEASE_SQL,
            &[&ids, &tokens, &self.channel],
            |_| Ok(()),
            &ctx,
        )
        .await
    }
}

impl PgStore {
    /// Writes completions whose results were checked ([`crate::complete_checked`]).
    async fn write_completions(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let ctx = || format!("completing jobs (batch of {})", completions.len());
        let now = self.clock.now();
        let leases: Vec<LeaseRef> = completions.iter().map(|c| c.lease).collect();
        let (ids, tokens) = split(&leases);
        let results: Vec<Option<&str>> = completions
            .iter()
            .map(|c| c.result.as_ref().map(|r| r.get()))
            .collect();
        self.fenced_batch(
            &leases,
            COMPLETE_SQL,
            &[&ids, &tokens, &results, &now],
            |_| Ok(()),
            &ctx,
        )
        .await
    }
}

/// Leases up to `$2` jobs of queue `$1` for owner `$3` until `$4`, started at `$5`, through
/// `keel_lease` (migrations/postgres/0009_generic_plans.sql; since
/// `0011_lease_commits_async.sql` its transaction commits without waiting for the WAL
/// flush, which that migration explains): a walk of jobs_lease_idx in
/// lease order that skips rows another replica has locked, then an update of the rows it
/// locked by primary key, planned once per connection with settings that leave no plan a
/// young table's statistics could turn into a scan of the whole queue. The call itself is
/// a function scan, a plan that is right at any size, so it is a named statement.
pub(super) static LEASE_SQL: LazyLock<String> =
    LazyLock::new(|| lease_statement("NULL::text", "'{}'::text[]"));

/// An external worker's lease (docs/workers.md): the same walk, keeping only its tenant's
/// jobs (`$6`, when given) and the kinds it handles (`$7`, when not empty). The filters are
/// residual on the index walk; the built-in dispatchers keep the unfiltered [`LEASE_SQL`].
static LEASE_FILTERED_SQL: LazyLock<String> =
    LazyLock::new(|| lease_statement("$6::text", "$7::text[]"));

/// The lease statement, with the walk's tenant and kinds arguments. See [`LEASE_SQL`].
fn lease_statement(tenant: &str, kinds: &str) -> String {
    format!("SELECT {COLUMNS} FROM keel_lease($1, $2, $3, $4, $5, {tenant}, {kinds}) j")
}

/// Extends the leases (`$1` ids, `$2` tokens) to `$3`, through `keel_extend_leases`
/// (migrations/postgres/0013_heartbeat_skips_busy_rows.sql): fenced by token, with a plan
/// linear in the batch whatever the statistics, and never waiting for a row another
/// transaction holds. Returns each lease still held with its expiry.
const HEARTBEAT_SQL: &str =
    "SELECT job_id, job_token, expires_at FROM keel_extend_leases($1::uuid[], $2::uuid[], $3)";

/// Completes the leased jobs (`$1` ids, `$2` tokens, `$3` results) at `$4`, through
/// `keel_complete` (migrations/postgres/0014_completion_locks_as_it_updates.sql): fenced and locked as
/// the module documentation says, with a plan made once per connection rather than once
/// per batch. Not announced (see the module documentation).
pub(super) const COMPLETE_SQL: &str =
    "SELECT job_id, job_token FROM keel_complete($1::uuid[], $2::uuid[], $3::text[], $4)";

/// Gives the leases (`$1` ids, `$2` tokens) back, through `keel_release`
/// (migrations/postgres/0012_heartbeat_release_functions.sql). The attempt the lease
/// started does not count: it is given back. The job is available again, so its queue's
/// listeners are told ($3 is the channel).
const RELEASE_SQL: &str = "SELECT job_id, job_token FROM keel_release($1::uuid[], $2::uuid[], $3)";

/// The first step of `fail`: locks the job and reads what decides retry or discard.
const FAIL_LOCK_SQL: &str = "SELECT j.state, j.lease_token, j.attempt, j.max_attempts, \
     j.backoff::text FROM jobs j WHERE j.id = $1 FOR UPDATE";

/// The second step of `fail`. $2 is retryable or discarded (decided in Rust from the locked
/// row); $3 is the next run time when retryable; $4 is finished_at when discarded. Not
/// announced (see the module documentation).
pub(super) static FAIL_UPDATE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE jobs j SET state = $2, run_at = COALESCE($3, j.run_at), \
           finished_at = $4, errors = j.errors || jsonb_build_array($5::text::jsonb), \
           lease_token = NULL, lease_expires_at = NULL \
         WHERE j.id = $1 AND j.state IN ({fail_sources}) \
         RETURNING {COLUMNS}",
        fail_sources = guard(Transition::Fail { retry: true }),
    )
});
