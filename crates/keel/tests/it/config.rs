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
