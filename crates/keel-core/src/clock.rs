//! Time as the store and runtime see it.
//!
//! Every time-dependent decision (is a lease expired, is a scheduled job due, when does a
//! retry run) reads a [`Clock`] handed in at construction, never `Utc::now()` directly, so
//! tests move time forward with [`ManualClock`] instead of sleeping. Timestamps are kept at
//! microsecond precision because that is what Postgres `timestamptz` stores: a value read
//! back from either backend compares equal to the value written.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

/// A point in time, UTC, microsecond precision.
pub type Timestamp = DateTime<Utc>;

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time, truncated to microseconds.
    fn now(&self) -> Timestamp;
}

/// The wall clock. Replicas sharing a Postgres database compare lease expiries written by
/// each other, so their clocks must be synchronised (NTP); lease durations are tens of
/// seconds, far above ordinary skew.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        truncate_micros(Utc::now())
    }
}

/// A clock that only moves when told to. Cloning shares the same instant.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<Timestamp>>,
}

impl ManualClock {
    /// A clock stopped at `start` (truncated to microseconds).
    pub fn new(start: Timestamp) -> Self {
        Self {
            now: Arc::new(Mutex::new(truncate_micros(start))),
        }
    }

    /// A clock stopped at the current wall-clock time.
    pub fn starting_now() -> Self {
        Self::new(Utc::now())
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now = truncate_micros(*now + to_delta(by));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Drops sub-microsecond precision so the value survives a round trip through Postgres.
/// Timestamps too far out for chrono's nanosecond arithmetic (outside about 1677–2262) are
/// returned unchanged; validation keeps such values away from storage anyway.
pub fn truncate_micros(t: Timestamp) -> Timestamp {
    t.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(t)
}

/// Converts a std duration to a chrono delta, saturating at the largest representable delta
/// (durations reaching this far are rejected by validation long before).
pub fn to_delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

/// Microseconds since the Unix epoch: the form SQLite stores timestamps in.
pub fn to_micros(t: Timestamp) -> i64 {
    t.timestamp_micros()
}

/// The inverse of [`to_micros`]; `None` for values outside chrono's range.
pub fn from_micros(us: i64) -> Option<Timestamp> {
    DateTime::from_timestamp_micros(us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::starting_now();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now() - t0, TimeDelta::milliseconds(1500));
    }

    #[test]
    fn far_timestamps_do_not_panic() {
        let far = DateTime::parse_from_rfc3339("2999-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(truncate_micros(far), far);
    }

    #[test]
    fn micros_round_trip() {
        let t = SystemClock.now();
        assert_eq!(from_micros(to_micros(t)), Some(t));
    }
}
