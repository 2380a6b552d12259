//! The physical reference (SPEC §7): what Postgres itself sustains for the same minimal job
//! lifecycle, measured with `pgbench` on the same server, so Keel's figures can be read as a
//! fraction of the machine's limit rather than as bare numbers.
//!
//! Three scripts, each with 8 clients in a scratch schema of its own:
//! - **lifecycle, minimal table** — per transaction of the script: insert 100 jobs in one
//!   statement, lease 100 with `FOR UPDATE SKIP LOCKED` in one statement, complete them by
//!   id in one statement (three commits, as Keel does them). The table has Keel's columns
//!   that the lifecycle touches and only the lease index: the reference shape.
//! - **lifecycle, Keel's table** — the same three statements on Keel's own `jobs` table
//!   (created by Keel's migrations, with all its indexes and checks), so the cost of the
//!   schema itself is visible.
//! - **one-row insert** — one Keel-shaped job per transaction into Keel's `jobs`: the
//!   ceiling of durable enqueues without group commit (one commit, one WAL flush, each).
//!
//! jobs/s = transactions/s × 100 for the lifecycles. The ids of Keel-shaped rows are
//! time-ordered like Keel's UUIDv7 (microsecond clock, then random bits), so inserts append
//! to the primary key as Keel's do instead of scattering over it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_core::SystemClock;
use keel_store::{DatabaseUrl, PgOptions, SqliteOptions};
use tokio::process::Command;

use super::server::{Scratch, execute};

/// pgbench clients, as in the reference figures.
pub(crate) const CLIENTS: usize = 8;
/// Jobs per lifecycle transaction.
const BATCH: f64 = 100.0;

const MINIMAL_TABLE: &str = "
CREATE TABLE bench_min_jobs (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue            text        NOT NULL,
    kind             text        NOT NULL,
    args             json        NOT NULL,
    priority         smallint    NOT NULL,
    state            text        NOT NULL,
    attempt          integer     NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz
);
CREATE INDEX bench_min_jobs_lease_idx ON bench_min_jobs (queue, priority, run_at, id)
    WHERE state = 'available';
";

/// `\gset` stores the leased ids (as one array) for the completing statement; with
/// `-M prepared` pgbench passes `:ids` as a parameter.
const MINIMAL_LIFECYCLE: &str = "
INSERT INTO bench_min_jobs (queue, kind, args, priority, state, run_at, created_at)
SELECT 'bench', 'noop', 'null', 4, 'available', now(), now() FROM generate_series(1, 100);
WITH picked AS (
    SELECT id FROM bench_min_jobs
    WHERE state = 'available' AND queue = 'bench'
    ORDER BY priority, run_at, id
    LIMIT 100
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE bench_min_jobs j
    SET state = 'running', attempt = j.attempt + 1, started_at = now(),
        lease_expires_at = now() + interval '30 seconds'
    FROM picked WHERE j.id = picked.id
    RETURNING j.id
)
SELECT coalesce(array_agg(id), '{}') AS ids FROM leased \\gset
UPDATE bench_min_jobs
SET state = 'completed', finished_at = now(), lease_expires_at = NULL
WHERE id = ANY (:ids::bigint[]) AND state = 'running';
";

/// A time-ordered UUID: 16 hex digits of microseconds since the epoch, 16 random ones.
const TIME_ORDERED_ID: &str = "(lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000000)::bigint), 16, '0') || substr(md5(random()::text), 1, 16))::uuid";

/// The completion finds its rows as Keel's does (`postgres::lease`): by primary key, with the
/// lease as the fence and no `state = 'running'` term. Such a term matches the predicate of
/// the partial running index, and the planner then ANDs a scan of that whole index — every
/// dead entry the run has left in it — into each completion: 3–4 ms per 100 jobs after a few
/// seconds, which made this reference read 23–27k jobs/s where the same script without the
/// term reads 35–38k (docs/benchmarks.md, fifth pass of issue 14).
fn keel_lifecycle() -> String {
    format!(
        "
INSERT INTO jobs (id, queue, kind, tenant, args, priority, state, max_attempts, timeout_ms,
                  backoff, run_at, created_at)
SELECT {TIME_ORDERED_ID}, 'bench', 'noop', 'default', 'null', 4, 'available', 25, 60000,
       '{{}}', now(), now()
FROM generate_series(1, 100);
WITH picked AS (
    SELECT id FROM jobs
    WHERE state = 'available' AND queue = 'bench'
      AND NOT EXISTS (SELECT 1 FROM queues WHERE name = 'bench' AND paused)
    ORDER BY priority, run_at, id
    LIMIT 100
    FOR UPDATE SKIP LOCKED
), leased AS (
    UPDATE jobs j
    SET state = 'running', attempt = j.attempt + 1, started_at = now(),
        lease_owner = 'pgbench', lease_token = gen_random_uuid(),
        lease_expires_at = now() + interval '30 seconds'
    FROM picked WHERE j.id = picked.id
    RETURNING j.id
)
SELECT coalesce(array_agg(id), '{{}}') AS ids FROM leased \\gset
UPDATE jobs
SET state = 'completed', finished_at = now(), lease_owner = NULL, lease_token = NULL,
    lease_expires_at = NULL
WHERE id = ANY (:ids::uuid[]) AND lease_token IS NOT NULL;
"
    )
}

fn keel_insert() -> String {
    format!(
        "
INSERT INTO jobs (id, queue, kind, tenant, args, priority, state, max_attempts, timeout_ms,
                  backoff, run_at, created_at)
VALUES ({TIME_ORDERED_ID}, 'bench', 'noop', 'default', 'null', 4, 'available', 25, 60000,
        '{{}}', now(), now());
"
    )
}

/// The reference figures of one run.
#[derive(Debug, Default, Clone)]
pub(crate) struct Figures {
    /// Minimal-table lifecycle, jobs/s.
    pub(crate) lifecycle_minimal: Option<f64>,
    /// Keel-table lifecycle, jobs/s.
    pub(crate) lifecycle_keel: Option<f64>,
    /// One-row inserts, transactions/s.
    pub(crate) insert_tps: Option<f64>,
    /// What failed, if anything.
    pub(crate) errors: Vec<String>,
}

/// Runs the three scripts against the server at `base_url` for `duration` each, in a
/// scratch schema that is dropped afterwards.
pub(crate) async fn run(
    program: &Path,
    base_url: &str,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let schema = Scratch::schema(base_url, "keel_bench_pgbench").await?;
    let outcome = run_in(program, &schema, duration).await;
    let dropped = schema.drop_now().await;
    let figures = outcome?;
    dropped?;
    Ok(figures)
}

async fn run_in(program: &Path, schema: &Scratch, duration: Duration) -> anyhow::Result<Figures> {
    let inside = schema.url();
    // Keel's own tables, created by Keel's migrations exactly as `keel serve` would.
    let url = DatabaseUrl::parse(&inside).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (store, _) = keel_store::open(
        &url,
        SqliteOptions::default(),
        PgOptions::default(),
        Arc::new(SystemClock),
    )
    .await
    .context("creating Keel's tables for pgbench")?;
    store.close().await;
    execute(&inside, MINIMAL_TABLE)
        .await
        .context("creating the minimal pgbench table")?;

    let dir = tempfile::Builder::new()
        .prefix("keel-pgbench-")
        .tempdir()
        .context("creating a directory for the pgbench scripts")?;
    let scripts = [
        ("lifecycle-minimal.sql", MINIMAL_LIFECYCLE.to_owned()),
        ("lifecycle-keel.sql", keel_lifecycle()),
        ("insert-keel.sql", keel_insert()),
    ];
    for (name, text) in &scripts {
        tokio::fs::write(dir.path().join(name), text)
            .await
            .with_context(|| format!("writing {name}"))?;
    }

    let mut f = Figures::default();
    let script = |name: &str| dir.path().join(name);
    match pgbench(program, &inside, &script(scripts[0].0), duration).await {
        Ok(tps) => f.lifecycle_minimal = Some(tps * BATCH),
        Err(e) => f.errors.push(format!("pgbench lifecycle (minimal): {e:#}")),
    }
    match pgbench(program, &inside, &script(scripts[1].0), duration).await {
        Ok(tps) => f.lifecycle_keel = Some(tps * BATCH),
        Err(e) => f
            .errors
            .push(format!("pgbench lifecycle (Keel's table): {e:#}")),
    }
    // Start the insert run on an empty table, as Keel's W3 starts on a fresh one.
    execute(&inside, "TRUNCATE jobs")
        .await
        .context("emptying jobs between pgbench runs")?;
    match pgbench(program, &inside, &script(scripts[2].0), duration).await {
        Ok(tps) => f.insert_tps = Some(tps),
        Err(e) => f.errors.push(format!("pgbench one-row insert: {e:#}")),
    }
    Ok(f)
}

/// Runs one pgbench script and returns its transactions per second.
async fn pgbench(
    program: &Path,
    url: &str,
    script: &Path,
    duration: Duration,
) -> anyhow::Result<f64> {
    let secs = duration.as_secs().max(1);
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .min(CLIENTS);
    let mut cmd = Command::new(program);
    cmd.arg("-n") // no VACUUM of pgbench's own tables (there are none)
        .args(["-M", "prepared"])
        .args(["-c", &CLIENTS.to_string()])
        .args(["-j", &threads.to_string()])
        .args(["-T", &secs.to_string()])
        .arg("-f")
        .arg(script)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(secs + 60), cmd.output())
        .await
        .context("pgbench did not finish in time")?
        .with_context(|| format!("running {}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "pgbench failed ({}): {}",
        out.status,
        last_lines(&stderr, 8)
    );
    parse_tps(&stdout)
        .with_context(|| format!("no tps in pgbench's output: {}", last_lines(&stdout, 8)))
}

/// Reads `tps = 1234.5 (without initial connection time)` from pgbench's summary.
pub(crate) fn parse_tps(output: &str) -> Option<f64> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `pgbench` on the PATH, if there is one.
pub(crate) fn find_on_path() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("pgbench"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tps_is_read_from_the_summary() {
        let out = "transaction type: lifecycle.sql\nscaling factor: 1\nnumber of clients: 8\n\
                   latency average = 16.8 ms\ninitial connection time = 12.3 ms\n\
                   tps = 475.912345 (without initial connection time)\n";
        assert_eq!(parse_tps(out), Some(475.912345));
        assert_eq!(parse_tps("pgbench: error: connection failed"), None);
    }

    #[test]
    fn scripts_keep_pgbench_variables_out_of_literals() {
        // pgbench substitutes `:name` anywhere outside quotes; the only variable is `:ids`.
        for s in [
            MINIMAL_LIFECYCLE.to_owned(),
            keel_lifecycle(),
            keel_insert(),
        ] {
            let vars: Vec<&str> = s
                .match_indices(':')
                .filter(|(i, _)| {
                    let b = s.as_bytes();
                    let prev = if *i > 0 { b[i - 1] } else { b' ' };
                    let next = b.get(i + 1).copied().unwrap_or(b' ');
                    prev != b':' && next != b':' && next.is_ascii_alphabetic()
                })
                .map(|(i, _)| &s[i..(i + 4).min(s.len())])
                .collect();
            assert!(vars.iter().all(|v| *v == ":ids"), "{vars:?} in {s}");
        }
    }
}
