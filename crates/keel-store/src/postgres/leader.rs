//! [`LeaderStore`] on Postgres: the maintenance leader's row (`leaders`, role `maintenance`),
//! taken or renewed in one upsert, so two replicas campaigning at once get one leader and the
//! epoch grows exactly when the owner changes. The fence that keeps a leader's writes inside
//! its term ([`FENCE_SQL`]) is here too, with the campaign it must agree with, though the
//! fenced writes (cron ticks) run it from `schedules.rs`.

use async_trait::async_trait;
use keel_core::clock::to_delta;
use keel_core::store::{CampaignParams, LeaderEpoch, Leadership};
use keel_core::{LeaderStore, StoreError, WorkerId};

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
        for _ in 0..ATTEMPTS {
            let now = self.clock.now();
            let expires_at = now + to_delta(params.ttl);
            let won = self
                .sql
                .query_opt(
                    &*conn,
                    CAMPAIGN_SQL,
                    &[&MAINTENANCE_ROLE, &params.owner.as_str(), &expires_at, &now],
                )
                .await
                .map_err(|e| error::db(e, ctx()))?;
            let row = match won {
                Some(row) => Some(row),
                None => self
                    .sql
                    .query_opt(&*conn, LEADER_SQL, &[&MAINTENANCE_ROLE])
                    .await
                    .map_err(|e| error::db(e, ctx()))?,
            };
            if let Some(row) = row {
                conn.answered();
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
        conn.answered();
        Err(StoreError::transient(
            ctx(),
            "the leader row kept disappearing between the campaign and reading the winner",
        ))
    }

    async fn resign(&self, owner: &WorkerId) -> Result<(), StoreError> {
        let ctx = || format!("resigning leadership as {owner}");
        // Now: a campaign at this very instant already finds the term lapsed.
        let ended = self.clock.now();
        self.execute(
            RESIGN_SQL,
            &[&MAINTENANCE_ROLE, &owner.as_str(), &ended],
            &ctx,
        )
        .await
        .map(drop)
    }
}

/// Takes the term if it is free, lapsed ($4 is now) or the caller's own; the epoch moves on
/// only when the owner changes. A term is held while now < expires_at, so it can be taken
/// exactly when the fence ([`FENCE_SQL`]) stops accepting it: no instant with two leaders,
/// none with a dead term. All SET expressions read the old row. Concurrent campaigns
/// serialise on the row lock and re-check the WHERE against the winner's row, so one of them
/// wins. No row back: another replica holds an unexpired term ([`LEADER_SQL`] reads it).
const CAMPAIGN_SQL: &str = "INSERT INTO leaders AS l (role, owner, epoch, expires_at) \
     VALUES ($1, $2, 1, $3) \
     ON CONFLICT (role) DO UPDATE SET \
       epoch = CASE WHEN l.owner = excluded.owner THEN l.epoch ELSE l.epoch + 1 END, \
       owner = excluded.owner, expires_at = excluded.expires_at \
     WHERE l.owner = excluded.owner OR l.expires_at <= $4 \
     RETURNING l.owner, l.epoch, l.expires_at";

/// The term of role `$1`, whoever holds it.
const LEADER_SQL: &str = "SELECT owner, epoch, expires_at FROM leaders WHERE role = $1";

/// Ends the term now ($3), so any campaign from now on finds it lapsed.
const RESIGN_SQL: &str = "UPDATE leaders SET expires_at = LEAST(expires_at, $3) \
     WHERE role = $1 AND owner = $2";

/// Whether `$2` holds role `$1`'s term of epoch `$3` at `$4`. FOR SHARE holds the leader row
/// until the writes it fences commit: a takeover (an UPDATE of the row) waits for them, so
/// every fenced write lands inside the term that allowed it.
pub(super) const FENCE_SQL: &str = "SELECT 1 FROM leaders \
     WHERE role = $1 AND owner = $2 AND epoch = $3 AND expires_at > $4 \
     FOR SHARE";
