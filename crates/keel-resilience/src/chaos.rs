//! Fault injection: added latency and an error rate per dependency, to see with one's own
//! eyes what the deadlines, the breaker and the shedding do (the seed's chaos experiments).
//!
//! Off by default, and free when off: [`Chaos::inject`] checks one atomic flag. It is turned
//! on by the seed's switches (`SLOW_AUTH=true`: authentication takes 3 s; `DB_FAILURE=true`:
//! every store call fails with "connection refused"), by `KEEL_CHAOS`
//! (`auth.latency_ms=3000,store_write.error_rate=0.5`, parsed by [`ChaosSettings::parse`]),
//! or at runtime through the admin listener's `/debug/chaos`. Whoever turns it on logs it
//! loudly; injected errors say they were injected.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The dependencies faults can be injected into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// API-key authentication.
    Auth,
    /// Store calls that only read.
    StoreRead,
    /// Store calls that write.
    StoreWrite,
    /// Requests of the webhook executor.
    Webhook,
}

impl Dependency {
    /// Every dependency, in the order of [`ChaosSettings`]'s fields.
    pub const ALL: [Dependency; 4] = [
        Dependency::Auth,
        Dependency::StoreRead,
        Dependency::StoreWrite,
        Dependency::Webhook,
    ];

    /// The name used in `KEEL_CHAOS` and `/debug/chaos`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dependency::Auth => "auth",
            Dependency::StoreRead => "store_read",
            Dependency::StoreWrite => "store_write",
            Dependency::Webhook => "webhook",
        }
    }
}

/// The faults of one dependency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fault {
    /// Added before every call, in milliseconds (at most a minute).
    pub latency_ms: u64,
    /// Share of calls that fail (0.0 to 1.0).
    pub error_rate: f64,
}

impl Fault {
    /// The longest latency that may be injected: enough to outlast any deadline, short
    /// enough that a typo cannot park a task for hours.
    pub const MAX_LATENCY_MS: u64 = 60_000;

    fn is_active(&self) -> bool {
        self.latency_ms > 0 || self.error_rate > 0.0
    }

    fn validate(&self, dep: &str, errors: &mut Vec<String>) {
        if self.latency_ms > Self::MAX_LATENCY_MS {
            errors.push(format!(
                "{dep}.latency_ms must be at most {} (got {})",
                Self::MAX_LATENCY_MS,
                self.latency_ms
            ));
        }
        if !(0.0..=1.0).contains(&self.error_rate) {
            errors.push(format!(
                "{dep}.error_rate must be between 0.0 and 1.0 (got {})",
                self.error_rate
            ));
        }
    }
}

/// Faults for every dependency; the body of `/debug/chaos`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosSettings {
    /// Authentication.
    pub auth: Fault,
    /// Store reads.
    pub store_read: Fault,
    /// Store writes.
    pub store_write: Fault,
    /// Webhook requests.
    pub webhook: Fault,
}

impl ChaosSettings {
    /// The seed's `SLOW_AUTH=true`: authentication takes 3 s, past the default 2 s deadline.
    pub const SLOW_AUTH_MS: u64 = 3000;

    /// The faults of `dep`.
    pub fn fault(&self, dep: Dependency) -> Fault {
        match dep {
            Dependency::Auth => self.auth,
            Dependency::StoreRead => self.store_read,
            Dependency::StoreWrite => self.store_write,
            Dependency::Webhook => self.webhook,
        }
    }

    fn fault_mut(&mut self, dep: Dependency) -> &mut Fault {
        match dep {
            Dependency::Auth => &mut self.auth,
            Dependency::StoreRead => &mut self.store_read,
            Dependency::StoreWrite => &mut self.store_write,
            Dependency::Webhook => &mut self.webhook,
        }
    }

    /// Whether any fault is set.
    pub fn is_active(&self) -> bool {
        Dependency::ALL.iter().any(|d| self.fault(*d).is_active())
    }

    /// Applies the seed's switches on top of these settings.
    pub fn with_seed_switches(mut self, slow_auth: bool, db_failure: bool) -> Self {
        if slow_auth {
            self.auth.latency_ms = Self::SLOW_AUTH_MS;
        }
        if db_failure {
            self.store_read.error_rate = 1.0;
            self.store_write.error_rate = 1.0;
        }
        self
    }

    /// Parses `KEEL_CHAOS`: comma-separated `<dependency>.<latency_ms|error_rate>=<value>`,
    /// e.g. `auth.latency_ms=3000,store_write.error_rate=0.25`. Every mistake is listed.
    pub fn parse(spec: &str) -> Result<Self, Vec<String>> {
        let mut settings = Self::default();
        let mut errors = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((key, value)) = item.split_once('=') else {
                errors.push(format!("{item:?} is not <dependency>.<setting>=<value>"));
                continue;
            };
            let Some((dep, setting)) = key.trim().split_once('.') else {
                errors.push(format!("{key:?} is not <dependency>.<setting>"));
                continue;
            };
            let Some(dep) = Dependency::ALL.into_iter().find(|d| d.as_str() == dep) else {
                errors.push(format!(
                    "unknown dependency {dep:?} (expected auth, store_read, store_write or webhook)"
                ));
                continue;
            };
            let value = value.trim();
            let fault = settings.fault_mut(dep);
            match setting {
                "latency_ms" => match value.parse() {
                    Ok(v) => fault.latency_ms = v,
                    Err(_) => errors.push(format!(
                        "{key}: {value:?} is not a whole number of milliseconds"
                    )),
                },
                "error_rate" => match value.parse::<f64>() {
                    Ok(v) if v.is_finite() => fault.error_rate = v,
                    _ => errors.push(format!("{key}: {value:?} is not a number")),
                },
                other => errors.push(format!(
                    "unknown setting {other:?} (expected latency_ms or error_rate)"
                )),
            }
        }
        if let Err(mut more) = settings.validate() {
            errors.append(&mut more);
        }
        if errors.is_empty() {
            Ok(settings)
        } else {
            Err(errors)
        }
    }

    /// Checks every bound; lists every violation.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        for dep in Dependency::ALL {
            self.fault(dep).validate(dep.as_str(), &mut errors);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// An error that chaos injected; its message says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedFault {
    /// Where it was injected.
    pub dependency: Dependency,
}

impl fmt::Display for InjectedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dependency {
            Dependency::StoreRead | Dependency::StoreWrite => write!(
                f,
                "database connection refused (injected by chaos: {})",
                self.dependency.as_str()
            ),
            dep => write!(f, "failure injected by chaos: {}", dep.as_str()),
        }
    }
}

impl std::error::Error for InjectedFault {}

#[derive(Debug, Default)]
struct Shared {
    active: AtomicBool,
    settings: RwLock<ChaosSettings>,
    /// Fires at every change of the settings, ending injected latencies in progress.
    changed: tokio::sync::Notify,
}

/// The process's fault injection switchboard; clones share it.
#[derive(Debug, Clone, Default)]
pub struct Chaos {
    shared: Arc<Shared>,
}

impl Chaos {
    /// Chaos with these settings (validated by the caller).
    pub fn new(settings: ChaosSettings) -> Self {
        let chaos = Self::default();
        chaos.set(settings);
        chaos
    }

    /// The current settings.
    pub fn settings(&self) -> ChaosSettings {
        *self
            .shared
            .settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replaces the settings. Calls that start afterwards get the new faults; a latency
    /// being injected right now ends at once, so clearing chaos restores service without
    /// waiting out delays injected before (up to a minute each).
    pub fn set(&self, settings: ChaosSettings) {
        *self
            .shared
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = settings;
        self.shared
            .active
            .store(settings.is_active(), Ordering::Release);
        metrics::gauge!("keel_chaos_active").set(if settings.is_active() { 1.0 } else { 0.0 });
        self.shared.changed.notify_waiters();
    }

    /// Whether any fault is set.
    pub fn is_active(&self) -> bool {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Applies `dep`'s faults to one call: sleeps the added latency (cut short if the
    /// settings change meanwhile), then fails at the configured rate. Returns at once when
    /// chaos is off.
    pub async fn inject(&self, dep: Dependency) -> Result<(), InjectedFault> {
        if !self.is_active() {
            return Ok(());
        }
        // Registered before the settings are read, so a change right after is not missed.
        let changed = self.shared.changed.notified();
        let mut fault = self.settings().fault(dep);
        if fault.latency_ms > 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(fault.latency_ms)) => {}
                () = changed => fault = self.settings().fault(dep),
            }
        }
        if fault.error_rate > 0.0 && rand::random::<f64>() < fault.error_rate {
            metrics::counter!("keel_chaos_faults_total", "dependency" => dep.as_str()).increment(1);
            return Err(InjectedFault { dependency: dep });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the paused clock: without the cut, the injected minute would pass in virtual
    /// time before the call returned.
    #[tokio::test(start_paused = true)]
    async fn clearing_chaos_ends_a_latency_in_progress() {
        let chaos = Chaos::new(ChaosSettings::parse("store_write.latency_ms=60000").unwrap());
        let started = tokio::time::Instant::now();
        let call = tokio::spawn({
            let chaos = chaos.clone();
            async move { chaos.inject(Dependency::StoreWrite).await }
        });
        // Let the call start its injected sleep.
        tokio::task::yield_now().await;
        chaos.set(ChaosSettings::default());
        assert_eq!(call.await.unwrap(), Ok(()));
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "the call waited out its injected latency"
        );
    }

    #[test]
    fn parses_the_spec_and_lists_every_mistake() {
        let s = ChaosSettings::parse("auth.latency_ms=3000, store_write.error_rate=0.25").unwrap();
        assert_eq!(s.auth.latency_ms, 3000);
        assert!((s.store_write.error_rate - 0.25).abs() < f64::EPSILON);
        assert!(s.is_active());

        let errors = ChaosSettings::parse(
            "db.latency_ms=1,auth.speed=2,auth.error_rate=2,webhook=1,auth.latency_ms=x",
        )
        .unwrap_err();
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("unknown dependency \"db\""))
        );
        assert!(errors.iter().any(|e| e.contains("between 0.0 and 1.0")));
        assert_eq!(ChaosSettings::parse("").unwrap(), ChaosSettings::default());
    }

    #[test]
    fn the_seed_switches_mean_what_the_seed_says() {
        let s = ChaosSettings::default().with_seed_switches(true, true);
        assert_eq!(s.auth.latency_ms, 3000);
        assert!((s.store_read.error_rate - 1.0).abs() < f64::EPSILON);
        assert!((s.store_write.error_rate - 1.0).abs() < f64::EPSILON);
        assert_eq!(s.webhook, Fault::default());
    }

    #[test]
    fn settings_round_trip_through_json_and_reject_unknown_fields() {
        let s = ChaosSettings::default().with_seed_switches(false, true);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ChaosSettings>(&json).unwrap(), s);
        assert!(serde_json::from_str::<ChaosSettings>(r#"{"disk":{}}"#).is_err());
        let partial: ChaosSettings = serde_json::from_str(r#"{"auth":{"latency_ms":5}}"#).unwrap();
        assert_eq!(partial.auth.latency_ms, 5);
        assert_eq!(partial.auth.error_rate, 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn injects_latency_and_errors_only_while_on() {
        let chaos = Chaos::default();
        assert!(chaos.inject(Dependency::StoreWrite).await.is_ok());
        chaos.set(ChaosSettings::default().with_seed_switches(true, true));
        let started = tokio::time::Instant::now();
        assert!(chaos.inject(Dependency::Auth).await.is_ok());
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        let err = chaos.inject(Dependency::StoreRead).await.unwrap_err();
        assert!(err.to_string().contains("connection refused"), "{err}");
        chaos.set(ChaosSettings::default());
        assert!(!chaos.is_active());
        assert!(chaos.inject(Dependency::StoreRead).await.is_ok());
    }
}
