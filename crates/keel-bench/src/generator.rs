//! The load generator: plain HTTP/1.1 keep-alive connections (hyper's connection API, no
//! pool or URL parsing per request), driven either as a *closed* model — N clients, each
//! sending its next request when the previous one is answered — or as an *open* model, where
//! requests leave at scheduled instants whatever the server does.
//!
//! The generator shares two cores with the server and the database, so it is kept lean:
//! bodies are built once and cloned (a reference count), headers are prebuilt, and each
//! client records into its own histogram, merged at the end.
//!
//! The open model measures latency from each request's *scheduled* instant, not from when it
//! was actually sent: a server that stalls delays every request scheduled during the stall,
//! and measuring from the send time would hide exactly that (coordinated omission).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::stats::Latency;

/// Longest a single load request may take before it counts as failed. Well above the
/// server's own request deadline (2 s by default), so the server's answer is what is
/// measured, and it bounds every wait of the generator.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An open-model request sent later than this after its scheduled instant counts as "late":
/// the generator itself could not keep up (the timer's own granularity is 1 ms).
const LATE_AFTER: Duration = Duration::from_millis(10);

/// Where load goes: a loopback address and the headers every request carries.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    addr: SocketAddr,
    host: HeaderValue,
    authorization: Option<HeaderValue>,
}

impl Endpoint {
    /// An endpoint at `addr`, authenticating with `api_key` when given.
    pub(crate) fn new(addr: SocketAddr, api_key: Option<&str>) -> anyhow::Result<Self> {
        let host = HeaderValue::from_str(&addr.to_string()).context("building the Host header")?;
        let authorization = api_key
            .map(|k| HeaderValue::from_str(&format!("Bearer {k}")))
            .transpose()
            .context("the API key cannot be sent in an HTTP header")?;
        Ok(Self {
            addr,
            host,
            authorization,
        })
    }

    /// The socket address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A request for `path` with the endpoint's headers; a body makes it a JSON POST.
    pub(crate) fn request(&self, path: &Uri, body: Option<Bytes>) -> Request<Full<Bytes>> {
        let post = body.is_some();
        let mut req = Request::new(Full::new(body.unwrap_or_default()));
        *req.uri_mut() = path.clone();
        if post {
            *req.method_mut() = Method::POST;
        }
        let headers = req.headers_mut();
        headers.insert(header::HOST, self.host.clone());
        if let Some(a) = &self.authorization {
            headers.insert(header::AUTHORIZATION, a.clone());
        }
        if post {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        req
    }
}

/// One keep-alive HTTP/1.1 connection. Requests on it are sequential.
pub(crate) struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Conn {
    /// Connects to `endpoint` (with `TCP_NODELAY`: small requests must not wait for Nagle).
    pub(crate) async fn open(endpoint: &Endpoint) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(endpoint.addr)
            .await
            .with_context(|| format!("connecting to {}", endpoint.addr))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        // The connection future does the actual I/O; it ends when the socket closes or the
        // sender is dropped, and is aborted with the `Conn` in any case.
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self { sender, driver })
    }

    /// Sends `req` and reads the whole answer.
    pub(crate) async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.sender.ready().await.context("the connection closed")?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .context("sending the request")?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .context("reading the response body")?
            .to_bytes();
        Ok((status, body))
    }

    /// [`Conn::send`] under [`REQUEST_TIMEOUT`].
    pub(crate) async fn send_timed(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.send(req))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}"))?
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// What a batch of requests came back with.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    /// 2xx answers.
    pub(crate) ok: u64,
    /// 429 and 503 answers: load shed by the server.
    pub(crate) shed: u64,
    /// Any other status.
    pub(crate) other_status: u64,
    /// No answer: connection refused or broken, or [`REQUEST_TIMEOUT`].
    pub(crate) failed: u64,
    /// Every status seen, for the JSON report.
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// Latency of the 2xx answers.
    pub(crate) latency: Latency,
    /// Latency of the 429 and 503 answers: shedding is only useful when it is fast.
    pub(crate) shed_latency: Latency,
    /// The first failure, to explain `failed` or `other_status`.
    pub(crate) first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            ok: 0,
            shed: 0,
            other_status: 0,
            failed: 0,
            statuses: BTreeMap::new(),
            latency: Latency::new(),
            shed_latency: Latency::new(),
            first_error: None,
        }
    }

    fn answered(&mut self, status: StatusCode, body: &[u8], latency: Duration) {
        *self.statuses.entry(status.as_u16()).or_default() += 1;
        if status.is_success() {
            self.ok += 1;
            self.latency.record(latency);
        } else {
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
            {
                self.shed += 1;
                self.shed_latency.record(latency);
            } else {
                self.other_status += 1;
            }
            if self.first_error.is_none() {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                self.first_error = Some(format!("{status}: {text}"));
            }
        }
    }

    fn failed(&mut self, e: &anyhow::Error) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{e:#}"));
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.shed += other.shed;
        self.other_status += other.other_status;
        self.failed += other.failed;
        for (s, n) in other.statuses {
            *self.statuses.entry(s).or_default() += n;
        }
        self.latency.merge(&other.latency);
        self.shed_latency.merge(&other.shed_latency);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// The outcome of a closed-model run.
#[derive(Debug)]
pub(crate) struct ClosedReport {
    /// Every answer.
    pub(crate) tally: Tally,
    /// From the first request to the last answer.
    pub(crate) elapsed: Duration,
}

/// `clients` connections, each sending a request for `path` back to back for `duration`
/// (a POST of `body` when there is one, else a GET).
/// Connections are opened before the clock starts. `live` counts 2xx answers as they come,
/// for the progress bar.
pub(crate) async fn closed_loop(
    endpoint: &Endpoint,
    path: Uri,
    body: Option<Bytes>,
    clients: usize,
    duration: Duration,
    live: Arc<AtomicU64>,
) -> anyhow::Result<ClosedReport> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Conn::open(endpoint).await?);
    }
    let start = Instant::now();
    let end = start + duration;
    let mut set = JoinSet::new();
    for conn in conns {
        set.spawn(client(
            conn,
            endpoint.clone(),
            path.clone(),
            body.clone(),
            end,
            Arc::clone(&live),
        ));
    }
    let mut tally = Tally::new();
    while let Some(t) = set.join_next().await {
        tally.merge(t.context("a load client panicked")?);
    }
    Ok(ClosedReport {
        tally,
        elapsed: start.elapsed(),
    })
}

/// One closed-model client: send, wait for the answer, repeat until `end`. A broken
/// connection is replaced (and counted as a failure) rather than ending the client.
async fn client(
    conn: Conn,
    endpoint: Endpoint,
    path: Uri,
    body: Option<Bytes>,
    end: Instant,
    live: Arc<AtomicU64>,
) -> Tally {
    let mut tally = Tally::new();
    let mut conn = Some(conn);
    while Instant::now() < end {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::open(&endpoint).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tally.failed(&e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match c.send_timed(endpoint.request(&path, body.clone())).await {
            Ok((status, resp)) => {
                tally.answered(status, &resp, sent.elapsed());
                if status.is_success() {
                    live.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                tally.failed(&e);
                conn = None;
            }
        }
    }
    tally
}

/// When the `k`-th request of an open-model schedule at `rate` per second is due, counted
/// from the schedule's start.
pub(crate) fn scheduled_offset(k: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(k as f64 / rate)
}

/// How many requests of a schedule at `rate` per second are due `elapsed` after its start:
/// request `k` is due at `k / rate`, so this counts request 0 at once.
pub(crate) fn due_by(elapsed: Duration, rate: f64) -> u64 {
    (elapsed.as_secs_f64() * rate).floor() as u64 + 1
}

/// How many requests a schedule at `rate` per second holds over `duration`.
pub(crate) fn planned(rate: f64, duration: Duration) -> u64 {
    (rate * duration.as_secs_f64()).floor() as u64
}

/// The outcome of an open-model run.
#[derive(Debug)]
pub(crate) struct OpenReport {
    /// Requests the schedule held.
    pub(crate) scheduled: u64,
    /// Answers; the latency is measured from each request's scheduled instant.
    pub(crate) tally: Tally,
    /// Requests not sent because `max_in_flight` requests were already waiting: the
    /// generator's own bound, so it stays bounded however slow the server gets.
    pub(crate) unsent: u64,
    /// Requests sent more than 10 ms after their scheduled instant (generator behind).
    pub(crate) late: u64,
    /// From the schedule's start to the last answer.
    pub(crate) elapsed: Duration,
    /// Connections the generator opened.
    pub(crate) connections: u64,
}

/// Shared by the requests of an open-model run.
struct OpenShared {
    endpoint: Endpoint,
    path: Uri,
    body: Option<Bytes>,
    idle: Mutex<Vec<Conn>>,
    tally: Mutex<Tally>,
    connections: AtomicU64,
    live: Arc<AtomicU64>,
}

/// Sends requests for `path` (POSTs of `body` when there is one, else GETs) at `rate`
/// requests per second for `duration`, on as many
/// connections as needed, with at most `max_in_flight` requests outstanding.
pub(crate) async fn open_loop(
    endpoint: &Endpoint,
    path: Uri,
    body: Option<Bytes>,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
    live: Arc<AtomicU64>,
) -> anyhow::Result<OpenReport> {
    anyhow::ensure!(rate > 0.0, "the request rate must be positive");
    let total = planned(rate, duration);
    // Connections opened before the clock starts, up to the in-flight bound (at most
    // 2048): otherwise the first second of an overload measures a burst of TCP handshakes —
    // the generator's ramp-up, not the server — and charges it to every request scheduled
    // meanwhile. Real clients keep pools of warm connections.
    let warm = max_in_flight.clamp(1, 2048);
    let mut idle = Vec::with_capacity(warm);
    for _ in 0..warm {
        idle.push(Conn::open(endpoint).await?);
    }
    let shared = Arc::new(OpenShared {
        endpoint: endpoint.clone(),
        path,
        body,
        idle: Mutex::new(idle),
        tally: Mutex::new(Tally::new()),
        connections: AtomicU64::new(warm as u64),
        live,
    });
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let mut set = JoinSet::new();
    let (mut unsent, mut late, mut next) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while next < total {
        let now = Instant::now();
        let due = due_by(now.saturating_duration_since(start), rate).min(total);
        while next < due {
            let intended = start + scheduled_offset(next, rate);
            if now.saturating_duration_since(intended) > LATE_AFTER {
                late += 1;
            }
            match Arc::clone(&permits).try_acquire_owned() {
                Ok(permit) => {
                    let shared = Arc::clone(&shared);
                    set.spawn(async move {
                        one_request(&shared, intended).await;
                        drop(permit);
                    });
                }
                Err(_) => unsent += 1,
            }
            next += 1;
        }
        // Reap finished requests so the set holds only the in-flight ones.
        while let Some(r) = set.try_join_next() {
            r.context("a load request panicked")?;
        }
        if next < total {
            tokio::time::sleep_until(start + scheduled_offset(next, rate)).await;
        }
    }
    // Every request is bounded by REQUEST_TIMEOUT (plus a connect), so this ends.
    while let Some(r) = set.join_next().await {
        r.context("a load request panicked")?;
    }
    let elapsed = start.elapsed();
    let tally = shared
        .tally
        .lock()
        .map_err(|_| anyhow::anyhow!("a load request panicked while recording"))?
        .clone();
    Ok(OpenReport {
        scheduled: total,
        tally,
        unsent,
        late,
        elapsed,
        connections: shared.connections.load(Ordering::Relaxed),
    })
}

/// One open-model request on an idle connection (or a new one), recorded against its
/// scheduled instant.
async fn one_request(shared: &OpenShared, intended: Instant) {
    let pooled = shared.idle.lock().ok().and_then(|mut idle| idle.pop());
    let mut conn = match pooled {
        Some(c) => c,
        None => match Conn::open(&shared.endpoint).await {
            Ok(c) => {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                c
            }
            Err(e) => {
                if let Ok(mut t) = shared.tally.lock() {
                    t.failed(&e);
                }
                return;
            }
        },
    };
    let req = shared.endpoint.request(&shared.path, shared.body.clone());
    let outcome = conn.send_timed(req).await;
    let latency = intended.elapsed();
    match outcome {
        Ok((status, body)) => {
            if status.is_success() {
                shared.live.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut t) = shared.tally.lock() {
                t.answered(status, &body, latency);
            }
            if let Ok(mut idle) = shared.idle.lock() {
                idle.push(conn);
            }
        }
        Err(e) => {
            if let Ok(mut t) = shared.tally.lock() {
                t.failed(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_spaces_requests_evenly() {
        assert_eq!(scheduled_offset(0, 500.0), Duration::ZERO);
        assert_eq!(scheduled_offset(1, 500.0), Duration::from_millis(2));
        assert_eq!(scheduled_offset(500, 500.0), Duration::from_secs(1));
        assert_eq!(planned(500.0, Duration::from_secs(20)), 10_000);
        assert_eq!(planned(1.5, Duration::from_secs(1)), 1);
    }

    #[test]
    fn due_counts_every_request_whose_instant_has_passed() {
        // Request 0 is due at once; request k at k × 2 ms.
        assert_eq!(due_by(Duration::ZERO, 500.0), 1);
        assert_eq!(due_by(Duration::from_micros(1_999), 500.0), 1);
        assert_eq!(due_by(Duration::from_millis(2), 500.0), 2);
        assert_eq!(due_by(Duration::from_millis(999), 500.0), 500);
        assert_eq!(due_by(Duration::from_secs(1), 500.0), 501);
        // A generator that slept through 10 ms owes five requests at once, not one.
        let before = due_by(Duration::from_millis(100), 500.0);
        assert_eq!(due_by(Duration::from_millis(110), 500.0) - before, 5);
    }

    #[test]
    fn shed_and_other_answers_are_told_apart() {
        let mut t = Tally::new();
        t.answered(StatusCode::CREATED, b"{}", Duration::from_millis(1));
        t.answered(StatusCode::TOO_MANY_REQUESTS, b"slow down", Duration::ZERO);
        t.answered(StatusCode::SERVICE_UNAVAILABLE, b"", Duration::ZERO);
        t.answered(StatusCode::INTERNAL_SERVER_ERROR, b"", Duration::ZERO);
        t.failed(&anyhow::anyhow!("reset"));
        assert_eq!((t.ok, t.shed, t.other_status, t.failed), (1, 2, 1, 1));
        assert_eq!(t.latency.count(), 1, "only accepted requests are timed");
        assert_eq!(t.statuses[&429], 1);
        assert!(t.first_error.unwrap().contains("slow down"));
    }
}
