//! The admin listener's diagnostics on a real Keel: a CPU profile taken under load holds
//! Keel's own functions; a heap profile comes from a child `keel serve` (the binary is the
//! one that allocates through jemalloc); the task dump names the dispatcher and the jobs'
//! worker tasks; the admin token guards a non-loopback listener; and the runtime and
//! process gauges reach `/metrics`. Profiles are decoded as the tools read them: gunzip,
//! then pprof's `Profile` protobuf. Diagnostics do not depend on the store, so these run on
//! SQLite only.

use std::io::Read as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pprof::protos::Message as _;
use serde_json::json;

use crate::child::KeelProcess;
use crate::helpers::{Backend, JsonAnswer, database, metric_value, spawn_app_with, within};

/// Gunzips and decodes a profile as `go tool pprof` would, failing the test on anything
/// else.
fn decode(gz: &[u8]) -> pprof::protos::Profile {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut raw)
        .expect("the profile is gzipped");
    pprof::protos::Profile::decode(raw.as_slice()).expect("the profile is a pprof protobuf")
}

/// Whether the exposition has a sample (not just help text) of `metric`.
fn has_sample(text: &str, metric: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(metric)
            .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
    })
}

/// The names of the profile's functions, from its string table.
fn function_names(p: &pprof::protos::Profile) -> Vec<&str> {
    p.function
        .iter()
        .filter_map(|f| p.string_table.get(usize::try_from(f.name).ok()?))
        .map(String::as_str)
        .collect()
}

/// The names of the profile's sample types (`samples`, `cpu`, `inuse_space`…).
fn sample_types(p: &pprof::protos::Profile) -> Vec<&str> {
    p.sample_type
        .iter()
        .filter_map(|t| p.string_table.get(usize::try_from(t.ty).ok()?))
        .map(String::as_str)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_profile_under_load_is_pprof_with_keels_own_functions() {
    let Some(app) = spawn_app_with(Backend::Sqlite, "cpu_profile", |_| {}).await else {
        return;
    };
    // Load for the whole profile: enqueues from a few concurrent clients, run by workers.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (client, stop) = (app.client.clone(), Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let job = keel_client::JobIn::new("echo", json!({"n": sent}));
                client
                    .enqueue(&job, None)
                    .await
                    .expect("enqueue under load");
                sent += 1;
            }
            sent
        }));
    }
    let resp = app
        .http
        .get(app.admin_url("/debug/pprof/profile?seconds=2"))
        .send()
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for l in load {
        sent += l.await.unwrap();
    }
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/octet-stream",
        "a download, as Go serves profiles"
    );
    let profile = decode(&resp.bytes().await.unwrap());
    assert!(sent > 0, "the load ran");
    assert!(!profile.sample.is_empty(), "no samples under load");
    assert_eq!(sample_types(&profile), ["samples", "cpu"]);
    let names = function_names(&profile);
    assert!(
        names.iter().any(|n| n.starts_with("keel")),
        "none of Keel's own functions in the profile: {names:?}"
    );

    // The flamegraph of the same kind of profile is an SVG.
    let resp = app
        .http
        .get(app.admin_url("/debug/pprof/profile?seconds=1&format=flamegraph"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "image/svg+xml");
    assert!(resp.text().await.unwrap().contains("<svg"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_profiles_come_from_jemalloc_in_the_keel_binary() {
    let (url, _db) = database(Backend::Sqlite, "heap_profile").await.unwrap();
    let http = reqwest::Client::new();

    // Sampling on from the start (every 4 KiB allocated, so a short run has samples).
    let keel = KeelProcess::start(
        &url,
        &[("_RJEM_MALLOC_CONF", "prof_active:true,lg_prof_sample:12")],
    )
    .await;
    for i in 0..50 {
        let resp = http
            .post(keel.url("/v1/jobs"))
            .json(&json!({"kind": "echo", "args": {"i": i}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    let resp = http
        .get(format!("{}/debug/pprof/heap", keel.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let profile = decode(&resp.bytes().await.unwrap());
    assert!(
        sample_types(&profile).contains(&"inuse_space"),
        "{:?}",
        sample_types(&profile)
    );
    assert!(!profile.sample.is_empty(), "no live allocation was sampled");
    let drop_frames = &profile.string_table[usize::try_from(profile.drop_frames).unwrap()];
    assert!(
        drop_frames.contains("_rjem_"),
        "the allocator's own frames are marked for pprof to drop: {drop_frames:?}"
    );
    let names = function_names(&profile);
    assert!(
        names.iter().any(|n| n.contains("keel")),
        "the profile is not symbolized with Keel's functions: {names:?}"
    );
    // jemalloc's statistics reach /metrics in the binary (the first refresh is at start).
    let metrics = keel.metrics(&http).await;
    let allocated = metric_value(&metrics, "keel_allocator_allocated_bytes", &[]);
    let resident = metric_value(&metrics, "keel_allocator_resident_bytes", &[]);
    assert!(
        allocated > 1e5 && resident >= allocated,
        "{allocated} {resident}"
    );
    keel.stop(Duration::from_secs(10)).await;

    // On by default, at Go's rate (one sample per 512 KiB), so a leak can be diffed against a
    // baseline taken before it began; switched off and on again at runtime.
    let keel = KeelProcess::start(&url, &[]).await;
    let admin = |path: &str| format!("{}{path}", keel.admin);
    let resp = http.get(admin("/debug/pprof/heap")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "profiling is on from the start");
    let profile = decode(&resp.bytes().await.unwrap());
    assert!(sample_types(&profile).contains(&"inuse_space"));
    let on: serde_json::Value = http
        .post(admin("/debug/pprof/heap/activate"))
        .json_answer()
        .await;
    assert_eq!(on["active"], true, "{on}");
    assert_eq!(on["changed"], false, "already on: {on}");
    assert_eq!(on["sample_interval_bytes"], 1 << 19, "{on}");
    let off: serde_json::Value = http
        .post(admin("/debug/pprof/heap/deactivate"))
        .json_answer()
        .await;
    assert_eq!(off["active"], false, "{off}");
    let resp = http.get(admin("/debug/pprof/heap")).send().await.unwrap();
    assert_eq!(resp.status(), 409);
    let problem: serde_json::Value = resp.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("/debug/pprof/heap/activate"),
        "{problem}"
    );
    let again: serde_json::Value = http
        .post(admin("/debug/pprof/heap/activate"))
        .json_answer()
        .await;
    assert_eq!(again["changed"], true, "{again}");
    let resp = http.get(admin("/debug/pprof/heap")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    keel.stop(Duration::from_secs(10)).await;
}

// One worker: on two, a dump taken while the machine is loaded can wedge one of them for
// good (tokio's timed rendezvous; docs/operations.md), and the runtime's drop at the end of
// the test would then never return.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_task_dump_names_the_dispatcher_and_the_running_jobs() {
    let Some(app) = spawn_app_with(Backend::Sqlite, "task_dump", |a| {
        a.queues = Some("default:4".into());
    })
    .await
    else {
        return;
    };
    // Three jobs parked in their executor while the dump is taken.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.enqueue("sleep", json!({"ms": 60_000})).await);
    }
    for id in &ids {
        app.wait_for(id, Duration::from_secs(10), |j| j.state == "running")
            .await;
    }
    let resp = within(
        Duration::from_secs(30),
        "the task dump",
        app.http.get(app.admin_url("/debug/tasks")).send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    let dump = resp.text().await.unwrap();
    assert!(dump.starts_with("keel task dump: "), "{dump:.2000}");
    for (what, needle) in [
        ("the dispatcher", "keel_runtime::dispatcher::run"),
        ("the jobs' worker tasks", "keel_runtime::worker::run_job"),
        ("the sleep executor", "keel_runtime::executors::sleep"),
        ("the maintenance loop", "keel_runtime::maintenance::run"),
        ("source locations", "crates/keel-runtime/src/dispatcher.rs:"),
    ] {
        assert!(
            dump.contains(needle),
            "{what} ({needle}) not in the dump:\n{dump}"
        );
    }

    // The summary folds the three identical job stacks into one group.
    let summary = app
        .http
        .get(app.admin_url("/debug/tasks?summary=1"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        summary.starts_with("keel task summary: "),
        "{summary:.2000}"
    );
    let grouped = summary.split("\n\n").any(|group| {
        let count = group
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<usize>().ok());
        count >= Some(3) && group.contains("keel_runtime::executors::sleep")
    });
    assert!(grouped, "no group of the 3 sleeping jobs:\n{summary}");
    // Stopping releases the sleeping jobs after the (short) test grace period.
    app.stop().await;
}

#[test]
fn a_public_admin_listener_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--admin-addr", "0.0.0.0:0"])
        .current_dir(dir.path())
        .env_remove("KEEL_ADMIN_TOKEN")
        .env_remove("KEEL_ADMIN_ADDR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("  admin_addr: "), "{stderr}");
    assert!(stderr.contains("KEEL_ADMIN_TOKEN"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_admin_listener_requires_its_token() {
    const TOKEN: &str = "diagnostics-test-admin-token";
    let Some(app) = spawn_app_with(Backend::Sqlite, "admin_token", |a| {
        a.admin_addr = Some("0.0.0.0:0".into());
        a.admin_token = Some(TOKEN.into());
    })
    .await
    else {
        return;
    };
    assert!(app.admin_addr.ip().is_unspecified());
    let url = format!("http://127.0.0.1:{}/debug/config", app.admin_addr.port());
    let resp = app.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = app
        .http
        .get(&url)
        .bearer_auth("diagnostics-test-admin-tokeN")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = app.http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let config = resp.text().await.unwrap();
    assert!(!config.contains(TOKEN), "the token is shown: {config}");
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["admin_token"], "***");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_and_process_gauges_reach_metrics() {
    let Some(app) = spawn_app_with(Backend::Sqlite, "runtime_gauges", |_| {}).await else {
        return;
    };
    // The gauge loop refreshes at start, then every few seconds.
    let text = within(Duration::from_secs(30), "the gauges appearing", async {
        loop {
            let text = app.metrics().await;
            if has_sample(&text, "process_open_fds") && has_sample(&text, "keel_runtime_workers") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // This test binary's runtime has 2 workers; other tests' runtimes may write the same
    // process-wide gauges, but every runtime here has at least one.
    assert!(metric_value(&text, "keel_runtime_workers", &[]) >= 1.0);
    assert!(metric_value(&text, "process_open_fds", &[]) > 0.0);
    assert!(metric_value(&text, "process_max_fds", &[]) > 0.0);
    assert!(metric_value(&text, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(metric_value(&text, "process_threads", &[]) >= 2.0);
    for metric in [
        "process_cpu_seconds_total",
        "keel_runtime_global_queue_depth",
        "keel_runtime_local_queue_depth",
        "keel_runtime_blocking_threads",
        "keel_runtime_blocking_queue_depth",
    ] {
        assert!(has_sample(&text, metric), "{metric} missing:\n{text}");
    }
    // The test binary allocates through the system allocator: no jemalloc figures.
    assert!(
        !has_sample(&text, "keel_allocator_allocated_bytes"),
        "{text}"
    );
    app.stop().await;
}
