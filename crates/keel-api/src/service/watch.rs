//! Watching jobs change state (gRPC `JobService/Watch`): one job, or every job of a queue,
//! from now on. Both follow the runtime's job events, which carry every change this
//! process makes and, on Postgres, the cancels, retries and rescues of other replicas.
//!
//! A job watch also re-reads the job every `process_poll` (250 ms by default), because
//! completions and leases made by another replica are not announced (they would serialise
//! commits; see keel-store's `postgres/lease.rs`), and because an event can be lost to a
//! slow subscriber. Changes are reported from the reads: a read that finds later attempts
//! than the last one reported reports each attempt's start (`running`) first, so every
//! attempt shows up, in order, even when it began and ended between two reads.

use keel_core::{Job, JobId, JobState, QueueName};
use keel_runtime::JobEvent;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::service::jobs::visible_job;
use crate::service::workers::fresh_visible_job;
use crate::state::ApiState;

/// One change a watch reports.
#[derive(Debug, Clone)]
pub struct Change {
    /// The job.
    pub id: JobId,
    /// Its queue.
    pub queue: QueueName,
    /// The state it moved to.
    pub state: JobState,
    /// The attempt the change belongs to (0 in a queue watch).
    pub attempt: u32,
    /// The job as read with this change (a job watch's reads only).
    pub job: Option<Job>,
}

/// Why a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The job finished (job watch).
    Finished,
    /// The watcher went away, or the server is stopping (`stop`).
    Stopped,
    /// The watcher fell behind and this many events were dropped (queue watch): it was
    /// not sent every change, so the watch ends rather than pretend otherwise.
    Lagged(u64),
}

/// A job watch, started: the job is visible to the caller and its events are followed.
pub struct JobWatch {
    state: ApiState,
    events: Receiver<JobEvent>,
    job: Job,
}

impl JobWatch {
    /// Starts watching `id`: `NOT_FOUND` when there is no such job or another tenant's.
    pub async fn start(state: &ApiState, caller: &Caller, id: JobId) -> Result<Self, ApiError> {
        // Subscribed before the first read, so no change after it is missed.
        let events = state.runtime.events.subscribe();
        let job = fresh_visible_job(state, caller, id).await?;
        Ok(Self {
            state: state.clone(),
            events,
            job,
        })
    }

    /// Sends the job as it is, then each change, into `out` until the job finishes, `out`
    /// closes or `stop` is cancelled. A failed re-read (the store unavailable) is retried at
    /// the next poll.
    pub async fn run(mut self, out: mpsc::Sender<Change>, stop: CancellationToken) -> WatchEnd {
        let id = self.job.id;
        let first = Change {
            id,
            queue: self.job.queue.clone(),
            state: self.job.state,
            attempt: self.job.attempt,
            job: Some(self.job.clone()),
        };
        if out.send(first).await.is_err() {
            return WatchEnd::Stopped;
        }
        let mut last = (self.job.state, self.job.attempt);
        let every = self.state.config.process_poll;
        let mut poll = tokio::time::interval_at(Instant::now() + every, every);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut events_open = true;
        while !last.0.is_finished() {
            let reread = tokio::select! {
                () = stop.cancelled() => return WatchEnd::Stopped,
                () = out.closed() => return WatchEnd::Stopped,
                ev = self.events.recv(), if events_open => match ev {
                    Ok(ev) => ev.id == id,
                    Err(RecvError::Lagged(_)) => true,
                    Err(RecvError::Closed) => {
                        events_open = false;
                        false
                    }
                },
                _ = poll.tick() => true,
            };
            if !reread {
                continue;
            }
            let Ok(job) = self.state.store.get(id).await else {
                continue;
            };
            for change in changes(last, job) {
                last = (change.state, change.attempt);
                if out.send(change).await.is_err() {
                    return WatchEnd::Stopped;
                }
            }
        }
        WatchEnd::Finished
    }
}

/// What a read of a job reports after `last` (state, attempt): the start of each attempt
/// begun since, then the job's state when it differs.
fn changes(last: (JobState, u32), job: Job) -> Vec<Change> {
    let mut out = Vec::new();
    let now = (job.state, job.attempt);
    for attempt in last.1.saturating_add(1)..=job.attempt {
        if (JobState::Running, attempt) != now {
            out.push(Change {
                id: job.id,
                queue: job.queue.clone(),
                state: JobState::Running,
                attempt,
                job: None,
            });
        }
    }
    if now != last {
        out.push(Change {
            id: job.id,
            queue: job.queue.clone(),
            state: job.state,
            attempt: job.attempt,
            job: Some(job),
        });
    }
    out
}

/// Watches every job of `queue` the caller may see, from now on, until `out` closes or
/// `stop` is cancelled. Another tenant's job is skipped; telling them apart costs a read of
/// the job (through the read cache) per event, so only for a tenant's key.
pub async fn watch_queue(
    state: &ApiState,
    caller: &Caller,
    queue: QueueName,
    out: mpsc::Sender<Change>,
    stop: CancellationToken,
) -> WatchEnd {
    let mut events = state.runtime.events.subscribe();
    loop {
        let ev = tokio::select! {
            () = stop.cancelled() => return WatchEnd::Stopped,
            () = out.closed() => return WatchEnd::Stopped,
            ev = events.recv() => match ev {
                Ok(ev) => ev,
                Err(RecvError::Lagged(n)) => return WatchEnd::Lagged(n),
                Err(RecvError::Closed) => return WatchEnd::Stopped,
            },
        };
        if ev.queue != queue {
            continue;
        }
        if caller.scope().is_some() && visible_job(state, caller, ev.id).await.is_err() {
            continue;
        }
        let change = Change {
            id: ev.id,
            queue: ev.queue,
            state: ev.state,
            attempt: 0,
            job: None,
        };
        if out.send(change).await.is_err() {
            return WatchEnd::Stopped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: JobState, attempt: u32) -> Job {
        let kind = keel_core::JobKind::parse("noop").unwrap();
        let mut j = keel_core::NewJob::new(kind).into_job(chrono::Utc::now());
        j.state = state;
        j.attempt = attempt;
        j
    }

    fn seen(c: &[Change]) -> Vec<(JobState, u32, bool)> {
        c.iter()
            .map(|c| (c.state, c.attempt, c.job.is_some()))
            .collect()
    }

    #[test]
    fn attempts_begun_between_two_reads_are_reported_in_order() {
        use JobState::*;
        // Enqueued, then read completed after two attempts: both starts, then the end.
        let c = changes((Available, 0), job(Completed, 2));
        assert_eq!(
            seen(&c),
            [
                (Running, 1, false),
                (Running, 2, false),
                (Completed, 2, true)
            ]
        );
        // Read while running: the attempt's start is the read itself.
        let c = changes((Available, 0), job(Running, 1));
        assert_eq!(seen(&c), [(Running, 1, true)]);
        // Nothing new: nothing reported.
        assert!(changes((Running, 1), job(Running, 1)).is_empty());
        // A failed attempt, read while retryable.
        let c = changes((Running, 1), job(Retryable, 1));
        assert_eq!(seen(&c), [(Retryable, 1, true)]);
        // Released (the attempt not counted): the state is what changed.
        let c = changes((Running, 1), job(Available, 0));
        assert_eq!(seen(&c), [(Available, 0, true)]);
    }
}
