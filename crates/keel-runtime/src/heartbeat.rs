//! Lease renewal: every `heartbeat_every`, one batched store call extends the lease of every
//! job running here. A lease the store no longer recognises means the job was cancelled or
//! rescued after its lease lapsed (a stall longer than `lease_for`); its token is cancelled
//! so the handler stops duplicating work another worker may now be doing.

use std::sync::Arc;

use keel_core::store::{HeartbeatParams, LeaseRef};
use keel_core::{Job, JobState, StoreError};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::inflight::StopCause;
use crate::runtime::Shared;
use crate::telemetry;

/// Runs until `stop` fires, which the runtime does only once every job has ended, so
/// leases stay alive through the whole shutdown grace period.
pub(crate) async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let every = shared.config.heartbeat_every;
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = tick.tick() => beat(&shared).await,
        }
    }
    tracing::debug!("heartbeats stopped");
}

async fn beat(shared: &Shared) {
    let leases = shared.handle.running.leases();
    if leases.is_empty() {
        return;
    }
    let answer = shared
        .store
        .heartbeat(HeartbeatParams {
            leases: leases.clone(),
            lease_for: shared.config.lease_for,
        })
        .await;
    match answer {
        // The leases are still ours until they expire; the next tick tries again.
        Err(e) => {
            telemetry::store_error("heartbeat");
            telemetry::report_store_error(&format!("extending {} leases", leases.len()), &e);
        }
        Ok(results) => {
            for (lease, result) in leases.into_iter().zip(results) {
                match result {
                    Ok(_) => {}
                    Err(StoreError::StaleLease(_) | StoreError::NotFound(_)) => {
                        lost(shared, lease).await;
                    }
                    Err(e) => {
                        telemetry::store_error("heartbeat");
                        telemetry::report_store_error("extending a lease", &e);
                    }
                }
            }
        }
    }
}

/// Stops a job whose lease is gone, telling a user's cancel from a lapsed lease.
async fn lost(shared: &Shared, lease: LeaseRef) {
    // Already writing its outcome: the stale answer only means that write got there first.
    let Some(running) = shared.handle.running.still_running(lease) else {
        return;
    };
    let cancelled = matches!(
        shared.store.get(lease.id).await,
        Ok(Job {
            state: JobState::Cancelled,
            ..
        })
    );
    let cause = if cancelled {
        StopCause::Cancelled
    } else {
        StopCause::LeaseLost
    };
    if running.cause.set(cause).is_ok() {
        if cancelled {
            tracing::info!(job_id = %lease.id, queue = %running.queue, "job was cancelled; stopping it");
        } else {
            telemetry::lease_lost(&running.queue);
            tracing::warn!(
                job_id = %lease.id,
                queue = %running.queue,
                "job's lease was lost (it expired and was rescued); stopping it, it may run again elsewhere"
            );
        }
    }
    running.token.cancel();
}
