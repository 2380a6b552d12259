//! The maintenance leader's row (`leaders`, role `maintenance`) on SQLite.
//!
//! One process uses a SQLite file, so its campaign always wins. The row logic is still the
//! real one — the epoch grows by one when the owner changes and stays on renewal, a term
//! lapses by the store's clock — so leadership, fencing and their conformance cases behave
//! the same on both backends. Every function here runs on the writer thread, inside its
//! transaction, so reading the row and writing it cannot interleave with another campaign.
//!
//! A term is held while `now < expires_at`: a campaign may take the row over once
//! `expires_at <= now`, which is exactly when a fence of the old term stops being accepted,
//! so there is no instant at which both or neither of two replicas could act as leader.

use std::sync::Arc;

use async_trait::async_trait;
use keel_core::clock::to_delta;
use keel_core::store::{CampaignParams, Fence, LeaderEpoch, Leadership};
use keel_core::{LeaderStore, StoreError, Timestamp, WorkerId};
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{micros, ts};
use super::{SqliteStore, map_err};
use crate::MAINTENANCE_ROLE as ROLE;

/// Takes the row if it is free, lapsed or already `p.owner`'s (then renewed), in one upsert;
/// returns whoever holds it afterwards.
pub(super) fn campaign(
    conn: &Connection,
    p: &CampaignParams,
    now: Timestamp,
) -> Result<Leadership, StoreError> {
    const CTX: &str = "campaigning for leadership";
    let expires = now + to_delta(p.ttl);
    // In `DO UPDATE`, the bare column names are the row as it was, so the epoch moves on
    // exactly when the owner changes.
    let won: Option<(String, i64, i64)> = conn
        .prepare_cached(
            "INSERT INTO leaders (role, owner, epoch, expires_at) VALUES (?1, ?2, 1, ?3)
             ON CONFLICT (role) DO UPDATE SET
                 epoch = CASE WHEN owner = excluded.owner THEN epoch ELSE epoch + 1 END,
                 owner = excluded.owner,
                 expires_at = excluded.expires_at
             WHERE owner = excluded.owner OR expires_at <= ?4
             RETURNING owner, epoch, expires_at",
        )
        .and_then(|mut s| {
            s.query_row(
                params![ROLE, p.owner.as_str(), micros(expires), micros(now)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })
        .map_err(|e| map_err(CTX, &e))?;
    let row = match won {
        Some(row) => row,
        None => conn
            .prepare_cached("SELECT owner, epoch, expires_at FROM leaders WHERE role = ?1")
            .and_then(|mut s| s.query_row([ROLE], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
            .map_err(|e| map_err(CTX, &e))?,
    };
    leadership(row)
}

/// Ends `owner`'s term now, keeping the epoch, so the next campaign by anyone wins at once.
/// Does nothing if `owner` does not hold the row.
pub(super) fn resign(
    conn: &Connection,
    owner: &WorkerId,
    now: Timestamp,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE leaders SET expires_at = min(expires_at, ?3) WHERE role = ?1 AND owner = ?2",
    )
    .and_then(|mut s| s.execute(params![ROLE, owner.as_str(), micros(now)]))
    .map(|_| ())
    .map_err(|e| map_err("resigning leadership", &e))
}

/// Refuses with [`StoreError::NotLeader`] unless `fence` names the current, unexpired term.
/// Called first in a leader-only write's transaction, so the write and the check commit
/// together (the writer thread holds the database's only write lock meanwhile).
pub(super) fn check_fence(
    conn: &Connection,
    fence: &Fence,
    now: Timestamp,
) -> Result<(), StoreError> {
    let epoch = i64::try_from(fence.epoch.0).map_err(|_| StoreError::NotLeader(fence.epoch.0))?;
    let held = conn
        .prepare_cached(
            "SELECT 1 FROM leaders
             WHERE role = ?1 AND owner = ?2 AND epoch = ?3 AND expires_at > ?4",
        )
        .and_then(|mut s| s.exists(params![ROLE, fence.owner.as_str(), epoch, micros(now)]))
        .map_err(|e| map_err("checking the leader's fence", &e))?;
    if held {
        Ok(())
    } else {
        Err(StoreError::NotLeader(fence.epoch.0))
    }
}

fn leadership((owner, epoch, expires_at): (String, i64, i64)) -> Result<Leadership, StoreError> {
    let corrupt = |what: &str, detail: String| {
        StoreError::permanent(
            format!("decoding the stored leader's {what}"),
            format!("unexpected value: {detail}"),
        )
    };
    Ok(Leadership {
        owner: WorkerId::parse(owner).map_err(|e| corrupt("owner", e.to_string()))?,
        epoch: LeaderEpoch(u64::try_from(epoch).map_err(|_| corrupt("epoch", epoch.to_string()))?),
        expires_at: ts("leaders.expires_at", expires_at)?,
    })
}

#[async_trait]
impl LeaderStore for SqliteStore {
    async fn campaign(&self, p: CampaignParams) -> Result<Leadership, StoreError> {
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("campaigning for leadership", move |conn| {
                campaign(conn, &p, clock.now())
            })
            .await
    }

    async fn resign(&self, owner: &WorkerId) -> Result<(), StoreError> {
        let clock = Arc::clone(&self.clock);
        let owner = owner.clone();
        self.writer
            .write("resigning leadership", move |conn| {
                resign(conn, &owner, clock.now())
            })
            .await
    }
}
