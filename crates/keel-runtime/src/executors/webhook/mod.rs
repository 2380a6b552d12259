//! `webhook`: an HTTP POST of JSON to a URL named in the job's args.

mod guard;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::WebhookConfig;
use crate::{Handler, JobContext, JobError, json_result};
use guard::{GuardedResolver, Refused, is_internal};

/// Longest a connection attempt may take. The whole request is bounded by the job's
/// timeout; this only keeps one unreachable address from eating all of it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most response body read (and thrown away) so the connection can go back to the pool;
/// a bigger body closes the connection instead of being read to the end.
const DRAIN_LIMIT: usize = 64 * 1024;

/// `webhook`: POSTs JSON to a URL.
///
/// Args: `{"url": "http(s)://…", "body": any?, "headers": {"name": "value", …}?}`. The
/// request body is `body` exactly as submitted (or `null`), with
/// `content-type: application/json` (it overrides a `content-type` in `headers`).
///
/// Outcome: a 2xx answer succeeds with `{"status": code}`. 408, 429, 5xx, network errors
/// and timeouts are retryable (the receiver may recover). Redirects are not followed (a
/// redirect could point past the SSRF guard) and, like every other status, are permanent
/// failures, as are malformed args.
///
/// SSRF guard (G8): unless [`WebhookConfig::allow_private`], a URL whose host is, or
/// resolves to, a loopback, private, link-local or otherwise internal address is refused
/// before any connection is made, and the connection is pinned to the checked addresses.
///
/// One HTTP client is shared by every webhook job, so connections to a receiver are pooled.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// The shared client, or why it could not be built (then every webhook job fails with
    /// a retryable error naming it, rather than the whole process failing to start).
    client: Result<reqwest::Client, Arc<str>>,
    allow_private: bool,
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

impl Webhook {
    /// An executor with `config`'s SSRF policy and user agent.
    pub fn new(config: &WebhookConfig) -> Self {
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
        Self {
            client,
            allow_private: config.allow_private,
        }
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
        let mut headers = HeaderMap::with_capacity(args.headers.len() + 1);
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
}

#[async_trait]
impl Handler for Webhook {
    async fn run(&self, ctx: JobContext) -> Result<Option<Box<RawValue>>, JobError> {
        let args: Args = ctx.args()?;
        let (url, headers) = self.prepare(&args)?;
        let client = self
            .client
            .as_ref()
            .map_err(|e| JobError::retry(format!("the webhook HTTP client is unavailable: {e}")))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let body = args
            .body
            .as_ref()
            .map_or_else(|| "null".to_owned(), |b| b.get().to_owned());
        let request = client.post(url).headers(headers).body(body);
        let exchange = async {
            let mut response = request.send().await?;
            let status = response.status();
            // Read a little of the body so the connection can be reused; give up quietly.
            let mut read = 0;
            while read <= DRAIN_LIMIT {
                match response.chunk().await {
                    Ok(Some(chunk)) => read += chunk.len(),
                    Ok(None) | Err(_) => break,
                }
            }
            Ok::<_, reqwest::Error>(status)
        };
        let status = tokio::select! {
            r = exchange => r.map_err(|e| request_error(&host, &e))?,
            () = ctx.cancel.cancelled() => {
                return Err(JobError::retry(format!("webhook request to {host} cancelled")));
            }
        };
        classify(&host, status)
    }
}

/// Maps an answer to the job's outcome.
fn classify(host: &str, status: StatusCode) -> Result<Option<Box<RawValue>>, JobError> {
    let code = status.as_u16();
    if status.is_success() {
        return json_result(&serde_json::json!({ "status": code }));
    }
    let message = format!("webhook {host} answered {status}");
    if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Err(JobError::retry(message))
    } else if status.is_redirection() {
        Err(JobError::permanent(format!(
            "{message} (redirects are not followed)"
        )))
    } else {
        Err(JobError::permanent(message))
    }
}

/// A failed exchange: the guard's refusal is permanent; anything else (DNS, connect, TLS,
/// reset, timeout) may pass and is retryable. The message carries the cause chain but not
/// the URL.
fn request_error(host: &str, e: &reqwest::Error) -> JobError {
    let mut causes = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<Refused>() {
            return JobError::permanent(refused.to_string());
        }
        causes.push(s.to_string());
        source = s.source();
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let mut message = format!("webhook request to {host} {kind}");
    for cause in causes {
        message.push_str(": ");
        message.push_str(&cause);
    }
    JobError::retry(message)
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn statuses_map_to_outcomes() {
        let ok = classify("h", StatusCode::NO_CONTENT).unwrap().unwrap();
        assert_eq!(ok.get(), r#"{"status":204}"#);
        for retry in [408, 429, 500, 502, 503] {
            let err = classify("h", StatusCode::from_u16(retry).unwrap()).unwrap_err();
            assert!(!err.permanent, "{retry}");
        }
        for permanent in [301, 400, 401, 404, 410, 422] {
            let err = classify("h", StatusCode::from_u16(permanent).unwrap()).unwrap_err();
            assert!(err.permanent, "{permanent}");
            assert!(err.message.contains(&permanent.to_string()));
        }
    }
}
