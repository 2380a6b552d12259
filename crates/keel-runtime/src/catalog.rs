//! What this process runs, as the API needs to know it when a job is enqueued, and as
//! metrics need it to keep their labels bounded:
//!
//! - the queues its dispatchers serve (`KEEL_QUEUES`), with the built-in executors and any
//!   Rust handlers registered; every other queue is left to other replicas or to external
//!   workers, so Keel accepts any kind there;
//! - the kinds that have a handler here, and each handler's check of its args;
//! - the label values a metric may carry for a queue or a kind: a served queue, a
//!   registered kind, or [`OTHER`]. Queue and kind names come from clients, so labelling by
//!   them directly would let anyone create series without bound (G5, SPEC §6).

use std::collections::HashSet;
use std::sync::Arc;

use keel_core::{FieldError, JobKind, QueueName};
use serde_json::value::RawValue;

use crate::handler::Handlers;

/// The label of every queue this process does not serve and every kind it has no handler
/// for.
pub const OTHER: &str = "other";

/// See the module docs. Cheap to clone (one `Arc`); the default serves nothing, so it
/// accepts every job and labels everything [`OTHER`].
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    queues: HashSet<QueueName>,
    handlers: Handlers,
}

impl Catalog {
    /// This process serves `queues` with `handlers`.
    pub fn new(queues: impl IntoIterator<Item = QueueName>, handlers: &Handlers) -> Self {
        Self {
            inner: Arc::new(Inner {
                queues: queues.into_iter().collect(),
                handlers: handlers.clone(),
            }),
        }
    }

    /// Whether this process's dispatchers lease from `queue`.
    pub fn serves(&self, queue: &QueueName) -> bool {
        self.inner.queues.contains(queue)
    }

    /// The queues served here, in no particular order: gauges report each of them, even
    /// one with no jobs.
    pub fn queues(&self) -> impl Iterator<Item = &QueueName> {
        self.inner.queues.iter()
    }

    /// The metric label for `queue`: its name if served here, else [`OTHER`].
    pub fn queue_label<'a>(&self, queue: &'a QueueName) -> &'a str {
        if self.serves(queue) {
            queue.as_str()
        } else {
            OTHER
        }
    }

    /// The metric label for `kind`: its name if a handler is registered here, else
    /// [`OTHER`].
    pub fn kind_label<'a>(&self, kind: &'a JobKind) -> &'a str {
        if self.inner.handlers.get(kind).is_some() {
            kind.as_str()
        } else {
            OTHER
        }
    }

    /// Whether a job of `kind` with `args` on `queue` can ever run: on a queue served here,
    /// its kind must have a handler here (no other worker leases from it, so the job would
    /// fail every attempt), and the handler must accept its args. On any other queue every
    /// kind is accepted: external workers decide what they run. The error names the field.
    pub fn check(
        &self,
        queue: &QueueName,
        kind: &JobKind,
        args: &RawValue,
    ) -> Result<(), FieldError> {
        if !self.serves(queue) {
            return Ok(());
        }
        match self.inner.handlers.get(kind) {
            None => Err(FieldError {
                field: "kind".to_owned(),
                message: format!(
                    "no handler for kind {kind:?} on queue {queue:?}, which this server runs with \
                     its own executors (kinds: {}); use one of those, or a queue served by \
                     external workers",
                    self.kinds().join(", ")
                ),
            }),
            Some(handler) => handler.check_args(args).map_err(|message| FieldError {
                field: "args".to_owned(),
                message: format!("invalid args for a {kind} job: {message}"),
            }),
        }
    }

    /// The kinds with a handler here, sorted.
    pub fn kinds(&self) -> Vec<String> {
        self.inner
            .handlers
            .kinds()
            .into_iter()
            .map(|k| k.as_str().to_owned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WebhookConfig;

    fn q(s: &str) -> QueueName {
        QueueName::parse(s).unwrap()
    }

    fn k(s: &str) -> JobKind {
        JobKind::parse(s).unwrap()
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn served_queues_take_only_kinds_they_can_run() {
        let c = Catalog::new(
            [q("default")],
            &Handlers::builtin(&WebhookConfig::default()),
        );
        assert_eq!(
            c.check(&q("default"), &k("sleep"), &raw(r#"{"ms":1}"#)),
            Ok(())
        );
        let e = c
            .check(&q("default"), &k("resize-image"), &raw("{}"))
            .unwrap_err();
        assert_eq!(e.field, "kind");
        assert!(e.message.contains("sleep"), "{}", e.message);
        let e = c
            .check(&q("default"), &k("sleep"), &raw(r#"{"ms":-1}"#))
            .unwrap_err();
        assert_eq!(e.field, "args");
        // Another queue belongs to external workers: anything goes.
        assert_eq!(
            c.check(&q("images"), &k("resize-image"), &raw("{}")),
            Ok(())
        );
    }

    #[test]
    fn labels_are_bounded_by_what_runs_here() {
        let c = Catalog::new(
            [q("default")],
            &Handlers::builtin(&WebhookConfig::default()),
        );
        assert_eq!(c.queue_label(&q("default")), "default");
        assert_eq!(c.queue_label(&q("made-up-1")), OTHER);
        assert_eq!(c.kind_label(&k("noop")), "noop");
        assert_eq!(c.kind_label(&k("made-up-2")), OTHER);
        let none = Catalog::default();
        assert_eq!(none.queue_label(&q("default")), OTHER);
        assert_eq!(none.check(&q("default"), &k("x"), &raw("1")), Ok(()));
    }
}
