//! Configuration errors stop `keel serve` before any I/O, all listed, exit code 78.

use std::process::Command;

#[test]
fn bad_config_exits_78_naming_every_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("serve")
        .current_dir(dir.path())
        .env("KEEL_ADDR", "not-an-address")
        .env("KEEL_REQUEST_TIMEOUT", "fast")
        .env("KEEL_QUEUES", "default:0")
        .env("KEEL_DATABASE_URL", "mysql://nope")
        .env("KEEL_HEARTBEAT_INTERVAL", "1h")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for field in [
        "addr",
        "request_timeout",
        "queues",
        "database_url",
        "heartbeat_interval",
    ] {
        assert!(
            stderr.contains(&format!("  {field}: ")),
            "{field} not named in:\n{stderr}"
        );
    }
    assert!(stderr.contains("5 problems"), "{stderr}");
    // Nothing was created: validation happens before any I/O.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn public_bind_without_keys_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--addr", "0.0.0.0:0"])
        .env_remove("KEEL_API_KEYS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without API keys"));
}

#[test]
fn every_command_has_help_with_examples() {
    for args in [
        vec!["serve", "--help"],
        vec!["migrate", "--help"],
        vec!["enqueue", "--help"],
        vec!["job", "get", "--help"],
        vec!["jobs", "list", "--help"],
        vec!["queues", "--help"],
        vec!["hash-key", "--help"],
        vec!["bench", "--help"],
        vec!["load", "--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_keel"))
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example"),
            "{args:?} has no examples:\n{text}"
        );
    }
}

/// The admin listener shows the effective configuration with secrets redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_shows_redacted_config() {
    let digest = hex::encode(keel_api::hash_api_key("s3cret"));
    let Some(app) =
        crate::helpers::spawn_app_with(crate::helpers::Backend::Sqlite, "config::admin", |a| {
            a.api_keys = Some(format!("acme={digest}"));
        })
        .await
    else {
        return;
    };
    let url = format!("http://{}/debug/config", app.admin_addr);
    let resp = app.http.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["request_timeout"], "2000ms");
    assert!(v["database_url"].as_str().unwrap().starts_with("sqlite://"));
    assert!(!text.contains(&digest), "the key digest leaked: {text}");
    assert!(text.contains("acme=***"), "{text}");
    app.stop().await;
}

/// Client flags may follow the subcommand they belong to (`keel queues pause q --url …`).
#[test]
fn client_flags_are_accepted_after_the_subcommand() {
    // Nothing listens on port 1: the command parses, then cannot reach the server (69), which
    // is not the usage error (2) a misplaced flag would be.
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "queues",
            "pause",
            "default",
            "--url",
            "http://127.0.0.1:1",
            "--api-key",
            "k",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
}

/// A port already taken: a documented exit code (71), not a generic failure.
#[test]
fn a_port_in_use_exits_71() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("serve")
        .current_dir(dir.path())
        .env("KEEL_ADDR", &addr)
        .env("KEEL_ADMIN_ADDR", "off")
        .env("KEEL_GRPC_ADDR", "off")
        .env("KEEL_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(71), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&addr),
        "names the address: {out:?}"
    );
}

/// A database that is not up yet is waited for (KEEL_DATABASE_WAIT), each attempt logged;
/// one that never comes up ends in exit 69 once the wait is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_waits_for_a_database_that_is_not_up_yet() {
    let Some(base) = keel_store::testkit::pg_url_or_skip("config::startup_waits_for_the_database")
    else {
        return;
    };
    let schema = keel_store::testkit::PgSchema::create(&base).await;
    let config: tokio_postgres::Config = base.parse().unwrap();
    let upstream = match (config.get_hosts().first(), config.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(h)), port) => {
            format!("{h}:{}", port.copied().unwrap_or(5432))
        }
        other => panic!("the test database must be reached over TCP: {other:?}"),
    };
    let proxy = crate::chaos_outage::Proxy::start(upstream).await;
    proxy.set_cut(true);
    let url = crate::chaos_outage::through(&schema.url, proxy.addr);

    // Never up: exit 69 after the wait.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("serve")
        .env("KEEL_DATABASE_URL", &url)
        .env("KEEL_DATABASE_WAIT", "1s")
        .env("KEEL_ADDR", "127.0.0.1:0")
        .env("KEEL_ADMIN_ADDR", "off")
        .env("KEEL_GRPC_ADDR", "off")
        .env("KEEL_LOG_FORMAT", "json")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let logged = String::from_utf8_lossy(&out.stdout);
    assert!(
        logged.contains("not reachable yet"),
        "each attempt is logged: {logged}"
    );

    // Up after a few attempts: the process comes up and serves.
    let keel = tokio::spawn({
        let url = url.clone();
        async move {
            crate::child::KeelProcess::start(
                &url,
                &[
                    ("KEEL_DATABASE_WAIT", "60s"),
                    ("KEEL_LOG_LEVEL", "warn,keel::app=info"),
                ],
            )
            .await
        }
    });
    // It tries (and is refused) before the database appears.
    let refused = proxy.refused();
    crate::helpers::within(
        std::time::Duration::from_secs(60),
        "a connection attempt while the database is down",
        async {
            while proxy.refused() <= refused {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    proxy.set_cut(false);
    let keel = crate::helpers::within(
        std::time::Duration::from_secs(60),
        "keel coming up once the database does",
        keel,
    )
    .await
    .unwrap();
    let ready = reqwest::get(keel.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    keel.stop(std::time::Duration::from_secs(30)).await;

    // SIGTERM while it waits for a database that is down: it stops at once with 0 (a
    // deleted pod does not sit out the wait), proving the handler is in place before the
    // process serves anything.
    proxy.set_cut(true);
    let refused = proxy.refused();
    let waiting = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("serve")
        .env("KEEL_DATABASE_URL", &url)
        .env("KEEL_DATABASE_WAIT", "1h")
        .env("KEEL_ADDR", "127.0.0.1:0")
        .env("KEEL_ADMIN_ADDR", "off")
        .env("KEEL_GRPC_ADDR", "off")
        .env("KEEL_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    crate::helpers::within(
        std::time::Duration::from_secs(60),
        "a connection attempt by the waiting process",
        async {
            while proxy.refused() <= refused {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    let pid = nix::unistd::Pid::from_raw(waiting.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = crate::helpers::within(
        std::time::Duration::from_secs(60),
        "the waiting process exiting on SIGTERM",
        waiting.wait_with_output(),
    )
    .await
    .unwrap();
    let logged = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        logged.contains("signal received while starting"),
        "the signal is handled, not fatal: {logged}"
    );
}

/// `keel schedule pause|resume` reach the server and change the schedule; the flag is read
/// back over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_commands_pause_and_resume() {
    let Some(app) =
        crate::helpers::spawn_app(crate::helpers::Backend::Sqlite, "config::schedule_cli").await
    else {
        return;
    };
    let url = app.url("");
    let out = cli(
        &url,
        &[
            "schedule",
            "create",
            "nightly",
            "--cron",
            "0 3 * * *",
            "--kind",
            "noop",
        ],
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for (command, paused) in [("pause", true), ("resume", false)] {
        let out = cli(&url, &["schedule", command, "nightly"]).await.unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let shown: serde_json::Value = app.get("/v1/schedules/nightly").await.json().await.unwrap();
        assert_eq!(shown["paused"], paused, "after {command}: {shown}");
    }
    app.stop().await;
}

/// `keel enqueue` sends its options as given (tags, annotations, args byte for byte); a
/// `--meta` that is not JSON exits 2 before any request, and one the server refuses
/// (not an object) exits 1 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enqueue_command_sends_tags_and_meta() {
    let Some(app) =
        crate::helpers::spawn_app(crate::helpers::Backend::Sqlite, "config::enqueue_cli").await
    else {
        return;
    };
    let url = app.url("");
    let out = cli(
        &url,
        &[
            "enqueue",
            "noop",
            "--args",
            r#"{"a":  1}"#,
            "--tag",
            "x",
            "--tag",
            "y",
            "--meta",
            r#"{"trace": "t-1"}"#,
            "--priority",
            "2",
        ],
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = printed["id"].as_str().expect("the job is printed");
    let stored: serde_json::Value = app
        .get(&format!("/v1/jobs/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stored["tags"], serde_json::json!(["x", "y"]), "{stored}");
    assert_eq!(
        stored["meta"],
        serde_json::json!({"trace": "t-1"}),
        "{stored}"
    );
    assert_eq!(stored["priority"], 2, "{stored}");
    assert_eq!(stored["args"], serde_json::json!({"a": 1}), "{stored}");

    let out = cli(&url, &["enqueue", "noop", "--meta", "{nope"])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--meta is not valid JSON"));
    let out = cli(&url, &["enqueue", "noop", "--meta", "[1]"])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("meta") && said.contains("must be a JSON object"),
        "{said}"
    );
    app.stop().await;
}

/// Runs `keel <args> --url <url>` as a client of a test server. The child runs while this
/// runtime serves the server: awaited, never blocking a worker thread.
async fn cli(url: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .args(["--url", url])
        .output()
        .await
}
