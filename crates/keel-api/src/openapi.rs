//! The OpenAPI document served at `/v1/openapi.json`, generated from the handlers'
//! `#[utoipa::path]` attributes and the DTOs' schemas, and checked against the route table
//! by a test.
//!
//! [`document`] then states what utoipa's attributes cannot: every answer each route can
//! give (the protection layers', the body layers', the auth layer's), and every constraint
//! the parsers enforce (name patterns, bounds, formats, header forms, fields that exclude
//! each other), so that a client generated from it, and a fuzzer reading it (schemathesis,
//! run in CI), agree with the server. Keep the tables below in step with `job_in`,
//! `schedule_in`, `extract` and keel-core's validation.

use serde_json::json;
use utoipa::openapi::content::Content;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{Object, Ref, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{RefOr, Response};
use utoipa::{Modify, OpenApi};

use crate::error::{Problem, ProblemField};

/// Adds the bearer API-key scheme the `/v1` operations refer to.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// Adds the answers of the protection layers to every operation that has them — every
/// operation behind an API key: `429` from the rate limit, `503` from admission control (or
/// an unavailable dependency) and `504` from the deadline. Added here rather than on each
/// handler so that no handler can forget one.
struct ProtectionResponses;

fn problem_response(description: &str, retry_after: bool) -> RefOr<Response> {
    let mut b = ResponseBuilder::new().description(description).content(
        crate::error::PROBLEM_JSON,
        Content::new(Some(Ref::from_schema_name("Problem"))),
    );
    if retry_after {
        b = b.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(Object::with_type(Type::Integer))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    RefOr::T(b.build())
}

/// `(status, description, Retry-After)` of the problems any route can answer: every route
/// parses its headers (`Request-Timeout`, `X-Request-Id`) and can fail inside: a malformed
/// header is a 400, a bug an opaque 500.
const EVERY_ROUTE: &[(&str, &str, bool)] = &[
    (
        "400",
        "Malformed request: not JSON, a bad path segment, query or header (e.g. Request-Timeout)",
        false,
    ),
    (
        "500",
        "Internal error (opaque; the cause is logged with the request id)",
        false,
    ),
];

/// The problems of a route with a request body: late, too large, not JSON, invalid.
const WITH_BODY: &[(&str, &str, bool)] = &[
    (
        "408",
        "The request body did not arrive before the request deadline",
        false,
    ),
    ("413", "The body is larger than the limit", false),
    ("415", "The body is not declared as JSON", false),
    ("422", "Invalid fields, all listed", false),
];

/// The problems of a route behind an API key: authentication and the protection layers.
const BEHIND_A_KEY: &[(&str, &str, bool)] = &[
    (
        "401",
        "Missing or unknown API key (WWW-Authenticate: Bearer)",
        false,
    ),
    (
        "403",
        "The API key may not do this (another tenant, or an operator's action)",
        false,
    ),
    (
        "429",
        "Rate limit of the tenant or API key exceeded (RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset describe the bucket)",
        true,
    ),
    (
        "503",
        "Overloaded (shed by admission control) or a dependency is unavailable",
        true,
    ),
    (
        "504",
        "Deadline exceeded; `detail` names the step the request was in",
        false,
    ),
];

impl Modify for ProtectionResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                let tables = [
                    (EVERY_ROUTE, true),
                    (WITH_BODY, op.request_body.is_some()),
                    (BEHIND_A_KEY, op.security.is_some()),
                ];
                let responses = &mut op.responses.responses;
                for (table, _) in tables.into_iter().filter(|(_, applies)| *applies) {
                    for &(status, description, retry_after) in table {
                        responses
                            .entry(status.to_owned())
                            .or_insert_with(|| problem_response(description, retry_after));
                    }
                }
            }
        }
    }
}

/// What Keel's HTTP API description says beyond its routes: the title, the shared schemas
/// and the tags. [`api_doc`] adds the routes' operations, from the route table.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Keel",
        description = "A durable job server. Errors are application/problem+json (RFC 9457). Every response carries X-Request-Id."
    ),
    components(schemas(
        keel_wire::JobIn,
        keel_wire::UniqueIn,
        keel_wire::UniqueOut,
        keel_wire::BatchIn,
        keel_wire::JobOut,
        keel_wire::BatchOut,
        keel_wire::JobPageOut,
        keel_wire::JobResultOut,
        keel_wire::QueueOut,
        keel_wire::QueuePausedOut,
        keel_wire::ScheduleIn,
        keel_wire::JobTemplateIn,
        keel_wire::JobTemplateOut,
        keel_wire::ScheduleOut,
        keel_wire::SchedulePageOut,
        keel_wire::HealthOut,
        keel_wire::ReadyOut,
        keel_wire::LeaseBody,
        keel_wire::LeasedOut,
        keel_wire::HeartbeatBody,
        keel_wire::HeartbeatOut,
        keel_wire::CompleteBody,
        keel_wire::FailBody,
        keel_wire::ReleaseBody,
        keel_wire::CompleteItem,
        keel_wire::CompleteManyBody,
        keel_wire::FailItem,
        keel_wire::FailManyBody,
        keel_wire::OutcomeOut,
        keel_wire::OutcomesOut,
        keel_wire::WorkerOut,
        keel_wire::WorkersOut,
        Problem,
        ProblemField,
    )),
    tags(
        (name = "jobs", description = "Enqueue, inspect and control jobs"),
        (name = "queues", description = "Queue statistics, pause and resume"),
        (name = "schedules", description = "Cron schedules: each tick enqueues one job, exactly once"),
        (name = "workers", description = "The worker protocol: external workers in any language lease jobs, heartbeat and report outcomes (docs/workers.md)"),
        (name = "probes", description = "Health, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// A 128-byte Keel name: queue, kind, tenant, schedule.
fn name_schema(nullable: bool) -> serde_json::Value {
    let pattern = keel_core::QueueName::pattern();
    if nullable {
        json!({"type": ["string", "null"], "pattern": pattern, "maxLength": 128})
    } else {
        json!({"type": "string", "pattern": pattern, "minLength": 1, "maxLength": 128})
    }
}

/// An RFC 3339 time in the range a job's `run_at` may take
/// ([`keel_core::NewJob::MIN_RUN_AT`] to [`keel_core::NewJob::MAX_RUN_AT`], whatever the
/// offset), with days up to 28 so that every match is a real date, and no leap second.
pub const RUN_AT_PATTERN: &str = concat!(
    r"^(200[1-9]|20[1-9][0-9]|21[0-9]{2})-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])",
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?",
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
);

/// A tag or a unique key: no control characters.
const PRINTABLE_PATTERN: &str = r"^[^\u0000-\u001F\u007F-\u009F]*$";

/// A duration with a unit, at most 7 days (a schedule's `catch_up`).
pub const CATCH_UP_PATTERN: &str = concat!(
    r"^([0-9]{1,6}ms|[0-9]{1,5}s|[0-9]{1,4}m|",
    r"(1[0-5][0-9]|16[0-8]|[0-9]{1,2})h|[0-7]d)$"
);

/// A duration with a unit from 1 s to 366 days (a unique key's `period`).
pub const PERIOD_PATTERN: &str = concat!(
    r"^([1-9][0-9]{0,3}s|[1-9][0-9]{0,3}m|[1-9][0-9]{0,2}h|",
    r"([1-9]|[1-9][0-9]|[12][0-9]{2}|3[0-5][0-9]|36[0-6])d)$"
);

/// Keel's HTTP API description: [`ApiDoc`] with the operation of every route in the route
/// table (`routes::RouteDocs`, so a route is documented by being served), then the bearer
/// scheme and the responses every protected route may give.
pub fn api_doc() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(crate::routes::RouteDocs::openapi());
    BearerAuth.modify(&mut doc);
    ProtectionResponses.modify(&mut doc);
    doc
}

/// The served document: [`api_doc`] plus what its attributes cannot state (see the module
/// docs). Built once per request of `/v1/openapi.json`: cheap next to what the request
/// costs the client.
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(api_doc()).unwrap_or_else(|_| json!({"openapi": "3.1.0"}));
    constrain_parameters(&mut doc);
    constrain_bodies(&mut doc);
    add_examples(&mut doc);
    doc
}

/// One realistic request body per write route: readers copy them, and the fuzzer's examples
/// phase sends them as they are.
fn add_examples(doc: &mut serde_json::Value) {
    let job = json!({
        "queue": "emails",
        "kind": "send_welcome",
        "args": {"user_id": 42},
        "max_attempts": 5,
        "tags": ["signup"],
        "unique": {"key": "welcome-42", "scope": "queued"},
    });
    let schedule = json!({
        "cron": "0 3 * * *",
        "timezone": "Europe/Berlin",
        "catch_up": "1h",
        "job": {"queue": "reports", "kind": "nightly_report", "args": {"format": "pdf"}},
    });
    let mut named_schedule = schedule.clone();
    named_schedule["name"] = json!("nightly-report");
    let batch = json!({"jobs": [
        {"queue": "emails", "kind": "send_welcome", "args": {"user_id": 42}},
        {"queue": "emails", "kind": "send_welcome", "args": {"user_id": 43}, "delay_ms": 60000},
    ]});
    for (path, method, example) in [
        ("/v1/jobs", "post", job),
        ("/v1/jobs/batch", "post", batch),
        ("/v1/schedules", "post", named_schedule),
        ("/v1/schedules/{name}", "put", schedule),
    ] {
        let pointer = format!(
            "/paths/{}/{method}/requestBody/content/application~1json",
            path.replace('~', "~0").replace('/', "~1")
        );
        if let Some(media) = doc.pointer_mut(&pointer) {
            media["example"] = example;
        }
    }
}

/// Path, query and header parameters, by name: what each parser accepts.
fn constrain_parameters(doc: &mut serde_json::Value) {
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for op in item.values_mut() {
            let Some(params) = op.get_mut("parameters").and_then(|p| p.as_array_mut()) else {
                continue;
            };
            for param in params {
                let name = param["name"].as_str().unwrap_or_default().to_owned();
                let place = param["in"].as_str().unwrap_or_default().to_owned();
                let schema = match (place.as_str(), name.as_str()) {
                    ("path", "id") => json!({"type": "string", "format": "uuid"}),
                    ("path", "queue" | "name") => name_schema(false),
                    ("query", "queue" | "kind" | "tenant") => name_schema(false),
                    ("query", "after") if path == "/v1/schedules" => name_schema(false),
                    ("query", "after") => json!({"type": "string", "format": "uuid"}),
                    ("query", "state") => json!({
                        "type": "string",
                        "enum": keel_core::JobState::ALL.map(|s| s.as_str()),
                    }),
                    ("query", "limit") => json!({"type": "integer", "minimum": 1, "maximum": 1000}),
                    ("header", "Idempotency-Key") => json!({
                        "type": "string",
                        "pattern": keel_core::IdempotencyKey::PATTERN,
                    }),
                    ("header", "Request-Timeout") => json!({
                        "type": "integer",
                        "minimum": crate::middleware::MIN_REQUESTED_TIMEOUT_MS,
                        "maximum": u64::MAX,
                    }),
                    _ => continue,
                };
                param["schema"] = schema;
            }
        }
    }
}

/// The request bodies' fields: the bounds, patterns and exclusions `job_in` and
/// `schedule_in` enforce.
fn constrain_bodies(doc: &mut serde_json::Value) {
    if let Some(body) = doc.pointer_mut(
        "/paths/~1v1~1schedules~1{name}/put/requestBody/content/application~1json/schema",
    ) {
        *body = json!({"$ref": "#/components/schemas/SchedulePutIn"});
    }
    // `POST /v1/process` reads a `JobIn` and refuses its run time: the same body without
    // `run_at` and `delay_ms`.
    if let Some(body) =
        doc.pointer_mut("/paths/~1v1~1process/post/requestBody/content/application~1json/schema")
    {
        *body = json!({"$ref": "#/components/schemas/ProcessIn"});
    }
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(|s| s.as_object_mut())
    else {
        return;
    };
    let tags = json!({
        "type": ["array", "null"],
        "maxItems": keel_core::NewJob::MAX_TAGS,
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": keel_core::NewJob::MAX_TAG_LEN,
            "pattern": PRINTABLE_PATTERN,
        },
    });
    let job_fields = |with_run_time: bool, with_tenant: bool| {
        let mut p = json!({
            "kind": name_schema(false),
            "queue": name_schema(true),
            "priority": {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
            "max_attempts": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": keel_core::NewJob::MAX_ATTEMPTS_LIMIT,
            },
            "timeout_ms": {
                "type": ["integer", "null"],
                "minimum": 1,
                "maximum": keel_core::NewJob::MAX_TIMEOUT.as_millis(),
            },
            "tags": tags.clone(),
        });
        if with_tenant {
            // `null` means "not given", as for `backoff`.
            p["unique"] = json!({"oneOf": [
                {"type": "null"},
                {"$ref": "#/components/schemas/UniqueIn"},
            ]});
        }
        if with_tenant {
            p["tenant"] = name_schema(true);
        }
        if with_run_time {
            p["run_at"] = json!({"type": ["string", "null"], "pattern": RUN_AT_PATTERN});
            p["delay_ms"] = json!({
                "type": ["integer", "null"],
                "minimum": 0,
                "maximum": crate::job_in::MAX_DELAY_MS,
            });
        }
        p
    };
    if let Some(job) = schemas.get("JobIn") {
        let mut process = job.clone();
        if let Some(props) = process["properties"].as_object_mut() {
            props.remove("run_at");
            props.remove("delay_ms");
        }
        process["description"] = json!(
            "The body of `POST /v1/process`: a job body without `run_at` and `delay_ms` (the \
             job runs now and the request waits for it; schedule later jobs with \
             `POST /v1/jobs`)."
        );
        schemas.insert("ProcessIn".to_owned(), process);
    }
    for (schema, with_run_time, with_tenant) in [
        ("JobIn", true, true),
        ("ProcessIn", false, true),
        ("JobTemplateIn", false, false),
    ] {
        let Some(s) = schemas.get_mut(schema) else {
            continue;
        };
        merge_properties(s, &job_fields(with_run_time, with_tenant));
        s["additionalProperties"] = json!(false);
    }
    if let Some(s) = schemas.get_mut("BatchIn") {
        s["properties"]["jobs"]["minItems"] = json!(1);
        s["properties"]["jobs"]["maxItems"] = json!(crate::job_in::MAX_BATCH);
        s["additionalProperties"] = json!(false);
    }
    constrain_worker_bodies(schemas);
    if let Some(s) = schemas.get_mut("UniqueIn") {
        let key = json!({
            "type": "string",
            "minLength": 1,
            "maxLength": keel_core::Unique::MAX_KEY_LEN,
            "pattern": PRINTABLE_PATTERN,
        });
        // One schema with every type it may take (no oneOf: generators of negative cases
        // misread alternatives nested in an object): pattern applies to the string,
        // bounds to the number.
        let period = json!({
            "type": ["string", "integer", "null"],
            "pattern": PERIOD_PATTERN,
            "minimum": keel_core::UniqueScope::MIN_PERIOD.as_millis(),
            "maximum": keel_core::UniqueScope::MAX_PERIOD.as_millis(),
        });
        merge_properties(
            s,
            &json!({
                "key": key,
                "scope": {"type": "string", "enum": ["queued", "active", "period"]},
                "period": period,
            }),
        );
        s["additionalProperties"] = json!(false);
    }
    if let Some(s) = schemas.get_mut("ScheduleIn") {
        merge_properties(
            s,
            &json!({
                "name": name_schema(true),
                "tenant": name_schema(true),
                "cron": {
                    "type": "string",
                    "maxLength": keel_core::CronSpec::MAX_EXPR_LEN,
                    "pattern": keel_core::CronSpec::documented_pattern(),
                },
                "timezone": {
                    "type": ["string", "null"],
                    "enum": keel_core::CronSpec::time_zones()
                        .into_iter()
                        .map(serde_json::Value::from)
                        .chain([serde_json::Value::Null])
                        .collect::<Vec<_>>(),
                },
                "catch_up": {"type": ["string", "null"], "pattern": CATCH_UP_PATTERN},
            }),
        );
        s["additionalProperties"] = json!(false);
        // `PUT /v1/schedules/{name}` takes the name from its path: the same body without
        // one. `POST` requires it.
        let mut put = s.clone();
        if let Some(props) = put["properties"].as_object_mut() {
            props.remove("name");
        }
        put["description"] = json!(
            "The body of `PUT /v1/schedules/{name}`: a schedule without `name` (the path names it)."
        );
        s["required"] = json!(["name", "cron", "job"]);
        s["properties"]["name"]["type"] = json!("string");
        schemas.insert("SchedulePutIn".to_owned(), put);
    }
    if let Some(s) = schemas.get_mut("Backoff") {
        let week = keel_core::Backoff::MAX.as_millis();
        if let Some(variants) = s["oneOf"].as_array_mut() {
            for v in variants {
                let props = &mut v["properties"];
                if props.get("base_ms").is_some() {
                    props["base_ms"]["minimum"] = json!(1);
                    props["base_ms"]["maximum"] = json!(week);
                    props["cap_ms"]["maximum"] = json!(week);
                }
                if props.get("delay_ms").is_some() {
                    props["delay_ms"]["maximum"] = json!(week);
                }
            }
        }
    }
}

/// A lease's `wait`: 0 to 30 s, with a unit or in milliseconds.
pub const WAIT_PATTERN: &str = r"^([0-9]{1,4}ms|[12][0-9]{4}ms|30000ms|[0-9]s|[12][0-9]s|30s)$";

/// A lease's length: 5 s to 1 h.
pub const LEASE_PATTERN: &str = concat!(
    r"^(([5-9]|[1-9][0-9]|[1-9][0-9]{2}|[12][0-9]{3}|3[0-5][0-9]{2}|3600)s",
    r"|([1-9]|[1-5][0-9]|60)m|1h)$"
);

/// A failure's `retry_in`: every value the pattern admits is under the 10-year bound.
pub const RETRY_IN_PATTERN: &str =
    r"^([0-9]{1,9}ms|[0-9]{1,8}s|[0-9]{1,6}m|[0-9]{1,4}h|[0-9]{1,3}d)$";

/// The worker protocol's bodies: the bounds `worker_in` enforces.
fn constrain_worker_bodies(schemas: &mut serde_json::Map<String, serde_json::Value>) {
    let token = json!({"type": "string", "format": "uuid"});
    let id = json!({"type": "string", "format": "uuid"});
    let lease = json!({
        "type": ["string", "integer", "null"],
        "pattern": LEASE_PATTERN,
        "minimum": crate::worker_in::MIN_LEASE.as_millis(),
        "maximum": crate::worker_in::MAX_LEASE_FOR.as_millis(),
    });
    let retry_in = json!({
        "type": ["string", "integer", "null"],
        "pattern": RETRY_IN_PATTERN,
        "minimum": 0,
        "maximum": crate::job_in::MAX_DELAY_MS,
    });
    let fail_fields = json!({
        "token": token,
        "error": {"type": "string"},
        "permanent": {"type": ["boolean", "null"]},
        "retry_in": retry_in,
    });
    let mut constrain = |name: &str, with: serde_json::Value| {
        if let Some(s) = schemas.get_mut(name) {
            merge_properties(s, &with);
            s["additionalProperties"] = json!(false);
        }
    };
    constrain(
        "LeaseBody",
        json!({
            "worker": {
                "type": "string",
                "pattern": keel_core::WorkerId::pattern(),
                "minLength": 1,
                "maxLength": keel_core::WorkerId::MAX_LEN,
            },
            "max": {"type": ["integer", "null"], "minimum": 1, "maximum": crate::worker_in::MAX_LEASE},
            "wait": {
                "type": ["string", "integer", "null"],
                "pattern": WAIT_PATTERN,
                "minimum": 0,
                "maximum": crate::worker_in::MAX_WAIT.as_millis(),
            },
            "lease": lease,
            "kinds": {
                "type": ["array", "null"],
                "minItems": 1,
                "maxItems": crate::worker_in::MAX_KINDS,
                "items": name_schema(false),
            },
        }),
    );
    constrain("HeartbeatBody", json!({"token": token, "lease": lease}));
    constrain("CompleteBody", json!({"token": token}));
    constrain("ReleaseBody", json!({"token": token}));
    constrain("FailBody", fail_fields.clone());
    constrain("CompleteItem", json!({"id": id, "token": token}));
    let mut item = fail_fields;
    item["id"] = id;
    constrain("FailItem", item);
    for batch in ["CompleteManyBody", "FailManyBody"] {
        if let Some(s) = schemas.get_mut(batch) {
            s["properties"]["outcomes"]["minItems"] = json!(1);
            s["properties"]["outcomes"]["maxItems"] = json!(crate::worker_in::MAX_LEASE);
            s["additionalProperties"] = json!(false);
        }
    }
}

/// Replaces the named properties of an object schema, keeping their descriptions.
fn merge_properties(schema: &mut serde_json::Value, with: &serde_json::Value) {
    let Some(with) = with.as_object() else { return };
    for (name, constrained) in with {
        let slot = &mut schema["properties"][name];
        let description = slot.get("description").cloned();
        let mut constrained = constrained.clone();
        if let Some(d) = description {
            constrained["description"] = d;
        }
        *slot = constrained;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::routes::ROUTES;

    /// Every (method, path) the document describes.
    fn documented() -> BTreeSet<(String, String)> {
        let doc = api_doc();
        let mut out = BTreeSet::new();
        for (path, item) in &doc.paths.paths {
            let ops = [
                ("get", item.get.is_some()),
                ("post", item.post.is_some()),
                ("put", item.put.is_some()),
                ("delete", item.delete.is_some()),
                ("patch", item.patch.is_some()),
            ];
            for (method, present) in ops {
                if present {
                    out.insert((method.to_owned(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn the_document_describes_exactly_the_served_routes() {
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        let documented = documented();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "served but not documented: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "documented but not served: {unserved:?}"
        );
        assert_eq!(served.len(), ROUTES.len(), "a route is listed twice");
    }

    #[test]
    fn the_document_serialises() {
        let json = api_doc().to_json().unwrap();
        assert!(json.contains("\"/v1/jobs/{id}/result\""));
        assert!(json.contains("\"/v1/schedules/{name}/pause\""));
        assert!(json.contains("Keel-Unique-Conflict"));
        assert!(json.contains("\"bearer\""));
    }

    #[test]
    fn every_keyed_operation_documents_the_protection_answers() {
        let doc = api_doc();
        let enqueue = doc.paths.paths["/v1/jobs"].post.as_ref().unwrap();
        for code in ["429", "503", "504"] {
            assert!(enqueue.responses.responses.contains_key(code), "{code}");
        }
        let health = doc.paths.paths["/healthz"].get.as_ref().unwrap();
        assert!(!health.responses.responses.contains_key("429"));
    }
}
