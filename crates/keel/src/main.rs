//! `keel`: parse the command line and hand off. The work lives in the library.

use std::process::ExitCode;

use clap::Parser;
use keel::cli::{Cli, Command};
use keel::commands;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => commands::serve(&args).await,
            Command::Migrate { database_url } => commands::migrate(&database_url).await,
            Command::Enqueue(args) => commands::enqueue(args).await,
            Command::Job(cmd) => commands::job(cmd).await,
            Command::Jobs(cmd) => commands::jobs(cmd).await,
            Command::Queues { client, action } => commands::queues(&client, action).await,
            Command::HashKey { key } => commands::hash_key(&key),
            Command::Bench(args) => commands::bench(*args).await,
            Command::Load(args) => commands::load(&args).await,
        }
    })
}
