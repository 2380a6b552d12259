//! The bounded channel each backend feeds its single writer through (the SQLite writer
//! thread, the Postgres group committer): what both do with it from the callers' side.

use tokio::sync::{mpsc, oneshot};

/// Messages waiting in the channel behind `tx` (the writer has not taken them yet).
pub(crate) fn queued<M>(tx: &mpsc::Sender<M>) -> usize {
    tx.max_capacity() - tx.capacity()
}

/// Queues the close message that `close` builds around an acknowledgement sender and waits
/// for the writer to acknowledge it, which it does once everything queued before it is
/// written. Returns at once if the writer has already stopped.
pub(crate) async fn close<M>(tx: &mpsc::Sender<M>, close: impl FnOnce(oneshot::Sender<()>) -> M) {
    let (done, wait) = oneshot::channel();
    if tx.send(close(done)).await.is_ok() {
        let _ = wait.await;
    }
}
