//! `keel.v1.WorkerService` and `JobService/Watch` through a real tonic client against the
//! real app: the streaming lease draining a backlog with bounded credits, every unary
//! worker call and its fencing, the stream's refusals, and watches of a job and a queue.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt as _;
use keel_api::grpc::pb;
use keel_api::grpc::pb::job_service_client::JobServiceClient;
use keel_api::grpc::pb::worker_service_client::WorkerServiceClient;
use keel_client::JobIn;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use crate::both_backends;
use crate::helpers::{Backend, TestApp, spawn_app_with, within};

/// A queue name no other test uses: the test app serves only `default`, so it is external.
fn external_queue() -> String {
    format!("grpc-ext-{}", uuid::Uuid::new_v4().simple())
}

async fn channel(app: &TestApp) -> Channel {
    let addr = app.grpc_addr.expect("the gRPC listener is on in tests");
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

/// Inserts `n` jobs of kind `work` into `queue` over HTTP, in batches.
async fn backlog(app: &TestApp, queue: &str, n: usize) -> Vec<String> {
    let job = JobIn {
        kind: "work".to_owned(),
        queue: Some(queue.to_owned()),
        ..JobIn::default()
    };
    let mut ids = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let count = left.min(1000);
        let jobs = app
            .client
            .enqueue_batch(&vec![job.clone(); count])
            .await
            .unwrap();
        ids.extend(jobs.into_iter().map(|j| j.id.to_string()));
        left -= count;
    }
    ids
}

pub(crate) fn open(queue: &str, credits: u32) -> pb::LeaseRequest {
    pb::LeaseRequest {
        open: Some(pb::LeaseOpen {
            queue: queue.to_owned(),
            worker: "grpc-test-worker".to_owned(),
            kinds: Vec::new(),
            lease: None,
        }),
        credits,
        outcomes: Vec::new(),
        drain: false,
    }
}

pub(crate) fn complete(job: &pb::Job, result: &str) -> pb::Outcome {
    pb::Outcome {
        id: job.id.clone(),
        token: token(job),
        outcome: Some(pb::outcome::Outcome::Complete(pb::outcome::Completion {
            result: Some(result.to_owned()),
        })),
    }
}

pub(crate) fn token(job: &pb::Job) -> String {
    job.lease
        .as_ref()
        .and_then(|l| l.token.clone())
        .expect("a leased job carries its token")
}

/// A worker's side of a Lease stream: what it sends, and the server's replies.
pub(crate) struct Stream {
    tx: mpsc::Sender<pb::LeaseRequest>,
    replies: tonic::Streaming<pb::LeaseResponse>,
}

pub(crate) async fn lease_stream(
    ch: &Channel,
    first: pb::LeaseRequest,
) -> Result<Stream, tonic::Status> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(first).await.unwrap();
    let outbound =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let replies = WorkerServiceClient::new(ch.clone())
        .lease(outbound)
        .await?
        .into_inner();
    Ok(Stream { tx, replies })
}

impl Stream {
    pub(crate) async fn next(&mut self) -> pb::LeaseResponse {
        within(
            Duration::from_secs(30),
            "a reply on the Lease stream",
            async {
                self.replies
                    .message()
                    .await
                    .expect("the stream is healthy")
                    .expect("the stream is open")
            },
        )
        .await
    }

    pub(crate) async fn send(&self, credits: u32, outcomes: Vec<pb::Outcome>) {
        self.tx
            .send(pb::LeaseRequest {
                open: None,
                credits,
                outcomes,
                drain: false,
            })
            .await
            .unwrap();
    }
}

/// The acceptance drain: 10,000 jobs through one Lease stream with 20 credits, each
/// completion handing its credit back. Never more than 20 jobs are held, every job comes
/// once, every outcome is answered OK, and the queue ends with all 10,000 completed.
async fn the_streaming_lease_drains_a_backlog_with_bounded_credits(backend: Backend, test: &str) {
    const JOBS: usize = 10_000;
    const IN_FLIGHT: u32 = 20;
    let Some(app) = spawn_app_with(backend, test, |_| {}).await else {
        return;
    };
    let queue = external_queue();
    let ids: HashSet<String> = backlog(&app, &queue, JOBS).await.into_iter().collect();
    let ch = channel(&app).await;
    let mut s = lease_stream(&ch, open(&queue, IN_FLIGHT)).await.unwrap();
    let (mut held, mut seen, mut answered) = (0u32, HashSet::new(), 0usize);
    within(
        Duration::from_secs(300),
        "the stream to drain the backlog",
        async {
            while answered < JOBS {
                let reply = s.next().await;
                for r in &reply.results {
                    assert_eq!(r.code, Code::Ok as i32, "{r:?}");
                    assert_eq!(r.state(), pb::JobState::Completed);
                    answered += 1;
                }
                held += u32::try_from(reply.jobs.len()).unwrap();
                assert!(held <= IN_FLIGHT, "{held} jobs held on {IN_FLIGHT} credits");
                let mut outcomes = Vec::new();
                for job in &reply.jobs {
                    assert_eq!(job.state(), pb::JobState::Running);
                    assert!(seen.insert(job.id.clone()), "job {} leased twice", job.id);
                    outcomes.push(complete(job, r#"{"ok": true}"#));
                }
                if !outcomes.is_empty() {
                    held -= u32::try_from(outcomes.len()).unwrap();
                    s.send(u32::try_from(outcomes.len()).unwrap(), outcomes)
                        .await;
                }
            }
        },
    )
    .await;
    assert_eq!(seen, ids, "every job of the backlog, and only those");
    let counts = app.client.queue(&queue).await.unwrap();
    assert_eq!(counts["counts"]["completed"], JOBS as u64, "{counts}");
    assert_eq!(counts["counts"]["running"], 0, "{counts}");
    // Closing the worker's side ends the stream cleanly.
    drop(s.tx);
    let end = within(
        Duration::from_secs(10),
        "the stream to end",
        s.replies.message(),
    )
    .await;
    assert!(matches!(end, Ok(None)), "{end:?}");
}

both_backends!(the_streaming_lease_drains_a_backlog_with_bounded_credits);

/// The unary calls and the stream's outcomes, fenced by the lease token as over HTTP:
/// heartbeat, fail (retryable), complete with a result, release; a stale token is
/// FAILED_PRECONDITION saying why; a cancelled job's heartbeat says so.
async fn worker_calls_are_fenced_like_http(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, |_| {}).await else {
        return;
    };
    let queue = external_queue();
    let ids = backlog(&app, &queue, 4).await;
    let ch = channel(&app).await;
    let mut w = WorkerServiceClient::new(ch.clone());
    let mut s = lease_stream(&ch, open(&queue, 4)).await.unwrap();
    let mut jobs = Vec::new();
    while jobs.len() < 4 {
        jobs.extend(s.next().await.jobs);
    }
    for j in &jobs {
        assert!(ids.contains(&j.id));
        let lease = j.lease.as_ref().unwrap();
        assert_eq!(lease.owner, "grpc-test-worker");
        assert_eq!(j.attempt, 1);
    }
    let (a, b, c, d) = (&jobs[0], &jobs[1], &jobs[2], &jobs[3]);

    // Heartbeat: a later expiry.
    let beat = w
        .heartbeat(pb::HeartbeatRequest {
            id: a.id.clone(),
            token: token(a),
            lease: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!beat.cancel_requested);
    assert!(
        beat.expires_at.unwrap().seconds > a.lease.as_ref().unwrap().expires_at.unwrap().seconds
    );

    // Complete with a result, byte for byte.
    let done = w
        .complete(pb::CompleteRequest {
            id: a.id.clone(),
            token: token(a),
            result: Some(r#"{"n":  1}"#.into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), pb::JobState::Completed);
    assert_eq!(done.result.as_deref(), Some(r#"{"n":  1}"#));
    assert!(done.lease.is_none(), "a finished job has no lease");
    // Again with the same token: stale, saying why.
    let stale = w
        .complete(pb::CompleteRequest {
            id: a.id.clone(),
            token: token(a),
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("already completed"), "{stale:?}");

    // Fail: retryable with the error recorded.
    let failed = w
        .fail(pb::FailRequest {
            id: b.id.clone(),
            token: token(b),
            error: "boom".into(),
            permanent: false,
            retry_in: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.state(), pb::JobState::Retryable);
    assert_eq!(failed.errors.len(), 1);
    assert_eq!(failed.errors[0].message, "boom");

    // Release: available again, the attempt not counted.
    let released = w
        .release(pb::ReleaseRequest {
            id: c.id.clone(),
            token: token(c),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.state(), pb::JobState::Available);
    assert_eq!(released.attempt, 0);

    // A cancelled job: its heartbeat says so, over the stream too.
    app.client.cancel_job(&d.id).await.unwrap();
    let beat = w
        .heartbeat(pb::HeartbeatRequest {
            id: d.id.clone(),
            token: token(d),
            lease: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(beat.cancel_requested && beat.expires_at.is_none());
    s.send(
        0,
        vec![
            pb::Outcome {
                id: d.id.clone(),
                token: token(d),
                outcome: Some(pb::outcome::Outcome::Heartbeat(pb::outcome::Beat {
                    lease: None,
                })),
            },
            complete(d, "null"),
            pb::Outcome {
                id: "nope".into(),
                token: token(d),
                outcome: Some(pb::outcome::Outcome::Release(pb::outcome::Release {})),
            },
            pb::Outcome {
                id: d.id.clone(),
                token: token(d),
                outcome: None,
            },
        ],
    )
    .await;
    let mut results = Vec::new();
    while results.len() < 4 {
        results.extend(s.next().await.results);
    }
    let by = |code: Code| results.iter().filter(|r| r.code == code as i32).count();
    assert_eq!(by(Code::InvalidArgument), 2, "{results:?}");
    let stale = results
        .iter()
        .find(|r| r.code == Code::FailedPrecondition as i32)
        .expect("the completion of a cancelled job is refused");
    assert!(stale.message.contains("cancelled"), "{stale:?}");
    let beat = results
        .iter()
        .find(|r| r.code == Code::Ok as i32)
        .expect("the heartbeat is answered");
    assert!(beat.cancel_requested, "{beat:?}");
    assert_eq!(beat.state(), pb::JobState::Cancelled, "{beat:?}");

    // Unknown and malformed ids.
    let missing = w
        .complete(pb::CompleteRequest {
            id: uuid::Uuid::now_v7().to_string(),
            token: token(a),
            result: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let bad = w
        .fail(pb::FailRequest {
            id: "not-a-uuid".into(),
            token: "nope".into(),
            error: String::new(),
            permanent: false,
            retry_in: None,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let fields: Vec<_> = bad
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    assert_eq!(fields, ["id"], "{bad:?}");
}

both_backends!(worker_calls_are_fenced_like_http);

/// What a Lease stream refuses, with the status the call ends with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_streams_refuse_bad_opens_and_too_many_credits() {
    let Some(app) = spawn_app_with(Backend::Sqlite, "grpc_workers::refusals", |_| {}).await else {
        return;
    };
    let ch = channel(&app).await;
    // No open message.
    let no_open = lease_stream(
        &ch,
        pb::LeaseRequest {
            credits: 1,
            ..Default::default()
        },
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(no_open.code(), Code::InvalidArgument, "{no_open:?}");
    // Every bad field of the open message at once, named as over HTTP.
    let bad = lease_stream(
        &ch,
        pb::LeaseRequest {
            open: Some(pb::LeaseOpen {
                queue: "no spaces".into(),
                worker: String::new(),
                kinds: Vec::new(),
                lease: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
            }),
            credits: 1,
            outcomes: Vec::new(),
            drain: false,
        },
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let mut fields: Vec<_> = bad
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    fields.sort();
    assert_eq!(fields, ["lease", "queue", "worker"], "{bad:?}");
    // The built-in workers' queue is not an external worker's to lease.
    let served = lease_stream(&ch, open("default", 1))
        .await
        .err()
        .expect("refused");
    assert_eq!(served.code(), Code::FailedPrecondition, "{served:?}");
    // Credits past 1000 outstanding end the stream.
    let queue = external_queue();
    let mut s = lease_stream(&ch, open(&queue, 1000)).await.unwrap();
    s.send(1, Vec::new()).await;
    let end = within(
        Duration::from_secs(10),
        "the stream to end",
        s.replies.message(),
    )
    .await
    .unwrap_err();
    assert_eq!(end.code(), Code::InvalidArgument, "{end:?}");
    let violation = end
        .get_details_bad_request()
        .and_then(|b| b.field_violations.into_iter().next())
        .expect("a field violation");
    assert_eq!(violation.field, "credits");
    assert!(
        violation.description.contains("at most 1000"),
        "{violation:?}"
    );
}

/// The transitions a watch must report for a job that failed its first attempt (retried)
/// and completed its second, in this order. Between the retry and the second lease the job
/// may be read `available` or not, so that one is left out.
pub(crate) fn assert_failed_then_completed(mut events: Vec<(pb::JobState, u32)>, seen: &str) {
    use pb::JobState::*;
    events.retain(|e| *e != (Available, 1));
    assert_eq!(
        events,
        [
            (Available, 0),
            (Running, 1),
            (Retryable, 1),
            (Running, 2),
            (Completed, 2)
        ],
        "the job's transitions, in order, seen {seen}"
    );
}

pub(crate) fn watch_id(id: &str) -> pb::WatchRequest {
    pb::WatchRequest {
        target: Some(pb::watch_request::Target::Id(id.to_owned())),
    }
}

/// A job watch sends the job as it is, then each transition in order (every attempt's
/// start, the failure, the end), and ends OK after the terminal state; a queue watch sees
/// the changes of its queue only.
async fn watch_reports_transitions_in_order(backend: Backend, test: &str) {
    let Some(app) = spawn_app_with(backend, test, |_| {}).await else {
        return;
    };
    let queue = external_queue();
    let ch = channel(&app).await;
    let mut jobs = JobServiceClient::new(ch.clone());
    let mut on_queue = jobs
        .watch(pb::WatchRequest {
            target: Some(pb::watch_request::Target::Queue(queue.clone())),
        })
        .await
        .unwrap()
        .into_inner();
    let id = backlog(&app, &queue, 1).await.remove(0);
    let mut watch = jobs.watch(watch_id(&id)).await.unwrap().into_inner();
    let mut events = Vec::new();
    let mut next = async || {
        within(Duration::from_secs(30), "a watch event", watch.message())
            .await
            .expect("the watch is healthy")
    };
    let first = next().await.expect("the job as it is");
    assert_eq!(first.state(), pb::JobState::Available);
    assert_eq!(first.job.as_ref().map(|j| j.id.as_str()), Some(id.as_str()));
    events.push((first.state(), first.attempt));

    // Attempt 1 fails (retry in 2 s), attempt 2 completes. Not "retry now": a job watch
    // reports what its reads find, and a job due at once can be promoted back to available
    // before the read that follows the failure, on a loaded machine, so the watch would
    // never show it retryable.
    let mut w = WorkerServiceClient::new(ch.clone());
    let mut s = lease_stream(&ch, open(&queue, 1)).await.unwrap();
    let job = s.next().await.jobs.remove(0);
    w.fail(pb::FailRequest {
        id: id.clone(),
        token: token(&job),
        error: "first".into(),
        permanent: false,
        retry_in: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
    })
    .await
    .unwrap();
    // The next lease only once the watch reported the failure: the order is then fixed.
    loop {
        let ev = next().await.expect("the job is not finished");
        events.push((ev.state(), ev.attempt));
        if ev.state() == pb::JobState::Retryable {
            break;
        }
    }
    s.send(1, Vec::new()).await;
    let job = loop {
        let mut reply = s.next().await;
        if let Some(j) = reply.jobs.pop() {
            break j;
        }
    };
    assert_eq!(job.attempt, 2);
    s.send(0, vec![complete(&job, "7")]).await;
    assert_eq!(s.next().await.results[0].code, Code::Ok as i32);

    while let Some(ev) = next().await {
        events.push((ev.state(), ev.attempt));
    }
    assert_failed_then_completed(events, "on the server that made them");
    use pb::JobState::*;

    // The queue watch saw this queue's outcomes (made on this server): the failure and the
    // completion, in order.
    let mut seen = Vec::new();
    while seen.last() != Some(&Completed) {
        let ev = within(Duration::from_secs(30), "a queue event", on_queue.message())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ev.queue, queue);
        assert_eq!(ev.id, id);
        seen.push(ev.state());
    }
    assert_eq!(seen.first(), Some(&Retryable), "{seen:?}");

    // A job that does not exist, and a request without a target.
    let missing = jobs
        .watch(watch_id(&uuid::Uuid::now_v7().to_string()))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let untargeted = jobs
        .watch(pb::WatchRequest { target: None })
        .await
        .unwrap_err();
    assert_eq!(untargeted.code(), Code::InvalidArgument, "{untargeted:?}");
}

both_backends!(watch_reports_transitions_in_order);

/// A finished job's watch sends it once and ends; the stream of a busy watcher is bounded
/// by the call's deadline on the client's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_jobs_watch_sends_it_and_ends() {
    let Some(app) = spawn_app_with(Backend::Sqlite, "grpc_workers::finished", |_| {}).await else {
        return;
    };
    let queue = external_queue();
    let id = backlog(&app, &queue, 1).await.remove(0);
    app.client.cancel_job(&id).await.unwrap();
    let mut jobs = JobServiceClient::new(channel(&app).await);
    let events: Vec<_> = jobs
        .watch(watch_id(&id))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = events[0].as_ref().unwrap();
    assert_eq!(ev.state(), pb::JobState::Cancelled);
}

/// On SIGTERM, open streams end with UNAVAILABLE rather than hang the shutdown, and the
/// process still exits cleanly within its grace: a waiting Lease stream, a job watch and a
/// queue watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_unavailable_when_the_server_stops() {
    let Some((url, _backing)) =
        crate::helpers::database(Backend::Sqlite, "grpc_workers::shutdown").await
    else {
        return;
    };
    let keel = crate::child::KeelProcess::start(&url, &[]).await;
    let queue = external_queue();
    let ch = Channel::from_shared(keel.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = keel_client::Client::new(&keel.base, None).unwrap();
    let parked = client
        .enqueue(
            &JobIn {
                queue: Some(format!("{queue}-parked")),
                ..JobIn::new("work", serde_json::json!(null))
            },
            None,
        )
        .await
        .unwrap();
    let mut s = lease_stream(&ch, open(&queue, 5)).await.unwrap();
    let mut jobs = JobServiceClient::new(ch.clone());
    let mut job_watch = jobs
        .watch(watch_id(&parked.job.id.to_string()))
        .await
        .unwrap()
        .into_inner();
    let first = within(
        Duration::from_secs(10),
        "the job as it is",
        job_watch.message(),
    )
    .await
    .unwrap();
    assert!(first.is_some());
    let mut queue_watch = jobs
        .watch(pb::WatchRequest {
            target: Some(pb::watch_request::Target::Queue(queue.clone())),
        })
        .await
        .unwrap()
        .into_inner();

    let stopping = tokio::spawn(keel.stop(Duration::from_secs(30)));
    let ended = within(
        Duration::from_secs(30),
        "the lease stream to end",
        s.replies.message(),
    )
    .await
    .unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    for watch in [&mut job_watch, &mut queue_watch] {
        let ended = within(Duration::from_secs(30), "a watch to end", watch.message())
            .await
            .unwrap_err();
        assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    }
    stopping.await.expect("keel stopped cleanly");
}
