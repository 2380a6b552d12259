//! The one place driver and pool errors become [`StoreError`]s.
//!
//! The split matters to callers: a transient error is retried with backoff inside the
//! request deadline and counted by the circuit breaker, a conflict is a 409, data the
//! server refuses is the request's fault (a 422 that never counts against the database's
//! health), anything else is a permanent failure that retrying would only repeat. Every error carries what was being
//! attempted ("leasing jobs from queue emails") and keeps the driver error as its source.

use std::error::Error as StdError;

use deadpool_postgres::{HookError, PoolError};
use keel_core::StoreError;
use tokio_postgres::error::SqlState;

/// SQLSTATEs worth retrying: the server is going away or starting (57P0x), out of
/// connections (53300), a serialisation failure or deadlock victim (40001, 40P01), or a lock
/// that was not available (55P03, `NOWAIT` / `lock_timeout`). Class 08 (connection
/// exceptions) is matched separately, as a class.
const TRANSIENT: [&SqlState; 7] = [
    &SqlState::T_R_SERIALIZATION_FAILURE,
    &SqlState::T_R_DEADLOCK_DETECTED,
    &SqlState::ADMIN_SHUTDOWN,
    &SqlState::CRASH_SHUTDOWN,
    &SqlState::CANNOT_CONNECT_NOW,
    &SqlState::TOO_MANY_CONNECTIONS,
    &SqlState::LOCK_NOT_AVAILABLE,
];

/// What to change when a pooler and Keel's statements disagree.
const POOLER_HINT: &str = "Keel is using named prepared statements through a pooler in \
    transaction mode (PgBouncer's pool_mode = transaction), which runs each transaction on \
    whichever server connection is free: set KEEL_DATABASE_POOLER=transaction";

/// Maps a driver error raised while doing `context`.
pub(super) fn db(e: tokio_postgres::Error, context: String) -> StoreError {
    if let Some(why) = misconfiguration(&e) {
        return StoreError::misconfigured(context, why);
    }
    if let Some(code) = e.code() {
        if *code == SqlState::UNIQUE_VIOLATION {
            let detail = e
                .as_db_error()
                .map(|d| d.detail().unwrap_or(d.message()).to_owned())
                .unwrap_or_default();
            return StoreError::Conflict(format!("{context}: {detail}"));
        }
        if code.code().starts_with("08") || TRANSIENT.contains(&code) {
            return StoreError::transient(context, e);
        }
        if is_data_error(code) {
            let message = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned());
            return StoreError::rejected(context, message);
        }
        return StoreError::permanent(context, e);
    }
    // No SQLSTATE: the failure happened on the way to or from the server. A closed connection
    // or an I/O error (refused, reset, timed out) may well succeed on another connection.
    if e.is_closed() || has_io_source(&e) {
        StoreError::transient(context, e)
    } else {
        StoreError::permanent(context, e)
    }
}

/// Maps a failure to get a connection from the pool while doing `context`.
pub(super) fn pool(e: PoolError, context: String) -> StoreError {
    match e {
        // Every connection busy for the whole acquire timeout, or the server too slow to
        // accept a new one: load, not a defect.
        PoolError::Timeout(_) => StoreError::transient(context, e),
        PoolError::Backend(inner) => db(inner, context),
        PoolError::PostCreateHook(HookError::Backend(inner)) => db(inner, context),
        // Closed on purpose by `close()`: retrying cannot help.
        PoolError::Closed => StoreError::permanent(context, "the store is closed"),
        PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(HookError::Message(_)) => {
            StoreError::permanent(context, e)
        }
    }
}

/// A protocol mismatch between Keel's settings and what answers on the database URL, in
/// words an operator can act on; `None` for every other error.
///
/// - `26000` (`prepared statement "s16" does not exist`) and `42P05` (`… already exists`):
///   named statements through a transaction pooler, which lost this connection's statement
///   or gave it another client's;
/// - `08P01` with PgBouncer's `unsupported startup parameter`: startup `options` (the
///   statement timeout) sent to PgBouncer. Other `08P01`s (PgBouncer's own timeouts, a
///   server it lost) stay transient.
fn misconfiguration(e: &tokio_postgres::Error) -> Option<String> {
    let db = e.as_db_error()?;
    let code = db.code();
    if *code == SqlState::INVALID_SQL_STATEMENT_NAME || *code == SqlState::DUPLICATE_PSTATEMENT {
        return Some(format!("{}: {POOLER_HINT}", db.message()));
    }
    if *code == SqlState::PROTOCOL_VIOLATION
        && db.message().contains("unsupported startup parameter")
    {
        return Some(format!(
            "{}: the pooler refuses startup parameters; set KEEL_DATABASE_POOLER=transaction \
             (which sends none) and put the statement timeout on the role \
             (ALTER ROLE … SET statement_timeout = …)",
            db.message()
        ));
    }
    None
}

/// SQLSTATE classes that mean "the data is wrong", not "the database is": 22 (data
/// exception: a value out of range, not representable like `\u0000` in jsonb, malformed),
/// 23 (integrity constraint; unique violations are conflicts, matched before this) and 54
/// (program limit exceeded: a value nested or sized past what the server handles).
fn is_data_error(code: &SqlState) -> bool {
    matches!(&code.code()[..2], "22" | "23" | "54")
}

fn has_io_source(e: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<std::io::Error>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_errors_are_the_requests_fault() {
        for code in [
            SqlState::UNTRANSLATABLE_CHARACTER,
            SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
            SqlState::CHECK_VIOLATION,
            SqlState::NOT_NULL_VIOLATION,
            SqlState::STATEMENT_TOO_COMPLEX,
            SqlState::PROGRAM_LIMIT_EXCEEDED,
        ] {
            assert!(is_data_error(&code), "{code:?}");
        }
        for code in [
            SqlState::CONNECTION_FAILURE,
            SqlState::UNDEFINED_TABLE,
            SqlState::DISK_FULL,
            SqlState::T_R_DEADLOCK_DETECTED,
        ] {
            assert!(!is_data_error(&code), "{code:?}");
        }
    }

    #[test]
    fn pool_timeouts_are_transient_and_closed_is_not() {
        let e = pool(
            PoolError::Timeout(deadpool_postgres::TimeoutType::Wait),
            "leasing jobs from queue q".into(),
        );
        assert!(e.is_transient());
        assert!(e.to_string().contains("leasing jobs from queue q"), "{e}");
        let e = pool(PoolError::Closed, "getting job x".into());
        assert!(!e.is_transient());
        assert_eq!(e.class(), "permanent");
    }
}
