//! Plans: the hot statements, exactly as the store sends them, use their indexes on a table
//! shaped like production, with their parameters bound and as generic plans (see the parent
//! module).

use std::collections::BTreeSet;
use std::sync::Arc;

use deadpool_postgres::Object;
use keel_core::store::ListParams;
use keel_core::{Clock, JobId, JobState, JobStore, ManualClock, QueueName, Store};
use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::{noop, schema_or_skip, store_with_clock};
use crate::postgres::PgOptions;
use crate::postgres::idempotency::{IDEMPOTENCY_EXPIRE_SQL, IDEMPOTENCY_READ_SQL};
use crate::postgres::jobs::ListQuery;
use crate::postgres::maintenance::{
    DELETE_FINISHED_SQL, IDEMPOTENCY_DELETE_EXPIRED_SQL, PROMOTE_SQL, RESCUE_LOCK_SQL,
};
use crate::postgres::queues::QUEUE_DEPTHS_SQL;
use crate::postgres::rows::UNIQUE_HOLDERS_SQL;

/// Rows loaded: 88 % completed, 6 % available over 8 queues, 2 % each running and
/// scheduled, 2 % retryable. Ids are time-ordered like the UUIDv7s the store assigns.
const LOAD: &str = "
INSERT INTO jobs (id, queue, kind, tenant, args, priority, state, attempt, max_attempts,
                  timeout_ms, backoff, tags, run_at, created_at, started_at, finished_at,
                  lease_owner, lease_token, lease_expires_at)
SELECT ('00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
       'q' || (i % 8), 'noop', 't' || (i % 16), '{}'::json, (i % 10)::int2, s.state,
       CASE WHEN s.state IN ('available', 'scheduled') THEN 0 ELSE 1 END,
       25, 60000, '{\"type\":\"fixed\",\"delay_ms\":1000}'::jsonb, '[]'::jsonb,
       CASE WHEN s.state IN ('scheduled', 'retryable') THEN now() + i * interval '1 ms'
            ELSE now() - interval '1 hour' + i * interval '1 ms' END,
       now() - interval '2 hours' + i * interval '1 ms',
       CASE WHEN s.state IN ('running', 'completed', 'retryable')
            THEN now() - interval '1 hour' END,
       CASE WHEN s.state = 'completed' THEN now() - interval '30 minutes' + i * interval '1 ms' END,
       CASE WHEN s.state IN ('running', 'completed') THEN 'w1' END,
       CASE WHEN s.state = 'running' THEN gen_random_uuid() END,
       CASE WHEN s.state = 'running' THEN now() + interval '30 seconds' END
FROM (SELECT i,
             CASE WHEN i % 100 < 88 THEN 'completed'
                  WHEN i % 100 < 94 THEN 'available'
                  WHEN i % 100 < 96 THEN 'running'
                  WHEN i % 100 < 98 THEN 'scheduled'
                  ELSE 'retryable' END AS state
      FROM generate_series(1, 120000) AS i) AS s;
INSERT INTO queues (name, paused, updated_at)
SELECT 'q' || i, i % 3 = 0, now() FROM generate_series(100, 300) AS i;
INSERT INTO idempotency_keys (tenant, key, fingerprint, status, body, created_at, expires_at)
SELECT 't' || (i % 16), 'key-' || i, 'fp', 201, '\\x7b7d'::bytea, now() - interval '1 day',
       now() + (i - 2000) * interval '1 second'
FROM generate_series(1, 40000) AS i;
ANALYZE jobs;
ANALYZE queues;
ANALYZE idempotency_keys;
";

/// Tables that grow with traffic: a sequential scan of either is a defect. (`queues` holds a
/// row per paused or resumed queue; reading all of it can be the cheapest plan.)
const LARGE_TABLES: [&str; 2] = ["jobs", "idempotency_keys"];

/// What a plan does, gathered from its JSON form.
#[derive(Default)]
struct PlanFacts {
    /// Large tables read by a sequential scan (once per scan).
    seq_scans: Vec<String>,
    /// Every index the plan uses.
    indexes: Vec<String>,
    /// Relations read inside an InitPlan: evaluated once per statement.
    once: BTreeSet<String>,
    /// Relations read anywhere else.
    elsewhere: BTreeSet<String>,
    /// CTEs and a batch's `unnest`ed arrays read as the inner side of a nested loop: read
    /// again for every outer row, so the statement is quadratic in a batch (migration 12
    /// tells what that cost a heartbeat).
    rescanned: Vec<String>,
}

impl PlanFacts {
    fn of(plan: &Value) -> Self {
        let mut facts = Self::default();
        facts.walk(plan, false);
        facts
    }

    fn walk(&mut self, plan: &Value, in_init_plan: bool) {
        match plan {
            Value::Object(map) => {
                // A CTE is an InitPlan too ("CTE picked"); only an uncorrelated sublink's
                // ("InitPlan 1 (returns $0)") runs once per statement by construction.
                let in_init_plan = in_init_plan
                    || (map.get("Parent Relationship").and_then(Value::as_str) == Some("InitPlan")
                        && map
                            .get("Subplan Name")
                            .and_then(Value::as_str)
                            .is_some_and(|n| n.starts_with("InitPlan")));
                if let Some(rel) = map.get("Relation Name").and_then(Value::as_str) {
                    if map.get("Node Type").and_then(Value::as_str) == Some("Seq Scan")
                        && LARGE_TABLES.contains(&rel)
                    {
                        self.seq_scans.push(rel.to_owned());
                    }
                    let reads = if in_init_plan {
                        &mut self.once
                    } else {
                        &mut self.elsewhere
                    };
                    reads.insert(rel.to_owned());
                }
                if let Some(index) = map.get("Index Name").and_then(Value::as_str) {
                    self.indexes.push(index.to_owned());
                }
                if map.get("Node Type").and_then(Value::as_str) == Some("Nested Loop") {
                    let inner = map
                        .get("Plans")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter(|p| p["Parent Relationship"] == "Inner")
                        .filter_map(|p| match p["Node Type"].as_str() {
                            Some("CTE Scan") => p["CTE Name"].as_str(),
                            // Not a function called per row on purpose (the release's
                            // pg_notify): a batch's arrays read again.
                            Some("Function Scan") if p["Function Name"] == "unnest" => {
                                Some("unnest")
                            }
                            _ => None,
                        });
                    self.rescanned.extend(inner.map(str::to_owned));
                }
                map.values().for_each(|v| self.walk(v, in_init_plan));
            }
            Value::Array(items) => items.iter().for_each(|v| self.walk(v, in_init_plan)),
            _ => {}
        }
    }
}

/// What is wrong with `plan`, if anything: a sequential scan of a large table, a CTE or a
/// batch's `unnest` read again for every row of a join, not using the index the statement
/// was designed for (when `index` is given), or reading a table of `once` other than once
/// per statement.
fn check(
    name: &str,
    mode: &str,
    plan: &Value,
    index: Option<&str>,
    once: &[&str],
) -> Option<String> {
    let facts = PlanFacts::of(plan);
    let pretty = || serde_json::to_string_pretty(plan).unwrap_or_default();
    if !facts.seq_scans.is_empty() {
        return Some(format!(
            "{name} ({mode}) scans {:?} sequentially:\n{}",
            facts.seq_scans,
            pretty()
        ));
    }
    if !facts.rescanned.is_empty() {
        return Some(format!(
            "{name} ({mode}) reads {:?} again for every row of a nested loop:\n{}",
            facts.rescanned,
            pretty()
        ));
    }
    if let Some(index) = index
        && !facts.indexes.iter().any(|i| i == index)
    {
        return Some(format!(
            "{name} ({mode}) does not use {index} (uses {:?}):\n{}",
            facts.indexes,
            pretty()
        ));
    }
    if let Some(rel) = once
        .iter()
        .find(|r| !facts.once.contains(**r) || facts.elsewhere.contains(**r))
    {
        return Some(format!(
            "{name} ({mode}) does not read {rel} exactly once per statement (in an \
             InitPlan):\n{}",
            pretty()
        ));
    }
    None
}

/// One statement to check: its text, bound values for the custom plan, the same values as
/// SQL literals for `EXECUTE` (generic plan), and the index it must use.
struct Case<'a> {
    name: &'a str,
    sql: &'a str,
    params: Vec<&'a (dyn ToSql + Sync)>,
    literals: String,
    /// The index the custom plan must use.
    index: &'a str,
    /// Whether the generic plan must use it too. A generic plan is planned without the
    /// values, so for a selective filter with a LIMIT the planner may reasonably prefer
    /// walking the primary key and filtering; Postgres only keeps a generic plan when it
    /// costs no more than the custom ones, so for those statements the requirement is only
    /// "no sequential scan".
    generic_uses_index: bool,
    /// Tables the statement must read once per execution (an InitPlan), whatever the
    /// number of rows it touches.
    once: &'a [&'a str],
}

/// A statement of a PL/pgSQL function of a migration: the one after `marker` (`RETURN
/// QUERY`, or `PERFORM`, which becomes a SELECT), its parameters renamed to `$1`, `$2`, … as
/// `args` says, so it can be explained as the function plans it.
fn function_query(migration: &str, marker: &str, args: &[(&str, &str)]) -> String {
    let query = migration
        .split(marker)
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .expect("the function's statement in its migration");
    let query = if marker == "PERFORM" {
        format!("SELECT {query}")
    } else {
        query.to_owned()
    };
    args.iter()
        .fold(query, |q, (name, param)| q.replace(name, param))
}

/// The statement keel_lease runs (migrations/postgres/0011_lease_commits_async.sql, which
/// redefines migration 9's): the walk, in an InitPlan, and the update of the rows it locked.
fn lease_sql() -> String {
    function_query(
        include_str!("../../../migrations/postgres/0011_lease_commits_async.sql"),
        "RETURN QUERY",
        &[
            ("p_queue", "$1"),
            ("p_max", "$2"),
            ("p_owner", "$3"),
            ("p_expires_at", "$4"),
            ("p_started_at", "$5"),
            ("p_tenant", "$6::text"),
            ("p_kinds", "$7::text[]"),
        ],
    )
}

/// keel_lease's own settings (migrations/postgres/0011_lease_commits_async.sql), for explaining its
/// statement as it plans it.
const LEASE_SETTINGS: &str =
    "SET enable_seqscan = off; SET enable_sort = off; SET enable_bitmapscan = off";
const LEASE_SETTINGS_RESET: &str =
    "RESET enable_seqscan; RESET enable_sort; RESET enable_bitmapscan";

/// The one statement keel_complete runs
/// (migrations/postgres/0014_completion_locks_as_it_updates.sql).
fn complete_sql() -> String {
    let migration =
        include_str!("../../../migrations/postgres/0014_completion_locks_as_it_updates.sql");
    function_query(
        migration,
        "RETURN QUERY",
        &[
            ("p_ids", "$1::uuid[]"),
            ("p_tokens", "$2::uuid[]"),
            ("p_results", "$3::text[]"),
            ("p_finished_at", "$4::timestamptz"),
        ],
    )
}

/// Whether `plan` reaches its rows in id order: a nested loop whose outer side sorts the
/// batch by id and whose inner side looks each id up by primary key. The completion takes
/// each row's lock as it reaches it, so this order is what keeps it out of deadlocks with
/// the other writers that lock running rows in id order (migration 14).
fn reaches_rows_in_id_order(plan: &Value) -> bool {
    fn find<'a>(plan: &'a Value, node_type: &str) -> Option<&'a Value> {
        if plan.get("Node Type").and_then(Value::as_str) == Some(node_type) {
            return Some(plan);
        }
        let children = plan.get("Plans").and_then(Value::as_array)?;
        children.iter().find_map(|c| find(c, node_type))
    }
    let root = plan.get(0).and_then(|p| p.get("Plan")).unwrap_or(plan);
    let Some(nested) = find(root, "Nested Loop") else {
        return false;
    };
    let children = nested.get("Plans").and_then(Value::as_array);
    let (Some(outer), Some(inner)) = (
        children.and_then(|c| c.first()),
        children.and_then(|c| c.get(1)),
    ) else {
        return false;
    };
    let sorted_by_id = find(outer, "Sort")
        .and_then(|s| s.get("Sort Key"))
        .and_then(Value::as_array)
        .and_then(|keys| keys.first())
        .and_then(Value::as_str)
        == Some("u.id");
    let by_primary_key = inner.get("Index Name").and_then(Value::as_str) == Some("jobs_pkey");
    sorted_by_id && by_primary_key
}

/// The three statements keel_extend_leases runs
/// (migrations/postgres/0013_heartbeat_skips_busy_rows.sql): the lock pass that skips rows
/// other transactions hold, the update of the rows it locked (`$1`, its array of ids), and
/// the read of every lease still held.
fn extend_sql() -> [String; 3] {
    let migration = include_str!("../../../migrations/postgres/0013_heartbeat_skips_busy_rows.sql");
    let batch = [("p_ids", "$1::uuid[]"), ("p_tokens", "$2::uuid[]")];
    let update = "UPDATE jobs j SET lease_expires_at";
    [
        format!(
            "SELECT array_agg(f.id){}",
            function_query(migration, "INTO v_free", &batch)
        ),
        format!(
            "{update}{}",
            function_query(
                migration,
                update,
                &[
                    ("v_free", "$1::uuid[]"),
                    ("p_expires_at", "$2::timestamptz")
                ],
            )
        ),
        function_query(migration, "RETURN QUERY", &batch),
    ]
}

/// The update of keel_release (migrations/postgres/0012_heartbeat_release_functions.sql),
/// after its lock pass in id order.
fn release_sql() -> String {
    let migration =
        include_str!("../../../migrations/postgres/0012_heartbeat_release_functions.sql");
    let (_, release) = migration
        .split_once("CREATE FUNCTION keel_release(")
        .expect("keel_release in its migration");
    let lock = "PERFORM FROM jobs j WHERE j.id = ANY(p_ids) ORDER BY j.id FOR UPDATE;";
    assert!(release.contains(lock), "{migration}");
    function_query(
        release,
        "RETURN QUERY",
        &[
            ("p_ids", "$1::uuid[]"),
            ("p_tokens", "$2::uuid[]"),
            ("p_channel", "$3::text"),
        ],
    )
}

/// The plan Postgres keeps for `case` when it plans once for any values, as PL/pgSQL does
/// under `plan_cache_mode = force_generic_plan`.
async fn generic_plan(conn: &Object, case: &Case<'_>) -> Value {
    let stmt = format!(
        "keel_explain_{}",
        case.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    conn.batch_execute(&format!(
        "PREPARE {stmt} AS {}; SET plan_cache_mode = force_generic_plan",
        case.sql
    ))
    .await
    .unwrap_or_else(|e| panic!("preparing {}: {e:?}", case.name));
    let row = conn
        .query_one(
            &format!("EXPLAIN (FORMAT JSON) EXECUTE {stmt}({})", case.literals),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("explaining generic {}: {e:?}", case.name));
    conn.batch_execute(&format!("DEALLOCATE {stmt}; RESET plan_cache_mode"))
        .await
        .unwrap_or_else(|e| panic!("cleaning up {}: {e:?}", case.name));
    row.get(0)
}

/// `case`'s custom plan (its parameters bound) and its generic plan, each with its name.
async fn plans(conn: &Object, case: &Case<'_>) -> [(&'static str, Value); 2] {
    let row = conn
        .query_one(&format!("EXPLAIN (FORMAT JSON) {}", case.sql), &case.params)
        .await
        .unwrap_or_else(|e| panic!("explaining {}: {e:?}", case.name));
    let custom: Value = row.get(0);
    let generic = generic_plan(conn, case).await;
    [("custom plan", custom), ("generic plan", generic)]
}

/// What is wrong with `plans` of `case` (see [`check`]).
fn plan_problems(case: &Case<'_>, plans: &[(&'static str, Value); 2]) -> Vec<String> {
    let [(custom_mode, custom), (generic_mode, generic)] = plans;
    let generic_index = case.generic_uses_index.then_some(case.index);
    [
        check(case.name, custom_mode, custom, Some(case.index), case.once),
        check(case.name, generic_mode, generic, generic_index, case.once),
    ]
    .into_iter()
    .flatten()
    .collect()
}

async fn explain(conn: &Object, case: &Case<'_>) -> Vec<String> {
    plan_problems(case, &plans(conn, case).await)
}

#[tokio::test]
async fn explain_hot_queries_use_indexes() {
    let Some(schema) = schema_or_skip("postgres::tests::explain_hot_queries_use_indexes").await
    else {
        return;
    };
    let clock = ManualClock::starting_now();
    let store = store_with_clock(&schema, PgOptions::for_tests(), Arc::new(clock.clone())).await;
    let conn = store.pool().get().await.expect("a pooled connection");
    conn.batch_execute(LOAD)
        .await
        .expect("load and analyze jobs");
    let total: i64 = conn
        .query_one("SELECT count(*) FROM jobs", &[])
        .await
        .expect("count jobs")
        .get(0);
    assert!(total >= 100_000, "loaded only {total} rows");

    let now = clock.now();
    let ts = |t: keel_core::Timestamp| format!("'{}'::timestamptz", t.to_rfc3339());
    let past = now - chrono::TimeDelta::minutes(10);

    let queue = QueueName::parse("q3").expect("valid queue");
    let by_queue_state = ListQuery::new(&ListParams {
        queue: Some(queue.clone()),
        state: Some(JobState::Available),
        limit: 100,
        ..ListParams::default()
    });
    let running_by_queue = ListQuery::new(&ListParams {
        queue: Some(queue.clone()),
        state: Some(JobState::Running),
        limit: 100,
        ..ListParams::default()
    });
    let completed_by_queue = ListQuery::new(&ListParams {
        queue: Some(queue.clone()),
        state: Some(JobState::Completed),
        limit: 100,
        ..ListParams::default()
    });
    let cursor = JobId::parse("00000000-0000-7000-8000-000000000400").expect("valid id");
    let ids = vec![*cursor.as_uuid()];
    let tokens = vec![*cursor.as_uuid()];
    let results: Vec<Option<String>> = vec![None];
    let after_cursor = ListQuery::new(&ListParams {
        after: Some(cursor),
        limit: 100,
        ..ListParams::default()
    });
    let limit = 100_i64;
    let (owner, queue_name) = ("w2", queue.as_str());
    let (tenant, key) = ("t3", "key-3");
    let channel = "keel_jobs:explain";
    let (tenants, keys) = (vec!["t3"], vec!["key-3"]);

    let cases = [
        Case {
            name: "list by queue and state",
            sql: &by_queue_state.sql,
            params: by_queue_state.params(),
            literals: "'q3', 100".to_owned(),
            // The state is a literal (the listing indexes leave running jobs out, so the
            // plan must know it): the generic plan is the custom one.
            index: "jobs_queue_state_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "list running by queue",
            sql: &running_by_queue.sql,
            params: running_by_queue.params(),
            literals: "'q3', 100".to_owned(),
            index: "jobs_expired_lease_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            // The listing indexes leave completed jobs out (migration 10): a page of them
            // walks the primary key, where they are most of the rows.
            name: "list completed by queue",
            sql: &completed_by_queue.sql,
            params: completed_by_queue.params(),
            literals: "'q3', 100".to_owned(),
            index: "jobs_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "list after cursor",
            sql: &after_cursor.sql,
            params: after_cursor.params(),
            literals: format!("'{cursor}', 100"),
            index: "jobs_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "promote",
            sql: &PROMOTE_SQL,
            params: vec![&now, &limit, &channel],
            literals: format!("{}, 100, 'keel_jobs:explain'", ts(now)),
            index: "jobs_due_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "rescue",
            sql: &RESCUE_LOCK_SQL,
            params: vec![&now, &limit],
            literals: format!("{}, 100", ts(now)),
            index: "jobs_expired_lease_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "delete finished",
            sql: &DELETE_FINISHED_SQL,
            params: vec![&past, &limit],
            literals: format!("{}, 100", ts(past)),
            index: "jobs_finished_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "read idempotency key",
            sql: IDEMPOTENCY_READ_SQL,
            params: vec![&tenant, &key, &now],
            literals: format!("'t3', 'key-3', {}", ts(now)),
            index: "idempotency_keys_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "expire idempotency key",
            sql: IDEMPOTENCY_EXPIRE_SQL,
            params: vec![&tenant, &key, &now],
            literals: format!("'t3', 'key-3', {}", ts(now)),
            index: "idempotency_keys_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "unique holders",
            sql: &UNIQUE_HOLDERS_SQL,
            params: vec![&tenants, &keys],
            literals: "ARRAY['t3'], ARRAY['key-3']".to_owned(),
            index: "jobs_unique_idx",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "delete expired idempotency keys",
            sql: IDEMPOTENCY_DELETE_EXPIRED_SQL,
            params: vec![&now, &limit],
            literals: format!("{}, 100", ts(now)),
            index: "idempotency_keys_expires_idx",
            generic_uses_index: true,
            once: &[],
        },
    ];
    let mut problems = Vec::new();
    for case in &cases {
        problems.extend(explain(&conn, case).await);
    }
    // The lease inside keel_lease, planned with the function's own settings: the walk
    // follows the lease index and reads the queue's settings once; the update finds the
    // walk's ids by primary key.
    let lease_sql = lease_sql();
    let (no_tenant, every_kind): (Option<&str>, Vec<&str>) = (None, Vec::new());
    let lease_params: Vec<&(dyn ToSql + Sync)> = vec![
        &queue_name,
        &limit,
        &owner,
        &now,
        &now,
        &no_tenant,
        &every_kind,
    ];
    let lease_literals = format!("'q3', 100, 'w2', {0}, {0}, NULL, '{{}}'", ts(now));
    let lease = [
        Case {
            name: "lease walk",
            sql: &lease_sql,
            params: lease_params.clone(),
            literals: lease_literals.clone(),
            index: "jobs_lease_idx",
            generic_uses_index: true,
            once: &["queues"],
        },
        Case {
            name: "lease update",
            sql: &lease_sql,
            params: lease_params,
            literals: lease_literals,
            index: "jobs_pkey",
            generic_uses_index: true,
            once: &[],
        },
    ];
    conn.batch_execute(LEASE_SETTINGS)
        .await
        .expect("the lease's settings");
    for case in &lease {
        problems.extend(explain(&conn, case).await);
    }
    conn.batch_execute(LEASE_SETTINGS_RESET)
        .await
        .expect("resetting the lease's settings");
    // The completion inside keel_complete, and the heartbeat's statements and the
    // release's update, each planned with its function's settings (the same for all).
    conn.batch_execute(
        "SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off",
    )
    .await
    .expect("the completion's settings");
    let complete_sql = complete_sql();
    let complete = Case {
        name: "complete",
        sql: &complete_sql,
        params: vec![&ids, &tokens, &results, &now],
        literals: format!(
            "ARRAY['{cursor}'::uuid], ARRAY['{cursor}'::uuid], ARRAY[NULL::text], {}",
            ts(now)
        ),
        // By primary key only, never by the running index (dead entries pile up there).
        index: "jobs_pkey",
        generic_uses_index: true,
        once: &[],
    };
    let complete_plans = plans(&conn, &complete).await;
    problems.extend(plan_problems(&complete, &complete_plans));
    for (mode, plan) in &complete_plans {
        if !reaches_rows_in_id_order(plan) {
            problems.push(format!(
                "complete ({mode}) does not reach its rows in id order:\n{}",
                serde_json::to_string_pretty(plan).unwrap_or_default()
            ));
        }
    }
    let [extend_lock_sql, extend_sql, extended_sql] = extend_sql();
    let release_sql = release_sql();
    let channel = "keel_wakeups";
    let batch_literals = format!("ARRAY['{cursor}'::uuid], ARRAY['{cursor}'::uuid]");
    let batched = [
        Case {
            name: "extend leases: lock",
            sql: &extend_lock_sql,
            params: vec![&ids, &tokens],
            literals: batch_literals.clone(),
            index: "jobs_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "extend leases: update",
            sql: &extend_sql,
            params: vec![&ids, &now],
            literals: format!("ARRAY['{cursor}'::uuid], {}", ts(now)),
            index: "jobs_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "extend leases: read",
            sql: &extended_sql,
            params: vec![&ids, &tokens],
            literals: batch_literals.clone(),
            index: "jobs_pkey",
            generic_uses_index: true,
            once: &[],
        },
        Case {
            name: "release",
            sql: &release_sql,
            params: vec![&ids, &tokens, &channel],
            literals: format!("{batch_literals}, '{channel}'"),
            index: "jobs_pkey",
            generic_uses_index: true,
            once: &[],
        },
    ];
    for case in &batched {
        problems.extend(explain(&conn, case).await);
    }
    conn.batch_execute("RESET enable_seqscan; RESET enable_hashjoin; RESET enable_mergejoin")
        .await
        .expect("resetting the completion's settings");
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));

    // The gauges' count (no parameters: one plan) reads the unfinished jobs through their
    // partial indexes, never an index that holds the finished ones.
    let row = conn
        .query_one(&format!("EXPLAIN (FORMAT JSON) {}", *QUEUE_DEPTHS_SQL), &[])
        .await
        .expect("explain queue depths");
    let plan: Value = row.get(0);
    let facts = PlanFacts::of(&plan);
    let pretty = serde_json::to_string_pretty(&plan).unwrap_or_default();
    assert!(facts.seq_scans.is_empty(), "{pretty}");
    for index in ["jobs_lease_idx", "jobs_due_idx", "jobs_expired_lease_idx"] {
        assert!(
            facts.indexes.iter().any(|i| i == index),
            "{index}: {pretty}"
        );
    }
    for index in [
        "jobs_queue_state_idx",
        "jobs_tenant_state_idx",
        "jobs_finished_idx",
    ] {
        assert!(
            !facts.indexes.iter().any(|i| i == index),
            "{index}: {pretty}"
        );
    }
    drop(conn);
    store.close().await;
}

/// On a table without statistics (a fresh schema: autovacuum has not analysed it yet), the
/// lease still updates the walk's ids by primary key, not by scanning another index for them.
#[tokio::test]
async fn the_lease_of_a_young_table_updates_by_primary_key() {
    let Some(schema) =
        schema_or_skip("postgres::tests::the_lease_of_a_young_table_updates_by_primary_key").await
    else {
        return;
    };
    let clock = ManualClock::starting_now();
    let store = store_with_clock(&schema, PgOptions::for_tests(), Arc::new(clock.clone())).await;
    let queue = QueueName::parse("young").expect("valid queue");
    let jobs: Vec<keel_core::NewJob> = (0..10_000).map(|_| noop().queue(queue.clone())).collect();
    store.insert(jobs).await.expect("insert");
    let conn = store.pool().get().await.expect("a pooled connection");
    let analysed: Option<i64> = conn
        .query_one(
            "SELECT analyze_count + autoanalyze_count FROM pg_stat_user_tables \
             WHERE relid = 'jobs'::regclass",
            &[],
        )
        .await
        .expect("the table's statistics")
        .get(0);
    assert_eq!(analysed, Some(0), "the table must not have been analysed");

    let now = clock.now();
    let (limit, owner, queue_name) = (100_i64, "w1", queue.as_str());
    let (no_tenant, every_kind): (Option<&str>, Vec<&str>) = (None, Vec::new());
    let sql = lease_sql();
    let lease = Case {
        name: "lease of a young table",
        sql: &sql,
        params: vec![
            &queue_name,
            &limit,
            &owner,
            &now,
            &now,
            &no_tenant,
            &every_kind,
        ],
        literals: format!(
            "'young', 100, 'w1', '{0}'::timestamptz, '{0}'::timestamptz, NULL, '{{}}'",
            now.to_rfc3339()
        ),
        index: "jobs_pkey",
        generic_uses_index: true,
        once: &[],
    };
    conn.batch_execute(LEASE_SETTINGS)
        .await
        .expect("the lease's settings");
    let problems = explain(&conn, &lease).await;
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    // The walk reads the lease index once, and the update finds its ids by primary key
    // alone: the lease index holds every waiting job, and a plan that reads it again to find
    // the walk's ids (a scan, or a bitmap ANDed with the primary key's) reads all of them at
    // every lease. The generic plan is the one keel_lease keeps.
    let plan = generic_plan(&conn, &lease).await;
    let facts = PlanFacts::of(&plan);
    let mut job_indexes: Vec<&str> = facts
        .indexes
        .iter()
        .map(String::as_str)
        .filter(|i| i.starts_with("jobs_"))
        .collect();
    job_indexes.sort_unstable();
    assert_eq!(
        job_indexes,
        ["jobs_lease_idx", "jobs_pkey"],
        "{}",
        serde_json::to_string_pretty(&plan).unwrap_or_default()
    );
    conn.batch_execute(LEASE_SETTINGS_RESET)
        .await
        .expect("resetting the lease's settings");
}
