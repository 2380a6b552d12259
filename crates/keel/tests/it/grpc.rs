//! The gRPC API (`keel.v1.JobService`) through a real tonic client against the real app:
//! every call, the status codes and their details, API keys, idempotency, health and
//! reflection.

use std::time::Duration;

use futures_util::StreamExt as _;
use keel_api::grpc::pb;
use keel_api::grpc::pb::job_service_client::JobServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_types::StatusExt as _;

use crate::both_backends;
use crate::helpers::{Backend, TestApp, spawn_app_with, within};

async fn client(app: &TestApp) -> JobServiceClient<Channel> {
    let addr = app.grpc_addr.expect("the gRPC listener is on in tests");
    JobServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

fn spec(kind: &str) -> pb::JobSpec {
    pb::JobSpec {
        kind: kind.to_owned(),
        ..Default::default()
    }
}

fn enqueue(job: pb::JobSpec) -> pb::EnqueueRequest {
    pb::EnqueueRequest { job: Some(job) }
}

/// Every call of JobService on a job's way: enqueue (args and meta byte for byte), get,
/// list, the result while pending and once completed, cancel, retry.
async fn job_calls_round_trip(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, |_| {}).await else {
        return;
    };
    let mut c = client(&app).await;
    let args = r#"{"b": 1,  "a": [1, 2.50]}"#;
    let answer = c
        .enqueue(enqueue(pb::JobSpec {
            queue: Some("grpc-parked".into()),
            args: Some(args.into()),
            priority: Some(2),
            tags: vec!["x".into()],
            meta: Some(r#"{"trace": "t-1"}"#.into()),
            timeout: Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000,
            }),
            ..spec("echo")
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!answer.replayed && !answer.unique_conflict);
    let job = answer.job.expect("the job");
    assert_eq!(job.args, args);
    assert_eq!(job.meta.as_deref(), Some(r#"{"trace": "t-1"}"#));
    assert_eq!(job.priority, 2);
    assert_eq!(job.state(), pb::JobState::Available);
    assert_eq!(
        job.timeout.map(|d| (d.seconds, d.nanos)),
        Some((1, 500_000_000))
    );

    // The same job over HTTP.
    let over_http = app.client.get_job(&job.id).await.unwrap();
    assert_eq!(over_http.args.get(), args);

    let got = c
        .get_job(pb::GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, job);
    let page = c
        .list_jobs(pb::ListJobsRequest {
            queue: Some("grpc-parked".into()),
            state: Some(pb::JobState::Available.into()),
            limit: Some(10),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 1);
    assert_eq!(page.jobs[0], job);
    assert_eq!(page.next, None);

    let pending = c
        .get_result(pb::GetResultRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(!pending.done && pending.result.is_none());
    assert_eq!(pending.state(), pb::JobState::Available);

    let cancelled = c
        .cancel_job(pb::CancelJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), pb::JobState::Cancelled);
    let none = c
        .get_result(pb::GetResultRequest { id: job.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::FailedPrecondition, "{none:?}");
    assert_eq!(
        none.get_details_error_info().map(|i| i.reason),
        Some("job-not-completed".to_owned())
    );
    let again = c
        .cancel_job(pb::CancelJobRequest { id: job.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    let retried = c
        .retry_job(pb::RetryJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.state(), pb::JobState::Available);

    // A job the built-in workers run: its result, byte for byte as echo returns it.
    let ran = c
        .enqueue(enqueue(pb::JobSpec {
            args: Some(r#"{"n": 7}"#.into()),
            ..spec("echo")
        }))
        .await
        .unwrap()
        .into_inner()
        .job
        .expect("the job");
    let result = within(Duration::from_secs(30), "the echo job to complete", async {
        loop {
            let r = c
                .get_result(pb::GetResultRequest { id: ran.id.clone() })
                .await
                .unwrap()
                .into_inner();
            if r.done {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(result.state(), pb::JobState::Completed);
    assert_eq!(result.result.as_deref(), Some(r#"{"n": 7}"#));

    let batch = c
        .enqueue_batch(pb::EnqueueBatchRequest {
            jobs: vec![
                pb::JobSpec {
                    queue: Some("grpc-parked".into()),
                    ..spec("a")
                },
                pb::JobSpec {
                    queue: Some("grpc-parked".into()),
                    ..spec("b")
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<_> = batch.jobs.iter().map(|j| j.kind.as_str()).collect();
    assert_eq!(kinds, ["a", "b"]);
    app.stop().await;
}
both_backends!(job_calls_round_trip);

/// Bad input is INVALID_ARGUMENT with every field listed in BadRequest, under the
/// message's names; an unknown job is NOT_FOUND; a key reused with another request is
/// ALREADY_EXISTS, and a retry of the same request replays the original job.
async fn errors_carry_their_details(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, |_| {}).await else {
        return;
    };
    let mut c = client(&app).await;
    let bad = c
        .enqueue(enqueue(pb::JobSpec {
            args: Some("{nope".into()),
            priority: Some(300),
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1,
            }),
            tags: vec![String::new()],
            ..spec("echo")
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let fields: Vec<String> = bad
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    for f in ["args", "timeout", "priority", "tags[0]"] {
        assert!(fields.iter().any(|g| g == f), "{f} missing from {fields:?}");
    }
    let missing = c
        .enqueue(pb::EnqueueRequest { job: None })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    let batch = c
        .enqueue_batch(pb::EnqueueBatchRequest {
            jobs: vec![
                spec("noop"),
                pb::JobSpec {
                    delay: Some(prost_types::Duration {
                        seconds: -1,
                        nanos: 0,
                    }),
                    ..spec("noop")
                },
            ],
        })
        .await
        .unwrap_err();
    let fields: Vec<String> = batch
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["jobs[1].delay"]);

    let unknown = uuid::Uuid::now_v7().to_string();
    let gone = c
        .get_job(pb::GetJobRequest {
            id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let info = gone.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "not-found");
    assert_eq!(info.metadata.get("job_id"), Some(&unknown));
    let not_an_id = c
        .cancel_job(pb::CancelJobRequest { id: "42".into() })
        .await
        .unwrap_err();
    assert_eq!(not_an_id.code(), Code::InvalidArgument);
    let bad_list = c
        .list_jobs(pb::ListJobsRequest {
            limit: Some(0),
            after: Some("x".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_list.code(), Code::InvalidArgument);
    assert_eq!(
        bad_list
            .get_details_bad_request()
            .map(|b| b.field_violations.len()),
        Some(2)
    );

    let keyed = |job: pb::JobSpec| {
        let mut r = Request::new(enqueue(job));
        r.metadata_mut()
            .insert("idempotency-key", "grpc-key-1".parse().unwrap());
        r
    };
    let parked = || pb::JobSpec {
        queue: Some("grpc-parked".into()),
        ..spec("noop")
    };
    let first = c.enqueue(keyed(parked())).await.unwrap().into_inner();
    let second = c.enqueue(keyed(parked())).await.unwrap().into_inner();
    assert!(!first.replayed && second.replayed);
    assert_eq!(first.job, second.job);
    let reused = c
        .enqueue(keyed(pb::JobSpec {
            priority: Some(1),
            ..parked()
        }))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
    app.stop().await;
}
both_backends!(errors_carry_their_details);

/// With API keys: no key is UNAUTHENTICATED, naming another tenant PERMISSION_DENIED, and a
/// tenant sees only its own jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_grpc_api() {
    let acme = keel_api::hash_api_key("acme-grpc-key-0001");
    let globex = keel_api::hash_api_key("globex-grpc-key-01");
    let Some(app) = spawn_app_with(Backend::Sqlite, "grpc::api_keys", |a| {
        a.api_keys = Some(format!(
            "acme={},globex={}",
            hex::encode(acme),
            hex::encode(globex)
        ));
    })
    .await
    else {
        return;
    };
    let mut c = client(&app).await;
    let as_key = |key: &str, job: pb::JobSpec| {
        let mut r = Request::new(enqueue(job));
        r.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        r
    };
    let anonymous = c.enqueue(enqueue(spec("noop"))).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let wrong = c
        .enqueue(as_key("not-a-key-at-all-00", spec("noop")))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let other = c
        .enqueue(as_key(
            "acme-grpc-key-0001",
            pb::JobSpec {
                tenant: Some("globex".into()),
                ..spec("noop")
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    let mine = c
        .enqueue(as_key(
            "acme-grpc-key-0001",
            pb::JobSpec {
                queue: Some("grpc-parked".into()),
                ..spec("noop")
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .expect("the job");
    assert_eq!(mine.tenant, "acme");
    let mut peek = Request::new(pb::GetJobRequest {
        id: mine.id.clone(),
    });
    peek.metadata_mut().insert(
        "authorization",
        "Bearer globex-grpc-key-01".parse().unwrap(),
    );
    assert_eq!(c.get_job(peek).await.unwrap_err().code(), Code::NotFound);
    app.stop().await;
}

/// Asks the reflection service `requests` on one stream; its answers, in order.
async fn reflect(
    channel: &Channel,
    requests: Vec<tonic_reflection::pb::v1::server_reflection_request::MessageRequest>,
) -> Vec<tonic_reflection::pb::v1::server_reflection_response::MessageResponse> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;

    let asks: Vec<_> = requests
        .into_iter()
        .map(|message| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message),
        })
        .collect();
    let mut answers = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(futures_util::stream::iter(asks))
        .await
        .expect("the reflection stream")
        .into_inner();
    let mut out = Vec::new();
    while let Some(answer) = answers.next().await {
        out.push(
            answer
                .expect("a reflection answer")
                .message_response
                .expect("an answer with a response"),
        );
    }
    out
}

/// The health service says SERVING for the server and for JobService; reflection lists
/// JobService and serves its file, which names Enqueue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let Some(app) = spawn_app_with(Backend::Sqlite, "grpc::health_reflection", |_| {}).await else {
        return;
    };
    let url = format!("http://{}", app.grpc_addr.expect("gRPC on"));
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "keel.v1.JobService"] {
        let status = within(Duration::from_secs(10), "health to say SERVING", async {
            loop {
                let r = health
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: service.to_owned(),
                    })
                    .await;
                if let Ok(r) = r
                    && r.get_ref().status() == ServingStatus::Serving
                {
                    return r.into_inner().status();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }

    let answers = reflect(
        &channel,
        vec![
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("keel.v1.JobService".to_owned()),
        ],
    )
    .await;
    let [
        MessageResponse::ListServicesResponse(list),
        MessageResponse::FileDescriptorResponse(files),
    ] = answers.as_slice()
    else {
        panic!("{answers:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"keel.v1.JobService"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    let descriptors: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|b| prost::Message::decode(b.as_slice()).unwrap())
        .collect();
    let service = descriptors
        .iter()
        .flat_map(|f| &f.service)
        .find(|s| s.name() == "JobService")
        .expect("JobService's descriptor");
    assert!(service.method.iter().any(|m| m.name() == "Enqueue"));
    app.stop().await;
}

/// On SIGTERM, health turns NOT_SERVING while the listener still answers (for
/// `KEEL_SHUTDOWN_DELAY`), then the process exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_on_sigterm_before_the_listener_closes() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let Some((url, _backing)) = crate::helpers::database(Backend::Sqlite, "grpc::sigterm").await
    else {
        return;
    };
    let mut keel = crate::child::KeelProcess::start(&url, &[("KEEL_SHUTDOWN_DELAY", "3s")]).await;
    let channel = Channel::from_shared(keel.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = |mut h: HealthClient<Channel>| async move {
        h.check(tonic_health::pb::HealthCheckRequest {
            service: "keel.v1.JobService".to_owned(),
        })
        .await
        .map(|r| r.into_inner().status())
    };
    let serving = within(Duration::from_secs(10), "health to say SERVING", async {
        loop {
            if let Ok(s) = status(health.clone()).await
                && s == ServingStatus::Serving
            {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(serving, ServingStatus::Serving);
    keel.signal(nix::sys::signal::Signal::SIGTERM);
    // Answered over the still-open listener: NOT_SERVING, not a refused connection.
    let drained = within(
        Duration::from_secs(10),
        "health to say NOT_SERVING",
        async {
            loop {
                match status(health.clone()).await {
                    Ok(ServingStatus::NotServing) => return Ok(()),
                    Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(e) => return Err(e),
                }
            }
        },
    )
    .await;
    assert!(
        drained.is_ok(),
        "the listener closed before health said NOT_SERVING: {drained:?}"
    );
    let exit = keel.wait_exit(Duration::from_secs(30)).await;
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    health = HealthClient::new(
        Channel::from_shared(keel.grpc.clone())
            .unwrap()
            .connect_lazy(),
    );
    assert!(
        status(health).await.is_err(),
        "the listener is closed after exit"
    );
}

/// Every call is counted by service, method and code, timed, and answered with its request
/// id (the client's when sane, a fresh one otherwise). A child process: the metrics recorder
/// is its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_counted_timed_and_carry_their_request_id() {
    let Some((url, _backing)) = crate::helpers::database(Backend::Sqlite, "grpc::telemetry").await
    else {
        return;
    };
    let keel = crate::child::KeelProcess::start(&url, &[]).await;
    let mut c = JobServiceClient::connect(keel.grpc.clone()).await.unwrap();
    let mut lookup = Request::new(pb::GetJobRequest {
        id: uuid::Uuid::now_v7().to_string(),
    });
    lookup
        .metadata_mut()
        .insert("x-request-id", "grpc-trace-42".parse().unwrap());
    let missing = c.get_job(lookup).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        missing
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("grpc-trace-42")
    );
    let created = c
        .enqueue(enqueue(pb::JobSpec {
            queue: Some("grpc-parked".into()),
            ..spec("noop")
        }))
        .await
        .unwrap();
    let fresh = created
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("a request id on every answer");
    assert!(uuid::Uuid::parse_str(fresh).is_ok(), "{fresh}");

    let text = keel.metrics(&reqwest::Client::new()).await;
    let handled = |method: &str, code: &str| {
        crate::helpers::metric_value(
            &text,
            "grpc_server_handled_total",
            &[
                ("grpc_service", "keel.v1.JobService"),
                ("grpc_method", method),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(handled("GetJob", "NotFound"), 1.0, "{text}");
    assert_eq!(handled("Enqueue", "OK"), 1.0, "{text}");
    assert_eq!(
        crate::helpers::metric_value(
            &text,
            "grpc_server_handling_seconds_count",
            &[
                ("grpc_service", "keel.v1.JobService"),
                ("grpc_method", "Enqueue")
            ],
        ),
        1.0,
        "{text}"
    );
    keel.stop(Duration::from_secs(30)).await;
}

/// The seed's slow dependency over gRPC: with `SLOW_AUTH`, a call with a 100 ms
/// `grpc-timeout` is answered DEADLINE_EXCEEDED by the server, naming the auth step, before
/// the client's own deadline (a client-side expiry would carry no ErrorInfo).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_with_slow_auth_is_deadline_exceeded_naming_the_step() {
    let Some((url, _backing)) = crate::helpers::database(Backend::Sqlite, "grpc::slow_auth").await
    else {
        return;
    };
    let keel = crate::child::KeelProcess::start(&url, &[("SLOW_AUTH", "true")]).await;
    let mut c = JobServiceClient::connect(keel.grpc.clone()).await.unwrap();
    for _ in 0..3 {
        let mut req = Request::new(enqueue(spec("noop")));
        req.set_timeout(Duration::from_millis(100));
        let late = c.enqueue(req).await.unwrap_err();
        assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
        let info = late
            .get_details_error_info()
            .expect("answered by the server, with its details");
        assert_eq!(info.reason, "deadline-exceeded");
        assert!(late.message().contains("authenticating"), "{late:?}");
    }
    keel.stop(Duration::from_secs(30)).await;
}

/// The tenant rate limit applies to gRPC calls as to HTTP requests: once the bucket is
/// spent, RESOURCE_EXHAUSTED with RetryInfo, and nothing else is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_rate_limit_is_resource_exhausted_with_retry_info() {
    let Some(app) = spawn_app_with(Backend::Sqlite, "grpc::rate_limit", |a| {
        a.rate_limit = Some("1/m".into());
    })
    .await
    else {
        return;
    };
    let mut c = client(&app).await;
    let lookup = || pb::GetJobRequest {
        id: uuid::Uuid::now_v7().to_string(),
    };
    assert_eq!(
        c.get_job(lookup()).await.unwrap_err().code(),
        Code::NotFound,
        "the first call spends the only token"
    );
    let limited = c.get_job(lookup()).await.unwrap_err();
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    assert_eq!(
        limited.get_details_error_info().map(|i| i.reason),
        Some("rate-limited".to_owned())
    );
    let wait = limited
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo says when");
    assert!(wait > Duration::ZERO, "{wait:?}");
    app.stop().await;
}

/// With the queue backlog over `KEEL_MAX_QUEUE_BACKLOG`, enqueues are shed with UNAVAILABLE
/// and RetryInfo before any work, while reads still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_sheds_grpc_enqueues_but_not_reads() {
    let Some(app) = spawn_app_with(Backend::Sqlite, "grpc::backlog", |a| {
        a.max_queue_backlog = Some("2".into());
        a.queue_depth_interval = Some("50ms".into());
    })
    .await
    else {
        return;
    };
    let mut c = client(&app).await;
    let parked = || {
        enqueue(pb::JobSpec {
            queue: Some("grpc-parked".into()),
            ..spec("noop")
        })
    };
    let kept = c.enqueue(parked()).await.unwrap().into_inner().job.unwrap();
    // Enqueue until the depth tracker has counted the backlog past 2.
    let shed = within(Duration::from_secs(30), "enqueues to be shed", async {
        loop {
            match c.enqueue(parked()).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_eq!(shed.code(), Code::Unavailable, "{shed:?}");
    assert_eq!(
        shed.get_details_error_info().map(|i| i.reason),
        Some("overloaded".to_owned())
    );
    assert!(shed.get_details_retry_info().is_some(), "{shed:?}");
    let read = c
        .get_job(pb::GetJobRequest {
            id: kept.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.id, kept.id);
    app.stop().await;
}

/// Process enqueues and waits: a job the built-in workers run comes back finished with its
/// result; `run_at` is refused (the job runs now); out of time, DEADLINE_EXCEEDED names the
/// job, which is still there.
async fn process_waits_for_the_end(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, |_| {}).await else {
        return;
    };
    let mut c = client(&app).await;
    let process = |job: pb::JobSpec| pb::ProcessRequest { job: Some(job) };
    let done = c
        .process(process(pb::JobSpec {
            args: Some(r#"{"n": 1}"#.into()),
            ..spec("echo")
        }))
        .await
        .unwrap()
        .into_inner();
    let job = done.job.expect("the finished job");
    assert_eq!(job.state(), pb::JobState::Completed);
    assert_eq!(job.result.as_deref(), Some(r#"{"n": 1}"#));
    assert!(!done.unique_conflict);

    let later = c
        .process(process(pb::JobSpec {
            run_at: Some(prost_types::Timestamp {
                seconds: 1_900_000_000,
                nanos: 0,
            }),
            ..spec("echo")
        }))
        .await
        .unwrap_err();
    assert_eq!(later.code(), Code::InvalidArgument, "{later:?}");
    let fields: Vec<String> = later
        .get_details_bad_request()
        .expect("BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["run_at"]);

    let mut parked = Request::new(process(pb::JobSpec {
        queue: Some("grpc-parked".into()),
        ..spec("noop")
    }));
    parked.set_timeout(Duration::from_millis(300));
    let late = c.process(parked).await.unwrap_err();
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
    let info = late.get_details_error_info().expect("the server's answer");
    let id = info.metadata.get("job_id").expect("the job it waited on");
    let still = c
        .get_job(pb::GetJobRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.state(), pb::JobState::Available);
    app.stop().await;
}
both_backends!(process_waits_for_the_end);

/// A client that knows nothing of Keel but the reflection service: it asks which services
/// there are, fetches the file that defines JobService, builds an EnqueueRequest from the
/// descriptors alone, and calls Enqueue with raw bytes; the job it created is there over
/// HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_knows_only_reflection_can_call_enqueue() {
    use bytes::{Buf, BufMut};
    use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage, Value};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    /// Messages as the bytes they are on the wire.
    #[derive(Clone, Copy, Default)]
    struct Raw;
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }
    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            let n = src.remaining();
            Ok(Some(src.copy_to_bytes(n).to_vec()))
        }
    }

    let Some(app) = spawn_app_with(Backend::Sqlite, "grpc::reflection_only", |_| {}).await else {
        return;
    };
    let url = format!("http://{}", app.grpc_addr.expect("gRPC on"));
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let answers = reflect(
        &channel,
        vec![
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("keel.v1.JobService".to_owned()),
        ],
    )
    .await;
    let [
        MessageResponse::ListServicesResponse(list),
        MessageResponse::FileDescriptorResponse(files),
    ] = answers.as_slice()
    else {
        panic!("{answers:?}");
    };
    let service_name = list
        .service
        .iter()
        .map(|s| s.name.clone())
        .find(|n| n.ends_with(".JobService"))
        .expect("a JobService is listed");
    let decode = |files: &[Vec<u8>]| -> Vec<prost_types::FileDescriptorProto> {
        files
            .iter()
            .map(|b| prost::Message::decode(b.as_slice()).unwrap())
            .collect()
    };
    // The file, then what it imports (google.protobuf's), asked for by name as grpcurl
    // does, until every dependency is known.
    let mut known = decode(&files.file_descriptor_proto);
    loop {
        let missing: Vec<String> = known
            .iter()
            .flat_map(|f| f.dependency.clone())
            .filter(|d| !known.iter().any(|f| f.name() == d))
            .collect();
        if missing.is_empty() {
            break;
        }
        let asks = missing
            .into_iter()
            .map(MessageRequest::FileByFilename)
            .collect();
        for answer in reflect(&channel, asks).await {
            let MessageResponse::FileDescriptorResponse(files) = answer else {
                panic!("a dependency the server cannot describe: {answer:?}");
            };
            for f in decode(&files.file_descriptor_proto) {
                if !known.iter().any(|k| k.name() == f.name()) {
                    known.push(f);
                }
            }
        }
    }
    let pool =
        DescriptorPool::from_file_descriptor_set(prost_types::FileDescriptorSet { file: known })
            .expect("the descriptors resolve");
    let service = pool
        .get_service_by_name(&service_name)
        .expect("the service");
    let enqueue = service
        .methods()
        .find(|m| m.name() == "Enqueue")
        .expect("an Enqueue method");
    let spec_type = enqueue
        .input()
        .get_field_by_name("job")
        .and_then(|f| f.kind().as_message().cloned())
        .expect("EnqueueRequest.job is a message");
    let mut spec = DynamicMessage::new(spec_type);
    spec.set_field_by_name("kind", Value::String("noop".into()));
    spec.set_field_by_name("queue", Value::String("grpc-parked".into()));
    spec.set_field_by_name("args", Value::String(r#"{"via": "reflection"}"#.into()));
    let mut request = DynamicMessage::new(enqueue.input());
    request.set_field_by_name("job", Value::Message(spec));

    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = format!("/{}/{}", service.full_name(), enqueue.name());
    let reply = grpc
        .unary(
            tonic::Request::new(prost::Message::encode_to_vec(&request)),
            path.parse().unwrap(),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let reply = DynamicMessage::decode(enqueue.output(), reply.as_slice()).unwrap();
    let job = reply.get_field_by_name("job").expect("the reply's job");
    let job = job.as_message().expect("a message");
    let id = job.get_field_by_name("id").unwrap();
    let id = id.as_str().expect("a string id").to_owned();
    let state = job.get_field_by_name("state").unwrap().as_enum_number();
    let state_name = job
        .descriptor()
        .get_field_by_name("state")
        .and_then(|f| f.kind().as_enum().cloned())
        .and_then(|e| e.get_value(state?))
        .map(|v| v.name().to_owned());
    assert_eq!(state_name.as_deref(), Some("JOB_STATE_AVAILABLE"));

    let over_http = app.client.get_job(&id).await.unwrap();
    assert_eq!(over_http.kind, "noop");
    assert_eq!(over_http.args.get(), r#"{"via": "reflection"}"#);
    app.stop().await;
}

/// Every ScheduleService call, as `/v1/schedules` answers them: create (the template's args
/// byte for byte), get with next ticks, list, pause, resume, replace, delete; a taken name
/// is ABORTED; every bad field named at once, the template's under `job.`.
async fn schedule_calls_round_trip(backend: Backend, test: &str) {
    use keel_api::grpc::pb::schedule_service_client::ScheduleServiceClient;

    let Some(app) = spawn_app_with(backend, test, |_| {}).await else {
        return;
    };
    let url = format!("http://{}", app.grpc_addr.expect("gRPC on"));
    let mut c = ScheduleServiceClient::connect(url).await.unwrap();
    let spec = |cron: &str| pb::ScheduleSpec {
        name: Some("nightly".into()),
        cron: cron.into(),
        timezone: Some("Europe/Paris".into()),
        job: Some(pb::JobTemplate {
            kind: "noop".into(),
            queue: Some("grpc-parked".into()),
            args: Some(r#"{"b": 1,  "a": 2}"#.into()),
            timeout: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            ..Default::default()
        }),
        catch_up: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        ..Default::default()
    };
    let created = c
        .create_schedule(pb::CreateScheduleRequest {
            schedule: Some(spec("0 3 * * *")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, "nightly");
    assert_eq!(created.timezone, "Europe/Paris");
    let job = created.job.clone().unwrap();
    assert_eq!(job.args.as_deref(), Some(r#"{"b": 1,  "a": 2}"#));
    assert_eq!(job.timeout.map(|d| d.seconds), Some(2));
    assert_eq!(created.catch_up.map(|d| d.seconds), Some(600));
    assert!(!created.next_ticks.is_empty());

    let taken = c
        .create_schedule(pb::CreateScheduleRequest {
            schedule: Some(spec("0 3 * * *")),
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::Aborted, "{taken:?}");

    let by_name = |name: &str| pb::ScheduleRef {
        name: name.into(),
        tenant: None,
    };
    let got = c
        .get_schedule(by_name("nightly"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.cron, "0 3 * * *");
    let page = c
        .list_schedules(pb::ListSchedulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.schedules.len(), 1);
    assert_eq!(page.next, None);
    let paused = c
        .pause_schedule(by_name("nightly"))
        .await
        .unwrap()
        .into_inner();
    assert!(paused.paused && paused.next_ticks.is_empty());
    let resumed = c
        .resume_schedule(by_name("nightly"))
        .await
        .unwrap()
        .into_inner();
    assert!(!resumed.paused);
    let replaced = c
        .put_schedule(pb::PutScheduleRequest {
            name: "nightly".into(),
            schedule: Some(spec("30 4 * * *")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!replaced.created);
    assert_eq!(replaced.schedule.unwrap().cron, "30 4 * * *");
    c.delete_schedule(by_name("nightly")).await.unwrap();
    let gone = c.get_schedule(by_name("nightly")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");

    let mut bad = spec("not cron");
    bad.job = Some(pb::JobTemplate {
        kind: "noop".into(),
        args: Some("{nope".into()),
        ..Default::default()
    });
    let refused = c
        .create_schedule(pb::CreateScheduleRequest {
            schedule: Some(bad),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let mut fields: Vec<_> = refused
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    fields.sort();
    assert_eq!(fields, ["cron", "job.args"], "{refused:?}");
    let unnamed = c
        .get_schedule(by_name("no spaces allowed"))
        .await
        .unwrap_err();
    assert_eq!(unnamed.code(), Code::InvalidArgument, "{unnamed:?}");
}

both_backends!(schedule_calls_round_trip);
