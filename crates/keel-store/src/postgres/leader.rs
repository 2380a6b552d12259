//! [`LeaderStore`] on Postgres: the maintenance leader's row (`leaders`, role `maintenance`),
//! taken or renewed in one upsert, so two replicas campaigning at once get one leader and the
//! epoch grows exactly when the owner changes.

use async_trait::async_trait;
use keel_core::clock::to_delta;
use keel_core::store::{CampaignParams, LeaderEpoch, Leadership};
use keel_core::{LeaderStore, StoreError, WorkerId};

use super::sql::SQL;
use super::{PgStore, error, rows};
use crate::MAINTENANCE_ROLE;

#[async_trait]
impl LeaderStore for PgStore {
    async fn campaign(&self, params: CampaignParams) -> Result<Leadership, StoreError> {
        // A campaign that loses reads the winner; should that row vanish or lapse in between
        // (never in normal operation: rows are not deleted), it simply campaigns again.
        const ATTEMPTS: usize = 3;
        let ctx = || format!("campaigning for leadership as {}", params.owner);
        let conn = self.conn(&ctx).await?;
        let campaign = conn
            .prepare_cached(&SQL.campaign)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let leader = conn
            .prepare_cached(&SQL.leader)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        for _ in 0..ATTEMPTS {
            let now = self.clock.now();
            let expires_at = now + to_delta(params.ttl);
            let won = conn
                .query_opt(
                    &campaign,
                    &[&MAINTENANCE_ROLE, &params.owner.as_str(), &expires_at, &now],
                )
                .await
                .map_err(|e| error::db(e, ctx()))?;
            let row = match won {
                Some(row) => Some(row),
                None => conn
                    .query_opt(&leader, &[&MAINTENANCE_ROLE])
                    .await
                    .map_err(|e| error::db(e, ctx()))?,
            };
            if let Some(row) = row {
                let owner: &str = rows::get(&row, 0, "owner")?;
                let epoch: i64 = rows::get(&row, 1, "epoch")?;
                return Ok(Leadership {
                    owner: rows::parsed("owner", owner, WorkerId::parse)?,
                    epoch: LeaderEpoch(u64::try_from(epoch).map_err(|e| {
                        StoreError::permanent(format!("decoding stored epoch ({epoch})"), e)
                    })?),
                    expires_at: rows::get(&row, 2, "expires_at")?,
                });
            }
        }
        Err(StoreError::transient(
            ctx(),
            "the leader row kept disappearing between the campaign and reading the winner",
        ))
    }

    async fn resign(&self, owner: &WorkerId) -> Result<(), StoreError> {
        let ctx = || format!("resigning leadership as {owner}");
        // Now: a campaign at this very instant already finds the term lapsed.
        let ended = self.clock.now();
        let conn = self.conn(&ctx).await?;
        let stmt = conn
            .prepare_cached(&SQL.resign)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        conn.execute(&stmt, &[&MAINTENANCE_ROLE, &owner.as_str(), &ended])
            .await
            .map(drop)
            .map_err(|e| error::db(e, ctx()))
    }
}
