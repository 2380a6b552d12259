//! [`MaintenanceStore`] on SQLite: promote due jobs, rescue expired leases, and delete what
//! retention no longer keeps (finished jobs, expired idempotency keys, old tick records), each
//! in bounded batches on the writer thread.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use keel_core::store::{PromoteParams, Promoted, RescueParams, Rescued, RetentionParams};
use keel_core::{
    AttemptError, JobId, JobState, MaintenanceStore, QueueName, StoreError, Timestamp, Transition,
    WorkerId, next_attempt_at,
};
use rusqlite::params;

use super::rows::{micros, uuid_from_blob};
use super::{SqliteStore, map_err, schedules, state_guard};
use crate::codec;

#[async_trait]
impl MaintenanceStore for SqliteStore {
    async fn promote(&self, p: PromoteParams) -> Result<Vec<Promoted>, StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("promoting due jobs", move |conn| {
                let now = micros(clock.now());
                let mut stmt = conn
                    .prepare_cached(&PROMOTE_SQL)
                    .map_err(|e| map_err("promoting due jobs", &e))?;
                let queues = stmt
                    .query_map(params![now, p.limit], |r| r.get::<_, String>(0))
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| map_err("promoting due jobs", &e))?;
                let mut counts: BTreeMap<String, u64> = BTreeMap::new();
                for q in queues {
                    *counts.entry(q).or_default() += 1;
                }
                counts
                    .into_iter()
                    .map(|(q, count)| {
                        Ok(Promoted {
                            queue: QueueName::parse(q)
                                .map_err(|e| StoreError::permanent("decoding stored queue", e))?,
                            count,
                        })
                    })
                    .collect()
            })
            .await
    }

    async fn rescue(&self, p: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("rescuing expired leases", move |conn| {
                let now = clock.now();
                let expired: Vec<(Vec<u8>, String, Option<String>, u32, u32, String)> = conn
                    .prepare_cached(
                        "SELECT id, queue, lease_owner, attempt, max_attempts, backoff FROM jobs
                         WHERE state = 'running' AND lease_expires_at < ?1
                         ORDER BY lease_expires_at LIMIT ?2",
                    )
                    .and_then(|mut s| {
                        s.query_map(params![micros(now), p.limit], |r| {
                            Ok((
                                r.get(0)?,
                                r.get(1)?,
                                r.get(2)?,
                                r.get(3)?,
                                r.get(4)?,
                                r.get(5)?,
                            ))
                        })?
                        .collect()
                    })
                    .map_err(|e| map_err("finding expired leases", &e))?;
                let mut update = conn
                    .prepare_cached(
                        "UPDATE jobs SET state = ?1, run_at = ?2, finished_at = ?3,
                                errors = json_insert(errors, '$[#]', json(?4)),
                                lease_token = NULL, lease_expires_at = NULL
                         WHERE id = ?5 AND state = 'running'",
                    )
                    .map_err(|e| map_err("rescuing expired leases", &e))?;
                let mut rng = rand::rng();
                let mut out = Vec::with_capacity(expired.len());
                for (id, queue, owner, attempt, max_attempts, backoff) in expired {
                    let backoff = codec::backoff_from_json(&backoff)?;
                    let next =
                        next_attempt_at(attempt, max_attempts, &backoff, false, now, &mut rng);
                    let who = owner.as_deref().unwrap_or("unknown");
                    let error = codec::attempt_error_to_json(&AttemptError::new(
                        attempt,
                        now,
                        &format!("lease expired: worker {who} stopped renewing it"),
                    ));
                    let (state, run_at, finished_at) = match next {
                        Some(run_at) => (JobState::Retryable, micros(run_at), None),
                        None => (JobState::Discarded, micros(now), Some(micros(now))),
                    };
                    update
                        .execute(params![state.as_str(), run_at, finished_at, error, id])
                        .map_err(|e| map_err("rescuing expired leases", &e))?;
                    out.push(Rescued {
                        id: JobId::from_uuid(uuid_from_blob("id", &id)?),
                        queue: QueueName::parse(queue)
                            .map_err(|e| StoreError::permanent("decoding stored queue", e))?,
                        state,
                        owner: owner.and_then(|o| WorkerId::parse(o).ok()),
                    });
                }
                Ok(out)
            })
            .await
    }

    async fn delete_finished(&self, p: RetentionParams) -> Result<u64, StoreError> {
        self.writer
            .write("deleting finished jobs", move |conn| {
                conn.prepare_cached(&DELETE_FINISHED_SQL)
                    .and_then(|mut s| s.execute(params![micros(p.finished_before), p.limit]))
                    .map(|n| n as u64)
                    .map_err(|e| map_err("deleting finished jobs", &e))
            })
            .await
    }

    async fn delete_expired_idempotency_keys(&self, limit: u32) -> Result<u64, StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("deleting expired idempotency keys", move |conn| {
                conn.prepare_cached(
                    "DELETE FROM idempotency_keys WHERE rowid IN (
                         SELECT rowid FROM idempotency_keys WHERE expires_at <= ?1
                         ORDER BY expires_at LIMIT ?2)",
                )
                .and_then(|mut s| s.execute(params![micros(clock.now()), limit]))
                .map(|n| n as u64)
                .map_err(|e| map_err("deleting expired idempotency keys", &e))
            })
            .await
    }

    async fn delete_old_ticks(&self, before: Timestamp, limit: u32) -> Result<u64, StoreError> {
        self.writer
            .write("deleting old tick records", move |conn| {
                schedules::delete_old_ticks(conn, before, limit)
            })
            .await
    }
}

/// Makes up to ?2 jobs due by ?1 available, earliest first, from the states the state
/// machine promotes (`Transition::Promote`); one row per job, its queue, for the counts.
static PROMOTE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE jobs SET state = 'available'
         WHERE id IN (SELECT id FROM jobs WHERE {} AND run_at <= ?1 ORDER BY run_at LIMIT ?2)
         RETURNING queue",
        state_guard(Transition::Promote)
    )
});

/// Deletes up to ?2 jobs finished before ?1, oldest first. The states come from
/// `JobState::FINISHED`, so a new terminal state is cleaned up with the others.
static DELETE_FINISHED_SQL: LazyLock<String> = LazyLock::new(|| {
    let finished: Vec<String> = JobState::FINISHED
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!(
        "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs
             WHERE state IN ({}) AND finished_at < ?1 ORDER BY finished_at LIMIT ?2)",
        finished.join(", ")
    )
});
