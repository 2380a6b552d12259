//! [`QueueStore`] on SQLite: counts per queue and state (the depth gauges read only the
//! unfinished states' partial indexes) and the paused flag.

use std::sync::Arc;

use async_trait::async_trait;
use keel_core::store::{QueueStats, StateCounts};
use keel_core::{JobState, QueueName, QueueStore, StoreError, TenantId};
use rusqlite::{OptionalExtension, params};

use super::rows::micros;
use super::{SqliteStore, map_err, stats_with_flags};

#[async_trait]
impl QueueStore for SqliteStore {
    async fn queue_stats(&self, tenant: Option<TenantId>) -> Result<Vec<QueueStats>, StoreError> {
        self.read("reading queue statistics", move |conn| {
            let rows: Vec<(String, String, i64)> = match &tenant {
                None => conn
                    // Running jobs apart: the listing indexes leave them out.
                    .prepare_cached(
                        "SELECT queue, state, count(*) FROM jobs WHERE state <> 'running' \
                         GROUP BY queue, state \
                         UNION ALL \
                         SELECT queue, state, count(*) FROM jobs WHERE state = 'running' \
                         GROUP BY queue, state",
                    )
                    .and_then(|mut s| {
                        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                            .collect()
                    }),
                Some(t) => conn
                    .prepare_cached(
                        "SELECT queue, state, count(*) FROM jobs \
                         WHERE tenant = ?1 AND state <> 'running' GROUP BY queue, state \
                         UNION ALL \
                         SELECT queue, state, count(*) FROM jobs \
                         WHERE tenant = ?1 AND state = 'running' GROUP BY queue, state",
                    )
                    .and_then(|mut s| {
                        s.query_map([t.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                            .collect()
                    }),
            }
            .map_err(|e| map_err("reading queue statistics", &e))?;
            stats_with_flags(conn, rows, tenant.is_none())
        })
        .await
    }

    async fn queue_depths(&self) -> Result<Vec<QueueStats>, StoreError> {
        self.read("reading queue depths", move |conn| {
            let rows: Vec<(String, String, i64)> = conn
                .prepare_cached(crate::DEPTH_COUNTS)
                .and_then(|mut s| {
                    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect()
                })
                .map_err(|e| map_err("reading queue depths", &e))?;
            stats_with_flags(conn, rows, true)
        })
        .await
    }

    async fn queue_stats_of(
        &self,
        queue: QueueName,
        tenant: Option<TenantId>,
    ) -> Result<QueueStats, StoreError> {
        const CTX: &str = "reading a queue's statistics";
        self.read(CTX, move |conn| {
            let tenant = tenant.as_ref().map(TenantId::as_str);
            // Running jobs apart, as in the full statistics: the listing indexes leave them
            // out.
            let rows: Vec<(String, i64)> = conn
                .prepare_cached(
                    "SELECT state, count(*) FROM jobs \
                     WHERE queue = ?1 AND (?2 IS NULL OR tenant = ?2) AND state <> 'running' \
                     GROUP BY state \
                     UNION ALL \
                     SELECT state, count(*) FROM jobs \
                     WHERE queue = ?1 AND (?2 IS NULL OR tenant = ?2) AND state = 'running' \
                     GROUP BY state",
                )
                .and_then(|mut s| {
                    s.query_map(params![queue.as_str(), tenant], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect()
                })
                .map_err(|e| map_err(CTX, &e))?;
            let paused: Option<bool> = conn
                .prepare_cached("SELECT paused FROM queues WHERE name = ?1")
                .and_then(|mut s| s.query_row([queue.as_str()], |r| r.get(0)).optional())
                .map_err(|e| map_err(CTX, &e))?;
            let mut counts = StateCounts::default();
            for (state, n) in rows {
                let state: JobState = state
                    .parse()
                    .map_err(|e| StoreError::permanent("decoding stored state", e))?;
                counts.add(state, u64::try_from(n).unwrap_or(0));
            }
            Ok(QueueStats {
                queue,
                paused: paused.unwrap_or(false),
                counts,
            })
        })
        .await
    }

    async fn set_queue_paused(&self, queue: QueueName, paused: bool) -> Result<(), StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("pausing or resuming a queue", move |conn| {
                conn.prepare_cached(
                    "INSERT INTO queues (name, paused, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO UPDATE SET paused = excluded.paused,
                         updated_at = excluded.updated_at",
                )
                .and_then(|mut s| s.execute(params![queue.as_str(), paused, micros(clock.now())]))
                .map(|_| ())
                .map_err(|e| map_err("pausing or resuming a queue", &e))
            })
            .await
    }
}
