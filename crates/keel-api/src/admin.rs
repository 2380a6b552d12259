//! The admin listener's router (default `127.0.0.1:9000`, never public by default, G8).
//!
//! - `GET /debug/config`: the effective configuration as the binary rendered it (secrets
//!   already redacted there).
//! - `GET /debug/chaos`: the fault injection settings in force.
//! - `PUT /debug/chaos`: replaces them (latency and error rate per dependency: `auth`,
//!   `store_read`, `store_write`, `webhook`), taking effect for calls that start afterwards.
//!   The body is a whole [`ChaosSettings`] document; a dependency left out is set to no
//!   fault, so `{}` turns chaos off.
//!
//! CPU and heap profiles and the task dump of SPEC §3 are still to come and will be added
//! here.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::middleware::from_fn;
use axum::routing::get;
use axum::{Json, Router};
use keel_core::FieldError;
use keel_resilience::{Chaos, ChaosSettings};
use serde_json::error::Category;

use crate::error::ApiError;
use crate::middleware::{assign_request_id, trace_request};

/// What the admin endpoints show and control. Cloning is cheap (shared).
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The effective configuration, secrets redacted by the caller: this module serves it
    /// as is and must never be handed a value with a secret in it.
    pub config: serde_json::Value,
    /// The process's fault injection switchboard, shared with the API's auth layer, the
    /// store guard and the webhook executor, so one `PUT` reaches all of them.
    pub chaos: Chaos,
}

async fn get_config(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(state.config.clone())
}

async fn get_chaos(State(state): State<Arc<AdminState>>) -> Json<ChaosSettings> {
    Json(state.chaos.settings())
}

/// Parses a `PUT /debug/chaos` body. Malformed JSON is a `400`; JSON of the wrong shape (an
/// unknown dependency or setting, a string for a number) is a `422` naming the problem; and
/// values out of bounds are a `422` listing every one, each under its field
/// (`auth.latency_ms`).
fn parse_chaos(body: &[u8]) -> Result<ChaosSettings, ApiError> {
    let settings: ChaosSettings = serde_json::from_slice(body).map_err(|e| match e.classify() {
        Category::Data => ApiError::Validation(vec![FieldError {
            field: "body".to_owned(),
            message: e.to_string(),
        }]),
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::BadRequest(format!("the body is not a JSON object: {e}"))
        }
    })?;
    settings.validate().map_err(|errors| {
        ApiError::Validation(
            errors
                .into_iter()
                .map(|e| match e.split_once(' ') {
                    // `validate` words every message as "<dependency>.<setting> must …".
                    Some((field, message)) if field.contains('.') => FieldError {
                        field: field.to_owned(),
                        message: message.to_owned(),
                    },
                    _ => FieldError {
                        field: "body".to_owned(),
                        message: e,
                    },
                })
                .collect(),
        )
    })?;
    Ok(settings)
}

/// Replaces the chaos settings. The body is read as JSON whatever its `Content-Type`, so a
/// plain `curl -X PUT -d '{…}'` works from an operator's shell. Every change is logged at
/// WARN with the new settings, so the log explains the errors that follow.
async fn put_chaos(
    State(state): State<Arc<AdminState>>,
    body: Bytes,
) -> Result<Json<ChaosSettings>, ApiError> {
    let settings = parse_chaos(&body)?;
    let before = state.chaos.settings();
    state.chaos.set(settings);
    tracing::warn!(
        active = settings.is_active(),
        settings = %serde_json::to_string(&settings).unwrap_or_default(),
        before = %serde_json::to_string(&before).unwrap_or_default(),
        "chaos settings changed through /debug/chaos"
    );
    Ok(Json(settings))
}

async fn route_not_found() -> ApiError {
    ApiError::NotFound {
        detail: "no such admin route".to_owned(),
        job_id: None,
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// The admin router, ready for `axum::serve(listener, router.into_make_service())`. Requests
/// get an id and a log line like those of the public API; there is no authentication, which
/// is why the listener stays on loopback unless the operator says otherwise.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/debug/config", get(get_config))
        .route("/debug/chaos", get(get_chaos).put(put_chaos))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(route_not_found)
        .layer(from_fn(trace_request))
        .layer(from_fn(assign_request_id))
        .with_state(Arc::new(state))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    fn app(chaos: Chaos) -> Router {
        router(AdminState {
            config: serde_json::json!({"addr": "127.0.0.1:8080", "api_keys": "[redacted]"}),
            chaos,
        })
    }

    async fn send(app: &Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn put(body: &str) -> Request<Body> {
        Request::put("/debug/chaos")
            .body(Body::from(body.to_owned()))
            .unwrap()
    }

    #[tokio::test]
    async fn serves_the_config_it_was_given() {
        let app = app(Chaos::default());
        let resp = app
            .clone()
            .oneshot(Request::get("/debug/config").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["api_keys"], "[redacted]");
        let resp = app
            .oneshot(Request::get("/debug/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
    }

    #[tokio::test]
    async fn chaos_is_read_and_replaced_as_a_whole() {
        let chaos = Chaos::default();
        let app = app(chaos.clone());
        let (status, v) = send(
            &app,
            Request::get("/debug/chaos").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(v["store_write"]["error_rate"], 0.0);

        let (status, v) = send(&app, put(r#"{"store_write":{"error_rate":1.0}}"#)).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["store_write"]["error_rate"], 1.0);
        assert!(chaos.is_active(), "the shared handle sees the change");

        let (status, _) = send(&app, put("{}")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!chaos.is_active(), "an empty document turns chaos off");
    }

    #[tokio::test]
    async fn bad_chaos_documents_are_refused_precisely_and_change_nothing() {
        let chaos = Chaos::new(ChaosSettings::parse("auth.latency_ms=5").unwrap());
        let app = app(chaos.clone());

        let (status, p) = send(&app, put("{not json")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{p}");

        let (status, p) = send(&app, put(r#"{"disk":{"error_rate":1}}"#)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        assert!(
            p["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("unknown field"),
            "{p}"
        );

        let (status, p) = send(
            &app,
            put(r#"{"auth":{"latency_ms":70000},"store_read":{"error_rate":2}}"#),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        let fields: Vec<&str> = p["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, ["auth.latency_ms", "store_read.error_rate"], "{p}");
        assert_eq!(chaos.settings().auth.latency_ms, 5, "nothing was applied");

        let resp = app
            .oneshot(Request::post("/debug/chaos").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
