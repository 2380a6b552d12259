//! `spawn_app`: the real Keel (the same `App` that `keel serve` runs) on port 0, with a
//! temporary SQLite file or a Postgres schema of its own, and a real HTTP client.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use keel::{App, Config, ServeArgs};
use keel_client::{Client, JobListQuery, JobOut};
use keel_store::testkit::{PgSchema, pg_url_or_skip};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Keeps the test database alive for the app's lifetime.
#[allow(dead_code)]
pub enum Backing {
    Sqlite(tempfile::TempDir),
    Postgres(PgSchema),
}

/// A running Keel for one test.
pub struct TestApp {
    pub admin_addr: SocketAddr,
    /// The gRPC listener (on in [`test_args`]).
    pub grpc_addr: Option<SocketAddr>,
    pub base: String,
    pub client: Client,
    pub http: reqwest::Client,
    pub database_url: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    _backing: Backing,
}

/// Settings every test app starts from: ephemeral ports, fast maintenance so retries and
/// scheduled jobs move within a test's patience, and a short grace so stops are quick.
pub fn test_args() -> ServeArgs {
    ServeArgs {
        addr: Some("127.0.0.1:0".into()),
        admin_addr: Some("127.0.0.1:0".into()),
        grpc_addr: Some("127.0.0.1:0".into()),
        maintenance_interval: Some("25ms".into()),
        poll_interval: Some("200ms".into()),
        shutdown_grace: Some("5s".into()),
        db_pool_max: Some("8".into()),
        db_pool_min_idle: Some("1".into()),
        webhook_allow_private: Some("true".into()),
        ..ServeArgs::default()
    }
}

/// Prepares a database for `backend`: the URL and what keeps it alive. `None` when the
/// Postgres tests are skipped (a notice naming `test` has been printed).
pub async fn database(backend: Backend, test: &str) -> Option<(String, Backing)> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("keel.db").display());
            Some((url, Backing::Sqlite(dir)))
        }
        Backend::Postgres => {
            let base = pg_url_or_skip(test)?;
            let schema = PgSchema::create(&base).await;
            Some((schema.url.clone(), Backing::Postgres(schema)))
        }
    }
}

/// Starts Keel with [`test_args`] adjusted by `tweak`.
pub async fn spawn_app_with(
    backend: Backend,
    test: &str,
    tweak: impl FnOnce(&mut ServeArgs),
) -> Option<TestApp> {
    let (database_url, backing) = database(backend, test).await?;
    let mut args = test_args();
    args.database_url = Some(database_url.clone());
    tweak(&mut args);
    let config = Config::resolve(&args).unwrap_or_else(|e| panic!("{e}"));
    let metrics = keel::telemetry::metrics_handle().expect("metrics recorder");
    let app = App::build(config, metrics).await.expect("build app");
    let addr = app.api_addr().unwrap();
    let admin_addr = app.admin_addr().unwrap().expect("admin listener on");
    let grpc_addr = app.grpc_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let base = format!("http://{addr}");
    Some(TestApp {
        admin_addr,
        grpc_addr,
        client: Client::new(base.clone(), None).unwrap(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        base,
        database_url,
        stop: Some(stop),
        task: Some(task),
        _backing: backing,
    })
}

/// Starts Keel with [`test_args`].
pub async fn spawn_app(backend: Backend, test: &str) -> Option<TestApp> {
    spawn_app_with(backend, test, |_| {}).await
}

impl TestApp {
    /// Absolute URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Absolute URL of `path` on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// Enqueues a `kind` job with `args` in the default queue; returns its id.
    pub async fn enqueue(&self, kind: &str, args: serde_json::Value) -> String {
        self.client
            .enqueue(&keel_client::JobIn::new(kind, args), None)
            .await
            .unwrap()
            .job
            .id
            .to_string()
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    /// `POST path` without a body.
    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.http.post(self.url(path)).send().await.unwrap()
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// `POST path` with a JSON body and an API key.
    pub async fn post_json_as(
        &self,
        path: &str,
        key: &str,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Polls the job until `done` holds; gives up (fails) after `limit`, a hang guard.
    pub async fn wait_for(
        &self,
        id: impl std::fmt::Display,
        limit: Duration,
        done: impl Fn(&JobOut) -> bool,
    ) -> JobOut {
        let mut last = None;
        let polled = tokio::time::timeout(limit, async {
            loop {
                let job = self.client.get_job(&id).await.expect("get job");
                if done(&job) {
                    return job;
                }
                last = Some(job);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        polled.unwrap_or_else(|_| {
            panic!("job {id} did not reach the expected condition; last seen: {last:#?}")
        })
    }

    /// Stops the app gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("app task").expect("app stopped cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Sum of every sample of `metric` whose labels include all of `labels`
/// (e.g. `[("queue", "q1")]`) in a Prometheus text exposition.
pub fn metric_value(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name_labels, value) = l.rsplit_once(' ')?;
            let (name, rest) = match name_labels.split_once('{') {
                Some((n, r)) => (n, r),
                None => (name_labels, ""),
            };
            if name != metric {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Runs `test` against SQLite and Postgres as two `#[tokio::test]`s named `sqlite` and
/// `postgres` inside a module named after the test.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(
                    $crate::helpers::Backend::Sqlite,
                    concat!(module_path!(), "::sqlite"),
                )
                .await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(
                    $crate::helpers::Backend::Postgres,
                    concat!(module_path!(), "::postgres"),
                )
                .await;
            }
        }
    };
}

/// Held by the tests that load both cores for seconds on end (the overload flood, the
/// multi-replica runs), so that they never overlap: two of them at once on 2 cores would
/// stretch every hang guard of both for nothing. Other tests still run beside them. A tokio
/// mutex: each test has its own runtime, and it works across them.
pub static CPU_HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `fut` with a deadline, failing the test with `what` if it takes longer.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

/// Asserts an RFC 9457 problem response and returns its body.
pub async fn problem(resp: reqwest::Response, status: reqwest::StatusCode) -> serde_json::Value {
    assert_eq!(resp.status(), status);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type {ct}"
    );
    let request_id = resp.headers().get("x-request-id").cloned();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(body["title"].is_string(), "{body}");
    assert!(body["type"].is_string(), "{body}");
    let rid = body["request_id"]
        .as_str()
        .expect("problem carries request_id");
    assert_eq!(
        Some(rid),
        request_id.as_ref().map(|h| h.to_str().unwrap()),
        "body and header ids differ"
    );
    body
}

/// Every job in the database, read with the keyset listing through `client`.
pub async fn all_jobs(client: &Client) -> Vec<JobOut> {
    let mut jobs = Vec::new();
    let mut after = None;
    loop {
        let page = client
            .list_jobs(&JobListQuery {
                after,
                limit: Some(1000),
                ..JobListQuery::default()
            })
            .await
            .expect("list jobs");
        jobs.extend(page.jobs);
        match page.next {
            Some(n) => after = Some(n),
            None => return jobs,
        }
    }
}

/// Sending a request and reading its JSON answer, whatever the status, in one step.
pub trait JsonAnswer {
    /// Sends the request; the answer's body, decoded.
    async fn json_answer<T: serde::de::DeserializeOwned>(self) -> T;
}

impl JsonAnswer for reqwest::RequestBuilder {
    async fn json_answer<T: serde::de::DeserializeOwned>(self) -> T {
        self.send().await.unwrap().json().await.unwrap()
    }
}
