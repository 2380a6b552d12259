//! `keel`: parse the command line and hand off. The work lives in the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keel::cli::{Cli, Command};
use keel::commands;

/// jemalloc serves every allocation of the `keel` binary on Linux: it fragments less than
/// glibc's malloc under many threads, keeps the statistics behind
/// `keel_allocator_*_bytes`, and has the sampling heap profiler behind
/// `/debug/pprof/heap` (built in, inactive until switched on; see docs/operations.md).
/// Tests and services embedding Keel keep their own allocator; the diagnostics notice.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The longest the process waits, after the command is done, for runtime threads to stop.
const EXIT_WAIT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // Poll hooks that let the admin listener tell a blocked worker from a busy one
    // (keel_runtime_workers_blocked, and task dumps that refuse to wedge the runtime).
    keel_diag::polls::watch(&mut builder);
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => commands::serve(&args).await,
            Command::Migrate { database_url } => commands::migrate(&database_url).await,
            Command::Enqueue(args) => commands::enqueue(args).await,
            Command::Job(cmd) => commands::job(cmd).await,
            Command::Jobs(cmd) => commands::jobs(cmd).await,
            Command::Schedule(cmd) => commands::schedule(cmd).await,
            Command::Queues { client, action } => commands::queues(&client, action).await,
            Command::HashKey { key } => commands::hash_key(&key),
            Command::Bench(args) => commands::bench(*args).await,
            Command::Load(args) => commands::load(&args).await,
        }
    });
    // Every task Keel started has been awaited by now. Whatever is left must not hold the
    // exit hostage: a task dump cut short by shutdown leaves a worker waiting on the dump's
    // barrier, and dropping the runtime would wait for it forever.
    runtime.shutdown_timeout(EXIT_WAIT);
    code
}
