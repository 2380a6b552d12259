//! [`QueueStore`] on Postgres: counts per queue and state (the depth gauges read only the
//! unfinished states' partial indexes) and the paused flag.

use async_trait::async_trait;
use keel_core::store::QueueStats;
use keel_core::{QueueName, QueueStore, StoreError, TenantId};

use super::sql::SQL;
use super::{PgStore, error, stats_from_rows};

#[async_trait]
impl QueueStore for PgStore {
    async fn queue_stats(&self, tenant: Option<TenantId>) -> Result<Vec<QueueStats>, StoreError> {
        let ctx = || "counting jobs per queue and state".to_owned();
        let rows = match &tenant {
            None => self.query_fresh(&SQL.queue_stats, &[], &ctx).await?,
            Some(t) => {
                self.query_fresh(&SQL.queue_stats_of_tenant, &[&t.as_str()], &ctx)
                    .await?
            }
        };
        stats_from_rows(&rows)
    }

    async fn queue_depths(&self) -> Result<Vec<QueueStats>, StoreError> {
        let ctx = || "counting unfinished jobs per queue and state".to_owned();
        let rows = self.query_fresh(&SQL.queue_depths, &[], &ctx).await?;
        stats_from_rows(&rows)
    }

    async fn set_queue_paused(&self, queue: QueueName, paused: bool) -> Result<(), StoreError> {
        let ctx = || {
            let verb = if paused { "pausing" } else { "resuming" };
            format!("{verb} queue {queue}")
        };
        let conn = self.conn(&ctx).await?;
        let stmt = conn
            .prepare_cached(&SQL.set_queue_paused)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        conn.execute(
            &stmt,
            &[&queue.as_str(), &paused, &self.clock.now(), &self.channel],
        )
        .await
        .map(drop)
        .map_err(|e| error::db(e, ctx()))
    }
}
