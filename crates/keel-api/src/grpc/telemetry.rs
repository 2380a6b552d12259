//! Per-call telemetry of the gRPC listener, as a tower layer around every service: the
//! request id (`x-request-id` metadata, kept when sane, else a fresh UUIDv7, echoed in the
//! response), one log line per call, and the two metrics gRPC dashboards expect:
//! `grpc_server_handled_total{grpc_service,grpc_method,grpc_code}` and
//! `grpc_server_handling_seconds{grpc_service,grpc_method}`.
//!
//! Labels stay bounded whatever a client sends: a service this server does not serve, or a
//! method it answers UNIMPLEMENTED, is counted as `unknown`. The code is read from the
//! response head, where a unary call's error status is (a trailers-only response); a
//! response without one is a success whose `OK` comes in the trailers. A streaming call
//! that fails after its first message would need the trailers read: there is none yet.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::{HeaderValue, Request, Response};
use futures_util::future::BoxFuture;
use tonic::Code;
use tower::{Layer, Service};

use crate::middleware::{X_REQUEST_ID, request_id_from};

/// The services this listener serves: the only `grpc_service` label values besides
/// `unknown`.
const SERVED: [&str; 6] = [
    "keel.v1.JobService",
    "keel.v1.ScheduleService",
    "keel.v1.WorkerService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Adds [`Telemetry`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TelemetryLayer;

impl<S> Layer<S> for TelemetryLayer {
    type Service = Telemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Telemetry { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct Telemetry<S> {
    inner: S,
}

/// `(service, method)` of a gRPC path `/package.Service/Method`.
fn call_of(path: &str) -> (&str, &str) {
    path.trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("unknown", "unknown"))
}

/// The Prometheus spelling of a code (`OK`, `InvalidArgument`, ...), as gRPC's own
/// middleware labels it.
fn code_label(code: Code) -> String {
    match code {
        Code::Ok => "OK".to_owned(),
        other => format!("{other:?}"),
    }
}

impl<S, B, RB> Service<Request<B>> for Telemetry<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let started = Instant::now();
        let (service, method) = call_of(req.uri().path());
        let (service, method) = if SERVED.contains(&service) {
            (service.to_owned(), method.to_owned())
        } else {
            ("unknown".to_owned(), "unknown".to_owned())
        };
        let id: Arc<str> = request_id_from(req.headers());
        if let Ok(v) = HeaderValue::from_str(&id) {
            req.headers_mut().insert(X_REQUEST_ID, v);
        }
        let call = self.inner.call(req);
        Box::pin(async move {
            let mut resp = call.await?;
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.parse::<i32>().ok())
                .map_or(Code::Ok, Code::from_i32);
            // A method a served service does not have: not a label of its own.
            let method = if code == Code::Unimplemented {
                "unknown".to_owned()
            } else {
                method
            };
            if let Ok(v) = HeaderValue::from_str(&id) {
                resp.headers_mut().insert(X_REQUEST_ID, v);
            }
            let elapsed = started.elapsed();
            let label = code_label(code);
            metrics::counter!(
                "grpc_server_handled_total",
                "grpc_service" => service.clone(),
                "grpc_method" => method.clone(),
                "grpc_code" => label.clone()
            )
            .increment(1);
            metrics::histogram!(
                "grpc_server_handling_seconds",
                "grpc_service" => service.clone(),
                "grpc_method" => method.clone()
            )
            .record(elapsed.as_secs_f64());
            let duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
            if matches!(code, Code::Internal | Code::Unknown | Code::DataLoss) {
                tracing::error!(request_id = %id, service, method, code = label, duration_ms, "gRPC call");
            } else {
                tracing::info!(request_id = %id, service, method, code = label, duration_ms, "gRPC call");
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            call_of("/keel.v1.JobService/Enqueue"),
            ("keel.v1.JobService", "Enqueue")
        );
        assert_eq!(call_of("/nonsense"), ("unknown", "unknown"));
        assert_eq!(code_label(Code::Ok), "OK");
        assert_eq!(code_label(Code::InvalidArgument), "InvalidArgument");
    }
}
