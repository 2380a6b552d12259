//! Chaos, bad webhook host: one host answers `500` slowly, another answers at once. The bad
//! host's breaker opens, so most of its jobs fail without a request, and jobs to the healthy
//! host keep their latency — a failing host does not take the workers with it.

use std::time::Duration;

use keel_client::{Client, JobOut, ListQuery};
use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::both_backends;
use crate::child::KeelProcess;
use crate::helpers::{Backend, database, metric_value, within};

const JOBS_PER_HOST: usize = 40;
const BAD_HOST_DELAY: Duration = Duration::from_millis(300);

fn latency_ms(job: &JobOut) -> f64 {
    let parse = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap();
    let finished = job.finished_at.as_deref().expect("finished job");
    (parse(finished) - parse(&job.created_at))
        .num_microseconds()
        .unwrap() as f64
        / 1000.0
}

async fn a_failing_host_does_not_slow_a_healthy_one(backend: Backend, test: &str) {
    let Some((url, _backing)) = database(backend, test).await else {
        return;
    };
    let bad = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500).set_delay(BAD_HOST_DELAY))
        .mount(&bad)
        .await;
    let good = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&good)
        .await;

    let keel = KeelProcess::start(
        &url,
        &[
            ("KEEL_QUEUES", "default:8"),
            ("KEEL_WEBHOOK_ALLOW_PRIVATE", "true"),
            ("KEEL_WEBHOOK_HOST_CONCURRENCY", "4"),
            ("KEEL_WEBHOOK_HOST_WAIT", "200ms"),
        ],
    )
    .await;
    let client = Client::new(keel.base.clone(), None).unwrap();
    let http = reqwest::Client::new();
    let webhook = |target: &str| {
        json!({
            "kind": "webhook",
            "args": {"url": target, "body": {"n": 1}},
            "max_attempts": 1,
            "tags": [if target.starts_with(&bad.uri()) { "bad" } else { "good" }],
        })
    };
    let (bad_url, good_url) = (
        format!("{}/hook", bad.uri()),
        format!("{}/hook", good.uri()),
    );
    for _ in 0..JOBS_PER_HOST {
        for target in [&bad_url, &good_url] {
            let resp = http
                .post(keel.url("/v1/jobs"))
                .json(&webhook(target))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let jobs = within(
        Duration::from_secs(60),
        "every webhook job finishing",
        async {
            loop {
                let page = client
                    .list_jobs(&ListQuery {
                        limit: Some(1000),
                        ..ListQuery::default()
                    })
                    .await
                    .unwrap();
                if page.jobs.len() == 2 * JOBS_PER_HOST
                    && page.jobs.iter().all(|j| j.finished_at.is_some())
                {
                    return page.jobs;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;

    let (good_jobs, bad_jobs): (Vec<_>, Vec<_>) = jobs
        .iter()
        .partition(|j| j.tags.iter().any(|t| t == "good"));
    assert!(
        good_jobs.iter().all(|j| j.state == "completed"),
        "{good_jobs:?}"
    );
    assert!(
        bad_jobs.iter().all(|j| j.state == "discarded"),
        "{bad_jobs:?}"
    );
    let mut good_ms: Vec<f64> = good_jobs.iter().map(|j| latency_ms(j)).collect();
    good_ms.sort_by(f64::total_cmp);
    let good_p99 = good_ms[(good_ms.len() * 99 / 100).min(good_ms.len() - 1)];
    // A healthy host's job waits for no bad one: far below one bad answer's delay.
    assert!(
        good_p99 < BAD_HOST_DELAY.as_secs_f64() * 1000.0,
        "jobs to the healthy host waited: p99 {good_p99:.1} ms ({good_ms:?})"
    );

    let reached_bad = bad.received_requests().await.unwrap().len();
    assert!(
        reached_bad < JOBS_PER_HOST / 2,
        "the breaker should have spared the bad host most requests: {reached_bad} of {JOBS_PER_HOST}"
    );
    let fast_failed = bad_jobs
        .iter()
        .filter(|j| j.errors.iter().any(|e| e.message.contains("circuit")))
        .count();
    assert!(
        fast_failed > 0,
        "no job failed fast on the open circuit: {bad_jobs:?}"
    );
    let metrics = keel.metrics(&http).await;
    assert!(
        metric_value(
            &metrics,
            "keel_webhook_requests_total",
            &[("outcome", "circuit_open")]
        ) > 0.0
    );
    eprintln!(
        "[{test}] bad host reached {reached_bad} times for {JOBS_PER_HOST} jobs ({fast_failed} failed fast); \
         healthy host p50 {:.1} ms, p99 {good_p99:.1} ms",
        good_ms[good_ms.len() / 2]
    );
    keel.terminate(Duration::from_secs(15)).await;
}

both_backends!(a_failing_host_does_not_slow_a_healthy_one);
