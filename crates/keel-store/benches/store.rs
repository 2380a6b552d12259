//! Store throughput on both backends: batch insert of 100 jobs, and lease + complete cycles
//! of 100 jobs. Criterion reports jobs/s (throughput in elements). The Postgres half runs
//! when `KEEL_TEST_DATABASE_URL` is set, in a schema of its own that is dropped afterwards.
//!
//! `cargo bench -p keel-store --bench store`
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keel_core::store::{Completion, LeaseParams, LeaseRef};
use keel_core::{Clock, JobKind, NewJob, QueueName, Store, SystemClock, WorkerId};
use keel_store::testkit::PgSchema;
use keel_store::{PgOptions, PgStore, SqliteOptions, SqliteStore};

const BATCH: usize = 100;

fn batch(queue: &QueueName) -> Vec<NewJob> {
    (0..BATCH)
        .map(|_| NewJob::new(JobKind::parse("noop").unwrap()).queue(queue.clone()))
        .collect()
}

async fn lease_complete(store: &dyn Store, queue: &QueueName) -> usize {
    let jobs = store
        .lease(LeaseParams {
            queue: queue.clone(),
            max: BATCH as u32,
            lease_for: Duration::from_secs(60),
            owner: WorkerId::parse("bench").unwrap(),
            tenant: None,
            kinds: Vec::new(),
        })
        .await
        .unwrap();
    let n = jobs.len();
    let done: Vec<Completion> = jobs
        .iter()
        .map(|j| Completion {
            lease: LeaseRef::of(j).unwrap(),
            result: None,
        })
        .collect();
    for r in store.complete(done).await.unwrap() {
        r.unwrap();
    }
    n
}

fn bench_backend(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    name: &str,
    store: &Arc<dyn Store>,
) {
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));

    let q = QueueName::parse("bench-insert").unwrap();
    group.bench_function(BenchmarkId::new("insert_batch_100", name), |b| {
        b.to_async(rt).iter(|| {
            let store = Arc::clone(store);
            let jobs = batch(&q);
            async move { store.insert(jobs).await.unwrap() }
        })
    });

    let q = QueueName::parse("bench-lease").unwrap();
    group.bench_function(BenchmarkId::new("lease_complete_100", name), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                // Untimed: stock exactly the jobs the timed loop will lease.
                for _ in 0..iters {
                    store.insert(batch(&q)).await.unwrap();
                }
                let start = Instant::now();
                for _ in 0..iters {
                    assert_eq!(lease_complete(store.as_ref(), &q).await, BATCH);
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

fn store_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    let dir = tempfile::tempdir().unwrap();
    let sqlite = rt.block_on(async {
        let s = SqliteStore::open(
            &dir.path().join("bench.db"),
            SqliteOptions::default(),
            Arc::clone(&clock),
        )
        .await
        .unwrap();
        s.migrate().await.unwrap();
        Arc::new(s) as Arc<dyn Store>
    });
    bench_backend(c, &rt, "sqlite", &sqlite);
    rt.block_on(sqlite.close());

    match std::env::var("KEEL_TEST_DATABASE_URL") {
        Ok(base) if !base.is_empty() => {
            let (schema, pg) = rt.block_on(async {
                let schema = PgSchema::create(&base).await;
                let s = PgStore::connect(&schema.url, PgOptions::default(), Arc::clone(&clock))
                    .await
                    .unwrap();
                s.migrate().await.unwrap();
                (schema, Arc::new(s) as Arc<dyn Store>)
            });
            bench_backend(c, &rt, "postgres", &pg);
            rt.block_on(pg.close());
            drop(schema);
        }
        _ => eprintln!("store bench: KEEL_TEST_DATABASE_URL not set, Postgres skipped"),
    }
}

criterion_group!(benches, store_benches);
criterion_main!(benches);
