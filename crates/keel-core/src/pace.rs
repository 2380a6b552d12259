//! How far ahead a worker leases: enough jobs to keep its slots busy through the next lease
//! round trip, and no more. Shared by the built-in dispatchers and the Rust SDK worker
//! (the Python and TypeScript workers follow the same rule).
//!
//! A fixed buffer is wrong one way or the other: short jobs drain a small one long before
//! the next lease answers (slots idle on the database), and long jobs sit in a large one
//! for minutes while other workers have free slots. So the buffer follows what the slots
//! consume: jobs started per second × the lease round trip, with a margin of
//! [`Pace::MARGIN`] round trips, between one job and the configured cap. Noop jobs on 20
//! slots buffer dozens; ten-second jobs buffer one.
//!
//! The rate is measured over windows of [`Pace::WINDOW`], so after an idle spell it lags a
//! burst by several windows, and slots starve meanwhile: 64 producers starting at once on a
//! queue of 8 workers waited up to 120 ms for their jobs to start in the first 400 ms,
//! and never more than 20 ms after. So while leases come back full to slots that have run
//! out of work, a floor under the prefetch doubles at each lease (as TCP's slow start
//! doubles its window), reaching the cap in eight round trips; once the slots have work
//! when a lease answers, or a lease brings fewer jobs than asked, it halves.
//!
//! Pure: the caller passes the time in, so the arithmetic is tested without a clock.

use std::time::{Duration, Instant};

/// The pace of one queue's worker slots, and the prefetch it calls for.
#[derive(Debug, Clone)]
pub struct Pace {
    cap: usize,
    /// Jobs started since `since`.
    count: u64,
    since: Instant,
    /// Jobs started per second (moving average).
    rate: f64,
    /// A lease's round trip in seconds (moving average).
    rtt: f64,
    /// The slow-start floor (see the module docs).
    floor: usize,
}

impl Pace {
    /// Round trips' worth of jobs kept buffered.
    pub const MARGIN: f64 = 4.0;
    /// Shortest window over which the start rate is measured.
    pub const WINDOW: Duration = Duration::from_millis(50);

    /// A pace that has seen nothing yet, buffering at most `cap` jobs (0: no prefetch).
    pub fn new(cap: usize, now: Instant) -> Self {
        Self {
            cap,
            count: 0,
            since: now,
            rate: 0.0,
            rtt: 0.001,
            floor: 0,
        }
    }

    /// Records `n` jobs started at `now`.
    pub fn started(&mut self, n: usize, now: Instant) {
        self.count += n as u64;
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= Self::WINDOW {
            let current = self.count as f64 / elapsed.as_secs_f64();
            // A long quiet window replaces the average outright: a queue that went idle
            // should not keep a large buffer for its next burst's first leases.
            let keep = if elapsed >= Self::WINDOW * 4 {
                0.0
            } else {
                0.5
            };
            self.rate = keep * self.rate + (1.0 - keep) * current;
            self.count = 0;
            self.since = now;
        }
    }

    /// Records a lease call that took `took`.
    pub fn leased(&mut self, took: Duration) {
        self.rtt = 0.8 * self.rtt + 0.2 * took.as_secs_f64();
    }

    /// Records how a lease answered: `full` when it brought every job it asked for (more
    /// may be waiting), `starving` when the slots had run out of buffered work by then.
    /// Both: the slow-start floor doubles. Otherwise it halves.
    pub fn answered(&mut self, full: bool, starving: bool) {
        self.floor = if full && starving {
            (self.floor * 2).clamp(1, self.cap.max(1))
        } else {
            self.floor / 2
        };
    }

    /// Jobs to hold beyond the slots right now: 0 without prefetch, else 1..=cap.
    pub fn prefetch(&self) -> usize {
        if self.cap == 0 {
            return 0;
        }
        let want = (self.rate * self.rtt * Self::MARGIN).ceil() as usize;
        want.max(self.floor).clamp(1, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starving_slots_double_the_floor_up_to_the_cap_and_work_in_hand_halves_it() {
        let t0 = Instant::now();
        let mut p = Pace::new(256, t0);
        assert_eq!(p.prefetch(), 1, "nothing measured yet");
        let mut seen = Vec::new();
        for _ in 0..10 {
            p.answered(true, true);
            seen.push(p.prefetch());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 64, 128, 256, 256]);
        p.answered(true, false);
        assert_eq!(p.prefetch(), 128, "the slots had work: halve");
        p.answered(false, true);
        assert_eq!(
            p.prefetch(),
            64,
            "fewer jobs than asked: no backlog to chase"
        );
        for _ in 0..10 {
            p.answered(false, false);
        }
        assert_eq!(p.prefetch(), 1, "back to the measured pace");
        let mut off = Pace::new(0, t0);
        off.answered(true, true);
        assert_eq!(off.prefetch(), 0, "no prefetch stays no prefetch");
    }

    #[test]
    fn short_jobs_buffer_more_than_long_ones_within_the_cap() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // 20 000 jobs/s with 2 ms leases: 20 000 × 0.002 × 4 = 160.
        let mut fast = Pace::new(256, t0);
        for i in 1..=10 {
            fast.leased(Duration::from_millis(2));
            fast.started(1000, ms(50 * i));
        }
        assert!(
            (120..=200).contains(&fast.prefetch()),
            "{}",
            fast.prefetch()
        );
        // The cap bounds it.
        let mut capped = fast.clone();
        capped.cap = 64;
        assert_eq!(capped.prefetch(), 64);
        // 2 jobs/s: one job is enough.
        let mut slow = Pace::new(256, t0);
        slow.leased(Duration::from_millis(2));
        slow.started(1, ms(500));
        assert_eq!(slow.prefetch(), 1);
        // Off means off.
        assert_eq!(Pace::new(0, t0).prefetch(), 0);
    }

    #[test]
    fn an_idle_spell_forgets_the_old_rate() {
        let t0 = Instant::now();
        let mut p = Pace::new(256, t0);
        p.leased(Duration::from_millis(5));
        p.started(2000, t0 + Duration::from_millis(100));
        assert!(p.prefetch() > 50);
        p.started(0, t0 + Duration::from_secs(10));
        assert_eq!(p.prefetch(), 1);
    }
}
