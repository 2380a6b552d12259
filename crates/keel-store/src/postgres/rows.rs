//! A job's row and a schedule's: the columns selected ([`COLUMNS`], [`SCHEDULE_COLUMNS`]),
//! their decoding into a [`Job`] and a [`Schedule`], and the statements that insert jobs with
//! the parameters [`JobColumns`] lays out. Everything a new job field changes on Postgres,
//! besides its migration, is in this file.
//!
//! Data read back is not trusted blindly: a value that does not decode (an unknown state, a
//! name that fails validation, a negative attempt count) is a [`StoreError::Permanent`]
//! naming the column, never a panic.

use std::sync::LazyLock;
use std::time::Duration;

use keel_core::{
    Job, JobId, JobKind, JobState, Lease, LeaseToken, Priority, QueueName, Schedule, ScheduleName,
    StoreError, TenantId, Timestamp, UniqueHold, UniqueScopeKind, WorkerId,
};
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql};
use uuid::Uuid;

use crate::codec;

/// The columns of a job, in the order [`job_from_row`] decodes them. JSON columns come
/// back as text: `args`, `result` and `meta` must round-trip byte for byte, and the structured
/// columns are parsed by the same codec the SQLite store uses.
pub(super) const COLUMNS: &str = "j.id, j.queue, j.kind, j.tenant, j.args::text, j.priority, \
     j.state, j.attempt, j.max_attempts, j.timeout_ms, j.backoff::text, j.tags::text, j.run_at, \
     j.errors::text, j.result::text, j.lease_owner, j.lease_token, j.lease_expires_at, \
     j.created_at, j.started_at, j.finished_at, j.unique_key, j.unique_scope, j.meta::text";

/// The columns of a schedule, in the order [`schedule_from_row`] decodes them, the table
/// aliased `s`. The template comes back as text so its args keep their bytes.
pub(super) const SCHEDULE_COLUMNS: &str = "s.tenant, s.name, s.cron, s.timezone, s.job::text, \
     s.paused, s.catch_up_ms, s.last_tick_at, s.created_at, s.updated_at";

/// Column `idx` of `row`, or a permanent error naming `column`.
pub(super) fn get<'a, T: FromSql<'a>>(
    row: &'a Row,
    idx: usize,
    column: &'static str,
) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|e| StoreError::permanent(format!("decoding stored column {column}"), e))
}

/// Parses a stored text value with `parse`, or a permanent error naming `column`.
pub(super) fn parsed<'a, T, E>(
    column: &'static str,
    value: &'a str,
    parse: impl FnOnce(&'a str) -> Result<T, E>,
) -> Result<T, StoreError>
where
    E: Into<keel_core::error::BoxError>,
{
    parse(value).map_err(|e| StoreError::permanent(format!("decoding stored {column}"), e))
}

/// A stored state name.
pub(super) fn state(value: &str) -> Result<JobState, StoreError> {
    parsed("state", value, str::parse::<JobState>)
}

/// A stored non-negative integer (attempt counts).
pub(super) fn count(column: &'static str, value: i32) -> Result<u32, StoreError> {
    u32::try_from(value)
        .map_err(|e| StoreError::permanent(format!("decoding stored {column} ({value})"), e))
}

/// Decodes one job.
pub(super) fn job_from_row(row: &Row) -> Result<Job, StoreError> {
    let id: Uuid = get(row, 0, "id")?;
    let queue: &str = get(row, 1, "queue")?;
    let kind: &str = get(row, 2, "kind")?;
    let tenant: &str = get(row, 3, "tenant")?;
    let args: String = get(row, 4, "args")?;
    let priority: i16 = get(row, 5, "priority")?;
    let state_name: &str = get(row, 6, "state")?;
    let attempt: i32 = get(row, 7, "attempt")?;
    let max_attempts: i32 = get(row, 8, "max_attempts")?;
    let timeout_ms: i64 = get(row, 9, "timeout_ms")?;
    let backoff: &str = get(row, 10, "backoff")?;
    let tags: &str = get(row, 11, "tags")?;
    let run_at: Timestamp = get(row, 12, "run_at")?;
    let errors: &str = get(row, 13, "errors")?;
    let result: Option<String> = get(row, 14, "result")?;
    let lease_owner: Option<&str> = get(row, 15, "lease_owner")?;
    let lease_token: Option<Uuid> = get(row, 16, "lease_token")?;
    let lease_expires_at: Option<Timestamp> = get(row, 17, "lease_expires_at")?;
    let unique_key: Option<String> = get(row, 21, "unique_key")?;
    let unique_scope: Option<&str> = get(row, 22, "unique_scope")?;

    let lease = match (lease_token, lease_expires_at) {
        (Some(token), Some(expires_at)) => {
            let owner = lease_owner.ok_or_else(|| {
                StoreError::permanent(
                    "decoding a job row",
                    format!("job {id} holds a lease but has no lease_owner"),
                )
            })?;
            Some(Lease {
                owner: parsed("lease_owner", owner, WorkerId::parse)?,
                token: LeaseToken::from_uuid(token),
                expires_at,
            })
        }
        _ => None,
    };
    let priority = u8::try_from(priority)
        .ok()
        .and_then(|p| Priority::new(p).ok())
        .ok_or_else(|| {
            StoreError::permanent(
                "decoding stored priority",
                format!("{priority} is not between 0 and 9"),
            )
        })?;
    let timeout_ms = u64::try_from(timeout_ms).map_err(|e| {
        StoreError::permanent(format!("decoding stored timeout_ms ({timeout_ms})"), e)
    })?;
    // A `queued` job's key is cleared when it is leased; its scope stays as a record.
    let unique = match (unique_key, unique_scope) {
        (Some(key), Some(scope)) => Some(UniqueHold {
            key,
            scope: UniqueScopeKind::parse(scope).ok_or_else(|| {
                StoreError::permanent(
                    "decoding stored unique_scope",
                    format!("{scope:?} is not queued, active or period"),
                )
            })?,
        }),
        _ => None,
    };

    Ok(Job {
        id: JobId::from_uuid(id),
        queue: parsed("queue", queue, QueueName::parse)?,
        kind: parsed("kind", kind, JobKind::parse)?,
        tenant: parsed("tenant", tenant, TenantId::parse)?,
        args: codec::raw_json(args, "args")?,
        priority,
        state: state(state_name)?,
        attempt: count("attempt", attempt)?,
        max_attempts: count("max_attempts", max_attempts)?,
        timeout: Duration::from_millis(timeout_ms),
        backoff: codec::backoff_from_json(backoff)?,
        tags: codec::tags_from_json(tags)?,
        run_at,
        errors: codec::errors_from_json(errors)?,
        result: result.map(|r| codec::raw_json(r, "result")).transpose()?,
        lease,
        created_at: get(row, 18, "created_at")?,
        started_at: get(row, 19, "started_at")?,
        finished_at: get(row, 20, "finished_at")?,
        unique,
        meta: get::<Option<String>>(row, 23, "meta")?
            .map(|m| codec::raw_json(m, "meta"))
            .transpose()?,
    })
}

/// Decodes one schedule.
pub(super) fn schedule_from_row(row: &Row) -> Result<Schedule, StoreError> {
    let tenant: &str = get(row, 0, "tenant")?;
    let name: &str = get(row, 1, "name")?;
    let catch_up_ms: i64 = get(row, 6, "catch_up_ms")?;
    let catch_up_ms = u64::try_from(catch_up_ms).map_err(|e| {
        StoreError::permanent(format!("decoding stored catch_up_ms ({catch_up_ms})"), e)
    })?;
    Ok(Schedule {
        tenant: parsed("tenant", tenant, TenantId::parse)?,
        name: parsed("schedule name", name, ScheduleName::parse)?,
        cron: get(row, 2, "cron")?,
        timezone: get(row, 3, "timezone")?,
        job: codec::template_from_json(get(row, 4, "job")?)?,
        paused: get(row, 5, "paused")?,
        catch_up: Duration::from_millis(catch_up_ms),
        last_tick_at: get(row, 7, "last_tick_at")?,
        created_at: get(row, 8, "created_at")?,
        updated_at: get(row, 9, "updated_at")?,
    })
}

/// New jobs as the array parameters of [`INSERT_SQL`], one array per column, so a batch of
/// any size is one statement. Used by the committer and by `insert_idempotent`, which must
/// store jobs identically and notify the same way.
pub(super) struct JobColumns<'a> {
    ids: Vec<Uuid>,
    queues: Vec<&'a str>,
    kinds: Vec<&'a str>,
    tenants: Vec<&'a str>,
    args: Vec<&'a str>,
    priorities: Vec<i16>,
    states: Vec<&'static str>,
    max_attempts: Vec<i32>,
    timeouts: Vec<i64>,
    backoffs: Vec<String>,
    tags: Vec<String>,
    run_ats: Vec<Timestamp>,
    created_ats: Vec<Timestamp>,
    metas: Vec<Option<&'a str>>,
    /// Stored unique keys ([`INSERT_UNIQUE_SQL`] only).
    unique_keys: Vec<Option<&'a str>>,
    /// Their scopes' stored spelling.
    unique_scopes: Vec<Option<&'static str>>,
}

impl<'a> JobColumns<'a> {
    /// The columns of `jobs` (`n` is a capacity hint).
    pub(super) fn of(jobs: impl IntoIterator<Item = &'a Job>, n: usize) -> Self {
        let mut c = Self {
            ids: Vec::with_capacity(n),
            queues: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            tenants: Vec::with_capacity(n),
            args: Vec::with_capacity(n),
            priorities: Vec::with_capacity(n),
            states: Vec::with_capacity(n),
            max_attempts: Vec::with_capacity(n),
            timeouts: Vec::with_capacity(n),
            backoffs: Vec::with_capacity(n),
            tags: Vec::with_capacity(n),
            run_ats: Vec::with_capacity(n),
            created_ats: Vec::with_capacity(n),
            metas: Vec::with_capacity(n),
            unique_keys: Vec::with_capacity(n),
            unique_scopes: Vec::with_capacity(n),
        };
        for j in jobs {
            c.ids.push(*j.id.as_uuid());
            c.queues.push(j.queue.as_str());
            c.kinds.push(j.kind.as_str());
            c.tenants.push(j.tenant.as_str());
            c.args.push(j.args.get());
            c.priorities.push(i16::from(j.priority.get()));
            c.states.push(j.state.as_str());
            // Validation bounds these far below i32::MAX / i64::MAX.
            c.max_attempts
                .push(i32::try_from(j.max_attempts).unwrap_or(i32::MAX));
            c.timeouts
                .push(i64::try_from(j.timeout.as_millis()).unwrap_or(i64::MAX));
            c.backoffs.push(codec::backoff_to_json(&j.backoff));
            c.tags.push(codec::tags_to_json(&j.tags));
            c.run_ats.push(j.run_at);
            c.created_ats.push(j.created_at);
            c.metas.push(j.meta.as_ref().map(|m| m.get()));
            c.unique_keys
                .push(j.unique.as_ref().map(|u| u.key.as_str()));
            c.unique_scopes
                .push(j.unique.as_ref().map(|u| u.scope.as_str()));
        }
        c
    }

    /// `$1..$14` of [`INSERT_SQL`], which [`INSERT_UNIQUE_SQL`] starts with: one array per
    /// column.
    pub(super) fn params(&self) -> [&(dyn ToSql + Sync); 14] {
        [
            &self.ids,
            &self.queues,
            &self.kinds,
            &self.tenants,
            &self.args,
            &self.priorities,
            &self.states,
            &self.max_attempts,
            &self.timeouts,
            &self.backoffs,
            &self.tags,
            &self.run_ats,
            &self.created_ats,
            &self.metas,
        ]
    }

    /// `$1..$16` of [`INSERT_UNIQUE_SQL`].
    pub(super) fn unique_params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut params = self.params().to_vec();
        params.extend([
            &self.unique_keys as &(dyn ToSql + Sync),
            &self.unique_scopes,
        ]);
        params
    }
}

/// States in which a job that still has its unique key holds it, for every scope but
/// `period` (which holds in all): exactly the predicate of `jobs_unique_idx`
/// (migrations/postgres/0003_scale_out.sql), in the same order. `ON CONFLICT` can only use
/// a partial index as its arbiter when its own `WHERE` provably implies the index's, and the
/// simplest proof is the identical expression; a unit test below holds the two together.
const UNIQUE_HOLDING: &str = "j.unique_key IS NOT NULL \
     AND (j.unique_scope = 'period' \
          OR j.state IN ('scheduled', 'available', 'retryable', 'running'))";

/// Inserts a batch without unique jobs, `$1..$14` as [`JobColumns::params`] lays them out.
///
/// One statement for the whole batch: columns travel as arrays and are zipped back into rows
/// by unnest. JSON travels as text and is cast here, so `args` is stored exactly as
/// submitted. attempt, errors, result and the lease take their defaults. created_at is per
/// row: a group commit merges callers that arrived at different instants, and each job keeps
/// the time its own caller saw.
///
/// It notifies no one: listeners are woken after the commit (`wakeup.rs` says why).
pub(super) const INSERT_SQL: &str = "INSERT INTO jobs (id, queue, kind, tenant, args, priority, state, \
     max_attempts, timeout_ms, backoff, tags, run_at, created_at, meta) \
     SELECT t.id, t.queue, t.kind, t.tenant, t.args::json, t.priority, t.state, \
     t.max_attempts, t.timeout_ms, t.backoff::jsonb, t.tags::jsonb, t.run_at, \
     t.created_at, t.meta::json \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
     $6::int2[], $7::text[], $8::int4[], $9::int8[], $10::text[], $11::text[], \
     $12::timestamptz[], $13::timestamptz[], $14::text[]) \
     AS t(id, queue, kind, tenant, args, priority, state, max_attempts, timeout_ms, \
     backoff, tags, run_at, created_at, meta)";

/// The insert for batches holding unique jobs, `$1..$17` as [`JobColumns::unique_params`]
/// lays them out ([`INSERT_SQL`] stays as lean as before for the rest). A job whose key is
/// held, by a committed job or by an earlier row of this very statement, is skipped rather
/// than failing the batch; a concurrent transaction inserting the same key makes this wait
/// for its outcome. RETURNING tells the caller which rows went in; it then reads the holders
/// of the rest ([`UNIQUE_HOLDERS_SQL`]). Rows go in key order so that two batches taking the
/// same keys lock them in the same order and cannot deadlock; one key repeated in the batch
/// goes to the first job naming it. The conflict target names the partial unique index only
/// (the primary key is no arbiter), so a duplicate id still fails as a Conflict.
///
/// `$15`/`$16` are the keys and scopes. Like [`INSERT_SQL`], it notifies no one.
pub(super) static INSERT_UNIQUE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO jobs AS j (id, queue, kind, tenant, args, priority, state, \
         max_attempts, timeout_ms, backoff, tags, run_at, created_at, meta, unique_key, \
         unique_scope) \
         SELECT t.id, t.queue, t.kind, t.tenant, t.args::json, t.priority, t.state, \
         t.max_attempts, t.timeout_ms, t.backoff::jsonb, t.tags::jsonb, t.run_at, \
         t.created_at, t.meta::json, t.unique_key, t.unique_scope \
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
         $6::int2[], $7::text[], $8::int4[], $9::int8[], $10::text[], $11::text[], \
         $12::timestamptz[], $13::timestamptz[], $14::text[], $15::text[], $16::text[]) \
         WITH ORDINALITY \
         AS t(id, queue, kind, tenant, args, priority, state, max_attempts, timeout_ms, \
         backoff, tags, run_at, created_at, meta, unique_key, unique_scope, ord) \
         ORDER BY t.tenant, t.unique_key, t.ord \
         ON CONFLICT (tenant, unique_key) WHERE {holding} DO NOTHING \
         RETURNING j.id",
        holding = UNIQUE_HOLDING.replace("j.", ""),
    )
});

/// The jobs holding the given (tenant, key) pairs: at most one each, by the unique index.
pub(super) static UNIQUE_HOLDERS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {COLUMNS} FROM jobs j \
         JOIN unnest($1::text[], $2::text[]) AS k(tenant, unique_key) \
           ON j.tenant = k.tenant AND j.unique_key = k.unique_key \
         WHERE {UNIQUE_HOLDING}"
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unique_arbiter_is_the_index_predicate() {
        let migration = include_str!("../../migrations/postgres/0003_scale_out.sql");
        let index = migration
            .split("CREATE UNIQUE INDEX jobs_unique_idx")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .expect("the migration creates jobs_unique_idx");
        let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let predicate = squash(&UNIQUE_HOLDING.replace("j.", ""));
        assert!(
            squash(index).ends_with(&format!("WHERE {predicate}")),
            "{index} vs {predicate}"
        );
        let held = predicate.split("state IN (").nth(1).expect("a state list");
        for s in JobState::ALL {
            assert_eq!(
                held.contains(&format!("'{}'", s.as_str())),
                keel_core::UniqueScopeKind::Active.holds_in(s),
                "{s} in {predicate}"
            );
        }
        assert!(INSERT_UNIQUE_SQL.contains(&format!("WHERE {predicate} DO NOTHING")));
    }
}
