//! [`JobStore`] on Postgres: jobs as clients see them. Inserts go through group commit
//! (`commit.rs`, which holds the insert statements); the state changes are single statements
//! guarded by the state machine (guards from `sql.rs`), run by
//! [`guarded`](PgStore::guarded).

use std::sync::LazyLock;

use async_trait::async_trait;
use keel_core::store::{IdempotentInsert, IdempotentOutcome, JobPage, ListParams};
use keel_core::{Job, JobId, JobState, JobStore, NewJob, StoreError, Transition};
use tokio_postgres::types::ToSql;

use super::rows::COLUMNS;
use super::sql::{guard, target};
use super::{PgStore, rows, validate_all};
use crate::{ListingIndexes, ListingValue, unique_key_held};

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
        let rows = self.query(&GET_SQL, &[id.as_uuid()], &ctx).await?;
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
            &CANCEL_SQL,
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
            &RETRY_SQL,
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

/// One job by id.
static GET_SQL: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {COLUMNS} FROM jobs j WHERE j.id = $1"));

/// Cancels job `$1` at `$2`. Announced on $3, so a replica running the job hears that its
/// lease is gone.
pub(super) static CANCEL_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH cancelled AS ( \
           UPDATE jobs j SET state = '{to}', finished_at = $2, \
             lease_token = NULL, lease_expires_at = NULL \
           WHERE j.id = $1 AND j.state IN ({from}) \
           RETURNING {COLUMNS} \
         ) \
         SELECT c.*, pg_notify($3, c.id::text || ' ' || c.state || ' ' || c.queue) \
         FROM cancelled c",
        to = target(Transition::Cancel),
        from = guard(Transition::Cancel),
    )
});

/// Retries job `$1`, to run at `$2`. A job that used up its attempts gets exactly one more.
/// The job is available now, so its queue's listeners are told ($3 is the channel), and the
/// change is announced ($4); the columns come first, in `COLUMNS` order, so the row decodes
/// like any other. Putting an `active` job back among its key's holders while another job
/// holds the key violates jobs_unique_idx (mapped to a Conflict).
static RETRY_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH retried AS ( \
           UPDATE jobs j SET state = '{to}', run_at = $2, finished_at = NULL, \
             result = NULL, lease_token = NULL, lease_expires_at = NULL, \
             max_attempts = GREATEST(j.max_attempts, j.attempt + 1) \
           WHERE j.id = $1 AND j.state IN ({from}) \
           RETURNING {COLUMNS} \
         ) \
         SELECT r.*, pg_notify($3, r.queue), \
           pg_notify($4, r.id::text || ' ' || r.state || ' ' || r.queue) \
         FROM retried r",
        to = target(Transition::Retry),
        from = guard(Transition::Retry),
    )
});

/// The listing indexes leave out running jobs, which have their own index, and completed
/// ones (migrations `0005_lean_listing_indexes` and `0010_listing_skips_completed`), so that
/// a job's lease and its completion add no entry to either.
pub(super) const LISTING_INDEXES: ListingIndexes = ListingIndexes {
    left_out: &[JobState::Running, JobState::Completed],
    spell_predicate: false,
};

/// A `list` statement for one combination of filters, with its parameters.
///
/// Only the filters present appear in the text, so each shape is its own prepared statement
/// with its own plan: queue filters use `jobs_queue_state_idx`, tenant filters
/// `jobs_tenant_state_idx`, running jobs the running index, and an unfiltered page, or one
/// of completed jobs, walks the primary key from the cursor.
pub(super) struct ListQuery {
    pub(super) sql: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl ListQuery {
    pub(super) fn new(p: &ListParams) -> Self {
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let filter = crate::listing_conditions(p, "j.", &LISTING_INDEXES, |value| {
            params.push(match value {
                ListingValue::Text(text) => Box::new(text.to_owned()),
                ListingValue::Id(id) => Box::new(*id.as_uuid()),
            });
            format!("${}", params.len())
        })
        .map_or_else(String::new, |conditions| format!("WHERE {conditions} "));
        params.push(Box::new(i64::from(p.effective_limit())));
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs j {filter}ORDER BY j.id LIMIT ${}",
            params.len()
        );
        Self { sql, params }
    }

    /// The parameters, borrowed as the driver wants them.
    pub(super) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_text_names_only_present_filters() {
        let all = ListQuery::new(&ListParams {
            limit: 10,
            ..ListParams::default()
        });
        assert!(!all.sql.contains("WHERE"), "{}", all.sql);
        assert!(all.sql.ends_with("ORDER BY j.id LIMIT $1"), "{}", all.sql);
        let q = ListQuery::new(&ListParams {
            queue: Some("emails".parse().expect("valid queue")),
            state: Some(JobState::Available),
            after: Some(keel_core::JobId::new()),
            limit: 5000,
            ..ListParams::default()
        });
        assert!(
            q.sql.contains(
                "WHERE j.queue = $1 AND j.id > $2 AND j.state = 'available' \
                 ORDER BY j.id LIMIT $3"
            ),
            "{}",
            q.sql
        );
        assert_eq!(q.params().len(), 3);
        let done = ListQuery::new(&ListParams {
            state: Some(JobState::Completed),
            limit: 10,
            ..ListParams::default()
        });
        assert!(
            done.sql
                .contains("WHERE j.state = 'completed' ORDER BY j.id LIMIT $1"),
            "{}",
            done.sql
        );
    }
}
