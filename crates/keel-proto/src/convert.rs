//! Between keel-wire's JSON shapes and the `keel.v1` messages. The server renders stored
//! jobs as [`JobOut`] (what an idempotency record also keeps) and sends them as
//! [`v1::Job`]; a gRPC client reads a [`v1::Job`] back as the same [`JobOut`] an HTTP
//! client gets, so handlers see one type whichever transport leased the job.

use chrono::DateTime;
use keel_core::{JobId, JobState, QueueName, Timestamp, UniqueScopeKind};
use keel_wire::{
    AttemptErrorOut, Backoff, JobOut, JobTemplateOut, LeaseOut, ScheduleOut, UniqueOut,
};
use serde_json::value::RawValue;

use crate::v1;

/// A message field that could not be read as the JSON API's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// The field, as named in the message.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for Unreadable {}

fn unreadable(field: &'static str, reason: impl std::fmt::Display) -> Unreadable {
    Unreadable {
        field,
        reason: reason.to_string(),
    }
}

/// A time as a message carries it.
pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        // Below one billion: fits.
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A message's time; `None` when out of range.
pub fn time_of(t: &prost_types::Timestamp) -> Option<Timestamp> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

/// Whole milliseconds as a message's duration.
pub fn duration_ms(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        // Below one billion: fits.
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// A message's duration as whole milliseconds (rounded down); `None` when negative.
pub fn ms_of(d: &prost_types::Duration) -> Option<u64> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u64::try_from(d.nanos).ok()?;
    secs.checked_mul(1000)?.checked_add(nanos / 1_000_000)
}

/// The message's state.
pub fn state(s: JobState) -> v1::JobState {
    match s {
        JobState::Scheduled => v1::JobState::Scheduled,
        JobState::Available => v1::JobState::Available,
        JobState::Running => v1::JobState::Running,
        JobState::Retryable => v1::JobState::Retryable,
        JobState::Completed => v1::JobState::Completed,
        JobState::Discarded => v1::JobState::Discarded,
        JobState::Cancelled => v1::JobState::Cancelled,
    }
}

/// The state a message names; `None` for `JOB_STATE_UNSPECIFIED` or a number this build
/// does not know.
pub fn state_of(n: i32) -> Option<JobState> {
    Some(match v1::JobState::try_from(n).ok()? {
        v1::JobState::Unspecified => return None,
        v1::JobState::Scheduled => JobState::Scheduled,
        v1::JobState::Available => JobState::Available,
        v1::JobState::Running => JobState::Running,
        v1::JobState::Retryable => JobState::Retryable,
        v1::JobState::Completed => JobState::Completed,
        v1::JobState::Discarded => JobState::Discarded,
        v1::JobState::Cancelled => JobState::Cancelled,
    })
}

impl From<Backoff> for v1::Backoff {
    fn from(b: Backoff) -> Self {
        let policy = match b {
            Backoff::Exponential { base_ms, cap_ms } => {
                v1::backoff::Policy::Exponential(v1::backoff::Exponential { base_ms, cap_ms })
            }
            Backoff::Fixed { delay_ms } => {
                v1::backoff::Policy::Fixed(v1::backoff::Fixed { delay_ms })
            }
        };
        Self {
            policy: Some(policy),
        }
    }
}

impl From<AttemptErrorOut> for v1::AttemptError {
    fn from(e: AttemptErrorOut) -> Self {
        Self {
            attempt: e.attempt,
            at: Some(timestamp(e.at)),
            message: e.message,
        }
    }
}

impl From<JobOut> for v1::Job {
    fn from(j: JobOut) -> Self {
        Self {
            id: j.id.to_string(),
            queue: j.queue.into(),
            kind: j.kind,
            tenant: j.tenant,
            args: j.args.get().to_owned(),
            priority: u32::from(j.priority),
            state: state(j.state).into(),
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            timeout: Some(duration_ms(j.timeout_ms)),
            backoff: Some(j.backoff.into()),
            tags: j.tags,
            run_at: Some(timestamp(j.run_at)),
            errors: j.errors.into_iter().map(v1::AttemptError::from).collect(),
            result: j.result.map(|r| r.get().to_owned()),
            lease: j.lease.map(|l| v1::Lease {
                owner: l.owner,
                expires_at: Some(timestamp(l.expires_at)),
                token: l.token,
            }),
            created_at: Some(timestamp(j.created_at)),
            started_at: j.started_at.map(timestamp),
            finished_at: j.finished_at.map(timestamp),
            unique: j.unique.map(|u| v1::UniqueHold {
                key: u.key,
                scope: u.scope.as_str().to_owned(),
            }),
            meta: j.meta.map(|m| m.get().to_owned()),
        }
    }
}

impl From<JobTemplateOut> for v1::JobTemplate {
    fn from(t: JobTemplateOut) -> Self {
        Self {
            kind: t.kind,
            queue: Some(t.queue),
            args: Some(t.args.get().to_owned()),
            priority: Some(u32::from(t.priority)),
            max_attempts: Some(t.max_attempts),
            timeout: Some(duration_ms(t.timeout_ms)),
            backoff: Some(t.backoff.into()),
            tags: t.tags,
        }
    }
}

impl From<ScheduleOut> for v1::Schedule {
    fn from(s: ScheduleOut) -> Self {
        Self {
            tenant: s.tenant,
            name: s.name,
            cron: s.cron,
            timezone: s.timezone,
            job: Some(s.job.into()),
            paused: s.paused,
            catch_up: Some(duration_ms(s.catch_up)),
            last_tick_at: s.last_tick_at.map(timestamp),
            next_ticks: s.next_ticks.into_iter().map(timestamp).collect(),
            created_at: Some(timestamp(s.created_at)),
            updated_at: Some(timestamp(s.updated_at)),
        }
    }
}

fn json(field: &'static str, text: String) -> Result<Box<RawValue>, Unreadable> {
    RawValue::from_string(text).map_err(|e| unreadable(field, e))
}

fn time(field: &'static str, t: Option<&prost_types::Timestamp>) -> Result<Timestamp, Unreadable> {
    t.and_then(time_of)
        .ok_or_else(|| unreadable(field, "is missing or out of range"))
}

fn backoff(b: Option<v1::Backoff>) -> Result<Backoff, Unreadable> {
    match b.and_then(|b| b.policy) {
        Some(v1::backoff::Policy::Exponential(e)) => Ok(Backoff::Exponential {
            base_ms: e.base_ms,
            cap_ms: e.cap_ms,
        }),
        Some(v1::backoff::Policy::Fixed(f)) => Ok(Backoff::Fixed {
            delay_ms: f.delay_ms,
        }),
        None => Err(unreadable("backoff", "is missing")),
    }
}

impl TryFrom<v1::Job> for JobOut {
    type Error = Unreadable;

    /// The job as the HTTP API would have rendered it; refuses what a Keel server never
    /// sends (an id that is not one, JSON text that does not parse, a missing time).
    fn try_from(j: v1::Job) -> Result<Self, Unreadable> {
        let errors = j
            .errors
            .into_iter()
            .map(|e| {
                Ok(AttemptErrorOut {
                    attempt: e.attempt,
                    at: time("errors.at", e.at.as_ref())?,
                    message: e.message,
                })
            })
            .collect::<Result<_, Unreadable>>()?;
        let lease = j
            .lease
            .map(|l| {
                Ok::<_, Unreadable>(LeaseOut {
                    token: l.token,
                    owner: l.owner,
                    expires_at: time("lease.expires_at", l.expires_at.as_ref())?,
                })
            })
            .transpose()?;
        let unique = j
            .unique
            .map(|u| {
                let scope = UniqueScopeKind::parse(&u.scope)
                    .ok_or_else(|| unreadable("unique.scope", "is not a scope"))?;
                Ok::<_, Unreadable>(UniqueOut { key: u.key, scope })
            })
            .transpose()?;
        Ok(JobOut {
            id: JobId::parse(&j.id).map_err(|e| unreadable("id", e.reason))?,
            queue: QueueName::parse(j.queue).map_err(|e| unreadable("queue", e.reason))?,
            kind: j.kind,
            tenant: j.tenant,
            args: json("args", j.args)?,
            priority: u8::try_from(j.priority).map_err(|e| unreadable("priority", e))?,
            state: state_of(j.state).ok_or_else(|| unreadable("state", "is not a state"))?,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            timeout_ms: j
                .timeout
                .as_ref()
                .and_then(ms_of)
                .ok_or_else(|| unreadable("timeout", "is missing or negative"))?,
            backoff: backoff(j.backoff)?,
            tags: j.tags,
            run_at: time("run_at", j.run_at.as_ref())?,
            errors,
            result: j.result.map(|r| json("result", r)).transpose()?,
            lease,
            created_at: time("created_at", j.created_at.as_ref())?,
            started_at: j
                .started_at
                .map(|t| time("started_at", Some(&t)))
                .transpose()?,
            finished_at: j
                .finished_at
                .map(|t| time("finished_at", Some(&t)))
                .transpose()?,
            unique,
            meta: j.meta.map(|m| json("meta", m)).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_both_ways() {
        for s in JobState::ALL {
            assert_eq!(state_of(state(s).into()), Some(s));
        }
        assert_eq!(state_of(0), None);
        assert_eq!(state_of(99), None);
    }

    fn sample() -> JobOut {
        let at = DateTime::from_timestamp(1_900_000_000, 123_000_000).unwrap();
        JobOut {
            id: JobId::parse("0190b3c8-7c4e-7000-8000-000000000001").unwrap(),
            queue: QueueName::parse("mail".to_owned()).unwrap(),
            kind: "send".into(),
            tenant: "acme".into(),
            args: RawValue::from_string(r#"{"b": 1,  "a": 2}"#.into()).unwrap(),
            priority: 3,
            state: JobState::Running,
            attempt: 2,
            max_attempts: 5,
            timeout_ms: 1500,
            backoff: Backoff::Fixed { delay_ms: 7 },
            tags: vec!["x".into()],
            run_at: at,
            errors: vec![AttemptErrorOut {
                attempt: 1,
                at,
                message: "boom".into(),
            }],
            result: None,
            lease: Some(LeaseOut {
                token: Some("0190b3c8-7c4e-7000-8000-0000000000ff".into()),
                owner: "w1".into(),
                expires_at: at,
            }),
            created_at: at,
            started_at: Some(at),
            finished_at: None,
            unique: Some(UniqueOut {
                key: "k".into(),
                scope: UniqueScopeKind::Active,
            }),
            meta: Some(RawValue::from_string(r#"{"t":1}"#.into()).unwrap()),
        }
    }

    #[test]
    fn a_job_survives_the_round_trip_through_the_message() {
        let job = sample();
        let back = JobOut::try_from(v1::Job::from(job.clone())).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&job).unwrap()
        );
        assert_eq!(back.args.get(), r#"{"b": 1,  "a": 2}"#);
    }

    #[test]
    fn what_a_server_never_sends_is_refused_by_field() {
        let mut m = v1::Job::from(sample());
        m.args = "{nope".into();
        assert_eq!(JobOut::try_from(m.clone()).unwrap_err().field, "args");
        m.args = "null".into();
        m.state = 42;
        assert_eq!(JobOut::try_from(m.clone()).unwrap_err().field, "state");
        m.state = v1::JobState::Running.into();
        m.id = "nope".into();
        assert_eq!(JobOut::try_from(m).unwrap_err().field, "id");
    }
}
