//! [`GuardedStore`]: the real store behind a bulkhead, a circuit breaker, fault injection
//! and retries of transient read errors, all bounded by the caller's deadline (SPEC §5,
//! "Database protection").
//!
//! Every call, in order:
//! 1. marks the request's step as `store` (so a `504` says where the time went);
//! 2. waits for a bulkhead slot — a semaphore capping store calls in flight — no longer than
//!    the request's deadline (or `max_wait` outside a request), else fails with
//!    [`StoreError::Unavailable`]: pool exhaustion turns into a fast refusal, never a hang;
//! 3. asks the breaker; while it is open the call fails at once with
//!    [`StoreError::Unavailable`] and the time until the next probe;
//! 4. applies injected faults (chaos): added latency, and errors that stand for the database
//!    answering every call with a failure — the seed's `DB_FAILURE`, which must answer `500`
//!    as the seed says. Injected errors are not reported to the breaker (an outage, where
//!    the database cannot be reached at all, is what the breaker is for, and what cutting
//!    the connection to it shows);
//! 5. calls the store and reports transient and permanent failures to the breaker (a `not
//!    found` or a conflict is the database working; a configuration error, such as named
//!    statements sent through a transaction pooler, is neither, and is kept for `/readyz`
//!    instead, see [`Misconfiguration`]);
//! 6. for reads, retries a transient failure with capped exponential backoff and full
//!    jitter while the deadline leaves room. Writes are not retried here: a write that
//!    failed in flight may have committed, so its owner decides (the completer and the
//!    heartbeat retry their own idempotent batches; clients retry enqueues with an
//!    `Idempotency-Key`).

use std::future::Future;
use std::time::Duration;

use keel_core::store::{Call, Layered, Op, StoreLayer};
use keel_core::{Backoff, StoreError};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::breaker::{BreakerConfig, CircuitBreaker};
use crate::chaos::{Chaos, Dependency};
use crate::scope::{RequestScope, Step};

/// Settings of a [`GuardedStore`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreGuardConfig {
    /// Store calls in flight at once (the bulkhead). Above the connection pool's size, so
    /// that group commit still gets full batches, but bounded, so that a slow database
    /// makes callers wait here (bounded by their deadline) rather than pile up.
    pub max_in_flight: usize,
    /// Longest wait for a bulkhead slot for calls made outside a request (dispatchers,
    /// maintenance).
    pub max_wait: Duration,
    /// When the database breaker opens and how it recovers.
    pub breaker: BreakerConfig,
    /// Most attempts of one read (1 = no retry).
    pub read_attempts: u32,
    /// Backoff between read attempts (full jitter).
    pub retry_backoff: Backoff,
}

impl Default for StoreGuardConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 512,
            max_wait: Duration::from_secs(5),
            breaker: BreakerConfig::default(),
            read_attempts: 3,
            retry_backoff: Backoff::Exponential {
                base_ms: 10,
                cap_ms: 250,
            },
        }
    }
}

/// A [`Store`](keel_core::Store) guarded by a bulkhead, a breaker, fault injection and read retries.
pub type GuardedStore = Layered<StoreGuard>;

/// The guard around every call of a [`GuardedStore`]: a bulkhead, a breaker, fault injection
/// and read retries.
pub struct StoreGuard {
    config: StoreGuardConfig,
    bulkhead: Semaphore,
    breaker: CircuitBreaker,
    chaos: Chaos,
    misconfigured: Misconfiguration,
}

/// How long a configuration error keeps `/readyz` failing after it was last met, and how
/// often it is logged while it keeps happening.
const MISCONFIGURATION_MEMORY: Duration = Duration::from_secs(30);

/// The last configuration error a store call met ([`StoreError::Misconfigured`]: a pooler
/// and Keel's settings disagree), for `/readyz`. Such an error is not the database failing,
/// so the breaker does not count it; without this, requests would fail with nothing but
/// the log saying why. Cheap to clone: clones share the slot.
#[derive(Debug, Clone, Default)]
pub struct Misconfiguration(std::sync::Arc<std::sync::Mutex<Option<Met>>>);

/// A configuration error: when it was last met and last logged, and what it said.
#[derive(Debug)]
struct Met {
    seen: Instant,
    logged: Instant,
    message: String,
}

impl Misconfiguration {
    /// Remembers `e`, and logs it unless it was logged in the last
    /// [`MISCONFIGURATION_MEMORY`] (so an error that keeps happening is logged every 30 s).
    fn record(&self, e: &StoreError) {
        let now = Instant::now();
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let message = error_chain(e);
        let logged = match last.as_ref() {
            Some(met) if now.duration_since(met.logged) < MISCONFIGURATION_MEMORY => met.logged,
            _ => {
                tracing::error!(error = %message, "the database connection is misconfigured");
                now
            }
        };
        metrics::counter!("keel_store_misconfigured_total").increment(1);
        *last = Some(Met {
            seen: now,
            logged,
            message,
        });
    }

    /// The configuration error met in the last [`MISCONFIGURATION_MEMORY`], if any.
    pub fn recent(&self) -> Option<String> {
        let last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.as_ref()
            .filter(|met| met.seen.elapsed() < MISCONFIGURATION_MEMORY)
            .map(|met| met.message.clone())
    }
}

/// `e` and its sources, `: `-joined: a configuration error's remedy is in its source.
fn error_chain(e: &StoreError) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

impl std::fmt::Debug for StoreGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreGuard")
            .field("config", &self.config)
            .field("breaker", &self.breaker.state())
            .field("bulkhead_free", &self.bulkhead.available_permits())
            .finish_non_exhaustive()
    }
}

fn refused(reason: &'static str, retry_after: Duration) -> StoreError {
    metrics::counter!("keel_store_refused_total", "reason" => reason).increment(1);
    StoreError::Unavailable {
        reason,
        retry_after,
    }
}

/// Whether an error means the database (or the way to it) is failing, as opposed to the
/// database answering "no".
fn is_dependency_failure(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Transient { .. } | StoreError::Permanent { .. }
    )
}

impl StoreGuard {
    /// A guard; the breaker is reported as `keel_circuit_state{dependency="database"}`. Put
    /// it around a store with [`Layered::new`].
    pub fn new(config: StoreGuardConfig, chaos: Chaos) -> Self {
        metrics::gauge!("keel_store_bulkhead_capacity").set(config.max_in_flight as f64);
        Self {
            config,
            bulkhead: Semaphore::new(config.max_in_flight),
            breaker: CircuitBreaker::reported(config.breaker, "database"),
            chaos,
            misconfigured: Misconfiguration::default(),
        }
    }

    /// The database breaker (readiness reports it).
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The last configuration error met (readiness reports it).
    pub fn misconfiguration(&self) -> &Misconfiguration {
        &self.misconfigured
    }

    /// Store calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.config.max_in_flight - self.bulkhead.available_permits()
    }

    /// Steps 1–2: marks the step and takes a bulkhead slot within the deadline.
    async fn admit(&self) -> Result<(SemaphorePermit<'_>, Instant), StoreError> {
        let scope = RequestScope::current();
        if let Some(s) = &scope {
            s.enter(Step::Store);
        }
        let deadline = scope.as_ref().map_or_else(
            || Instant::now() + self.config.max_wait,
            RequestScope::deadline,
        );
        match tokio::time::timeout_at(deadline, self.bulkhead.acquire()).await {
            Ok(Ok(slot)) => Ok((slot, deadline)),
            // The semaphore is never closed; a timeout means the bulkhead stayed full.
            Ok(Err(_)) | Err(_) => Err(refused(
                "too many store calls in flight",
                Duration::from_secs(1),
            )),
        }
    }

    /// Steps 3–5 for one attempt.
    async fn attempt<T>(
        &self,
        dependency: Dependency,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let permit = self
            .breaker
            .try_acquire()
            .map_err(|open| refused("circuit open", open.retry_after))?;
        if let Err(fault) = self.chaos.inject(dependency).await {
            // No verdict: an injected fault stands for the database *answering* with an
            // error, which the breaker does not judge (see the module docs).
            drop(permit);
            return Err(StoreError::permanent("calling the store", fault));
        }
        let outcome = op.await;
        match &outcome {
            Err(e) if is_dependency_failure(e) => permit.failure(),
            Err(e @ StoreError::Misconfigured { .. }) => {
                // Neither a success nor the database failing: no verdict.
                drop(permit);
                self.misconfigured.record(e);
            }
            _ => permit.success(),
        }
        outcome
    }
}

impl StoreLayer for StoreGuard {
    /// One attempt (the call is not started until admitted).
    fn write<'a, T: Send + 'a>(&'a self, _op: Op, call: Call<'a, T>) -> Call<'a, T> {
        Box::pin(async move {
            let (_slot, _) = self.admit().await?;
            self.attempt(Dependency::StoreWrite, call).await
        })
    }

    /// Retried on transient failures while the deadline leaves room (step 6).
    fn read<'a, T: Send + 'a>(
        &'a self,
        _op: Op,
        mut call: Box<dyn FnMut() -> Call<'a, T> + Send + 'a>,
    ) -> Call<'a, T> {
        Box::pin(async move {
            let (_slot, deadline) = self.admit().await?;
            let attempts = self.config.read_attempts.max(1);
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.attempt(Dependency::StoreRead, call()).await {
                    Err(e) if e.is_transient() && attempt < attempts => {
                        let delay = self.config.retry_backoff.delay(attempt, &mut rand::rng());
                        if Instant::now() + delay >= deadline {
                            return Err(e);
                        }
                        metrics::counter!("keel_store_retries_total").increment(1);
                        tracing::debug!(error = %e, attempt, ?delay, "store read failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                    other => return other,
                }
            }
        })
    }

    /// Readiness asks the database itself, past the breaker and the bulkhead: a probe that
    /// only echoed the breaker could never see the database come back. Injected faults
    /// still apply, so `DB_FAILURE` makes `/readyz` fail as a real outage would.
    fn ping<'a>(&'a self, call: Call<'a, ()>) -> Call<'a, ()> {
        Box::pin(async move {
            if let Err(fault) = self.chaos.inject(Dependency::StoreRead).await {
                return Err(StoreError::permanent("pinging the database", fault));
            }
            call.await
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;
    use keel_core::store::ListParams;
    use keel_core::{JobId, JobKind, JobStore, NewJob, QueueStore, Store};
    use keel_store::testkit::{Harness, Intercepted, Interceptor, Op, intercept};

    use super::*;
    use crate::chaos::ChaosSettings;

    /// A guard whose breaker opens after three failures and probes again after 200 ms, so
    /// the breaker tests run in a fraction of a second.
    fn fast_config() -> StoreGuardConfig {
        StoreGuardConfig {
            breaker: BreakerConfig {
                consecutive_failures: 3,
                open_for: Duration::from_millis(200),
                probes: 1,
                ..BreakerConfig::default()
            },
            ..StoreGuardConfig::default()
        }
    }

    /// `inner` behind a guard with [`fast_config`].
    fn fast_guarded(inner: Arc<dyn Store>, chaos: Chaos) -> Layered<StoreGuard> {
        Layered::new(inner, StoreGuard::new(fast_config(), chaos))
    }

    fn job() -> NewJob {
        NewJob::new(JobKind::parse("noop").expect("valid kind"))
    }

    #[tokio::test]
    async fn injected_failures_are_answers_and_do_not_open_the_breaker() {
        let h = Harness::sqlite().await;
        let chaos = Chaos::default();
        let store = fast_guarded(Arc::clone(&h.store), chaos.clone());
        let id = store.insert(vec![job()]).await.expect("healthy insert")[0].id;

        // DB_FAILURE: every call fails as the seed says, and keeps failing that way (500s),
        // rather than turning into the breaker's 503s.
        chaos.set(ChaosSettings::default().with_seed_switches(false, true));
        for _ in 0..10 {
            let e = store.get(id).await.unwrap_err();
            assert_eq!(e.class(), "permanent");
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            assert!(
                cause.is_some_and(|c| c.contains("connection refused")),
                "{e:?}"
            );
            assert_eq!(
                store.insert(vec![job()]).await.unwrap_err().class(),
                "permanent"
            );
        }
        assert_eq!(store.breaker().state(), crate::BreakerState::Closed);
        chaos.set(ChaosSettings::default());
        assert_eq!(store.get(id).await.expect("chaos off").id, id);
        // Nothing was written while the faults were on.
        let page = h.store.list(ListParams::default()).await.unwrap();
        assert_eq!(page.jobs.len(), 1);
    }

    #[tokio::test]
    async fn real_failures_open_the_breaker_which_then_fails_fast_and_recovers() {
        let h = Harness::sqlite().await;
        let id = h.store.insert(vec![job()]).await.unwrap()[0].id;
        let flaky = FlakyReads::new(&h.store, u32::MAX);
        let config = StoreGuardConfig {
            read_attempts: 1,
            ..fast_config()
        };
        let store = Layered::new(flaky.clone(), StoreGuard::new(config, Chaos::default()));
        for _ in 0..3 {
            assert!(store.get(id).await.unwrap_err().is_transient());
        }
        assert_eq!(store.breaker().state(), crate::BreakerState::Open);
        let calls = flaky.calls.load(Ordering::SeqCst);
        match store.get(id).await.unwrap_err() {
            StoreError::Unavailable {
                reason,
                retry_after,
            } => {
                assert_eq!(reason, "circuit open");
                assert!(retry_after <= Duration::from_millis(200));
            }
            other => panic!("expected a fast refusal, got {other:?}"),
        }
        assert_eq!(
            flaky.calls.load(Ordering::SeqCst),
            calls,
            "refused without a call"
        );

        // The database comes back; after open_for one probe closes the breaker.
        flaky.failures.store(0, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(store.get(id).await.expect("probe").id, id);
        assert_eq!(store.breaker().state(), crate::BreakerState::Closed);
    }

    #[tokio::test]
    async fn answers_that_are_not_failures_do_not_trip_the_breaker() {
        let h = Harness::sqlite().await;
        let store = fast_guarded(Arc::clone(&h.store), Chaos::default());
        for _ in 0..10 {
            let e = store.get(JobId::new()).await.unwrap_err();
            assert_eq!(e.class(), "not_found");
        }
        assert_eq!(store.breaker().state(), crate::BreakerState::Closed);
    }

    /// Hostile values sent to the real stores (a NUL in a tag, which Postgres's jsonb
    /// refuses; args nested 100 000 deep, past its stack) are the caller's fault: the
    /// stores refuse them before the database sees them, however many arrive the breaker
    /// stays closed, and the next caller is served. On both backends.
    async fn hostile_values_do_not_trip_the_breaker(h: Harness) {
        let store = fast_guarded(Arc::clone(&h.store), Chaos::default());
        let deep = format!("{}0{}", "[".repeat(100_000), "]".repeat(100_000));
        let mut classes = Vec::new();
        for _ in 0..5 {
            let mut tagged = job();
            tagged.tags = vec!["a\0b".to_owned()];
            let mut nested = job();
            nested.args = serde_json::value::RawValue::from_string(deep.clone()).unwrap();
            for hostile in [tagged, nested] {
                let e = store.insert(vec![hostile]).await.unwrap_err();
                classes.push(e.class());
            }
        }
        assert!(
            classes.iter().all(|c| matches!(*c, "invalid" | "rejected")),
            "{} classes: {classes:?}",
            h.backend()
        );
        assert_eq!(store.breaker().state(), crate::BreakerState::Closed);
        store
            .insert(vec![job()])
            .await
            .expect("the next caller is served");
    }

    #[tokio::test]
    async fn hostile_values_do_not_trip_the_breaker_sqlite() {
        hostile_values_do_not_trip_the_breaker(Harness::sqlite().await).await;
    }

    #[tokio::test]
    async fn hostile_values_do_not_trip_the_breaker_postgres() {
        let test = "keel_resilience::store::hostile_values_do_not_trip_the_breaker";
        if let Some(h) = Harness::postgres(test).await {
            hostile_values_do_not_trip_the_breaker(h).await;
        }
    }

    /// Answers every insert with `error` (built afresh per call).
    struct RefusedInserts(fn() -> StoreError);

    impl RefusedInserts {
        fn new_over(inner: &Arc<dyn Store>, error: fn() -> StoreError) -> Arc<Intercepted<Self>> {
            intercept(Arc::clone(inner), Self(error))
        }
    }

    #[async_trait]
    impl Interceptor for RefusedInserts {
        async fn before(&self, op: Op) -> Result<(), StoreError> {
            if op == Op::Insert {
                return Err((self.0)());
            }
            Ok(())
        }
    }

    /// When the database itself refuses a value (what the Postgres store maps SQLSTATE
    /// classes 22, 23 and 54 to: `postgres::tests::data_the_server_refuses_is_rejected_not_a_failure`),
    /// the breaker does not count it; the same number of connection failures opens it.
    #[tokio::test]
    async fn a_rejected_value_is_not_a_database_failure() {
        let h = Harness::sqlite().await;
        let config = fast_config();
        let rejected: Arc<dyn Store> = RefusedInserts::new_over(&h.store, || {
            StoreError::rejected(
                "inserting jobs",
                "22P05: unsupported Unicode escape sequence",
            )
        });
        let store = Layered::new(rejected, StoreGuard::new(config, Chaos::default()));
        for _ in 0..10 {
            let e = store.insert(vec![job()]).await.unwrap_err();
            assert_eq!(e.class(), "rejected");
        }
        assert_eq!(store.breaker().state(), crate::BreakerState::Closed);
        store.get(JobId::new()).await.unwrap_err(); // a read still reaches the store
        assert_eq!(store.breaker().state(), crate::BreakerState::Closed);

        let failing: Arc<dyn Store> = RefusedInserts::new_over(&h.store, || {
            StoreError::transient("inserting jobs", "connection reset by peer")
        });
        let store = Layered::new(failing, StoreGuard::new(config, Chaos::default()));
        for _ in 0..3 {
            store.insert(vec![job()]).await.unwrap_err();
        }
        assert_eq!(store.breaker().state(), crate::BreakerState::Open);
    }

    #[tokio::test]
    async fn a_full_bulkhead_refuses_within_the_callers_deadline() {
        let h = Harness::sqlite().await;
        let chaos = Chaos::default();
        let config = StoreGuardConfig {
            max_in_flight: 1,
            ..StoreGuardConfig::default()
        };
        let store = Arc::new(Layered::new(
            Arc::clone(&h.store),
            StoreGuard::new(config, chaos.clone()),
        ));
        // One slow call holds the only slot, for a minute or until chaos is cleared.
        chaos.set(ChaosSettings::parse("store_write.latency_ms=60000").unwrap());
        let slow = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.insert(vec![job()]).await }
        });
        while store.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let scope = RequestScope::new(Instant::now() + Duration::from_millis(50));
        let seen = scope.clone();
        let e = scope.run(store.queue_stats(None)).await.unwrap_err();
        // Refused at the caller's deadline, while the slot was still held: not after it.
        assert!(matches!(e, StoreError::Unavailable { .. }), "{e:?}");
        assert!(!slow.is_finished(), "refused only once the slot was free");
        assert_eq!(seen.step(), Step::Store);
        chaos.set(ChaosSettings::default());
        assert_eq!(
            slow.await.unwrap().unwrap().len(),
            1,
            "the slow call still completes"
        );
    }

    /// Fails the first `failures` job reads transiently, then lets them through.
    struct FlakyReads {
        failures: AtomicU32,
        calls: AtomicU32,
    }

    impl FlakyReads {
        fn new(inner: &Arc<dyn Store>, failures: u32) -> Arc<Intercepted<Self>> {
            intercept(
                Arc::clone(inner),
                Self {
                    failures: AtomicU32::new(failures),
                    calls: AtomicU32::new(0),
                },
            )
        }
    }

    #[async_trait]
    impl Interceptor for FlakyReads {
        async fn before(&self, op: Op) -> Result<(), StoreError> {
            if op != Op::Get {
                return Ok(());
            }
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return Err(StoreError::transient("reading a job", "connection reset"));
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn transient_read_failures_are_retried_within_the_deadline() {
        let h = Harness::sqlite().await;
        let id = h.store.insert(vec![job()]).await.unwrap()[0].id;
        let flaky = FlakyReads::new(&h.store, 2);
        let store = Layered::new(
            flaky.clone(),
            StoreGuard::new(StoreGuardConfig::default(), Chaos::default()),
        );
        assert_eq!(store.get(id).await.expect("third attempt").id, id);
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);

        // With no time left for a backoff, the transient error is returned as is.
        flaky.failures.store(5, Ordering::SeqCst);
        flaky.calls.store(0, Ordering::SeqCst);
        let scope = RequestScope::new(Instant::now());
        let e = scope.run(store.get(id)).await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
    }
}
