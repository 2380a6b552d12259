//! How every gRPC call is run, whichever service it belongs to: admitted as HTTP's layers
//! admit a request, under a deadline from `grpc-timeout` in a [`RequestScope`], with its
//! caller resolved from `authorization` and charged to its rate limits.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::TenantId;
use keel_resilience::{RequestScope, Step};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use crate::auth::{self, Caller};
use crate::error::ApiError;
use crate::rate_limit;
use crate::state::ApiState;

/// What a call does, for admission: whether the backlog cap applies, and whether its
/// latency says anything about the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Reads and moves jobs.
    Read,
    /// Creates jobs: refused while the backlog is full.
    Enqueue,
    /// Creates a job and waits for it on purpose: refused while the backlog is full, and
    /// never a latency sample.
    Wait,
}

/// What every service of the API holds: the state, the shutdown that ends streams, and
/// the count of open streams.
#[derive(Clone)]
pub(crate) struct Core {
    pub(crate) state: ApiState,
    /// Cancelled when the server stops serving: open streams end with UNAVAILABLE.
    pub(crate) shutdown: CancellationToken,
    pub(crate) streams: Arc<StreamSlots>,
}

/// Most streams (Watch, Lease) open at once in this process: each holds a task, a
/// subscription and a few buffered messages, so their number bounds memory.
pub(crate) const MAX_OPEN_STREAMS: usize = 4096;
/// Most streams one tenant (or all callers without a tenant scope together) may hold open,
/// so that one tenant cannot take every slot from the others.
pub(crate) const MAX_TENANT_STREAMS: usize = 1024;

/// The open streams, in all and by tenant.
#[derive(Debug, Default)]
pub(crate) struct StreamSlots {
    open: Mutex<(usize, HashMap<Option<TenantId>, usize>)>,
}

impl StreamSlots {
    /// A slot for one more stream of `tenant`, held until the guard drops:
    /// RESOURCE_EXHAUSTED when the process or the tenant has no slot left.
    pub(crate) fn take(self: &Arc<Self>, tenant: Option<&TenantId>) -> Result<StreamSlot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = open.1.get(&tenant.cloned()).copied().unwrap_or(0);
        if open.0 >= MAX_OPEN_STREAMS || mine >= MAX_TENANT_STREAMS {
            let limit = if open.0 >= MAX_OPEN_STREAMS {
                format!("this server's {MAX_OPEN_STREAMS}")
            } else {
                format!("a tenant's {MAX_TENANT_STREAMS}")
            };
            return Err(Status::resource_exhausted(format!(
                "too many open streams: {limit} are open; close one first"
            )));
        }
        open.0 += 1;
        *open.1.entry(tenant.cloned()).or_default() += 1;
        Ok(StreamSlot {
            slots: Arc::clone(self),
            tenant: tenant.cloned(),
        })
    }
}

/// One open stream's slot.
pub(crate) struct StreamSlot {
    slots: Arc<StreamSlots>,
    tenant: Option<TenantId>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.tenant);
            }
        }
    }
}

/// The `grpc-timeout` a client sent (at most 8 digits and a unit: H, M, S, m, u, n), if
/// any and well formed; a malformed one is ignored, as tonic ignores it.
pub(crate) fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl Core {
    /// When a call must be answered: its `grpc-timeout` or the API's request deadline,
    /// whichever is sooner, less a margin (a twentieth, at most 10 ms) so that the
    /// server's DEADLINE_EXCEEDED, which names the step, reaches the client before the
    /// client's own deadline, and before tonic's timeout (which answers CANCELLED).
    pub(crate) fn deadline(&self, metadata: &MetadataMap) -> Instant {
        let limit = self.state.config.request_timeout;
        let budget = grpc_timeout(metadata).map_or(limit, |asked| asked.min(limit));
        let margin = (budget / 20).min(Duration::from_millis(10));
        Instant::now() + budget.saturating_sub(margin)
    }

    /// Runs `call` as HTTP's layers run a request: admitted first (shed with UNAVAILABLE,
    /// or on a full backlog when it creates jobs, before anything is spent on it), then in a
    /// request scope ending at `at`. Out of time, the call is dropped and answered
    /// DEADLINE_EXCEEDED naming the step it was in (auth, the store, …), counted in
    /// `keel_requests_deadline_exceeded_total`. A call that failed on the server's side
    /// frees its admission slot without teaching the limit its latency, as over HTTP.
    pub(crate) async fn within<T>(
        &self,
        at: Instant,
        kind: Kind,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let admitted = self
            .state
            .admission
            .try_admit(kind != Kind::Read)
            .await
            .map_err(|reason| Status::from(ApiError::Overloaded { reason }))?;
        let scope = RequestScope::new(at);
        let seen = scope.clone();
        match tokio::time::timeout_at(at, scope.run(call)).await {
            Ok(answer) => {
                let server_side = answer.as_ref().err().is_some_and(|s| {
                    matches!(
                        s.code(),
                        Code::Internal | Code::Unavailable | Code::Unknown | Code::DataLoss
                    )
                });
                if !server_side && kind != Kind::Wait {
                    admitted.success();
                }
                answer
            }
            Err(_) => {
                let step = seen.step();
                metrics::counter!("keel_requests_deadline_exceeded_total", "step" => step.as_str())
                    .increment(1);
                Err(ApiError::DeadlineExceeded {
                    job_id: None,
                    step: Some(step),
                }
                .into())
            }
        }
    }

    /// One call, the way every JobService method runs: admitted, under its deadline, with
    /// its caller resolved and charged; then `step` with the caller, the metadata, the
    /// message and the deadline, whose value is the reply.
    pub(crate) async fn serve<M, T, Fut>(
        &self,
        request: Request<M>,
        kind: Kind,
        step: impl FnOnce(Caller, MetadataMap, M, Instant) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = Result<T, Status>>,
    {
        let at = self.deadline(request.metadata());
        self.within(at, kind, async move {
            let caller = self.caller(request.metadata()).await?;
            let (metadata, _, message) = request.into_parts();
            step(caller, metadata, message, at).await.map(Response::new)
        })
        .await
    }

    /// The caller of a request, from its `authorization` metadata, charged one token of its
    /// rate limits (RESOURCE_EXHAUSTED with RetryInfo when spent).
    pub(crate) async fn caller(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        Ok(self.charged_caller(metadata).await?.caller)
    }

    /// [`Core::caller`], keeping the key so that a stream can charge each later message.
    pub(crate) async fn charged_caller(&self, metadata: &MetadataMap) -> Result<Charged, Status> {
        RequestScope::enter_current(Step::Auth);
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer);
        let (caller, key) = auth::resolve_caller(&self.state, token).await?;
        let charged = Charged { caller, key };
        charged.charge(&self.state)?;
        RequestScope::enter_current(Step::Validate);
        Ok(charged)
    }

    /// Opens a stream as a call is admitted, without holding an admission slot for its
    /// life: a stream mostly waits, and is no work in progress (as HTTP's long-poll lease
    /// is not). Shed with UNAVAILABLE while the server is overloaded, before the caller is
    /// resolved; the caller is charged one token of its rate limits.
    pub(crate) async fn open_stream(&self, metadata: &MetadataMap) -> Result<Charged, Status> {
        let admitted = self
            .state
            .admission
            .try_admit(false)
            .await
            .map_err(|reason| Status::from(ApiError::Overloaded { reason }))?;
        drop(admitted);
        self.charged_caller(metadata).await
    }
}

/// A resolved caller and the key it presented, for charging a stream's messages.
pub(crate) struct Charged {
    pub(crate) caller: Caller,
    key: Option<auth::KeyDigest>,
}

impl Charged {
    /// Takes one token of the caller's rate limits: RESOURCE_EXHAUSTED with RetryInfo when
    /// spent.
    pub(crate) fn charge(&self, state: &ApiState) -> Result<(), ApiError> {
        rate_limit::charge(state, self.caller.scope(), self.key.as_ref()).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let with = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&m)
        };
        assert_eq!(with("100m"), Some(Duration::from_millis(100)));
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("5000u"), Some(Duration::from_millis(5)));
        for bad in ["", "m", "123456789m", "10x", "-1m", "1.5S"] {
            assert_eq!(with(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&MetadataMap::new()), None);
    }
}
