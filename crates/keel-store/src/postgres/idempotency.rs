//! Enqueues under an idempotency key (G3) on Postgres: the key row and the jobs in one
//! transaction, where the key's primary key makes concurrent first uses of one key from any
//! number of replicas create the jobs once. Forgetting expired keys is in `maintenance.rs`.

use keel_core::clock::to_delta;
use keel_core::store::{IdempotentInsert, IdempotentOutcome};
use keel_core::{Job, StoreError};
use tokio_postgres::types::ToSql;

use super::{PgStore, Response, commit, error, replay, status_of, validate_all};

impl PgStore {
    /// [`JobStore::insert_idempotent`](keel_core::JobStore::insert_idempotent).
    pub(super) async fn insert_under_key(
        &self,
        req: IdempotentInsert,
    ) -> Result<IdempotentOutcome, StoreError> {
        // Each retry follows a claimer of the same key that rolled back (or a key that
        // expired between two statements); more than a few in a row is not bad luck.
        const ATTEMPTS: usize = 5;
        validate_all(&req.jobs)?;
        let IdempotentInsert {
            tenant,
            key,
            fingerprint,
            jobs,
            ttl,
            respond,
        } = req;
        let ctx = || {
            format!(
                "inserting jobs under idempotency key {:?} of tenant {tenant}",
                key.as_str()
            )
        };
        let now = self.clock.now();
        let expires_at = now + to_delta(ttl);
        let key_params: [&(dyn ToSql + Sync); 3] = [&tenant.as_str(), &key.as_str(), &now];
        let mut statements = vec![
            IDEMPOTENCY_READ_SQL,
            IDEMPOTENCY_EXPIRE_SQL,
            IDEMPOTENCY_CLAIM_SQL,
            IDEMPOTENCY_RESPOND_SQL,
        ];
        statements.extend(commit::INSERT_STATEMENTS.iter());
        self.sql
            .ready(&statements)
            .await
            .map_err(|e| error::db(e, ctx()))?;
        let mut conn = self.conn(&ctx).await?;
        // Fast path: a replay (the common reason a key comes back) needs no transaction, and
        // never builds a response it would throw away.
        if let Some(row) = self
            .sql
            .query_opt(&*conn, IDEMPOTENCY_READ_SQL, &key_params)
            .await
            .map_err(|e| error::db(e, ctx()))?
        {
            conn.answered();
            return replay(&row, &fingerprint, &key);
        }
        let jobs: Vec<Job> = jobs.into_iter().map(|j| j.into_job(now)).collect();
        // Built once, before claiming: `respond` is pure, and a losing attempt only discards
        // it. The stored bytes are the ones this caller returns, so every replay matches.
        // Unless unique jobs are among them: then the response must name the holders the
        // insert finds, so it is built after the insert, and stored over a placeholder in
        // the same transaction (no reader sees the placeholder: it never commits).
        let response = if jobs.iter().any(|j| j.unique.is_some()) {
            Response::AfterInsert(respond)
        } else {
            Response::Ready(respond(&jobs))
        };
        let (status, body) = match &response {
            Response::Ready(r) => (status_of(r, &ctx)?, r.body.as_slice()),
            Response::AfterInsert(_) => (0, &[][..]),
        };
        for _ in 0..ATTEMPTS {
            let tx = conn.transaction().await.map_err(|e| error::db(e, ctx()))?;
            self.sql
                .execute(&tx, IDEMPOTENCY_EXPIRE_SQL, &key_params)
                .await
                .map_err(|e| error::db(e, ctx()))?;
            let claimed = self
                .sql
                .query_opt(
                    &tx,
                    IDEMPOTENCY_CLAIM_SQL,
                    &[
                        &tenant.as_str(),
                        &key.as_str(),
                        &fingerprint,
                        &status,
                        &body,
                        &now,
                        &expires_at,
                    ],
                )
                .await
                .map_err(|e| error::db(e, ctx()))?
                .is_some();
            if claimed {
                let refs: Vec<&Job> = jobs.iter().collect();
                let holders = if refs.is_empty() {
                    commit::Holders::new()
                } else {
                    // A duplicate job id fails here as a Conflict; dropping `tx` rolls the
                    // key back with the jobs.
                    commit::insert_jobs(&self.sql, &tx, &refs, &ctx).await?
                };
                // Woken once committed, from the jobs that went in.
                let wake: Vec<String> = commit::woken(&refs, &holders)
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                let jobs = commit::substitute(jobs, &holders);
                let response = match response {
                    Response::Ready(response) => response,
                    Response::AfterInsert(respond) => {
                        let response = respond(&jobs);
                        let status = status_of(&response, &ctx)?;
                        self.sql
                            .execute(
                                &tx,
                                IDEMPOTENCY_RESPOND_SQL,
                                &[&tenant.as_str(), &key.as_str(), &status, &response.body],
                            )
                            .await
                            .map_err(|e| error::db(e, ctx()))?;
                        response
                    }
                };
                tx.commit().await.map_err(|e| error::db(e, ctx()))?;
                conn.answered();
                self.wakeups.wake(wake.iter().map(String::as_str));
                return Ok(IdempotentOutcome::Created { jobs, response });
            }
            // Another transaction committed the key while this one waited. Read it with a
            // fresh statement: a snapshot taken after that commit.
            tx.rollback().await.map_err(|e| error::db(e, ctx()))?;
            if let Some(row) = self
                .sql
                .query_opt(&*conn, IDEMPOTENCY_READ_SQL, &key_params)
                .await
                .map_err(|e| error::db(e, ctx()))?
            {
                conn.answered();
                return replay(&row, &fingerprint, &key);
            }
        }
        conn.answered();
        Err(StoreError::transient(
            ctx(),
            "the key kept being claimed and released concurrently",
        ))
    }
}

/// The stored answer for tenant `$1`'s key `$2` as of `$3`. A live key only: an expired one
/// is treated as absent until deleted.
pub(super) const IDEMPOTENCY_READ_SQL: &str = "SELECT fingerprint, status, body FROM idempotency_keys \
     WHERE tenant = $1 AND key = $2 AND expires_at > $3";

/// Deletes the key if it expired by `$3`. Inside the claiming transaction, so the expired
/// row and its replacement swap atomically; a concurrent claimer of the same key waits on
/// the row lock.
pub(super) const IDEMPOTENCY_EXPIRE_SQL: &str = "DELETE FROM idempotency_keys \
     WHERE tenant = $1 AND key = $2 AND expires_at <= $3";

/// The exclusivity point. Under READ COMMITTED, when another transaction has inserted the
/// same key and not finished, this waits for it; then it inserts (the other rolled back) or
/// does nothing (it committed). No row back = lost.
const IDEMPOTENCY_CLAIM_SQL: &str = "INSERT INTO idempotency_keys \
     (tenant, key, fingerprint, status, body, created_at, expires_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (tenant, key) DO NOTHING \
     RETURNING 1";

/// The response of a claim made before its jobs were inserted (they held unique jobs, whose
/// holders the response must name): same transaction as the claim.
const IDEMPOTENCY_RESPOND_SQL: &str = "UPDATE idempotency_keys SET status = $3, body = $4 \
     WHERE tenant = $1 AND key = $2";
