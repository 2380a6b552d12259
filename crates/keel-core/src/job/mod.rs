//! The job model: what a job is ([`Job`], [`NewJob`]), the states it moves through and which
//! moves are legal (`state.rs`), and unique keys (`unique.rs`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::backoff::Backoff;
use crate::clock::Timestamp;
use crate::error::{FieldError, ValidationErrors};
use crate::ids::{JobId, JobKind, LeaseToken, QueueName, TenantId, WorkerId};

mod state;
mod unique;

pub use state::{IllegalTransition, JobState, Transition, next_attempt_at};
pub use unique::{Unique, UniqueHold, UniqueScope, UniqueScopeKind};

/// A job's priority: 0 is the most urgent, 9 the least. Within a queue, lower values are
/// leased first; equal priorities go by `run_at`, then by id (creation order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Priority(u8);

impl Priority {
    /// The most urgent priority.
    pub const HIGHEST: Priority = Priority(0);
    /// The least urgent priority.
    pub const LOWEST: Priority = Priority(9);
    /// The default: in the middle, so both more and less urgent work can be expressed.
    pub const DEFAULT: Priority = Priority(4);

    /// Validates `p` (0..=9).
    pub fn new(p: u8) -> Result<Self, String> {
        if p <= Self::LOWEST.0 {
            Ok(Self(p))
        } else {
            Err(format!(
                "must be between 0 (highest) and 9 (lowest), got {p}"
            ))
        }
    }

    /// The numeric value.
    pub const fn get(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u8> for Priority {
    type Error = String;
    fn try_from(p: u8) -> Result<Self, Self::Error> {
        Self::new(p)
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

/// One failed attempt, as recorded in the job's `errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// Which attempt failed (1-based).
    pub attempt: u32,
    /// When the failure was recorded.
    pub at: Timestamp,
    /// What went wrong, truncated to [`AttemptError::MAX_MESSAGE_BYTES`].
    pub message: String,
}

impl AttemptError {
    /// Longest message kept per attempt. Bounded so a worker that dumps a huge stack trace
    /// every attempt cannot grow one row without limit.
    pub const MAX_MESSAGE_BYTES: usize = 4096;

    /// Builds a record, truncating the message on a character boundary and replacing any
    /// NUL with U+FFFD: messages come from handlers and workers (anything at all), and are
    /// stored as jsonb on Postgres, which cannot hold U+0000; replacing it on both backends
    /// keeps them storing the same text, and a failure report from ever being refused.
    pub fn new(attempt: u32, at: Timestamp, message: &str) -> Self {
        let mut end = message.len().min(Self::MAX_MESSAGE_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let kept = &message[..end];
        let message = if kept.contains('\0') {
            kept.replace('\0', "\u{FFFD}")
        } else {
            kept.to_owned()
        };
        Self {
            attempt,
            at,
            message,
        }
    }
}

/// The lease a running job is held under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it.
    pub owner: WorkerId,
    /// The fencing token the holder must present.
    pub token: LeaseToken,
    /// When it lapses unless renewed.
    pub expires_at: Timestamp,
}

/// A stored job: what was asked for, plus what Keel recorded while running it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// Time-ordered id.
    pub id: JobId,
    /// Queue it runs in.
    pub queue: QueueName,
    /// Executor or handler that runs it.
    pub kind: JobKind,
    /// Tenant it belongs to.
    pub tenant: TenantId,
    /// Arguments, JSON, kept byte for byte as submitted.
    pub args: Box<RawValue>,
    /// 0 (highest) … 9.
    pub priority: Priority,
    /// Current state.
    pub state: JobState,
    /// Attempts started so far (incremented when leased).
    pub attempt: u32,
    /// Attempts allowed before the job is discarded.
    pub max_attempts: u32,
    /// How long one attempt may run.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Retry delay policy.
    pub backoff: Backoff,
    /// Free-form labels for searching and grouping.
    pub tags: Vec<String>,
    /// Earliest time it may run (next run time when scheduled or retryable).
    pub run_at: Timestamp,
    /// One entry per failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// The result reported on completion.
    pub result: Option<Box<RawValue>>,
    /// The current lease, while running.
    pub lease: Option<Lease>,
    /// When it was inserted.
    pub created_at: Timestamp,
    /// When the latest attempt started.
    pub started_at: Option<Timestamp>,
    /// When it reached its terminal state.
    pub finished_at: Option<Timestamp>,
    /// Its unique key, if it was inserted with one.
    pub unique: Option<UniqueHold>,
    /// The caller's annotations (a JSON object, kept byte for byte), if any. Keel never
    /// reads them: they travel with the job to its worker and to whoever looks it up.
    pub meta: Option<Box<RawValue>>,
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.queue == other.queue
            && self.kind == other.kind
            && self.tenant == other.tenant
            && self.args.get() == other.args.get()
            && self.priority == other.priority
            && self.state == other.state
            && self.attempt == other.attempt
            && self.max_attempts == other.max_attempts
            && self.timeout == other.timeout
            && self.backoff == other.backoff
            && self.tags == other.tags
            && self.run_at == other.run_at
            && self.errors == other.errors
            && self.result.as_ref().map(|r| r.get()) == other.result.as_ref().map(|r| r.get())
            && self.lease == other.lease
            && self.created_at == other.created_at
            && self.started_at == other.started_at
            && self.finished_at == other.finished_at
            && self.unique == other.unique
            && self.meta.as_ref().map(|m| m.get()) == other.meta.as_ref().map(|m| m.get())
    }
}

/// What a client submits. Build one with [`NewJob::new`] and the builder methods, then
/// [`NewJob::validate`]; stores validate again before writing, so nothing unchecked is
/// ever stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewJob {
    /// Assigned up front so that the caller knows the id before the insert returns (needed
    /// for idempotency records and for answering a client whose connection drops).
    pub id: JobId,
    /// Queue to run in.
    pub queue: QueueName,
    /// Executor or handler.
    pub kind: JobKind,
    /// Tenant.
    pub tenant: TenantId,
    /// Arguments (JSON).
    pub args: Box<RawValue>,
    /// 0 (highest) … 9.
    pub priority: Priority,
    /// Earliest run time; `None` means now.
    pub run_at: Option<Timestamp>,
    /// Attempts allowed, 1..=[`NewJob::MAX_ATTEMPTS_LIMIT`].
    pub max_attempts: u32,
    /// Per-attempt timeout, 1 ms ..= [`NewJob::MAX_TIMEOUT`].
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Retry policy.
    pub backoff: Backoff,
    /// Labels, at most [`NewJob::MAX_TAGS`], each at most [`NewJob::MAX_TAG_LEN`] characters.
    pub tags: Vec<String>,
    /// Uniqueness: if another job of the tenant holds this key, the insert returns that job
    /// instead of creating this one.
    #[serde(default)]
    pub unique: Option<Unique>,
    /// Annotations: a JSON object of at most [`NewJob::MAX_META_BYTES`].
    #[serde(default)]
    pub meta: Option<Box<RawValue>>,
}

/// Builder methods that each set the field of their name: `name: Type;` becomes
/// `pub fn name(mut self, value: Type) -> Self`, so the plain setters of [`NewJob`] are
/// listed, not written out one by one.
macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.$name = value;
                self
            }
        )*
    };
}

impl NewJob {
    /// Default attempts before a job is discarded (River and Sidekiq use 25 too).
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 25;
    /// Upper bound on `max_attempts`; it also bounds the size of `errors`.
    pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;
    /// Default per-attempt timeout.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
    /// Longest per-attempt timeout.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
    /// Default cap on serialised `args`, bytes. The API may configure a lower one.
    pub const DEFAULT_MAX_ARGS_BYTES: usize = 1024 * 1024;
    /// Most tags per job.
    pub const MAX_TAGS: usize = 32;
    /// Earliest accepted `run_at`.
    pub const MIN_RUN_AT: &'static str = "2000-01-01T00:00:00Z";
    /// Latest accepted `run_at`: far enough for any real schedule (the API documents
    /// `run_at` up to 2199, plus a `delay_ms` of up to ten years), near enough that every
    /// timestamp computation on it (backoff, leases, microsecond storage, chrono's
    /// nanoseconds that end in 2262) stays in range.
    pub const MAX_RUN_AT: &'static str = "2250-01-01T00:00:00Z";
    /// Longest tag, in characters (as JSON Schema counts them).
    pub const MAX_TAG_LEN: usize = 128;
    /// Cap on serialised `meta`, bytes: annotations, not a second `args`. It is read with
    /// every job a worker leases, so it stays small.
    pub const MAX_META_BYTES: usize = 16 * 1024;

    /// A job of `kind` with default queue, tenant, priority, attempts, timeout and backoff,
    /// and `null` args.
    pub fn new(kind: JobKind) -> Self {
        Self {
            id: JobId::new(),
            queue: QueueName::default(),
            kind,
            tenant: TenantId::default(),
            args: RawValue::from_string("null".to_owned()).expect("`null` is valid JSON"),
            priority: Priority::DEFAULT,
            run_at: None,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            timeout: Self::DEFAULT_TIMEOUT,
            backoff: Backoff::default(),
            tags: Vec::new(),
            unique: None,
            meta: None,
        }
    }

    /// Makes the job unique by `key` within `scope` (see [`Unique`]).
    pub fn unique(mut self, key: impl Into<String>, scope: UniqueScope) -> Self {
        self.unique = Some(Unique {
            key: key.into(),
            scope,
        });
        self
    }

    setters! {
        /// Sets the queue.
        queue: QueueName;
        /// Sets the tenant.
        tenant: TenantId;
        /// Sets the args.
        args: Box<RawValue>;
        /// Sets the priority.
        priority: Priority;
        /// Sets the attempt limit.
        max_attempts: u32;
        /// Sets the per-attempt timeout.
        timeout: Duration;
        /// Sets the retry policy.
        backoff: Backoff;
        /// Sets the tags.
        tags: Vec<String>;
    }

    /// Sets the earliest run time.
    pub fn run_at(mut self, t: Timestamp) -> Self {
        self.run_at = Some(t);
        self
    }

    /// Sets the annotations (a JSON object).
    pub fn meta(mut self, meta: Box<RawValue>) -> Self {
        self.meta = Some(meta);
        self
    }

    /// Checks every field against its bounds and reports *all* violations at once, so an
    /// API client can fix its request in one round trip.
    pub fn validate(&self, max_args_bytes: usize) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        let mut bad = |field: &str, message: String| {
            errors.push(FieldError {
                field: field.to_owned(),
                message,
            })
        };
        if self.args.get().len() > max_args_bytes {
            bad(
                "args",
                format!(
                    "must be at most {max_args_bytes} bytes of JSON, got {}",
                    self.args.get().len()
                ),
            );
        } else if let Err(e) = crate::json_text::check(self.args.get()) {
            bad("args", e.to_string());
        }
        if self.max_attempts == 0 || self.max_attempts > Self::MAX_ATTEMPTS_LIMIT {
            bad(
                "max_attempts",
                format!(
                    "must be between 1 and {}, got {}",
                    Self::MAX_ATTEMPTS_LIMIT,
                    self.max_attempts
                ),
            );
        }
        if self.timeout < Duration::from_millis(1) || self.timeout > Self::MAX_TIMEOUT {
            bad(
                "timeout",
                format!(
                    "must be between 1 ms and {} s, got {} ms",
                    Self::MAX_TIMEOUT.as_secs(),
                    self.timeout.as_millis()
                ),
            );
        }
        if let Err(e) = self.backoff.validate() {
            bad("backoff", e);
        }
        if let Some(at) = self.run_at {
            let bound = |s: &str| chrono::DateTime::parse_from_rfc3339(s).map(|t| t.to_utc());
            if let (Ok(min), Ok(max)) = (bound(Self::MIN_RUN_AT), bound(Self::MAX_RUN_AT))
                && (at < min || at > max)
            {
                bad(
                    "run_at",
                    format!(
                        "must be between {} and {}, got {}",
                        Self::MIN_RUN_AT,
                        Self::MAX_RUN_AT,
                        at.to_rfc3339()
                    ),
                );
            }
        }
        if self.tags.len() > Self::MAX_TAGS {
            bad(
                "tags",
                format!("at most {} tags, got {}", Self::MAX_TAGS, self.tags.len()),
            );
        }
        for (i, tag) in self.tags.iter().enumerate() {
            let chars = tag.chars().count();
            if chars == 0 || chars > Self::MAX_TAG_LEN {
                bad(
                    &format!("tags[{i}]"),
                    format!("must be 1 to {} characters, got {chars}", Self::MAX_TAG_LEN),
                );
            } else if tag.chars().any(char::is_control) {
                // Tags are stored as jsonb on Postgres, which cannot hold U+0000; the other
                // control characters are refused with it, so that a tag always prints.
                bad(
                    &format!("tags[{i}]"),
                    "must not contain control characters (U+0000-U+001F, U+007F-U+009F)".into(),
                );
            }
        }
        if let Some(u) = &self.unique {
            for (field, message) in u.problems() {
                bad(field, message);
            }
        }
        if let Some(meta) = &self.meta {
            let text = meta.get();
            if text.len() > Self::MAX_META_BYTES {
                bad(
                    "meta",
                    format!(
                        "must be at most {} bytes of JSON, got {}",
                        Self::MAX_META_BYTES,
                        text.len()
                    ),
                );
            } else if !text.trim_start().starts_with('{') {
                bad("meta", "must be a JSON object".into());
            } else if let Err(e) = crate::json_text::check(text) {
                bad("meta", e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }

    /// The job as stored right after insert at `now`: scheduled if `run_at` is in the
    /// future, otherwise available.
    pub fn into_job(self, now: Timestamp) -> Job {
        let run_at = self.run_at.map_or(now, crate::clock::truncate_micros);
        let state = if run_at > now {
            JobState::Scheduled
        } else {
            JobState::Available
        };
        Job {
            id: self.id,
            queue: self.queue,
            kind: self.kind,
            tenant: self.tenant,
            args: self.args,
            priority: self.priority,
            state,
            attempt: 0,
            max_attempts: self.max_attempts,
            timeout: self.timeout,
            backoff: self.backoff,
            tags: self.tags,
            run_at,
            errors: Vec::new(),
            result: None,
            lease: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            unique: self.unique.map(|u| UniqueHold {
                key: u.stored_key(now),
                scope: u.scope.kind(),
            }),
            meta: self.meta,
        }
    }
}

/// Serialises a `Duration` as whole milliseconds, the unit used by the API and the stores.
pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u128::from(u64::MAX)) as u64)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_state_is_finished_or_unfinished_never_both() {
        for s in JobState::ALL {
            assert_ne!(
                JobState::FINISHED.contains(&s),
                JobState::UNFINISHED.contains(&s),
                "{s:?}"
            );
        }
        assert_eq!(
            JobState::FINISHED.len() + JobState::UNFINISHED.len(),
            JobState::ALL.len()
        );
    }

    fn state() -> impl Strategy<Value = JobState> {
        proptest::sample::select(JobState::ALL.to_vec())
    }

    fn transition() -> impl Strategy<Value = Transition> {
        proptest::sample::select(Transition::ALL.to_vec())
    }

    #[test]
    fn the_documented_table() {
        use JobState::*;
        use Transition as T;
        let legal = [
            (Scheduled, T::Promote, Available),
            (Retryable, T::Promote, Available),
            (Available, T::Lease, Running),
            (Running, T::Complete, Completed),
            (Running, T::Fail { retry: true }, Retryable),
            (Running, T::Fail { retry: false }, Discarded),
            (Running, T::Rescue { retry: true }, Retryable),
            (Running, T::Rescue { retry: false }, Discarded),
            (Running, T::Release, Available),
            (Scheduled, T::Cancel, Cancelled),
            (Available, T::Cancel, Cancelled),
            (Retryable, T::Cancel, Cancelled),
            (Running, T::Cancel, Cancelled),
            (Scheduled, T::Retry, Available),
            (Retryable, T::Retry, Available),
            (Completed, T::Retry, Available),
            (Discarded, T::Retry, Available),
            (Cancelled, T::Retry, Available),
        ];
        let mut count = 0;
        for from in JobState::ALL {
            for t in Transition::ALL {
                let expected = legal
                    .iter()
                    .find(|(f, tr, _)| *f == from && *tr == t)
                    .map(|(_, _, to)| *to);
                match (from.apply(t), expected) {
                    (Ok(to), Some(want)) => {
                        assert_eq!(to, want, "{from} --{t:?}-->");
                        count += 1;
                    }
                    (Err(e), None) => {
                        assert_eq!((e.from, e.transition), (from, t));
                    }
                    (got, want) => panic!("{from} --{t:?}--> got {got:?}, want {want:?}"),
                }
            }
        }
        assert_eq!(count, legal.len());
    }

    #[test]
    fn illegal_transition_message_reads_well() {
        let e = JobState::Completed.apply(Transition::Cancel).unwrap_err();
        assert_eq!(e.to_string(), "cannot cancel a job that is completed");
    }

    #[test]
    fn state_names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("done".parse::<JobState>().is_err());
    }

    #[test]
    fn validation_reports_every_field() {
        let mut job = NewJob::new(JobKind::parse("noop").unwrap())
            .max_attempts(0)
            .timeout(Duration::ZERO)
            .backoff(Backoff::Exponential {
                base_ms: 0,
                cap_ms: 0,
            })
            .args(RawValue::from_string("[1,2,3,4]".into()).unwrap());
        job.tags = vec![String::new(); NewJob::MAX_TAGS + 1];
        let errs = job.validate(4).unwrap_err();
        let fields: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "args",
            "max_attempts",
            "timeout",
            "backoff",
            "tags",
            "tags[0]",
        ] {
            assert!(fields.contains(&f), "missing {f} in {fields:?}");
        }
    }

    #[test]
    fn meta_must_be_a_small_json_object() {
        let with = |text: &str| {
            NewJob::new(JobKind::parse("noop").unwrap())
                .meta(RawValue::from_string(text.to_owned()).unwrap())
                .validate(NewJob::DEFAULT_MAX_ARGS_BYTES)
        };
        assert!(with(r#" {"trace": "abc", "n": [1, 2]}"#).is_ok());
        assert!(with("{}").is_ok());
        for bad in ["[1]", "\"text\"", "null", "3"] {
            let errs = with(bad).unwrap_err();
            assert_eq!(errs.0.len(), 1, "{bad}: {errs:?}");
            assert_eq!(errs.0[0].field, "meta");
            assert_eq!(errs.0[0].message, "must be a JSON object", "{bad}");
        }
        let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(NewJob::MAX_META_BYTES));
        let errs = with(&big).unwrap_err();
        assert!(
            errs.0[0].message.starts_with("must be at most 16384 bytes"),
            "{errs:?}"
        );
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(70), "]".repeat(70));
        assert_eq!(with(&deep).unwrap_err().0[0].field, "meta");
    }

    #[test]
    fn next_attempt_follows_attempts_and_permanence() {
        use crate::clock::{Clock, SystemClock};
        let now = SystemClock.now();
        let b = Backoff::Fixed { delay_ms: 1500 };
        let mut rng = rand::rng();
        assert_eq!(
            next_attempt_at(1, 3, &b, false, now, &mut rng),
            Some(now + chrono::TimeDelta::milliseconds(1500))
        );
        assert_eq!(next_attempt_at(3, 3, &b, false, now, &mut rng), None);
        assert_eq!(next_attempt_at(1, 3, &b, true, now, &mut rng), None);
    }

    #[test]
    fn priority_bounds() {
        assert!(Priority::new(9).is_ok());
        assert!(Priority::new(10).unwrap_err().contains("between 0"));
        assert!(serde_json::from_str::<Priority>("12").is_err());
    }

    #[test]
    fn attempt_error_truncates_on_char_boundary() {
        use crate::clock::Clock;
        let msg = "é".repeat(AttemptError::MAX_MESSAGE_BYTES);
        let e = AttemptError::new(1, crate::clock::SystemClock.now(), &msg);
        assert!(e.message.len() <= AttemptError::MAX_MESSAGE_BYTES);
        assert!(e.message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn into_job_picks_scheduled_or_available() {
        use crate::clock::{Clock, SystemClock};
        let now = SystemClock.now();
        let kind = JobKind::parse("noop").unwrap();
        let later = NewJob::new(kind.clone()).run_at(now + chrono::TimeDelta::seconds(5));
        assert_eq!(later.into_job(now).state, JobState::Scheduled);
        assert_eq!(NewJob::new(kind).into_job(now).state, JobState::Available);
    }

    proptest! {
        // Terminal states only ever leave through an explicit user retry.
        #[test]
        fn finished_states_leave_only_by_retry(s in state(), t in transition()) {
            if s.is_finished() && let Ok(to) = s.apply(t) {
                prop_assert_eq!(t, Transition::Retry);
                prop_assert_eq!(to, JobState::Available);
            }
        }

        // Only a lease makes a job running, and only a running job can complete or fail:
        // there is no way to record an outcome for work nobody ran.
        #[test]
        fn outcomes_require_running(s in state(), t in transition()) {
            if let Ok(to) = s.apply(t) {
                if to == JobState::Running {
                    prop_assert_eq!((s, t), (JobState::Available, Transition::Lease));
                }
                if matches!(t, Transition::Complete | Transition::Fail { .. } | Transition::Rescue { .. } | Transition::Release) {
                    prop_assert_eq!(s, JobState::Running);
                }
            }
        }

        // Any sequence of transitions, applied where legal, ends in a known state and never
        // panics; sources() agrees with apply() at every step.
        #[test]
        fn random_walks_stay_in_the_machine(steps in proptest::collection::vec(transition(), 0..64)) {
            let mut s = JobState::Available;
            for t in steps {
                prop_assert_eq!(t.sources().contains(&s), s.apply(t).is_ok());
                if let Ok(next) = s.apply(t) {
                    s = next;
                }
            }
            prop_assert!(JobState::ALL.contains(&s));
        }
    }
}
