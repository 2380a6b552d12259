//! Per-host protection state of the webhook executor: a circuit breaker, a concurrency
//! limit and an optional rate limit for each target host (scheme, host and port).
//!
//! Each host's state is its own: waiting on one host's semaphore or limiter touches nothing
//! another host's jobs need. The only shared piece is the table that maps a host to its
//! state, behind a mutex held for one hash lookup and never across an await.
//!
//! Job authors choose the URLs, so the set of hosts is unbounded; the table is not (G5).
//! When it is full, the hosts idle past `host_idle` and the least recently used eighth of
//! the rest are forgotten in one pass, so a full table is scanned once per `max_hosts / 8`
//! new hosts rather than on every one. Hosts with a request in flight are never forgotten
//! (their limits would silently double), so the table holds at most `max_hosts` plus the
//! hosts of the jobs running right now.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use keel_resilience::{BreakerConfig, BreakerState, CircuitBreaker};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::HostRateLimit;
use crate::telemetry;

/// What every host gets, and how many hosts are kept.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) breaker: BreakerConfig,
    pub(super) concurrency: usize,
    pub(super) rate: Option<HostRateLimit>,
    pub(super) max_hosts: usize,
    pub(super) idle: Duration,
}

/// `Host::tracking`: whether this host is counted in [`Hosts::open_hosts`].
const CLOSED: u8 = 0;
const OPEN: u8 = 1;
/// Dropped from the table: never counted again (a job still holding it may report).
const FORGOTTEN: u8 = 2;

/// The protection state of one host.
#[derive(Debug)]
pub(super) struct Host {
    /// Refuses requests while the host keeps failing. Unreported: host names must not
    /// become metric labels.
    pub(super) breaker: CircuitBreaker,
    /// One permit per request in flight to this host.
    pub(super) slots: Arc<Semaphore>,
    /// Tokens for requests, when a rate is configured.
    pub(super) rate: Option<DefaultDirectRateLimiter>,
    tracking: AtomicU8,
}

impl Host {
    fn new(limits: &Limits) -> Self {
        Self {
            breaker: CircuitBreaker::new(limits.breaker),
            slots: Arc::new(Semaphore::new(limits.concurrency)),
            rate: limits.rate.and_then(quota).map(RateLimiter::direct),
            tracking: AtomicU8::new(CLOSED),
        }
    }
}

fn quota(rate: HostRateLimit) -> Option<Quota> {
    Some(
        Quota::per_second(NonZeroU32::new(rate.per_second)?)
            .allow_burst(NonZeroU32::new(rate.burst)?),
    )
}

#[derive(Debug)]
struct Entry {
    host: Arc<Host>,
    last_used: Instant,
}

impl Entry {
    /// A job holds a clone while it runs (clones are only made under the table lock).
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.host) > 1
    }
}

/// Every tracked host, keyed by origin (`scheme://host:port`).
#[derive(Debug)]
pub(super) struct Hosts {
    limits: Limits,
    table: Mutex<HashMap<String, Entry>>,
    /// Hosts whose breaker is not closed, as last observed.
    open: AtomicUsize,
}

impl Hosts {
    pub(super) fn new(limits: Limits) -> Self {
        Self {
            limits,
            table: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Every update under this lock is a single map operation: a panic cannot leave it
        // half done, so a poisoned lock is still consistent.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state of `origin`, created on first use (making room if the table is full).
    pub(super) fn get(&self, origin: &str) -> Arc<Host> {
        let now = Instant::now();
        let mut table = self.lock();
        if let Some(entry) = table.get_mut(origin) {
            entry.last_used = now;
            return Arc::clone(&entry.host);
        }
        if table.len() >= self.limits.max_hosts {
            self.make_room(&mut table, now);
        }
        let host = Arc::new(Host::new(&self.limits));
        table.insert(
            origin.to_owned(),
            Entry {
                host: Arc::clone(&host),
                last_used: now,
            },
        );
        telemetry::webhook_hosts_tracked(table.len());
        host
    }

    /// Forgets the idle hosts and the least recently used eighth of the others, except
    /// those with a request in flight.
    fn make_room(&self, table: &mut HashMap<String, Entry>, now: Instant) {
        let batch = (self.limits.max_hosts / 8).max(1);
        let mut ages: Vec<Instant> = table
            .values()
            .filter(|e| !e.in_use())
            .map(|e| e.last_used)
            .collect();
        let cutoff = if ages.len() > batch {
            *ages.select_nth_unstable(batch - 1).1
        } else {
            match ages.into_iter().max() {
                Some(newest) => newest,
                // Every host is busy: the table grows past its cap by at most the number of
                // running jobs, and shrinks again once they finish.
                None => return,
            }
        };
        let idle = self.limits.idle;
        table.retain(|_, e| {
            let forget = !e.in_use()
                && (e.last_used <= cutoff || now.saturating_duration_since(e.last_used) >= idle);
            if forget {
                self.forget(&e.host);
            }
            !forget
        });
        telemetry::webhook_hosts_tracked(table.len());
    }

    fn forget(&self, host: &Host) {
        if host.tracking.swap(FORGOTTEN, Ordering::AcqRel) == OPEN {
            let open = self.open.fetch_sub(1, Ordering::AcqRel) - 1;
            telemetry::webhook_hosts_open(open);
        }
    }

    /// Updates the count of hosts whose breaker is not closed; call after every verdict on
    /// `host` (only verdicts move a breaker into or out of closed).
    pub(super) fn observe(&self, host: &Host) {
        let open = host.breaker.state() != BreakerState::Closed;
        let (from, to) = if open { (CLOSED, OPEN) } else { (OPEN, CLOSED) };
        if host
            .tracking
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let now = if open {
                self.open.fetch_add(1, Ordering::AcqRel) + 1
            } else {
                self.open.fetch_sub(1, Ordering::AcqRel) - 1
            };
            telemetry::webhook_hosts_open(now);
        }
    }

    /// Hosts whose breaker is open or half-open (the `keel_webhook_hosts_open` gauge).
    pub(super) fn open_hosts(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Hosts tracked (the `keel_webhook_hosts_tracked` gauge).
    pub(super) fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_hosts: usize) -> Limits {
        Limits {
            breaker: BreakerConfig {
                consecutive_failures: 2,
                ..BreakerConfig::default()
            },
            concurrency: 2,
            rate: None,
            max_hosts,
            idle: Duration::from_secs(600),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_forgets_the_least_recently_used_hosts_but_not_busy_ones() {
        let hosts = Hosts::new(limits(16));
        let busy = hosts.get("http://busy:80");
        for i in 0..15 {
            tokio::time::advance(Duration::from_millis(1)).await;
            drop(hosts.get(&format!("http://h{i}:80")));
        }
        assert_eq!(hosts.tracked(), 16);
        // h0 is used again, so h1 and h2 are now the least recently used idle hosts.
        tokio::time::advance(Duration::from_millis(1)).await;
        let h0 = Arc::as_ptr(&hosts.get("http://h0:80"));
        tokio::time::advance(Duration::from_millis(1)).await;
        drop(hosts.get("http://new:80"));
        // An eighth of 16 (two hosts) made room for the new one.
        assert_eq!(hosts.tracked(), 15);
        let table = hosts.lock();
        assert!(table.contains_key("http://busy:80"), "in use: kept");
        assert!(table.contains_key("http://h0:80"), "recently used: kept");
        assert!(!table.contains_key("http://h1:80") && !table.contains_key("http://h2:80"));
        assert!(table.contains_key("http://h3:80") && table.contains_key("http://new:80"));
        drop(table);
        // The same host keeps its state.
        assert!(Arc::ptr_eq(&busy, &hosts.get("http://busy:80")));
        assert_eq!(Arc::as_ptr(&hosts.get("http://h0:80")), h0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_hosts_are_forgotten_first_when_room_is_needed() {
        let hosts = Hosts::new(Limits {
            idle: Duration::from_secs(60),
            ..limits(16)
        });
        for i in 0..8 {
            drop(hosts.get(&format!("http://old{i}:80")));
        }
        tokio::time::advance(Duration::from_secs(61)).await;
        for i in 0..8 {
            drop(hosts.get(&format!("http://fresh{i}:80")));
        }
        drop(hosts.get("http://new:80"));
        assert_eq!(hosts.tracked(), 9, "all eight idle hosts went at once");
    }

    #[tokio::test(start_paused = true)]
    async fn open_hosts_are_counted_until_they_recover_or_are_forgotten() {
        let hosts = Hosts::new(limits(1));
        let a = hosts.get("http://a:80");
        for _ in 0..2 {
            a.breaker.try_acquire().expect("closed").failure();
            hosts.observe(&a);
        }
        assert_eq!(hosts.open_hosts(), 1);
        hosts.observe(&a);
        assert_eq!(hosts.open_hosts(), 1, "counted once");

        // Probes succeed: closed again.
        tokio::time::advance(BreakerConfig::default().open_for).await;
        for _ in 0..BreakerConfig::default().probes {
            a.breaker.try_acquire().expect("probe").success();
            hosts.observe(&a);
        }
        assert_eq!(a.breaker.state(), BreakerState::Closed);
        assert_eq!(hosts.open_hosts(), 0);

        // Open again, then forgotten to make room: no longer counted, even if the job that
        // still holds it reports later.
        for _ in 0..2 {
            a.breaker.try_acquire().expect("closed").failure();
            hosts.observe(&a);
        }
        assert_eq!(hosts.open_hosts(), 1);
        drop(a);
        let b = hosts.get("http://b:80");
        assert_eq!(hosts.tracked(), 1);
        assert_eq!(hosts.open_hosts(), 0);
        drop(b);
    }
}
