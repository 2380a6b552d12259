//! A circuit breaker: stop calling a dependency that keeps failing, fail fast instead, and
//! probe it now and then to notice when it is back.
//!
//! - **Closed**: calls go through. The breaker opens after `consecutive_failures` failures
//!   in a row, or when at least `min_calls` calls in the current `window` failed at a rate of
//!   `failure_rate` or more (a dependency failing every other call never produces a long
//!   streak, but is just as unhealthy).
//! - **Open**: calls are refused at once with [`BreakerOpen`] and the time left, for
//!   `open_for`.
//! - **Half-open**: up to `probes` calls go through; when that many have succeeded the
//!   breaker closes, and the first failure opens it again for another `open_for`.
//!
//! Only the caller knows what counts as a failure (a `404` is the dependency working), so a
//! call holds a [`BreakerPermit`] and reports [`BreakerPermit::success`] or
//! [`BreakerPermit::failure`]; a permit dropped without a verdict (the caller was cancelled)
//! counts as neither. State lives behind a mutex that is never held across an await.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// When a breaker opens and how it recovers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker.
    pub consecutive_failures: u32,
    /// Failure share within one window (0..=1) that opens the breaker...
    pub failure_rate: f64,
    /// ...once the window has seen at least this many calls.
    pub min_calls: u32,
    /// Length of the counting window for the failure rate.
    pub window: Duration,
    /// How long an open breaker refuses calls before it lets probes through.
    pub open_for: Duration,
    /// Successful probes that close a half-open breaker (also the most probes in flight).
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_calls: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(2),
            probes: 3,
        }
    }
}

impl BreakerConfig {
    /// Checks the settings; returns what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.consecutive_failures == 0 {
            return Err("consecutive_failures must be at least 1".to_owned());
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err("failure_rate must be in (0, 1]".to_owned());
        }
        if self.probes == 0 {
            return Err("probes must be at least 1".to_owned());
        }
        if self.window.is_zero() || self.open_for.is_zero() {
            return Err("window and open_for must be longer than zero".to_owned());
        }
        Ok(())
    }
}

/// The breaker's state, as reported by [`CircuitBreaker::state`] and the
/// `keel_circuit_state` gauge (0 closed, 1 half-open, 2 open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused.
    Open,
    /// A few probe calls go through.
    HalfOpen,
}

impl BreakerState {
    /// A stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// A call was refused because the breaker is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit open; retry in {retry_after:?}")]
pub struct BreakerOpen {
    /// When the breaker will let a probe through.
    pub retry_after: Duration,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, succeeded: u32 },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    streak: u32,
    window_start: Instant,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
struct Shared {
    config: BreakerConfig,
    /// The `dependency` label of the gauge, when this breaker is reported.
    dependency: Option<&'static str>,
    inner: Mutex<Inner>,
}

/// A shared circuit breaker; clones are the same breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

impl CircuitBreaker {
    /// A closed breaker that is not reported as a metric (e.g. one per webhook host, whose
    /// names must not become label values).
    pub fn new(config: BreakerConfig) -> Self {
        Self::build(config, None)
    }

    /// A closed breaker reported as `keel_circuit_state{dependency}`.
    pub fn reported(config: BreakerConfig, dependency: &'static str) -> Self {
        let b = Self::build(config, Some(dependency));
        metrics::gauge!("keel_circuit_state", "dependency" => dependency)
            .set(BreakerState::Closed.gauge());
        b
    }

    fn build(config: BreakerConfig, dependency: Option<&'static str>) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                dependency,
                inner: Mutex::new(Inner {
                    phase: Phase::Closed,
                    streak: 0,
                    window_start: Instant::now(),
                    calls: 0,
                    failures: 0,
                }),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves consistent counters (every update is a
        // few integer writes), so a poisoned lock is still usable.
        self.shared
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current state (an open breaker whose time is up reads as half-open).
    pub fn state(&self) -> BreakerState {
        match self.lock().phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if Instant::now() < until => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Asks to make a call: a permit to report the outcome with, or [`BreakerOpen`].
    pub fn try_acquire(&self) -> Result<BreakerPermit, BreakerOpen> {
        let now = Instant::now();
        let mut inner = self.lock();
        let probe = match &mut inner.phase {
            Phase::Closed => false,
            Phase::Open { until } => {
                if now < *until {
                    return Err(BreakerOpen {
                        retry_after: *until - now,
                    });
                }
                inner.phase = Phase::HalfOpen {
                    in_flight: 1,
                    succeeded: 0,
                };
                self.report(BreakerState::HalfOpen);
                true
            }
            Phase::HalfOpen { in_flight, .. } => {
                if *in_flight >= self.shared.config.probes {
                    // Enough probes are out; their verdict comes soon.
                    return Err(BreakerOpen {
                        retry_after: Duration::from_millis(100),
                    });
                }
                *in_flight += 1;
                true
            }
        };
        Ok(BreakerPermit {
            breaker: self.clone(),
            probe,
            done: false,
        })
    }

    fn report(&self, state: BreakerState) {
        if let Some(dep) = self.shared.dependency {
            metrics::gauge!("keel_circuit_state", "dependency" => dep).set(state.gauge());
            metrics::counter!("keel_circuit_transitions_total", "dependency" => dep, "to" => state.as_str())
                .increment(1);
            match state {
                BreakerState::Open => tracing::warn!(dependency = dep, "circuit breaker opened"),
                BreakerState::Closed => tracing::info!(dependency = dep, "circuit breaker closed"),
                BreakerState::HalfOpen => {
                    tracing::info!(dependency = dep, "circuit breaker half-open: probing")
                }
            }
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        inner.phase = Phase::Open {
            until: now + self.shared.config.open_for,
        };
        inner.streak = 0;
        inner.calls = 0;
        inner.failures = 0;
        inner.window_start = now;
        self.report(BreakerState::Open);
    }

    fn record(&self, probe: bool, ok: Option<bool>) {
        let now = Instant::now();
        let config = self.shared.config;
        let mut inner = self.lock();
        if probe {
            if let Phase::HalfOpen {
                in_flight,
                succeeded,
            } = &mut inner.phase
            {
                *in_flight = in_flight.saturating_sub(1);
                match ok {
                    Some(true) => {
                        *succeeded += 1;
                        if *succeeded >= config.probes {
                            inner.phase = Phase::Closed;
                            inner.streak = 0;
                            inner.calls = 0;
                            inner.failures = 0;
                            inner.window_start = now;
                            self.report(BreakerState::Closed);
                        }
                    }
                    Some(false) => self.open(&mut inner, now),
                    None => {}
                }
            }
            return;
        }
        let Some(ok) = ok else { return };
        if !matches!(inner.phase, Phase::Closed) {
            // A call admitted while closed finished after the breaker changed state: the
            // state machine has moved on without it.
            return;
        }
        if now.duration_since(inner.window_start) >= config.window {
            inner.window_start = now;
            inner.calls = 0;
            inner.failures = 0;
        }
        inner.calls += 1;
        if ok {
            inner.streak = 0;
            return;
        }
        inner.failures += 1;
        inner.streak += 1;
        let rate_tripped = inner.calls >= config.min_calls
            && f64::from(inner.failures) >= config.failure_rate * f64::from(inner.calls);
        if inner.streak >= config.consecutive_failures || rate_tripped {
            self.open(&mut inner, now);
        }
    }
}

/// Leave to make one call; report how it went. Dropping it unreported counts as neither
/// success nor failure (and frees a probe slot).
#[derive(Debug)]
pub struct BreakerPermit {
    breaker: CircuitBreaker,
    probe: bool,
    done: bool,
}

impl BreakerPermit {
    /// The call worked (the dependency answered, whatever the answer).
    pub fn success(mut self) {
        self.done = true;
        self.breaker.record(self.probe, Some(true));
    }

    /// The dependency failed.
    pub fn failure(mut self) {
        self.done = true;
        self.breaker.record(self.probe, Some(false));
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.probe, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_calls: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(1),
            probes: 2,
        }
    }

    fn fail(b: &CircuitBreaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().expect("closed").failure();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_a_streak_then_probes_and_closes() {
        let b = CircuitBreaker::new(config());
        fail(&b, 2);
        b.try_acquire().unwrap().success();
        fail(&b, 2);
        assert_eq!(b.state(), BreakerState::Closed, "the streak was broken");
        fail(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        let refused = b.try_acquire().unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));

        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let p1 = b.try_acquire().expect("first probe");
        let p2 = b.try_acquire().expect("second probe");
        assert!(b.try_acquire().is_err(), "only two probes at a time");
        p1.success();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        p2.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_period() {
        let b = CircuitBreaker::new(config());
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(1)).await;
        b.try_acquire().expect("probe").failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.try_acquire().unwrap_err().retry_after,
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_frees_its_slot_without_a_verdict() {
        let b = CircuitBreaker::new(config());
        fail(&b, 3);
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(b.try_acquire().expect("probe"));
        drop(b.try_acquire().expect("probe"));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.try_acquire().unwrap().success();
        b.try_acquire().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_high_failure_rate_opens_without_a_streak() {
        let b = CircuitBreaker::new(config());
        // Alternating failures never reach a streak of 3, but half of 10 calls failed.
        for i in 0..10 {
            let p = b.try_acquire().expect("closed");
            if i % 2 == 1 { p.failure() } else { p.success() }
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_window_forgets_old_calls() {
        let b = CircuitBreaker::new(config());
        for i in 0..9 {
            let p = b.try_acquire().unwrap();
            if i % 2 == 0 { p.failure() } else { p.success() }
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        // A new window: one more failure is 1 of 1, below min_calls.
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = config();
        c.failure_rate = 0.0;
        assert!(c.validate().unwrap_err().contains("failure_rate"));
        assert!(BreakerConfig::default().validate().is_ok());
    }
}
