//! The arithmetic of a benchmark report: latency distributions (HDR histograms, so a p999
//! over millions of samples costs a few kilobytes and no sorting) and the median and spread
//! of a figure over several runs.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Largest latency recorded exactly: one minute, in microseconds. Anything slower is clamped
/// to it (saturating), which only matters for a request that hung past every timeout.
const MAX_TRACKED_US: u64 = 60_000_000;
/// Three significant digits: a recorded value is within 0.1 % of the true one.
const SIGNIFICANT_DIGITS: u8 = 3;

/// A latency distribution in microseconds.
#[derive(Debug, Clone)]
pub(crate) struct Latency(Histogram<u64>);

impl Latency {
    /// An empty distribution covering 1 µs to one minute.
    pub(crate) fn new() -> Self {
        // The bounds are constants that hdrhistogram accepts (low ≥ 1, high ≥ 2·low, sigfig
        // ≤ 5), so construction cannot fail.
        Self(
            Histogram::new_with_bounds(1, MAX_TRACKED_US, SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid"),
        )
    }

    /// Records one observation.
    pub(crate) fn record(&mut self, d: Duration) {
        self.record_us(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Records one observation given in microseconds (0 is kept as 1 µs: the histogram's
    /// floor, and below any resolution the sources have).
    pub(crate) fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    /// Adds every observation of `other`.
    pub(crate) fn merge(&mut self, other: &Latency) {
        // Both sides have the same bounds, so adding cannot go out of range; saturate anyway
        // rather than fail a report over it.
        if self.0.add(&other.0).is_err() {
            for v in other.0.iter_recorded() {
                self.0
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// How many observations.
    pub(crate) fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q` quantile (0 ≤ q ≤ 1) in milliseconds, or `None` without observations.
    pub(crate) fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.0.value_at_quantile(q) as f64 / 1000.0)
    }

    /// The largest observation in milliseconds.
    pub(crate) fn max_ms(&self) -> Option<f64> {
        if self.0.is_empty() {
            return None;
        }
        Some(self.0.max() as f64 / 1000.0)
    }
}

/// A figure over several runs: the median is what the report quotes (SPEC §7: medians of 3),
/// min and max show how much the runs disagreed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Spread {
    /// Middle value; the mean of the two middle ones for an even count.
    pub(crate) median: f64,
    /// Smallest value.
    pub(crate) min: f64,
    /// Largest value.
    pub(crate) max: f64,
    /// How many runs produced the figure.
    pub(crate) n: usize,
}

impl Spread {
    /// The spread of `values`, ignoring NaN; `None` when nothing is left.
    pub(crate) fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// Bytes in a mebibyte, for RSS figures read in KiB.
pub(crate) const KIB_PER_MIB: f64 = 1024.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert_eq!(Spread::of(&[7.0]).unwrap().median, 7.0);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN, 5.0]).unwrap().n, 1);
    }

    #[test]
    fn quantiles_are_within_the_histogram_precision() {
        let mut l = Latency::new();
        // 1 ms … 100 ms, one sample each: p50 ≈ 50 ms, p99 ≈ 99 ms.
        for ms in 1..=100u64 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.count(), 100);
        let p50 = l.quantile_ms(0.5).unwrap();
        let p99 = l.quantile_ms(0.99).unwrap();
        assert!((p50 - 50.0).abs() <= 0.05, "p50 = {p50}");
        assert!((p99 - 99.0).abs() <= 0.1, "p99 = {p99}");
        assert!((l.max_ms().unwrap() - 100.0).abs() <= 0.1);
        assert_eq!(Latency::new().quantile_ms(0.5), None);
    }

    #[test]
    fn merging_adds_counts_and_out_of_range_values_saturate() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        a.record_us(0);
        b.record(Duration::from_secs(3600));
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert!(a.max_ms().unwrap() >= 59_000.0);
        assert!(a.quantile_ms(0.0).unwrap() <= 0.002);
    }
}
