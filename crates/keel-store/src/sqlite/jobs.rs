//! [`JobStore`] on SQLite: jobs as clients see them. Inserts and state changes run on the
//! writer thread (group commit, `writer.rs`); reads on the read pool.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use keel_core::store::{IdempotentInsert, IdempotentOutcome, JobPage, ListParams};
use keel_core::{Job, JobId, JobState, JobStore, NewJob, StoreError, Transition};
use rusqlite::params;
use rusqlite::types::Value;

use super::rows::{COLUMNS, micros};
use super::{SqliteStore, insert_rows, query_jobs, refused, state_guard, validate_all};
use crate::{ListingIndexes, unique_key_held};

/// The listing indexes leave out running jobs only (migration `0004_lean_listing_indexes`).
/// Unlike Postgres, SQLite touches an index only when a change moves the job in it, so
/// completed jobs cost a completion one insert into each and stay listed by index.
const LISTING_INDEXES: ListingIndexes = ListingIndexes {
    left_out: &[JobState::Running],
    spell_predicate: true,
};

#[async_trait]
impl JobStore for SqliteStore {
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Job>, StoreError> {
        validate_all(&jobs)?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("inserting jobs", move |conn| {
                insert_rows(conn, jobs, clock.now())
            })
            .await
    }

    async fn insert_idempotent(
        &self,
        req: IdempotentInsert,
    ) -> Result<IdempotentOutcome, StoreError> {
        self.insert_under_key(req).await
    }
    async fn get(&self, id: JobId) -> Result<Job, StoreError> {
        self.read("reading a job", move |conn| {
            let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1");
            query_jobs(conn, "reading a job", &sql, [id.as_bytes()])?
                .pop()
                .ok_or(StoreError::NotFound(id))
        })
        .await
    }

    async fn list(&self, p: ListParams) -> Result<JobPage, StoreError> {
        let limit = p.effective_limit();
        self.read("listing jobs", move |conn| {
            let mut args: Vec<Value> = Vec::new();
            let where_ = crate::listing_conditions(&p, "", &LISTING_INDEXES, |value| {
                args.push(match value {
                    crate::ListingValue::Text(text) => Value::Text(text.to_owned()),
                    crate::ListingValue::Id(id) => Value::Blob(id.as_bytes().to_vec()),
                });
                format!("?{}", args.len())
            })
            .map_or_else(String::new, |conditions| format!("WHERE {conditions}"));
            args.push(Value::Integer(i64::from(limit)));
            // Running jobs are few and only the running index holds them all; without the
            // hint a page of them would walk the primary key (the whole table when fewer
            // than a page run).
            let index = if p.state == Some(JobState::Running) {
                "INDEXED BY jobs_expired_lease_idx "
            } else {
                ""
            };
            let sql = format!(
                "SELECT {COLUMNS} FROM jobs {index}{where_} ORDER BY id LIMIT ?{}",
                args.len()
            );
            let jobs = query_jobs(conn, "listing jobs", &sql, rusqlite::params_from_iter(args))?;
            let next = (jobs.len() == limit as usize)
                .then(|| jobs.last().map(|j| j.id))
                .flatten();
            Ok(JobPage { jobs, next })
        })
        .await
    }

    async fn cancel(&self, id: JobId) -> Result<Job, StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("cancelling a job", move |conn| {
                let now = micros(clock.now());
                query_jobs(
                    conn,
                    "cancelling a job",
                    &CANCEL_SQL,
                    params![id.as_bytes(), now],
                )?
                .pop()
                .ok_or_else(|| refused(conn, id, Transition::Cancel))
            })
            .await
    }

    async fn retry(&self, id: JobId) -> Result<Job, StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("retrying a job", move |conn| {
                let now = micros(clock.now());
                query_jobs(
                    conn,
                    "retrying a job",
                    &RETRY_SQL,
                    params![id.as_bytes(), now],
                )
                // The only constraint the retry can break is `jobs_unique_idx`: a finished
                // `active`-scope job would take its key back while a newer job holds it.
                .map_err(|e| match e {
                    StoreError::Conflict(_) => unique_key_held(id),
                    other => other,
                })?
                .pop()
                .ok_or_else(|| refused(conn, id, Transition::Retry))
            })
            .await
    }
}

/// Cancels job ?1 at ?2 if the state machine lets it leave its state (the guard comes from
/// `Transition::Cancel`); no row otherwise, and [`refused`] then says why.
static CANCEL_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE jobs SET state = 'cancelled', finished_at = ?2, lease_token = NULL,
                lease_expires_at = NULL
         WHERE id = ?1 AND {} RETURNING {COLUMNS}",
        state_guard(Transition::Cancel)
    )
});

/// Puts job ?1 back to run at ?2, guarded as [`CANCEL_SQL`] by `Transition::Retry`. A job
/// that used up its attempts gets exactly one more.
static RETRY_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE jobs SET state = 'available', run_at = ?2, finished_at = NULL, result = NULL,
                lease_token = NULL, lease_expires_at = NULL,
                max_attempts = max(max_attempts, attempt + 1)
         WHERE id = ?1 AND {} RETURNING {COLUMNS}",
        state_guard(Transition::Retry)
    )
});
