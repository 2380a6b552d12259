//! The JSON bodies of Keel's HTTP API, defined once.
//!
//! The server reads requests into these types and writes its answers from them, its OpenAPI
//! document takes their schemas (utoipa), and keel-client sends and reads the same types, so
//! a field cannot exist in one place and not the others. Domain types (keel-core) stay the
//! model; these are what a client sees, with conversions from the domain where the server
//! builds an answer.
//!
//! Optional request fields are `Option`s that are left out when `None`; `null` reads as
//! "not given". Required request fields carry `#[serde(default)]` and are marked required in
//! the schema only: the server reads a body member by member (to list every bad field in one
//! `422`) and reports a missing one itself.

mod duration;
mod job;
mod problem;
mod query;
mod rfc3339;
mod schedule;
mod status;
mod worker;

pub use duration::{
    DURATION_SYNTAX, HumanDuration, UNIT_DURATION_SYNTAX, UnitDuration, format_duration,
    parse_duration_text,
};
pub use job::{
    AttemptErrorOut, Backoff, BatchIn, BatchOut, JobIn, JobOut, JobPageOut, JobResultOut, LeaseOut,
    UniqueIn, UniqueOut, raw_json,
};
pub use problem::{Problem, ProblemField};
pub use query::{JobListQuery, ScheduleListQuery, TenantQuery};
pub use schedule::{JobTemplateIn, JobTemplateOut, ScheduleIn, ScheduleOut, SchedulePageOut};
pub use status::{
    CheckOut, HealthOut, QueueCounts, QueueOut, QueuePausedOut, ReadyChecks, ReadyOut,
};
pub use worker::{
    CompleteBody, CompleteItem, CompleteManyBody, FailBody, FailItem, FailManyBody, HeartbeatBody,
    HeartbeatOut, LeaseBody, LeasedOut, OutcomeOut, OutcomesOut, ReleaseBody, WorkerOut,
    WorkersOut,
};
