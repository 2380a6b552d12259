//! A background task owned by the store: started with the store, told to stop and awaited
//! once at [`close`](keel_core::Store::close), so no task outlives the store it serves.
//!
//! The group committer, the `LISTEN` connection and the pool keeper each hold one.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A spawned task and the means to stop it.
#[derive(Debug)]
pub(super) struct Background {
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// What a background task watches to learn it must stop: it changes once, when the owner
/// stops it or is dropped.
pub(super) type Stopped = watch::Receiver<bool>;

impl Background {
    /// Spawns `task`, handing it the receiver it must watch.
    pub(super) fn spawn<F: Future<Output = ()> + Send + 'static>(
        task: impl FnOnce(Stopped) -> F,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        Self {
            stop,
            task: Mutex::new(Some(tokio::spawn(task(stopped)))),
        }
    }

    /// Tells the task to stop and waits for it.
    pub(super) async fn stop(&self) {
        let _ = self.stop.send(true);
        self.join().await;
    }

    /// Waits for the task to end by itself (the committer ends on its own close message).
    /// Later calls return at once.
    pub(super) async fn join(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Whether the task has ended (for tests of `close`).
    #[cfg(test)]
    pub(super) fn is_finished(&self) -> bool {
        self.task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_none_or(JoinHandle::is_finished)
    }
}
