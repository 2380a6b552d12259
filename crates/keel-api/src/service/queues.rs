//! The queue steps behind the API: counts as the caller may see them, and pausing and
//! resuming, which only an operator may do (a queue serves every tenant).

use keel_core::QueueName;
use keel_core::store::QueueStats;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::ApiState;

/// Queues with their counts: every queue for an operator, the queues holding a tenant's
/// jobs (counting only those) for a tenant key.
pub async fn stats(state: &ApiState, caller: &Caller) -> Result<Vec<QueueStats>, ApiError> {
    Ok(state.store.queue_stats(caller.scope().cloned()).await?)
}

/// One queue with its counts: every job in it for an operator, only the tenant's own for a
/// tenant key. Any valid name answers (a queue nobody used has zero counts).
pub async fn stats_of(
    state: &ApiState,
    caller: &Caller,
    queue: &QueueName,
) -> Result<QueueStats, ApiError> {
    Ok(state
        .store
        .queue_stats_of(queue.clone(), caller.scope().cloned())
        .await?)
}

/// Stops (`paused`) or restarts leasing from `queue`. A resumed queue's dispatcher and
/// waiting external workers are woken, so its jobs start at once.
pub async fn set_paused(
    state: &ApiState,
    caller: &Caller,
    queue: &QueueName,
    paused: bool,
) -> Result<(), ApiError> {
    caller.require_operator(if paused {
        "pausing a queue"
    } else {
        "resuming a queue"
    })?;
    state.store.set_queue_paused(queue.clone(), paused).await?;
    if !paused {
        state.runtime.wakeups.job_available(queue);
    }
    Ok(())
}
