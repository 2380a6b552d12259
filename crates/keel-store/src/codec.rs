//! The JSON encodings of the structured columns (`backoff`, `tags`, `errors`, a schedule's
//! `job` template), shared by both backends so a row means the same thing wherever it is
//! stored.

use keel_core::{AttemptError, Backoff, JobTemplate, StoreError};
use serde_json::value::RawValue;

/// `backoff` column text.
pub(crate) fn backoff_to_json(b: &Backoff) -> String {
    serde_json::to_string(b).expect("a Backoff always serialises")
}

/// Parses a stored `backoff`.
pub(crate) fn backoff_from_json(s: &str) -> Result<Backoff, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::permanent("decoding stored backoff", e))
}

/// `tags` column text.
pub(crate) fn tags_to_json(tags: &[String]) -> String {
    serde_json::to_string(tags).expect("strings always serialise")
}

/// Parses stored `tags`.
pub(crate) fn tags_from_json(s: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::permanent("decoding stored tags", e))
}

/// One `errors` entry as JSON.
pub(crate) fn attempt_error_to_json(e: &AttemptError) -> String {
    serde_json::to_string(e).expect("an AttemptError always serialises")
}

/// Parses stored `errors`.
pub(crate) fn errors_from_json(s: &str) -> Result<Vec<AttemptError>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::permanent("decoding stored errors", e))
}

/// Wraps stored JSON text (args, result) without re-parsing it into a tree.
pub(crate) fn raw_json(s: String, what: &'static str) -> Result<Box<RawValue>, StoreError> {
    RawValue::from_string(s)
        .map_err(|e| StoreError::permanent(format!("decoding stored {what}"), e))
}

/// A schedule's `job` column text. The template's `args` are raw JSON and serialise
/// verbatim, so they come back byte for byte.
pub(crate) fn template_to_json(t: &JobTemplate) -> String {
    serde_json::to_string(t).expect("a JobTemplate always serialises")
}

/// Parses a stored schedule `job` template.
pub(crate) fn template_from_json(s: &str) -> Result<JobTemplate, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::permanent("decoding stored job template", e))
}
