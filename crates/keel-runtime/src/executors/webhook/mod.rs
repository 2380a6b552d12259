//! `webhook`: an HTTP POST of JSON to a URL named in the job's args, with the SSRF guard,
//! per-host protection and Standard Webhooks signatures.

mod guard;
mod hosts;
mod signature;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use keel_core::Job;
use keel_resilience::chaos::InjectedFault;
use keel_resilience::{BreakerPermit, Chaos, Dependency};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{HostRateLimit, SigningSecret, WebhookConfig};
use crate::{Handler, JobContext, JobError, json_result, telemetry};
use guard::{GuardedResolver, Refused, is_internal};
use hosts::{Host, Hosts, Limits};

/// Longest a connection attempt may take. The whole request is bounded by the job's
/// timeout; this only keeps one unreachable address from eating all of it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most response body read (and thrown away) so the connection can go back to the pool;
/// a bigger body closes the connection instead of being read to the end.
const DRAIN_LIMIT: usize = 64 * 1024;
/// Most of the job's timeout kept back from the request (a tenth of it, at most this). The
/// worker's timer started just before this handler did; ending the request a little
/// earlier means a slow host is reported as a timeout by this executor, and counted against
/// that host's breaker, rather than cut off by the worker with no verdict.
const TIMEOUT_MARGIN: Duration = Duration::from_millis(250);

/// `webhook`: POSTs JSON to a URL.
///
/// Args: `{"url": "http(s)://…", "body": any?, "headers": {"name": "value", …}?}`. The
/// request body is `body` exactly as submitted (or `null`), with
/// `content-type: application/json` (it overrides a `content-type` in `headers`).
///
/// Outcome: a 2xx answer succeeds with `{"status": code}`. 408, 429, 5xx, network errors
/// and timeouts are retryable (the receiver may recover); a 429 or 503 with `Retry-After`
/// is retried when the receiver asked (capped by [`WebhookConfig::max_retry_after`])
/// instead of after the job's backoff. Redirects are not followed (a redirect could point
/// past the SSRF guard) and, like every other status, are permanent failures, as are
/// malformed args.
///
/// Per-host protection (hosts are scheme, host and port): a circuit breaker opened by 5xx,
/// 429, timeouts and connection errors (while open, jobs to the host fail at once, without
/// a request, and retry when it will probe again, or after their backoff if that is later);
/// a concurrency limit; and an optional rate limit. A job waits at most
/// [`WebhookConfig::host_wait`] for a limit. Each host's state is its own, so a failing or
/// slow host never slows jobs to healthy ones.
///
/// SSRF guard (G8): unless [`WebhookConfig::allow_private`], a URL whose host is, or
/// resolves to, a loopback, private, link-local or otherwise internal address is refused
/// before any connection is made, and the connection is pinned to the checked addresses.
///
/// With a [`WebhookConfig::signing_secret`], requests carry Standard Webhooks signature
/// headers (`webhook-id` is the job id).
///
/// One HTTP client is shared by every webhook job, so connections to a receiver are pooled.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// The shared client, or why it could not be built (then every webhook job fails with
    /// a retryable error naming it, rather than the whole process failing to start).
    client: Result<reqwest::Client, Arc<str>>,
    allow_private: bool,
    signing_secret: Option<SigningSecret>,
    hosts: Arc<Hosts>,
    host_concurrency: usize,
    host_rate: Option<HostRateLimit>,
    host_wait: Duration,
    max_retry_after: Duration,
    chaos: Chaos,
}

#[derive(Deserialize)]
#[serde(expecting = "an object with a `url` string and optional `body` and `headers`")]
struct Args {
    url: String,
    #[serde(default)]
    body: Option<Box<RawValue>>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// How one attempt went, as far as the host is concerned: the `outcome` label of
/// [`telemetry::WEBHOOK_REQUESTS`], and the verdict for the host's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Redirect,
    ClientError,
    /// The receiver answered 429.
    Throttled,
    ServerError,
    Timeout,
    ConnectError,
    NetworkError,
    Injected,
    /// The SSRF guard refused the host's addresses.
    Refused,
    /// No request: the host's circuit is open.
    CircuitOpen,
    /// No request: the host's rate limit had no token in time.
    RateLimited,
    /// No request: the host's concurrency limit had no slot in time.
    HostBusy,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Redirect => "redirect",
            Outcome::ClientError => "client_error",
            Outcome::Throttled => "throttled",
            Outcome::ServerError => "server_error",
            Outcome::Timeout => "timeout",
            Outcome::ConnectError => "connect_error",
            Outcome::NetworkError => "network_error",
            Outcome::Injected => "injected",
            Outcome::Refused => "refused",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::RateLimited => "rate_limited",
            Outcome::HostBusy => "host_busy",
        }
    }

    /// Whether the host failed (`Some(true)` counts toward opening its circuit), worked
    /// (`Some(false)`: it answered, whatever the answer), or was never asked (`None`).
    fn host_failed(self) -> Option<bool> {
        match self {
            Outcome::Success | Outcome::Redirect | Outcome::ClientError => Some(false),
            Outcome::Throttled
            | Outcome::ServerError
            | Outcome::Timeout
            | Outcome::ConnectError
            | Outcome::NetworkError
            | Outcome::Injected => Some(true),
            Outcome::Refused | Outcome::CircuitOpen | Outcome::RateLimited | Outcome::HostBusy => {
                None
            }
        }
    }
}

/// Why the exchange produced no answer.
enum Failure {
    Injected(InjectedFault),
    Request(reqwest::Error),
}

/// What the receiver answered.
#[derive(Debug, Clone, Copy)]
struct Answer {
    status: StatusCode,
    /// Its `Retry-After`, as a delay from now.
    retry_after: Option<Duration>,
}

impl Webhook {
    /// An executor with `config`'s SSRF policy, user agent, signing secret and per-host
    /// protection. Values [`WebhookConfig::validate`] would refuse are corrected (and
    /// logged) rather than fail: a zero limit must not stop every webhook.
    pub fn new(config: &WebhookConfig) -> Self {
        if let Err(e) = config.validate() {
            tracing::warn!(problems = %e, "webhook configuration is inconsistent; adjusting it");
        }
        let defaults = WebhookConfig::default();
        let mut builder = reqwest::Client::builder()
            .user_agent(config.user_agent.as_str())
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve the host itself, past the guard.
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT);
        if !config.allow_private {
            builder = builder.dns_resolver(Arc::new(GuardedResolver));
        }
        let client = builder.build().map_err(|e| {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; webhook jobs will fail");
            Arc::from(e.to_string())
        });
        let host_concurrency = config
            .host_concurrency
            .clamp(1, WebhookConfig::MAX_HOST_CONCURRENCY);
        let host_rate = config.host_rate.filter(|r| r.per_second > 0 && r.burst > 0);
        let nonzero = |d: Duration, default: Duration| if d.is_zero() { default } else { d };
        let limits = Limits {
            breaker: if config.breaker.validate().is_ok() {
                config.breaker
            } else {
                defaults.breaker
            },
            concurrency: host_concurrency,
            rate: host_rate,
            max_hosts: config.max_hosts.clamp(1, WebhookConfig::MAX_MAX_HOSTS),
            idle: nonzero(config.host_idle, defaults.host_idle),
        };
        Self {
            client,
            allow_private: config.allow_private,
            signing_secret: config.signing_secret.clone(),
            hosts: Arc::new(Hosts::new(limits)),
            host_concurrency,
            host_rate,
            host_wait: nonzero(config.host_wait, defaults.host_wait),
            max_retry_after: nonzero(config.max_retry_after, defaults.max_retry_after),
            chaos: config.chaos.clone(),
        }
    }

    /// Hosts whose circuit is open or half-open right now, as reported by the
    /// `keel_webhook_hosts_open` gauge (for diagnostics and tests; clones share the count).
    pub fn open_hosts(&self) -> usize {
        self.hosts.open_hosts()
    }

    /// Hosts whose protection state is kept, as reported by `keel_webhook_hosts_tracked`.
    pub fn tracked_hosts(&self) -> usize {
        self.hosts.tracked()
    }

    /// The checked request to send, or a permanent error naming what is wrong with the args.
    fn prepare(&self, args: &Args) -> Result<(Url, HeaderMap), JobError> {
        let bad =
            |what: String| JobError::permanent(format!("invalid args for a webhook job: {what}"));
        // The URL itself is never echoed: its path or query may carry a secret.
        let url =
            Url::parse(&args.url).map_err(|e| bad(format!("url is not a valid URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!(
                "url scheme must be http or https, got {:?}",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("url has no host".to_owned()))?;
        if !self.allow_private {
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = literal.parse::<IpAddr>()
                && is_internal(ip)
            {
                return Err(JobError::permanent(
                    Refused {
                        host: host.to_owned(),
                    }
                    .to_string(),
                ));
            }
        }
        let mut headers = HeaderMap::with_capacity(args.headers.len() + 4);
        for (name, value) in &args.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                bad(format!(
                    "header name {name:?} is not a valid HTTP header name"
                ))
            })?;
            // Values are not echoed: headers are where credentials go.
            let value = HeaderValue::from_str(value).map_err(|_| {
                bad(format!(
                    "the value of header {name} is not a valid HTTP header value"
                ))
            })?;
            headers.append(name, value);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok((url, headers))
    }

    /// Adds the Standard Webhooks headers (replacing any the job set) when a secret is
    /// configured.
    fn sign(&self, job: &Job, body: &str, headers: &mut HeaderMap) {
        let Some(secret) = &self.signing_secret else {
            return;
        };
        let id = job.id.to_string();
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let signature = signature::sign(secret, &id, timestamp, body.as_bytes());
        // A job id, a number and base64 are always valid header values.
        for (name, value) in [
            (signature::ID, id),
            (signature::TIMESTAMP, timestamp.to_string()),
            (signature::SIGNATURE, signature),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
    }

    /// Waits (at most until `until`) for a token of the host's rate limit, if it has one.
    async fn take_token(
        &self,
        target: &Host,
        host: &str,
        job: &Job,
        until: Instant,
        cancel: &CancellationToken,
    ) -> Result<(), JobError> {
        let Some(limiter) = &target.rate else {
            return Ok(());
        };
        loop {
            let Err(not_until) = limiter.check() else {
                return Ok(());
            };
            // Recomputed after every wait: other jobs to the host may have taken the token
            // this one waited for.
            let wait = not_until.wait_time_from(governor::clock::Clock::now(limiter.clock()));
            if Instant::now() + wait > until {
                let rate = self.host_rate.map_or(0, |r| r.per_second);
                return Err(self.refuse(
                    Outcome::RateLimited,
                    JobError::retry(format!(
                        "webhook host {host} is at its rate limit ({rate} requests/s); no request was sent"
                    ))
                    .with_retry_after(not_sooner_than_backoff(job, wait)),
                ));
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return Err(cancelled(host)),
            }
        }
    }

    /// Waits (at most until `until`) for a slot under the host's concurrency limit.
    async fn take_slot(
        &self,
        target: &Host,
        host: &str,
        until: Instant,
        cancel: &CancellationToken,
    ) -> Result<OwnedSemaphorePermit, JobError> {
        if let Ok(slot) = Arc::clone(&target.slots).try_acquire_owned() {
            return Ok(slot);
        }
        let waited = Instant::now();
        let acquire = tokio::time::timeout_at(until, Arc::clone(&target.slots).acquire_owned());
        tokio::select! {
            r = acquire => {
                if let Ok(Ok(slot)) = r {
                    return Ok(slot);
                }
            }
            () = cancel.cancelled() => return Err(cancelled(host)),
        }
        // Timed out (the semaphore is never closed). The job's backoff decides when it runs
        // again: when a slot frees up is unknown.
        Err(self.refuse(
            Outcome::HostBusy,
            JobError::retry(format!(
                "webhook host {host} already has {} requests in flight from this worker (the per-host limit) and none finished within {} ms; no request was sent",
                self.host_concurrency,
                waited.elapsed().as_millis()
            )),
        ))
    }

    /// Counts an attempt refused before any request.
    fn refuse(&self, outcome: Outcome, error: JobError) -> JobError {
        telemetry::webhook_request(outcome.as_str());
        error
    }

    /// Records how the host did: the metric, and the breaker's verdict.
    fn settle(&self, target: &Host, permit: BreakerPermit, outcome: Outcome) {
        telemetry::webhook_request(outcome.as_str());
        match outcome.host_failed() {
            Some(true) => permit.failure(),
            Some(false) => permit.success(),
            None => drop(permit),
        }
        self.hosts.observe(target);
    }

    /// Reads a `Retry-After` (on 429 and 503 only, where it means "come back then"),
    /// capped by [`WebhookConfig::max_retry_after`].
    fn retry_after(&self, status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
        if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
            return None;
        }
        let value = headers.get(RETRY_AFTER)?;
        parse_retry_after(value, SystemTime::now()).map(|d| d.min(self.max_retry_after))
    }
}

#[async_trait]
impl Handler for Webhook {
    /// The URL's syntax and scheme, the SSRF policy for hosts given as IP literals (a name
    /// is resolved, and its addresses checked, only when the request is sent) and the
    /// headers.
    fn check_args(&self, args: &RawValue) -> Result<(), String> {
        let args: Args = serde_json::from_str(args.get()).map_err(|e| e.to_string())?;
        self.prepare(&args).map(|_| ()).map_err(|e| e.message)
    }

    async fn run(&self, ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        let margin = (ctx.job.timeout / 10).min(TIMEOUT_MARGIN);
        let deadline = Instant::now() + ctx.job.timeout.saturating_sub(margin);
        let args: Args = ctx.args()?;
        let (url, mut headers) = self.prepare(&args)?;
        let client = self
            .client
            .as_ref()
            .map_err(|e| JobError::retry(format!("the webhook HTTP client is unavailable: {e}")))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let target = self.hosts.get(&url.origin().ascii_serialization());

        // Fail fast while the host is known to be failing; retry when it will be probed.
        let permit = target.breaker.try_acquire().map_err(|open| {
            self.refuse(
                Outcome::CircuitOpen,
                JobError::retry(format!(
                    "the circuit for webhook host {host} is open after repeated failures; no request was sent (next probe in {} s)",
                    open.retry_after.as_secs_f64().ceil()
                ))
                .with_retry_after(not_sooner_than_backoff(&ctx.job, open.retry_after)),
            )
        })?;
        let wait_until = (Instant::now() + self.host_wait).min(deadline);
        self.take_token(&target, &host, &ctx.job, wait_until, &ctx.cancel)
            .await?;
        let _slot = self
            .take_slot(&target, &host, wait_until, &ctx.cancel)
            .await?;

        let body = args
            .body
            .as_ref()
            .map_or_else(|| "null".to_owned(), |b| b.get().to_owned());
        self.sign(&ctx.job, &body, &mut headers);
        let request = client.post(url).headers(headers).body(body);
        let exchange = async {
            self.chaos
                .inject(Dependency::Webhook)
                .await
                .map_err(Failure::Injected)?;
            let mut response = request.send().await.map_err(Failure::Request)?;
            let status = response.status();
            let retry_after = self.retry_after(status, response.headers());
            // Read a little of the body so the connection can be reused; give up quietly.
            let mut read = 0;
            while read <= DRAIN_LIMIT {
                match response.chunk().await {
                    Ok(Some(chunk)) => read += chunk.len(),
                    Ok(None) | Err(_) => break,
                }
            }
            Ok(Answer {
                status,
                retry_after,
            })
        };
        let sent = Instant::now();
        let answered = tokio::select! {
            r = tokio::time::timeout_at(deadline, exchange) => r,
            // Cancelled by a user, a lost lease or shutdown: no verdict on the host.
            () = ctx.cancel.cancelled() => return Err(cancelled(&host)),
        };
        let (outcome, result) = match answered {
            Err(_) => (
                Outcome::Timeout,
                Err(JobError::retry(format!(
                    "webhook request to {host} timed out after {} ms",
                    sent.elapsed().as_millis()
                ))),
            ),
            Ok(Err(Failure::Injected(fault))) => (
                Outcome::Injected,
                Err(JobError::retry(format!(
                    "webhook request to {host} failed: {fault}"
                ))),
            ),
            Ok(Err(Failure::Request(e))) => request_error(&host, &e),
            Ok(Ok(answer)) => classify(&host, answer),
        };
        self.settle(&target, permit, outcome);
        result
    }
}

/// A cancelled attempt (the worker decides what it means).
fn cancelled(host: &str) -> JobError {
    JobError::retry(format!("webhook request to {host} cancelled"))
}

/// `hint`, or the job's own backoff if that is longer: a refusal on Keel's side (an open
/// circuit, the rate limit) spends an attempt, so retrying no sooner than the backoff keeps
/// a long outage from using up every attempt of a job in minutes, while never retrying
/// before the host can take it.
fn not_sooner_than_backoff(job: &Job, hint: Duration) -> Duration {
    hint.max(job.backoff.delay(job.attempt, &mut rand::rng()))
}

/// Reads a `Retry-After` value, delta-seconds or an HTTP-date, as a delay from `now` (a
/// date in the past is no delay). `None` if it is neither.
fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Maps an answer to its outcome and the job's.
fn classify(host: &str, answer: Answer) -> (Outcome, Result<Option<Box<RawValue>>, JobError>) {
    let Answer {
        status,
        retry_after,
    } = answer;
    let code = status.as_u16();
    if status.is_success() {
        return (
            Outcome::Success,
            json_result(&serde_json::json!({ "status": code })),
        );
    }
    let message = format!("webhook {host} answered {status}");
    if let Some(after) = retry_after {
        let outcome = if status == StatusCode::TOO_MANY_REQUESTS {
            Outcome::Throttled
        } else {
            Outcome::ServerError
        };
        return (
            outcome,
            Err(JobError::retry(format!(
                "{message}; retrying in {} s as its Retry-After asks",
                after.as_secs()
            ))
            .with_retry_after(after)),
        );
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        (Outcome::Throttled, Err(JobError::retry(message)))
    } else if status.is_server_error() {
        (Outcome::ServerError, Err(JobError::retry(message)))
    } else if status == StatusCode::REQUEST_TIMEOUT {
        (Outcome::ClientError, Err(JobError::retry(message)))
    } else if status.is_redirection() {
        (
            Outcome::Redirect,
            Err(JobError::permanent(format!(
                "{message} (redirects are not followed)"
            ))),
        )
    } else {
        (Outcome::ClientError, Err(JobError::permanent(message)))
    }
}

/// A failed exchange: the guard's refusal is permanent; anything else (DNS, connect, TLS,
/// reset, timeout) may pass and is retryable. The message carries the cause chain but not
/// the URL.
fn request_error(
    host: &str,
    e: &reqwest::Error,
) -> (Outcome, Result<Option<Box<RawValue>>, JobError>) {
    let mut causes = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<Refused>() {
            return (
                Outcome::Refused,
                Err(JobError::permanent(refused.to_string())),
            );
        }
        causes.push(s.to_string());
        source = s.source();
    }
    let (outcome, kind) = if e.is_timeout() {
        (Outcome::Timeout, "timed out")
    } else if e.is_connect() {
        (Outcome::ConnectError, "could not connect")
    } else {
        (Outcome::NetworkError, "failed")
    };
    let mut message = format!("webhook request to {host} {kind}");
    for cause in causes {
        message.push_str(": ");
        message.push_str(&cause);
    }
    (outcome, Err(JobError::retry(message)))
}

#[cfg(test)]
mod tests {
    use keel_resilience::BreakerConfig;

    use super::*;
    use crate::executors::test_support::ctx;

    fn guarded() -> Webhook {
        Webhook::new(&WebhookConfig::default())
    }

    #[tokio::test]
    async fn malformed_args_are_permanent_with_a_precise_message() {
        let cases = [
            (r#""http://x""#, "an object with a `url`"),
            (r#"{"body": 1}"#, "missing field `url`"),
            (r#"{"url": "not a url"}"#, "not a valid URL"),
            (
                r#"{"url": "ftp://example.com/x"}"#,
                "scheme must be http or https",
            ),
            (
                r#"{"url": "file:///etc/passwd"}"#,
                "scheme must be http or https",
            ),
            (
                r#"{"url": "http://example.com", "headers": {"bad name": "v"}}"#,
                "not a valid HTTP header name",
            ),
            (
                r#"{"url": "http://example.com", "headers": {"x-a": "line\nbreak"}}"#,
                "header x-a is not a valid",
            ),
        ];
        for (args, want) in cases {
            let err = guarded().run(ctx("webhook", args, 1)).await.unwrap_err();
            assert!(err.permanent, "{args}: {err}");
            assert!(err.message.contains(want), "{args}: {err}");
        }
    }

    #[tokio::test]
    async fn internal_literals_and_names_are_refused() {
        for url in [
            "http://127.0.0.1:1/",
            "http://10.0.0.1/",
            "http://[::1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://2130706433/",
            "http://localhost:1/",
        ] {
            let args = format!(r#"{{"url": "{url}"}}"#);
            let err = guarded().run(ctx("webhook", &args, 1)).await.unwrap_err();
            assert!(err.permanent, "{url}: {err}");
            assert!(
                err.message
                    .contains("resolves to a private or loopback address")
                    && err.message.contains("KEEL_WEBHOOK_ALLOW_PRIVATE"),
                "{url}: {err}"
            );
        }
    }

    fn answer(code: u16, retry_after: Option<u64>) -> Answer {
        Answer {
            status: StatusCode::from_u16(code).unwrap(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn statuses_map_to_outcomes() {
        let (outcome, ok) = classify("h", answer(204, None));
        assert_eq!(outcome, Outcome::Success);
        assert_eq!(ok.unwrap().unwrap().get(), r#"{"status":204}"#);
        for (retry, want) in [
            (408, Outcome::ClientError),
            (429, Outcome::Throttled),
            (500, Outcome::ServerError),
            (502, Outcome::ServerError),
            (503, Outcome::ServerError),
        ] {
            let (outcome, err) = classify("h", answer(retry, None));
            let err = err.unwrap_err();
            assert!(!err.permanent, "{retry}");
            assert_eq!(err.retry_after, None, "{retry}: the backoff decides");
            assert_eq!(outcome, want, "{retry}");
        }
        for permanent in [301, 400, 401, 404, 410, 422] {
            let (outcome, err) = classify("h", answer(permanent, None));
            let err = err.unwrap_err();
            assert!(err.permanent, "{permanent}");
            assert!(err.message.contains(&permanent.to_string()));
            assert_eq!(
                outcome.host_failed(),
                Some(false),
                "{permanent}: the host works"
            );
        }
    }

    #[test]
    fn only_failures_of_the_host_count_against_its_circuit() {
        for failed in [
            Outcome::Throttled,
            Outcome::ServerError,
            Outcome::Timeout,
            Outcome::ConnectError,
            Outcome::NetworkError,
            Outcome::Injected,
        ] {
            assert_eq!(failed.host_failed(), Some(true), "{failed:?}");
        }
        for worked in [Outcome::Success, Outcome::Redirect, Outcome::ClientError] {
            assert_eq!(worked.host_failed(), Some(false), "{worked:?}");
        }
        for unasked in [
            Outcome::Refused,
            Outcome::CircuitOpen,
            Outcome::RateLimited,
            Outcome::HostBusy,
        ] {
            assert_eq!(unasked.host_failed(), None, "{unasked:?}");
        }
    }

    #[test]
    fn retry_after_sets_the_next_attempt_of_a_429_or_503() {
        for code in [429, 503] {
            let (_, err) = classify("h", answer(code, Some(120)));
            let err = err.unwrap_err();
            assert!(!err.permanent);
            assert_eq!(err.retry_after, Some(Duration::from_secs(120)));
            assert!(err.message.contains("Retry-After"), "{err}");
        }

        let hook = Webhook::new(&WebhookConfig {
            max_retry_after: Duration::from_secs(600),
            ..WebhookConfig::default()
        });
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        let read = |code: u16, headers: &HeaderMap| {
            hook.retry_after(StatusCode::from_u16(code).unwrap(), headers)
        };
        assert_eq!(read(429, &headers), Some(Duration::from_secs(120)));
        assert_eq!(read(503, &headers), Some(Duration::from_secs(120)));
        assert_eq!(
            read(500, &headers),
            None,
            "only 429 and 503 mean come back later"
        );
        headers.insert(RETRY_AFTER, HeaderValue::from_static("86400"));
        assert_eq!(
            read(429, &headers),
            Some(Duration::from_secs(600)),
            "capped"
        );
        assert_eq!(read(429, &HeaderMap::new()), None);
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // 21 Oct 2015 07:28:00 GMT
        let parse = |v: &'static str| parse_retry_after(&HeaderValue::from_static(v), now);
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        assert_eq!(
            parse("Wed, 21 Oct 2015 07:30:00 GMT"),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse("Wed, 21 Oct 2015 07:00:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(parse("-5"), None);
        assert_eq!(parse("soon"), None);
    }

    #[test]
    fn refusals_on_our_side_never_retry_sooner_than_the_backoff() {
        let mut job = ctx("webhook", "{}", 1).job;
        job.backoff = keel_core::Backoff::Fixed { delay_ms: 60_000 };
        assert_eq!(
            not_sooner_than_backoff(&job, Duration::from_secs(5)),
            Duration::from_secs(60)
        );
        assert_eq!(
            not_sooner_than_backoff(&job, Duration::from_secs(90)),
            Duration::from_secs(90)
        );
    }

    /// An executor for local test servers, and a job calling `server`.
    fn local(config: WebhookConfig) -> Webhook {
        Webhook::new(&WebhookConfig {
            allow_private: true,
            ..config
        })
    }

    fn call(server: &wiremock::MockServer, timeout: Duration) -> JobContext {
        let mut ctx = ctx("webhook", &format!(r#"{{"url": "{}/x"}}"#, server.uri()), 1);
        ctx.job.timeout = timeout;
        ctx
    }

    async fn serve(status: u16, delay: Duration) -> wiremock::MockServer {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .respond_with(wiremock::ResponseTemplate::new(status).set_delay(delay))
            .mount(&server)
            .await;
        server
    }

    async fn received(server: &wiremock::MockServer) -> usize {
        server.received_requests().await.unwrap().len()
    }

    #[tokio::test]
    async fn a_host_that_times_out_opens_its_circuit() {
        let server = serve(200, Duration::from_secs(5)).await;
        let hook = local(WebhookConfig {
            breaker: BreakerConfig {
                consecutive_failures: 1,
                ..WebhookConfig::default_breaker()
            },
            ..WebhookConfig::default()
        });
        let slow = hook
            .run(call(&server, Duration::from_millis(500)))
            .await
            .unwrap_err();
        assert!(!slow.permanent);
        assert!(slow.message.contains("timed out after"), "{slow}");
        assert_eq!(hook.open_hosts(), 1);
        let refused = hook
            .run(call(&server, Duration::from_millis(500)))
            .await
            .unwrap_err();
        assert!(refused.message.contains("circuit"), "{refused}");
        let after = refused.retry_after.expect("retry when the circuit probes");
        assert!(after > Duration::from_secs(25), "{after:?}");
        assert_eq!(received(&server).await, 1, "the open circuit sent nothing");
    }

    #[tokio::test]
    async fn a_full_host_refuses_after_the_wait_without_a_request() {
        let server = serve(200, Duration::from_secs(2)).await;
        let hook = local(WebhookConfig {
            host_concurrency: 1,
            host_wait: Duration::from_millis(100),
            ..WebhookConfig::default()
        });
        let first = tokio::spawn({
            let hook = hook.clone();
            let ctx = call(&server, Duration::from_secs(10));
            async move { hook.run(ctx).await }
        });
        // Poll until the first request holds the host's only slot.
        while received(&server).await == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let busy = hook
            .run(call(&server, Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert!(!busy.permanent);
        assert!(busy.message.contains("1 requests in flight"), "{busy}");
        assert_eq!(received(&server).await, 1);
        assert!(first.await.unwrap().is_ok(), "the first request completes");
        assert_eq!(hook.open_hosts(), 0, "waiting is not a failure of the host");
    }

    #[tokio::test]
    async fn the_rate_limit_refuses_when_the_next_token_is_too_far() {
        let server = serve(200, Duration::ZERO).await;
        let hook = local(WebhookConfig {
            host_rate: Some(HostRateLimit {
                per_second: 1,
                burst: 1,
            }),
            host_wait: Duration::from_millis(50),
            ..WebhookConfig::default()
        });
        hook.run(call(&server, Duration::from_secs(10)))
            .await
            .unwrap();
        let limited = hook
            .run(call(&server, Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert!(!limited.permanent);
        assert!(
            limited.message.contains("rate limit (1 requests/s)"),
            "{limited}"
        );
        let after = limited.retry_after.expect("retry when a token is due");
        assert!(after >= Duration::from_millis(500), "{after:?}");
        assert_eq!(received(&server).await, 1);
    }

    #[test]
    fn bad_settings_are_corrected_not_fatal() {
        let hook = Webhook::new(&WebhookConfig {
            host_concurrency: 0,
            host_wait: Duration::ZERO,
            max_retry_after: Duration::ZERO,
            host_rate: Some(HostRateLimit {
                per_second: 0,
                burst: 1,
            }),
            ..WebhookConfig::default()
        });
        assert_eq!(hook.host_concurrency, 1);
        assert_eq!(hook.host_wait, WebhookConfig::default().host_wait);
        assert_eq!(
            hook.max_retry_after,
            WebhookConfig::default().max_retry_after
        );
        assert_eq!(hook.host_rate, None);
    }
}
