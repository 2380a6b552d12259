//! `/metrics` moves as traffic flows.

use std::time::Duration;

use keel_client::JobIn;
use serde_json::json;

use crate::both_backends;
use crate::helpers::{Backend, metric_value, spawn_app_with};

async fn metrics_follow_requests_and_jobs(backend: Backend, test: &str) {
    // A queue name of its own: the metrics recorder is shared by every app in this test
    // binary, so per-queue series are this test's alone.
    let queue = format!("m{}", uuid::Uuid::new_v4().simple());
    let Some(app) = spawn_app_with(backend, test, |a| a.queues = Some(format!("{queue}:4"))).await
    else {
        return;
    };
    let before = app.metrics().await;
    let posts_before = metric_value(
        &before,
        "http_requests_total",
        &[("method", "POST"), ("route", "/v1/jobs"), ("status", "201")],
    );
    let mut ids = Vec::new();
    for i in 0..3 {
        let job = JobIn {
            queue: Some(queue.clone()),
            ..JobIn::new("echo", json!({"i": i}))
        };
        ids.push(app.client.enqueue(&job, None).await.unwrap().job.id);
    }
    let failing = JobIn {
        queue: Some(queue.clone()),
        max_attempts: Some(1),
        ..JobIn::new("fail", json!({"times": 5}))
    };
    let failed = app.client.enqueue(&failing, None).await.unwrap().job.id;
    for id in &ids {
        app.wait_for(id, Duration::from_secs(10), |j| j.state == "completed")
            .await;
    }
    app.wait_for(&failed, Duration::from_secs(10), |j| j.state == "discarded")
        .await;
    let q = queue.as_str();
    // Counters are updated right after the store write the test observed: poll for them.
    let mut last = None;
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let after = app.metrics().await;
            let enqueued = metric_value(&after, "keel_jobs_enqueued_total", &[("queue", q)]);
            let completed = metric_value(
                &after,
                "keel_jobs_finished_total",
                &[("queue", q), ("outcome", "completed")],
            );
            let discarded = metric_value(
                &after,
                "keel_jobs_finished_total",
                &[("queue", q), ("outcome", "discarded")],
            );
            let durations =
                metric_value(&after, "keel_job_duration_seconds_count", &[("queue", q)]);
            let posts = metric_value(
                &after,
                "http_requests_total",
                &[("method", "POST"), ("route", "/v1/jobs"), ("status", "201")],
            );
            let got = (
                enqueued,
                completed,
                discarded,
                durations >= 4.0,
                posts - posts_before >= 4.0,
            );
            if got == (4.0, 3.0, 1.0, true, true) {
                return after;
            }
            last = Some(got);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let after = settled.unwrap_or_else(|_| panic!("metrics did not move as expected: {last:?}"));
    assert!(
        after.contains("http_request_duration_seconds"),
        "latency histogram missing"
    );
    // Every family says what it counts (what `promtool check metrics` asks in CI).
    let without_help: Vec<&str> = after
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split(' ').next())
        .filter(|name| !after.contains(&format!("# HELP {name} ")))
        .collect();
    assert!(
        without_help.is_empty(),
        "metric families without HELP: {without_help:?}"
    );
    app.stop().await;
}
both_backends!(metrics_follow_requests_and_jobs);
