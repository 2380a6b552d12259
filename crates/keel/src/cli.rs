//! The command line: what each `keel` subcommand takes, with examples in `--help`.

use clap::{Args, Parser, Subcommand};
use keel_bench::bench::BenchArgs;
use keel_bench::load::LoadArgs;

use crate::config::ServeArgs;

/// Keel: a durable job server. Accepts jobs over HTTP, stores them durably (SQLite by
/// default, Postgres for several replicas), runs them with retries, and reports results.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about, long_about = None, after_help = "\
Exit codes: 0 success; 1 the server refused the request (4xx/5xx); 69 the server or \
database could not be reached (`keel serve`: after KEEL_DATABASE_WAIT); 71 a listener could \
not be bound (its address is in use); 78 invalid configuration.")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `keel` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the job server: HTTP API, worker pools, maintenance, admin listener.
    #[command(after_help = "\
Examples:
  keel serve                                         # SQLite ./keel.db, API on 127.0.0.1:8080
  KEEL_QUEUES=default:16,emails:4 keel serve
  KEEL_DATABASE_URL=postgres://keel@db:5432/keel keel serve
  keel serve --config /etc/keel/keel.toml --addr 0.0.0.0:8080 --api-keys acme=<sha256hex>

Every setting can come from a flag, a KEEL_* environment variable (shown in brackets) or the \
TOML file given by --config; flags win over the environment, which wins over the file. All \
settings are validated before anything starts; invalid ones are all listed and keel exits \
with code 78. SIGTERM or SIGINT stops gracefully: readiness turns 503, in-flight requests \
finish, running jobs get the grace period, the rest are released unharmed.")]
    Serve(Box<ServeArgs>),

    /// Apply pending database migrations, then exit.
    #[command(after_help = "\
Examples:
  keel migrate                                       # ./keel.db (SQLite)
  keel migrate --database-url sqlite:///var/lib/keel/keel.db
  KEEL_DATABASE_URL=postgres://keel@db:5432/keel keel migrate

Safe while other Keel processes start on the same database: migrations take a lock and \
each runs once.")]
    Migrate {
        /// Where jobs are stored: sqlite://PATH or postgres://USER@HOST:PORT/DB.
        #[arg(long, env = "KEEL_DATABASE_URL", default_value = "sqlite://keel.db")]
        database_url: String,
    },

    /// Enqueue a job on a running server.
    #[command(after_help = "\
Examples:
  keel enqueue echo --args '{\"hello\":\"world\"}'
  keel enqueue sleep --args '{\"ms\":500}' --queue default --priority 1
  keel enqueue webhook --args '{\"url\":\"https://example.com/hook\"}' --idempotency-key order-42
  keel enqueue noop --tag import --meta '{\"trace_id\":\"4bf92f35\"}'")]
    Enqueue(EnqueueArgs),

    /// Inspect or act on one job.
    #[command(subcommand)]
    Job(JobCommand),

    /// List jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),

    /// Create, inspect, pause or delete cron schedules.
    #[command(
        subcommand,
        after_help = "\
Examples:
  keel schedule put nightly --cron \"0 3 * * *\" --timezone Europe/Paris --kind webhook \\
      --args '{\"url\":\"https://example.com/nightly\"}'
  keel schedule list
  keel schedule get nightly
  keel schedule pause nightly"
    )]
    Schedule(ScheduleCommand),

    /// Show queues, or pause and resume one.
    #[command(after_help = "\
Examples:
  keel queues
  keel queues pause emails
  keel queues resume emails")]
    Queues {
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
        /// Optional action.
        #[command(subcommand)]
        action: Option<QueueAction>,
    },

    /// Measure Keel: the workloads of the performance protocol (drain, steady, paced,
    /// enqueue, overload, footprint), with the pgbench reference on Postgres.
    #[command(after_help = "\
Examples:
  keel bench                                         # all workloads, 3 runs, fresh SQLite file per run
  keel bench --quick                                 # smoke run: 1 run, short workloads
  keel bench --database-url postgres://postgres@127.0.0.1:5432/postgres
  keel bench --workloads w2p --runs 5                # pickup latency at 500 jobs/s only
  keel bench --workloads w3,w4 --server-env KEEL_DB_POOL_MAX=32
  keel bench --url http://127.0.0.1:8080 --pid $(pidof keel) --workloads w1,w3

Each run starts `keel serve` (this executable) on 127.0.0.1 with ephemeral ports, a fresh \
database (a temporary SQLite file, or a new schema dropped afterwards on Postgres) and the \
queue `bench` with 256 workers, then stops it with SIGTERM. The table on stdout gives the \
median of each figure over the runs, its spread and issue 4's target; progress goes to \
stderr; every run's raw figures go to the JSON file (--out). On Postgres, when pgbench is on \
the PATH, each run also measures the same job lifecycle with pgbench on the same server and \
reports Keel's W1 as a fraction of it. Ctrl-C stops the server, drops the schema and still \
reports what was measured. See docs/benchmarks.md for what each workload does exactly.

Exit codes: 0 every workload was measured (missed targets are reported, not failures); 1 a \
workload could not be measured or the harness failed; 69 the server or database could not \
be reached; 130 interrupted.")]
    Bench(Box<BenchArgs>),

    /// Send HTTP load to a running Keel and summarise what came back.
    #[command(after_help = "\
Examples:
  keel load --rate 2000 --duration 30s               # open model: 2000 enqueues/s on a schedule
  keel load --concurrency 64 --duration 20s          # closed model: 64 connections back to back
  keel load --rate 500 --path /v1/process --body '{\"kind\":\"sleep\",\"args\":{\"ms\":50}}'
  keel load --get --path '/v1/jobs?limit=10' --concurrency 8
  keel load --rate 5000 --json load.json             # also write the summary as JSON

The open model (--rate) keeps sending on schedule however the server copes, so overload is \
real; latency is measured from each request's scheduled instant. The closed model \
(--concurrency, the default with 64 connections) measures capacity. The summary gives status \
counts, goodput, and HDR latency quantiles of accepted (2xx) and shed (429/503) answers. \
Progress shows on stderr when it is a terminal.

Exit codes: 0 the load ran (whatever the answers); 2 invalid arguments; 69 the server could \
not be reached.")]
    Load(Box<LoadArgs>),

    /// Print the SHA-256 digest of an API key, for KEEL_API_KEYS (TENANT=DIGEST).
    #[command(after_help = "\
Examples:
  keel hash-key 'my-secret-key'          # prints the hex digest
  KEEL_API_KEYS=acme=$(keel hash-key \"$ACME_KEY\") keel serve --addr 0.0.0.0:8080")]
    HashKey {
        /// The key to hash.
        key: String,
    },
}

/// Where a client command finds the server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the Keel API. Global: `keel queues pause q --url …` works as well as
    /// `keel queues --url … pause q`.
    #[arg(
        long,
        env = "KEEL_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// API key, if the server requires one.
    #[arg(long, env = "KEEL_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// PEM file of a CA to trust for an https:// URL, on top of the public roots: for a
    /// server whose certificate (KEEL_TLS_CERT) a private CA signed.
    #[arg(long, env = "KEEL_CA_CERT", value_name = "PATH", global = true)]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// `keel enqueue` arguments.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Job kind: a built-in executor (noop, sleep, echo, fail, webhook) or a handler name.
    pub kind: String,
    /// The job's options.
    #[command(flatten)]
    pub job: JobOptions,
    /// Delay before the first attempt, in milliseconds.
    #[arg(long)]
    pub delay_ms: Option<u64>,
    /// Annotations, as a JSON object (at most 16 KiB), kept with the job.
    #[arg(long)]
    pub meta: Option<String>,
    /// Idempotency key: repeating the command with the same key returns the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Tenant (when the server has no API keys).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Where the server is.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What `keel enqueue` and `keel schedule create|put` say about the job they send (the
/// server's defaults apply to each one left out).
#[derive(Debug, Args)]
pub struct JobOptions {
    /// The job's arguments, as JSON.
    #[arg(long, default_value = "null")]
    pub args: String,
    /// The job's queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// The job's priority, 0 (highest) to 9.
    #[arg(long)]
    pub priority: Option<u8>,
    /// Attempts allowed before the job is discarded.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout, in milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// A label on the job (repeat for several).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
}

/// `keel job …`
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Show a job.
    #[command(after_help = "Example:\n  keel job get 01936b2e-7d1c-7a9e-9f3e-2b8f0c1d2e3f")]
    Get {
        /// Job id.
        id: String,
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a job's result (exit code 1 while it is not completed).
    #[command(after_help = "Example:\n  keel job result 01936b2e-7d1c-7a9e-9f3e-2b8f0c1d2e3f")]
    Result {
        /// Job id.
        id: String,
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job (a running one is stopped).
    #[command(after_help = "Example:\n  keel job cancel 01936b2e-7d1c-7a9e-9f3e-2b8f0c1d2e3f")]
    Cancel {
        /// Job id.
        id: String,
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run a job again now.
    #[command(after_help = "Example:\n  keel job retry 01936b2e-7d1c-7a9e-9f3e-2b8f0c1d2e3f")]
    Retry {
        /// Job id.
        id: String,
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `keel jobs …`
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, oldest first, with optional filters; pass --after with the printed `next`
    /// to get the following page.
    #[command(after_help = "\
Examples:
  keel jobs list --state discarded
  keel jobs list --queue emails --limit 20 --after 01936b2e-7d1c-7a9e-9f3e-2b8f0c1d2e3f")]
    List {
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only this state.
        #[arg(long)]
        state: Option<keel_core::JobState>,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Start after this id.
        #[arg(long)]
        after: Option<keel_core::JobId>,
        /// Page size (1-1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `keel schedule …`
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Create a schedule (exit code 1 if one of this name exists; see `put`).
    #[command(after_help = "\
Examples:
  keel schedule create nightly --cron \"0 3 * * *\" --timezone Europe/Paris --kind webhook \\
      --args '{\"url\":\"https://example.com/nightly\"}'
  keel schedule create every-5-min --cron \"*/5 * * * *\" --kind sync --queue imports --catch-up 30m
  keel schedule create heartbeat --cron \"*/10 * * * * *\" --kind noop   # 6 fields: seconds first")]
    Create(ScheduleDef),
    /// Create a schedule or replace the one of this name (keeping its tick history, so no
    /// tick runs twice across the change).
    #[command(after_help = "\
Examples:
  keel schedule put nightly --cron \"0 3 * * *\" --timezone Europe/Paris --kind webhook \\
      --args '{\"url\":\"https://example.com/nightly\"}'
  keel schedule put reports --cron @daily --kind report --max-attempts 3 --tag billing --paused")]
    Put(ScheduleDef),
    /// Show a schedule and its next five ticks.
    #[command(after_help = "Example:\n  keel schedule get nightly")]
    Get {
        /// Schedule name.
        name: String,
        /// Tenant (when the server has no API keys).
        #[arg(long)]
        tenant: Option<String>,
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List schedules by name; pass --after with the printed `next` for the following page.
    #[command(after_help = "\
Examples:
  keel schedule list
  keel schedule list --limit 20 --after nightly")]
    List {
        /// Tenant (when the server has no API keys).
        #[arg(long)]
        tenant: Option<String>,
        /// Start after this name.
        #[arg(long)]
        after: Option<String>,
        /// Page size (1-1000).
        #[arg(long)]
        limit: Option<u32>,
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a schedule (jobs it already enqueued stay).
    #[command(after_help = "Example:\n  keel schedule delete nightly")]
    Delete {
        /// Schedule name.
        name: String,
        /// Tenant (when the server has no API keys).
        #[arg(long)]
        tenant: Option<String>,
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Pause a schedule: its ticks are skipped until it is resumed.
    #[command(after_help = "Example:\n  keel schedule pause nightly")]
    Pause {
        /// Schedule name.
        name: String,
        /// Tenant (when the server has no API keys).
        #[arg(long)]
        tenant: Option<String>,
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resume a paused schedule (missed ticks are caught up only within its catch-up
    /// window).
    #[command(after_help = "Example:\n  keel schedule resume nightly")]
    Resume {
        /// Schedule name.
        name: String,
        /// Tenant (when the server has no API keys).
        #[arg(long)]
        tenant: Option<String>,
        /// Where the server is.
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// What `keel schedule create|put` takes: the schedule and the job each tick enqueues.
#[derive(Debug, Args)]
pub struct ScheduleDef {
    /// Schedule name, unique per tenant (letters, digits, `-`, `_`, `.`, `:`).
    pub name: String,
    /// Cron expression: 5 fields, or 6 with seconds first; `@daily`-style nicknames work.
    #[arg(long)]
    pub cron: String,
    /// IANA time zone the expression is read in (server default: UTC).
    #[arg(long)]
    pub timezone: Option<String>,
    /// Kind of the job each tick enqueues.
    #[arg(long)]
    pub kind: String,
    /// The job each tick enqueues.
    #[command(flatten)]
    pub job: JobOptions,
    /// Create it paused.
    #[arg(long)]
    pub paused: bool,
    /// How far back ticks missed while no replica ran are caught up, e.g. 30m, 1h, 2d
    /// (server default: 1h).
    #[arg(long, value_parser = unit_duration)]
    pub catch_up: Option<keel_client::UnitDuration>,
    /// Tenant (when the server has no API keys).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Where the server is.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `keel queues pause|resume`
#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// Stop leasing jobs from a queue (enqueueing still works).
    Pause {
        /// Queue name.
        queue: String,
    },
    /// Resume leasing from a paused queue.
    Resume {
        /// Queue name.
        queue: String,
    },
}

/// A duration with its unit (`30m`, `1h`, `2d`), as a schedule's catch-up window takes it.
fn unit_duration(s: &str) -> Result<keel_client::UnitDuration, String> {
    keel_client::parse_duration_text(s)
        .map(keel_client::UnitDuration)
        .filter(|_| s.trim().ends_with(|c: char| c.is_ascii_alphabetic()))
        .ok_or_else(|| keel_client::UNIT_DURATION_SYNTAX.to_owned())
}
