//! Errors of the domain and of the store contract.
//!
//! [`StoreError`] separates the cases a caller must treat differently: a missing job (404),
//! a move the state machine refuses or a duplicate (409), a stale lease token (the worker
//! lost its lease and must drop its result), invalid input (422), a transient failure worth
//! retrying with backoff (connection lost, lock timeout, serialisation failure), and a
//! permanent failure that retrying will not fix.

use std::error::Error as StdError;
use std::fmt;

use serde::Serialize;

use crate::ids::{JobId, ScheduleName, TenantId};
use crate::job::IllegalTransition;

/// One field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Path of the field, e.g. `max_attempts` or `tags[3]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Every field error found in one value (never just the first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

impl StdError for ValidationErrors {}

/// A boxed underlying cause (driver error, I/O error).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No job with this id.
    #[error("job {0} not found")]
    NotFound(JobId),

    /// The state machine refuses this move from the job's current state.
    #[error("job {id}: {source}")]
    IllegalTransition {
        /// The job.
        id: JobId,
        /// The refused move.
        #[source]
        source: IllegalTransition,
    },

    /// No schedule with this name in this tenant.
    #[error("schedule {1} not found in tenant {0}")]
    ScheduleNotFound(TenantId, ScheduleName),

    /// A write made on behalf of the maintenance leader was refused because the caller no
    /// longer holds the leadership it presented (its epoch was superseded or its term
    /// expired). Nothing was written; the new leader does the work.
    #[error("not the leader: leadership epoch {0} is no longer current")]
    NotLeader(u64),

    /// The write conflicts with stored data (e.g. a job with this id already exists).
    #[error("conflict: {0}")]
    Conflict(String),

    /// The lease token does not match the job's current lease: the lease expired and was
    /// rescued, the job was cancelled, or it already finished. The caller's work is void.
    #[error(
        "job {0}: lease token is stale (the lease expired, was taken over, or the job finished)"
    )]
    StaleLease(JobId),

    /// A job in an insert failed validation; nothing in that insert was stored.
    #[error("job #{index} is invalid: {errors}")]
    Invalid {
        /// Position of the offending job in the submitted batch.
        index: usize,
        /// Every problem with it.
        errors: ValidationErrors,
    },

    /// The data was refused: a value the database cannot store or a rule it enforces
    /// (Postgres SQLSTATE classes 22, 23 and 54; SQLite's `TOOBIG`, `MISMATCH`, `CHECK` and
    /// `NOT NULL`), or one the store checks itself (a worker's result too deep to read
    /// back). The request is at fault, not the database: the caller gets a `422`, and the
    /// failure never counts against the database's health (breaker, readiness,
    /// leadership), so one tenant's bad input cannot take the service down for the
    /// others. Nothing was written.
    #[error("the data was refused while {context}")]
    Rejected {
        /// What was being attempted.
        context: String,
        /// Why the data was refused (the database's own message, or the store's).
        #[source]
        source: BoxError,
    },

    /// A failure that may succeed if retried (lost connection, pool timeout, lock or
    /// serialisation conflict, database starting up or shutting down).
    #[error("transient store error while {context}")]
    Transient {
        /// What was being attempted.
        context: String,
        /// The underlying cause.
        #[source]
        source: BoxError,
    },

    /// A failure retrying will not fix (schema mismatch, corrupt row, disk full, bug).
    #[error("store error while {context}")]
    Permanent {
        /// What was being attempted.
        context: String,
        /// The underlying cause.
        #[source]
        source: BoxError,
    },

    /// Keel and the database, or what sits in front of it, disagree about how to talk: a
    /// named prepared statement a transaction pooler lost, a startup parameter it refuses.
    /// A configuration error, not an outage: retrying cannot fix it and the database is
    /// not failing, so it never trips the breaker. The message names the setting to change;
    /// it is logged and shown on `/readyz`.
    #[error("misconfigured while {context}")]
    Misconfigured {
        /// What was being attempted.
        context: String,
        /// The database's words, and what to change.
        #[source]
        source: BoxError,
    },

    /// The call was refused without reaching the database, to protect it or the caller:
    /// the circuit breaker is open, or too many calls are already in flight. Nothing was
    /// done; try again after `retry_after`.
    #[error("store unavailable: {reason}")]
    Unavailable {
        /// Why, phrased for an operator ("circuit open", "bulkhead full").
        reason: &'static str,
        /// When trying again makes sense.
        retry_after: std::time::Duration,
    },
}

impl StoreError {
    /// Whether retrying the same operation may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient { .. })
    }

    /// Shorthand for a [`StoreError::Transient`].
    pub fn transient(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Transient {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Shorthand for a [`StoreError::Rejected`].
    pub fn rejected(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Rejected {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Shorthand for a [`StoreError::Misconfigured`].
    pub fn misconfigured(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Misconfigured {
            context: context.into(),
            source: source.into(),
        }
    }

    /// Shorthand for a [`StoreError::Permanent`].
    pub fn permanent(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Permanent {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A short, stable name for the error class, usable as a metric label.
    pub fn class(&self) -> &'static str {
        match self {
            StoreError::NotFound(_) => "not_found",
            StoreError::ScheduleNotFound(..) => "not_found",
            StoreError::NotLeader(_) => "not_leader",
            StoreError::IllegalTransition { .. } => "illegal_transition",
            StoreError::Conflict(_) => "conflict",
            StoreError::StaleLease(_) => "stale_lease",
            StoreError::Invalid { .. } => "invalid",
            StoreError::Rejected { .. } => "rejected",
            StoreError::Transient { .. } => "transient",
            StoreError::Permanent { .. } => "permanent",
            StoreError::Misconfigured { .. } => "misconfigured",
            StoreError::Unavailable { .. } => "unavailable",
        }
    }
}
