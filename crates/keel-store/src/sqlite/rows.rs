//! Reading and writing job and schedule rows in SQLite's column types: a job's columns, its
//! decoding and its insert live together, so a new job field changes this file alone (with
//! its migration).

use std::time::Duration;

use keel_core::clock::{from_micros, to_micros};
use keel_core::{
    Job, JobId, JobKind, Lease, LeaseToken, Priority, QueueName, Schedule, ScheduleName,
    StoreError, TenantId, Timestamp, UniqueHold, UniqueScopeKind, WorkerId,
};
use rusqlite::{CachedStatement, Row, params};
use uuid::Uuid;

use crate::codec;

/// Every column of `jobs`, in the order [`job_from_row`] reads them.
pub(super) const COLUMNS: &str = "id, queue, kind, tenant, args, priority, state, attempt, \
     max_attempts, timeout_ms, backoff, tags, run_at, errors, result, lease_owner, lease_token, \
     lease_expires_at, created_at, started_at, finished_at, unique_key, unique_scope, meta";

/// Inserts one new job ([`insert_job`] binds it). attempt, errors, result and the lease
/// start empty.
pub(super) const INSERT: &str = "INSERT INTO jobs (id, queue, kind, tenant, args, priority, \
     state, attempt, max_attempts, timeout_ms, backoff, tags, run_at, errors, created_at, \
     unique_key, unique_scope, meta) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9, ?10, ?11, ?12, '[]', ?13, ?14, ?15, ?16)";

/// Writes `job` through a statement prepared from [`INSERT`].
pub(super) fn insert_job(stmt: &mut CachedStatement<'_>, job: &Job) -> rusqlite::Result<usize> {
    stmt.execute(params![
        job.id.as_bytes(),
        job.queue.as_str(),
        job.kind.as_str(),
        job.tenant.as_str(),
        job.args.get(),
        job.priority.get(),
        job.state.as_str(),
        job.max_attempts,
        // Validation bounds the timeout to a day.
        i64::try_from(job.timeout.as_millis()).unwrap_or(i64::MAX),
        codec::backoff_to_json(&job.backoff),
        codec::tags_to_json(&job.tags),
        micros(job.run_at),
        micros(job.created_at),
        job.unique.as_ref().map(|u| u.key.as_str()),
        job.unique.as_ref().map(|u| u.scope.as_str()),
        job.meta.as_ref().map(|m| m.get()),
    ])
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::permanent(
        format!("decoding stored {what}"),
        format!("unexpected value: {detail}"),
    )
}

pub(super) fn uuid_from_blob(what: &str, b: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(b).map_err(|e| corrupt(what, e))
}

/// Decodes a stored timestamp (microseconds); `what` names the column in the error.
pub(super) fn ts(what: &str, us: i64) -> Result<Timestamp, StoreError> {
    from_micros(us).ok_or_else(|| corrupt(what, us))
}

fn opt_ts(what: &str, us: Option<i64>) -> Result<Option<Timestamp>, StoreError> {
    us.map(|v| ts(what, v)).transpose()
}

/// Converts a timestamp to the stored form.
pub(super) fn micros(t: Timestamp) -> i64 {
    to_micros(t)
}

fn get<T: rusqlite::types::FromSql>(row: &Row<'_>, idx: usize) -> Result<T, StoreError> {
    row.get(idx)
        .map_err(|e| StoreError::permanent("reading a stored row", e))
}

fn name<T>(
    what: &str,
    s: String,
    parse: impl Fn(String) -> Result<T, keel_core::ids::InvalidId>,
) -> Result<T, StoreError> {
    parse(s).map_err(|e| corrupt(what, e))
}

fn u32_col(row: &Row<'_>, idx: usize, what: &str) -> Result<u32, StoreError> {
    let v: i64 = get(row, idx)?;
    u32::try_from(v).map_err(|_| corrupt(what, v))
}

/// Decodes a row selected with [`COLUMNS`].
pub(super) fn job_from_row(row: &Row<'_>) -> Result<Job, StoreError> {
    let id: Vec<u8> = get(row, 0)?;
    let priority: i64 = get(row, 5)?;
    let state: String = get(row, 6)?;
    let timeout_ms: i64 = get(row, 9)?;
    let lease_owner: Option<String> = get(row, 15)?;
    let lease_token: Option<Vec<u8>> = get(row, 16)?;
    let lease_expires_at: Option<i64> = get(row, 17)?;
    let unique_key: Option<String> = get(row, 21)?;
    let unique_scope: Option<String> = get(row, 22)?;
    // A `queued` job's key is cleared by its first lease while its scope stays: no key, no
    // hold.
    let unique = match (unique_key, unique_scope) {
        (Some(key), Some(scope)) => Some(UniqueHold {
            key,
            scope: UniqueScopeKind::parse(&scope).ok_or_else(|| corrupt("unique_scope", &scope))?,
        }),
        _ => None,
    };
    let lease = match (lease_owner.clone(), lease_token, lease_expires_at) {
        (Some(owner), Some(token), Some(expires)) => Some(Lease {
            owner: name("lease_owner", owner, WorkerId::parse)?,
            token: LeaseToken::from_uuid(uuid_from_blob("lease_token", &token)?),
            expires_at: ts("lease_expires_at", expires)?,
        }),
        _ => None,
    };
    Ok(Job {
        id: JobId::from_uuid(uuid_from_blob("id", &id)?),
        queue: name("queue", get(row, 1)?, QueueName::parse)?,
        kind: name("kind", get(row, 2)?, JobKind::parse)?,
        tenant: name("tenant", get(row, 3)?, TenantId::parse)?,
        args: codec::raw_json(get(row, 4)?, "args")?,
        priority: u8::try_from(priority)
            .ok()
            .and_then(|p| Priority::new(p).ok())
            .ok_or_else(|| corrupt("priority", priority))?,
        state: state.parse().map_err(|e| corrupt("state", e))?,
        attempt: u32_col(row, 7, "attempt")?,
        max_attempts: u32_col(row, 8, "max_attempts")?,
        timeout: Duration::from_millis(
            u64::try_from(timeout_ms).map_err(|_| corrupt("timeout_ms", timeout_ms))?,
        ),
        backoff: codec::backoff_from_json(&get::<String>(row, 10)?)?,
        tags: codec::tags_from_json(&get::<String>(row, 11)?)?,
        run_at: ts("run_at", get(row, 12)?)?,
        errors: codec::errors_from_json(&get::<String>(row, 13)?)?,
        result: get::<Option<String>>(row, 14)?
            .map(|r| codec::raw_json(r, "result"))
            .transpose()?,
        lease,
        created_at: ts("created_at", get(row, 18)?)?,
        started_at: opt_ts("started_at", get(row, 19)?)?,
        finished_at: opt_ts("finished_at", get(row, 20)?)?,
        unique,
        meta: get::<Option<String>>(row, 23)?
            .map(|m| codec::raw_json(m, "meta"))
            .transpose()?,
    })
}

/// Every column of `schedules`, in the order [`schedule_from_row`] reads them.
pub(super) const SCHEDULE_COLUMNS: &str =
    "tenant, name, cron, timezone, job, paused, catch_up_ms, last_tick_at, created_at, updated_at";

/// Decodes a row selected with [`SCHEDULE_COLUMNS`].
pub(super) fn schedule_from_row(row: &Row<'_>) -> Result<Schedule, StoreError> {
    let job: String = get(row, 4)?;
    let catch_up_ms: i64 = get(row, 6)?;
    Ok(Schedule {
        tenant: name("tenant", get(row, 0)?, TenantId::parse)?,
        name: name("schedule name", get(row, 1)?, ScheduleName::parse)?,
        cron: get(row, 2)?,
        timezone: get(row, 3)?,
        job: codec::template_from_json(&job)?,
        paused: get(row, 5)?,
        catch_up: Duration::from_millis(
            u64::try_from(catch_up_ms).map_err(|_| corrupt("catch_up_ms", catch_up_ms))?,
        ),
        last_tick_at: opt_ts("last_tick_at", get(row, 7)?)?,
        created_at: ts("created_at", get(row, 8)?)?,
        updated_at: ts("updated_at", get(row, 9)?)?,
    })
}
