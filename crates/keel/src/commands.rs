//! What each subcommand does. Client commands print the server's JSON to stdout and errors
//! to stderr, with the exit codes documented in `keel --help`.

// A CLI's answers go to stdout.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::sync::Arc;

use keel_client::{
    Client, ClientError, JobIn, JobListQuery, JobTemplateIn, ScheduleIn, ScheduleListQuery,
};
use keel_core::SystemClock;
use keel_store::{DatabaseUrl, PgOptions, SqliteOptions};
use serde::Serialize;

use crate::cli::{
    ClientArgs, EnqueueArgs, JobCommand, JobOptions, JobsCommand, QueueAction, ScheduleCommand,
    ScheduleDef,
};
use crate::config::{Config, ServeArgs};
use crate::{App, EX_CONFIG, EX_OSERR, EX_UNAVAILABLE, telemetry};

/// `keel serve`.
pub async fn serve(args: &ServeArgs) -> ExitCode {
    let config = match Config::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            eprint!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Err(e) = telemetry::init_logging(config.log_format, &config.log_level) {
        eprintln!("error: setting up logging: {e:#}");
        return ExitCode::FAILURE;
    }
    if config.insecure_no_auth && !config.addr.ip().is_loopback() && config.api_keys.is_empty() {
        tracing::warn!(
            addr = %config.addr,
            "serving a non-loopback address WITHOUT authentication (--insecure-no-auth): anyone who can connect can enqueue, read and cancel jobs"
        );
    }
    let metrics = match telemetry::metrics_handle() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "setting up metrics");
            return ExitCode::FAILURE;
        }
    };
    // Installed before anything is bound or answers /readyz: from here on SIGTERM and
    // SIGINT never take their default action (death mid-request) but start a drain. A
    // handler registered lazily, when the shutdown future is first polled, left a window
    // after the listener came up in which a rollout's SIGTERM killed the process.
    let mut signals = match ShutdownSignals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "installing the SIGTERM and SIGINT handlers");
            return ExitCode::FAILURE;
        }
    };
    let built = tokio::select! {
        built = App::build(config, metrics) => built,
        // A pod deleted while it waits for its database stops now, not after the wait.
        signal = signals.recv() => {
            tracing::info!(signal, "signal received while starting: exiting before serving");
            return ExitCode::SUCCESS;
        }
    };
    let app = match built {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cannot start");
            eprintln!("error: {e:#}");
            let store_error = e
                .chain()
                .find_map(|c| c.downcast_ref::<keel_core::StoreError>());
            let unbound = e
                .chain()
                .any(|c| c.downcast_ref::<crate::app::BindError>().is_some());
            // A database that answers but disagrees with the settings (a transaction
            // pooler without KEEL_DATABASE_POOLER) is the configuration's fault: waiting
            // and restarting cannot fix it.
            return ExitCode::from(
                if matches!(
                    store_error,
                    Some(keel_core::StoreError::Misconfigured { .. })
                ) {
                    EX_CONFIG
                } else if store_error.is_some() {
                    EX_UNAVAILABLE
                } else if unbound {
                    EX_OSERR
                } else {
                    1
                },
            );
        }
    };
    let shutdown = async move {
        let signal = signals.recv().await;
        tracing::info!(signal, "signal received");
    };
    match app.run_until_stopped(shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "server failed");
            ExitCode::FAILURE
        }
    }
}

/// The signals that stop `keel serve`: SIGTERM (Kubernetes, systemd) and SIGINT (Ctrl-C).
///
/// tokio registers a signal handler when the listener is created, not when it is first
/// awaited, so holding one of these from the start of `serve` means every later signal is
/// delivered here.
struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    #[cfg(unix)]
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Self> {
        Ok(Self {})
    }

    /// Waits for the next signal and names it.
    #[cfg(unix)]
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    #[cfg(not(unix))]
    async fn recv(&mut self) -> &'static str {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(_) => std::future::pending().await,
        }
    }
}

/// `keel migrate`.
pub async fn migrate(url: &str) -> ExitCode {
    let url = match DatabaseUrl::parse(url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: KEEL_DATABASE_URL / --database-url: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    match keel_store::open(
        &url,
        SqliteOptions::default(),
        PgOptions::default(),
        Arc::new(SystemClock),
    )
    .await
    {
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

fn client(args: &ClientArgs) -> Result<Client, ExitCode> {
    let refuse = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    };
    let client = Client::new(args.url.clone(), args.api_key.clone()).map_err(|e| refuse(&e))?;
    match &args.ca_cert {
        None => Ok(client),
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| refuse(&format!("reading --ca-cert {}: {e}", path.display())))?;
            client
                .with_ca_certificate(&pem)
                .map_err(|e| refuse(&format!("--ca-cert {}: {e}", path.display())))
        }
    }
}

/// Prints a successful answer as pretty JSON, or the error with its exit code.
fn report<T: Serialize>(outcome: Result<T, ClientError>) -> ExitCode {
    match outcome {
        Ok(v) => match serde_json::to_string_pretty(&v) {
            Ok(s) => {
                println!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: printing the answer: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => fail(&e),
    }
}

fn fail(e: &ClientError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        ClientError::Api { problem, .. } => {
            for f in &problem.errors {
                eprintln!("  {}: {}", f.field, f.message);
            }
            if let Some(id) = &problem.request_id {
                eprintln!("  (request id {id})");
            }
            ExitCode::FAILURE
        }
        ClientError::Unreachable { source, .. } => {
            // The whole chain: the cause worth reading (a refused connection, an untrusted
            // certificate) is usually a few levels down.
            let mut cause: Option<&dyn std::error::Error> = Some(source);
            while let Some(e) = cause {
                eprintln!("  {e}");
                cause = e.source();
            }
            ExitCode::from(EX_UNAVAILABLE)
        }
        ClientError::Decode(_) | ClientError::Settings(_) => ExitCode::FAILURE,
    }
}

/// `keel enqueue`.
pub async fn enqueue(args: EnqueueArgs) -> ExitCode {
    let client = match client(&args.client) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let job = args
        .meta
        .map(|m| json_arg("--meta", m))
        .transpose()
        .and_then(|meta| {
            Ok(JobIn {
                tenant: args.tenant,
                delay_ms: args.delay_ms,
                meta,
                ..job_in(args.kind, args.job)?
            })
        });
    let job = match job {
        Ok(job) => job,
        Err(code) => return code,
    };
    report(
        client
            .enqueue(&job, args.idempotency_key.as_deref())
            .await
            .map(|e| e.job),
    )
}

/// `keel job …`.
pub async fn job(cmd: JobCommand) -> ExitCode {
    match cmd {
        JobCommand::Get { id, client: c } => match client(&c) {
            Ok(c) => report(c.get_job(&id).await),
            Err(code) => code,
        },
        JobCommand::Cancel { id, client: c } => match client(&c) {
            Ok(c) => report(c.cancel_job(&id).await),
            Err(code) => code,
        },
        JobCommand::Retry { id, client: c } => match client(&c) {
            Ok(c) => report(c.retry_job(&id).await),
            Err(code) => code,
        },
        JobCommand::Result { id, client: c } => match client(&c) {
            Ok(c) => match c.job_result(&id).await {
                Ok(Some(v)) => report::<serde_json::Value>(Ok(v)),
                Ok(None) => {
                    eprintln!("job {id} has not finished yet");
                    ExitCode::FAILURE
                }
                Err(e) => fail(&e),
            },
            Err(code) => code,
        },
    }
}

/// `keel jobs list`.
pub async fn jobs(cmd: JobsCommand) -> ExitCode {
    let JobsCommand::List {
        queue,
        state,
        kind,
        tenant,
        after,
        limit,
        client: c,
    } = cmd;
    match client(&c) {
        Ok(c) => report(
            c.list_jobs(&JobListQuery {
                queue,
                state,
                kind,
                tenant,
                after,
                limit,
            })
            .await,
        ),
        Err(code) => code,
    }
}

/// `keel schedule pause|resume`.
async fn set_schedule_paused(
    c: &ClientArgs,
    name: &str,
    tenant: Option<&str>,
    paused: bool,
) -> ExitCode {
    match client(c) {
        Ok(c) => report(c.set_schedule_paused(name, tenant, paused).await),
        Err(code) => code,
    }
}

/// The job `options` describe, or exit code 2 for a bad `--args`.
fn job_in(kind: String, options: JobOptions) -> Result<JobIn, ExitCode> {
    Ok(JobIn {
        kind,
        queue: options.queue,
        args: Some(json_arg("--args", options.args)?),
        priority: options.priority,
        max_attempts: options.max_attempts,
        timeout_ms: options.timeout_ms,
        tags: (!options.tags.is_empty()).then_some(options.tags),
        ..JobIn::default()
    })
}

/// `text`, the value of `flag`, as JSON to send byte for byte; exit code 2 if it is not JSON.
fn json_arg(flag: &str, text: String) -> Result<Box<serde_json::value::RawValue>, ExitCode> {
    serde_json::value::RawValue::from_string(text).map_err(|e| {
        eprintln!("error: {flag} is not valid JSON: {e}");
        ExitCode::from(2)
    })
}

/// The body of `keel schedule create|put`, or the exit code of a bad `--args`.
fn schedule_in(def: ScheduleDef, with_name: bool) -> Result<(ScheduleIn, ClientArgs), ExitCode> {
    let job = job_in(def.kind, def.job)?;
    let body = ScheduleIn {
        name: with_name.then_some(def.name),
        tenant: def.tenant,
        cron: def.cron,
        timezone: def.timezone,
        job: JobTemplateIn {
            kind: job.kind,
            queue: job.queue,
            args: job.args,
            priority: job.priority,
            max_attempts: job.max_attempts,
            timeout_ms: job.timeout_ms,
            backoff: None,
            tags: job.tags,
        },
        paused: def.paused.then_some(true),
        catch_up: def.catch_up,
    };
    Ok((body, def.client))
}

/// `keel schedule …`: prints the schedule (or page) as JSON; exit codes as the other
/// client commands (1 refused, e.g. 404 or 409 or 422 with every field listed; 69
/// unreachable; 2 for a bad `--args`).
pub async fn schedule(cmd: ScheduleCommand) -> ExitCode {
    match cmd {
        ScheduleCommand::Create(def) => {
            let (body, c) = match schedule_in(def, true) {
                Ok(v) => v,
                Err(code) => return code,
            };
            match client(&c) {
                Ok(c) => report(c.create_schedule(&body).await),
                Err(code) => code,
            }
        }
        ScheduleCommand::Put(def) => {
            let name = def.name.clone();
            let (body, c) = match schedule_in(def, false) {
                Ok(v) => v,
                Err(code) => return code,
            };
            match client(&c) {
                Ok(c) => match c.put_schedule(&name, &body).await {
                    Ok((s, created)) => {
                        eprintln!(
                            "{} schedule {name}",
                            if created { "created" } else { "replaced" }
                        );
                        report::<keel_client::ScheduleOut>(Ok(s))
                    }
                    Err(e) => fail(&e),
                },
                Err(code) => code,
            }
        }
        ScheduleCommand::Get {
            name,
            tenant,
            client: c,
        } => match client(&c) {
            Ok(c) => report(c.get_schedule(&name, tenant.as_deref()).await),
            Err(code) => code,
        },
        ScheduleCommand::List {
            tenant,
            after,
            limit,
            client: c,
        } => match client(&c) {
            Ok(c) => report(
                c.list_schedules(&ScheduleListQuery {
                    tenant,
                    after,
                    limit,
                })
                .await,
            ),
            Err(code) => code,
        },
        ScheduleCommand::Delete {
            name,
            tenant,
            client: c,
        } => match client(&c) {
            Ok(c) => match c.delete_schedule(&name, tenant.as_deref()).await {
                Ok(()) => {
                    eprintln!("deleted schedule {name}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            },
            Err(code) => code,
        },
        ScheduleCommand::Pause {
            name,
            tenant,
            client: c,
        } => set_schedule_paused(&c, &name, tenant.as_deref(), true).await,
        ScheduleCommand::Resume {
            name,
            tenant,
            client: c,
        } => set_schedule_paused(&c, &name, tenant.as_deref(), false).await,
    }
}

/// `keel queues [pause|resume NAME]`.
pub async fn queues(args: &ClientArgs, action: Option<QueueAction>) -> ExitCode {
    let c = match client(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match action {
        None => report(c.queues().await),
        Some(QueueAction::Pause { queue }) => report(c.set_paused(&queue, true).await),
        Some(QueueAction::Resume { queue }) => report(c.set_paused(&queue, false).await),
    }
}

/// `keel hash-key`.
pub fn hash_key(key: &str) -> ExitCode {
    if key.is_empty() {
        eprintln!("error: the key must not be empty");
        return ExitCode::from(2);
    }
    // The same digest the server compares against (one definition, in keel-api).
    println!("{}", hex::encode(keel_api::hash_api_key(key)));
    ExitCode::SUCCESS
}

/// `keel bench`.
pub async fn bench(args: keel_bench::bench::BenchArgs) -> ExitCode {
    match keel_bench::bench::run(args).await {
        Ok(keel_bench::bench::Outcome::Measured) => ExitCode::SUCCESS,
        Ok(keel_bench::bench::Outcome::Incomplete) => ExitCode::FAILURE,
        Ok(keel_bench::bench::Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e:#}");
            let unreachable = e
                .chain()
                .any(|c| c.downcast_ref::<keel_bench::bench::Unreachable>().is_some());
            ExitCode::from(if unreachable { EX_UNAVAILABLE } else { 1 })
        }
    }
}

/// `keel load`.
pub async fn load(args: &keel_bench::load::LoadArgs) -> ExitCode {
    let summary = match keel_bench::load::run(args).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            let unreachable = e.downcast_ref::<keel_bench::load::Unreachable>().is_some();
            return ExitCode::from(if unreachable { EX_UNAVAILABLE } else { 2 });
        }
    };
    match keel_bench::load::report(args, &summary) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
