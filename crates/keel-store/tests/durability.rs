//! G1, durable acknowledgement, in two halves:
//!
//! - **What a crash shows.** A child process inserts jobs from many concurrent tasks and
//!   prints each id only after its insert returned; the test SIGKILLs the child at a random
//!   moment, reopens the store, and requires every printed id to be there. Five rounds per
//!   backend.
//! - **What a crash cannot show.** SIGKILL leaves the operating system's page cache (and a
//!   Postgres server's WAL buffers) intact, so the rounds above would still pass if commits
//!   stopped reaching the disk. The settings that make a commit durable are therefore read
//!   on every connection the stores use: SQLite's `synchronous` must be `FULL` on the writer
//!   (in WAL mode, `NORMAL` survives a process crash but may lose the last commits on power
//!   loss, and "committed to disk" is the promise); Postgres's `synchronous_commit` must be
//!   `on` (or stronger) and `fsync` `on` in every pooled session.
//!
//! The child is this same test binary, started with `--ignored --exact` on
//! [`durability_child`] and the database URL in [`CHILD_URL`]; without that variable the
//! child test refuses to run rather than pass doing nothing.
#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr,
    missing_docs
)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_core::{Clock, JobId, JobKind, NewJob, QueueName, Store, StoreError, SystemClock};
use keel_store::testkit::{PgSchema, pg_url_or_skip};
use keel_store::{DatabaseUrl, PgOptions, PgStore, SqliteOptions, SqliteStore};
use rand::Rng;

const ROUNDS: usize = 5;
/// Env var carrying the database URL to the child; its presence is what makes a child.
const CHILD_URL: &str = "KEEL_DURABILITY_CHILD_URL";
/// The child stops by itself after this long, should the parent have died without killing it.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
/// How long the child may take to acknowledge its first insert (a cold Postgres connect
/// and migration check included) before the round fails.
const FIRST_ACK_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_acknowledged_inserts_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("keel.db").display());
    rounds("durability::sqlite", &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_acknowledged_inserts_survive_sigkill() {
    let name = "durability::postgres";
    let Some(base) = pg_url_or_skip(name) else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    rounds(name, &schema.url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_commits_are_fsynced_on_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        &dir.path().join("keel.db"),
        SqliteOptions::default(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let journal = store
        .pragma_on_every_connection("journal_mode")
        .await
        .unwrap();
    let synchronous = store
        .pragma_on_every_connection("synchronous")
        .await
        .unwrap();
    let query_only = store
        .pragma_on_every_connection("query_only")
        .await
        .unwrap();
    eprintln!("journal_mode {journal:?}; synchronous {synchronous:?}; query_only {query_only:?}");
    assert_eq!(
        synchronous.len(),
        1 + SqliteOptions::default().read_connections,
        "every connection answered: {synchronous:?}"
    );
    for (role, mode) in &journal {
        assert_eq!(mode, "wal", "{role} connection: journal_mode {mode}");
    }
    // 2 = FULL: the WAL is fsynced at every commit, before any caller is answered.
    let (role, writer) = &synchronous[0];
    assert_eq!(*role, "writer");
    assert_eq!(
        writer, "2",
        "the writer commits with synchronous={writer}, not FULL (2): an acknowledged job \
         could be lost on power loss"
    );
    // The readers cannot commit anything, so their own setting never decides durability.
    for ((role, only), (_, sync)) in query_only.iter().zip(&synchronous).skip(1) {
        assert_eq!(*role, "reader");
        assert_eq!(
            only, "1",
            "a reader (synchronous={sync}) is not query_only: it could write"
        );
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_commit_synchronously() {
    let name = "durability::postgres_sessions_commit_synchronously";
    let Some(base) = pg_url_or_skip(name) else {
        return;
    };
    let schema = PgSchema::create(&base).await;
    // The options `keel serve` connects with (a statement timeout in the startup options),
    // not only the tests' defaults.
    let opts = PgOptions {
        statement_timeout: Some(Duration::from_secs(3)),
        ..PgOptions::for_tests()
    };
    let store = PgStore::connect(&schema.url, opts.clone(), Arc::new(SystemClock))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let commit = store
        .show_on_every_connection("synchronous_commit")
        .await
        .unwrap();
    let fsync = store.show_on_every_connection("fsync").await.unwrap();
    eprintln!("synchronous_commit {commit:?}; fsync {fsync:?}");
    assert_eq!(
        commit.len(),
        opts.max_connections,
        "every pooled session answered"
    );
    for (i, setting) in commit.iter().enumerate() {
        // `on`, `remote_write`, `remote_apply` wait for the local flush too; `local` does
        // as well. Only `off` acknowledges before the WAL is on disk.
        assert_ne!(
            setting, "off",
            "pooled session {i} commits with synchronous_commit=off: a server crash could \
             lose acknowledged jobs"
        );
    }
    for (i, setting) in fsync.iter().enumerate() {
        assert_eq!(
            setting, "on",
            "pooled session {i}: the server runs with fsync={setting}"
        );
    }
    store.close().await;
}

/// The child half of the SIGKILL rounds: only runs when started by them (see the module
/// docs).
#[test]
#[ignore = "started by the SIGKILL rounds as a child process, with KEEL_DURABILITY_CHILD_URL"]
fn durability_child() {
    let url = std::env::var(CHILD_URL).unwrap_or_else(|_| {
        panic!("durability_child is the SIGKILL rounds' child: it needs {CHILD_URL}")
    });
    child(&url);
}

async fn open(url: &str, clock: Arc<dyn Clock>) -> Arc<dyn Store> {
    let url = DatabaseUrl::parse(url).unwrap();
    keel_store::open(
        &url,
        SqliteOptions::default(),
        PgOptions::for_tests(),
        clock,
    )
    .await
    .unwrap()
    .0
}

/// Runs the kill-and-check cycle `ROUNDS` times against one database.
async fn rounds(name: &str, url: &str) {
    let mut total = 0;
    for round in 1..=ROUNDS {
        let acked = kill_child_mid_insert(url).await;
        let store = open(url, Arc::new(SystemClock)).await;
        let mut missing = Vec::new();
        for id in &acked {
            match store.get(*id).await {
                Ok(_) => {}
                Err(StoreError::NotFound(_)) => missing.push(*id),
                Err(e) => panic!("{name}: reading back {id}: {e}"),
            }
        }
        store.close().await;
        assert!(
            missing.is_empty(),
            "{name} round {round}: {} of {} acknowledged jobs lost after SIGKILL: {:?}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(5)]
        );
        assert!(
            !acked.is_empty(),
            "{name} round {round}: the child acknowledged nothing"
        );
        eprintln!(
            "{name} round {round}: SIGKILL after {} acknowledged inserts; all found",
            acked.len()
        );
        total += acked.len();
    }
    eprintln!("{name}: {total} acknowledged jobs over {ROUNDS} SIGKILLs, none lost");
}

/// Starts a child inserting into `url`, kills it with SIGKILL at a random moment once it has
/// acknowledged something, and returns every id it acknowledged (complete lines only).
async fn kill_child_mid_insert(url: &str) -> Vec<JobId> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "durability_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_URL, url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            let mut first = Some(first_tx);
            // `lines()` yields only newline-terminated lines until EOF; a torn last line
            // (killed mid-write) and the harness's own lines are dropped below by the id
            // parse.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let is_id = JobId::parse(line.trim()).is_ok();
                lines.lock().unwrap().push(line);
                if is_id && let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
            }
        })
    };
    // The first acknowledgement, then a random extra delay before the kill. The reader
    // dropping its sender (the child exited early) ends the wait too, and fails below.
    let first = tokio::time::timeout(FIRST_ACK_WITHIN, first_rx).await;
    if !matches!(first, Ok(Ok(()))) {
        let _ = child.kill();
        let status = child.wait().unwrap();
        panic!(
            "the child acknowledged nothing (exit {status}, output {:?})",
            lines.lock().unwrap()
        );
    }
    let delay = rand::rng().random_range(20..600);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    child.kill().unwrap(); // SIGKILL on Unix: no destructor, no flush, no goodbye.
    child.wait().unwrap();
    reader.join().unwrap();
    let lines = lines.lock().unwrap();
    lines
        .iter()
        .filter_map(|l| JobId::parse(l.trim()).ok())
        .collect()
}

/// The child: 16 tasks insert jobs (singles and small batches, so group commit batches them)
/// and print each id once the insert has returned.
fn child(url: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = open(url, Arc::new(SystemClock)).await;
        let stdout = Arc::new(Mutex::new(std::io::stdout()));
        let deadline = Instant::now() + CHILD_LIFETIME;
        let mut tasks = Vec::new();
        for t in 0..16u32 {
            let store = Arc::clone(&store);
            let stdout = Arc::clone(&stdout);
            tasks.push(tokio::spawn(async move {
                let queue = QueueName::parse(format!("durable{}", t % 4)).unwrap();
                while Instant::now() < deadline {
                    let n = 1 + (t % 3) as usize;
                    let batch: Vec<NewJob> = (0..n)
                        .map(|_| NewJob::new(JobKind::parse("noop").unwrap()).queue(queue.clone()))
                        .collect();
                    let jobs = store.insert(batch).await.unwrap();
                    let mut out = stdout.lock().unwrap();
                    for j in jobs {
                        writeln!(out, "{}", j.id).unwrap();
                    }
                    out.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}
