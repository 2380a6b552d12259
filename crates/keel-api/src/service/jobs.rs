//! The job steps behind the API: enqueue (idempotency record, unique holders, the
//! enqueue metric, the wakeup of the queue's dispatcher or waiting workers), reads as the
//! caller may see them, cancel and retry (cache invalidation, events, the running job's
//! token), and `POST /v1/process`'s wait for the job's end. The HTTP routes parse and
//! render around these; `render` callbacks let them choose the bytes an idempotent
//! response stores.

use keel_core::store::{IdempotentInsert, IdempotentOutcome, JobPage, ListParams, StoredResponse};
use keel_core::{IdempotencyKey, Job, JobId, JobState, NewJob, QueueName, TenantId};
use keel_resilience::{RequestScope, Step};
use keel_runtime::JobEvent;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{Instant, MissedTickBehavior};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::ApiState;

/// The tenant a listing is filtered to: a tenant-bound caller lists only its own jobs
/// (naming another tenant is refused); an operator lists the tenant it names, or all.
pub fn listing_scope(
    caller: &Caller,
    named: Option<TenantId>,
) -> Result<Option<TenantId>, ApiError> {
    match caller.scope() {
        None => Ok(named),
        Some(_) => caller.tenant_for(named).map(Some),
    }
}

/// A page of jobs, as the caller may see them (see [`listing_scope`]).
pub async fn list(
    state: &ApiState,
    caller: &Caller,
    mut params: ListParams,
) -> Result<JobPage, ApiError> {
    params.tenant = listing_scope(caller, params.tenant)?;
    Ok(state.store.list(params).await?)
}

/// What an enqueue asked the store to do.
pub(crate) struct InsertRequest<'a> {
    /// The route, part of the idempotency fingerprint: one key cannot be reused across
    /// endpoints.
    pub(crate) route: &'static str,
    /// The tenant the idempotency key belongs to.
    pub(crate) tenant: TenantId,
    /// The client's `Idempotency-Key`, if any.
    pub(crate) key: Option<IdempotencyKey>,
    /// The exact request body, hashed into the fingerprint.
    pub(crate) body: &'a [u8],
    /// The parsed, validated jobs.
    pub(crate) jobs: Vec<NewJob>,
    /// Builds the response from the stored jobs and the ids that were asked for (a unique
    /// job whose key was held comes back as the holder, with another id). With a key it
    /// runs inside the insert transaction, so what is stored is exactly what the first
    /// caller receives.
    pub(crate) render: fn(&[Job], &[JobId]) -> StoredResponse,
}

/// What an enqueue did.
pub(crate) enum Inserted {
    /// New jobs; `response` is their rendering (stored with the key, if any).
    Created {
        jobs: Vec<Job>,
        response: StoredResponse,
    },
    /// The key was seen before with the same request: the original response.
    Replayed(StoredResponse),
}

/// The idempotency fingerprint: hex SHA-256 over method, route, tenant and the raw body,
/// each length-prefixed so no two different requests hash the same input.
fn fingerprint(route: &str, tenant: &TenantId, body: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [
        b"POST".as_slice(),
        route.as_bytes(),
        tenant.as_str().as_bytes(),
        body,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    hex::encode(h.finalize())
}

/// Inserts the jobs, through the idempotency record when a key was sent, and wakes the
/// dispatchers of their queues.
pub(crate) async fn insert_jobs(
    state: &ApiState,
    req: InsertRequest<'_>,
) -> Result<Inserted, ApiError> {
    let requested: Vec<JobId> = req.jobs.iter().map(|j| j.id).collect();
    let render = req.render;
    let inserted = match req.key {
        None => {
            let jobs = state.store.insert(req.jobs).await?;
            let response = render(&jobs, &requested);
            Inserted::Created { jobs, response }
        }
        Some(key) => {
            let asked = requested.clone();
            let insert = IdempotentInsert {
                fingerprint: fingerprint(req.route, &req.tenant, req.body),
                tenant: req.tenant,
                key,
                jobs: req.jobs,
                ttl: state.config.idempotency_ttl,
                respond: Box::new(move |jobs: &[Job]| render(jobs, &asked)),
            };
            match state.store.insert_idempotent(insert).await {
                Ok(IdempotentOutcome::Created { jobs, response }) => {
                    Inserted::Created { jobs, response }
                }
                Ok(IdempotentOutcome::Replayed(response)) => Inserted::Replayed(response),
                // Fresh UUIDv7 ids cannot collide, so the only conflict here is the key.
                Err(keel_core::StoreError::Conflict(detail)) => {
                    return Err(ApiError::IdempotencyKeyReused(detail));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    if let Inserted::Created { jobs, .. } = &inserted {
        let mut woken: Vec<&QueueName> = Vec::new();
        // A unique job's holder was not enqueued now: neither counted nor worth a wakeup.
        let new = jobs
            .iter()
            .zip(&requested)
            .filter(|(job, asked)| job.id == **asked)
            .map(|(job, _)| job);
        for job in new {
            // Bounded labels: a queue served here or `other`, a kind with a handler here or
            // `other`; clients choose the names, so they are never labels themselves.
            let catalog = &state.runtime.catalog;
            metrics::counter!(
                "keel_jobs_enqueued_total",
                "queue" => catalog.queue_label(&job.queue).to_owned(),
                "kind" => catalog.kind_label(&job.kind).to_owned()
            )
            .increment(1);
            if !woken.contains(&&job.queue) {
                state.runtime.wakeups.job_available(&job.queue);
                woken.push(&job.queue);
            }
        }
    }
    Ok(inserted)
}

/// Reads a job the caller may see, through the job cache; another tenant's job is "not
/// found" (checked on every answer, cached or not: the cache holds every tenant's jobs).
pub(crate) async fn visible_job(
    state: &ApiState,
    caller: &Caller,
    id: JobId,
) -> Result<Job, ApiError> {
    let job = state.job_cache.get(&state.store, id).await?;
    if caller.may_see(&job.tenant) {
        Ok(job)
    } else {
        Err(ApiError::job_not_found(id))
    }
}

/// A job's result as far as it goes: the job once completed, or while still on its way; a
/// discarded or cancelled job has none (`JobNotCompleted`, with a discarded job's last
/// error).
pub(crate) async fn result(state: &ApiState, caller: &Caller, id: JobId) -> Result<Job, ApiError> {
    let job = visible_job(state, caller, id).await?;
    match job.state {
        JobState::Discarded => {
            let last = job.errors.last().map_or_else(
                || "no error was recorded".to_owned(),
                |e| format!("last error (attempt {}): {}", e.attempt, e.message),
            );
            Err(ApiError::JobNotCompleted {
                job_id: id,
                state: job.state,
                detail: format!("job {id} was discarded and has no result; {last}"),
            })
        }
        JobState::Cancelled => Err(ApiError::JobNotCompleted {
            job_id: id,
            state: job.state,
            detail: format!("job {id} was cancelled and has no result"),
        }),
        JobState::Scheduled
        | JobState::Available
        | JobState::Running
        | JobState::Retryable
        | JobState::Completed => Ok(job),
    }
}

/// Checks the caller may act on job `id` (only needed when the caller is tenant-bound). A
/// cached read is enough: a job never changes tenant.
async fn check_scope(state: &ApiState, caller: &Caller, id: JobId) -> Result<(), ApiError> {
    if caller.scope().is_some() {
        visible_job(state, caller, id).await?;
    }
    Ok(())
}

/// The id in a stored single-job response, for its `Location` on replay.
pub(crate) fn id_in_body(body: &[u8]) -> Option<JobId> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: JobId,
    }
    serde_json::from_slice::<IdOnly>(body).ok().map(|b| b.id)
}

/// Cancels a job that has not finished: the store revokes a running job's lease, and a
/// job running in this process has its token cancelled.
pub async fn cancel(state: &ApiState, caller: &Caller, id: JobId) -> Result<Job, ApiError> {
    check_scope(state, caller, id).await?;
    let cancelled = state.store.cancel(id).await;
    // Before answering, whatever the outcome (a refusal says the job finished meanwhile):
    // the caller's next read must not show the job as it was.
    state.job_cache.invalidate(id).await;
    let job = cancelled?;
    state.runtime.running.cancel(id);
    state.runtime.events.publish(JobEvent::of(&job));
    Ok(job)
}

/// Makes a scheduled, retryable or finished job available now, and wakes its queue.
pub async fn retry(state: &ApiState, caller: &Caller, id: JobId) -> Result<Job, ApiError> {
    check_scope(state, caller, id).await?;
    let retried = state.store.retry(id).await;
    state.job_cache.invalidate(id).await;
    let job = retried?;
    state.runtime.wakeups.job_available(&job.queue);
    state.runtime.events.publish(JobEvent::of(&job));
    Ok(job)
}

/// `POST /v1/process`'s steps: enqueues the job (through [`insert_jobs`], so idempotency and
/// uniqueness apply) and waits until the job it names reaches a terminal state, woken by
/// job events (any replica's, on Postgres) with a re-read every `process_poll` in case an
/// event was missed. Gives up at `give_up` with a `504` naming the job, which keeps
/// running. Returns the finished job and whether it is the holder of the request's unique
/// key rather than the job asked for (`asked`).
pub(crate) async fn process(
    state: &ApiState,
    req: InsertRequest<'_>,
    asked: JobId,
    give_up: Instant,
) -> Result<(Job, bool), ApiError> {
    // Subscribe before inserting: an event published between the insert and the
    // subscription would otherwise be missed.
    let mut events = state.runtime.events.subscribe();
    let mut job: Option<Job> = None;
    // `held`: whether the job waited on is the holder of the request's unique key.
    let (id, held) = match insert_jobs(state, req).await? {
        Inserted::Created { jobs, .. } => {
            let first = jobs.into_iter().next();
            let id = first.as_ref().map(|j| j.id);
            job = first;
            (id, id.is_some_and(|id| id != asked))
        }
        // The stored answer is `200` exactly when the first request met a holder.
        Inserted::Replayed(response) => (id_in_body(&response.body), response.status == 200),
    };
    let id = id.ok_or_else(|| ApiError::internal("the enqueue response names no job"))?;

    let timed_out = |step: Step| {
        metrics::counter!("keel_requests_deadline_exceeded_total", "step" => step.as_str())
            .increment(1);
        ApiError::DeadlineExceeded {
            job_id: Some(id),
            step: Some(step),
        }
    };
    let store = &state.store;
    let reread = |id: JobId| async move {
        tokio::time::timeout_at(give_up, store.get(id))
            .await
            .map_err(|_| timed_out(Step::Store))?
            .map_err(ApiError::from)
    };
    let mut job = match job {
        Some(j) => j,
        None => reread(id).await?,
    };
    let every = state.config.process_poll;
    let mut poll = tokio::time::interval_at(Instant::now() + every, every);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut events_open = true;
    while !job.state.is_finished() {
        // Re-entered on every turn: a re-read marks the request as in the store.
        RequestScope::enter_current(Step::WaitJob);
        tokio::select! {
            () = tokio::time::sleep_until(give_up) => return Err(timed_out(Step::WaitJob)),
            ev = events.recv(), if events_open => match ev {
                Ok(ev) if ev.id == id && ev.state.is_finished() => job = reread(id).await?,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => job = reread(id).await?,
                Err(RecvError::Closed) => events_open = false,
            },
            _ = poll.tick() => job = reread(id).await?,
        }
    }
    Ok((job, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_separate_every_input() {
        let t = TenantId::default();
        let other = TenantId::parse("other").unwrap();
        let a = fingerprint("/v1/jobs", &t, b"{}");
        assert_eq!(a, fingerprint("/v1/jobs", &t, b"{}"));
        assert_ne!(a, fingerprint("/v1/jobs/batch", &t, b"{}"));
        assert_ne!(a, fingerprint("/v1/jobs", &other, b"{}"));
        assert_ne!(a, fingerprint("/v1/jobs", &t, b"{ }"));
        assert_eq!(a.len(), 64);
    }
}
