//! The webhook executor against real HTTP servers: outcomes, the SSRF guard, per-host
//! circuit breaker and concurrency limit, Retry-After, signatures and fault injection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use keel_core::{Backoff, JobState};
use keel_resilience::{BreakerConfig, Chaos, ChaosSettings, Fault};
use keel_runtime::{Handlers, SigningSecret, WebhookConfig, executors};
use sha2::Sha256;
use tokio::sync::Semaphore;
use wiremock::matchers::{body_string, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{
    config, enqueue, eventually, job, kind, now, run_until, start, store, wait_for,
};

fn webhook_job(url: &str) -> keel_core::NewJob {
    let args = format!(
        r#"{{"url": "{url}", "body": {{"event": "paid",  "amount": 42}}, "headers": {{"x-signature": "s3cret"}}}}"#
    );
    job("hooks", "webhook", &args)
        .max_attempts(3)
        .backoff(Backoff::Fixed {
            delay_ms: 3_600_000,
        })
        .timeout(Duration::from_secs(10))
}

/// A webhook target answering every POST with `response`, and (when given) expecting
/// exactly `expect` of them, checked when it is dropped.
async fn answering(response: ResponseTemplate, expect: Option<u64>) -> MockServer {
    let server = MockServer::start().await;
    let mock = Mock::given(method("POST")).respond_with(response);
    match expect {
        Some(n) => mock.expect(n),
        None => mock,
    }
    .mount(&server)
    .await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_decide_the_outcome() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/ok"))
        .and(header("content-type", "application/json"))
        .and(header("x-signature", "s3cret"))
        .and(body_string(r#"{"event": "paid",  "amount": 42}"#))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(path("/broken"))
        .respond_with(ResponseTemplate::new(500))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(path("/gone"))
        .respond_with(ResponseTemplate::new(404))
        .expect(1)
        .mount(&server)
        .await;

    let (_dir, store) = store().await;
    let mut cfg = config(&[("hooks", 4)]);
    cfg.webhook = WebhookConfig {
        allow_private: true,
        ..WebhookConfig::default()
    };
    let rt = start(&store, cfg.clone(), Handlers::builtin(&cfg.webhook));
    let base = server.uri();
    let ids: Vec<_> = enqueue(
        &rt,
        &store,
        vec![
            webhook_job(&format!("{base}/ok")),
            webhook_job(&format!("{base}/broken")),
            webhook_job(&format!("{base}/gone")),
        ],
    )
    .await
    .iter()
    .map(|j| j.id)
    .collect();

    let ok = wait_for(&store, ids[0], "the 200 to complete", |j| {
        j.state == JobState::Completed
    })
    .await;
    assert_eq!(ok.result.unwrap().get(), r#"{"status":200}"#);

    let broken = wait_for(&store, ids[1], "the 500 to be retryable", |j| {
        j.state == JobState::Retryable
    })
    .await;
    assert!(
        broken.errors[0].message.contains("500"),
        "{}",
        broken.errors[0].message
    );

    let gone = wait_for(&store, ids[2], "the 404 to be discarded", |j| {
        j.state == JobState::Discarded
    })
    .await;
    assert_eq!(gone.attempt, 1, "a 404 is not retried");
    assert!(
        gone.errors[0].message.contains("404"),
        "{}",
        gone.errors[0].message
    );
    // No secret from the headers made it into the recorded errors.
    assert!(!gone.errors[0].message.contains("s3cret"));

    rt.shutdown().await;
    server.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_before_any_request() {
    let server = answering(ResponseTemplate::new(200), Some(0)).await;
    let port = server.address().port();

    let (_dir, store) = store().await;
    let cfg = config(&[("hooks", 4)]);
    assert!(!cfg.webhook.allow_private, "refusal is the default");
    let rt = start(&store, cfg.clone(), Handlers::builtin(&cfg.webhook));
    let urls = [
        format!("http://127.0.0.1:{port}/ok"),
        format!("http://localhost:{port}/ok"),
        "http://10.0.0.1/".to_owned(),
        "http://[::1]/".to_owned(),
    ];
    let ids: Vec<_> = enqueue(&rt, &store, urls.iter().map(|u| webhook_job(u)).collect())
        .await
        .iter()
        .map(|j| j.id)
        .collect();
    for (id, url) in ids.into_iter().zip(&urls) {
        let job = wait_for(&store, id, &format!("{url} to be refused"), |j| {
            j.state == JobState::Discarded
        })
        .await;
        assert_eq!(job.attempt, 1, "{url}: refusal is permanent");
        let message = &job.errors[0].message;
        assert!(
            message.contains("resolves to a private or loopback address")
                && message.contains("KEEL_WEBHOOK_ALLOW_PRIVATE=true"),
            "{url}: {message}"
        );
    }
    rt.shutdown().await;
    assert!(server.received_requests().await.unwrap().is_empty());
}

/// A runtime whose `webhook` kind is `hook`, so the test can read its per-host state.
fn start_with(
    store: &std::sync::Arc<dyn keel_core::Store>,
    cfg: &keel_runtime::RuntimeConfig,
    hook: &executors::Webhook,
) -> keel_runtime::Runtime {
    let mut handlers = Handlers::builtin(&cfg.webhook);
    handlers.register(kind("webhook"), Arc::new(hook.clone()));
    start(store, cfg.clone(), handlers)
}

fn local(cfg: &mut keel_runtime::RuntimeConfig) {
    cfg.webhook.allow_private = true;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_host_opens_its_circuit_and_healthy_hosts_keep_working() {
    let bad = answering(ResponseTemplate::new(500), None).await;
    let good = answering(ResponseTemplate::new(200), None).await;

    let (_dir, store) = store().await;
    let mut cfg = config(&[("hooks", 4)]);
    local(&mut cfg);
    cfg.webhook.breaker = BreakerConfig {
        consecutive_failures: 3,
        open_for: Duration::from_secs(30),
        ..BreakerConfig::default()
    };
    let hook = executors::Webhook::new(&cfg.webhook);
    let rt = start_with(&store, &cfg, &hook);
    let to = |server: &MockServer| {
        webhook_job(&format!("{}/hook", server.uri())).backoff(Backoff::Fixed { delay_ms: 1000 })
    };

    // Three 500s in a row open the bad host's circuit.
    let first: Vec<_> = enqueue(&rt, &store, (0..3).map(|_| to(&bad)).collect()).await;
    for j in &first {
        let failed = wait_for(&store, j.id, "a 500 to be recorded", |j| {
            j.state == JobState::Retryable
        })
        .await;
        assert!(
            failed.errors[0].message.contains("500"),
            "{:?}",
            failed.errors
        );
    }
    assert_eq!(bad.received_requests().await.unwrap().len(), 3);
    assert_eq!(hook.open_hosts(), 1);

    // Later jobs to it fail at once, without a request, and retry when the circuit will
    // probe again (30 s, longer than their 1 s backoff); jobs to the good host complete.
    let before = now();
    let later: Vec<_> = enqueue(
        &rt,
        &store,
        vec![
            to(&bad),
            to(&good),
            to(&bad),
            to(&good),
            to(&bad),
            to(&good),
        ],
    )
    .await;
    for (i, j) in later.iter().enumerate() {
        if i % 2 == 1 {
            let done = wait_for(&store, j.id, "a job to the good host to complete", |j| {
                j.state == JobState::Completed
            })
            .await;
            assert_eq!(done.result.unwrap().get(), r#"{"status":200}"#);
            continue;
        }
        let refused = wait_for(&store, j.id, "a job to the bad host to fail fast", |j| {
            j.state == JobState::Retryable
        })
        .await;
        let message = &refused.errors[0].message;
        assert!(
            message.contains("circuit")
                && message.contains("open")
                && message.contains("no request was sent"),
            "{message}"
        );
        let wait = refused.run_at - before;
        assert!(
            wait > chrono::TimeDelta::seconds(20) && wait <= chrono::TimeDelta::seconds(31),
            "retried at the probe, not after the 1 s backoff: {wait}"
        );
    }
    assert_eq!(
        bad.received_requests().await.unwrap().len(),
        3,
        "no request reached the host while its circuit was open"
    );
    assert_eq!(good.received_requests().await.unwrap().len(), 3);
    assert_eq!(hook.open_hosts(), 1);
    assert_eq!(hook.tracked_hosts(), 2);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_a_429_sets_the_next_run() {
    let server = answering(
        ResponseTemplate::new(429).insert_header("retry-after", "120"),
        Some(1),
    )
    .await;
    let (_dir, store) = store().await;
    let mut cfg = config(&[("hooks", 2)]);
    local(&mut cfg);
    let rt = start(&store, cfg.clone(), Handlers::builtin(&cfg.webhook));

    // The job's own backoff is an hour: only the header can make it 120 s.
    let before = now();
    let job = run_until(
        &rt,
        &store,
        webhook_job(&format!("{}/x", server.uri())),
        JobState::Retryable,
        "the 429 to be recorded",
    )
    .await;
    let after = now();
    let asked = chrono::TimeDelta::seconds(120);
    assert!(
        job.run_at >= before + asked && job.run_at <= after + asked,
        "run_at {} not in [{}, {}]",
        job.run_at,
        before + asked,
        after + asked
    );
    assert!(
        job.errors[0].message.contains("429") && job.errors[0].message.contains("Retry-After"),
        "{}",
        job.errors[0].message
    );
    rt.shutdown().await;
    server.verify().await;
}

/// A receiver that holds every request until the test lets it go, counting how many it
/// holds at once.
struct Gate {
    in_flight: AtomicUsize,
    most: AtomicUsize,
    received: AtomicUsize,
    release: Semaphore,
}

impl Gate {
    fn closed() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            received: AtomicUsize::new(0),
            release: Semaphore::new(0),
        }
    }
}

async fn held(State(gate): State<Arc<Gate>>) -> axum::http::StatusCode {
    let now = gate.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    gate.most.fetch_max(now, Ordering::SeqCst);
    gate.received.fetch_add(1, Ordering::SeqCst);
    if let Ok(permit) = gate.release.acquire().await {
        permit.forget();
    }
    gate.in_flight.fetch_sub(1, Ordering::SeqCst);
    axum::http::StatusCode::OK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_host_concurrency_limit_holds_at_the_receiver() {
    let gate = Arc::new(Gate::closed());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/hook", post(held))
        .with_state(Arc::clone(&gate));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let (_dir, store) = store().await;
    let mut cfg = config(&[("hooks", 6)]);
    local(&mut cfg);
    cfg.webhook.host_concurrency = 2;
    cfg.webhook.host_wait = Duration::from_secs(60);
    let rt = start(&store, cfg.clone(), Handlers::builtin(&cfg.webhook));
    let url = format!("http://{addr}/hook");
    let jobs: Vec<_> = (0..6)
        .map(|_| webhook_job(&url).timeout(Duration::from_secs(60)))
        .collect();
    let ids: Vec<_> = enqueue(&rt, &store, jobs)
        .await
        .iter()
        .map(|j| j.id)
        .collect();

    // All six run (six workers), but only two requests reach the receiver.
    eventually("six jobs running and two requests held", || async {
        let running = store.queue_stats(None).await.unwrap()[0].counts.running;
        let held = gate.in_flight.load(Ordering::SeqCst);
        if running == 6 && held == 2 {
            Ok(())
        } else {
            Err((running, held))
        }
    })
    .await;
    // Let them through one at a time: each finished request lets exactly one more in.
    for done in 1..=6u64 {
        gate.release.add_permits(1);
        eventually("one more job to complete", || async {
            let completed = store.queue_stats(None).await.unwrap()[0].counts.completed;
            if completed >= done {
                Ok(())
            } else {
                Err(completed)
            }
        })
        .await;
        let want = (6 - done as usize).min(2);
        eventually("the next request to arrive", || async {
            let held = gate.in_flight.load(Ordering::SeqCst);
            if held == want { Ok(()) } else { Err(held) }
        })
        .await;
    }
    for id in ids {
        wait_for(&store, id, "every job to complete", |j| {
            j.state == JobState::Completed
        })
        .await;
    }
    assert_eq!(gate.received.load(Ordering::SeqCst), 6);
    assert_eq!(
        gate.most.load(Ordering::SeqCst),
        2,
        "never more than the limit at once"
    );
    rt.shutdown().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_verify_with_the_standard_webhooks_scheme() {
    let server = answering(ResponseTemplate::new(204), Some(1)).await;
    let key = [42u8; 32];
    let secret = format!("whsec_{}", BASE64.encode(key));
    let (_dir, store) = store().await;
    let mut cfg = config(&[("hooks", 2)]);
    local(&mut cfg);
    cfg.webhook.signing_secret = Some(SigningSecret::parse(&secret).unwrap());
    let rt = start(&store, cfg.clone(), Handlers::builtin(&cfg.webhook));

    let before = now().timestamp();
    let id = enqueue(
        &rt,
        &store,
        vec![webhook_job(&format!("{}/signed", server.uri()))],
    )
    .await[0]
        .id;
    wait_for(&store, id, "the signed request to complete", |j| {
        j.state == JobState::Completed
    })
    .await;
    let after = now().timestamp();

    let requests = server.received_requests().await.unwrap();
    let request = &requests[0];
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let webhook_id = header("webhook-id");
    let timestamp = header("webhook-timestamp");
    let signature = header("webhook-signature");
    assert_eq!(webhook_id, id.to_string());
    let ts: i64 = timestamp.parse().unwrap();
    assert!(
        (before..=after).contains(&ts),
        "{ts} not in [{before}, {after}]"
    );

    // Verify as a receiver would: HMAC-SHA256 over "{id}.{timestamp}.{body}".
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{webhook_id}.{timestamp}.").as_bytes());
    mac.update(&request.body);
    let expected = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
    assert_eq!(signature, expected);
    assert_eq!(request.body, br#"{"event": "paid",  "amount": 42}"#);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_webhook_errors_fail_the_attempt_without_a_request() {
    let server = answering(ResponseTemplate::new(200), Some(0)).await;
    let (_dir, store) = store().await;
    let mut cfg = config(&[("hooks", 2)]);
    local(&mut cfg);
    cfg.webhook.chaos = Chaos::new(ChaosSettings {
        webhook: Fault {
            latency_ms: 0,
            error_rate: 1.0,
        },
        ..ChaosSettings::default()
    });
    let rt = start(&store, cfg.clone(), Handlers::builtin(&cfg.webhook));
    let job = run_until(
        &rt,
        &store,
        webhook_job(&format!("{}/x", server.uri())),
        JobState::Retryable,
        "the injected failure to be recorded",
    )
    .await;
    assert!(
        job.errors[0].message.contains("injected by chaos"),
        "{}",
        job.errors[0].message
    );
    rt.shutdown().await;
    server.verify().await;
}
