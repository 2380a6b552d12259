//! The API's accept loop: HTTP/1.1 connections served by hyper, with the limits a public
//! listener needs and `axum::serve` does not offer (it sets no timer, so hyper's header
//! timeout never fires, and it caps nothing):
//!
//! - **a cap on connections** (`max_connections`): past it, a new connection gets an
//!   immediate `503` problem+json with `Retry-After` and is closed, instead of queueing
//!   without bound (G5);
//! - **a keep-alive idle timeout** (`idle_timeout`): a connection that sends no request for
//!   this long is closed (hyper's header timer, which runs while a connection waits for its
//!   next request head);
//! - **a header read timeout** (`header_read_timeout`): once the first byte of a request head
//!   arrives, the whole head must follow within it, so a client trickling its headers
//!   (slowloris) holds a connection for seconds, not minutes;
//! - **a header size limit**: hyper refuses heads above `max_header_bytes` with `431` (its own
//!   empty-bodied answer, which Keel cannot intercept: the head never reached Keel).
//!
//! - **TLS** when given an acceptor ([`crate::tls`]): the handshake bounded by the header
//!   read timeout, the limits above applying to the plaintext inside.
//!
//! The body of a request is bounded by the request deadline: one that does not arrive in
//! time is answered `408` (see `Step::ReadBody`). Graceful shutdown stops accepting at once,
//! lets requests in flight finish, and closes idle keep-alive connections.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::tls;

/// The limits of [`serve`]; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time from the first byte of a request head to its last.
    pub header_read_timeout: Duration,
    /// Time a connection may wait, idle, for its next request.
    pub idle_timeout: Duration,
    /// Connections served at once; more are refused with `503`.
    pub max_connections: usize,
    /// Largest request head (start line and headers) accepted, in bytes; `431` beyond it.
    pub max_header_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_header_bytes: 64 * 1024,
        }
    }
}

/// What a refused connection is told before it is closed.
const REFUSED: &str = "HTTP/1.1 503 Service Unavailable\r\n\
    content-type: application/problem+json\r\n\
    retry-after: 1\r\n\
    connection: close\r\n\
    content-length: 154\r\n\r\n\
    {\"type\":\"https://keel.dev/problems/overloaded\",\"title\":\"Service Unavailable\",\
    \"status\":503,\"detail\":\"the server is at its connection limit; retry shortly\"}";

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and waits
/// for the connections in flight to finish their requests (the caller bounds that wait).
///
/// With `tls`, each connection's handshake runs in its own task, bounded by the header read
/// timeout, and a connection over the cap is closed without an answer (a plaintext `503`
/// means nothing to a TLS client, and a handshake to send one costs the CPU an overloaded
/// server lacks).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192) + 8192)
        .max_header_size(limits.max_header_bytes.max(1024));
    let http = Arc::new(http);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors or a connection reset before it was accepted:
                    // not fatal. Pause a moment so an fd shortage does not spin the loop.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    metrics::counter!("keel_connections_refused_total", "reason" => "accept_error")
                        .increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!("keel_connections_refused_total", "reason" => "limit").increment(1);
            if tls.is_none() {
                tokio::spawn(refuse(stream));
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            http: Arc::clone(&http),
            router: router.clone(),
            graceful: graceful.watcher(),
            header_read_timeout: limits.header_read_timeout,
            _slot: slot,
        };
        match &tls {
            None => tokio::spawn(conn.serve(stream)),
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let limit = conn.header_read_timeout;
                    if let Some(stream) = tls::handshake(&acceptor, stream, limit, "http").await {
                        conn.serve(stream).await;
                    }
                })
            }
        };
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One accepted connection, holding its slot under the cap until it ends.
struct Connection {
    http: Arc<hyper::server::conn::http1::Builder>,
    router: Router,
    graceful: Watcher,
    header_read_timeout: Duration,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    /// Serves requests on `stream` (TCP, or TLS over it) until the client leaves, the
    /// connection idles out, a head arrives too slowly, or shutdown drains it.
    async fn serve<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::default());
        let io = TokioIo::new(Watched {
            inner: stream,
            activity: Arc::clone(&activity),
        });
        let service = hyper::service::service_fn({
            let router = self.router;
            let activity = Arc::clone(&activity);
            move |req: Request<Incoming>| {
                activity.request_began();
                let router = router.clone();
                let done = RequestDone(Arc::clone(&activity));
                async move {
                    let resp = router.oneshot(req.map(Body::new)).await;
                    // The request is over for the header clock once its response is handed
                    // to hyper; the next request's head starts a new one.
                    drop(done);
                    resp
                }
            }
        });
        let conn = self.http.serve_connection(io, service);
        let conn = self.graceful.watch(conn);
        metrics::gauge!("keel_connections_open").increment(1.0);
        watch_heads(conn, &activity, self.header_read_timeout).await;
        metrics::gauge!("keel_connections_open").decrement(1.0);
    }
}

/// Tells a connection over the cap why it is refused, then closes it. Bounded: a client that
/// does not read gets the connection closed anyway.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(REFUSED.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Runs the connection, closing it when a request head has been arriving for longer than
/// `limit` (counted from its first byte).
async fn watch_heads<F>(conn: F, activity: &Activity, limit: Duration)
where
    F: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    loop {
        // Registered before the state is read, so a head starting right after is not missed.
        let changed = activity.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let head = activity.head_started();
        let overdue = async {
            match head {
                Some((_, at)) => tokio::time::sleep_until(at + limit).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut conn => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = changed => {}
            () = overdue => {
                if let Some((generation, _)) = head
                    && activity.head_still_pending(generation)
                {
                    metrics::counter!("keel_connections_closed_total", "reason" => "header_timeout")
                        .increment(1);
                    tracing::debug!("closing a connection whose request head did not arrive in time");
                    return;
                }
            }
        }
    }
}

/// What one connection is doing, as the header clock needs it.
#[derive(Debug, Default)]
struct Activity {
    /// A request is being served (its head has arrived).
    busy: AtomicBool,
    /// When the current head began arriving, as microseconds since `epoch`, or 0.
    head_since: AtomicU64,
    /// Counts heads, so a timer set for one head never closes the connection for another.
    generation: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
    changed: Notify,
}

impl Activity {
    fn epoch(&self) -> Instant {
        *self.epoch.get_or_init(Instant::now)
    }

    /// Bytes arrived: if no request is being served and no head is timed yet, this is the
    /// start of a head.
    fn bytes_arrived(&self) {
        if self.busy.load(Ordering::Acquire) || self.head_since.load(Ordering::Acquire) != 0 {
            return;
        }
        let since = u64::try_from(self.epoch().elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(since, Ordering::Release);
        self.changed.notify_waiters();
    }

    fn request_began(&self) {
        self.busy.store(true, Ordering::Release);
        self.head_since.store(0, Ordering::Release);
        self.changed.notify_waiters();
    }

    fn request_ended(&self) {
        self.busy.store(false, Ordering::Release);
    }

    /// The generation and start of the head being timed, if any.
    fn head_started(&self) -> Option<(u64, Instant)> {
        let since = self.head_since.load(Ordering::Acquire);
        (since != 0).then(|| {
            (
                self.generation.load(Ordering::Acquire),
                self.epoch() + Duration::from_micros(since),
            )
        })
    }

    fn head_still_pending(&self, generation: u64) -> bool {
        self.head_since.load(Ordering::Acquire) != 0
            && self.generation.load(Ordering::Acquire) == generation
    }
}

/// Marks the end of a request when dropped (however the handler future ends).
struct RequestDone(Arc<Activity>);

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// The connection's stream (TCP, or TLS over it: the bytes seen are the plaintext),
/// reporting arriving bytes to the connection's [`Activity`].
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_arrived();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_well_formed_response() {
        let (head, body) = REFUSED.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length, "content-length matches the body");
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["status"], 503);
    }

    #[test]
    fn a_head_is_timed_from_its_first_byte_and_reset_by_its_request() {
        let a = Activity::default();
        assert!(a.head_started().is_none());
        a.bytes_arrived();
        let (generation, _) = a.head_started().unwrap();
        assert!(a.head_still_pending(generation));
        a.bytes_arrived(); // more of the same head: same clock
        assert_eq!(a.head_started().unwrap().0, generation);
        a.request_began();
        assert!(!a.head_still_pending(generation));
        a.bytes_arrived(); // body bytes while serving: no clock
        assert!(a.head_started().is_none());
        a.request_ended();
        a.bytes_arrived(); // the next head
        assert!(a.head_started().unwrap().0 > generation);
    }
}
