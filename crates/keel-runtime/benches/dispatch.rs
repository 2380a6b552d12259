//! The dispatch path on a real SQLite store: lease a batch, run `noop` handlers, write the
//! completions (batched), announce the events. Reports jobs/s for draining a queue and
//! allocations per job.
//!
//! `cargo bench -p keel-runtime --bench dispatch`
#![allow(missing_docs, clippy::unwrap_used, clippy::print_stdout)]

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_core::{JobKind, JobState, NewJob, QueueName, Store, SystemClock};
use keel_runtime::{Handlers, QueueConfig, Runtime, RuntimeConfig, RuntimeHandle, WebhookConfig};
use keel_store::{SqliteOptions, SqliteStore};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const JOBS: usize = 2000;

/// Inserts `JOBS` noop jobs into the paused queue, resumes it, and waits until every one
/// has completed; returns the drain time.
async fn drain(store: &Arc<dyn Store>, handle: &RuntimeHandle, q: &QueueName) -> Duration {
    store.set_queue_paused(q.clone(), true).await.unwrap();
    for _ in 0..JOBS / 500 {
        let batch: Vec<NewJob> = (0..500)
            .map(|_| NewJob::new(JobKind::parse("noop").unwrap()).queue(q.clone()))
            .collect();
        store.insert(batch).await.unwrap();
    }
    let mut events = handle.events.subscribe();
    let start = Instant::now();
    store.set_queue_paused(q.clone(), false).await.unwrap();
    handle.wakeups.job_available(q);
    let mut done = 0;
    while done < JOBS {
        match events.recv().await {
            Ok(e) if e.state == JobState::Completed => done += 1,
            Ok(_) => {}
            Err(e) => panic!("event stream: {e}"),
        }
    }
    start.elapsed()
}

fn dispatch(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let q = QueueName::parse("bench").unwrap();
    let (store, handle, runtime) = rt.block_on(async {
        let s = SqliteStore::open(
            &dir.path().join("bench.db"),
            SqliteOptions::default(),
            Arc::new(SystemClock),
        )
        .await
        .unwrap();
        s.migrate().await.unwrap();
        let store: Arc<dyn Store> = Arc::new(s);
        let handle = RuntimeHandle::new([q.clone()], 65_536);
        let config = RuntimeConfig {
            queues: vec![QueueConfig {
                name: q.clone(),
                concurrency: 256,
            }],
            ..RuntimeConfig::default()
        };
        let runtime = Runtime::start(
            Arc::clone(&store),
            config,
            Handlers::builtin(&WebhookConfig::default()),
            handle.clone(),
        );
        (store, handle, runtime)
    });

    rt.block_on(async {
        let region = Region::new(GLOBAL);
        drain(&store, &handle, &q).await;
        let change = region.change();
        println!(
            "dispatch path (incl. insert): {:.1} allocations and {:.0} bytes per job",
            change.allocations as f64 / JOBS as f64,
            change.bytes_allocated as f64 / JOBS as f64
        );
    });

    let mut group = c.benchmark_group("runtime");
    group.throughput(Throughput::Elements(JOBS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("drain_2000_noop_sqlite", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += drain(&store, &handle, &q).await;
                }
                total
            })
        })
    });
    group.finish();
    rt.block_on(async {
        runtime.shutdown_within(Duration::from_secs(5)).await;
        store.close().await;
    });
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
