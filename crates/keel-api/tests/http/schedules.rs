//! `/v1/schedules`: create, replace, read with next ticks, list by pages, pause, resume,
//! delete; 404, 409 and 422 answers; tenant scoping.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use keel_api::{ApiConfig, ApiKey};
use keel_core::TenantId;
use serde_json::Value;

use crate::helpers::*;

const NIGHTLY: &str = r#"{"name":"nightly","cron":"0 3 * * *","timezone":"Europe/Paris",
    "job":{"kind":"webhook","args":{"url":"https://example.com/hook"},"priority":2},
    "catch_up":"30m"}"#;

fn ticks(s: &Value) -> Vec<chrono::DateTime<chrono::Utc>> {
    s["next_ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn create_read_and_refuse_a_duplicate() {
    let app = app().await;
    let r = app.post_json("/v1/schedules", NIGHTLY).await;
    r.assert_status(StatusCode::CREATED);
    assert_eq!(r.header("location"), Some("/v1/schedules/nightly"));
    let s = r.json();
    assert_eq!(s["name"], "nightly");
    assert_eq!(s["tenant"], "default");
    assert_eq!(s["cron"], "0 3 * * *");
    assert_eq!(s["timezone"], "Europe/Paris");
    assert_eq!(s["paused"], false);
    assert_eq!(s["catch_up"], 30 * 60 * 1000);
    assert_eq!(s["job"]["kind"], "webhook");
    assert_eq!(s["job"]["priority"], 2);
    assert_eq!(s["job"]["queue"], "default");
    assert_eq!(s["job"]["args"]["url"], "https://example.com/hook");
    assert!(s["last_tick_at"].is_null());
    let next = ticks(&s);
    assert_eq!(next.len(), 5);
    assert!(next.windows(2).all(|w| w[0] < w[1]), "{next:?}");
    assert!(next[0] > chrono::Utc::now());
    for t in &next {
        // 03:00 in Paris is 01:00 or 02:00 UTC depending on the season.
        let paris = t.with_timezone(&chrono_tz::Europe::Paris);
        assert_eq!(paris.format("%H:%M").to_string(), "03:00", "{t}");
    }

    let got = app.get("/v1/schedules/nightly").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["next_ticks"], s["next_ticks"]);

    let p = app
        .post_json("/v1/schedules", NIGHTLY)
        .await
        .assert_problem(409, "conflict");
    assert!(p["detail"].as_str().unwrap().contains("nightly"), "{p}");
}

#[tokio::test]
async fn put_creates_then_replaces() {
    let app = app().await;
    let body = r#"{"cron":"*/5 * * * *","job":{"kind":"noop"}}"#;
    let r = app.put_json("/v1/schedules/poll", body).await;
    r.assert_status(StatusCode::CREATED);
    let created = r.json();
    assert_eq!(created["timezone"], "UTC");
    assert_eq!(created["catch_up"], 3_600_000);

    let r = app
        .put_json(
            "/v1/schedules/poll",
            r#"{"name":"poll","cron":"*/10 * * * *","job":{"kind":"noop"},"paused":true}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let replaced = r.json();
    assert_eq!(replaced["cron"], "*/10 * * * *");
    assert_eq!(replaced["paused"], true);
    assert_eq!(replaced["next_ticks"], serde_json::json!([]), "paused");
    assert_eq!(replaced["created_at"], created["created_at"]);

    let p = app
        .put_json(
            "/v1/schedules/poll",
            r#"{"name":"other","cron":"* * * * *","job":{"kind":"noop"}}"#,
        )
        .await
        .assert_problem(422, "validation");
    assert_eq!(p["errors"][0]["field"], "name");
    app.put_json("/v1/schedules/bad%20name", body)
        .await
        .assert_problem(400, "malformed-request");
}

#[tokio::test]
async fn list_pages_by_name() {
    let app = app().await;
    for name in ["c", "a", "b"] {
        let body = format!(r#"{{"name":"{name}","cron":"@hourly","job":{{"kind":"noop"}}}}"#);
        assert_eq!(
            app.post_json("/v1/schedules", &body).await.status,
            StatusCode::CREATED
        );
    }
    let page = app.get("/v1/schedules?limit=2").await.json();
    let names: Vec<_> = page["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(page["next"], "b");
    let rest = app.get("/v1/schedules?limit=2&after=b").await.json();
    assert_eq!(rest["schedules"][0]["name"], "c");
    assert!(rest["next"].is_null());
    let other = app.get("/v1/schedules?tenant=globex").await.json();
    assert_eq!(other["schedules"], serde_json::json!([]));

    let p = app
        .get("/v1/schedules?limit=0&page=2")
        .await
        .assert_problem(400, "invalid-query");
    assert_eq!(p["errors"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn pause_resume_and_delete() {
    let app = app().await;
    app.post_json("/v1/schedules", NIGHTLY).await;
    let paused = app.post("/v1/schedules/nightly/pause").await;
    assert_eq!(paused.status, StatusCode::OK);
    let paused = paused.json();
    assert_eq!(paused["paused"], true);
    assert!(ticks(&paused).is_empty());
    let resumed = app.post("/v1/schedules/nightly/resume").await.json();
    assert_eq!(resumed["paused"], false);
    assert_eq!(ticks(&resumed).len(), 5);

    let r = app.delete("/v1/schedules/nightly").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(r.body.is_empty());
    for r in [
        app.get("/v1/schedules/nightly").await,
        app.delete("/v1/schedules/nightly").await,
        app.post("/v1/schedules/nightly/pause").await,
        app.post("/v1/schedules/nightly/resume").await,
    ] {
        let p = r.assert_problem(404, "not-found");
        assert!(p["detail"].as_str().unwrap().contains("nightly"), "{p}");
    }
}

#[tokio::test]
async fn every_invalid_field_is_listed() {
    let app = app().await;
    let p = app
        .post_json(
            "/v1/schedules",
            r#"{"name":"x","cron":"61 * * * *","timezone":"Mars/Olympus",
                "job":{"args":1,"max_attempts":0},"catch_up":"8d"}"#,
        )
        .await
        .assert_problem(422, "validation");
    let fields = sorted_error_fields(&p);
    assert_eq!(
        fields,
        [
            "catch_up",
            "cron",
            "job.kind",
            "job.max_attempts",
            "timezone"
        ]
    );
    let p = app
        .post_json(
            "/v1/schedules",
            r#"{"name":"x","cron":"0 0 30 2 *","job":{"kind":"noop"}}"#,
        )
        .await
        .assert_problem(422, "validation");
    assert_eq!(p["errors"][0]["field"], "cron");
    assert!(
        p["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("never"),
        "{p}"
    );
    assert_eq!(
        app.get("/v1/schedules").await.json()["schedules"],
        serde_json::json!([])
    );
}

#[tokio::test]
async fn an_api_key_sees_only_its_tenants_schedules() {
    let app = app_with(ApiConfig {
        api_keys: vec![
            ApiKey::new(TenantId::parse("acme").unwrap(), "acme-key"),
            ApiKey::new(TenantId::parse("globex").unwrap(), "globex-key"),
        ],
        ..Default::default()
    })
    .await;
    let as_key = |req: axum::http::request::Builder, key: &str| {
        req.header("authorization", format!("Bearer {key}"))
    };
    let r = app
        .send(
            as_key(json_request("/v1/schedules"), "acme-key")
                .body(Body::from(NIGHTLY))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["tenant"], "acme");
    let get = |key: &'static str, path: &'static str| {
        app.send(as_key(Request::get(path), key).body(Body::empty()).unwrap())
    };
    assert_eq!(
        get("acme-key", "/v1/schedules/nightly").await.status,
        StatusCode::OK
    );
    get("globex-key", "/v1/schedules/nightly")
        .await
        .assert_problem(404, "not-found");
    get("globex-key", "/v1/schedules/nightly?tenant=acme")
        .await
        .assert_problem(403, "forbidden");
    let theirs = get("globex-key", "/v1/schedules").await.json();
    assert_eq!(theirs["schedules"], serde_json::json!([]));
    let r = app
        .send(
            as_key(json_request("/v1/schedules"), "globex-key")
                .body(Body::from(
                    r#"{"name":"n","tenant":"acme","cron":"@daily","job":{"kind":"noop"}}"#,
                ))
                .unwrap(),
        )
        .await;
    r.assert_problem(403, "forbidden");
}
