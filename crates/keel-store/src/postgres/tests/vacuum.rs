//! Keel's own vacuum of the job tables ([`MaintenanceStore::vacuum`]): it runs where
//! autovacuum does not, once a table passes autovacuum's thresholds, and leaves the table
//! to autovacuum otherwise.

use keel_core::MaintenanceStore;

use super::{schema_or_skip, store_in};
use crate::postgres::PgOptions;

/// 3,000 available jobs, written by this connection, whose statistics it then flushes (a
/// backend otherwise reports them when idle, up to ten seconds later).
const INSERT_3000: &str = "
INSERT INTO jobs (id, queue, kind, tenant, args, priority, state, max_attempts, timeout_ms,
                  backoff, run_at, created_at)
SELECT gen_random_uuid(), 'q', 'noop', 't', '{}'::json, 0, 'available', 3, 60000,
       '{\"type\":\"fixed\",\"delay_ms\":1000}'::jsonb, now(), now()
FROM generate_series(1, 3000);
SELECT pg_stat_force_next_flush();
";

async fn vacuums_and_analyses(conn: &deadpool_postgres::Object) -> (i64, i64) {
    let row = conn
        .query_one(
            "SELECT vacuum_count, analyze_count FROM pg_stat_user_tables \
             WHERE relid = 'jobs'::regclass",
            &[],
        )
        .await
        .expect("the job table's statistics");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn the_job_table_is_vacuumed_when_its_autovacuum_is_off() {
    let Some(schema) = schema_or_skip(
        "postgres::tests::vacuum::the_job_table_is_vacuumed_when_its_autovacuum_is_off",
    )
    .await
    else {
        return;
    };
    let store = store_in(&schema, PgOptions::for_tests()).await;
    let conn = store.pool().get().await.expect("a pooled connection");
    conn.batch_execute("ALTER TABLE jobs SET (autovacuum_enabled = false)")
        .await
        .expect("switch the table's autovacuum off");
    // Below the threshold (1000 rows and 2 % of the table), nothing is done.
    assert_eq!(store.vacuum().await.expect("vacuum"), Vec::<String>::new());
    conn.batch_execute(INSERT_3000).await.expect("insert jobs");
    // The statistics were flushed when the batch ended; the next statement sees them.
    assert_eq!(vacuums_and_analyses(&conn).await, (0, 0));

    assert_eq!(store.vacuum().await.expect("vacuum"), ["jobs"]);
    assert_eq!(vacuums_and_analyses(&conn).await, (1, 1));
    // Done: the counters it decides on start again from zero.
    assert_eq!(store.vacuum().await.expect("vacuum"), Vec::<String>::new());
    assert_eq!(vacuums_and_analyses(&conn).await, (1, 1));
}

#[tokio::test]
async fn the_job_table_is_left_to_autovacuum_when_it_runs() {
    let Some(schema) =
        schema_or_skip("postgres::tests::vacuum::the_job_table_is_left_to_autovacuum_when_it_runs")
            .await
    else {
        return;
    };
    let store = store_in(&schema, PgOptions::for_tests()).await;
    let conn = store.pool().get().await.expect("a pooled connection");
    let server_autovacuum_off: bool = conn
        .query_one("SELECT current_setting('autovacuum') = 'off'", &[])
        .await
        .expect("the server's autovacuum setting")
        .get(0);
    conn.batch_execute(INSERT_3000).await.expect("insert jobs");
    let done = store.vacuum().await.expect("vacuum");
    if server_autovacuum_off {
        // Nothing else will vacuum the table.
        assert_eq!(done, ["jobs"]);
    } else {
        assert_eq!(done, Vec::<String>::new());
        assert_eq!(vacuums_and_analyses(&conn).await.0, 0);
    }
}
