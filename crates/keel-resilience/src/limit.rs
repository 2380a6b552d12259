//! An adaptive concurrency limit (G5), after the gradient algorithm of Netflix's
//! concurrency-limits ("Gradient2").
//!
//! A server has a concurrency at which it does the most work with the least queueing.
//! Below it latency is flat; above it every extra request only waits. The limiter keeps two
//! averages of request latency: a short one (what requests take now) and a long one (what
//! they took when the server was not overloaded). Their ratio is the gradient:
//!
//! ```text
//! gradient  = clamp(tolerance × long / short, 0.5, 1.0)
//! new_limit = limit × gradient + sqrt(limit)        (sqrt: room for a small queue)
//! limit     = limit × (1 − smoothing) + new_limit × smoothing
//! ```
//!
//! When latency rises above `tolerance` times its long-term average, the limit shrinks; when
//! latency is flat, the queue term lets it grow. While the server is busy with fewer than
//! half the requests it could admit, the limit does not grow (it has not been tested there).
//! A request above the limit is refused at once: the caller sheds it with `503` and
//! `Retry-After` rather than letting it wait in a queue it cannot see.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// Bounds and tuning of an [`AdaptiveLimit`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveLimitConfig {
    /// The limit before anything is learned.
    pub initial: u32,
    /// The limit never goes below this (so a latency blip cannot shut the door).
    pub min: u32,
    /// Nor above this (a hard cap on concurrent requests, G5).
    pub max: u32,
    /// How much latency may grow over its long-term average before the limit shrinks.
    pub tolerance: f64,
    /// Weight of each new estimate (0..=1]: lower reacts more slowly, and more calmly.
    pub smoothing: f64,
    /// Samples in the long-term latency average.
    pub long_window: u32,
    /// Samples in the short-term latency average.
    pub short_window: u32,
}

impl Default for AdaptiveLimitConfig {
    fn default() -> Self {
        Self {
            initial: 256,
            min: 32,
            max: 2048,
            tolerance: 2.0,
            smoothing: 0.2,
            long_window: 600,
            short_window: 10,
        }
    }
}

impl AdaptiveLimitConfig {
    /// Checks the settings; returns what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.min == 0 || self.min > self.max {
            return Err("min must be at least 1 and at most max".to_owned());
        }
        if !(self.min..=self.max).contains(&self.initial) {
            return Err("initial must lie between min and max".to_owned());
        }
        if self.tolerance < 1.0 {
            return Err("tolerance must be at least 1.0".to_owned());
        }
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err("smoothing must be in (0, 1]".to_owned());
        }
        if self.long_window == 0 || self.short_window == 0 {
            return Err("windows must hold at least one sample".to_owned());
        }
        Ok(())
    }
}

/// An exponential moving average that starts as a plain mean, so its first samples are not
/// dragged towards zero.
#[derive(Debug, Clone, Copy)]
struct Average {
    window: f64,
    count: u32,
    value: f64,
}

impl Average {
    fn new(window: u32) -> Self {
        Self {
            window: f64::from(window),
            count: 0,
            value: 0.0,
        }
    }

    fn add(&mut self, sample: f64) -> f64 {
        self.count = self.count.saturating_add(1);
        let n = f64::from(self.count).min(self.window);
        self.value += (sample - self.value) / n;
        self.value
    }
}

#[derive(Debug)]
struct Inner {
    limit: f64,
    in_flight: u32,
    long: Average,
    short: Average,
}

#[derive(Debug)]
struct Shared {
    config: AdaptiveLimitConfig,
    inner: Mutex<Inner>,
}

/// A shared adaptive limit; clones are the same limit.
#[derive(Debug, Clone)]
pub struct AdaptiveLimit {
    shared: Arc<Shared>,
}

impl AdaptiveLimit {
    /// A limit starting at `config.initial`.
    pub fn new(config: AdaptiveLimitConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                inner: Mutex::new(Inner {
                    limit: f64::from(config.initial),
                    in_flight: 0,
                    long: Average::new(config.long_window),
                    short: Average::new(config.short_window),
                }),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the fields consistent, so a poisoned lock is still usable.
        self.shared
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.lock().limit as u32
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> u32 {
        self.lock().in_flight
    }

    /// Admits a request if fewer than the limit are in flight. The permit measures the
    /// request's latency until [`AdmissionPermit::success`], or leaves it out of the average
    /// when dropped (a request that waits on purpose, or failed for its own reasons).
    pub fn try_acquire(&self) -> Option<AdmissionPermit> {
        let mut inner = self.lock();
        if f64::from(inner.in_flight) >= inner.limit.floor() {
            return None;
        }
        inner.in_flight += 1;
        Some(AdmissionPermit {
            limit: self.clone(),
            started: Instant::now(),
            sample: false,
        })
    }

    fn finish(&self, rtt: Option<Duration>) {
        let config = self.shared.config;
        let mut inner = self.lock();
        let in_flight = inner.in_flight;
        inner.in_flight = in_flight.saturating_sub(1);
        let Some(rtt) = rtt else { return };
        // Microseconds, floored at 1 so a ratio never divides by zero.
        let sample = (rtt.as_secs_f64() * 1e6).max(1.0);
        let short = inner.short.add(sample);
        let mut long = inner.long.add(sample);
        // After a long overload the long average has learned the overloaded latency; let it
        // drift back down quickly once requests are fast again.
        if long / short > 2.0 {
            long *= 0.95;
            inner.long.value = long;
        }
        if f64::from(in_flight) < inner.limit / 2.0 {
            return;
        }
        let gradient = (config.tolerance * long / short).clamp(0.5, 1.0);
        let estimate = inner.limit * gradient + inner.limit.sqrt();
        let next = inner.limit * (1.0 - config.smoothing) + estimate * config.smoothing;
        inner.limit = next.clamp(f64::from(config.min), f64::from(config.max));
    }
}

/// One admitted request. Report [`AdmissionPermit::success`] to feed its latency into the
/// limit; dropping it only frees the slot.
#[derive(Debug)]
pub struct AdmissionPermit {
    limit: AdaptiveLimit,
    started: Instant,
    sample: bool,
}

impl AdmissionPermit {
    /// The request was served normally: its latency is a sample of the server's.
    pub fn success(mut self) {
        self.sample = true;
    }
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        let rtt = self.sample.then(|| self.started.elapsed());
        self.limit.finish(rtt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> AdaptiveLimitConfig {
        AdaptiveLimitConfig {
            initial: 20,
            min: 4,
            max: 100,
            ..AdaptiveLimitConfig::default()
        }
    }

    #[test]
    fn refuses_above_the_limit_and_frees_slots_on_drop() {
        let l = AdaptiveLimit::new(AdaptiveLimitConfig {
            initial: 4,
            min: 4,
            max: 4,
            ..small()
        });
        let held: Vec<_> = (0..4)
            .map(|_| l.try_acquire().expect("below limit"))
            .collect();
        assert!(l.try_acquire().is_none());
        assert_eq!(l.in_flight(), 4);
        drop(held);
        assert_eq!(l.in_flight(), 0);
        assert!(l.try_acquire().is_some());
    }

    /// Runs `n` rounds in which the limiter is kept full and every request takes `rtt`.
    async fn drive(l: &AdaptiveLimit, rounds: usize, rtt: Duration) {
        for _ in 0..rounds {
            let permits: Vec<_> = std::iter::from_fn(|| l.try_acquire()).collect();
            tokio::time::advance(rtt).await;
            for p in permits {
                p.success();
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grows_while_latency_is_flat_and_shrinks_when_it_climbs() {
        let l = AdaptiveLimit::new(small());
        drive(&l, 30, Duration::from_millis(5)).await;
        let grown = l.limit();
        assert!(grown > 20, "flat latency lets the limit grow: {grown}");

        drive(&l, 30, Duration::from_millis(50)).await;
        let shrunk = l.limit();
        assert!(
            shrunk < grown,
            "latency ×10 must lower the limit: {grown} → {shrunk}"
        );
        assert!(shrunk >= 4);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_within_its_bounds() {
        let l = AdaptiveLimit::new(small());
        drive(&l, 300, Duration::from_millis(1)).await;
        assert_eq!(l.limit(), 100);
        drive(&l, 300, Duration::from_secs(1)).await;
        assert!(l.limit() >= 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_server_does_not_grow_its_limit() {
        let l = AdaptiveLimit::new(small());
        for _ in 0..200 {
            let p = l.try_acquire().unwrap();
            tokio::time::advance(Duration::from_millis(1)).await;
            p.success();
        }
        assert_eq!(l.limit(), 20, "one request at a time says nothing about 40");
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = small();
        c.initial = 1000;
        assert!(c.validate().unwrap_err().contains("initial"));
        assert!(AdaptiveLimitConfig::default().validate().is_ok());
    }
}
