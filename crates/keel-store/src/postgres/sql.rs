//! The SQL [`PgStore`](super::PgStore) runs, built once from the state machine.
//!
//! Every state guard (`state IN (…)`) and every target state is derived from
//! [`Transition::sources`] and [`JobState::apply`], so a change to the state machine changes
//! the SQL with it. The states are written into the text as literals rather than passed as
//! parameters: the planner can only use a partial index (`WHERE state = 'available'`) when it
//! can prove the query's predicate implies the index's at plan time, which it cannot for a
//! parameter. The statements are built once per process and prepared once per connection
//! (`prepare_cached`).
//!
//! Rows are always selected through [`COLUMNS`] with the table aliased `j`, and decoded by
//! position in `rows.rs`.
//!
//! Every statement that makes jobs available (insert, promote, retry, release, resuming a
//! queue) also calls `pg_notify(channel, queue)` for the queues it touched, in the same
//! statement: the notification is delivered at commit and dropped with a rollback, so a
//! listener is never woken for work that is not there. The channel is a parameter (see
//! `listen.rs` for how it is named).

use std::sync::LazyLock;

use keel_core::store::ListParams;
use keel_core::{JobState, Transition};
use tokio_postgres::types::ToSql;

/// The columns of a job, in the order `rows::job_from_row` decodes them. JSON columns come
/// back as text: `args` and `result` must round-trip byte for byte, and the structured
/// columns are parsed by the same codec the SQLite store uses.
pub(super) const COLUMNS: &str = "j.id, j.queue, j.kind, j.tenant, j.args::text, j.priority, \
     j.state, j.attempt, j.max_attempts, j.timeout_ms, j.backoff::text, j.tags::text, j.run_at, \
     j.errors::text, j.result::text, j.lease_owner, j.lease_token, j.lease_expires_at, \
     j.created_at, j.started_at, j.finished_at";

/// `'a', 'b'` for `state IN (…)`. State names are fixed lowercase identifiers, so quoting
/// them is all the escaping they need.
fn state_list(states: &[JobState]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The guard for `t`: the states it may start from.
fn guard(t: Transition) -> String {
    state_list(&t.sources())
}

/// The state `t` leads to. Every transition the store issues as one statement leads to the
/// same state from each of its sources; the unit tests below check that, so this cannot pick
/// an arbitrary one silently.
fn target(t: Transition) -> &'static str {
    t.sources()
        .into_iter()
        .find_map(|s| s.apply(t).ok())
        .map_or("invalid", JobState::as_str)
}

/// Every fixed statement of the store, each named after the operation that runs it
/// (`fail_lock` / `fail_update` and `rescue_lock` / `rescue_update` are the two steps of
/// those transactions; `existing` and `state_of` tell NotFound from a refused move;
/// `idempotency_*` are the steps of `insert_idempotent` and the key cleaner).
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) insert: String,
    pub(super) get: String,
    pub(super) lease: String,
    pub(super) heartbeat: String,
    pub(super) complete: String,
    pub(super) release: String,
    pub(super) existing: String,
    pub(super) fail_lock: String,
    pub(super) fail_update: String,
    pub(super) cancel: String,
    pub(super) retry: String,
    pub(super) state_of: String,
    pub(super) promote: String,
    pub(super) rescue_lock: String,
    pub(super) rescue_update: String,
    pub(super) delete_finished: String,
    pub(super) queue_stats: String,
    pub(super) set_queue_paused: String,
    pub(super) idempotency_read: String,
    pub(super) idempotency_expire: String,
    pub(super) idempotency_claim: String,
    pub(super) idempotency_delete_expired: String,
}

/// The statements, built on first use.
pub(super) static SQL: LazyLock<Statements> = LazyLock::new(Statements::build);

impl Statements {
    fn build() -> Self {
        let running = guard(Transition::Complete);
        let fail_sources = guard(Transition::Fail { retry: true });
        let rescue_sources = guard(Transition::Rescue { retry: true });
        let finished = state_list(&JobState::FINISHED);
        Self {
            // One statement for the whole batch: columns travel as arrays and are zipped back
            // into rows by unnest. JSON travels as text and is cast here, so `args` is stored
            // exactly as submitted. attempt, errors, result and the lease take their defaults.
            // created_at is per row: a group commit merges callers that arrived at different
            // instants, and each job keeps the time its own caller saw.
            //
            // The same statement notifies listeners ($14 is the store's channel, $15 the
            // distinct queues that received available jobs). A data-modifying CTE always runs
            // to completion whether or not the outer query reads it, so the notifications are
            // queued only if every row was inserted, and Postgres delivers them at commit.
            insert: "WITH inserted AS ( \
                 INSERT INTO jobs (id, queue, kind, tenant, args, priority, state, \
                 max_attempts, timeout_ms, backoff, tags, run_at, created_at) \
                 SELECT t.id, t.queue, t.kind, t.tenant, t.args::json, t.priority, t.state, \
                 t.max_attempts, t.timeout_ms, t.backoff::jsonb, t.tags::jsonb, t.run_at, \
                 t.created_at \
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::int2[], $7::text[], $8::int4[], $9::int8[], $10::text[], $11::text[], \
                 $12::timestamptz[], $13::timestamptz[]) \
                 AS t(id, queue, kind, tenant, args, priority, state, max_attempts, timeout_ms, \
                 backoff, tags, run_at, created_at) \
                 ) \
                 SELECT pg_notify($14, q.queue) FROM unnest($15::text[]) AS q(queue)"
                .to_owned(),
            get: format!("SELECT {COLUMNS} FROM jobs j WHERE j.id = $1"),
            // The inner SELECT walks jobs_lease_idx in lease order and skips rows another
            // replica has locked, so concurrent leasers never wait on each other and never
            // get the same job. The outer state guard is redundant with the row lock; it is
            // kept so the statement is correct on its own.
            //
            // A paused queue yields nothing. The NOT EXISTS references only $1, so Postgres
            // plans it as an InitPlan run once per statement (one queues_pkey probe) gating
            // the index walk, not as a join per job; and FOR UPDATE does not reach into it,
            // so leasers of one queue never lock its settings row.
            lease: format!(
                "WITH picked AS ( \
                   SELECT id FROM jobs \
                   WHERE state IN ({lease}) AND queue = $1 \
                     AND NOT EXISTS (SELECT 1 FROM queues WHERE name = $1 AND paused) \
                   ORDER BY priority, run_at, id \
                   LIMIT $2 \
                   FOR UPDATE SKIP LOCKED \
                 ) \
                 UPDATE jobs j SET state = '{to}', attempt = j.attempt + 1, lease_owner = $3, \
                   lease_token = gen_random_uuid(), lease_expires_at = $4, started_at = $5 \
                 FROM picked \
                 WHERE j.id = picked.id AND j.state IN ({lease}) \
                 RETURNING {COLUMNS}",
                lease = guard(Transition::Lease),
                to = target(Transition::Lease),
            ),
            // A lease is live while the job can still complete; the token is the fence.
            // RETURNING the submitted (id, token) pairs lets the caller match outcomes to
            // items even when a batch names the same job twice with different tokens.
            // Batched lease-fenced updates first lock their rows in id order (`locked`):
            // a heartbeat and a completion batch over the same running jobs would otherwise
            // lock them in whatever order each join visits them, and deadlock.
            heartbeat: format!(
                "WITH l AS (SELECT * FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)), \
                 locked AS (SELECT j.id FROM jobs j WHERE j.id IN (SELECT id FROM l) \
                            ORDER BY j.id FOR UPDATE) \
                 UPDATE jobs j SET lease_expires_at = $3 \
                 FROM l \
                 WHERE j.id = l.id AND j.id IN (SELECT id FROM locked) \
                   AND j.lease_token = l.token AND j.state IN ({running}) \
                 RETURNING l.id, l.token"
            ),
            // lease_owner stays, as a record of who ran the job.
            complete: format!(
                "WITH l AS (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[]) \
                            AS l(id, token, result)), \
                 locked AS (SELECT j.id FROM jobs j WHERE j.id IN (SELECT id FROM l) \
                            ORDER BY j.id FOR UPDATE) \
                 UPDATE jobs j SET state = '{to}', result = l.result::json, finished_at = $4, \
                   lease_token = NULL, lease_expires_at = NULL \
                 FROM l \
                 WHERE j.id = l.id AND j.id IN (SELECT id FROM locked) \
                   AND j.lease_token = l.token AND j.state IN ({from}) \
                 RETURNING l.id, l.token",
                to = target(Transition::Complete),
                from = guard(Transition::Complete),
            ),
            // The attempt the lease started does not count: it is given back. The job is
            // available again, so its queue's listeners are told ($3 is the channel; Postgres
            // folds identical notifications of one transaction into one).
            release: format!(
                "WITH l AS (SELECT * FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)), \
                 locked AS (SELECT j.id FROM jobs j WHERE j.id IN (SELECT id FROM l) \
                            ORDER BY j.id FOR UPDATE), \
                 released AS ( \
                   UPDATE jobs j SET state = '{to}', attempt = GREATEST(j.attempt - 1, 0), \
                     lease_token = NULL, lease_expires_at = NULL \
                   FROM l \
                   WHERE j.id = l.id AND j.id IN (SELECT id FROM locked) \
                     AND j.lease_token = l.token AND j.state IN ({from}) \
                   RETURNING l.id, l.token, j.queue \
                 ) \
                 SELECT r.id, r.token, pg_notify($3, r.queue) FROM released r",
                to = target(Transition::Release),
                from = guard(Transition::Release),
            ),
            existing: "SELECT id FROM jobs WHERE id = ANY($1)".to_owned(),
            fail_lock: "SELECT j.state, j.lease_token, j.attempt, j.max_attempts, \
                 j.backoff::text FROM jobs j WHERE j.id = $1 FOR UPDATE"
                .to_owned(),
            // $2 is retryable or discarded (decided in Rust from the locked row); $3 is the
            // next run time when retryable; $4 is finished_at when discarded.
            fail_update: format!(
                "UPDATE jobs j SET state = $2, run_at = COALESCE($3, j.run_at), \
                   finished_at = $4, errors = j.errors || jsonb_build_array($5::text::jsonb), \
                   lease_token = NULL, lease_expires_at = NULL \
                 WHERE j.id = $1 AND j.state IN ({fail_sources}) \
                 RETURNING {COLUMNS}"
            ),
            cancel: format!(
                "UPDATE jobs j SET state = '{to}', finished_at = $2, \
                   lease_token = NULL, lease_expires_at = NULL \
                 WHERE j.id = $1 AND j.state IN ({from}) \
                 RETURNING {COLUMNS}",
                to = target(Transition::Cancel),
                from = guard(Transition::Cancel),
            ),
            // A job that used up its attempts gets exactly one more. The job is available
            // now, so its queue's listeners are told ($3 is the channel); the columns come
            // first, in `COLUMNS` order, so the row decodes like any other.
            retry: format!(
                "WITH retried AS ( \
                   UPDATE jobs j SET state = '{to}', run_at = $2, finished_at = NULL, \
                     result = NULL, lease_token = NULL, lease_expires_at = NULL, \
                     max_attempts = GREATEST(j.max_attempts, j.attempt + 1) \
                   WHERE j.id = $1 AND j.state IN ({from}) \
                   RETURNING {COLUMNS} \
                 ) \
                 SELECT r.*, pg_notify($3, r.queue) FROM retried r",
                to = target(Transition::Retry),
                from = guard(Transition::Retry),
            ),
            state_of: "SELECT state FROM jobs WHERE id = $1".to_owned(),
            // `id = ANY(ARRAY(subquery))` rather than `id IN (subquery)`: the array is computed
            // first and the outer statement becomes primary-key lookups whatever the planner
            // guesses about the LIMIT (a semi-join could otherwise be planned as a hash join
            // over the whole table).
            //
            // Each queue that received jobs is notified once ($3 is the channel), in the same
            // statement, so listeners hear of exactly the promotions that committed.
            promote: format!(
                "WITH promoted AS ( \
                   UPDATE jobs j SET state = '{to}' \
                   WHERE j.id = ANY(ARRAY( \
                     SELECT id FROM jobs \
                     WHERE state IN ({from}) AND run_at <= $1 \
                     ORDER BY run_at \
                     LIMIT $2 \
                     FOR UPDATE SKIP LOCKED)) \
                   AND j.state IN ({from}) \
                   RETURNING j.queue \
                 ) \
                 SELECT queue, count(*), pg_notify($3, queue) FROM promoted \
                 GROUP BY queue ORDER BY queue",
                to = target(Transition::Promote),
                from = guard(Transition::Promote),
            ),
            rescue_lock: format!(
                "SELECT j.id, j.queue, j.attempt, j.max_attempts, j.backoff::text, j.lease_owner, \
                   j.state \
                 FROM jobs j \
                 WHERE j.state IN ({rescue_sources}) AND j.lease_expires_at < $1 \
                 ORDER BY j.lease_expires_at \
                 LIMIT $2 \
                 FOR UPDATE SKIP LOCKED"
            ),
            rescue_update: format!(
                "UPDATE jobs j SET state = r.state, run_at = COALESCE(r.run_at, j.run_at), \
                   finished_at = r.finished_at, \
                   errors = j.errors || jsonb_build_array(r.error::jsonb), \
                   lease_token = NULL, lease_expires_at = NULL \
                 FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[], \
                   $5::text[]) AS r(id, state, run_at, finished_at, error) \
                 WHERE j.id = r.id AND j.state IN ({rescue_sources})"
            ),
            delete_finished: format!(
                "DELETE FROM jobs j WHERE j.id = ANY(ARRAY( \
                   SELECT id FROM jobs \
                   WHERE state IN ({finished}) AND finished_at < $1 \
                   ORDER BY finished_at \
                   LIMIT $2 \
                   FOR UPDATE SKIP LOCKED)) \
                 AND j.state IN ({finished})"
            ),
            // One statement, so counts and flags come from one snapshot. A queue known only
            // from `queues` (paused or resumed, no jobs) comes back as one row with a NULL
            // state and count.
            queue_stats: "SELECT COALESCE(c.queue, q.name), c.state, c.n, \
                   COALESCE(q.paused, false) \
                 FROM (SELECT queue, state, count(*) AS n FROM jobs GROUP BY queue, state) c \
                 FULL JOIN queues q ON q.name = c.queue"
                .to_owned(),
            // Resuming a queue makes its waiting jobs leasable again: the same statement
            // notifies the queue's listeners ($4 is the channel) when the flag is now off.
            set_queue_paused: "WITH saved AS ( \
                 INSERT INTO queues (name, paused, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE \
                 SET paused = excluded.paused, updated_at = excluded.updated_at \
                 RETURNING name, paused \
                 ) \
                 SELECT pg_notify($4, s.name) FROM saved s WHERE NOT s.paused"
                .to_owned(),
            // A live key only: an expired one is treated as absent until deleted.
            idempotency_read: "SELECT fingerprint, status, body FROM idempotency_keys \
                 WHERE tenant = $1 AND key = $2 AND expires_at > $3"
                .to_owned(),
            // Inside the claiming transaction, so the expired row and its replacement swap
            // atomically; a concurrent claimer of the same key waits on the row lock.
            idempotency_expire: "DELETE FROM idempotency_keys \
                 WHERE tenant = $1 AND key = $2 AND expires_at <= $3"
                .to_owned(),
            // The exclusivity point. Under READ COMMITTED, when another transaction has
            // inserted the same key and not finished, this waits for it; then it inserts
            // (the other rolled back) or does nothing (it committed). No row back = lost.
            idempotency_claim: "INSERT INTO idempotency_keys \
                 (tenant, key, fingerprint, status, body, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (tenant, key) DO NOTHING \
                 RETURNING 1"
                .to_owned(),
            // SKIP LOCKED: two cleaners split the work instead of queueing behind each other,
            // and a key being replaced by a claimer right now is left to that claimer. The
            // locked rows are addressed by ctid through an array (as in `promote`), so the
            // delete is a TID scan of exactly those rows; a join on (tenant, key) is planned
            // as a hash join over the whole table. A ctid is stable while its row is locked,
            // and keys are never updated, only inserted and deleted.
            idempotency_delete_expired: "DELETE FROM idempotency_keys k \
                 WHERE k.ctid = ANY(ARRAY( \
                   SELECT ctid FROM idempotency_keys \
                   WHERE expires_at <= $1 \
                   ORDER BY expires_at \
                   LIMIT $2 \
                   FOR UPDATE SKIP LOCKED)) \
                 AND k.expires_at <= $1"
                .to_owned(),
        }
    }
}

/// A `list` statement for one combination of filters, with its parameters.
///
/// Only the filters present appear in the text, so each shape is its own prepared statement
/// with its own plan: queue filters use `jobs_queue_state_idx`, tenant filters
/// `jobs_tenant_state_idx`, and an unfiltered page walks the primary key from the cursor.
pub(super) struct ListQuery {
    pub(super) sql: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl ListQuery {
    pub(super) fn new(p: &ListParams) -> Self {
        let mut clauses: Vec<String> = Vec::new();
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut push = |column: &str, op: &str, value: Box<dyn ToSql + Sync + Send>| {
            params.push(value);
            clauses.push(format!("j.{column} {op} ${}", params.len()));
        };
        if let Some(q) = &p.queue {
            push("queue", "=", Box::new(q.as_str().to_owned()));
        }
        if let Some(t) = &p.tenant {
            push("tenant", "=", Box::new(t.as_str().to_owned()));
        }
        if let Some(s) = p.state {
            push("state", "=", Box::new(s.as_str()));
        }
        if let Some(k) = &p.kind {
            push("kind", "=", Box::new(k.as_str().to_owned()));
        }
        if let Some(after) = p.after {
            push("id", ">", Box::new(*after.as_uuid()));
        }
        let filter = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {} ", clauses.join(" AND "))
        };
        params.push(Box::new(i64::from(p.effective_limit())));
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs j {filter}ORDER BY j.id LIMIT ${}",
            params.len()
        );
        Self { sql, params }
    }

    /// The parameters, borrowed as the driver wants them.
    pub(super) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_single_statement_transition_has_one_target() {
        for t in [
            Transition::Lease,
            Transition::Complete,
            Transition::Release,
            Transition::Cancel,
            Transition::Retry,
            Transition::Promote,
        ] {
            let targets: Vec<JobState> = t
                .sources()
                .into_iter()
                .filter_map(|s| s.apply(t).ok())
                .collect();
            assert!(!targets.is_empty(), "{t:?} has no source");
            assert!(
                targets.iter().all(|s| *s == targets[0]),
                "{t:?}: {targets:?}"
            );
            assert_eq!(target(t), targets[0].as_str());
        }
    }

    #[test]
    fn guards_follow_the_state_machine() {
        let s = &*SQL;
        assert!(s.lease.contains("state IN ('available')"), "{}", s.lease);
        assert!(s.lease.contains("SET state = 'running'"), "{}", s.lease);
        assert!(
            s.lease
                .contains("NOT EXISTS (SELECT 1 FROM queues WHERE name = $1 AND paused)"),
            "{}",
            s.lease
        );
        assert!(
            s.cancel
                .contains("state IN ('scheduled', 'available', 'running', 'retryable')"),
            "{}",
            s.cancel
        );
        assert!(
            s.promote.contains("state IN ('scheduled', 'retryable')"),
            "{}",
            s.promote
        );
        assert!(
            s.delete_finished
                .contains("state IN ('completed', 'discarded', 'cancelled')"),
            "{}",
            s.delete_finished
        );
    }

    #[test]
    fn list_text_names_only_present_filters() {
        let all = ListQuery::new(&ListParams {
            limit: 10,
            ..ListParams::default()
        });
        assert!(!all.sql.contains("WHERE"), "{}", all.sql);
        assert!(all.sql.ends_with("ORDER BY j.id LIMIT $1"), "{}", all.sql);
        let q = ListQuery::new(&ListParams {
            queue: Some("emails".parse().expect("valid queue")),
            state: Some(JobState::Available),
            after: Some(keel_core::JobId::new()),
            limit: 5000,
            ..ListParams::default()
        });
        assert!(
            q.sql.contains(
                "WHERE j.queue = $1 AND j.state = $2 AND j.id > $3 ORDER BY j.id LIMIT $4"
            ),
            "{}",
            q.sql
        );
        assert_eq!(q.params().len(), 4);
    }
}
