//! Probes and telemetry: `/healthz`, `/readyz`, `/metrics`, `/v1/openapi.json`. None needs
//! an API key: orchestrators and scrapers call them.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use keel_resilience::{BreakerState, CircuitBreaker};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::middleware::Deadline;
use crate::state::ApiState;
use keel_wire::{CheckOut, HealthOut, ReadyChecks, ReadyOut};

/// Longest a readiness check may take (spec: dependencies reachable within 2 s).
pub(crate) const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What `Retry-After` says on a `503` from `/readyz`.
pub(crate) const READY_RETRY_AFTER_SECS: u32 = 5;

/// Liveness: answers without I/O, so it fails only when the process is wedged (its runtime
/// cannot schedule this handler). Restarting on a database outage would not help, so the
/// database is not checked here.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "probes",
    responses((status = 200, description = "The process is alive", body = HealthOut))
)]
pub(crate) async fn get_health() -> Json<HealthOut> {
    Json(HealthOut {
        status: "ok".into(),
    })
}

/// Readiness: the database answers within 2 s, its circuit breaker is not open, and the
/// process is not draining. `503` (with `Retry-After`) tells the load balancer to send
/// traffic elsewhere. The ping goes past the breaker (a probe that only echoed the breaker
/// could never see the database come back); the breaker check says whether this replica's
/// requests would be refused right now.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    responses(
        (status = 200, description = "Ready", body = ReadyOut),
        (status = 503, description = "A check failed or the process is draining", body = ReadyOut,
            headers(("Retry-After" = u32, description = "Seconds before asking again"))),
    )
)]
pub(crate) async fn get_ready(State(state): State<ApiState>, deadline: Deadline) -> Response {
    // Within the request deadline too, so a hung database yields a 503 from here rather
    // than a 504 from the deadline layer.
    let budget = READY_CHECK_TIMEOUT.min(
        deadline
            .remaining()
            .saturating_sub(Duration::from_millis(20)),
    );
    let started = Instant::now();
    let database = match tokio::time::timeout(budget, state.store.ping()).await {
        Ok(Ok(())) => CheckOut {
            status: "ok".into(),
            latency_ms: Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)),
            error: None,
        },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database ping failed");
            CheckOut {
                status: "error".into(),
                latency_ms: None,
                error: Some(e.to_string()),
            }
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = budget.as_millis() as u64,
                "readiness: database ping timed out"
            );
            CheckOut {
                status: "error".into(),
                latency_ms: None,
                error: Some(format!("no answer within {} ms", budget.as_millis())),
            }
        }
    };
    let database_breaker = state.database_breaker.as_ref().map(breaker_check);
    let database_config = state
        .database_misconfiguration
        .as_ref()
        .map(|m| match m.recent() {
            None => CheckOut {
                status: "ok".into(),
                latency_ms: None,
                error: None,
            },
            Some(why) => CheckOut {
                status: "error".into(),
                latency_ms: None,
                error: Some(why),
            },
        });
    let draining = state.readiness.is_draining();
    let ready = database.status == "ok"
        && database_breaker.as_ref().is_none_or(|c| c.status == "ok")
        && database_config.as_ref().is_none_or(|c| c.status == "ok")
        && !draining;
    let body = ReadyOut {
        status: if ready { "ready" } else { "unavailable" }.into(),
        checks: ReadyChecks {
            database,
            database_breaker,
            database_config,
        },
        draining,
    };
    if ready {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(
                header::RETRY_AFTER,
                HeaderValue::from(READY_RETRY_AFTER_SECS),
            )],
            Json(body),
        )
            .into_response()
    }
}

/// `error` while the breaker is open. Half-open counts as ready: the breaker is letting
/// probes through, and a replica kept out of rotation would get none from clients.
fn breaker_check(breaker: &CircuitBreaker) -> CheckOut {
    match breaker.state() {
        BreakerState::Open => CheckOut {
            status: "error".into(),
            latency_ms: None,
            error: Some("circuit open: the database failed repeatedly; calls are refused until a probe succeeds".to_owned()),
        },
        BreakerState::Closed | BreakerState::HalfOpen => CheckOut {
            status: "ok".into(),
            latency_ms: None,
            error: None,
        },
    }
}

/// The Prometheus exposition of this process's metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"))
)]
pub(crate) async fn get_metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// This document: the OpenAPI 3.1 description of the HTTP API, generated from the handlers.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "probes",
    responses((status = 200, description = "OpenAPI document", body = Object))
)]
pub(crate) async fn get_openapi() -> Result<Response, ApiError> {
    let json = serde_json::to_string(&crate::openapi::document()).map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}
