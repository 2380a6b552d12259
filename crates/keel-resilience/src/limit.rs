//! An adaptive concurrency limit (G5), after the gradient algorithm of Netflix's
//! concurrency-limits ("Gradient2").
//!
//! A server has a concurrency at which it does the most work with the least queueing.
//! Below it latency is flat; above it every extra request only waits. The limiter collects
//! request latencies in short sampling windows (`sample_window`, at least
//! `min_window_samples` requests); each window's mean is the *short* latency (what requests
//! take now), and a moving average over `long_window` windows — about a minute — is the
//! *long* one (what they took before the load changed). Averaging over windows rather than
//! requests matters: at thousands of requests a second a per-request average would forget
//! the unloaded latency within a fraction of a second, and the limit would follow the
//! overload up instead of holding it back. Their ratio is the gradient:
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
//! A request above the limit may wait briefly for a slot ([`AdaptiveLimit::acquire`]): a
//! bounded number of waiters, each for a bounded time, after which it is refused and the
//! caller sheds it with `503` and `Retry-After`. The short wait is what keeps goodput up
//! under overload: a waiting request costs no CPU and holds its client back, while every
//! refusal costs a response and invites an immediate retry — refusing everything above the
//! limit at once spends the CPU the admitted requests need on saying no, their latency
//! climbs, the limit falls, and more is refused.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
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
    /// Sampling windows in the long-term latency average.
    pub long_window: u32,
    /// Shortest sampling window: the limit is updated at most this often.
    pub sample_window: Duration,
    /// Fewest requests in a sampling window (a window stays open until it has them).
    pub min_window_samples: u32,
    /// Longest a request waits for a slot before it is refused (zero: refuse at once).
    pub max_wait: Duration,
    /// Most requests waiting for a slot at once; beyond it requests are refused at once.
    pub max_waiting: u32,
}

impl Default for AdaptiveLimitConfig {
    fn default() -> Self {
        Self {
            initial: 256,
            min: 32,
            max: 2048,
            tolerance: 3.0,
            smoothing: 0.2,
            long_window: 600,
            sample_window: Duration::from_millis(100),
            min_window_samples: 10,
            max_wait: Duration::from_millis(250),
            max_waiting: 4096,
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
        if self.long_window == 0 || self.min_window_samples == 0 {
            return Err("windows must hold at least one sample".to_owned());
        }
        Ok(())
    }
}

/// An exponential moving average over about `window` samples (factor `2 / (window + 1)`),
/// which starts as a plain mean for its first [`Average::WARMUP`] samples so that it is not
/// dragged towards zero at the start.
#[derive(Debug, Clone, Copy)]
struct Average {
    factor: f64,
    count: u32,
    value: f64,
}

impl Average {
    const WARMUP: u32 = 10;

    fn new(window: u32) -> Self {
        Self {
            factor: 2.0 / (f64::from(window) + 1.0),
            count: 0,
            value: 0.0,
        }
    }

    fn add(&mut self, sample: f64) -> f64 {
        if self.count < Self::WARMUP {
            self.count += 1;
            self.value += (sample - self.value) / f64::from(self.count);
        } else {
            self.value += (sample - self.value) * self.factor;
        }
        self.value
    }
}

/// The sampling window being filled.
#[derive(Debug)]
struct Window {
    started: Instant,
    /// Sum of the latencies in it, microseconds.
    sum_us: f64,
    samples: u32,
    /// Most requests in flight at once during it: whether the limit was actually tested.
    peak_in_flight: u32,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            sum_us: 0.0,
            samples: 0,
            peak_in_flight: 0,
        }
    }
}

#[derive(Debug)]
struct Inner {
    limit: f64,
    in_flight: u32,
    long: Average,
    window: Window,
}

#[derive(Debug)]
struct Shared {
    config: AdaptiveLimitConfig,
    inner: Mutex<Inner>,
    /// Woken (one waiter) whenever a slot is freed.
    released: Notify,
    /// Requests waiting in [`AdaptiveLimit::acquire`].
    waiting: AtomicU32,
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
                    window: Window::new(Instant::now()),
                }),
                released: Notify::new(),
                waiting: AtomicU32::new(0),
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
        inner.window.peak_in_flight = inner.window.peak_in_flight.max(inner.in_flight);
        Some(AdmissionPermit {
            limit: self.clone(),
            started: Instant::now(),
            sample: false,
        })
    }

    /// [`AdaptiveLimit::try_acquire`], or else waits up to `max_wait` for a slot, unless
    /// `max_waiting` requests are waiting already. `None` means refused.
    pub async fn acquire(&self) -> Option<AdmissionPermit> {
        let max_wait = self.shared.config.max_wait;
        if let Some(p) = self.try_acquire() {
            return Some(p);
        }
        let shared = &self.shared;
        if max_wait.is_zero()
            || shared.waiting.fetch_add(1, Ordering::AcqRel) >= shared.config.max_waiting
        {
            if !max_wait.is_zero() {
                shared.waiting.fetch_sub(1, Ordering::AcqRel);
            }
            return None;
        }
        let _waiting = Waiting(&shared.waiting);
        let deadline = Instant::now() + max_wait;
        loop {
            // Registered before the check, so a slot freed in between is not missed.
            let released = shared.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(p) = self.try_acquire() {
                return Some(p);
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return self.try_acquire();
            }
        }
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> u32 {
        self.shared.waiting.load(Ordering::Acquire)
    }

    fn finish(&self, rtt: Option<Duration>) {
        let config = self.shared.config;
        let mut inner = self.lock();
        inner.in_flight = inner.in_flight.saturating_sub(1);
        // Only a waiter needs the wakeup; without one, `notify_one` would store a permit that
        // makes the next waiter's first wait return at once for nothing.
        if self.shared.waiting.load(Ordering::Acquire) > 0 {
            self.shared.released.notify_one();
        }
        let Some(rtt) = rtt else { return };
        // Microseconds, floored at 1 so a ratio never divides by zero.
        inner.window.sum_us += (rtt.as_secs_f64() * 1e6).max(1.0);
        inner.window.samples += 1;
        let now = Instant::now();
        if inner.window.samples < config.min_window_samples
            || now.duration_since(inner.window.started) < config.sample_window
        {
            return;
        }
        let window = std::mem::replace(&mut inner.window, Window::new(now));
        let short = window.sum_us / f64::from(window.samples);
        let mut long = inner.long.add(short);
        // After a long overload the long average has learned the overloaded latency; let it
        // drift back down quickly once requests are fast again.
        if long / short > 2.0 {
            long *= 0.95;
            inner.long.value = long;
        }
        if f64::from(window.peak_in_flight) < inner.limit / 2.0 {
            // The server was never near its limit: nothing was learned about it.
            return;
        }
        let gradient = (config.tolerance * long / short).clamp(0.5, 1.0);
        let estimate = inner.limit * gradient + inner.limit.sqrt();
        let next = inner.limit * (1.0 - config.smoothing) + estimate * config.smoothing;
        inner.limit = next.clamp(f64::from(config.min), f64::from(config.max));
    }
}

/// Counts a waiter out however its wait ends (slot, timeout, or the caller giving up).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
        // 10 s of 5 ms requests: 100 sampling windows.
        drive(&l, 2000, Duration::from_millis(5)).await;
        let grown = l.limit();
        assert!(grown > 20, "flat latency lets the limit grow: {grown}");

        // 10× the latency for 3 s. (Kept up for a minute or more, a new latency becomes the
        // baseline: the long average follows it, as it should for a lasting change.)
        drive(&l, 60, Duration::from_millis(50)).await;
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
        drive(&l, 30_000, Duration::from_millis(1)).await;
        assert_eq!(l.limit(), 100);
        drive(&l, 300, Duration::from_secs(1)).await;
        assert!(l.limit() >= 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_server_does_not_grow_its_limit() {
        let l = AdaptiveLimit::new(small());
        for _ in 0..2000 {
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

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_next_free_slot_and_a_late_one_is_refused() {
        let l = AdaptiveLimit::new(AdaptiveLimitConfig {
            initial: 1,
            min: 1,
            max: 1,
            max_wait: Duration::from_millis(100),
            max_waiting: 1,
            ..AdaptiveLimitConfig::default()
        });
        let held = l.acquire().await.expect("free slot");
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.acquire().await.is_some() }
        });
        while l.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        // The queue holds one waiter: a second is refused at once.
        let started = Instant::now();
        assert!(l.acquire().await.is_none());
        assert_eq!(started.elapsed(), Duration::ZERO);
        tokio::time::advance(Duration::from_millis(50)).await;
        drop(held);
        assert!(waiter.await.unwrap(), "the waiter gets the freed slot");
        assert_eq!(l.waiting(), 0);

        // Nobody frees the slot: the wait ends at its bound, refused.
        let _held = l.acquire().await.expect("free slot");
        let started = Instant::now();
        assert!(l.acquire().await.is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert_eq!(l.waiting(), 0);
    }

    /// The failure this design avoids: at thousands of requests a second, a long average
    /// kept per request would learn an overload's latency within a second and stop
    /// holding the limit back.
    #[tokio::test(start_paused = true)]
    async fn a_sustained_overload_keeps_the_limit_down() {
        let l = AdaptiveLimit::new(AdaptiveLimitConfig {
            initial: 64,
            min: 4,
            max: 1000,
            ..AdaptiveLimitConfig::default()
        });
        drive(&l, 1000, Duration::from_millis(2)).await;
        let before = l.limit();
        // Latency ×20 for 3 s: every round fills the limit.
        drive(&l, 75, Duration::from_millis(40)).await;
        let during = l.limit();
        assert!(
            during < before / 2,
            "the limit must fall well below its unloaded level: {before} → {during}"
        );
    }
}
