//! Unique jobs: at most one job per key and scope in a tenant, enforced by the database.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{JobState, duration_ms};
use crate::clock::Timestamp;

/// How long a unique job holds its key (see [`Unique`]). The database enforces it: two
/// inserts of the same key in the same tenant, from any number of replicas at the same
/// instant, create one job; the other insert gets that job back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UniqueScope {
    /// Until the job first starts: the lease releases the key for good (a later retry of
    /// the job does not take it back), so the same key can be enqueued again as soon as
    /// the pending job runs (a "debounce" of pending work).
    Queued,
    /// Until the job finishes: waiting or `running`. The usual "one at a time" guard.
    Active,
    /// For one window of this length, aligned to the Unix epoch, whatever the job's state:
    /// at most one job per key per window (River's `ByPeriod`).
    Period(#[serde(with = "duration_ms")] Duration),
}

impl UniqueScope {
    /// Shortest period of [`UniqueScope::Period`].
    pub const MIN_PERIOD: Duration = Duration::from_secs(1);
    /// Longest period of [`UniqueScope::Period`].
    pub const MAX_PERIOD: Duration = Duration::from_secs(366 * 24 * 3600);

    /// The scope's kind, as stored next to the key.
    pub fn kind(&self) -> UniqueScopeKind {
        match self {
            UniqueScope::Queued => UniqueScopeKind::Queued,
            UniqueScope::Active => UniqueScopeKind::Active,
            UniqueScope::Period(_) => UniqueScopeKind::Period,
        }
    }
}

/// Which states hold a unique key: what the stores index (`unique_scope` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UniqueScopeKind {
    /// `scheduled`, `available`, `retryable` — until the first lease, which clears the key.
    Queued,
    /// Those and `running`.
    Active,
    /// Every state (the key carries its window).
    Period,
}

impl UniqueScopeKind {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            UniqueScopeKind::Queued => "queued",
            UniqueScopeKind::Active => "active",
            UniqueScopeKind::Period => "period",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(UniqueScopeKind::Queued),
            "active" => Some(UniqueScopeKind::Active),
            "period" => Some(UniqueScopeKind::Period),
            _ => None,
        }
    }

    /// Whether a job in `state` that still has its key holds it under this scope (a
    /// `queued` job loses its key when first leased, see [`UniqueScope::Queued`]).
    pub fn holds_in(self, state: JobState) -> bool {
        use JobState::*;
        match self {
            UniqueScopeKind::Queued => matches!(state, Scheduled | Available | Retryable),
            UniqueScopeKind::Active => matches!(state, Scheduled | Available | Retryable | Running),
            UniqueScopeKind::Period => true,
        }
    }
}

/// An optional uniqueness constraint on a new job (Oban's `unique`, River's `UniqueOpts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unique {
    /// The caller's key, 1..=[`Unique::MAX_KEY_LEN`] characters, none of them control characters,
    /// scoped per tenant.
    pub key: String,
    /// How long the key is held.
    pub scope: UniqueScope,
}

impl Unique {
    /// Longest key, in characters (JSON Schema counts characters, so the limit is one a client can check).
    pub const MAX_KEY_LEN: usize = 255;

    /// The key as stored at insert time `now`: the caller's key, plus for a period scope the
    /// start of the window `now` falls in (Unix milliseconds), so each window has its own
    /// key and one unique index serves every scope.
    pub fn stored_key(&self, now: Timestamp) -> String {
        match self.scope {
            UniqueScope::Period(period) => {
                let p = period.as_millis().max(1) as i64;
                let window = now.timestamp_millis().div_euclid(p) * p;
                format!("{}@{window}", self.key)
            }
            UniqueScope::Queued | UniqueScope::Active => self.key.clone(),
        }
    }

    pub(super) fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let chars = self.key.chars().count();
        if chars == 0 || chars > Self::MAX_KEY_LEN {
            out.push((
                "unique.key",
                format!("must be 1 to {} characters, got {chars}", Self::MAX_KEY_LEN),
            ));
        } else if self.key.chars().any(char::is_control) {
            out.push((
                "unique.key",
                "must not contain control characters".to_owned(),
            ));
        }
        if let UniqueScope::Period(p) = self.scope
            && (p < UniqueScope::MIN_PERIOD || p > UniqueScope::MAX_PERIOD)
        {
            out.push((
                "unique.period",
                format!(
                    "must be between {} s and {} days, got {} ms",
                    UniqueScope::MIN_PERIOD.as_secs(),
                    UniqueScope::MAX_PERIOD.as_secs() / 86_400,
                    p.as_millis()
                ),
            ));
        }
        out
    }
}

/// The unique key a stored job holds (while its state is one [`UniqueScopeKind::holds_in`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UniqueHold {
    /// The stored key ([`Unique::stored_key`]).
    pub key: String,
    /// Which states hold it.
    pub scope: UniqueScopeKind,
}
