//! Wakeups and state changes across replicas: one `LISTEN` connection per store, fanned out
//! in-process.
//!
//! Every statement that makes jobs available calls `pg_notify(channel, queue)` (see
//! `sql.rs`), except inserts, whose wakeups this listener sends itself once they have
//! committed (`wakeup.rs`). A store keeps one connection of its own, outside the pool, that
//! `LISTEN`s on the channel and forwards each notification's queue name into a broadcast
//! channel; each [`Store::wakeups`](keel_core::Store::wakeups) call subscribes a new
//! receiver. So an idle dispatcher in any replica starts a job within milliseconds of an
//! enqueue anywhere, instead of at its next poll.
//!
//! - **Its own wakeups** are sent on this connection, one round at a time, and ignored when
//!   they come back (the notification carries the sender's backend pid, learned with the
//!   `LISTEN`): the process that inserted woke its own dispatchers already.
//!
//! - **Outside the pool**: a listening session must stay open and idle indefinitely, and a
//!   pooled connection is recycled, lent to other statements and capped by `max_lifetime`.
//! - **Per schema**: the channel is `keel_jobs:<schema>`, so stores in different schemas of
//!   one database (tests, or several Keel deployments) do not wake each other.
//! - **Reconnects** with capped exponential backoff and jitter when the connection drops.
//!   Notifications sent while it was down are lost (Postgres keeps none for a session that
//!   is not listening), and a subscriber cannot be told which queues it missed; the
//!   runtime's poll fallback covers that gap, which is why the poll interval must stay
//!   bounded even with wakeups on.
//! - **Best effort**: a notice only ever means "look now". A lagging subscriber skips what
//!   it missed (the poll covers it); an invalid payload is ignored.
//! - **State changes** travel on a second channel, `keel_changes:<schema>`, listened to on
//!   the same connection: cancel, retry and rescue announce the jobs they moved as
//!   `<id> <state> <queue>` lines (see `sql.rs`; `lease.rs` says why completions and
//!   failures are not announced), and each line becomes a
//!   [`StateChange`] for every [`Store::changes`](keel_core::Store::changes) subscriber.
//!   Best effort too: a consumer waiting for a job re-reads it on a timer as well.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use keel_core::store::StateChange;
use keel_core::{ChangeStream, JobId, JobState, QueueName, WakeupStream};
use rand::Rng as _;
use tokio::sync::broadcast;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Config, NoTls, SimpleQueryMessage, Statement};

use super::task::{Background, Stopped};
use super::wakeup::{Pending, WAKE_SQL};

/// Notices buffered per subscriber before it lags. A subscriber that falls this far behind
/// is busy leasing anyway; it skips ahead rather than holding memory for stale notices.
const CAPACITY: usize = 1024;

/// State changes buffered per subscriber before it lags. Larger than [`CAPACITY`]: one
/// completion batch announces up to a few thousand jobs at once, and a subscriber (a
/// replica's event fan-out) drains them quickly but not within one notification.
const CHANGES_CAPACITY: usize = 8192;

/// Shortest time between two rounds of this store's insert wakeups. They only serve other
/// replicas (this process woke its own dispatchers already), so a round may wait this long
/// for more queues to collect, which caps the notifying transactions at 1,000 a second
/// however many inserts commit.
const WAKE_ROUND_MIN: Duration = Duration::from_millis(1);

/// First reconnect delay after the connection drops; doubled per failed attempt.
const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Longest wait between reconnect attempts: a server back from a restart is listened to
/// again within this, without a fleet of replicas hammering it while it is down.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Longest channel name Postgres accepts (`NAMEDATALEN` - 1 bytes); `pg_notify` rejects a
/// longer one, which would fail the statement carrying it.
const MAX_CHANNEL_LEN: usize = 63;

/// The wakeup channel for a store whose tables live in `schema` (`current_schema()` at
/// connect). Truncated to Postgres's limit: two schemas that differ only past it share a
/// channel, which costs spurious wakeups, never lost ones. Without a schema (the store was
/// connected before its schema existed) every such store shares the bare prefix.
pub(super) fn channel_for(schema: Option<&str>) -> String {
    named("keel_jobs", schema)
}

/// The state-change channel for `schema`, named and truncated like [`channel_for`]'s (two
/// schemas sharing it cost a subscriber changes of jobs it does not know, never lost ones).
pub(super) fn changes_channel_for(schema: Option<&str>) -> String {
    named("keel_changes", schema)
}

fn named(prefix: &str, schema: Option<&str>) -> String {
    let mut channel = match schema {
        Some(s) => format!("{prefix}:{s}"),
        None => prefix.to_owned(),
    };
    if channel.len() > MAX_CHANNEL_LEN {
        let mut end = MAX_CHANNEL_LEN;
        while !channel.is_char_boundary(end) {
            end -= 1;
        }
        channel.truncate(end);
    }
    channel
}

/// `LISTEN "<channel>"`, the channel quoted as an identifier (so case and punctuation are
/// kept exactly as `pg_notify` receives them).
fn listen_statement(channel: &str) -> String {
    format!("LISTEN \"{}\"", channel.replace('"', "\"\""))
}

/// The state changes in one notification's payload: `<id> <state> <queue>` lines. A line
/// that does not parse is skipped (best effort, like the rest of the stream).
pub(super) fn parse_changes(payload: &str) -> impl Iterator<Item = StateChange> + '_ {
    payload.lines().filter_map(|line| {
        let mut parts = line.splitn(3, ' ');
        let id = JobId::parse(parts.next()?).ok()?;
        let state = parts.next()?.parse::<JobState>().ok()?;
        let queue = QueueName::parse(parts.next()?).ok()?;
        Some(StateChange { id, queue, state })
    })
}

/// Where a session forwards what it hears.
#[derive(Clone)]
struct Fanout {
    /// The wakeup channel's name, to tell its notifications from the changes channel's.
    jobs_channel: String,
    wakeups: broadcast::Sender<QueueName>,
    changes: broadcast::Sender<StateChange>,
    /// The wakeups this store's inserts left to send.
    pending: Arc<Pending>,
}

/// The listener task and the means to subscribe to it and stop it.
#[derive(Debug)]
pub(super) struct Listener {
    /// Kept to hand out receivers; taken on `stop` so that, once the task has dropped its
    /// clone too, every subscriber's stream ends.
    sender: Mutex<Option<broadcast::Sender<QueueName>>>,
    /// The same, for state changes.
    changes: Mutex<Option<broadcast::Sender<StateChange>>>,
    task: Background,
    /// How far the sessions got (tests wait on it, and find the session's backend).
    #[cfg_attr(not(test), allow(dead_code))]
    progress: Arc<Progress>,
}

impl Listener {
    /// Starts listening on `channel` (wakeups) and `changes_channel` over a connection of its
    /// own made from `cfg`. Returns at once: the connection is made in the background (and
    /// remade whenever it drops), so an unreachable server delays wakeups, never the store.
    ///
    /// The same connection sends the wakeups of this store's inserts, taken from `pending`
    /// (`wakeup.rs` says why here).
    pub(super) fn spawn(
        mut cfg: Config,
        channel: String,
        changes_channel: &str,
        pending: Arc<Pending>,
    ) -> Self {
        // The connection idles for hours between notifications; keepalives make a peer that
        // vanished without a FIN (a failover, a dropped NAT entry) show up as an error within
        // about a minute, so the task reconnects instead of waiting forever on a dead socket.
        cfg.keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        let (sender, _) = broadcast::channel(CAPACITY);
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        let progress = Arc::new(Progress::default());
        let listen = format!(
            "{}; {}; SELECT pg_backend_pid()",
            listen_statement(&channel),
            listen_statement(changes_channel)
        );
        let fanout = Fanout {
            jobs_channel: channel,
            wakeups: sender.clone(),
            changes: changes.clone(),
            pending,
        };
        let task = Background::spawn({
            let progress = Arc::clone(&progress);
            move |stopped| run(cfg, listen, fanout, stopped, progress)
        });
        Self {
            sender: Mutex::new(Some(sender)),
            changes: Mutex::new(Some(changes)),
            task,
            progress,
        }
    }

    /// A new, independent stream of notices. After `stop` it is an ended stream.
    pub(super) fn subscribe(&self) -> Box<dyn WakeupStream> {
        Box::new(Wakeups {
            receiver: subscribe_to(&self.sender),
        })
    }

    /// A new, independent stream of state changes. After `stop` it is an ended stream.
    pub(super) fn subscribe_changes(&self) -> Box<dyn ChangeStream> {
        Box::new(Changes {
            receiver: subscribe_to(&self.changes),
        })
    }

    /// Stops the task, closes its connection and ends every subscriber's stream.
    pub(super) async fn stop(&self) {
        drop(lock(&self.sender).take());
        drop(lock(&self.changes).take());
        self.task.stop().await;
    }

    /// How many times a `LISTEN` has succeeded (tests wait on it before sending).
    #[cfg(test)]
    pub(super) fn listens(&self) -> u64 {
        self.progress.listens.load(Ordering::Acquire)
    }

    /// The backend process id of the latest listening session (0 before the first).
    #[cfg(test)]
    pub(super) fn backend(&self) -> i32 {
        self.progress.backend.load(Ordering::Acquire)
    }
}

/// The sender slot, even if a thread panicked holding it: the slot is only ever read or
/// emptied, so a poisoned one is still consistent.
fn lock<T>(
    slot: &Mutex<Option<broadcast::Sender<T>>>,
) -> MutexGuard<'_, Option<broadcast::Sender<T>>> {
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A new receiver on the sender in `slot`; once the slot is emptied (the store is closed),
/// a receiver whose only sender is already gone, so its stream ends at once.
fn subscribe_to<T: Clone>(slot: &Mutex<Option<broadcast::Sender<T>>>) -> broadcast::Receiver<T> {
    lock(slot)
        .as_ref()
        .map(broadcast::Sender::subscribe)
        .unwrap_or_else(|| broadcast::channel(1).1)
}

/// One subscriber's view of the broadcast.
struct Wakeups {
    receiver: broadcast::Receiver<QueueName>,
}

#[async_trait]
impl WakeupStream for Wakeups {
    async fn next(&mut self) -> Option<QueueName> {
        // The missed notices cannot be replayed; the next one (or the poll) will do.
        next_skipping_lag(&mut self.receiver, "wakeup").await
    }
}

/// One subscriber's view of the state changes.
struct Changes {
    receiver: broadcast::Receiver<StateChange>,
}

#[async_trait]
impl ChangeStream for Changes {
    async fn next(&mut self) -> Option<StateChange> {
        // Its consumer re-reads what it waits for on a timer; skipping ahead bounds the
        // memory a slow subscriber holds.
        next_skipping_lag(&mut self.receiver, "state change").await
    }
}

/// The next broadcast message, skipping (and logging) what a slow subscriber missed, or
/// `None` once the listener has stopped. Both subscriber kinds can afford to skip: neither
/// relies on every message arriving.
async fn next_skipping_lag<T: Clone>(
    receiver: &mut broadcast::Receiver<T>,
    subscriber: &'static str,
) -> Option<T> {
    loop {
        match receiver.recv().await {
            Ok(message) => return Some(message),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, subscriber, "subscriber lagged; skipped messages");
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// What the listening sessions report to the store.
#[derive(Debug, Default)]
struct Progress {
    /// Successful `LISTEN`s so far: 1 after the first connection, +1 per reconnect.
    listens: AtomicU64,
    /// The backend process id of the latest session.
    backend: AtomicI32,
}

/// Why a listening session ended.
struct SessionEnd {
    /// Whether it got as far as `LISTEN` (then the backoff starts over).
    listened: bool,
    error: String,
}

async fn run(
    cfg: Config,
    listen: String,
    fanout: Fanout,
    mut stopped: Stopped,
    progress: Arc<Progress>,
) {
    let channel = fanout.jobs_channel.clone();
    let mut delay = BACKOFF_MIN;
    loop {
        let end = tokio::select! {
            end = session(&cfg, &listen, &fanout, &progress) => end,
            // close() asked us to stop, or the store was dropped. Dropping the session's
            // future closes its connection.
            _ = stopped.changed() => return,
        };
        if end.listened {
            delay = BACKOFF_MIN;
        }
        // Full jitter over the upper half: replicas that lost the server together do not
        // reconnect in lockstep.
        let pause = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
        tracing::warn!(
            error = %end.error,
            %channel,
            retry_in_ms = pause.as_millis() as u64,
            "Postgres wakeup listener disconnected; dispatchers rely on polling until it is back"
        );
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stopped.changed() => return,
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// One round of wakeups in flight on the listening connection.
type Sending<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Connects, listens, and forwards notifications until the connection fails.
async fn session(cfg: &Config, listen: &str, fanout: &Fanout, progress: &Progress) -> SessionEnd {
    let (client, mut connection) = match cfg.connect(NoTls).await {
        Ok(pair) => pair,
        Err(e) => {
            return SessionEnd {
                listened: false,
                error: format!("connecting: {e}"),
            };
        }
    };
    // The connection must be driven for LISTEN's reply to arrive, so the statement and the
    // connection are polled together; poll_message (rather than awaiting the connection as a
    // future) is what surfaces the notifications. The same round trip learns this session's
    // backend, to tell our own wakeups when they come back; then the wakeup statement is
    // prepared once for the session.
    let subscribe = async {
        let pid = backend_pid(&client.simple_query(listen).await?);
        let wake = client
            .prepare_typed(WAKE_SQL, &[Type::TEXT, Type::TEXT_ARRAY])
            .await?;
        Ok::<_, tokio_postgres::Error>((pid, wake))
    };
    tokio::pin!(subscribe);
    let mut own_pid = None;
    let mut wake: Option<Statement> = None;
    let mut last_round = tokio::time::Instant::now();
    // The wakeups being sent, one round at a time; more collect in `pending` meanwhile.
    let mut sending: Option<Sending<'_>> = None;
    loop {
        let listened = own_pid.is_some();
        tokio::select! {
            done = &mut subscribe, if !listened => match done {
                Ok((Some(pid), statement)) => {
                    own_pid = Some(pid);
                    wake = Some(statement);
                    progress.backend.store(pid, Ordering::Release);
                    progress.listens.fetch_add(1, Ordering::AcqRel);
                    tracing::debug!(%listen, "Postgres wakeup listener ready");
                }
                Ok((None, _)) => {
                    return SessionEnd { listened, error: format!("{listen}: no backend pid") };
                }
                Err(e) => {
                    return SessionEnd { listened, error: format!("{listen}: {e}") };
                }
            },
            () = fanout.pending.ready(), if listened && sending.is_none() => {
                if let Some(statement) = wake.clone() {
                    let not_before = last_round + WAKE_ROUND_MIN;
                    last_round = not_before.max(tokio::time::Instant::now());
                    let (client, fanout) = (&client, fanout);
                    sending = Some(Box::pin(async move {
                        tokio::time::sleep_until(not_before).await;
                        let queues = fanout.pending.take();
                        if queues.is_empty() {
                            return Ok(0);
                        }
                        client.execute(&statement, &[&fanout.jobs_channel, &queues]).await
                    }));
                }
            },
            sent = async { sending.as_mut().expect("guarded by is_some").await }, if sending.is_some() => {
                sending = None;
                if let Err(e) = sent {
                    // Those wakeups are lost (the polls cover them); a broken connection
                    // shows up in poll_message too.
                    tracing::warn!(error = %e, "could not send wakeups on the listening connection");
                }
            },
            message = poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    // No subscriber is not an error: nobody is waiting right now.
                    if n.channel() == fanout.jobs_channel {
                        // Our own wakeup: this process woke its dispatchers when the insert
                        // returned.
                        if Some(n.process_id()) == own_pid {
                            continue;
                        }
                        if let Ok(queue) = QueueName::parse(n.payload()) {
                            let _ = fanout.wakeups.send(queue);
                        }
                    } else if fanout.changes.receiver_count() > 0 {
                        for change in parse_changes(n.payload()) {
                            let _ = fanout.changes.send(change);
                        }
                    }
                }
                Some(Ok(_notice)) => {}
                Some(Err(e)) => return SessionEnd { listened, error: e.to_string() },
                None => {
                    return SessionEnd {
                        listened,
                        error: "the server closed the connection".to_owned(),
                    };
                }
            },
        }
    }
}

/// The backend's process id from the answer to [`Listener::spawn`]'s `LISTEN …; SELECT
/// pg_backend_pid()`.
fn backend_pid(messages: &[SimpleQueryMessage]) -> Option<i32> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0)?.parse().ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_fit_postgres_and_quote_safely() {
        assert_eq!(channel_for(Some("public")), "keel_jobs:public");
        assert_eq!(channel_for(None), "keel_jobs");
        let long = "s".repeat(63);
        assert_eq!(channel_for(Some(&long)).len(), MAX_CHANNEL_LEN);
        let multibyte = "é".repeat(40);
        let c = channel_for(Some(&multibyte));
        assert!(c.len() <= MAX_CHANNEL_LEN && c.starts_with("keel_jobs:é"));
        assert_eq!(listen_statement("a\"b"), "LISTEN \"a\"\"b\"");
        assert_eq!(changes_channel_for(Some("public")), "keel_changes:public");
        assert_eq!(changes_channel_for(Some(&long)).len(), MAX_CHANNEL_LEN);
        assert_ne!(changes_channel_for(Some(&long)), channel_for(Some(&long)));
    }

    #[test]
    fn change_payloads_parse_line_by_line_and_skip_garbage() {
        let a = JobId::new();
        let b = JobId::new();
        let payload = format!("{a} completed mail\nnot a change\n{b} cancelled q.1:x\n{a} bogus q");
        let got: Vec<StateChange> = parse_changes(&payload).collect();
        assert_eq!(
            got,
            [
                StateChange {
                    id: a,
                    queue: QueueName::parse("mail").unwrap(),
                    state: JobState::Completed
                },
                StateChange {
                    id: b,
                    queue: QueueName::parse("q.1:x").unwrap(),
                    state: JobState::Cancelled
                },
            ]
        );
    }
}
