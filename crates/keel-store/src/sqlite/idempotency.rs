//! Enqueues under an idempotency key (G3) on SQLite: the key row and the jobs are written in
//! one writer transaction, so a replay finds either both or neither. The role's other half,
//! forgetting expired keys, is maintenance (`maintenance.rs`).

use std::sync::Arc;

use keel_core::StoreError;
use keel_core::clock::to_delta;
use keel_core::store::{IdempotentInsert, IdempotentOutcome, StoredResponse};
use rusqlite::OptionalExtension;
use rusqlite::params;

use super::rows::micros;
use super::{SqliteStore, insert_rows, map_err, validate_all};
use crate::key_reused;

impl SqliteStore {
    /// [`JobStore::insert_idempotent`](keel_core::JobStore::insert_idempotent).
    pub(super) async fn insert_under_key(
        &self,
        req: IdempotentInsert,
    ) -> Result<IdempotentOutcome, StoreError> {
        validate_all(&req.jobs)?;
        let clock = Arc::clone(&self.clock);
        self.writer
            .write("inserting jobs under an idempotency key", move |conn| {
                let now = clock.now();
                let existing: Option<(String, u16, Vec<u8>, i64)> = conn
                    .prepare_cached(
                        "SELECT fingerprint, status, body, expires_at FROM idempotency_keys
                         WHERE tenant = ?1 AND key = ?2",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![req.tenant.as_str(), req.key.as_str()], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                        })
                        .optional()
                    })
                    .map_err(|e| map_err("reading an idempotency key", &e))?;
                match existing {
                    Some((fingerprint, status, body, expires)) if expires > micros(now) => {
                        return if fingerprint == req.fingerprint {
                            Ok(IdempotentOutcome::Replayed(StoredResponse { status, body }))
                        } else {
                            Err(key_reused(&req.key))
                        };
                    }
                    Some(_) => {
                        conn.prepare_cached(
                            "DELETE FROM idempotency_keys WHERE tenant = ?1 AND key = ?2",
                        )
                        .and_then(|mut s| s.execute(params![req.tenant.as_str(), req.key.as_str()]))
                        .map_err(|e| map_err("expiring an idempotency key", &e))?;
                    }
                    None => {}
                }
                let jobs = insert_rows(conn, req.jobs, now)?;
                let response = (req.respond)(&jobs);
                conn.prepare_cached(
                    "INSERT INTO idempotency_keys
                        (tenant, key, fingerprint, status, body, created_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        req.tenant.as_str(),
                        req.key.as_str(),
                        req.fingerprint,
                        response.status,
                        response.body,
                        micros(now),
                        micros(now + to_delta(req.ttl)),
                    ])
                })
                .map_err(|e| map_err("storing an idempotency key", &e))?;
                Ok(IdempotentOutcome::Created { jobs, response })
            })
            .await
    }
}
