//! How each setting's value appears in `/debug/config` (and in `Debug`, which reuses it):
//! durations as `…ms`, rates and queue lists in the syntax they are written in, and secret
//! settings redacted — enough to tell that a secret is set, never the secret.
//!
//! A type is shown through [`Show`] or, when its setting is declared `secret`, through
//! [`Redact`]. Secret types implement only `Redact`, so a secret setting declared without
//! the flag does not compile instead of leaking.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use keel_api::admin::AdminToken;
use keel_api::{ApiKey, Rate, Role};
use keel_core::{TenantId, WorkerId};
use keel_resilience::ChaosSettings;
use keel_runtime::{HostRateLimit, QueueConfig, SigningSecret};
use keel_store::{DatabaseUrl, Pooler};
use serde::{Serialize, Serializer};

use super::LogFormat;
use super::parse::PostgresUrl;

/// How a setting's value is shown.
pub(crate) trait Show {
    /// Serializes the value as `/debug/config` shows it.
    fn show<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error>;
}

/// How a secret setting's value is shown: whether it is set, and what is not secret
/// about it (a URL's user and host, an API key's tenant).
pub(crate) trait Redact {
    /// Serializes the value with its secret parts replaced by `***`.
    fn redact<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error>;
}

/// A value serialized through [`Show`].
pub(crate) struct Shown<'a, T>(pub(crate) &'a T);

impl<T: Show> Serialize for Shown<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.show(s)
    }
}

/// A value serialized through [`Redact`].
pub(crate) struct Redacted<'a, T>(pub(crate) &'a T);

impl<T: Redact> Serialize for Redacted<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.redact(s)
    }
}

/// Types shown as their own `Serialize` says.
macro_rules! show_as_serialized {
    ($($ty:ty),* $(,)?) => {
        $(
            impl Show for $ty {
                fn show<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    self.serialize(s)
                }
            }
        )*
    };
}

show_as_serialized!(
    SocketAddr,
    Option<SocketAddr>,
    usize,
    Option<usize>,
    u32,
    u64,
    bool,
    String,
    LogFormat,
    WorkerId,
    Option<NonZeroU32>,
    Option<PathBuf>,
    ChaosSettings,
);

/// Whole milliseconds with a unit, e.g. `2000ms`.
impl Show for Duration {
    fn show<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", self.as_millis()))
    }
}

/// `NAME:N,…`, as `KEEL_QUEUES` is written.
impl Show for Vec<QueueConfig> {
    fn show<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text: Vec<String> = self
            .iter()
            .map(|q| format!("{}:{}", q.name, q.concurrency))
            .collect();
        s.serialize_str(&text.join(","))
    }
}

/// `N/UNIT:BURST`, or `off`.
impl Show for Option<Rate> {
    fn show<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Some(r) => s.serialize_str(&r.to_string()),
            None => s.serialize_str("off"),
        }
    }
}

/// `{tenant: "N/UNIT:BURST"}`.
impl Show for BTreeMap<TenantId, Rate> {
    fn show<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text: BTreeMap<&str, String> = self
            .iter()
            .map(|(t, r)| (t.as_str(), r.to_string()))
            .collect();
        text.serialize(s)
    }
}

/// `N/s:BURST`, or `off`.
impl Show for Option<HostRateLimit> {
    fn show<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Some(r) => s.serialize_str(&format!("{}/s:{}", r.per_second, r.burst)),
            None => s.serialize_str("off"),
        }
    }
}

/// `***` when set.
impl Redact for Option<AdminToken> {
    fn redact<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        redact_if_set(self.is_some(), s)
    }
}

/// `***` when set.
impl Redact for Option<SigningSecret> {
    fn redact<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        redact_if_set(self.is_some(), s)
    }
}

fn redact_if_set<S: Serializer>(set: bool, s: S) -> Result<S::Ok, S::Error> {
    if set {
        s.serialize_str("***")
    } else {
        s.serialize_none()
    }
}

/// The URL with its password, if any, replaced.
impl Redact for Option<PostgresUrl> {
    fn redact<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Some(PostgresUrl(u)) => s.serialize_str(&redact_password(u)),
            None => s.serialize_none(),
        }
    }
}

/// `none` or `transaction`, as `KEEL_DATABASE_POOLER` is written.
impl Show for Pooler {
    fn show<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Pooler::None => "none",
            Pooler::Transaction => "transaction",
        })
    }
}

/// The URL with its password, if any, replaced.
impl Redact for DatabaseUrl {
    fn redact<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DatabaseUrl::Sqlite(p) => s.serialize_str(&format!("sqlite://{}", p.display())),
            DatabaseUrl::Postgres(u) => s.serialize_str(&redact_password(u)),
        }
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Each key's tenant and role, its digest replaced: `["acme=***", "ops=***:operator"]`.
impl Redact for Vec<ApiKey> {
    fn redact<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let tenants: Vec<String> = self
            .iter()
            .map(|k| match k.role {
                Role::Tenant => format!("{}=***", k.tenant),
                role => format!("{}=***:{}", k.tenant, role.as_str()),
            })
            .collect();
        tenants.serialize(s)
    }
}
