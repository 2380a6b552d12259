//! Decoding a row selected through [`COLUMNS`](super::sql::COLUMNS) into a [`Job`], and one
//! selected through [`SCHEDULE_COLUMNS`](super::sql::SCHEDULE_COLUMNS) into a [`Schedule`].
//!
//! Data read back is not trusted blindly: a value that does not decode (an unknown state, a
//! name that fails validation, a negative attempt count) is a [`StoreError::Permanent`]
//! naming the column, never a panic.

use std::time::Duration;

use keel_core::{
    Job, JobId, JobKind, JobState, Lease, LeaseToken, Priority, QueueName, Schedule, ScheduleName,
    StoreError, TenantId, Timestamp, UniqueHold, UniqueScopeKind, WorkerId,
};
use tokio_postgres::Row;
use tokio_postgres::types::FromSql;
use uuid::Uuid;

use crate::codec;

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
