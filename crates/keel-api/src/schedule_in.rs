//! Turning a schedule body ([`keel_wire::ScheduleIn`]) into a [`NewSchedule`], reporting
//! every problem at once: the body's shape problems (as `job_in` does for jobs, with the
//! template's under `job.*`), then [`NewSchedule::validate`]'s checks (cron expression, time
//! zone, the template's bounds, the catch-up window) for every field that parsed.

use keel_core::{FieldError, JobKind, JobTemplate, NewSchedule, ScheduleName, TenantId};
use keel_wire::ScheduleIn;

use crate::error::ApiError;
use crate::job_in::{self, JobContext};
use crate::wire_in::{Errors, Members, members_of_body, read_members};

/// Parses the body of `POST /v1/schedules` (`path_name` `None`: the body names it) or
/// `PUT /v1/schedules/{name}` (`path_name` given: the body may repeat it, not change it).
pub(crate) fn parse_schedule(
    body: &[u8],
    cx: &JobContext<'_>,
    path_name: Option<&ScheduleName>,
) -> Result<NewSchedule, ApiError> {
    let members = members_of_body(body)?;
    let mut errs = Errors::new("");
    // The template is read as a job is (its problems under `job.*`); the rest as a
    // schedule.
    let (jobs, rest): (Vec<_>, Vec<_>) = members.0.into_iter().partition(|(n, _)| n == "job");
    let text = if jobs.is_empty() {
        std::str::from_utf8(body).ok()
    } else {
        None
    };
    let read = read_members::<ScheduleIn>(Members(rest), text, &mut errs);
    let cron_given = read.has("cron");
    let body = read.value;
    let mut name = path_name.cloned();
    match (body.name.map(ScheduleName::parse), path_name) {
        (Some(Ok(n)), Some(p)) if &n != p => errs.add(
            "name",
            format!("must match the name in the path ({p}), got {n}"),
        ),
        (Some(Ok(n)), _) => name = Some(n),
        (Some(Err(e)), _) => errs.add("name", e.reason),
        (None, _) => {}
    }
    // `null` counts as not given: a schedule needs its name (`POST` takes it from the body).
    if name.is_none() && !errs.names("name") {
        errs.add("name", "is required");
    }
    let tenant = body.tenant.and_then(|t| {
        TenantId::parse(t)
            .map_err(|e| errs.add("tenant", e.reason))
            .ok()
    });
    if !cron_given {
        errs.add("cron", "is required");
    }
    let cron = (cron_given && !errs.names("cron")).then_some(body.cron);
    let mut template = None;
    match jobs.as_slice() {
        [] => errs.add("job", "is required (at least {\"kind\": \"...\"})"),
        [(_, raw)] => template = job_in::parse_template(raw, cx, &mut errs.list),
        [(_, raw), ..] => {
            template = job_in::parse_template(raw, cx, &mut errs.list);
            errs.add("job", "duplicate field");
        }
    }
    let timezone = body.timezone.unwrap_or_else(|| "UTC".to_owned());
    let paused = body.paused.unwrap_or(false);
    let catch_up = body.catch_up.map_or(NewSchedule::DEFAULT_CATCH_UP, |d| d.0);
    let tenant = cx.caller.tenant_for(tenant)?;
    let schedule = NewSchedule {
        tenant,
        name: name.unwrap_or_default(),
        cron: cron.clone().unwrap_or_default(),
        timezone,
        job: template
            .clone()
            .unwrap_or_else(|| JobTemplate::new(JobKind::default())),
        paused,
        catch_up,
    };
    if let Err(v) = schedule.validate(cx.max_args_bytes) {
        // A field that already failed to parse holds a stand-in; do not report it twice.
        let failed: Vec<String> = errs.list.iter().map(|e| e.field.clone()).collect();
        let skip_cron = cron.is_none();
        let skip_job = template.is_none();
        for e in v.0 {
            // The API names the timeout field after its unit, as for jobs.
            let field = if e.field == "job.timeout" {
                "job.timeout_ms".to_owned()
            } else {
                e.field
            };
            let stand_in = (skip_cron && field == "cron") || (skip_job && field.starts_with("job"));
            if !stand_in && !failed.contains(&field) {
                errs.list.push(FieldError {
                    field,
                    message: e.message,
                });
            }
        }
    }
    if errs.list.is_empty() {
        Ok(schedule)
    } else {
        Err(ApiError::Validation(errs.list))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auth::Caller;
    use crate::error::validation_fields as fields;

    static NO_CATALOG: std::sync::LazyLock<keel_runtime::Catalog> =
        std::sync::LazyLock::new(keel_runtime::Catalog::default);

    fn cx(caller: &Caller) -> JobContext<'_> {
        JobContext {
            caller,
            catalog: &NO_CATALOG,
            max_args_bytes: 1024,
            now: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_full_schedule_parses_with_defaults_filled_in() {
        let open = Caller::unrestricted();
        let s = parse_schedule(
            br#"{"name":"nightly","cron":"0 3 * * *","timezone":"Europe/Paris",
                "job":{"kind":"webhook","args":{"url":"https://example.com"},"timeout_ms":5000},
                "catch_up":"30m"}"#,
            &cx(&open),
            None,
        )
        .unwrap();
        assert_eq!(s.name.as_str(), "nightly");
        assert_eq!(s.tenant.as_str(), "default");
        assert_eq!(s.job.kind.as_str(), "webhook");
        assert_eq!(s.job.args.get(), r#"{"url":"https://example.com"}"#);
        assert_eq!(s.job.timeout, Duration::from_secs(5));
        assert_eq!(s.job.max_attempts, keel_core::NewJob::DEFAULT_MAX_ATTEMPTS);
        assert_eq!(s.catch_up, Duration::from_secs(30 * 60));
        assert!(!s.paused);

        let path = ScheduleName::parse("from-path").unwrap();
        let s = parse_schedule(
            br#"{"cron":"@daily","job":{"kind":"noop"}}"#,
            &cx(&open),
            Some(&path),
        )
        .unwrap();
        assert_eq!(s.name.as_str(), "from-path");
        assert_eq!(s.timezone, "UTC");
        assert_eq!(s.catch_up, NewSchedule::DEFAULT_CATCH_UP);
    }

    #[test]
    fn every_problem_is_reported_once() {
        let open = Caller::unrestricted();
        let got = fields(
            parse_schedule(
                br#"{"cron":"61 * * * *","timezone":"Mars/Olympus","paused":"yes",
                    "job":{"priority":12,"max_attempts":0,"timeout_ms":0,"run_at":"x"},
                    "catch_up":"8d","colour":1}"#,
                &cx(&open),
                None,
            )
            .unwrap_err(),
        );
        let mut want = vec![
            "paused",
            "job.priority",
            "job.run_at",
            "job.kind",
            "catch_up",
            "colour",
            "name",
            "cron",
            "timezone",
            "job.max_attempts",
            "job.timeout_ms",
        ];
        let mut got_sorted = got.clone();
        got_sorted.sort();
        want.sort();
        assert_eq!(got_sorted, want, "{got:?}");
    }

    #[test]
    fn missing_required_fields_and_a_name_that_contradicts_the_path() {
        let open = Caller::unrestricted();
        assert_eq!(
            fields(parse_schedule(b"{}", &cx(&open), None).unwrap_err()),
            ["name", "cron", "job"]
        );
        let path = ScheduleName::parse("a").unwrap();
        assert_eq!(
            fields(
                parse_schedule(
                    br#"{"name":"b","cron":"* * * * *","job":{"kind":"noop"}}"#,
                    &cx(&open),
                    Some(&path)
                )
                .unwrap_err()
            ),
            ["name"]
        );
    }

    #[test]
    fn another_tenant_is_forbidden() {
        let acme = Caller::tenant(TenantId::parse("acme").unwrap());
        let e = parse_schedule(
            br#"{"name":"n","tenant":"other","cron":"* * * * *","job":{"kind":"noop"}}"#,
            &cx(&acme),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, ApiError::Forbidden(_)), "{e:?}");
    }
}
