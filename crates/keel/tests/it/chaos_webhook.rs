//! Chaos, bad webhook hosts: one host hangs, one answers `500` at once, a third is healthy,
//! and their jobs share one queue of 8 workers. The hanging host can hold at most its
//! per-host concurrency (4) of the workers, so the healthy host's jobs all complete while
//! the hanging host's requests are still unanswered (an order, not a timing); the failing
//! host's breaker opens, so most of its jobs fail without a request.

use std::time::Duration;

use keel_client::{Client, JobListQuery, JobOut};
use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::both_backends;
use crate::child::KeelProcess;
use crate::helpers::{Backend, database, metric_value, within};

const JOBS_PER_HOST: usize = 40;
/// The per-host concurrency limit given to Keel.
const HOST_CONCURRENCY: usize = 4;
/// Longer than the whole test: the hanging host answers nothing while it runs.
const HANG: Duration = Duration::from_secs(600);

fn tagged<'a>(jobs: &'a [JobOut], tag: &str) -> Vec<&'a JobOut> {
    jobs.iter()
        .filter(|j| j.tags.iter().any(|t| t == tag))
        .collect()
}

async fn bad_hosts_do_not_hold_up_a_healthy_one(backend: Backend, test: &str) {
    let Some((url, _backing)) = database(backend, test).await else {
        return;
    };
    let hanging = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(HANG))
        .mount(&hanging)
        .await;
    let failing = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&failing)
        .await;
    let good = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&good)
        .await;

    let concurrency = HOST_CONCURRENCY.to_string();
    let keel = KeelProcess::start(
        &url,
        &[
            ("KEEL_QUEUES", "default:8"),
            ("KEEL_WEBHOOK_ALLOW_PRIVATE", "true"),
            ("KEEL_WEBHOOK_HOST_CONCURRENCY", concurrency.as_str()),
            ("KEEL_WEBHOOK_HOST_WAIT", "200ms"),
            // The hanging host's jobs are released at shutdown, after this.
            ("KEEL_SHUTDOWN_GRACE", "2s"),
        ],
    )
    .await;
    let client = Client::new(keel.base.clone(), None).unwrap();
    let http = reqwest::Client::new();
    let webhook = |target: &str, tag: &str| {
        json!({
            "kind": "webhook",
            "args": {"url": format!("{target}/hook"), "body": {"n": 1}},
            "max_attempts": 1,
            "tags": [tag],
        })
    };
    for _ in 0..JOBS_PER_HOST {
        for (target, tag) in [
            (hanging.uri(), "hanging"),
            (failing.uri(), "failing"),
            (good.uri(), "good"),
        ] {
            let resp = http
                .post(keel.url("/v1/jobs"))
                .json(&webhook(&target, tag))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        }
    }

    let jobs = within(
        Duration::from_secs(120),
        "every job finishing but those the hanging host holds",
        async {
            loop {
                let page = client
                    .list_jobs(&JobListQuery {
                        limit: Some(1000),
                        ..JobListQuery::default()
                    })
                    .await
                    .unwrap();
                let finished = |tag: &str| {
                    tagged(&page.jobs, tag)
                        .iter()
                        .filter(|j| j.finished_at.is_some())
                        .count()
                };
                // The hanging host's jobs that got no slot have given up (host busy); the
                // ones it holds are still waiting on it.
                let holding = hanging.received_requests().await.unwrap().len();
                if page.jobs.len() == 3 * JOBS_PER_HOST
                    && finished("good") == JOBS_PER_HOST
                    && finished("failing") == JOBS_PER_HOST
                    && finished("hanging") + holding == JOBS_PER_HOST
                {
                    return page.jobs;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    // Read at the moment the healthy host's work was seen finished: the hanging host still
    // holds its requests (it has answered none), and holds no more workers than its limit.
    let metrics = keel.metrics(&http).await;
    let hanging_requests = hanging.received_requests().await.unwrap().len();

    let good_jobs = tagged(&jobs, "good");
    assert!(
        good_jobs
            .iter()
            .all(|j| j.state == "completed" && j.attempt == 1),
        "{good_jobs:?}"
    );
    let held = tagged(&jobs, "hanging")
        .into_iter()
        .filter(|j| j.state == "running")
        .count();
    assert!(
        (1..=HOST_CONCURRENCY).contains(&held),
        "the hanging host holds {held} workers (limit {HOST_CONCURRENCY})"
    );
    assert_eq!(
        hanging_requests, held,
        "every request the hanging host received is still unanswered"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "keel_webhook_requests_total",
            &[("outcome", "timeout")]
        ),
        0.0,
        "no request to the hanging host ended before the healthy host's jobs did"
    );

    // The failing host's breaker opened: most of its jobs failed without a request.
    let failing_jobs = tagged(&jobs, "failing");
    assert!(
        failing_jobs.iter().all(|j| j.state == "discarded"),
        "{failing_jobs:?}"
    );
    let reached_failing = failing.received_requests().await.unwrap().len();
    assert!(
        reached_failing < JOBS_PER_HOST / 2,
        "the breaker should have spared the failing host most requests: {reached_failing} of {JOBS_PER_HOST}"
    );
    let fast_failed = failing_jobs
        .iter()
        .filter(|j| j.errors.iter().any(|e| e.message.contains("circuit")))
        .count();
    assert!(
        fast_failed > 0,
        "no job failed fast on the open circuit: {failing_jobs:?}"
    );
    assert!(
        metric_value(
            &metrics,
            "keel_webhook_requests_total",
            &[("outcome", "circuit_open")]
        ) > 0.0
    );
    eprintln!(
        "[{test}] hanging host held {held} workers; failing host reached {reached_failing} times for \
         {JOBS_PER_HOST} jobs ({fast_failed} failed fast); all {JOBS_PER_HOST} healthy jobs completed"
    );
    keel.stop(Duration::from_secs(30)).await;
}

both_backends!(bad_hosts_do_not_hold_up_a_healthy_one);
