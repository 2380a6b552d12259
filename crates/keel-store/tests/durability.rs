//! G1, durable acknowledgement: a child process inserts jobs from many concurrent tasks and
//! prints each id only after its insert returned; the test SIGKILLs the child at a random
//! moment, reopens the store, and requires every printed id to be there. Five rounds per
//! backend.
//!
//! This binary is its own child (`--durability-child <url>`), so it runs without a libtest
//! harness (`harness = false`) and prints libtest's summary line itself.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_core::{Clock, JobId, JobKind, NewJob, QueueName, Store, StoreError, SystemClock};
use keel_store::testkit::{PgSchema, pg_url_or_skip};
use keel_store::{DatabaseUrl, PgOptions, SqliteOptions};
use rand::Rng;

const ROUNDS: usize = 5;
const CHILD_FLAG: &str = "--durability-child";
/// The child stops by itself after this long, should the parent have died without killing it.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == CHILD_FLAG) {
        child(&args[pos + 1]);
        return;
    }
    let names = ["durability::sqlite", "durability::postgres"];
    if args.iter().any(|a| a == "--list") {
        for n in names {
            println!("{n}: test");
        }
        return;
    }
    let filters: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
    let selected =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut passed, mut failed, mut filtered) = (0, 0, 0);
    for name in names {
        if !selected(name) {
            filtered += 1;
            continue;
        }
        let outcome = std::panic::catch_unwind(|| {
            rt.block_on(async {
                if name.ends_with("sqlite") {
                    let dir = tempfile::tempdir().unwrap();
                    let url = format!("sqlite://{}", dir.path().join("keel.db").display());
                    rounds(name, &url).await;
                } else if let Some(base) = pg_url_or_skip(name) {
                    let schema = PgSchema::create(&base).await;
                    rounds(name, &schema.url).await;
                }
            })
        });
        match outcome {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; {filtered} filtered out"
    );
    if failed > 0 {
        std::process::exit(101);
    }
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
        .args([CHILD_FLAG, url])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let reader = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            // `lines()` yields only newline-terminated lines until EOF; a torn last line
            // (killed mid-write) is dropped below by the id parse.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    // Wait for the first acknowledgement (bounded), then kill after a random extra delay.
    let started = Instant::now();
    while lines.lock().unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "child acknowledged nothing in 30 s"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
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
