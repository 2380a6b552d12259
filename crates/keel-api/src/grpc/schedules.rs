//! `keel.v1.ScheduleService`: the `/v1/schedules` routes over gRPC, a thin adapter over
//! [`crate::service::schedules`]. A schedule message becomes the body `schedule_in` reads
//! and a request's tenant, cursor and limit the query `schedule_query` reads, so both
//! transports check them with the same parsers and messages.

use chrono::Utc;
use keel_core::{FieldError, ScheduleName};
use keel_wire::ScheduleOut;
use tonic::{Request, Response, Status};

use super::call::{Core, Kind};
use super::convert::{self, Problems};
use super::pb;
use super::pb::schedule_service_server::ScheduleService;
use crate::error::ApiError;
use crate::routes::jobs::job_context;
use crate::routes::schedules::{ScheduleQuery, schedule_query};
use crate::schedule_in::parse_schedule;
use crate::service::schedules as service;

/// The `keel.v1.ScheduleService` implementation.
#[derive(Clone)]
pub(crate) struct Schedules(pub(crate) Core);

fn show(s: keel_core::Schedule) -> pb::Schedule {
    ScheduleOut::at(s, Utc::now()).into()
}

fn name_of(name: &str) -> Result<ScheduleName, ApiError> {
    ScheduleName::parse(name).map_err(|e| {
        ApiError::Validation(vec![FieldError {
            field: "name".to_owned(),
            message: e.reason,
        }])
    })
}

/// The query HTTP would have received: `tenant`, and when listing `after` and `limit`.
fn query(
    tenant: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
    listing: bool,
) -> Result<ScheduleQuery, ApiError> {
    let pairs = [
        ("tenant", tenant),
        ("after", after),
        ("limit", limit.map(|n| n.to_string())),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_owned(), v?)))
    .collect();
    schedule_query(pairs, listing)
}

/// A schedule by name, in the tenant the request names or the caller's.
fn reference(r: pb::ScheduleRef) -> Result<(ScheduleName, ScheduleQuery), ApiError> {
    Ok((name_of(&r.name)?, query(r.tenant, None, None, false)?))
}

fn spec_required() -> Status {
    ApiError::Validation(vec![FieldError {
        field: "schedule".to_owned(),
        message: "is required".to_owned(),
    }])
    .into()
}

#[tonic::async_trait]
impl ScheduleService for Schedules {
    async fn create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, m, _| async move {
                let spec = m.schedule.ok_or_else(spec_required)?;
                let mut problems = Problems::new(String::new());
                let body = convert::schedule_body(spec, &mut problems);
                let state = &self.0.state;
                let new = convert::checked(
                    parse_schedule(&body, &job_context(state, &caller), None),
                    problems.list,
                )?;
                let (schedule, _) = service::save(state, new, false).await?;
                Ok(show(schedule))
            })
            .await
    }

    async fn put_schedule(
        &self,
        request: Request<pb::PutScheduleRequest>,
    ) -> Result<Response<pb::PutScheduleResponse>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, m, _| async move {
                let name = name_of(&m.name)?;
                let spec = m.schedule.ok_or_else(spec_required)?;
                let mut problems = Problems::new(String::new());
                let body = convert::schedule_body(spec, &mut problems);
                let state = &self.0.state;
                let new = convert::checked(
                    parse_schedule(&body, &job_context(state, &caller), Some(&name)),
                    problems.list,
                )?;
                let (schedule, created) = service::save(state, new, true).await?;
                Ok(pb::PutScheduleResponse {
                    schedule: Some(show(schedule)),
                    created,
                })
            })
            .await
    }

    async fn get_schedule(
        &self,
        request: Request<pb::ScheduleRef>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, m, _| async move {
                let (name, q) = reference(m)?;
                let schedule = service::get(&self.0.state, &caller, q.tenant, &name).await?;
                Ok(show(schedule))
            })
            .await
    }

    async fn list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, m, _| async move {
                let q = query(m.tenant, m.after, m.limit, true)?;
                let page =
                    service::list(&self.0.state, &caller, q.tenant, q.after, q.limit).await?;
                Ok(pb::ListSchedulesResponse {
                    schedules: page.schedules.into_iter().map(show).collect(),
                    next: page.next.map(String::from),
                })
            })
            .await
    }

    async fn delete_schedule(
        &self,
        request: Request<pb::ScheduleRef>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, m, _| async move {
                let (name, q) = reference(m)?;
                service::delete(&self.0.state, &caller, q.tenant, &name).await?;
                Ok(pb::DeleteScheduleResponse {})
            })
            .await
    }

    async fn pause_schedule(
        &self,
        request: Request<pb::ScheduleRef>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.set_paused(request, true).await
    }

    async fn resume_schedule(
        &self,
        request: Request<pb::ScheduleRef>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.set_paused(request, false).await
    }
}

impl Schedules {
    async fn set_paused(
        &self,
        request: Request<pb::ScheduleRef>,
        paused: bool,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.0
            .serve(request, Kind::Read, |caller, _, m, _| async move {
                let (name, q) = reference(m)?;
                let schedule =
                    service::set_paused(&self.0.state, &caller, q.tenant, &name, paused).await?;
                Ok(show(schedule))
            })
            .await
    }
}
