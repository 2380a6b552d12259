//! Typed identifiers and names.
//!
//! Each is a newtype with a validating constructor so that a `QueueName` in a function
//! signature is a proof that the string was checked once, at the edge, and never again.
//! Deserialisation goes through the same constructors, so untrusted JSON cannot smuggle in a
//! value `parse` would refuse.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: {reason}")]
pub struct InvalidId {
    /// Which kind of value was being parsed ("queue name", "job id", …).
    pub what: &'static str,
    /// What was wrong with it, phrased for an API client.
    pub reason: String,
}

/// A job's id: a UUIDv7, so ids sort by creation time and keyset pagination by id lists jobs
/// oldest first without a separate index on `created_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(Uuid);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses the hyphenated or simple textual form.
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        Uuid::try_parse(s).map(Self).map_err(|e| InvalidId {
            what: "job id",
            reason: e.to_string(),
        })
    }

    /// Wraps a UUID read back from storage.
    pub const fn from_uuid(u: Uuid) -> Self {
        Self(u)
    }

    /// The underlying UUID.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The 16 big-endian bytes; their byte order is the ids' time order.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The secret handed out with a lease. Heartbeat, complete, fail and release must present
/// it; a token from an older lease of the same job is refused (fencing), so a worker that
/// lost its lease (paused, partitioned, presumed dead and rescued) cannot overwrite the
/// outcome of the run that replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseToken(Uuid);

impl LeaseToken {
    /// A fresh random token.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// Wraps a token read back from storage.
    pub const fn from_uuid(u: Uuid) -> Self {
        Self(u)
    }

    /// The underlying UUID.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// Parses the textual form a worker sends back.
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        Uuid::try_parse(s).map(Self).map_err(|e| InvalidId {
            what: "lease token",
            reason: e.to_string(),
        })
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Checks the shared shape of Keel's names: 1..=`max` bytes of ASCII letters, digits and
/// `_ - . :`, starting with a letter or digit. The set is narrow on purpose: names end up in
/// metric labels, log fields and URLs, and must need no escaping in any of them.
fn check_name(what: &'static str, s: &str, max: usize) -> Result<(), InvalidId> {
    let fail = |reason: String| Err(InvalidId { what, reason });
    if s.is_empty() {
        return fail("must not be empty".into());
    }
    if s.len() > max {
        return fail(format!("must be at most {max} bytes, got {}", s.len()));
    }
    let first = s.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return fail("must start with an ASCII letter or digit".into());
    }
    if let Some(bad) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
    {
        return fail(format!(
            "may contain only ASCII letters, digits and _ - . : (found {bad:?})"
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $default:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Longest accepted value, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps `s`.
            pub fn parse(s: impl Into<String>) -> Result<Self, InvalidId> {
                let s = s.into();
                check_name($what, &s, Self::MAX_LEN)?;
                Ok(Self(s))
            }

            /// The rule of [`Self::parse`] as a regular expression (ECMA-262 and Rust
            /// `regex` alike), for the OpenAPI document: a value matches exactly when it
            /// parses.
            pub fn pattern() -> String {
                format!("^[A-Za-z0-9][A-Za-z0-9_.:-]{{0,{}}}$", Self::MAX_LEN - 1)
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self($default.to_owned())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A queue: the unit of worker-pool concurrency, pausing and statistics. Defaults to
    /// `default`.
    QueueName, "queue name", 128, "default"
);
name_type!(
    /// A tenant: the partition key for fairness, rate limits and idempotency keys. Defaults
    /// to `default`.
    TenantId, "tenant", 128, "default"
);
name_type!(
    /// Which executor or handler runs a job (`noop`, `webhook`, `send_email`, …).
    JobKind, "job kind", 128, "noop"
);
name_type!(
    /// A cron schedule's name, unique per tenant (`nightly-report`, `billing.sync`).
    ScheduleName, "schedule name", 128, "schedule"
);
name_type!(
    /// Who holds a lease: a Keel replica's worker pool or an external worker. Recorded on
    /// the job so an operator can see who ran (or is stuck running) it.
    WorkerId, "worker id", 255, "local"
);

/// A client-chosen key that makes an enqueue idempotent (`Idempotency-Key` header). Scoped
/// per tenant. 1..=255 bytes of visible ASCII, as in the IETF idempotency-key draft and
/// Stripe's API; anything else is refused before it reaches storage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Longest accepted key, in bytes.
    pub const MAX_LEN: usize = 255;

    /// The rule of [`Self::parse`] as a regular expression, for the OpenAPI document.
    pub const PATTERN: &'static str = "^[!-~]{1,255}$";

    /// Validates and wraps `s`.
    pub fn parse(s: impl Into<String>) -> Result<Self, InvalidId> {
        let s = s.into();
        let fail = |reason: String| {
            Err(InvalidId {
                what: "idempotency key",
                reason,
            })
        };
        if s.is_empty() {
            return fail("must not be empty".into());
        }
        if s.len() > Self::MAX_LEN {
            return fail(format!(
                "must be at most {} bytes, got {}",
                Self::MAX_LEN,
                s.len()
            ));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return fail(
                "may contain only visible ASCII characters (no spaces or controls)".into(),
            );
        }
        Ok(Self(s))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl From<IdempotencyKey> for String {
    fn from(k: IdempotencyKey) -> String {
        k.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_documented_alphabet() {
        for ok in ["default", "emails", "a", "q-1.b_c:d", "9lives"] {
            assert!(QueueName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn names_refuse_everything_else_with_a_reason() {
        let cases = [
            ("", "must not be empty"),
            ("-lead", "must start"),
            ("has space", "may contain only"),
            ("ünï", "must start"),
            ("q/../x", "may contain only"),
        ];
        for (bad, why) in cases {
            let err = QueueName::parse(bad).unwrap_err();
            assert!(err.reason.contains(why), "{bad:?}: {err}");
            assert_eq!(err.what, "queue name");
        }
        let long = "a".repeat(QueueName::MAX_LEN + 1);
        assert!(
            QueueName::parse(long)
                .unwrap_err()
                .reason
                .contains("at most 128")
        );
    }

    #[test]
    fn deserialisation_validates() {
        let err = serde_json::from_str::<TenantId>("\"bad tenant\"").unwrap_err();
        assert!(err.to_string().contains("invalid tenant"), "{err}");
        let ok: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(ok.as_str(), "acme");
    }

    #[test]
    fn idempotency_keys_are_visible_ascii() {
        assert!(IdempotencyKey::parse("req_123-abc").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse("é").is_err());
        assert!(IdempotencyKey::parse("k".repeat(256)).is_err());
    }

    #[test]
    fn job_ids_sort_by_creation() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a < b);
        assert!(a.as_bytes() < b.as_bytes());
        assert_eq!(JobId::parse(&a.to_string()).unwrap(), a);
        assert!(JobId::parse("not-a-uuid").is_err());
    }

    proptest::proptest! {
        /// The documented patterns and the parsers agree, both ways.
        #[test]
        fn names_match_their_pattern_exactly(s in "\\PC{0,140}") {
            let re = regex::Regex::new(&QueueName::pattern()).unwrap();
            proptest::prop_assert_eq!(re.is_match(&s), QueueName::parse(s.clone()).is_ok());
            let key = regex::Regex::new(IdempotencyKey::PATTERN).unwrap();
            proptest::prop_assert_eq!(key.is_match(&s), IdempotencyKey::parse(s.clone()).is_ok());
        }

        /// What the patterns generate parses.
        #[test]
        fn strings_of_the_patterns_parse(
            name in "[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}",
            key in "[!-~]{1,255}",
        ) {
            proptest::prop_assert!(QueueName::parse(name.clone()).is_ok());
            proptest::prop_assert!(JobKind::parse(name).is_ok());
            proptest::prop_assert!(IdempotencyKey::parse(key).is_ok());
        }
    }
}
