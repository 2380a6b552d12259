//! The request log line: one per request, the right level, the 5xx cause, and no secrets or
//! payloads. A binary of its own, with a global subscriber: tracing caches per-callsite
//! interest process-wide, so a thread-local subscriber in a binary whose other tests log
//! from other threads misses events.
#![allow(clippy::unwrap_used)]

#[allow(dead_code)] // Shared with the main test binary; this one uses a few helpers.
#[path = "http/helpers.rs"]
mod helpers;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use keel_api::{ApiConfig, ApiKey};
use keel_core::TenantId;
use tracing_subscriber::fmt::MakeWriter;

use crate::helpers::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

#[tokio::test]
async fn one_line_per_request_with_the_cause_of_a_5xx_and_no_secrets() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_max_level(tracing::Level::INFO)
        .with_writer(captured.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let app = app_with(ApiConfig {
        api_keys: vec![ApiKey::new(
            TenantId::parse("acme").unwrap(),
            "key-do-not-log",
        )],
        ..Default::default()
    })
    .await;
    let body = r#"{"kind":"noop","args":{"card":"4242-payload-do-not-log"}}"#;
    app.store.set(Fault::Permanent);
    let r = app
        .send(
            json_request("/v1/jobs")
                .header("authorization", "Bearer key-do-not-log")
                .header("x-request-id", "log-test-1")
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    r.assert_problem(500, "internal");
    app.store.set(Fault::None);
    let missing = keel_core::JobId::new();
    app.send(
        axum::http::Request::get(format!("/v1/jobs/{missing}"))
            .header("authorization", "Bearer key-do-not-log")
            .header("x-request-id", "log-test-2")
            .body(Body::empty())
            .unwrap(),
    )
    .await;

    let lines = captured.lines();
    let request_lines: Vec<_> = lines
        .iter()
        .filter(|l| l["request_id"].is_string() && l["status"].is_u64())
        .collect();
    assert_eq!(request_lines.len(), 2, "{lines:#?}");

    let failed = request_lines[0];
    assert_eq!(failed["level"], "ERROR");
    assert_eq!(failed["request_id"], "log-test-1");
    assert_eq!(failed["method"], "POST");
    assert_eq!(failed["route"], "/v1/jobs");
    assert_eq!(failed["status"], 500);
    assert!(failed["duration_ms"].is_f64());
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("injected: table jobs is corrupt"),
        "{failed}"
    );

    let not_found = request_lines[1];
    assert_eq!(
        not_found["level"], "INFO",
        "a 404 is expected, not an error"
    );
    assert_eq!(
        not_found["route"], "/v1/jobs/{id}",
        "the matched route, not the path"
    );
    assert_eq!(not_found["status"], 404);

    let all = String::from_utf8_lossy(&captured.0.lock().unwrap()).to_string();
    assert!(!all.contains("key-do-not-log"), "the API key leaked: {all}");
    assert!(
        !all.contains("payload-do-not-log"),
        "the payload leaked: {all}"
    );
    assert!(
        !all.contains(&missing.to_string()),
        "ids stay out of the line: {all}"
    );
}
