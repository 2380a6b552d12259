//! The job steps behind the API: enqueue (idempotency record, unique holders, the
//! enqueue metric, the wakeup of the queue's dispatcher or waiting workers), reads as the
//! caller may see them, cancel and retry (cache invalidation, events, the running job's
//! token). The HTTP routes parse and render around these; `render` callbacks let them
//! choose the bytes an idempotent response stores.

use keel_core::store::{IdempotentInsert, IdempotentOutcome, StoredResponse};
use keel_core::{IdempotencyKey, Job, JobId, NewJob, QueueName, TenantId};
use keel_runtime::JobEvent;
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::ApiState;

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

/// Checks the caller may act on job `id` (only needed when the caller is tenant-bound). A
/// cached read is enough: a job never changes tenant.
async fn check_scope(state: &ApiState, caller: &Caller, id: JobId) -> Result<(), ApiError> {
    if caller.scope().is_some() {
        visible_job(state, caller, id).await?;
    }
    Ok(())
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
