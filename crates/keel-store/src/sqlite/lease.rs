//! [`WorkStore`] on SQLite: lease, heartbeat, complete, fail and release. Every write after
//! the lease is fenced by the lease token, so a worker that lost its lease cannot overwrite
//! the run that replaced it. The lease statement is built here; the others are written where
//! they run.

use std::sync::Arc;

use async_trait::async_trait;
use keel_core::clock::to_delta;
use keel_core::store::{Completion, FailParams, HeartbeatParams, LeaseParams, LeaseRef};
use keel_core::{
    AttemptError, Job, JobId, JobKind, JobState, LeaseToken, StoreError, TenantId, Timestamp,
    WorkStore,
};
use rusqlite::params;
use rusqlite::{CachedStatement, Connection, OptionalExtension};

use super::rows::{COLUMNS, micros, uuid_from_blob};
use super::{SqliteStore, map_err, query_jobs};
use crate::codec;

#[async_trait]
impl WorkStore for SqliteStore {
    async fn lease(&self, p: LeaseParams) -> Result<Vec<Job>, StoreError> {
        if p.max == 0 {
            return Ok(Vec::new());
        }
        let clock = Arc::clone(&self.clock);
        let context = format!("leasing jobs from queue {}", p.queue);
        self.writer
            .write(&context.clone(), move |conn| {
                let now = clock.now();
                let expires = now + to_delta(p.lease_for);
                let filtered = p.tenant.is_some() || !p.kinds.is_empty();
                // The kinds go in as one JSON array, so the statement text (and its cached
                // preparation) is the same whatever their number.
                let kinds = (!p.kinds.is_empty()).then(|| {
                    serde_json::to_string(&p.kinds.iter().map(JobKind::as_str).collect::<Vec<_>>())
                        .unwrap_or_else(|_| "[]".to_owned())
                });
                let all: &[&dyn rusqlite::ToSql] = params![
                    p.owner.as_str(),
                    micros(expires),
                    micros(now),
                    p.queue.as_str(),
                    p.max,
                    p.tenant.as_ref().map(TenantId::as_str),
                    kinds
                ];
                // The unfiltered statement takes only the first five parameters.
                let (sql, bound) = if filtered {
                    (format!("{LEASE_FILTERED_SQL}{COLUMNS}"), all)
                } else {
                    (format!("{LEASE_SQL}{COLUMNS}"), &all[..5])
                };
                let mut jobs = query_jobs(conn, &context, &sql, bound)?;
                // RETURNING gives no order; callers get jobs in lease order.
                jobs.sort_by_key(|j| (j.priority, j.run_at, j.id));
                Ok(jobs)
            })
            .await
    }

    async fn heartbeat(
        &self,
        p: HeartbeatParams,
    ) -> Result<Vec<Result<Timestamp, StoreError>>, StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("extending leases", move |conn| {
                let expires = clock.now() + to_delta(p.lease_for);
                Ok(fenced_each(
                    conn,
                    "extending leases",
                    "UPDATE jobs SET lease_expires_at = ?1
                         WHERE id = ?2 AND lease_token = ?3 AND state = 'running'",
                    &p.leases,
                    |l| l.id,
                    |stmt, l| {
                        stmt.execute(params![
                            micros(expires),
                            l.id.as_bytes(),
                            l.token.as_uuid().as_bytes()
                        ])
                    },
                )?
                .into_iter()
                .map(|applied| applied.map(|()| expires))
                .collect())
            })
            .await
    }

    async fn complete(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        crate::complete_checked(completions, |c| self.write_completions(c)).await
    }

    async fn fail(&self, p: FailParams) -> Result<Job, StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("recording a failed attempt", move |conn| {
                let now = clock.now();
                let id = p.lease.id;
                let row: Option<(String, Option<Vec<u8>>, u32, u32, String)> = conn
                    .prepare_cached(
                        "SELECT state, lease_token, attempt, max_attempts, backoff
                         FROM jobs WHERE id = ?1",
                    )
                    .and_then(|mut s| {
                        s.query_row([id.as_bytes()], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                        })
                        .optional()
                    })
                    .map_err(|e| map_err("recording a failed attempt", &e))?;
                let Some((state, token, attempt, max_attempts, backoff)) = row else {
                    return Err(StoreError::NotFound(id));
                };
                let held = token
                    .map(|t| uuid_from_blob("lease_token", &t))
                    .transpose()?
                    .map(LeaseToken::from_uuid);
                if state != JobState::Running.as_str() || held != Some(p.lease.token) {
                    return Err(StoreError::StaleLease(id));
                }
                let backoff = codec::backoff_from_json(&backoff)?;
                let next = p.next_run_at(attempt, max_attempts, &backoff, now, &mut rand::rng());
                let error =
                    codec::attempt_error_to_json(&AttemptError::new(attempt, now, &p.error));
                let (state, run_at, finished_at) = match next {
                    Some(run_at) => (JobState::Retryable, micros(run_at), None),
                    None => (JobState::Discarded, micros(now), Some(micros(now))),
                };
                let sql = format!(
                    "UPDATE jobs SET state = ?1, run_at = ?2, finished_at = ?3,
                            errors = json_insert(errors, '$[#]', json(?4)),
                            lease_token = NULL, lease_expires_at = NULL
                     WHERE id = ?5 RETURNING {COLUMNS}"
                );
                query_jobs(
                    conn,
                    "recording a failed attempt",
                    &sql,
                    params![state.as_str(), run_at, finished_at, error, id.as_bytes()],
                )?
                .pop()
                .ok_or(StoreError::NotFound(id))
            })
            .await
    }

    async fn release(
        &self,
        leases: Vec<LeaseRef>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        self.writer
            .write("releasing leases", move |conn| {
                fenced_each(
                    conn,
                    "releasing leases",
                    "UPDATE jobs SET state = 'available', attempt = attempt - 1,
                                lease_token = NULL, lease_expires_at = NULL
                         WHERE id = ?1 AND lease_token = ?2 AND state = 'running'",
                    &leases,
                    |l| l.id,
                    |stmt, l| stmt.execute(params![l.id.as_bytes(), l.token.as_uuid().as_bytes()]),
                )
            })
            .await
    }
}

impl SqliteStore {
    /// Writes completions whose results were checked ([`crate::complete_checked`]).
    async fn write_completions(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("completing jobs", move |conn| {
                let now = clock.now();
                fenced_each(
                    conn,
                    "completing jobs",
                    "UPDATE jobs SET state = 'completed', result = ?1, finished_at = ?2,
                                lease_token = NULL, lease_expires_at = NULL
                         WHERE id = ?3 AND lease_token = ?4 AND state = 'running'",
                    &completions,
                    |c| c.lease.id,
                    |stmt, c| {
                        stmt.execute(params![
                            c.result.as_ref().map(|r| r.get()),
                            micros(now),
                            c.lease.id.as_bytes(),
                            c.lease.token.as_uuid().as_bytes()
                        ])
                    },
                )
            })
            .await
    }
}

/// Runs the lease-fenced update `sql` once per item (`run` binds the item's parameters);
/// each item's outcome says whether its lease was still current ([`fenced`]). A failure
/// to run the statement fails the whole batch.
fn fenced_each<T>(
    conn: &Connection,
    context: &str,
    sql: &str,
    items: &[T],
    id: impl Fn(&T) -> JobId,
    mut run: impl FnMut(&mut CachedStatement<'_>, &T) -> rusqlite::Result<usize>,
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(|e| map_err(context, &e))?;
    items
        .iter()
        .map(|item| {
            let n = run(&mut stmt, item).map_err(|e| map_err(context, &e))?;
            Ok(fenced(conn, id(item), n))
        })
        .collect()
}

/// Whether a lease-fenced update of job `id` that changed `changed` rows applied. When it
/// changed none, the job is read, to tell a stale token from a missing job.
fn fenced(conn: &Connection, id: JobId, changed: usize) -> Result<(), StoreError> {
    if changed == 1 {
        return Ok(());
    }
    match conn
        .prepare_cached("SELECT 1 FROM jobs WHERE id = ?1")
        .and_then(|mut s| s.exists([id.as_bytes()]))
    {
        Ok(true) => Err(StoreError::StaleLease(id)),
        Ok(false) => Err(StoreError::NotFound(id)),
        Err(e) => Err(map_err("checking a lease", &e)),
    }
}

/// The lease statement, with `filter` (more conditions on the candidate rows, or nothing)
/// added to the inner select; `RETURNING` is followed by the columns.
macro_rules! lease_sql {
    ($filter:literal) => {
        concat!(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1,
        lease_owner = ?1, lease_token = randomblob(16), lease_expires_at = ?2, started_at = ?3,
        unique_key = CASE WHEN unique_scope = 'queued' THEN NULL ELSE unique_key END
    WHERE id IN (SELECT id FROM jobs WHERE state = 'available' AND queue = ?4 ",
            $filter,
            "
                 ORDER BY priority, run_at, id LIMIT ?5)
      AND NOT EXISTS (SELECT 1 FROM queues WHERE name = ?4 AND paused = 1)
    RETURNING "
        )
    };
}

/// Leases jobs. A `queued`-scope unique job gives its key up for good here (see
/// `UniqueScope::Queued`): the same key can be enqueued again while this one runs, and a later
/// retry of this job never takes the key back from a newer one.
const LEASE_SQL: &str = lease_sql!("");

/// [`LEASE_SQL`] for an external worker (docs/workers.md): only its tenant's jobs (`?6`,
/// NULL for any) of the kinds it handles (`?7`, a JSON array, NULL for any).
const LEASE_FILTERED_SQL: &str = lease_sql!(
    "AND (?6 IS NULL OR tenant = ?6)
                   AND (?7 IS NULL OR kind IN (SELECT value FROM json_each(?7)))"
);
