//! TLS on every listener (`KEEL_TLS_CERT`, `KEEL_TLS_KEY`), with certificates a test CA
//! signs: HTTPS on the API and admin listeners, gRPC over TLS, the clients that trust a
//! private CA (keel-client over HTTP and its gRPC worker, the CLI's `--ca-cert`), what a
//! plaintext or untrusting client meets, and a certificate rotated on disk being served
//! without a restart. On SQLite only: these test the listeners, not the store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_api::grpc::pb;
use keel_api::grpc::pb::job_service_client::JobServiceClient;
use keel_client::worker::{JobFailure, Worker, WorkerConfig};
use keel_client::{Client, JobIn};
use keel_core::JobState;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::helpers::{Backend, TestApp, metric_value, spawn_app_with, within};

/// A certificate authority for one test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`, and its key, as PEM.
    fn server(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// The certificate and key files a server is started with.
struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn signed_by(ca: &Ca) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = Self {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            _dir: dir,
        };
        files.replace(ca);
        files
    }

    /// Writes a new certificate and key as a rotation does: each file replaced whole
    /// (written aside, then renamed over the old).
    fn replace(&self, ca: &Ca) {
        let (cert, key) = ca.server();
        write_atomically(&self.key, key.as_bytes());
        write_atomically(&self.cert, cert.as_bytes());
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, bytes).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// A test app serving `files`, checking them for changes every 100 ms.
async fn spawn_tls_app(files: &Files) -> TestApp {
    let (cert, key) = (files.cert.display(), files.key.display());
    spawn_app_with(Backend::Sqlite, "tls", |args| {
        args.tls_cert = Some(cert.to_string());
        args.tls_key = Some(key.to_string());
        args.tls_reload_interval = Some("100ms".into());
    })
    .await
    .expect("SQLite needs no service")
}

fn api_port(app: &TestApp) -> u16 {
    app.base.rsplit(':').next().unwrap().parse().unwrap()
}

/// An HTTPS client trusting only `ca`.
fn https_trusting(ca: &Ca) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn grpc_trusting(
    ca: &Ca,
    addr: std::net::SocketAddr,
) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem)))
        .unwrap()
        .connect()
        .await
}

/// HTTPS on the API and admin listeners and TLS on gRPC, with the configured certificate;
/// keel-client, its gRPC worker and the CLI reach them trusting the private CA; a
/// plaintext client and one that does not trust the CA are refused in the handshake, and
/// counted.
#[tokio::test]
async fn every_listener_serves_tls_and_clients_trusting_the_ca_reach_it() {
    let ca = Ca::new("Keel test CA");
    let files = Files::signed_by(&ca);
    let app = spawn_tls_app(&files).await;
    let port = api_port(&app);
    let base = format!("https://127.0.0.1:{port}");
    let https = https_trusting(&ca);

    // The HTTP API over TLS.
    let created = https
        .post(format!("{base}/v1/jobs"))
        .json(&json!({"kind": "echo", "args": {"over": "https"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let admin = https
        .get(format!("https://{}/debug/config", app.admin_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200, "the admin listener serves TLS too");

    // Plaintext to the TLS port: no HTTP answer. A client not trusting the CA: refused.
    let plaintext = app
        .http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(plaintext.is_err(), "plaintext got an answer: {plaintext:?}");
    let untrusting = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("{base}/healthz"))
        .send()
        .await;
    assert!(
        untrusting.is_err(),
        "a client not trusting the CA connected"
    );
    let metrics = https
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let failed = metric_value(
        &metrics,
        "keel_tls_handshake_failures_total",
        &[("listener", "http"), ("reason", "error")],
    );
    assert!(failed >= 2.0, "handshake failures counted: {failed}");

    // keel-client over HTTPS with the CA.
    let client = Client::new(base.clone(), None)
        .unwrap()
        .with_ca_certificate(ca.pem.as_bytes())
        .unwrap();
    let job = client.get_job(&id).await.unwrap();
    assert_eq!(job.id.to_string(), id);
    assert!(
        Client::new(base.clone(), None)
            .unwrap()
            .with_ca_certificate(b"not a certificate")
            .is_err(),
        "a CA file without a certificate is refused"
    );

    // The CLI with --ca-cert, and without it.
    let ca_file = files.cert.with_file_name("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let cli = |with_ca: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"));
        cmd.args(["job", "get", &id, "--url", &base]);
        if with_ca {
            cmd.arg("--ca-cert").arg(&ca_file);
        }
        cmd.env_remove("KEEL_CA_CERT").output()
    };
    let out = cli(true).await.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    let out = cli(false).await.unwrap();
    assert!(
        !out.status.success(),
        "the CLI trusted an unknown CA: {out:?}"
    );

    // gRPC over TLS: a call, health, and the refusals.
    let grpc_addr = app.grpc_addr.unwrap();
    let channel = grpc_trusting(&ca, grpc_addr).await.expect("TLS channel");
    let enqueued = JobServiceClient::new(channel.clone())
        .enqueue(pb::EnqueueRequest {
            job: Some(pb::JobSpec {
                kind: "noop".to_owned(),
                ..pb::JobSpec::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(enqueued.job.is_some_and(|j| !j.id.is_empty()));
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let plaintext = async {
        let channel = Channel::from_shared(format!("http://{grpc_addr}"))
            .unwrap()
            .connect()
            .await?;
        JobServiceClient::new(channel)
            .get_job(pb::GetJobRequest { id: id.clone() })
            .await
            .map_err(Into::into)
    };
    let plaintext: Result<_, Box<dyn std::error::Error>> = plaintext.await;
    assert!(plaintext.is_err(), "a plaintext gRPC call was answered");
    let other = Ca::new("another CA");
    let untrusting = async {
        let channel = grpc_trusting(&other, grpc_addr).await?;
        JobServiceClient::new(channel)
            .get_job(pb::GetJobRequest { id: id.clone() })
            .await
            .map_err(Into::into)
    };
    let untrusting: Result<_, Box<dyn std::error::Error>> = untrusting.await;
    assert!(
        untrusting.is_err(),
        "a gRPC client not trusting the CA was answered"
    );

    // keel-client's gRPC worker over TLS runs a job of an external queue.
    let queue = format!("tls-{}", uuid::Uuid::new_v4().simple());
    let job = client
        .enqueue(
            &JobIn {
                queue: Some(queue.clone()),
                ..JobIn::new("shout", json!({"word": "tls"}))
            },
            None,
        )
        .await
        .unwrap();
    let worker = Worker::new(
        client.clone(),
        WorkerConfig::new([queue.as_str()]).concurrency(2),
    )
    .handle("shout", |_, args: Value| async move {
        Ok::<_, JobFailure>(json!(args["word"].as_str().unwrap_or("").to_uppercase()))
    });
    let stop = CancellationToken::new();
    let grpc_url = format!("https://127.0.0.1:{}", grpc_addr.port());
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { worker.run_grpc(&grpc_url, stop).await }
    });
    let done = within(
        Duration::from_secs(30),
        "the job completed over TLS",
        async {
            loop {
                let got = client.get_job(&job.job.id.to_string()).await.unwrap();
                if got.state == JobState::Completed {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
    assert_eq!(
        done.result.map(|r| r.get().to_owned()).as_deref(),
        Some("\"TLS\"")
    );
    stop.cancel();
    let report = running.await.unwrap().unwrap();
    assert_eq!(report.completed, 1, "{report:?}");
    app.stop().await;
}

/// A certificate replaced on disk is served from the next handshake on, without a
/// restart; a replacement that cannot be served (a key that is not PEM) is refused, counted,
/// and the last good certificate stays served.
#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = Files::signed_by(&old_ca);
    let app = spawn_tls_app(&files).await;
    let healthz = format!("https://127.0.0.1:{}/healthz", api_port(&app));
    let (old_client, new_client) = (https_trusting(&old_ca), https_trusting(&new_ca));
    assert_eq!(old_client.get(&healthz).send().await.unwrap().status(), 200);
    assert!(new_client.get(&healthz).send().await.is_err());

    files.replace(&new_ca);
    within(
        Duration::from_secs(30),
        "the new certificate served",
        async {
            // A fresh connection each time: a pooled one keeps its first handshake.
            loop {
                if https_trusting(&new_ca).get(&healthz).send().await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    assert!(
        https_trusting(&old_ca).get(&healthz).send().await.is_err(),
        "the old certificate is still served"
    );
    let metrics = |client: reqwest::Client| {
        let url = healthz.replace("/healthz", "/metrics");
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let reloaded = metric_value(
        &metrics(https_trusting(&new_ca)).await,
        "keel_tls_reloads_total",
        &[("outcome", "ok")],
    );
    assert!(reloaded >= 1.0, "reloads counted: {reloaded}");

    // A broken key: refused, the new certificate still served.
    write_atomically(&files.key, b"-----BEGIN PRIVATE KEY-----\nbroken\n");
    within(Duration::from_secs(30), "the broken key refused", async {
        loop {
            let text = metrics(https_trusting(&new_ca)).await;
            if metric_value(&text, "keel_tls_reloads_total", &[("outcome", "error")]) >= 1.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(
        https_trusting(&new_ca)
            .get(&healthz)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    app.stop().await;
}

/// TLS settings are checked at startup, each problem named under the setting to fix:
/// a certificate without its key, a missing file, a file that is not PEM, and a key that
/// belongs to another certificate.
#[test]
fn bad_tls_settings_exit_78_naming_the_setting() {
    let ca = Ca::new("Keel test CA");
    let files = Files::signed_by(&ca);
    let other = Files::signed_by(&ca);
    let not_pem = files.cert.with_file_name("notes.txt");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let missing = files.cert.with_file_name("missing.crt");
    let serve = |env: &[(&str, &Path)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keel"));
        cmd.arg("serve")
            .env_remove("KEEL_TLS_CERT")
            .env_remove("KEEL_TLS_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // The environment given, and the setting and the words the error must name.
    type Case<'a> = (&'a [(&'a str, &'a Path)], &'a str, &'a str);
    let cases: [Case<'_>; 4] = [
        (
            &[("KEEL_TLS_CERT", &files.cert)],
            "tls_key: ",
            "is required with tls_cert",
        ),
        (
            &[("KEEL_TLS_CERT", &missing), ("KEEL_TLS_KEY", &files.key)],
            "tls_cert: ",
            "missing.crt",
        ),
        (
            &[("KEEL_TLS_CERT", &not_pem), ("KEEL_TLS_KEY", &files.key)],
            "tls_cert: ",
            "holds no PEM certificate",
        ),
        (
            &[("KEEL_TLS_CERT", &files.cert), ("KEEL_TLS_KEY", &other.key)],
            "tls_key: ",
            "does not belong to the first certificate",
        ),
    ];
    for (env, field, says) in cases {
        let stderr = serve(env);
        assert!(
            stderr.contains(field) && stderr.contains(says),
            "expected {field}…{says} in:\n{stderr}"
        );
    }
}
