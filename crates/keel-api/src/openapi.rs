//! The OpenAPI document served at `/v1/openapi.json`, generated from the handlers'
//! `#[utoipa::path]` attributes and the DTOs' schemas, and checked against the route table
//! by a test.

use utoipa::openapi::content::Content;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{Object, Ref, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{RefOr, Response};
use utoipa::{Modify, OpenApi};

use crate::dto;
use crate::error::{Problem, ProblemField};
use crate::routes::{health, jobs, process, queues, schedules};

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
                if op.security.is_none() {
                    continue;
                }
                let responses = &mut op.responses.responses;
                responses.entry("429".to_owned()).or_insert_with(|| {
                    problem_response(
                        "Rate limit of the tenant or API key exceeded (RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset describe the bucket)",
                        true,
                    )
                });
                responses.entry("503".to_owned()).or_insert_with(|| {
                    problem_response(
                        "Overloaded (shed by admission control) or a dependency is unavailable",
                        true,
                    )
                });
                responses.entry("504".to_owned()).or_insert_with(|| {
                    problem_response(
                        "Deadline exceeded; `detail` names the step the request was in",
                        false,
                    )
                });
            }
        }
    }
}

/// Keel's HTTP API description. `ApiDoc::openapi()` builds it.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Keel",
        description = "A durable job server. Errors are application/problem+json (RFC 9457). Every response carries X-Request-Id."
    ),
    paths(
        health::get_health,
        health::get_ready,
        health::get_metrics,
        health::get_openapi,
        jobs::enqueue_job,
        jobs::list_jobs,
        jobs::enqueue_batch,
        jobs::get_job,
        jobs::get_job_result,
        jobs::cancel_job,
        jobs::retry_job,
        process::process_job,
        queues::list_queues,
        queues::pause_queue,
        queues::resume_queue,
        schedules::create_schedule,
        schedules::list_schedules,
        schedules::put_schedule,
        schedules::get_schedule,
        schedules::delete_schedule,
        schedules::pause_schedule,
        schedules::resume_schedule,
    ),
    components(schemas(
        dto::JobIn,
        dto::UniqueIn,
        dto::UniqueOut,
        dto::BatchIn,
        dto::JobOut,
        dto::BatchOut,
        dto::JobPageOut,
        dto::JobResultOut,
        dto::QueueOut,
        dto::QueuePausedOut,
        dto::ScheduleIn,
        dto::JobTemplateIn,
        dto::JobTemplateOut,
        dto::ScheduleOut,
        dto::SchedulePageOut,
        dto::HealthOut,
        dto::ReadyOut,
        Problem,
        ProblemField,
    )),
    modifiers(&BearerAuth, &ProtectionResponses),
    tags(
        (name = "jobs", description = "Enqueue, inspect and control jobs"),
        (name = "queues", description = "Queue statistics, pause and resume"),
        (name = "schedules", description = "Cron schedules: each tick enqueues one job, exactly once"),
        (name = "probes", description = "Health, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::routes::ROUTES;

    /// Every (method, path) the document describes.
    fn documented() -> BTreeSet<(String, String)> {
        let doc = ApiDoc::openapi();
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
        let json = ApiDoc::openapi().to_json().unwrap();
        assert!(json.contains("\"/v1/jobs/{id}/result\""));
        assert!(json.contains("\"/v1/schedules/{name}/pause\""));
        assert!(json.contains("Keel-Unique-Conflict"));
        assert!(json.contains("\"bearer\""));
    }

    #[test]
    fn every_keyed_operation_documents_the_protection_answers() {
        let doc = ApiDoc::openapi();
        let enqueue = doc.paths.paths["/v1/jobs"].post.as_ref().unwrap();
        for code in ["429", "503", "504"] {
            assert!(enqueue.responses.responses.contains_key(code), "{code}");
        }
        let health = doc.paths.paths["/healthz"].get.as_ref().unwrap();
        assert!(!health.responses.responses.contains_key("429"));
    }
}
