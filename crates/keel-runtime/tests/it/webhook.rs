//! The webhook executor against a real HTTP server, and its SSRF guard.

use std::time::Duration;

use keel_core::{Backoff, JobState};
use keel_runtime::{Handlers, WebhookConfig};
use wiremock::matchers::{body_string, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::{config, enqueue, job, start, store, wait_for};

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
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
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
