//! Chaos, overload (G5): a real Keel process whose capacity is fixed by construction (an
//! admission limit of 4 requests in flight, each held 200 ms by injected store latency:
//! about 20 requests a second, on any machine however loaded) is offered 2 000 requests a
//! second on a fixed schedule (open model: the load does not slow down when the server
//! does). The excess is refused with 429/503 (never a 5xx of another kind, never a request
//! left without an answer), some requests are still served, and memory stays under a
//! stated bound.
//!
//! How fast the refusals are and how much goodput holds up against the real capacity are
//! performance figures, not test assertions: `keel bench` W4 measures them against their
//! targets (goodput ≥ 90 % of capacity, accepted p99 ≤ the request timeout, shed p99 ≤ 1 s,
//! peak RSS ≤ 512 MiB).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keel_bench::load::{LoadArgs, run};

use crate::both_backends;
use crate::child::{KeelProcess, rss_kib};
use crate::helpers::{Backend, CPU_HEAVY, database};

/// Requests a second offered: a hundred times the capacity built into the server below.
const OFFERED_PER_S: f64 = 2000.0;
const OVERLOAD_FOR: Duration = Duration::from_secs(10);
/// The most requests the generator keeps outstanding (and so connections).
const CLIENTS: usize = 2048;
/// Resident memory the server must stay under while overloaded.
const RSS_BOUND_MIB: u64 = 512;

async fn overload_is_shed_and_memory_stays_bounded(backend: Backend, test: &str) {
    let Some((url, _backing)) = database(backend, test).await else {
        return;
    };
    let _exclusive = CPU_HEAVY.lock().await;
    let keel = KeelProcess::start(
        &url,
        &[
            ("KEEL_REQUEST_TIMEOUT", "2s"),
            ("KEEL_ADMISSION_LIMIT_INITIAL", "4"),
            ("KEEL_ADMISSION_LIMIT_MIN", "4"),
            ("KEEL_ADMISSION_LIMIT_MAX", "4"),
            ("KEEL_CHAOS", "store_write.latency_ms=200"),
        ],
    )
    .await;

    // Overload, with the server's RSS sampled every 100 ms.
    let peak_kib = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pid) = (Arc::clone(&peak_kib), Arc::clone(&sampling), keel.pid());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let overload_args = LoadArgs {
        url: keel.base.clone(),
        api_key: None,
        rate: Some(OFFERED_PER_S),
        concurrency: None,
        duration: OVERLOAD_FOR,
        path: "/v1/jobs".to_owned(),
        body: r#"{"kind":"noop"}"#.to_owned(),
        get: false,
        max_in_flight: CLIENTS,
        json: None,
    };
    let overload = run(&overload_args).await.expect("overload run");
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let o = overload.to_json(&overload_args);
    let peak_mib = peak_kib.load(Ordering::Relaxed) / 1024;
    eprintln!(
        "[{test}] offered {OFFERED_PER_S:.0}/s for {OVERLOAD_FOR:?} to a server built for ~20/s: \
         accepted {} (p99 {} ms), shed {} (p99 {} ms), other {}, failed {}, not sent {}, \
         peak RSS {peak_mib} MiB",
        o["ok"],
        o["latency_ok"]["p99_ms"],
        o["shed"],
        o["latency_shed"]["p99_ms"],
        o["other_status"],
        o["failed"],
        o["unsent"],
    );

    assert!(
        peak_mib < RSS_BOUND_MIB,
        "peak RSS {peak_mib} MiB is over the {RSS_BOUND_MIB} MiB bound"
    );
    assert!(o["ok"].as_u64().unwrap() > 0, "nothing was accepted: {o}");
    assert!(o["shed"].as_u64().unwrap() > 0, "nothing was shed: {o}");
    assert_eq!(o["other_status"], 0, "answers other than 2xx/429/503: {o}");
    assert_eq!(o["failed"], 0, "requests without an answer: {o}");
    keel.stop(Duration::from_secs(15)).await;
}

both_backends!(overload_is_shed_and_memory_stays_bounded);
