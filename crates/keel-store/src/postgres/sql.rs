//! What the SQL of [`PgStore`](super::PgStore) shares: the state guards and targets derived
//! from the state machine, the announcement of state changes, and the two reads the shared
//! helpers in `mod.rs` run. Each statement lives in the module that runs it (`lease.rs`,
//! `jobs.rs`, `queues.rs`, `idempotency.rs`, `maintenance.rs`, `leader.rs`, `schedules.rs`;
//! the inserts in `rows.rs`, beside the columns they write), as a constant when its text is
//! fixed and as a `LazyLock` when it is built from the pieces below.
//!
//! Every state guard (`state IN (…)`) and every target state is derived from
//! [`Transition::sources`] and [`JobState::apply`], so a change to the state machine changes
//! the SQL with it. The states are written into the text as literals rather than passed as
//! parameters: the planner can only use a partial index (`WHERE state = 'available'`) when it
//! can prove the query's predicate implies the index's at plan time, which it cannot for a
//! parameter. The statements are built once per process and prepared once per connection
//! (`prepare_cached`).
//!
//! Rows are always selected through `rows::COLUMNS` with the table aliased `j`, and decoded
//! by position in `rows.rs`.
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
//! Completions and failures are not announced (`lease.rs` gives the measured reason). Lease,
//! insert and promote are not announced either: wakeups cover them.

use keel_core::{JobState, Transition};

/// Most state changes in one notification. A line is at most 36 (id) + 1 + 9 (state) + 1 +
/// 128 (queue) + 1 (newline) = 176 bytes, so 40 lines stay under 7,100 bytes, below
/// Postgres's 8,000-byte payload limit (beyond which `pg_notify` fails the statement).
pub(super) const CHANGES_PER_NOTIFICATION: usize = 40;

/// A query that announces the rows of `source` (a CTE with columns `id`, `state`, `queue`)
/// on the channel in parameter `channel`: one `pg_notify` per [`CHANGES_PER_NOTIFICATION`]
/// rows, none when `source` is empty (no group, no call).
pub(super) fn announce(source: &str, channel: &str) -> String {
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
pub(super) fn state_list(states: &[JobState]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The guard for `t`: the states it may start from.
pub(super) fn guard(t: Transition) -> String {
    state_list(&t.sources())
}

/// The state `t` leads to. Every transition the store issues as one statement leads to the
/// same state from each of its sources; the unit tests below check that, so this cannot pick
/// an arbitrary one silently.
pub(super) fn target(t: Transition) -> &'static str {
    t.sources()
        .into_iter()
        .find_map(|s| s.apply(t).ok())
        .map_or("invalid", JobState::as_str)
}

/// The jobs of these ids (`$1`) that exist: [`fenced_batch`](super::PgStore::fenced_batch)
/// tells a stale lease from a missing job with it, for every batch of `lease.rs`.
pub(super) const EXISTING_SQL: &str = "SELECT id FROM jobs WHERE id = ANY($1)";

/// A job's state: [`guarded`](super::PgStore::guarded) tells NotFound from a refused move
/// with it, for the guarded transitions of `jobs.rs`.
pub(super) const STATE_OF_SQL: &str = "SELECT state FROM jobs WHERE id = $1";

#[cfg(test)]
mod tests {
    use super::super::jobs::CANCEL_SQL;
    use super::super::lease::{FAIL_UPDATE_SQL, LEASE_SQL};
    use super::super::maintenance::{DELETE_FINISHED_SQL, PROMOTE_SQL, RESCUE_UPDATE_SQL};
    use super::*;

    /// The migrations whose functions hold batched statements, read by both tests below.
    /// keel_complete as migration 14 redefined it.
    const COMPLETE_FUNCTION: &str =
        include_str!("../../migrations/postgres/0014_completion_locks_as_it_updates.sql");
    const HEARTBEAT_RELEASE_FUNCTIONS: &str =
        include_str!("../../migrations/postgres/0012_heartbeat_release_functions.sql");
    /// keel_extend_leases as migration 13 redefined it.
    const HEARTBEAT_FUNCTION: &str =
        include_str!("../../migrations/postgres/0013_heartbeat_skips_busy_rows.sql");

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
        // The lease is a function of its own migrations (0009_generic_plans.sql, redefined
        // by 0011_lease_commits_async.sql): its guard and target are written there by hand. The guard is the walk's; a state term in the
        // update would let the planner find the walk's ids through the lease index (see
        // `lease.rs`).
        let lease = include_str!("../../migrations/postgres/0011_lease_commits_async.sql");
        let lease = lease
            .split("CREATE OR REPLACE FUNCTION keel_lease(")
            .nth(1)
            .expect("keel_lease in its migration");
        let to = format!("SET state = '{}'", target(Transition::Lease));
        assert!(lease.contains(&to), "{to} in {lease}");
        let sources = format!("w.state IN ({})", guard(Transition::Lease));
        assert!(lease.contains(&sources), "{sources} in {lease}");
        assert_eq!(lease.matches("state IN").count(), 1, "{lease}");
        assert!(
            lease.contains(
                "NOT EXISTS (SELECT 1 FROM queues s WHERE s.name = p_queue AND s.paused)"
            ),
            "{lease}"
        );
        assert!(LEASE_SQL.contains("FROM keel_lease("), "{}", *LEASE_SQL);
        // So is the completion's (0014_completion_locks_as_it_updates.sql): no guard, the
        // lease token is the fence (a live token means running), and the Complete
        // transition's target. Its update takes the locks, over the batch sorted by id.
        let complete = COMPLETE_FUNCTION;
        let to = format!("SET state = '{}'", target(Transition::Complete));
        assert!(complete.contains(&to), "{to} in {complete}");
        assert!(
            complete.contains("AND j.lease_token = l.token"),
            "{complete}"
        );
        assert!(complete.contains("ORDER BY u.id"), "{complete}");
        assert!(!complete.contains("FOR UPDATE"), "{complete}");
        // The release's (0012_heartbeat_release_functions.sql) too: the token is the fence,
        // and the target is the Release transition's.
        let release = HEARTBEAT_RELEASE_FUNCTIONS
            .split("CREATE FUNCTION keel_release(")
            .nth(1)
            .expect("keel_release in its migration");
        assert!(release.contains("AND j.lease_token = l.token"), "{release}");
        let to = format!("SET state = '{}'", target(Transition::Release));
        assert!(release.contains(&to), "{to} in {release}");
        assert!(!release.contains("state IN"), "{release}");
        // And the heartbeat's (0013_heartbeat_skips_busy_rows.sql): it locks only the rows
        // whose token is still the lease's, skipping those another transaction holds,
        // updates only what it locked, and answers only the leases still held.
        let heartbeat = HEARTBEAT_FUNCTION;
        let (lock, rest) = heartbeat
            .split_once("FOR UPDATE OF j SKIP LOCKED")
            .expect("the heartbeat's lock pass");
        assert!(lock.contains("AND j.lease_token = l.token"), "{lock}");
        let (update, read) = rest
            .split_once("RETURN QUERY")
            .expect("the heartbeat's read");
        assert!(update.contains("FROM unnest(v_free)"), "{update}");
        assert!(read.contains("AND j.lease_token = l.token"), "{read}");
        assert!(
            !heartbeat.contains("state IN") && !heartbeat.contains("state ="),
            "{heartbeat}"
        );
        let cancel = &*CANCEL_SQL;
        assert!(
            cancel.contains("state IN ('scheduled', 'available', 'running', 'retryable')"),
            "{cancel}"
        );
        let promote = &*PROMOTE_SQL;
        assert!(
            promote.contains("state IN ('scheduled', 'retryable')"),
            "{promote}"
        );
        let delete_finished = &*DELETE_FINISHED_SQL;
        assert!(
            delete_finished.contains("state IN ('completed', 'discarded', 'cancelled')"),
            "{delete_finished}"
        );
    }

    #[test]
    fn announcements_fit_a_notification() {
        let line = 36 + 1 + "discarded".len() + 1 + keel_core::QueueName::MAX_LEN + 1;
        assert!(line * CHANGES_PER_NOTIFICATION < 8000);
        // Completions and failures are not announced: a notifying transaction serialises
        // commits (see the documentation of `lease.rs`).
        let complete = COMPLETE_FUNCTION;
        assert!(!complete.contains("pg_notify"), "{complete}");
        assert!(
            !FAIL_UPDATE_SQL.contains("pg_notify"),
            "{}",
            *FAIL_UPDATE_SQL
        );
        assert!(RESCUE_UPDATE_SQL.contains("pg_notify($6"));
        // Nor do inserts notify in their own transaction: the notifier wakes their queues
        // after the commit (`wakeup.rs`).
        for insert in [
            super::super::rows::INSERT_SQL,
            &super::super::rows::INSERT_UNIQUE_SQL,
        ] {
            assert!(!insert.contains("pg_notify"), "{insert}");
        }
        // A released job is available again: its queue's listeners are told.
        let functions = HEARTBEAT_RELEASE_FUNCTIONS;
        let body = |tag: &str| {
            functions
                .split(tag)
                .nth(1)
                .unwrap_or_else(|| panic!("{tag} in 0012_heartbeat_release_functions.sql"))
        };
        let release = body("$release$");
        assert!(
            !HEARTBEAT_FUNCTION.contains("pg_notify("),
            "{HEARTBEAT_FUNCTION}"
        );
        assert!(
            release.contains("pg_notify(p_channel, r.queue)"),
            "{release}"
        );
    }
}
