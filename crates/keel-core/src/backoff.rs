//! How long a failed job waits before its next attempt.
//!
//! The default is capped exponential backoff with *full jitter*: the delay before attempt
//! `n + 1` is drawn uniformly from `[0, min(cap, base · 2^(n-1))]`. Full jitter spreads a burst
//! of jobs that failed together (a dependency went down) across the whole window instead of
//! retrying them in lockstep, which is what lets the dependency recover (see the AWS
//! architecture blog, "Exponential Backoff And Jitter").

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Default first retry window: up to 1 s after the first failure.
pub const DEFAULT_BASE: Duration = Duration::from_secs(1);
/// Default ceiling: no retry waits more than an hour. With the default 25 attempts a job
/// keeps retrying for roughly a day (about half of it in expectation) before it is discarded.
pub const DEFAULT_CAP: Duration = Duration::from_secs(3600);

/// A retry delay policy, stored with each job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Backoff {
    /// Capped exponential growth with full jitter.
    Exponential {
        /// Upper bound of the first window, in milliseconds.
        base_ms: u64,
        /// Upper bound of every window, in milliseconds.
        cap_ms: u64,
    },
    /// The same delay every time, without jitter (useful for polling-style jobs and tests).
    Fixed {
        /// The delay, in milliseconds.
        delay_ms: u64,
    },
}

impl Default for Backoff {
    fn default() -> Self {
        Self::Exponential {
            base_ms: DEFAULT_BASE.as_millis() as u64,
            cap_ms: DEFAULT_CAP.as_millis() as u64,
        }
    }
}

impl Backoff {
    /// The most a delay may be configured to: a week. Longer and the job is better off
    /// scheduled explicitly.
    pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);

    /// The upper bound of the window after `attempt` failed attempts (`attempt >= 1`).
    /// A delay drawn by [`Backoff::delay`] never exceeds it.
    pub fn window(&self, attempt: u32) -> Duration {
        match *self {
            Backoff::Exponential { base_ms, cap_ms } => {
                let exp = attempt.saturating_sub(1).min(63);
                let grown = base_ms.saturating_mul(1u64 << exp);
                Duration::from_millis(grown.min(cap_ms))
            }
            Backoff::Fixed { delay_ms } => Duration::from_millis(delay_ms),
        }
    }

    /// The delay before the next attempt after `attempt` attempts have failed, with jitter
    /// drawn from `rng`. Resolution is a microsecond (what the stores keep).
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        match self {
            Backoff::Exponential { .. } => {
                let window = self.window(attempt).as_micros() as u64;
                Duration::from_micros(rng.random_range(0..=window))
            }
            Backoff::Fixed { .. } => self.window(attempt),
        }
    }

    /// Checks the configured bounds; returns a message naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let max = Self::MAX.as_millis() as u64;
        match *self {
            Backoff::Exponential { base_ms, cap_ms } => {
                // A cap below the base is well defined (every window is the cap), so it
                // is not refused: only bounds a schema can state are.
                if base_ms == 0 {
                    return Err("base_ms must be at least 1".into());
                }
                if base_ms > max {
                    return Err(format!("base_ms must be at most {max} (a week)"));
                }
                if cap_ms > max {
                    return Err(format!("cap_ms must be at most {max} (a week)"));
                }
            }
            Backoff::Fixed { delay_ms } => {
                if delay_ms > max {
                    return Err(format!("delay_ms must be at most {max} (a week)"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn exp(base_ms: u64, cap_ms: u64) -> Backoff {
        Backoff::Exponential { base_ms, cap_ms }
    }

    #[test]
    fn window_doubles_then_caps() {
        let b = exp(1000, 10_000);
        let w: Vec<u64> = (1..=6).map(|a| b.window(a).as_millis() as u64).collect();
        assert_eq!(w, [1000, 2000, 4000, 8000, 10_000, 10_000]);
    }

    #[test]
    fn default_is_documented_policy() {
        assert_eq!(Backoff::default(), exp(1000, 3_600_000));
        assert_eq!(Backoff::default().window(1), DEFAULT_BASE);
        assert_eq!(Backoff::default().window(25), DEFAULT_CAP);
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(exp(0, 10).validate().unwrap_err().contains("base_ms"));
        assert!(
            exp(1, u64::MAX / 2)
                .validate()
                .unwrap_err()
                .contains("cap_ms")
        );
        // A cap under the base is allowed: every window is the cap.
        assert!(exp(10, 5).validate().is_ok());
        assert_eq!(exp(10, 5).window(1), Duration::from_millis(5));
        assert!(exp(1, u64::MAX).validate().unwrap_err().contains("a week"));
        assert!(Backoff::Fixed { delay_ms: 5 }.validate().is_ok());
    }

    #[test]
    fn jitter_spreads_over_the_window() {
        // Full jitter: over many draws we see both the low and the high end of the window.
        let b = exp(1000, 60_000);
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<Duration> = (0..2000).map(|_| b.delay(4, &mut rng)).collect();
        let window = b.window(4);
        assert!(draws.iter().any(|d| *d < window / 10));
        assert!(draws.iter().any(|d| *d > window * 9 / 10));
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_window_or_cap(
            base in 1u64..100_000,
            extra in 0u64..10_000_000,
            attempt in 1u32..10_000,
            seed in any::<u64>(),
        ) {
            let b = exp(base, base + extra);
            let mut rng = StdRng::seed_from_u64(seed);
            let d = b.delay(attempt, &mut rng);
            prop_assert!(d <= b.window(attempt));
            prop_assert!(d <= Duration::from_millis(base + extra));
        }

        #[test]
        fn window_is_monotonic(base in 1u64..100_000, extra in 0u64..10_000_000, attempt in 1u32..200) {
            let b = exp(base, base + extra);
            prop_assert!(b.window(attempt) <= b.window(attempt + 1));
        }

        #[test]
        fn fixed_is_exact(delay in 0u64..1_000_000, attempt in 1u32..100, seed in any::<u64>()) {
            let b = Backoff::Fixed { delay_ms: delay };
            let mut rng = StdRng::seed_from_u64(seed);
            prop_assert_eq!(b.delay(attempt, &mut rng), Duration::from_millis(delay));
        }
    }
}
