//! G6 with a real process and a real SIGTERM: in-flight requests complete, running jobs
//! either finish within the grace period or are released unharmed, and the exit code is 0.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_client::{Client, JobIn};
use keel_core::store::ListParams;
use keel_core::{JobState, QueueName, SystemClock};
use keel_store::testkit::{PgSchema, pg_url_or_skip};
use keel_store::{DatabaseUrl, PgOptions, SqliteOptions};
use serde_json::json;

use crate::both_backends;
use crate::helpers::{Backend, within};

const GRACE: Duration = Duration::from_secs(4);

/// Starts `keel serve` as a child on a free port and returns it with its base URL, read
/// from its "keel is serving" log line.
fn start_keel(database_url: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("serve")
        .env("KEEL_ADDR", "127.0.0.1:0")
        .env("KEEL_ADMIN_ADDR", "127.0.0.1:0")
        .env("KEEL_DATABASE_URL", database_url)
        .env("KEEL_QUEUES", "default:50,long:20")
        .env("KEEL_REQUEST_TIMEOUT", "10s")
        .env("KEEL_SHUTDOWN_GRACE", format!("{}ms", GRACE.as_millis()))
        .env("KEEL_LOG_FORMAT", "json")
        .env("KEEL_DB_POOL_MAX", "8")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && line.contains("keel is serving") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let _ = tx.send(v["addr"].as_str().unwrap().to_owned());
                sent = true;
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("keel did not start");
    (child, format!("http://{addr}"))
}

async fn sigterm_drains_requests_and_releases_jobs(backend: Backend, test: &str) {
    let (url, _guard): (String, Box<dyn std::any::Any + Send>) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (
                format!("sqlite://{}", dir.path().join("keel.db").display()),
                Box::new(dir),
            )
        }
        Backend::Postgres => {
            let Some(base) = pg_url_or_skip(test) else {
                return;
            };
            let schema = PgSchema::create(&base).await;
            (schema.url.clone(), Box::new(schema))
        }
    };
    let (mut child, base) = start_keel(&url);
    let client = Client::new(base.clone(), None).unwrap();

    // 20 long jobs that cannot finish within the grace period.
    let mut long = Vec::new();
    for _ in 0..20 {
        let job = JobIn {
            queue: Some("long".into()),
            ..JobIn::new("sleep", json!({"ms": 120_000}))
        };
        long.push(client.enqueue(&job, None).await.unwrap().job.id);
    }
    within(Duration::from_secs(20), "20 long jobs to start", async {
        loop {
            let running = client
                .list_jobs(&keel_client::ListQuery {
                    queue: Some("long".into()),
                    state: Some("running".into()),
                    limit: Some(100),
                    ..Default::default()
                })
                .await
                .unwrap()
                .jobs
                .len();
            if running == 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // 50 slow requests: each waits for a 1.5 s job to finish.
    let mut requests = Vec::new();
    for _ in 0..50 {
        let client = client.clone();
        requests.push(tokio::spawn(async move {
            client
                .process(&JobIn::new("sleep", json!({"ms": 1500})))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    for r in requests {
        let job = r
            .await
            .unwrap()
            .expect("an in-flight request failed during shutdown");
        assert_eq!(job.state, "completed", "{job:?}");
    }
    let exit = within(GRACE + Duration::from_secs(15), "keel to exit", async {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let took = signalled.elapsed();
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");
    // The HTTP drain is bounded by the requests' own deadlines; the workers get the rest
    // of the grace period. Allow a second of process teardown.
    assert!(
        took <= GRACE + Duration::from_secs(1),
        "shutdown took {took:?} (grace {GRACE:?})"
    );

    // The long jobs are back in the queue, their attempt not counted.
    let store = keel_store::open(
        &DatabaseUrl::parse(&url).unwrap(),
        SqliteOptions::default(),
        PgOptions::for_tests(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap()
    .0;
    let page = store
        .list(ListParams {
            queue: Some(QueueName::parse("long").unwrap()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 20);
    for j in &page.jobs {
        assert_eq!(j.state, JobState::Available, "{}", j.id);
        assert_eq!(j.attempt, 0, "released jobs keep their attempt count");
        assert!(j.errors.is_empty());
    }
    store.close().await;
}
both_backends!(sigterm_drains_requests_and_releases_jobs);
