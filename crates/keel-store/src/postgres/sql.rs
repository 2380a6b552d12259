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
//!
//! Cancel, retry and rescue announce the jobs they move on the store's changes channel, in
//! the same statement and so only if it commits: one `pg_notify` per statement (per
//! [`CHANGES_PER_NOTIFICATION`] jobs), each payload a few `<id> <state> <queue>` lines.
//!
//! Completions and failures are *not* announced. A transaction that notifies takes a
//! database-wide lock at commit and holds it through its WAL flush, so notifying
//! transactions commit one at a time; on the completion path that cost `keel bench` 15–20 %
//! (Postgres, 2 cores: W1 drain 15.7–18.7k jobs/s with completions announced in their
//! statements, 20.0–20.8k without; announcing them from separate `synchronous_commit = off`
//! transactions after the commit was no better, 15.1–15.3k). A replica waiting for a job that
//! another replica finishes re-reads it on a timer instead (`/v1/process`: every 250 ms).
//! Lease, insert and promote are not announced either: wakeups cover them.

use std::sync::LazyLock;

use keel_core::store::ListParams;
use keel_core::{JobState, Transition};

use crate::DEPTH_COUNTS;
use tokio_postgres::types::ToSql;

/// The columns of a job, in the order `rows::job_from_row` decodes them. JSON columns come
/// back as text: `args` and `result` must round-trip byte for byte, and the structured
/// columns are parsed by the same codec the SQLite store uses.
pub(super) const COLUMNS: &str = "j.id, j.queue, j.kind, j.tenant, j.args::text, j.priority, \
     j.state, j.attempt, j.max_attempts, j.timeout_ms, j.backoff::text, j.tags::text, j.run_at, \
     j.errors::text, j.result::text, j.lease_owner, j.lease_token, j.lease_expires_at, \
     j.created_at, j.started_at, j.finished_at, j.unique_key, j.unique_scope";

/// The columns of a schedule, in the order `rows::schedule_from_row` decodes them, the table
/// aliased `s`. The template comes back as text so its args keep their bytes.
pub(super) const SCHEDULE_COLUMNS: &str = "s.tenant, s.name, s.cron, s.timezone, s.job::text, \
     s.paused, s.catch_up_ms, s.last_tick_at, s.created_at, s.updated_at";

/// States in which a job that still has its unique key holds it, for every scope but
/// `period` (which holds in all): exactly the predicate of `jobs_unique_idx`
/// (migrations/postgres/0003_scale_out.sql), in the same order. `ON CONFLICT` can only use
/// a partial index as its arbiter when its own `WHERE` provably implies the index's, and the
/// simplest proof is the identical expression; a unit test below holds the two together.
const UNIQUE_HOLDING: &str = "j.unique_key IS NOT NULL \
     AND (j.unique_scope = 'period' \
          OR j.state IN ('scheduled', 'available', 'retryable', 'running'))";

/// Most state changes in one notification. A line is at most 36 (id) + 1 + 9 (state) + 1 +
/// 128 (queue) + 1 (newline) = 176 bytes, so 40 lines stay under 7,100 bytes, below
/// Postgres's 8,000-byte payload limit (beyond which `pg_notify` fails the statement).
pub(super) const CHANGES_PER_NOTIFICATION: usize = 40;

/// A query that announces the rows of `source` (a CTE with columns `id`, `state`, `queue`)
/// on the channel in parameter `channel`: one `pg_notify` per [`CHANGES_PER_NOTIFICATION`]
/// rows, none when `source` is empty (no group, no call).
fn announce(source: &str, channel: &str) -> String {
    format!(
        "SELECT pg_notify({channel}, string_agg(c.line, E'\\n')) \
         FROM (SELECT s.id::text || ' ' || s.state || ' ' || s.queue AS line, \
                      (row_number() OVER () - 1) / {CHANGES_PER_NOTIFICATION} AS chunk \
               FROM {source} s) c \
         GROUP BY c.chunk"
    )
}

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
    pub(super) insert_unique: String,
    pub(super) unique_holders: String,
    pub(super) get: String,
    pub(super) lease: String,
    pub(super) lease_filtered: String,
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
    pub(super) queue_stats_of_tenant: String,
    pub(super) queue_depths: String,
    pub(super) set_queue_paused: String,
    pub(super) idempotency_read: String,
    pub(super) idempotency_expire: String,
    pub(super) idempotency_claim: String,
    pub(super) idempotency_delete_expired: String,
    pub(super) idempotency_respond: String,
    pub(super) campaign: String,
    pub(super) leader: String,
    pub(super) resign: String,
    pub(super) fence: String,
    pub(super) schedule_create: String,
    pub(super) schedule_replace: String,
    pub(super) schedule_get: String,
    pub(super) schedule_list: String,
    pub(super) schedule_delete: String,
    pub(super) schedule_pause: String,
    pub(super) schedule_lock: String,
    pub(super) schedule_advance: String,
    pub(super) ticks_record: String,
    pub(super) ticks_delete_old: String,
}

/// The statements, built on first use.
pub(super) static SQL: LazyLock<Statements> = LazyLock::new(Statements::build);

impl Statements {
    fn build() -> Self {
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
            // The insert for batches holding unique jobs (the plain one above stays as lean
            // as before for the rest). A job whose key is held, by a committed job or by an
            // earlier row of this very statement, is skipped rather than failing the batch;
            // a concurrent transaction inserting the same key makes this wait for its
            // outcome. RETURNING tells the caller which rows went in; it then reads the
            // holders of the rest (`unique_holders`). Rows go in key order so that two
            // batches taking the same keys lock them in the same order and cannot deadlock;
            // one key repeated in the batch goes to the first job naming it.
            // The conflict target names the partial unique index only (the primary key is
            // no arbiter), so a duplicate id still fails as a Conflict.
            //
            // $14 is the wakeup channel ($15/$16 the keys and scopes); queues are notified
            // from the rows actually inserted. The UNION's second branch yields one NULL
            // row per notified queue; the caller skips NULL ids.
            insert_unique: format!(
                "WITH inserted AS ( \
                 INSERT INTO jobs AS j (id, queue, kind, tenant, args, priority, state, \
                 max_attempts, timeout_ms, backoff, tags, run_at, created_at, unique_key, \
                 unique_scope) \
                 SELECT t.id, t.queue, t.kind, t.tenant, t.args::json, t.priority, t.state, \
                 t.max_attempts, t.timeout_ms, t.backoff::jsonb, t.tags::jsonb, t.run_at, \
                 t.created_at, t.unique_key, t.unique_scope \
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::int2[], $7::text[], $8::int4[], $9::int8[], $10::text[], $11::text[], \
                 $12::timestamptz[], $13::timestamptz[], $15::text[], $16::text[]) \
                 WITH ORDINALITY \
                 AS t(id, queue, kind, tenant, args, priority, state, max_attempts, timeout_ms, \
                 backoff, tags, run_at, created_at, unique_key, unique_scope, ord) \
                 ORDER BY t.tenant, t.unique_key, t.ord \
                 ON CONFLICT (tenant, unique_key) WHERE {holding} DO NOTHING \
                 RETURNING j.id, j.queue, j.state \
                 ) \
                 SELECT i.id FROM inserted i \
                 UNION ALL \
                 SELECT NULL FROM (SELECT pg_notify($14, i.queue) FROM inserted i \
                   WHERE i.state = 'available' GROUP BY i.queue) n",
                holding = UNIQUE_HOLDING.replace("j.", ""),
            ),
            // The jobs holding the given (tenant, key) pairs: at most one each, by the
            // unique index.
            unique_holders: format!(
                "SELECT {COLUMNS} FROM jobs j \
                 JOIN unnest($1::text[], $2::text[]) AS k(tenant, unique_key) \
                   ON j.tenant = k.tenant AND j.unique_key = k.unique_key \
                 WHERE {UNIQUE_HOLDING}"
            ),
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
            //
            // A `queued`-scope unique job gives up its key for good when first leased, so
            // the same key can be enqueued again while it runs, and a later retry of it
            // never competes for the key with the job enqueued meanwhile.
            lease: lease_statement(""),
            // An external worker's lease (docs/workers.md): the same walk, keeping only its
            // tenant's jobs and the kinds it handles. The filters are residual on the index
            // walk; the built-in dispatchers keep the unfiltered statement above.
            lease_filtered: lease_statement(
                "AND ($6::text IS NULL OR tenant = $6) \
                 AND (cardinality($7::text[]) = 0 OR kind = ANY($7))",
            ),
            // A lease is live while the job can still complete; the token is the fence.
            // RETURNING the submitted (id, token) pairs lets the caller match outcomes to
            // items even when a batch names the same job twice with different tokens.
            // Batched lease-fenced updates first lock their rows in id order (`locked`):
            // a heartbeat and a completion batch over the same running jobs would otherwise
            // lock them in whatever order each join visits them, and deadlock.
            //
            // They find their rows by primary key only, and have no state predicate: a live
            // token means the job is running (CHECK jobs_lease_iff_running), and a
            // `state = 'running'` term would let the planner choose the partial running
            // index (jobs_expired_lease_idx) when its statistics say few jobs run, and walk
            // every dead entry a busy table leaves in it until the next vacuum.
            heartbeat: "WITH l AS (SELECT * FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)), \
                 locked AS (SELECT j.id FROM jobs j WHERE j.id = ANY($1::uuid[]) \
                            ORDER BY j.id FOR UPDATE) \
                 UPDATE jobs j SET lease_expires_at = $3 \
                 FROM l \
                 WHERE j.id = l.id AND j.id IN (SELECT id FROM locked) \
                   AND j.lease_token = l.token \
                 RETURNING l.id, l.token"
                .to_owned(),
            // lease_owner stays, as a record of who ran the job. Not announced (see the
            // module documentation).
            complete: format!(
                "WITH l AS (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[]) \
                            AS l(id, token, result)), \
                 locked AS (SELECT j.id FROM jobs j WHERE j.id = ANY($1::uuid[]) \
                            ORDER BY j.id FOR UPDATE) \
                 UPDATE jobs j SET state = '{to}', result = l.result::json, finished_at = $4, \
                   lease_token = NULL, lease_expires_at = NULL \
                 FROM l \
                 WHERE j.id = l.id AND j.id IN (SELECT id FROM locked) \
                   AND j.lease_token = l.token \
                 RETURNING l.id, l.token",
                to = target(Transition::Complete),
            ),
            // The attempt the lease started does not count: it is given back. The job is
            // available again, so its queue's listeners are told ($3 is the channel; Postgres
            // folds identical notifications of one transaction into one).
            release: format!(
                "WITH l AS (SELECT * FROM unnest($1::uuid[], $2::uuid[]) AS l(id, token)), \
                 locked AS (SELECT j.id FROM jobs j WHERE j.id = ANY($1::uuid[]) \
                            ORDER BY j.id FOR UPDATE), \
                 released AS ( \
                   UPDATE jobs j SET state = '{to}', attempt = GREATEST(j.attempt - 1, 0), \
                     lease_token = NULL, lease_expires_at = NULL \
                   FROM l \
                   WHERE j.id = l.id AND j.id IN (SELECT id FROM locked) \
                     AND j.lease_token = l.token \
                   RETURNING l.id, l.token, j.queue \
                 ) \
                 SELECT r.id, r.token, pg_notify($3, r.queue) FROM released r",
                to = target(Transition::Release),
            ),
            existing: "SELECT id FROM jobs WHERE id = ANY($1)".to_owned(),
            fail_lock: "SELECT j.state, j.lease_token, j.attempt, j.max_attempts, \
                 j.backoff::text FROM jobs j WHERE j.id = $1 FOR UPDATE"
                .to_owned(),
            // $2 is retryable or discarded (decided in Rust from the locked row); $3 is the
            // next run time when retryable; $4 is finished_at when discarded. Not announced
            // (see the module documentation).
            fail_update: format!(
                "UPDATE jobs j SET state = $2, run_at = COALESCE($3, j.run_at), \
                   finished_at = $4, errors = j.errors || jsonb_build_array($5::text::jsonb), \
                   lease_token = NULL, lease_expires_at = NULL \
                 WHERE j.id = $1 AND j.state IN ({fail_sources}) \
                 RETURNING {COLUMNS}"
            ),
            // Announced on $3, so a replica running the job hears that its lease is gone.
            cancel: format!(
                "WITH cancelled AS ( \
                   UPDATE jobs j SET state = '{to}', finished_at = $2, \
                     lease_token = NULL, lease_expires_at = NULL \
                   WHERE j.id = $1 AND j.state IN ({from}) \
                   RETURNING {COLUMNS} \
                 ) \
                 SELECT c.*, pg_notify($3, c.id::text || ' ' || c.state || ' ' || c.queue) \
                 FROM cancelled c",
                to = target(Transition::Cancel),
                from = guard(Transition::Cancel),
            ),
            // A job that used up its attempts gets exactly one more. The job is available
            // now, so its queue's listeners are told ($3 is the channel), and the change is
            // announced ($4); the columns come first, in `COLUMNS` order, so the row decodes
            // like any other. Putting an `active` job back among its key's holders while
            // another job holds the key violates jobs_unique_idx (mapped to a Conflict).
            retry: format!(
                "WITH retried AS ( \
                   UPDATE jobs j SET state = '{to}', run_at = $2, finished_at = NULL, \
                     result = NULL, lease_token = NULL, lease_expires_at = NULL, \
                     max_attempts = GREATEST(j.max_attempts, j.attempt + 1) \
                   WHERE j.id = $1 AND j.state IN ({from}) \
                   RETURNING {COLUMNS} \
                 ) \
                 SELECT r.*, pg_notify($3, r.queue), \
                   pg_notify($4, r.id::text || ' ' || r.state || ' ' || r.queue) \
                 FROM retried r",
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
            // The rescues are announced on $6 (the data-modifying CTE runs whatever the
            // outer query reads).
            rescue_update: format!(
                "WITH rescued AS ( \
                   UPDATE jobs j SET state = r.state, run_at = COALESCE(r.run_at, j.run_at), \
                     finished_at = r.finished_at, \
                     errors = j.errors || jsonb_build_array(r.error::jsonb), \
                     lease_token = NULL, lease_expires_at = NULL \
                   FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[], \
                     $5::text[]) AS r(id, state, run_at, finished_at, error) \
                   WHERE j.id = r.id AND j.state IN ({rescue_sources}) \
                   RETURNING j.id, j.state, j.queue \
                 ) \
                 {announce}",
                announce = announce("rescued", "$6"),
            ),
            // The inner SELECT picks and locks the rows (its state term is rechecked on a
            // row changed before the lock), so the DELETE finds them by primary key alone.
            // A state term on the DELETE too let the planner AND the pkey probe with a
            // bitmap of the whole finished index (the term matches its predicate): 4-13 ms
            // per maintenance pass with 200k finished jobs, to delete nothing.
            delete_finished: format!(
                "DELETE FROM jobs j WHERE j.id = ANY(ARRAY( \
                   SELECT id FROM jobs \
                   WHERE state IN ({finished}) AND finished_at < $1 \
                   ORDER BY finished_at \
                   LIMIT $2 \
                   FOR UPDATE SKIP LOCKED))"
            ),
            // One statement, so counts and flags come from one snapshot. A queue known only
            // from `queues` (paused or resumed, no jobs) comes back as one row with a NULL
            // state and count. Running jobs are counted apart: the listing indexes leave
            // them out, and the running index holds only them.
            queue_stats: "SELECT COALESCE(c.queue, q.name), c.state, c.n, \
                   COALESCE(q.paused, false) \
                 FROM (SELECT queue, state, count(*) AS n FROM jobs \
                       WHERE state <> 'running' GROUP BY queue, state \
                       UNION ALL \
                       SELECT queue, state, count(*) FROM jobs \
                       WHERE state = 'running' GROUP BY queue, state) c \
                 FULL JOIN queues q ON q.name = c.queue"
                .to_owned(),
            // One tenant's view: only the queues holding its jobs, counting only those
            // (served by the (tenant, state, id) index, and the running index).
            queue_stats_of_tenant: "SELECT c.queue, c.state, c.n, COALESCE(q.paused, false) \
                 FROM (SELECT queue, state, count(*) AS n FROM jobs \
                       WHERE tenant = $1 AND state <> 'running' GROUP BY queue, state \
                       UNION ALL \
                       SELECT queue, state, count(*) FROM jobs \
                       WHERE tenant = $1 AND state = 'running' GROUP BY queue, state) c \
                 LEFT JOIN queues q ON q.name = c.queue"
                .to_owned(),
            // The gauges' count: unfinished jobs only, by partial index (see DEPTH_COUNTS).
            queue_depths: format!(
                "SELECT COALESCE(c.queue, q.name), c.state, c.n, COALESCE(q.paused, false) \
                 FROM ({DEPTH_COUNTS}) c \
                 FULL JOIN queues q ON q.name = c.queue"
            ),
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
            // The response of a claim made before its jobs were inserted (they held unique
            // jobs, whose holders the response must name): same transaction as the claim.
            idempotency_respond: "UPDATE idempotency_keys SET status = $3, body = $4 \
                 WHERE tenant = $1 AND key = $2"
                .to_owned(),
            // Takes the term if it is free, lapsed ($4 is now) or the caller's own; the
            // epoch moves on only when the owner changes. A term is held while
            // now < expires_at, so it can be taken exactly when the fence (below) stops
            // accepting it: no instant with two leaders, none with a dead term. All SET expressions read the old
            // row. Concurrent campaigns serialise on the row lock and re-check the WHERE
            // against the winner's row, so one of them wins. No row back: another replica
            // holds an unexpired term (`leader` reads it).
            campaign: "INSERT INTO leaders AS l (role, owner, epoch, expires_at) \
                 VALUES ($1, $2, 1, $3) \
                 ON CONFLICT (role) DO UPDATE SET \
                   epoch = CASE WHEN l.owner = excluded.owner THEN l.epoch ELSE l.epoch + 1 END, \
                   owner = excluded.owner, expires_at = excluded.expires_at \
                 WHERE l.owner = excluded.owner OR l.expires_at <= $4 \
                 RETURNING l.owner, l.epoch, l.expires_at"
                .to_owned(),
            leader: "SELECT owner, epoch, expires_at FROM leaders WHERE role = $1".to_owned(),
            // Ends the term now ($3), so any campaign from now on finds it lapsed.
            resign: "UPDATE leaders SET expires_at = LEAST(expires_at, $3) \
                 WHERE role = $1 AND owner = $2"
                .to_owned(),
            // FOR SHARE holds the leader row until the writes it fences commit: a takeover
            // (an UPDATE of the row) waits for them, so every fenced write lands inside the
            // term that allowed it.
            fence: "SELECT 1 FROM leaders \
                 WHERE role = $1 AND owner = $2 AND epoch = $3 AND expires_at > $4 \
                 FOR SHARE"
                .to_owned(),
            // Templates travel as text and are stored as json (not jsonb): verbatim.
            schedule_create: format!(
                "INSERT INTO schedules AS s (tenant, name, cron, timezone, job, paused, \
                   catch_up_ms, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5::text::json, $6, $7, $8, $8) \
                 ON CONFLICT (tenant, name) DO NOTHING \
                 RETURNING {SCHEDULE_COLUMNS}"
            ),
            // created_at and last_tick_at are the existing row's. `xmax = 0` only on a row
            // this statement inserted (an updated row carries the updating transaction's
            // id): whether the schedule was created.
            schedule_replace: format!(
                "INSERT INTO schedules AS s (tenant, name, cron, timezone, job, paused, \
                   catch_up_ms, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5::text::json, $6, $7, $8, $8) \
                 ON CONFLICT (tenant, name) DO UPDATE SET cron = excluded.cron, \
                   timezone = excluded.timezone, job = excluded.job, paused = excluded.paused, \
                   catch_up_ms = excluded.catch_up_ms, updated_at = excluded.updated_at \
                 RETURNING {SCHEDULE_COLUMNS}, s.xmax = 0"
            ),
            schedule_get: format!(
                "SELECT {SCHEDULE_COLUMNS} FROM schedules s WHERE s.tenant = $1 AND s.name = $2"
            ),
            // $1: the tenant or NULL for all; $2, $3: the keyset cursor or NULLs. Schedules
            // are few (an operator writes each), so one statement serves every shape.
            schedule_list: format!(
                "SELECT {SCHEDULE_COLUMNS} FROM schedules s \
                 WHERE ($1::text IS NULL OR s.tenant = $1) \
                   AND ($2::text IS NULL OR (s.tenant, s.name) > ($2::text, $3::text)) \
                 ORDER BY s.tenant, s.name \
                 LIMIT $4"
            ),
            schedule_delete: "DELETE FROM schedules WHERE tenant = $1 AND name = $2 RETURNING 1"
                .to_owned(),
            schedule_pause: format!(
                "UPDATE schedules s SET paused = $3, updated_at = $4 \
                 WHERE s.tenant = $1 AND s.name = $2 \
                 RETURNING {SCHEDULE_COLUMNS}"
            ),
            // Locks the schedule for the tick transaction: concurrent enqueuers of one
            // schedule take turns (each then finds the other's ticks recorded), and a
            // pause or delete waits for, or is seen by, the enqueue.
            schedule_lock: "SELECT paused FROM schedules WHERE tenant = $1 AND name = $2 \
                 FOR UPDATE"
                .to_owned(),
            // GREATEST ignores a NULL, so the first tick sets it.
            schedule_advance: "UPDATE schedules SET last_tick_at = GREATEST(last_tick_at, $3) \
                 WHERE tenant = $1 AND name = $2"
                .to_owned(),
            // The exactly-once point (G4): a tick recorded before, by anyone, is skipped;
            // RETURNING names the ticks recorded now, whose jobs are then inserted in the
            // same transaction.
            ticks_record: "INSERT INTO schedule_ticks (tenant, schedule, tick_at, job_id) \
                 SELECT $1::text, $2::text, t.tick_at, t.job_id \
                 FROM unnest($3::timestamptz[], $4::uuid[]) AS t(tick_at, job_id) \
                 ORDER BY t.tick_at \
                 ON CONFLICT (tenant, schedule, tick_at) DO NOTHING \
                 RETURNING tick_at, job_id"
                .to_owned(),
            // As idempotency_delete_expired: locked rows by ctid, SKIP LOCKED between
            // cleaners.
            ticks_delete_old: "DELETE FROM schedule_ticks t \
                 WHERE t.ctid = ANY(ARRAY( \
                   SELECT ctid FROM schedule_ticks \
                   WHERE tick_at < $1 \
                   ORDER BY tick_at \
                   LIMIT $2 \
                   FOR UPDATE SKIP LOCKED)) \
                 AND t.tick_at < $1"
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

        if let Some(k) = &p.kind {
            push("kind", "=", Box::new(k.as_str().to_owned()));
        }
        if let Some(after) = p.after {
            push("id", ">", Box::new(*after.as_uuid()));
        }
        if let Some(s) = p.state {
            // A literal, not a parameter: a plan prepared for "any state" could not use the
            // listing indexes, which leave running jobs out.
            clauses.push(crate::listing_state_filter("j.", s));
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

/// The lease statement, with `filter` (more conditions on the candidate rows, or nothing)
/// added to the inner walk. See [`Sql::lease`].
fn lease_statement(filter: &str) -> String {
    format!(
        "WITH picked AS ( \
           SELECT id FROM jobs \
           WHERE state IN ({lease}) AND queue = $1 \
             AND NOT EXISTS (SELECT 1 FROM queues WHERE name = $1 AND paused) \
             {filter} \
           ORDER BY priority, run_at, id \
           LIMIT $2 \
           FOR UPDATE SKIP LOCKED \
         ) \
         UPDATE jobs j SET state = '{to}', attempt = j.attempt + 1, lease_owner = $3, \
           lease_token = gen_random_uuid(), lease_expires_at = $4, started_at = $5, \
           unique_key = CASE WHEN j.unique_scope = 'queued' THEN NULL \
                             ELSE j.unique_key END \
         FROM picked \
         WHERE j.id = picked.id AND j.state IN ({lease}) \
         RETURNING {COLUMNS}",
        lease = guard(Transition::Lease),
        to = target(Transition::Lease),
    )
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
    fn the_unique_arbiter_is_the_index_predicate() {
        let migration = include_str!("../../migrations/postgres/0003_scale_out.sql");
        let index = migration
            .split("CREATE UNIQUE INDEX jobs_unique_idx")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .expect("the migration creates jobs_unique_idx");
        let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let predicate = squash(&UNIQUE_HOLDING.replace("j.", ""));
        assert!(
            squash(index).ends_with(&format!("WHERE {predicate}")),
            "{index} vs {predicate}"
        );
        let held = predicate.split("state IN (").nth(1).expect("a state list");
        for s in JobState::ALL {
            assert_eq!(
                held.contains(&format!("'{}'", s.as_str())),
                keel_core::UniqueScopeKind::Active.holds_in(s),
                "{s} in {predicate}"
            );
        }
        assert!(
            SQL.insert_unique
                .contains(&format!("WHERE {predicate} DO NOTHING"))
        );
    }

    #[test]
    fn announcements_fit_a_notification() {
        let line = 36 + 1 + "discarded".len() + 1 + keel_core::QueueName::MAX_LEN + 1;
        assert!(line * CHANGES_PER_NOTIFICATION < 8000);
        // Completions and failures are not announced: a notifying transaction serialises
        // commits (see the module documentation).
        assert!(!SQL.complete.contains("pg_notify"), "{}", SQL.complete);
        assert!(
            !SQL.fail_update.contains("pg_notify"),
            "{}",
            SQL.fail_update
        );
        assert!(SQL.rescue_update.contains("pg_notify($6"));
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
                "WHERE j.queue = $1 AND j.id > $2 AND j.state = 'available' \
                 AND j.state <> 'running' ORDER BY j.id LIMIT $3"
            ),
            "{}",
            q.sql
        );
        assert_eq!(q.params().len(), 3);
    }
}
