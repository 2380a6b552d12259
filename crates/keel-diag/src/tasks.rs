//! Task dumps: every tokio task of the runtime and the await point it is parked at, the
//! equivalent of Go's `goroutine?debug=2` for finding what a stuck service waits on.
//!
//! `Handle::dump` pauses the runtime's workers at their next yield, re-polls every task
//! in a tracing mode that records the stack down to each leaf future, and lets them go on.
//! A worker that never yields (a blocking call or a busy loop on an async thread) keeps
//! the dump from finishing, and in tokio 1.54 can wedge the runtime (see [`crate::polls`]):
//! on a watched runtime [`dump`] first checks that no worker is stuck inside a poll and
//! refuses, naming the problem, when one is; otherwise it gives up after a timeout.
//! Resolving the stacks to names and lines parses debug info and runs on the blocking pool.
//!
//! It needs `--cfg tokio_unstable` (set in `.cargo/config.toml`) and tokio's `taskdump`
//! feature, on Linux x86_64 or aarch64; elsewhere [`dump`] answers
//! [`DiagError::Unsupported`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::DiagError;

/// How long a worker must stay inside one poll before a dump refuses to start: short
/// enough to answer fast, longer than any healthy poll, and past tokio's 250 ms wait for
/// workers to gather for the dump.
pub const BLOCKED_AFTER: Duration = Duration::from_millis(300);

/// How long a dump may take before it is given up on. A healthy runtime answers in
/// milliseconds; this bound only trips when a worker does not yield.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A snapshot of every task of a runtime, resolved to function names and source lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDump {
    tasks: Vec<TaskTrace>,
    took: Duration,
}

/// One task: its id and a stack per leaf future it waits on (several under `select!` or
/// `join!`), each innermost frame first.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TaskTrace {
    id: String,
    stacks: Vec<Vec<Frame>>,
}

/// One frame: the function and where in it the task is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Frame {
    function: String,
    location: Option<String>,
}

impl TaskDump {
    /// How many tasks the runtime had.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether there were none (never, for a dump taken from inside the runtime).
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Every task and its stacks, innermost frame first, as Go prints goroutines:
    ///
    /// ```text
    /// task 42:
    /// tokio::time::sleep::Sleep::poll
    ///     tokio-1.54.1/src/time/sleep.rs:452:22
    /// keel_runtime::dispatcher::run::{{closure}}
    ///     /src/keel/crates/keel-runtime/src/dispatcher.rs:111:52
    /// ```
    pub fn render_full(&self) -> String {
        let mut out = format!(
            "keel task dump: {} tasks, taken in {} ms; each stack is innermost frame first\n",
            self.tasks.len(),
            self.took.as_millis()
        );
        for task in &self.tasks {
            let _ = write!(out, "\ntask {}:\n", task.id);
            render_stacks(&mut out, &task.stacks);
        }
        out
    }

    /// Tasks grouped by identical stacks, largest group first (Go's `goroutine?debug=1`):
    /// a thousand requests stuck at one await point show up as one line with a count.
    pub fn render_summary(&self) -> String {
        let mut groups: BTreeMap<&[Vec<Frame>], usize> = BTreeMap::new();
        for task in &self.tasks {
            *groups.entry(task.stacks.as_slice()).or_default() += 1;
        }
        let mut groups: Vec<(&[Vec<Frame>], usize)> = groups.into_iter().collect();
        groups.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let mut out = format!(
            "keel task summary: {} tasks in {} groups of identical stacks, taken in {} ms\n",
            self.tasks.len(),
            groups.len(),
            self.took.as_millis()
        );
        for (stacks, count) in groups {
            let _ = write!(
                out,
                "\n{count} {}:\n",
                if count == 1 { "task" } else { "tasks" }
            );
            render_stacks(&mut out, stacks);
        }
        out
    }
}

fn render_stacks(out: &mut String, stacks: &[Vec<Frame>]) {
    if stacks.is_empty() {
        out.push_str("(no stack: the task is runnable or running, not parked at an await)\n");
    }
    for (i, stack) in stacks.iter().enumerate() {
        if i > 0 {
            out.push_str("-- and, in the same task --\n");
        }
        for frame in stack {
            let _ = writeln!(out, "{}", frame.function);
            if let Some(location) = &frame.location {
                let _ = writeln!(out, "    {location}");
            }
        }
    }
}

/// Frames that only show the dump's own machinery, not where the task waits.
fn is_machinery(function: &str) -> bool {
    function.starts_with("tokio::runtime::task::trace::")
        || function.starts_with("backtrace::")
        || function.starts_with("<tokio::runtime::task::trace::")
}

/// `keel_runtime::worker::run_job::{{closure}}::h29f979a4e7c11342` → without the hash: it
/// says nothing to a reader, and differs between builds of the same code.
fn without_hash(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((path, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            path
        }
        _ => name,
    }
}

/// `…/registry/src/index.crates.io-<hash>/tokio-1.54.1/src/x.rs` → `tokio-1.54.1/src/x.rs`:
/// the same dependency frame reads the same on every machine, and lines stay short.
fn short_path(path: &str) -> &str {
    match path.find("/registry/src/") {
        Some(at) => {
            let rest = &path[at + "/registry/src/".len()..];
            rest.split_once('/')
                .map_or(rest, |(_, crate_path)| crate_path)
        }
        None => path,
    }
}

/// Dumps every task of the runtime behind `handle`, giving up after `timeout`.
///
/// Fails with [`DiagError::Blocked`] when a worker has been stuck in one poll for
/// [`BLOCKED_AFTER`] (on a runtime built through [`crate::polls::watch`]), with
/// [`DiagError::Busy`] while another dump is in progress in this process (including one
/// that timed out and is still waiting for a worker), with [`DiagError::TimedOut`] when a
/// worker does not yield in time, and with [`DiagError::Unsupported`] where tokio cannot
/// dump tasks.
pub async fn dump(
    handle: &tokio::runtime::Handle,
    timeout: Duration,
) -> Result<TaskDump, DiagError> {
    imp::dump(handle, timeout).await
}

#[cfg(all(
    tokio_unstable,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod imp {
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    use super::{
        BLOCKED_AFTER, Frame, TaskDump, TaskTrace, is_machinery, short_path, without_hash,
    };
    use crate::DiagError;
    use crate::exclusive::Claim;
    use crate::polls::blocked_workers;

    /// Set while a dump is in progress anywhere in the process.
    static DUMPING: AtomicBool = AtomicBool::new(false);

    pub(super) async fn dump(
        handle: &tokio::runtime::Handle,
        timeout: Duration,
    ) -> Result<TaskDump, DiagError> {
        // A blocked worker would keep the dump waiting and can wedge the runtime (see
        // crate::polls); say what is wrong instead.
        if let Some(blocked @ 1..) = blocked_workers(handle, BLOCKED_AFTER).await {
            return Err(DiagError::Blocked(format!(
                "{blocked} runtime worker(s) have been inside a single poll for over {} ms: an \
                 async task is blocking its thread (a synchronous call, a lock, a busy loop). \
                 No task dump was taken: it would wait for that worker, and tokio can wedge \
                 the runtime when a dump meets a blocked worker. Take a CPU profile \
                 (/debug/pprof/profile?seconds=5) to see what a spinning worker runs, or the \
                 native stacks (gdb -p <pid> -batch -ex 'thread apply all bt') for one \
                 blocked in a call",
                BLOCKED_AFTER.as_millis()
            )));
        }
        let claim = Claim::take(
            &DUMPING,
            "a task dump is already in progress in this process (possibly one that timed out \
             and is still waiting for a runtime worker to yield); retry shortly",
        )?;
        let started = Instant::now();
        let runtime = handle.clone();
        // The dump runs in its own task holding the claim: if it outlives the timeout, the
        // next request is told a dump is still pending instead of piling up a second one.
        let dumping = handle.spawn(async move {
            let dump = runtime.dump().await;
            let tasks = tokio::task::spawn_blocking(move || {
                let tasks = resolve(&dump);
                crate::symbols::release();
                tasks
            })
            .await;
            drop(claim);
            tasks
        });
        match tokio::time::timeout(timeout, dumping).await {
            Err(_) => Err(DiagError::TimedOut(format!(
                "the task dump did not finish within {} s: a runtime worker has not yielded, \
                 i.e. an async task is blocking its thread (a synchronous call, a lock, a \
                 busy loop). Take a CPU profile (/debug/pprof/profile?seconds=5) to see what \
                 the workers are running",
                timeout.as_secs()
            ))),
            Ok(Err(e)) | Ok(Ok(Err(e))) => Err(DiagError::Failed {
                what: "dumping the runtime's tasks",
                source: e.into(),
            }),
            Ok(Ok(Ok(tasks))) => Ok(TaskDump {
                tasks,
                took: started.elapsed(),
            }),
        }
    }

    fn resolve(dump: &tokio::runtime::Dump) -> Vec<TaskTrace> {
        let mut tasks: Vec<(u64, TaskTrace)> = dump
            .tasks()
            .iter()
            .map(|task| {
                let id = task.id().to_string();
                let mut stacks = task
                    .trace()
                    .resolve_backtraces()
                    .iter()
                    .map(|backtrace| {
                        backtrace
                            .frames()
                            .flat_map(|frame| frame.symbols())
                            .filter_map(|symbol| {
                                let function = without_hash(symbol.name_demangled()?).to_owned();
                                if is_machinery(&function) {
                                    return None;
                                }
                                let location = symbol.filename().map(|file| {
                                    let file = file.to_string_lossy();
                                    let mut at = short_path(&file).to_owned();
                                    if let Some(line) = symbol.lineno() {
                                        at.push_str(&format!(":{line}"));
                                        if let Some(col) = symbol.colno() {
                                            at.push_str(&format!(":{col}"));
                                        }
                                    }
                                    at
                                });
                                Some(Frame { function, location })
                            })
                            .collect::<Vec<_>>()
                    })
                    .filter(|stack| !stack.is_empty())
                    .collect::<Vec<_>>();
                // `select!` polls its branches in random order: sort, so tasks waiting at
                // the same places read (and group) the same.
                stacks.sort();
                (id.parse().unwrap_or(u64::MAX), TaskTrace { id, stacks })
            })
            .collect();
        // Oldest task (smallest id) first, as a reader expects.
        tasks.sort_by_key(|(n, _)| *n);
        tasks.into_iter().map(|(_, t)| t).collect()
    }
}

#[cfg(not(all(
    tokio_unstable,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod imp {
    use std::time::Duration;

    use super::TaskDump;
    use crate::DiagError;

    pub(super) async fn dump(
        _handle: &tokio::runtime::Handle,
        _timeout: Duration,
    ) -> Result<TaskDump, DiagError> {
        Err(DiagError::Unsupported(
            "task dumps need tokio's taskdump feature and `--cfg tokio_unstable` (set in \
             .cargo/config.toml; a RUSTFLAGS variable replaces it), on Linux x86_64 or aarch64"
                .to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_paths_lose_the_registry_prefix() {
        assert_eq!(
            short_path(
                "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/tokio-1.54.1/src/time/sleep.rs"
            ),
            "tokio-1.54.1/src/time/sleep.rs"
        );
        assert_eq!(
            short_path("/src/crates/keel-runtime/src/dispatcher.rs"),
            "/src/crates/keel-runtime/src/dispatcher.rs"
        );
    }

    #[test]
    fn symbol_hashes_are_dropped() {
        assert_eq!(
            without_hash("keel_runtime::worker::run_job::{{closure}}::h29f979a4e7c11342"),
            "keel_runtime::worker::run_job::{{closure}}"
        );
        assert_eq!(
            without_hash("tokio::sync::Notify::hello"),
            "tokio::sync::Notify::hello"
        );
    }

    fn frame(function: &str) -> Frame {
        Frame {
            function: function.to_owned(),
            location: Some(format!("{function}.rs:1:1")),
        }
    }

    #[test]
    fn the_summary_groups_identical_stacks_largest_first() {
        let parked = vec![vec![frame("sleep"), frame("worker")]];
        let dump = TaskDump {
            tasks: vec![
                TaskTrace {
                    id: "1".into(),
                    stacks: vec![vec![frame("notified"), frame("dispatcher")]],
                },
                TaskTrace {
                    id: "2".into(),
                    stacks: parked.clone(),
                },
                TaskTrace {
                    id: "3".into(),
                    stacks: parked,
                },
            ],
            took: Duration::from_millis(3),
        };
        let summary = dump.render_summary();
        assert!(summary.contains("3 tasks in 2 groups"), "{summary}");
        let two = summary.find("2 tasks:\nsleep\n").expect(&summary);
        let one = summary.find("1 task:\nnotified\n").expect(&summary);
        assert!(two < one, "largest group first:\n{summary}");
        let full = dump.render_full();
        assert!(
            full.contains("task 3:\nsleep\n    sleep.rs:1:1\nworker\n"),
            "{full}"
        );
    }

    #[cfg(all(
        tokio_unstable,
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    #[test]
    fn a_dump_finds_a_parked_task_and_refuses_a_blocked_runtime() {
        // Both cases in one test: dumps are one at a time per process.
        //
        // The dump itself runs on one worker: tokio 1.54's dump rendezvous can strand a
        // worker for good when another arrives over 250 ms late (a loaded machine), and the
        // runtime's drop would then wait for it forever. With one worker there is no one to
        // wait for.
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(1).enable_all();
        let runtime = crate::polls::watch(&mut builder).build().unwrap();
        runtime.block_on(async {
            let handle = tokio::runtime::Handle::current();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let parked = tokio::spawn(async move {
                let _ = rx.await;
            });
            let dump = dump(&handle, DEFAULT_TIMEOUT).await.unwrap();
            let full = dump.render_full();
            assert!(
                full.contains("oneshot"),
                "the parked task's await point:\n{full}"
            );
            assert!(full.contains("keel_diag::tasks::tests"), "{full}");
            let _ = tx.send(());
            parked.await.unwrap();
        });
        drop(runtime);

        // The refusal needs a second worker: the blocked one cannot drive the timer that
        // ends the watch window. No dump (and no rendezvous) is started, which is the point.
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(2).enable_all();
        let runtime = crate::polls::watch(&mut builder).build().unwrap();
        runtime.block_on(async {
            let handle = tokio::runtime::Handle::current();
            // A task that blocks its worker until the test lets it go: the dump refuses to
            // start while it is blocked (not after it), saying so.
            let (blocking_tx, blocking_rx) = tokio::sync::oneshot::channel::<()>();
            let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
            let blocker = tokio::spawn(async move {
                let _ = blocking_tx.send(());
                let _ = release_rx.recv();
            });
            blocking_rx.await.unwrap();
            let err = super::dump(&handle, DEFAULT_TIMEOUT).await.unwrap_err();
            assert!(
                matches!(&err, DiagError::Blocked(m) if m.contains("1 runtime worker(s)")),
                "{err:?}"
            );
            assert!(!blocker.is_finished(), "refused only after the block ended");
            release_tx.send(()).unwrap();
            blocker.await.unwrap();
        });
    }
}
