//! `keel`, the durable job server's binary: parses the command line and wires the crates
//! together. Kept thin on purpose; the work lives in the library crates.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use keel_core::SystemClock;
use keel_store::{DatabaseUrl, PgOptions, SqliteOptions};

/// Exit code for invalid configuration (sysexits.h `EX_CONFIG`), so supervisors can tell a
/// misconfiguration (do not restart in a loop) from a crash.
const EX_CONFIG: u8 = 78;
/// Exit code when the database cannot be reached or used (sysexits.h `EX_UNAVAILABLE`).
const EX_UNAVAILABLE: u8 = 69;

/// Keel: a durable job server.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending database migrations, then exit.
    ///
    /// Safe to run while other Keel processes start against the same database: migrations
    /// take a lock and each runs once.
    #[command(after_help = "Examples:\n  \
        keel migrate                                   # ./keel.db (SQLite)\n  \
        keel migrate --database-url sqlite:///var/lib/keel/keel.db\n  \
        KEEL_DATABASE_URL=postgres://keel@db:5432/keel keel migrate")]
    Migrate {
        /// Where jobs are stored: sqlite://PATH or postgres://USER@HOST:PORT/DB.
        #[arg(long, env = "KEEL_DATABASE_URL", default_value = "sqlite://keel.db")]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Migrate { database_url } => migrate(&database_url).await,
    }
}

async fn migrate(url: &str) -> ExitCode {
    let url = match DatabaseUrl::parse(url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: KEEL_DATABASE_URL / --database-url: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let opened = keel_store::open(
        &url,
        SqliteOptions::default(),
        PgOptions::default(),
        Arc::new(SystemClock),
    )
    .await;
    match opened {
        Ok((store, report)) => {
            store.close().await;
            if report.applied.is_empty() {
                eprintln!("schema is up to date (version {})", report.current);
            } else {
                eprintln!(
                    "applied migrations {:?}; schema is at version {}",
                    report.applied, report.current
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}
