//! Keel's gRPC API (`proto/keel/v1/keel.proto`, package `keel.v1`), a second thin adapter
//! over the service layer the HTTP routes use: the same business steps, the same parsers,
//! one [`ApiError`](crate::ApiError) mapped once onto a gRPC status ([`status`]). Served on
//! its own listener (`KEEL_GRPC_ADDR`) with the standard health service (tied to
//! readiness) and server reflection.
//!
//! `docs/grpc.md` is the user's guide.

mod call;
mod convert;
mod jobs;
mod schedules;
pub mod status;
mod telemetry;
mod workers;

use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::state::ApiState;
use crate::tls::Tls;

/// The generated messages, services and clients of `keel.v1` (crate keel-proto).
pub use keel_proto::v1 as pb;

/// Most calls one HTTP/2 connection may have in flight.
const MAX_STREAMS: u32 = 256;

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the gRPC API on `listener` until `shutdown` is cancelled, then stops gracefully:
/// health turns NOT_SERVING first, new calls are refused, calls in flight finish.
///
/// Health answers SERVING for the whole server (`""`) and for `keel.v1.JobService` while
/// `readiness` says ready, NOT_SERVING otherwise (draining, the database breaker open).
///
/// With `tls`, connections are TLS (ALPN `h2`), each handshake bounded by
/// [`HANDSHAKE_TIMEOUT`].
pub async fn serve(
    state: ApiState,
    listener: tokio::net::TcpListener,
    tls: Option<Tls>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl and most tools speak v1, older ones v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let unbuilt = |e: tonic_reflection::server::Error| {
        tracing::error!(error = %e, "building the reflection service; serving without it");
    };
    let reflection_v1 = reflection().build_v1().map_err(unbuilt).ok();
    let reflection_v1alpha = reflection().build_v1alpha().map_err(unbuilt).ok();
    let max = state.config.max_body_bytes;
    let core = call::Core {
        state: state.clone(),
        shutdown: shutdown.clone(),
        streams: Default::default(),
    };
    let jobs = pb::job_service_server::JobServiceServer::new(jobs::Jobs(core.clone()))
        .max_decoding_message_size(max);
    let schedules =
        pb::schedule_service_server::ScheduleServiceServer::new(schedules::Schedules(core.clone()))
            .max_decoding_message_size(max);
    let workers = pb::worker_service_server::WorkerServiceServer::new(workers::Workers(core))
        .max_decoding_message_size(max);

    let ready_state = state.clone();
    let watch = shutdown.clone();
    tokio::spawn(async move {
        // Health follows readiness until shutdown, then says NOT_SERVING for good: clients
        // stop sending before the listener closes.
        let mut last = None;
        loop {
            let serving = !watch.is_cancelled() && ready(&ready_state);
            if last != Some(serving) {
                let status = if serving {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter.set_service_status("", status).await;
                for service in [
                    "keel.v1.JobService",
                    "keel.v1.ScheduleService",
                    "keel.v1.WorkerService",
                ] {
                    reporter.set_service_status(service, status).await;
                }
                last = Some(serving);
            }
            if watch.is_cancelled() {
                break;
            }
            tokio::select! {
                () = watch.cancelled() => {}
                () = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
            }
        }
    });

    let router = Server::builder()
        // Bounds until the shared interceptors (admission, deadlines) apply here too: a
        // call gets at most the HTTP request deadline (tonic also honours a shorter
        // `grpc-timeout`), and one connection at most MAX_STREAMS calls at once.
        .timeout(state.config.request_timeout)
        .max_concurrent_streams(MAX_STREAMS)
        .concurrency_limit_per_connection(MAX_STREAMS as usize)
        .layer(telemetry::TelemetryLayer)
        .add_service(health)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(jobs)
        .add_service(schedules)
        .add_service(workers);
    let stop = shutdown.cancelled_owned();
    match tls {
        // No Nagle: a stream's small messages (a lease's jobs, an outcome's answer) must
        // not wait for the peer's delayed ACK, which turns a streaming lease into 40 ms
        // steps. (`tls::incoming` sets it on each connection too.)
        None => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
        Some(tls) => {
            let acceptor = tls.acceptor(&[b"h2"]);
            let incoming = crate::tls::incoming(listener, acceptor, HANDSHAKE_TIMEOUT, "grpc");
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
    }
}

/// Whether the health service says SERVING: not draining, the database breaker not open,
/// and no configuration error met lately (what `/readyz` checks, less its database ping: the breaker already reflects the
/// database's failures, and this is evaluated four times a second).
fn ready(state: &ApiState) -> bool {
    !state.readiness.is_draining()
        && state
            .database_breaker
            .as_ref()
            .is_none_or(|b| b.state() != keel_resilience::BreakerState::Open)
        && state
            .database_misconfiguration
            .as_ref()
            .is_none_or(|m| m.recent().is_none())
}

/// The wire-compatibility rules the committed descriptor set is held to: what a client built
/// against it still finds. Adding messages, fields, values, services and methods is fine;
/// removing one (a field unless its number is reserved), renumbering, retyping, or changing
/// a method's messages or streaming is not.
#[cfg(test)]
mod compat {
    use std::collections::HashMap;

    use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

    fn messages<'a>(
        prefix: &str,
        list: &'a [DescriptorProto],
        out: &mut HashMap<String, &'a DescriptorProto>,
    ) {
        for m in list {
            let name = format!("{prefix}.{}", m.name());
            messages(&name, &m.nested_type, out);
            out.insert(name, m);
        }
    }

    fn enums<'a>(
        prefix: &str,
        list: &'a [DescriptorProto],
        top: &'a [EnumDescriptorProto],
        out: &mut HashMap<String, &'a EnumDescriptorProto>,
    ) {
        for e in top {
            out.insert(format!("{prefix}.{}", e.name()), e);
        }
        for m in list {
            enums(
                &format!("{prefix}.{}", m.name()),
                &m.nested_type,
                &m.enum_type,
                out,
            );
        }
    }

    /// Everything in `old` that `new` breaks, one line each.
    pub(super) fn breaks(old: &FileDescriptorSet, new: &FileDescriptorSet) -> Vec<String> {
        let mut problems = Vec::new();
        for of in &old.file {
            let Some(nf) = new.file.iter().find(|f| f.name() == of.name()) else {
                problems.push(format!("file {} is gone", of.name()));
                continue;
            };
            let pkg = format!(".{}", of.package());
            let (mut om, mut nm) = (HashMap::new(), HashMap::new());
            messages(&pkg, &of.message_type, &mut om);
            messages(&pkg, &nf.message_type, &mut nm);
            for (name, o) in &om {
                let Some(n) = nm.get(name) else {
                    problems.push(format!("message {name} is gone"));
                    continue;
                };
                for f in &o.field {
                    let reserved = n
                        .reserved_range
                        .iter()
                        .any(|r| (r.start()..r.end()).contains(&f.number()));
                    match n.field.iter().find(|g| g.number() == f.number()) {
                        None if reserved => {}
                        None => problems.push(format!(
                            "{name}.{} (field {}) is gone and its number not reserved",
                            f.name(),
                            f.number()
                        )),
                        Some(g)
                            if (g.r#type, g.type_name(), g.label)
                                != (f.r#type, f.type_name(), f.label) =>
                        {
                            problems.push(format!(
                                "{name}.{} (field {}) changed type or label",
                                f.name(),
                                f.number()
                            ))
                        }
                        Some(_) => {}
                    }
                }
            }
            let (mut oe, mut ne) = (HashMap::new(), HashMap::new());
            enums(&pkg, &of.message_type, &of.enum_type, &mut oe);
            enums(&pkg, &nf.message_type, &nf.enum_type, &mut ne);
            for (name, o) in &oe {
                let Some(n) = ne.get(name) else {
                    problems.push(format!("enum {name} is gone"));
                    continue;
                };
                for v in &o.value {
                    if !n.value.iter().any(|w| w.number() == v.number()) {
                        problems.push(format!("{name}.{} ({}) is gone", v.name(), v.number()));
                    }
                }
            }
            for os in &of.service {
                let Some(ns) = nf.service.iter().find(|s| s.name() == os.name()) else {
                    problems.push(format!("service {} is gone", os.name()));
                    continue;
                };
                for m in &os.method {
                    let shape = |m: &prost_types::MethodDescriptorProto| {
                        (
                            m.input_type().to_owned(),
                            m.output_type().to_owned(),
                            m.client_streaming(),
                            m.server_streaming(),
                        )
                    };
                    match ns.method.iter().find(|n| n.name() == m.name()) {
                        None => problems.push(format!("{}.{} is gone", os.name(), m.name())),
                        Some(n) if shape(n) != shape(m) => problems.push(format!(
                            "{}.{} changed its messages or streaming",
                            os.name(),
                            m.name()
                        )),
                        Some(_) => {}
                    }
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use prost_types::FileDescriptorSet;

    use super::*;

    /// `proto/keel/v1/keel.binpb`, the descriptor set clients were promised.
    const COMMITTED: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../proto/keel/v1/keel.binpb"
    );

    fn keel_only(set: FileDescriptorSet) -> FileDescriptorSet {
        FileDescriptorSet {
            file: set
                .file
                .into_iter()
                .filter(|f| f.package() == "keel.v1")
                .collect(),
        }
    }

    /// The .proto stays wire-compatible with the committed descriptor set. After a
    /// compatible change (an addition), refresh it: `KEEL_BLESS=1 cargo test -p keel-api
    /// --lib grpc::tests`.
    #[test]
    fn the_proto_stays_wire_compatible() {
        let current = keel_only(FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap());
        if std::env::var_os("KEEL_BLESS").is_some() {
            std::fs::write(COMMITTED, current.encode_to_vec()).unwrap();
        }
        let committed = std::fs::read(COMMITTED).expect("proto/keel/v1/keel.binpb is committed");
        let committed = FileDescriptorSet::decode(committed.as_slice()).unwrap();
        let breaks = compat::breaks(&committed, &current);
        assert!(
            breaks.is_empty(),
            "the .proto breaks its clients: {breaks:#?}"
        );
    }

    /// The rules catch what breaks a client and let additions through.
    #[test]
    fn the_compatibility_rules_catch_breaks() {
        let base = keel_only(FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap());
        let mut changed = base.clone();
        let file = &mut changed.file[0];
        let job = file
            .message_type
            .iter_mut()
            .find(|m| m.name() == "Job")
            .unwrap();
        // Retype `args` (5) and drop `kind` (3): two breaks. Add field 99: fine.
        let args = job.field.iter_mut().find(|f| f.number() == 5).unwrap();
        args.r#type = Some(prost_types::field_descriptor_proto::Type::Bytes as i32);
        job.field.retain(|f| f.number() != 3);
        let mut extra = job.field[0].clone();
        extra.number = Some(99);
        extra.name = Some("extra".into());
        job.field.push(extra);
        let service = &mut file.service[0];
        service.method.retain(|m| m.name() != "GetJob");
        let breaks = compat::breaks(&base, &changed);
        // Retyped args, dropped kind, the gone GetJob; the added field is no break.
        assert_eq!(breaks.len(), 3, "{breaks:#?}");
        assert!(breaks.iter().all(|b| !b.contains("extra")), "{breaks:#?}");
    }
}
