//! [`JobStore`] on Postgres: jobs as clients see them. Inserts go through group commit
//! (`commit.rs`); the state changes are single statements guarded by the state machine
//! (`sql.rs`).

use async_trait::async_trait;
use keel_core::store::{IdempotentInsert, IdempotentOutcome, JobPage, ListParams};
use keel_core::{Job, JobId, JobStore, NewJob, StoreError, Transition};

use super::sql::{ListQuery, SQL};
use super::{PgStore, rows, validate_all};
use crate::unique_key_held;

#[async_trait]
impl JobStore for PgStore {
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Job>, StoreError> {
        validate_all(&jobs)?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        // Stamped here, not in the committer: each job's times are those its own caller saw,
        // whichever batch it lands in.
        let now = self.clock.now();
        let jobs: Vec<Job> = jobs.into_iter().map(|j| j.into_job(now)).collect();
        self.committer.insert(jobs).await
    }

    async fn insert_idempotent(
        &self,
        req: IdempotentInsert,
    ) -> Result<IdempotentOutcome, StoreError> {
        self.insert_under_key(req).await
    }
    async fn get(&self, id: JobId) -> Result<Job, StoreError> {
        let ctx = || format!("reading job {id}");
        let rows = self.query(&SQL.get, &[id.as_uuid()], &ctx).await?;
        match rows.first() {
            Some(row) => rows::job_from_row(row),
            None => Err(StoreError::NotFound(id)),
        }
    }

    async fn list(&self, params: ListParams) -> Result<JobPage, StoreError> {
        let ctx = || "listing jobs".to_owned();
        let q = ListQuery::new(&params);
        let rows = self.query_fresh(&q.sql, &q.params(), &ctx).await?;
        let jobs = rows
            .iter()
            .map(rows::job_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let full = jobs.len() >= params.effective_limit() as usize;
        let next = if full {
            jobs.last().map(|j| j.id)
        } else {
            None
        };
        Ok(JobPage { jobs, next })
    }

    async fn cancel(&self, id: JobId) -> Result<Job, StoreError> {
        let ctx = || format!("cancelling job {id}");
        self.guarded(
            id,
            Transition::Cancel,
            &SQL.cancel,
            &[&self.changes_channel],
            &ctx,
        )
        .await
    }

    async fn retry(&self, id: JobId) -> Result<Job, StoreError> {
        let ctx = || format!("retrying job {id}");
        self.guarded(
            id,
            Transition::Retry,
            &SQL.retry,
            &[&self.channel, &self.changes_channel],
            &ctx,
        )
        .await
        .map_err(|e| match e {
            // The retry changes no key column, so the only uniqueness it can break is the
            // job's unique key: another job took it while this one was finished.
            StoreError::Conflict(_) => unique_key_held(id),
            e => e,
        })
    }
}
