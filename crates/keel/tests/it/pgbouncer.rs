//! `keel serve` behind a real PgBouncer in transaction mode (the scale-out scenarios run
//! through it too, in `scale_out`):
//! - set up for Postgres itself, Keel refuses to start with a configuration error naming
//!   `KEEL_DATABASE_POOLER` (exit 78), instead of failing request by request;
//! - PgBouncer killed and restarted in the middle of a load: no acknowledged job is lost,
//!   the outage is answered 503 (never 500), and enqueues succeed again within 5 s of its
//!   return.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_store::testkit::{PgBouncer, PgDatabase, pg_url_or_skip};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::child::KeelProcess;
use crate::helpers::within;

#[tokio::test]
async fn set_up_for_postgres_itself_keel_refuses_to_start_naming_the_pooler_setting() {
    let test =
        "pgbouncer::set_up_for_postgres_itself_keel_refuses_to_start_naming_the_pooler_setting";
    let Some(bouncer) = PgBouncer::start(test, None) else {
        return;
    };
    let database = PgDatabase::create(&pg_url_or_skip(test).unwrap()).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("serve")
        .env("KEEL_DATABASE_URL", bouncer.url(&database.name))
        .env("KEEL_DATABASE_WAIT", "0s")
        .env("KEEL_ADDR", "127.0.0.1:0")
        .env("KEEL_GRPC_ADDR", "off")
        .env("KEEL_ADMIN_ADDR", "off")
        .env_remove("KEEL_DATABASE_POOLER")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("KEEL_DATABASE_POOLER=transaction"),
        "the error names the setting: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pgbouncer_restart_under_load_loses_no_acknowledged_job() {
    let test = "pgbouncer::a_pgbouncer_restart_under_load_loses_no_acknowledged_job";
    let Some(mut bouncer) = PgBouncer::start(test, None) else {
        return;
    };
    let database = PgDatabase::create(&pg_url_or_skip(test).unwrap()).await;
    let listen = bouncer.direct_url(&database.name);
    let keel = KeelProcess::start(
        &bouncer.url(&database.name),
        &[
            ("KEEL_DATABASE_POOLER", "transaction"),
            ("KEEL_DATABASE_LISTEN_URL", &listen),
            ("KEEL_QUEUES", "default:8"),
            ("KEEL_DATABASE_WAIT", "0s"),
        ],
    )
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let acknowledged: Arc<Mutex<Vec<String>>> = Arc::default();
    let statuses: Arc<Mutex<Vec<u16>>> = Arc::default();
    let stop = CancellationToken::new();
    let mut clients = JoinSet::new();
    for _ in 0..4 {
        let (http, url) = (http.clone(), keel.url("/v1/jobs"));
        let (acknowledged, statuses, stop) = (
            Arc::clone(&acknowledged),
            Arc::clone(&statuses),
            stop.clone(),
        );
        clients.spawn(async move {
            while !stop.is_cancelled() {
                let Ok(resp) = http.post(&url).json(&json!({"kind": "noop"})).send().await else {
                    continue;
                };
                let status = resp.status().as_u16();
                statuses.lock().unwrap().push(status);
                if status == 201 {
                    let body: Value = resp.json().await.unwrap();
                    acknowledged
                        .lock()
                        .unwrap()
                        .push(body["id"].as_str().unwrap().to_owned());
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
    }
    let acked = || acknowledged.lock().unwrap().len();
    within(
        Duration::from_secs(30),
        "200 enqueues before the restart",
        async {
            while acked() < 200 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;

    bouncer.kill();
    let before_outage = acked();
    within(
        Duration::from_secs(30),
        "enqueues refused while PgBouncer is down",
        async {
            loop {
                let refused = statuses
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .take(4)
                    .all(|s| *s != 201);
                if refused && statuses.lock().unwrap().len() > before_outage + 4 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    bouncer.resume();
    let back = acked();
    within(
        Duration::from_secs(5),
        "an enqueue acknowledged within 5 s of PgBouncer's return",
        async {
            while acked() <= back {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    within(
        Duration::from_secs(30),
        "200 more enqueues after the restart",
        async {
            while acked() < back + 200 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    stop.cancel();
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }

    let statuses = statuses.lock().unwrap().clone();
    let unexpected: Vec<u16> = statuses
        .iter()
        .copied()
        .filter(|s| *s != 201 && *s != 503)
        .collect();
    assert!(
        unexpected.is_empty(),
        "answers other than 201 and 503: {unexpected:?}"
    );
    assert!(statuses.contains(&503), "the outage was answered 503");
    // Every acknowledged job is stored and runs to completion.
    let acknowledged: HashSet<String> = acknowledged.lock().unwrap().iter().cloned().collect();
    let (client, conn) = tokio_postgres::connect(&listen, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    within(
        Duration::from_secs(60),
        "every acknowledged job completed",
        async {
            loop {
                let rows = client
                    .query("SELECT id::text FROM jobs WHERE state = 'completed'", &[])
                    .await
                    .unwrap();
                let completed: HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
                if acknowledged.is_subset(&completed) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    )
    .await;
    keel.stop(Duration::from_secs(10)).await;
}
