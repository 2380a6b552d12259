//! The schedule steps behind the API: create, replace, read, list (with its cursor),
//! delete, pause and resume, each for the tenant the caller may act for. Enqueuing the
//! ticks is the maintenance leader's job (keel-runtime), not the API's.

use keel_core::{NewSchedule, Schedule, ScheduleName, TenantId};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::ApiState;

/// One page of a tenant's schedules, by name.
pub struct SchedulePage {
    /// The schedules.
    pub schedules: Vec<Schedule>,
    /// The cursor of the next page (the last name), when this one is full.
    pub next: Option<ScheduleName>,
}

/// Creates `new` (`409` if the name is taken) or, with `replace`, creates or replaces it;
/// says whether it was created. The caller's tenant was decided while parsing.
pub async fn save(
    state: &ApiState,
    new: NewSchedule,
    replace: bool,
) -> Result<(Schedule, bool), ApiError> {
    Ok(state.store.save_schedule(new, replace).await?)
}

/// A page of the schedules of the tenant the caller names (or its own), after `after`.
pub async fn list(
    state: &ApiState,
    caller: &Caller,
    tenant: Option<TenantId>,
    after: Option<ScheduleName>,
    limit: u32,
) -> Result<SchedulePage, ApiError> {
    let tenant = caller.tenant_for(tenant)?;
    let after = after.map(|name| (tenant.clone(), name));
    let schedules = state
        .store
        .list_schedules(Some(&tenant), after, limit)
        .await?;
    let full = schedules.len() == limit as usize;
    let next = schedules.last().filter(|_| full).map(|s| s.name.clone());
    Ok(SchedulePage { schedules, next })
}

/// One schedule of the tenant the caller names (or its own).
pub async fn get(
    state: &ApiState,
    caller: &Caller,
    tenant: Option<TenantId>,
    name: &ScheduleName,
) -> Result<Schedule, ApiError> {
    let tenant = caller.tenant_for(tenant)?;
    Ok(state.store.get_schedule(&tenant, name).await?)
}

/// Deletes a schedule; the jobs it enqueued stay.
pub async fn delete(
    state: &ApiState,
    caller: &Caller,
    tenant: Option<TenantId>,
    name: &ScheduleName,
) -> Result<(), ApiError> {
    let tenant = caller.tenant_for(tenant)?;
    Ok(state.store.delete_schedule(&tenant, name).await?)
}

/// Pauses (`paused`) or resumes a schedule.
pub async fn set_paused(
    state: &ApiState,
    caller: &Caller,
    tenant: Option<TenantId>,
    name: &ScheduleName,
    paused: bool,
) -> Result<Schedule, ApiError> {
    let tenant = caller.tenant_for(tenant)?;
    Ok(state
        .store
        .set_schedule_paused(&tenant, name, paused)
        .await?)
}
