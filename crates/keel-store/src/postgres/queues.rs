//! [`QueueStore`] on Postgres: counts per queue and state (the depth gauges read only the
//! unfinished states' partial indexes) and the paused flag.

use std::sync::LazyLock;

use async_trait::async_trait;
use keel_core::store::{QueueStats, StateCounts};
use keel_core::{QueueName, QueueStore, StoreError, TenantId};

use super::{PgStore, stats_from_rows};
use crate::DEPTH_COUNTS;

#[async_trait]
impl QueueStore for PgStore {
    async fn queue_stats(&self, tenant: Option<TenantId>) -> Result<Vec<QueueStats>, StoreError> {
        let ctx = || "counting jobs per queue and state".to_owned();
        let rows = match &tenant {
            None => self.query_fresh(QUEUE_STATS_SQL, &[], &ctx).await?,
            Some(t) => {
                self.query_fresh(QUEUE_STATS_OF_TENANT_SQL, &[&t.as_str()], &ctx)
                    .await?
            }
        };
        stats_from_rows(&rows)
    }

    async fn queue_depths(&self) -> Result<Vec<QueueStats>, StoreError> {
        let ctx = || "counting unfinished jobs per queue and state".to_owned();
        let rows = self.query_fresh(&QUEUE_DEPTHS_SQL, &[], &ctx).await?;
        stats_from_rows(&rows)
    }

    async fn queue_stats_of(
        &self,
        queue: QueueName,
        tenant: Option<TenantId>,
    ) -> Result<QueueStats, StoreError> {
        let ctx = || format!("counting the jobs of queue {queue}");
        let tenant = tenant.as_ref().map(TenantId::as_str);
        let rows = self
            .query_fresh(QUEUE_STATS_OF_ONE_SQL, &[&queue.as_str(), &tenant], &ctx)
            .await?;
        // The statement always answers at least the queue's own row.
        Ok(stats_from_rows(&rows)?.pop().unwrap_or_else(|| QueueStats {
            queue,
            paused: false,
            counts: StateCounts::default(),
        }))
    }

    async fn set_queue_paused(&self, queue: QueueName, paused: bool) -> Result<(), StoreError> {
        let ctx = || {
            let verb = if paused { "pausing" } else { "resuming" };
            format!("{verb} queue {queue}")
        };
        self.execute(
            SET_QUEUE_PAUSED_SQL,
            &[&queue.as_str(), &paused, &self.clock.now(), &self.channel],
            &ctx,
        )
        .await
        .map(drop)
    }
}

/// Every queue's counts per state, and its paused flag. One statement, so counts and flags
/// come from one snapshot. A queue known only from `queues` (paused or resumed, no jobs)
/// comes back as one row with a NULL state and count. The states the listing indexes leave
/// out are counted apart ([`LISTING_INDEXES`](super::jobs::LISTING_INDEXES)): running jobs by the running index,
/// completed ones by a scan of the finished jobs.
const QUEUE_STATS_SQL: &str = "SELECT COALESCE(c.queue, q.name), c.state, c.n, \
       COALESCE(q.paused, false) \
     FROM (SELECT queue, state, count(*) AS n FROM jobs \
           WHERE state NOT IN ('running', 'completed') GROUP BY queue, state \
           UNION ALL \
           SELECT queue, state, count(*) FROM jobs \
           WHERE state = 'running' GROUP BY queue, state \
           UNION ALL \
           SELECT queue, state, count(*) FROM jobs \
           WHERE state = 'completed' GROUP BY queue, state) c \
     FULL JOIN queues q ON q.name = c.queue";

/// One tenant's view (`$1`): only the queues holding its jobs, counting only those (served
/// by the (tenant, state, id) index, and the left-out states apart as above).
const QUEUE_STATS_OF_TENANT_SQL: &str = "SELECT c.queue, c.state, c.n, COALESCE(q.paused, false) \
     FROM (SELECT queue, state, count(*) AS n FROM jobs \
           WHERE tenant = $1 AND state NOT IN ('running', 'completed') GROUP BY queue, state \
           UNION ALL \
           SELECT queue, state, count(*) FROM jobs \
           WHERE tenant = $1 AND state = 'running' GROUP BY queue, state \
           UNION ALL \
           SELECT queue, state, count(*) FROM jobs \
           WHERE tenant = $1 AND state = 'completed' GROUP BY queue, state) c \
     LEFT JOIN queues q ON q.name = c.queue";

/// The gauges' count: unfinished jobs only, by partial index (see DEPTH_COUNTS).
pub(super) static QUEUE_DEPTHS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT COALESCE(c.queue, q.name), c.state, c.n, COALESCE(q.paused, false) \
         FROM ({DEPTH_COUNTS}) c \
         FULL JOIN queues q ON q.name = c.queue"
    )
});

/// Sets queue `$1`'s paused flag to `$2` at `$3`. Resuming a queue makes its waiting jobs
/// leasable again: the same statement notifies the queue's listeners ($4 is the channel)
/// when the flag is now off.
const SET_QUEUE_PAUSED_SQL: &str = "WITH saved AS ( \
     INSERT INTO queues (name, paused, updated_at) VALUES ($1, $2, $3) \
     ON CONFLICT (name) DO UPDATE \
     SET paused = excluded.paused, updated_at = excluded.updated_at \
     RETURNING name, paused \
     ) \
     SELECT pg_notify($4, s.name) FROM saved s WHERE NOT s.paused";

/// One queue's counts per state (of one tenant's jobs when `$2` is not NULL) and its paused
/// flag, in the row shape of [`QUEUE_STATS_SQL`]: the queue's own row always comes back
/// (a NULL state and count when it holds no jobs), so an unused name answers zeros. Served
/// by the (queue, state, id) index, and the left-out states apart as in the full statistics.
const QUEUE_STATS_OF_ONE_SQL: &str = "SELECT n.name, c.state, c.n, COALESCE(q.paused, false) \
     FROM (SELECT $1::text AS name) n \
     LEFT JOIN (SELECT state, count(*) AS n FROM jobs \
                WHERE queue = $1 AND ($2::text IS NULL OR tenant = $2) \
                  AND state NOT IN ('running', 'completed') GROUP BY state \
                UNION ALL \
                SELECT state, count(*) FROM jobs \
                WHERE queue = $1 AND ($2::text IS NULL OR tenant = $2) \
                  AND state = 'running' GROUP BY state \
                UNION ALL \
                SELECT state, count(*) FROM jobs \
                WHERE queue = $1 AND ($2::text IS NULL OR tenant = $2) \
                  AND state = 'completed' GROUP BY state) c ON true \
     LEFT JOIN queues q ON q.name = n.name";

#[cfg(test)]
mod tests {
    use super::super::jobs::LISTING_INDEXES;
    use super::*;

    /// Each statistics statement counts the indexed states by the listing indexes' own
    /// predicate, and every state they leave out in a part of its own: no state is missed
    /// or counted twice.
    #[test]
    fn statistics_count_each_state_once() {
        let indexed = LISTING_INDEXES.predicate("");
        for sql in [
            QUEUE_STATS_SQL,
            QUEUE_STATS_OF_TENANT_SQL,
            QUEUE_STATS_OF_ONE_SQL,
        ] {
            assert_eq!(sql.matches(&indexed).count(), 1, "{sql}");
            for state in LISTING_INDEXES.left_out {
                let apart = format!("state = '{}'", state.as_str());
                assert_eq!(sql.matches(&apart).count(), 1, "{apart} in {sql}");
            }
            assert_eq!(
                sql.matches("UNION ALL").count(),
                LISTING_INDEXES.left_out.len(),
                "{sql}"
            );
        }
    }
}
