//! The read cache of `GET /v1/jobs/{id}` and `GET /v1/jobs/{id}/result`: a bounded moka
//! cache of jobs by id, so that many clients polling the same job cost the database one read
//! per key, not one per request (seed scenario 8, cache stampede).
//!
//! - **Coalesced misses.** Concurrent readers of a key that is not cached wait for one store
//!   read ([`moka::future::Cache::try_get_with`]); a failed read is handed to every waiter
//!   and not cached.
//! - **Time to live by state.** A job that can still change lives `live_ttl` (short: leases
//!   and promotions are not announced, so this bounds how stale `available` can look); a
//!   finished one `finished_ttl` (it changes only by a retry, which is announced).
//! - **Probabilistic early refresh (XFetch).** A hit refreshes the entry in the background
//!   with a probability that rises as its expiry nears, scaled by how long a load takes, at
//!   most one refresh per entry at a time. A hot key is then reloaded before it expires
//!   instead of expiring under all its readers at once.
//! - **Invalidation.** Handlers of this process that change a job invalidate it before they
//!   answer, so a client never reads its own write stale; a task following the runtime's job
//!   events ([`JobCache::follow`]) invalidates the changes made by workers, maintenance and,
//!   through the store's change stream, other replicas.
//!
//! A load that raced with an invalidation must not outlive it. Each invalidation bumps a
//! generation counter (one of [`GENERATION_STRIPES`], picked by the job id) *after* the store
//! write and *before* the entry is removed; each entry records the generation read before its
//! store read began; a reader takes the generation before it looks and refuses an entry
//! older than that (reading the store itself). So an entry loaded before a change the reader
//! could know about — inserted after the invalidation removed its predecessor, or a
//! coalesced load that started before it — is never served to that reader.
//!
//! The cache holds jobs of every tenant; callers check the tenant on every answer, cached or
//! not ([`crate::routes::jobs`]).

use std::future::Future;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_core::{Job, JobId, JobStore, StoreError};
use keel_runtime::JobEvent;
use moka::future::Cache;
use moka::policy::Expiry;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::task::TaskTracker;

use crate::error::ApiError;

/// How many generation counters invalidations are spread over. A collision only makes a
/// reader reload an entry it could have served.
pub const GENERATION_STRIPES: usize = 1024;

/// The XFetch β: 1 is the paper's optimum for a single recomputation per expiry.
const BETA: f64 = 1.0;

/// The least load time XFetch assumes: a load measured in microseconds would otherwise make
/// an early refresh all but impossible, and the first readers after expiry would stampede.
const MIN_LOAD_TIME: Duration = Duration::from_millis(1);

/// Sizes and lifetimes of the job read cache. [`Default`] is what `keel serve` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCacheConfig {
    /// Most jobs kept; 0 turns the cache off (every read goes to the store). Bounds memory
    /// together with `max_entry_bytes`.
    pub capacity: u64,
    /// How long a job that can still change (scheduled, available, running, retryable) is
    /// served from the cache. Leases and promotions are not announced as events, so this is
    /// how long a `GET` may show `available` for a job that started.
    pub live_ttl: Duration,
    /// How long a finished job (completed, discarded, cancelled) is served from the cache.
    /// Longer: it changes only by a retry, and every retry is announced.
    pub finished_ttl: Duration,
    /// Jobs whose args, result and errors together are larger than this are handed to the
    /// readers waiting for their load but not kept, so `capacity` entries cannot pin
    /// `capacity` × the largest job's bytes.
    pub max_entry_bytes: usize,
}

impl Default for JobCacheConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            live_ttl: Duration::from_millis(250),
            finished_ttl: Duration::from_secs(5),
            max_entry_bytes: 16 * 1024,
        }
    }
}

/// One cached job.
struct Entry {
    job: Job,
    /// The stripe's generation when the store read began.
    generation: u64,
    /// When the store read began (the entry's age counts from there).
    loaded_at: Instant,
    /// How long it is served.
    ttl: Duration,
    /// How long the store read took: XFetch's δ.
    load_time: Duration,
    /// Set while a background refresh of this entry runs.
    refreshing: AtomicBool,
}

impl Entry {
    fn new(job: Job, generation: u64, loaded_at: Instant, config: &JobCacheConfig) -> Self {
        let bytes = job.args.get().len()
            + job.result.as_ref().map_or(0, |r| r.get().len())
            + job.errors.iter().map(|e| e.message.len()).sum::<usize>();
        let ttl = if bytes > config.max_entry_bytes {
            Duration::ZERO
        } else if job.state.is_finished() {
            config.finished_ttl
        } else {
            config.live_ttl
        };
        Self {
            job,
            generation,
            loaded_at,
            ttl,
            load_time: loaded_at.elapsed(),
            refreshing: AtomicBool::new(false),
        }
    }

    /// XFetch: refresh now with probability `exp(-remaining / (δ·β))`, i.e. when
    /// `δ·β·(−ln u) ≥ remaining` for a uniform `u` in (0, 1].
    fn wants_early_refresh(&self, now: Instant) -> bool {
        let remaining = (self.loaded_at + self.ttl).saturating_duration_since(now);
        let delta = self.load_time.max(MIN_LOAD_TIME).as_secs_f64();
        let u = 1.0 - rand::random::<f64>();
        delta * BETA * -u.ln() >= remaining.as_secs_f64()
    }
}

/// Expires each entry after its own time to live.
struct ByState;

impl Expiry<JobId, Arc<Entry>> for ByState {
    fn expire_after_create(&self, _: &JobId, e: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(e.ttl)
    }

    fn expire_after_update(
        &self,
        _: &JobId,
        e: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(e.ttl)
    }
}

struct Inner {
    entries: Cache<JobId, Arc<Entry>>,
    generations: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    config: JobCacheConfig,
    /// Background refreshes, so [`JobCache::follow`] can wait for them at shutdown.
    refreshes: TaskTracker,
}

impl Inner {
    fn stripe(&self, id: JobId) -> &AtomicU64 {
        let h = self.hasher.hash_one(id);
        &self.generations[(h as usize) % self.generations.len()]
    }

    fn generation(&self, id: JobId) -> u64 {
        self.stripe(id).load(Ordering::SeqCst)
    }

    /// Reads the job from the store, as an entry.
    async fn load<S: JobStore + ?Sized>(
        &self,
        store: &S,
        id: JobId,
    ) -> Result<Arc<Entry>, StoreError> {
        let generation = self.generation(id);
        let loaded_at = Instant::now();
        metrics::counter!("keel_cache_loads_total").increment(1);
        let job = store.get(id).await?;
        Ok(Arc::new(Entry::new(
            job,
            generation,
            loaded_at,
            &self.config,
        )))
    }
}

/// The job read cache. Cloning shares it.
#[derive(Clone)]
pub struct JobCache {
    /// `None` when the cache is off.
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for JobCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobCache")
            .field("config", &self.inner.as_ref().map(|i| &i.config))
            .field(
                "entries",
                &self.inner.as_ref().map(|i| i.entries.entry_count()),
            )
            .finish()
    }
}

/// How a read was served, the `result` label of `keel_cache_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    Hit,
    Miss,
    EarlyRefresh,
}

impl Served {
    fn as_str(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Miss => "miss",
            Served::EarlyRefresh => "early_refresh",
        }
    }
}

impl JobCache {
    /// A cache sized and timed by `config` (off when its capacity is 0).
    pub fn new(config: &JobCacheConfig) -> Self {
        if config.capacity == 0 {
            return Self { inner: None };
        }
        let entries = Cache::builder()
            .max_capacity(config.capacity)
            .expire_after(ByState)
            .build();
        Self {
            inner: Some(Arc::new(Inner {
                entries,
                generations: (0..GENERATION_STRIPES).map(|_| AtomicU64::new(0)).collect(),
                hasher: std::collections::hash_map::RandomState::new(),
                config: config.clone(),
                refreshes: TaskTracker::new(),
            })),
        }
    }

    /// The job `id`, from the cache or else from `store` (one read for all concurrent
    /// readers). Not filtered by tenant: the caller checks.
    pub async fn get<S: JobStore + ?Sized + 'static>(
        &self,
        store: &Arc<S>,
        id: JobId,
    ) -> Result<Job, ApiError> {
        let Some(inner) = &self.inner else {
            return Ok(store.get(id).await?);
        };
        // Taken before looking: an entry older than this may predate a change this reader
        // must see (see the module doc).
        let seen = inner.generation(id);
        let (job, served) = match inner.entries.get(&id).await {
            Some(e) if e.generation >= seen => {
                let served = if e.wants_early_refresh(Instant::now())
                    && e.refreshing
                        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.refresh_in_background(inner, store, id);
                    Served::EarlyRefresh
                } else {
                    Served::Hit
                };
                (e.job.clone(), served)
            }
            Some(_) => (
                Self::load_uncoalesced(inner, store, id).await?,
                Served::Miss,
            ),
            None => {
                let e = inner
                    .entries
                    .try_get_with(id, inner.load(store.as_ref(), id))
                    .await
                    .map_err(ApiError::from_store)?;
                if e.generation >= seen {
                    (e.job.clone(), Served::Miss)
                } else {
                    // The load this reader joined began before an invalidation it must see.
                    (
                        Self::load_uncoalesced(inner, store, id).await?,
                        Served::Miss,
                    )
                }
            }
        };
        metrics::counter!("keel_cache_requests_total", "result" => served.as_str()).increment(1);
        Ok(job)
    }

    /// Reads past the cache and replaces the entry with what was read.
    async fn load_uncoalesced<S: JobStore + ?Sized>(
        inner: &Inner,
        store: &Arc<S>,
        id: JobId,
    ) -> Result<Job, ApiError> {
        let e = inner.load(store.as_ref(), id).await?;
        let job = e.job.clone();
        inner.entries.insert(id, e).await;
        Ok(job)
    }

    /// Reloads `id` off the request path. Bounded by `live_ttl` plus a second, so a stuck
    /// database cannot pile up refreshes; on failure the entry simply expires.
    fn refresh_in_background<S: JobStore + ?Sized + 'static>(
        &self,
        inner: &Arc<Inner>,
        store: &Arc<S>,
        id: JobId,
    ) {
        let inner = Arc::clone(inner);
        let store = Arc::clone(store);
        let bound = inner.config.live_ttl + Duration::from_secs(1);
        inner.refreshes.clone().spawn(async move {
            if let Ok(Ok(e)) = tokio::time::timeout(bound, inner.load(store.as_ref(), id)).await {
                inner.entries.insert(id, e).await;
            }
        });
    }

    /// Forgets job `id`. Call it after the store write that changed the job and before
    /// answering, so the writer's next read sees its write.
    pub async fn invalidate(&self, id: JobId) {
        if let Some(inner) = &self.inner {
            inner.stripe(id).fetch_add(1, Ordering::SeqCst);
            inner.entries.invalidate(&id).await;
        }
    }

    /// Forgets every job (events were lost, so any entry may be stale).
    fn invalidate_all(&self) {
        if let Some(inner) = &self.inner {
            for g in &inner.generations {
                g.fetch_add(1, Ordering::SeqCst);
            }
            inner.entries.invalidate_all();
        }
    }

    /// Invalidates every job announced on `events` until `shutdown` resolves (or the
    /// channel closes), then waits for background refreshes to end. A receiver that lags
    /// behind the channel lost events, so it clears the whole cache.
    ///
    /// Subscribe (take `events`) before the API starts serving, and run this for as long as
    /// it serves: without it, changes made by workers, maintenance or other replicas show
    /// only when entries expire.
    pub async fn follow(
        self,
        mut events: broadcast::Receiver<JobEvent>,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                ev = events.recv() => match ev {
                    Ok(ev) => self.invalidate(ev.id).await,
                    Err(RecvError::Lagged(_)) => self.invalidate_all(),
                    Err(RecvError::Closed) => break,
                },
            }
        }
        if let Some(inner) = &self.inner {
            inner.refreshes.close();
            inner.refreshes.wait().await;
        }
    }

    /// Entries held (approximate: moka applies writes in batches), for tests.
    #[cfg(test)]
    async fn len(&self) -> u64 {
        match &self.inner {
            Some(inner) => {
                inner.entries.run_pending_tasks().await;
                inner.entries.entry_count()
            }
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::AtomicUsize;

    use keel_core::store::*;
    use keel_core::{Clock as _, JobKind, JobState, NewJob, QueueName, SystemClock};

    /// Counts reads of the one job it holds; every other operation is unused here.
    struct OneJob {
        job: std::sync::Mutex<Job>,
        reads: AtomicUsize,
        delay: Duration,
    }

    impl OneJob {
        fn new(state: JobState, delay: Duration) -> Arc<Self> {
            let mut job = NewJob::new(JobKind::default()).into_job(SystemClock.now());
            job.state = state;
            Arc::new(Self {
                job: std::sync::Mutex::new(job),
                reads: AtomicUsize::new(0),
                delay,
            })
        }

        fn id(&self) -> JobId {
            self.job.lock().unwrap().id
        }

        fn set_state(&self, state: JobState) {
            self.job.lock().unwrap().state = state;
        }

        fn reads(&self) -> usize {
            self.reads.load(Ordering::SeqCst)
        }
    }

    fn unused<T>() -> Result<T, StoreError> {
        Err(StoreError::permanent("test store", "unused"))
    }

    /// The cache reads jobs and nothing else: the other operations of the role fail.
    #[async_trait::async_trait]
    impl JobStore for OneJob {
        async fn insert(&self, _: Vec<NewJob>) -> Result<Vec<Job>, StoreError> {
            unused()
        }
        async fn insert_idempotent(
            &self,
            _: IdempotentInsert,
        ) -> Result<IdempotentOutcome, StoreError> {
            unused()
        }
        async fn get(&self, id: JobId) -> Result<Job, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            let job = self.job.lock().unwrap().clone();
            if job.id == id {
                Ok(job)
            } else {
                Err(StoreError::NotFound(id))
            }
        }
        async fn list(&self, _: ListParams) -> Result<JobPage, StoreError> {
            unused()
        }
        async fn cancel(&self, _: JobId) -> Result<Job, StoreError> {
            unused()
        }
        async fn retry(&self, _: JobId) -> Result<Job, StoreError> {
            unused()
        }
    }

    fn long_lived() -> JobCacheConfig {
        JobCacheConfig {
            live_ttl: Duration::from_secs(60),
            finished_ttl: Duration::from_secs(60),
            ..JobCacheConfig::default()
        }
    }

    #[tokio::test]
    async fn concurrent_misses_of_one_key_read_the_store_once() {
        let one = OneJob::new(JobState::Available, Duration::from_millis(50));
        let store: Arc<dyn JobStore> = one.clone();
        let cache = JobCache::new(&long_lived());
        let id = one.id();
        let mut readers = tokio::task::JoinSet::new();
        for _ in 0..1000 {
            let (cache, store) = (cache.clone(), Arc::clone(&store));
            readers.spawn(async move { cache.get(&store, id).await });
        }
        let mut ok = 0;
        while let Some(r) = readers.join_next().await {
            assert_eq!(r.unwrap().unwrap().id, id);
            ok += 1;
        }
        assert_eq!(ok, 1000);
        assert_eq!(one.reads(), 1);
    }

    #[tokio::test]
    async fn errors_reach_every_waiter_and_are_not_cached() {
        let one = OneJob::new(JobState::Available, Duration::from_millis(20));
        let store: Arc<dyn JobStore> = one.clone();
        let cache = JobCache::new(&long_lived());
        let missing = JobId::new();
        let (a, b) = tokio::join!(cache.get(&store, missing), cache.get(&store, missing));
        for r in [a, b] {
            assert!(matches!(r, Err(ApiError::NotFound { job_id: Some(j), .. }) if j == missing));
        }
        assert_eq!(one.reads(), 1, "coalesced");
        assert!(cache.get(&store, missing).await.is_err());
        assert_eq!(one.reads(), 2, "the error was not cached");
        assert_eq!(cache.len().await, 0);
    }

    #[tokio::test]
    async fn an_invalidation_is_seen_by_the_next_read() {
        let one = OneJob::new(JobState::Running, Duration::ZERO);
        let store: Arc<dyn JobStore> = one.clone();
        let cache = JobCache::new(&long_lived());
        let id = one.id();
        assert_eq!(
            cache.get(&store, id).await.unwrap().state,
            JobState::Running
        );
        one.set_state(JobState::Cancelled);
        assert_eq!(
            cache.get(&store, id).await.unwrap().state,
            JobState::Running,
            "served from the cache"
        );
        cache.invalidate(id).await;
        assert_eq!(
            cache.get(&store, id).await.unwrap().state,
            JobState::Cancelled
        );
        assert_eq!(one.reads(), 2);
    }

    #[tokio::test]
    async fn a_load_that_began_before_an_invalidation_is_not_served_after_it() {
        // A reader joins a slow load; the job changes and is invalidated while the load is
        // in flight; a reader arriving after the invalidation must not get the old job.
        let one = OneJob::new(JobState::Running, Duration::from_millis(100));
        let store: Arc<dyn JobStore> = one.clone();
        let cache = JobCache::new(&long_lived());
        let id = one.id();
        let first = {
            let (cache, store) = (cache.clone(), Arc::clone(&store));
            tokio::spawn(async move { cache.get(&store, id).await })
        };
        // The first load has begun (its read is counted before its delay).
        while one.reads() == 0 {
            tokio::task::yield_now().await;
        }
        one.set_state(JobState::Cancelled);
        cache.invalidate(id).await;
        let after = cache.get(&store, id).await.unwrap();
        assert_eq!(after.state, JobState::Cancelled);
        // The early reader may see either; the entry left behind must be the new one.
        first.await.unwrap().unwrap();
        assert_eq!(
            cache.get(&store, id).await.unwrap().state,
            JobState::Cancelled
        );
    }

    #[tokio::test]
    async fn events_invalidate_until_shutdown() {
        let one = OneJob::new(JobState::Running, Duration::ZERO);
        let store: Arc<dyn JobStore> = one.clone();
        let cache = JobCache::new(&long_lived());
        let id = one.id();
        let runtime = keel_runtime::RuntimeHandle::new([QueueName::default()], 16);
        let stop = tokio_util::sync::CancellationToken::new();
        let follower = tokio::spawn(
            cache
                .clone()
                .follow(runtime.events.subscribe(), stop.clone().cancelled_owned()),
        );
        assert_eq!(
            cache.get(&store, id).await.unwrap().state,
            JobState::Running
        );
        one.set_state(JobState::Completed);
        runtime.events.publish(JobEvent {
            id,
            queue: QueueName::default(),
            state: JobState::Completed,
        });
        tokio::time::timeout(Duration::from_secs(10), async {
            while cache.get(&store, id).await.unwrap().state != JobState::Completed {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the event invalidated the entry");
        stop.cancel();
        follower.await.unwrap();
    }

    #[tokio::test]
    async fn entries_expire_by_state_and_large_jobs_are_not_kept() {
        let config = JobCacheConfig {
            live_ttl: Duration::from_millis(30),
            finished_ttl: Duration::from_secs(60),
            ..JobCacheConfig::default()
        };
        let one = OneJob::new(JobState::Available, Duration::ZERO);
        let store: Arc<dyn JobStore> = one.clone();
        let cache = JobCache::new(&config);
        let id = one.id();
        cache.get(&store, id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        cache.get(&store, id).await.unwrap();
        assert!(one.reads() >= 2, "a live job expired after live_ttl");
        one.set_state(JobState::Completed);
        cache.invalidate(id).await;
        cache.get(&store, id).await.unwrap();
        let before = one.reads();
        tokio::time::sleep(Duration::from_millis(80)).await;
        cache.get(&store, id).await.unwrap();
        assert_eq!(
            one.reads(),
            before,
            "a finished job is kept for finished_ttl"
        );

        let big = OneJob::new(JobState::Completed, Duration::ZERO);
        big.job.lock().unwrap().args =
            serde_json::value::RawValue::from_string(format!("\"{}\"", "x".repeat(20_000)))
                .unwrap();
        let store: Arc<dyn JobStore> = big.clone();
        cache.get(&store, big.id()).await.unwrap();
        cache.get(&store, big.id()).await.unwrap();
        assert_eq!(big.reads(), 2, "a job above max_entry_bytes is not kept");
    }

    #[test]
    fn early_refresh_grows_likelier_as_expiry_nears() {
        let job = NewJob::new(JobKind::default()).into_job(SystemClock.now());
        let now = Instant::now();
        let e = Entry {
            job,
            generation: 0,
            loaded_at: now,
            ttl: Duration::from_millis(100),
            load_time: Duration::from_millis(10),
            refreshing: AtomicBool::new(false),
        };
        let rate = |at: Instant| (0..10_000).filter(|_| e.wants_early_refresh(at)).count();
        let fresh = rate(now);
        let near = rate(now + Duration::from_millis(95));
        let expired = rate(now + Duration::from_millis(100));
        // exp(-100/10) ≈ 0.005 %, exp(-5/10) ≈ 61 %.
        assert!(fresh < 20, "{fresh}");
        assert!((5_000..7_000).contains(&near), "{near}");
        assert_eq!(expired, 10_000);
    }

    #[tokio::test]
    async fn a_disabled_cache_reads_through() {
        let one = OneJob::new(JobState::Available, Duration::ZERO);
        let store: Arc<dyn JobStore> = one.clone();
        let cache = JobCache::new(&JobCacheConfig {
            capacity: 0,
            ..JobCacheConfig::default()
        });
        cache.get(&store, one.id()).await.unwrap();
        cache.get(&store, one.id()).await.unwrap();
        assert_eq!(one.reads(), 2);
    }
}
