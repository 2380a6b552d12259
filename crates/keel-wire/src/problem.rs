//! The body of every error answer: an RFC 9457 problem document.

use keel_core::{JobId, JobState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One invalid field in a `422` (or one invalid query parameter in a `400`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProblemField {
    /// Path of the field, e.g. `priority` or `jobs[3].tags[0]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl From<&keel_core::FieldError> for ProblemField {
    fn from(e: &keel_core::FieldError) -> Self {
        Self {
            field: e.field.clone(),
            message: e.message.clone(),
        }
    }
}

/// An RFC 9457 problem document: the body of every error response. A client reads it
/// leniently (every member defaults), so a body from a proxy in front of Keel still parses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// Stable URI naming the kind of problem, e.g.
    /// `https://keel.dev/problems/validation`. Clients switch on this, not on `detail`.
    #[serde(rename = "type", default)]
    #[schema(required = true)]
    pub type_uri: String,
    /// The status's reason phrase.
    #[serde(default)]
    #[schema(required = true)]
    pub title: String,
    /// The HTTP status, repeated for clients that lose headers.
    #[serde(default)]
    #[schema(required = true)]
    pub status: u16,
    /// What happened, for a human.
    #[serde(default)]
    #[schema(required = true)]
    pub detail: String,
    /// The request's id (`X-Request-Id`), to quote in a bug report and find in the logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Every invalid field (`422`) or query parameter (`400`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ProblemField>,
    /// The job concerned, when there is one (e.g. the job a `504` from `/v1/process` left
    /// running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub job_id: Option<JobId>,
    /// The job's state, when it explains the problem (a result asked of a cancelled job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub state: Option<JobState>,
}

impl Problem {
    /// The media type of a problem document.
    pub const MEDIA_TYPE: &'static str = "application/problem+json";

    /// Serialises the problem: the body of the response.
    pub fn to_body(&self) -> Vec<u8> {
        // A struct of strings and numbers always serialises; the fallback only keeps this
        // path panic-free.
        serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"type":"about:blank","title":"Internal Server Error","status":500}"#.to_vec()
        })
    }
}
