//! Chaos, database outage (Postgres): Keel reaches Postgres through a TCP proxy the test
//! controls. Cutting the proxy drops every connection and refuses new ones, as a failed
//! database host or a network partition would. During the outage every request must fail
//! with `503` (refused, not left to run into the deadline, which would be a `504`),
//! `/readyz` must say so and the breaker must open; after the proxy is restored the same
//! process must serve again, having lost no acknowledged job. How fast each of these
//! happens is measured and printed, not asserted (timings belong to `keel bench`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use keel_client::JobOut;
use keel_store::testkit::{PgSchema, pg_url_or_skip};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::child::KeelProcess;
use crate::helpers::{metric_value, within};

/// A TCP proxy to one upstream that can be cut and restored.
pub(crate) struct Proxy {
    /// Where clients connect.
    pub(crate) addr: SocketAddr,
    cut: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
    /// Connections refused while cut.
    refused: Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    pub(crate) async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, watching) = watch::channel(false);
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&refused);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut cut_now = watching.clone();
                if *cut_now.borrow() {
                    // Refused: closed at once, as a dead host's firewall would.
                    drop(inbound);
                    counted.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        // Both sockets are dropped here: every connection breaks at once.
                        _ = cut_now.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self {
            addr,
            cut,
            accept,
            refused,
        }
    }

    /// Connections refused while cut, so far.
    pub(crate) fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    pub(crate) fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// `url` with its `host:port` replaced by `addr`.
pub(crate) fn through(url: &str, addr: SocketAddr) -> String {
    let config: tokio_postgres::Config = url.parse().expect("a Postgres URL");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        other => panic!("the test database must be reached over TCP, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let authority = format!("{host}:{port}");
    assert!(
        url.contains(&authority),
        "{url} must name {authority} explicitly"
    );
    url.replacen(&authority, &addr.to_string(), 1)
}

async fn enqueue(http: &reqwest::Client, keel: &KeelProcess) -> (u16, Option<String>) {
    let resp = http
        .post(keel.url("/v1/jobs"))
        .json(&json!({"kind": "noop"}))
        .send()
        .await;
    match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let id = if r.status().is_success() {
                r.json::<JobOut>().await.ok().map(|j| j.id.to_string())
            } else {
                None
            };
            (status, id)
        }
        Err(_) => (0, None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_fast_and_recovers() {
    let Some(base) = pg_url_or_skip("chaos_outage::postgres_outage_fails_fast_and_recovers") else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    let config: tokio_postgres::Config = base.parse().unwrap();
    let upstream = match (config.get_hosts().first(), config.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(h)), port) => {
            format!("{h}:{}", port.copied().unwrap_or(5432))
        }
        other => panic!("the test database must be reached over TCP: {other:?}"),
    };
    let proxy = Proxy::start(upstream).await;
    let keel = KeelProcess::start(
        &through(&schema.url, proxy.addr),
        &[
            ("KEEL_QUEUES", "default:8"),
            ("KEEL_REQUEST_TIMEOUT", "2s"),
            ("KEEL_DB_ACQUIRE_TIMEOUT", "1s"),
        ],
    )
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let mut acked = Vec::new();
    for _ in 0..100 {
        let (status, id) = enqueue(&http, &keel).await;
        assert_eq!(status, 201, "before the outage");
        acked.push(id.unwrap());
    }

    // The outage: 8 clients keep enqueuing until the breaker is seen open.
    proxy.set_cut(true);
    let outage_started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = JoinSet::new();
    for _ in 0..8 {
        let http = http.clone();
        let url = keel.url("/v1/jobs");
        let stop = Arc::clone(&stop);
        clients.spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let resp = http.post(&url).json(&json!({"kind": "noop"})).send().await;
                let status = resp.map(|r| r.status().as_u16()).unwrap_or(0);
                seen.push((status, started.elapsed()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        });
    }
    // The probes and the gauge show the outage: readiness fails and the breaker opens.
    within(
        Duration::from_secs(30),
        "/readyz failing during the outage",
        async {
            while http.get(keel.url("/readyz")).send().await.unwrap().status() != 503 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    within(
        Duration::from_secs(30),
        "the database breaker opening",
        async {
            loop {
                let metrics = keel.metrics(&http).await;
                let state = metric_value(
                    &metrics,
                    "keel_circuit_state",
                    &[("dependency", "database")],
                );
                if state == 2.0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    // One more request with the breaker open: refused by it, not sent to the database.
    let refused = http
        .post(keel.url("/v1/jobs"))
        .json(&json!({"kind": "noop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    while let Some(seen) = clients.join_next().await {
        answers.extend(seen.unwrap());
    }
    let outage = outage_started.elapsed();

    // Every answer during the outage was a 503: refused, never a 504 from waiting out the
    // 2 s deadline on a database that is not there, never a 500.
    assert!(!answers.is_empty(), "no request during the outage");
    let not_503: Vec<_> = answers.iter().filter(|(s, _)| *s != 503).collect();
    assert!(
        not_503.is_empty(),
        "answers other than 503 during the outage: {not_503:?}"
    );
    let mut latencies: Vec<_> = answers.iter().map(|(_, d)| *d).collect();
    latencies.sort();
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];

    // Recovery: the same process serves again once the database is back.
    proxy.set_cut(false);
    let restored = Instant::now();
    let recovered_after = within(
        Duration::from_secs(60),
        "recovery after the outage",
        async {
            loop {
                let (status, id) = enqueue(&http, &keel).await;
                if status == 201 {
                    acked.push(id.unwrap());
                    return restored.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    within(Duration::from_secs(30), "/readyz after recovery", async {
        while http.get(keel.url("/readyz")).send().await.unwrap().status() != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    for id in &acked {
        let resp = http
            .get(keel.url(&format!("/v1/jobs/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "acknowledged job {id} lost");
    }
    eprintln!(
        "[chaos_outage] outage {:.1} s: {} requests, all 503, p50 {:?}, p99 {p99:?}, max {:?}; \
         serving again {recovered_after:?} after the restore; {} acknowledged jobs all found",
        outage.as_secs_f64(),
        answers.len(),
        latencies[latencies.len() / 2],
        latencies.last().unwrap(),
        acked.len()
    );
    assert!(
        keel.terminate(Duration::from_secs(15))
            .await
            .is_some_and(|s| s.success()),
        "Keel must stop cleanly after the outage"
    );
}
