//! The parsers of outside input, callable without a server: the entry points of the fuzz
//! targets in `fuzz/` (cargo-fuzz). Only with the `fuzzing` feature, so they are not part of
//! what an embedder of the router sees. Each answers what the route would: the parsed value,
//! or the [`ApiError`] the client would get. The proptest twins in this crate's tests call the
//! same crate-private parsers.

use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, Uri};
use keel_core::store::ListParams;
use keel_core::{IdempotencyKey, NewJob, NewSchedule, QueueName, Timestamp};
use keel_runtime::{Catalog, Handlers, WebhookConfig};

use crate::auth::Caller;
use crate::error::ApiError;

/// The queue [`Parsers`] serves, with the built-in kinds, so the runnable-kind and built-in
/// args checks run too.
pub const SERVED_QUEUE: &str = "served";

/// What the routes parse with, minus the server: a catalog serving [`SERVED_QUEUE`], the
/// default args cap and a fixed "now".
#[derive(Debug, Clone)]
pub struct Parsers {
    catalog: Catalog,
    max_args_bytes: usize,
    now: Timestamp,
}

impl Default for Parsers {
    fn default() -> Self {
        let queue = QueueName::parse(SERVED_QUEUE).expect("a valid queue name");
        Self {
            catalog: Catalog::new([queue], &Handlers::builtin(&WebhookConfig::default())),
            max_args_bytes: crate::ApiConfig::default().max_args_bytes,
            now: Timestamp::from_timestamp(1_800_000_000, 0).expect("a valid instant"),
        }
    }
}

impl Parsers {
    fn cx<'a>(&'a self, caller: &'a Caller) -> crate::job_in::JobContext<'a> {
        crate::job_in::JobContext {
            caller,
            catalog: &self.catalog,
            max_args_bytes: self.max_args_bytes,
            now: self.now,
        }
    }

    /// `POST /v1/jobs`.
    pub fn enqueue(&self, body: &[u8], caller: &Caller) -> Result<NewJob, ApiError> {
        crate::job_in::parse_single(body, &self.cx(caller))
    }

    /// `POST /v1/jobs/batch`.
    pub fn batch(&self, body: &[u8], caller: &Caller) -> Result<Vec<NewJob>, ApiError> {
        crate::job_in::parse_batch(body, &self.cx(caller))
    }

    /// `POST /v1/process`.
    pub fn process(&self, body: &[u8], caller: &Caller) -> Result<NewJob, ApiError> {
        crate::job_in::parse_process(body, &self.cx(caller))
    }

    /// `POST /v1/schedules` (the name in the body).
    pub fn schedule(&self, body: &[u8], caller: &Caller) -> Result<NewSchedule, ApiError> {
        crate::schedule_in::parse_schedule(body, &self.cx(caller), None)
    }

    /// The args cap the job parsers enforce.
    pub fn max_args_bytes(&self) -> usize {
        self.max_args_bytes
    }
}

/// The query string of `GET /v1/jobs` (what follows `?`), decoded as axum decodes it.
pub fn list_jobs_query(query: &str, caller: &Caller) -> Result<ListParams, ApiError> {
    let mut params = crate::routes::jobs::list_params(pairs(query)?)?;
    params.tenant = crate::service::jobs::listing_scope(caller, params.tenant)?;
    Ok(params)
}

/// The query string of `GET /v1/schedules`.
pub fn list_schedules_query(query: &str, caller: &Caller) -> Result<(), ApiError> {
    let q = crate::routes::schedules::schedule_query(pairs(query)?, true)?;
    caller.tenant_for(q.tenant).map(drop)
}

fn pairs(query: &str) -> Result<Vec<(String, String)>, ApiError> {
    // A query hyper would not have accepted is not the parser's business.
    let uri: Uri = format!("/v1/jobs?{query}")
        .parse()
        .map_err(|_| ApiError::BadRequest("not a request target".to_owned()))?;
    Ok(Query::<Vec<(String, String)>>::try_from_uri(&uri)?.0)
}

/// The `Idempotency-Key` header's raw bytes.
pub fn idempotency_key(value: &[u8]) -> Result<IdempotencyKey, ApiError> {
    let v = HeaderValue::from_bytes(value)
        .map_err(|_| ApiError::BadRequest("not a header value".to_owned()))?;
    crate::extract::parse_idempotency_key(&v)
}

/// The `Request-Timeout` header's raw bytes.
pub fn request_timeout(value: &[u8]) -> Result<Option<std::time::Duration>, ApiError> {
    let v = HeaderValue::from_bytes(value)
        .map_err(|_| ApiError::BadRequest("not a header value".to_owned()))?;
    let mut headers = HeaderMap::new();
    headers.insert(crate::middleware::REQUEST_TIMEOUT, v);
    crate::middleware::requested_timeout(&headers)
}

/// The callers every check runs as: no authentication, a tenant key, an operator key.
fn callers() -> [(Caller, Option<keel_core::TenantId>); 3] {
    let tenant = |s: &str| keel_core::TenantId::parse(s).expect("a valid tenant");
    [
        (Caller::unrestricted(), None),
        (Caller::tenant(tenant("acme")), Some(tenant("acme"))),
        (Caller::operator(tenant("ops")), None),
    ]
}

/// A refusal must be the client's fault (4xx) and render: a 5xx here would count against
/// the server's health (breakers, error budgets) for a client's mistake.
fn assert_client_error(e: &ApiError, input: &[u8]) {
    let status = e.problem().status;
    assert!(
        (400..500).contains(&status),
        "{status} ({e}) for input {:?}",
        String::from_utf8_lossy(input)
    );
}

/// Every body a job or schedule route can get is parsed or refused with a 4xx, never a
/// panic or a 5xx. What is parsed is what the store takes (it validates) and belongs to a
/// tenant key's own tenant.
pub fn check_bodies(body: &[u8]) {
    let parsers = Parsers::default();
    let max = parsers.max_args_bytes();
    for (caller, bound) in callers() {
        for parsed in [
            parsers.enqueue(body, &caller).map(|j| vec![j]),
            parsers.batch(body, &caller),
            parsers.process(body, &caller).map(|j| vec![j]),
        ] {
            match parsed {
                Ok(jobs) => {
                    for job in jobs {
                        if let Err(e) = job.validate(max) {
                            panic!("a parsed job fails validation: {e:?}");
                        }
                        if let Some(own) = &bound {
                            assert_eq!(&job.tenant, own, "a tenant key enqueued elsewhere");
                        }
                    }
                }
                Err(e) => assert_client_error(&e, body),
            }
        }
        match parsers.schedule(body, &caller) {
            Ok(s) => {
                if let Err(e) = s.validate(max) {
                    panic!("a parsed schedule fails validation: {e:?}");
                }
                if let Some(own) = &bound {
                    assert_eq!(&s.tenant, own, "a tenant key scheduled elsewhere");
                }
            }
            Err(e) => assert_client_error(&e, body),
        }
    }
}

/// Every query string of the list routes is parsed or refused with a 4xx; a page is never
/// empty-sized or past the cap, and a tenant key lists only its own tenant.
pub fn check_query(query: &str) {
    for (caller, bound) in callers() {
        match list_jobs_query(query, &caller) {
            Ok(p) => {
                assert!(
                    (1..=ListParams::MAX_LIMIT).contains(&p.limit),
                    "{}",
                    p.limit
                );
                if let Some(own) = &bound {
                    assert_eq!(
                        p.tenant.as_ref(),
                        Some(own),
                        "a tenant key listed elsewhere"
                    );
                }
            }
            Err(e) => assert_client_error(&e, query.as_bytes()),
        }
        if let Err(e) = list_schedules_query(query, &caller) {
            assert_client_error(&e, query.as_bytes());
        }
    }
}

/// Every value of the `Idempotency-Key` and `Request-Timeout` headers is taken or refused
/// with a 4xx; a key taken is 1..=255 visible ASCII, a deadline taken is at least the floor.
pub fn check_headers(value: &[u8]) {
    match idempotency_key(value) {
        Ok(k) => {
            let k = k.as_str();
            assert!((1..=IdempotencyKey::MAX_LEN).contains(&k.len()), "{k:?}");
            assert!(k.bytes().all(|b| b.is_ascii_graphic()), "{k:?}");
        }
        Err(e) => assert_client_error(&e, value),
    }
    match request_timeout(value) {
        Ok(Some(d)) => assert!(
            d.as_millis() >= u128::from(crate::middleware::MIN_REQUESTED_TIMEOUT_MS),
            "{d:?}"
        ),
        Ok(None) => panic!("a sent Request-Timeout was not seen"),
        Err(e) => assert_client_error(&e, value),
    }
}

/// The proptest twins of the fuzz targets: the same checks on generated inputs, in the
/// normal test suite. Inputs are built from the grammar's pieces (field names, JSON values
/// near the bounds), so most reach the deep checks rather than the first syntax error.
#[cfg(test)]
mod twins {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            prop_oneof![
                Just(-1i64),
                Just(0),
                Just(1),
                Just(9),
                Just(10),
                Just(25),
                Just(1000),
                Just(1_000_000_000_000)
            ]
            .prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
            prop_oneof![
                Just("served"),
                Just("sleep"),
                Just("webhook"),
                Just("acme"),
                Just("other"),
                Just("period"),
                Just("queued"),
                Just("1h"),
                Just("0 3 * * *"),
                Just("Europe/Paris"),
                Just("2030-01-01T00:00:00Z"),
                Just("9999-12-31T23:59:60Z"),
            ]
            .prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map(field(), inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn field() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "kind",
                "queue",
                "args",
                "priority",
                "max_attempts",
                "timeout_ms",
                "backoff",
                "tags",
                "unique",
                "tenant",
                "run_at",
                "delay_ms",
                "jobs",
                "name",
                "cron",
                "timezone",
                "catch_up",
                "job",
                "key",
                "scope",
                "period",
                "type",
                "base_ms",
                "cap_ms",
                "ms",
            ])
            .prop_map(str::to_owned),
            "[a-z_]{1,8}",
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::btree_map(field(), json_value(), 0..8).prop_map(|m| {
                serde_json::to_vec(&serde_json::Value::Object(m.into_iter().collect())).unwrap()
            }),
            json_value()
                .prop_map(|v| serde_json::to_vec(&serde_json::json!({"jobs": [v]})).unwrap()),
            prop::collection::vec(any::<u8>(), 0..64),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn bodies(body in body()) {
            check_bodies(&body);
        }

        #[test]
        fn queries(
            pairs in prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(vec!["queue", "state", "kind", "tenant", "after", "limit"])
                            .prop_map(str::to_owned),
                        "[a-z%=&]{0,6}",
                    ],
                    ".{0,40}",
                ),
                0..5,
            ),
            raw in ".{0,40}",
        ) {
            let encoded: String = pairs
                .iter()
                .map(|(k, v)| format!("{k}={}", v.replace('%', "%25").replace('&', "%26").replace('#', "%23").replace(' ', "+")))
                .collect::<Vec<_>>()
                .join("&");
            check_query(&encoded);
            check_query(&raw);
        }

        #[test]
        fn headers(value in prop::collection::vec(any::<u8>(), 0..300), text in "[ -~]{0,300}") {
            check_headers(&value);
            check_headers(text.as_bytes());
        }
    }
}
