//! Which runtime workers are stuck inside one poll.
//!
//! A task that blocks its worker thread (a synchronous call, a lock held across a long
//! wait, a busy loop) is the classic cause of a stuck async service, and the one thing a
//! task dump cannot show: the dump has to wait for every worker to yield. Worse, tokio
//! 1.54's dump coordinates the workers with a barrier whose timeout leaks an arrival
//! (tokio-rs/tokio#8370), so a dump requested while a worker is blocked for more than
//! 250 ms can wedge another worker for good. [`watch`] installs two hooks on the runtime
//! builder that count each worker's polls and flag the one in progress (two relaxed
//! atomic writes per poll); [`blocked_workers`] compares two readings and names the
//! workers that stayed inside the same poll throughout, so the task dump refuses to start
//! on a blocked runtime, and `keel_runtime_workers_blocked` shows it on `/metrics`.
//!
//! The registry of workers is process-wide because worker threads are: the hooks run on
//! whichever thread polls, and the admin listener asks from another.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

/// What one worker thread is doing, as its hooks record it.
#[derive(Debug)]
struct Activity {
    /// The runtime the thread works for (a process may run several, tests do).
    runtime: Option<tokio::runtime::Id>,
    /// Polls started on this thread.
    polls: AtomicU64,
    /// Whether a poll is in progress.
    in_poll: AtomicBool,
}

/// Every watched worker thread; entries of exited threads are dropped as they are found.
static WORKERS: Mutex<Vec<Weak<Activity>>> = Mutex::new(Vec::new());

thread_local! {
    static MINE: Arc<Activity> = register();
}

fn register() -> Arc<Activity> {
    let activity = Arc::new(Activity {
        runtime: tokio::runtime::Handle::try_current().ok().map(|h| h.id()),
        polls: AtomicU64::new(0),
        in_poll: AtomicBool::new(false),
    });
    let mut workers = WORKERS.lock().unwrap_or_else(PoisonError::into_inner);
    workers.retain(|w| w.strong_count() > 0);
    workers.push(Arc::downgrade(&activity));
    activity
}

/// Makes the runtime built by `builder` report its polls, so blocked workers can be told
/// apart from idle or busy ones. Without `--cfg tokio_unstable` (the hooks are unstable
/// tokio API) this does nothing and blocked workers go unreported.
pub fn watch(builder: &mut tokio::runtime::Builder) -> &mut tokio::runtime::Builder {
    #[cfg(tokio_unstable)]
    {
        builder
            .on_before_task_poll(|_| {
                let _ = MINE.try_with(|a| {
                    a.polls.fetch_add(1, Ordering::Relaxed);
                    a.in_poll.store(true, Ordering::Relaxed);
                });
            })
            .on_after_task_poll(|_| {
                let _ = MINE.try_with(|a| a.in_poll.store(false, Ordering::Relaxed));
            })
    }
    #[cfg(not(tokio_unstable))]
    {
        builder
    }
}

/// One reading of the watched workers of a runtime.
#[derive(Debug)]
pub(crate) struct Reading(Vec<(Arc<Activity>, u64, bool)>);

impl Reading {
    /// Reads the watched workers of `runtime` now.
    pub(crate) fn now(runtime: &tokio::runtime::Handle) -> Self {
        let id = runtime.id();
        let workers = WORKERS.lock().unwrap_or_else(PoisonError::into_inner);
        Reading(
            workers
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|a| a.runtime == Some(id))
                .map(|a| {
                    let polls = a.polls.load(Ordering::Relaxed);
                    let in_poll = a.in_poll.load(Ordering::Relaxed);
                    (a, polls, in_poll)
                })
                .collect(),
        )
    }

    /// Whether any worker was read (the runtime was built through [`watch`]).
    pub(crate) fn is_watched(&self) -> bool {
        !self.0.is_empty()
    }

    /// Workers that were inside a poll at this reading and are still inside the same one.
    pub(crate) fn blocked_since(&self) -> usize {
        self.0
            .iter()
            .filter(|(a, polls, in_poll)| {
                *in_poll
                    && a.in_poll.load(Ordering::Relaxed)
                    && a.polls.load(Ordering::Relaxed) == *polls
            })
            .count()
    }
}

/// Workers of `runtime` that stay inside a single poll for all of `window`, or `None` when
/// the runtime is not watched.
pub async fn blocked_workers(runtime: &tokio::runtime::Handle, window: Duration) -> Option<usize> {
    let before = Reading::now(runtime);
    if !before.is_watched() {
        return None;
    }
    tokio::time::sleep(window).await;
    Some(before.blocked_since())
}

#[cfg(all(test, tokio_unstable))]
mod tests {
    use super::*;

    #[test]
    fn a_worker_inside_one_long_poll_is_found_and_idle_ones_are_not() {
        // An unwatched runtime cannot say.
        let plain = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let unknown = plain.block_on(blocked_workers(plain.handle(), Duration::ZERO));
        assert_eq!(unknown, None);

        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(2).enable_all();
        let runtime = watch(&mut builder).build().unwrap();
        runtime.block_on(async {
            // Let both workers poll something, so both are registered.
            let warm: Vec<_> = (0..8).map(|_| tokio::spawn(async {})).collect();
            for w in warm {
                w.await.unwrap();
            }
            let handle = tokio::runtime::Handle::current();
            assert_eq!(
                blocked_workers(&handle, Duration::from_millis(100)).await,
                Some(0)
            );
            // The blocker says when it is inside its poll and stays there until released,
            // so the watch window lies inside the blocking poll however slow the machine.
            let (started_tx, started) = tokio::sync::oneshot::channel();
            let (release, released) = std::sync::mpsc::channel::<()>();
            let blocker = tokio::spawn(async move {
                started_tx.send(()).unwrap();
                released.recv().unwrap();
            });
            started.await.unwrap();
            assert_eq!(
                blocked_workers(&handle, Duration::from_millis(300)).await,
                Some(1)
            );
            release.send(()).unwrap();
            blocker.await.unwrap();
        });
    }
}
