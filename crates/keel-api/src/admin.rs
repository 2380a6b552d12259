//! The admin listener's router (default `127.0.0.1:9000`, never public by default, G8).
//!
//! Today it serves `/debug/config`: the effective configuration as the binary rendered it
//! (secrets already redacted there). CPU and heap profiles, the task dump and the chaos
//! switches of SPEC §3 are still to come and will be added here.

use std::sync::Arc;

use axum::extract::State;
use axum::middleware::from_fn;
use axum::routing::get;
use axum::{Json, Router};

use crate::error::ApiError;
use crate::middleware::{assign_request_id, trace_request};

/// What the admin endpoints show. Cloning is cheap (shared).
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The effective configuration, secrets redacted by the caller: this module serves it
    /// as is and must never be handed a value with a secret in it.
    pub config: serde_json::Value,
}

async fn get_config(State(state): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(state.config.clone())
}

async fn route_not_found() -> ApiError {
    ApiError::NotFound {
        detail: "no such admin route".to_owned(),
        job_id: None,
    }
}

/// The admin router, ready for `axum::serve(listener, router.into_make_service())`. Requests
/// get an id and a log line like those of the public API; there is no authentication, which
/// is why the listener stays on loopback unless the operator says otherwise.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/debug/config", get(get_config))
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

    #[tokio::test]
    async fn serves_the_config_it_was_given() {
        let app = router(AdminState {
            config: serde_json::json!({"addr": "127.0.0.1:8080", "api_keys": "[redacted]"}),
        });
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
}
