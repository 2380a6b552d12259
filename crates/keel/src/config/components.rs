//! What parts of Keel take from the configuration, where that is more than one setting.

use keel_resilience::{AdaptiveLimitConfig, ChaosSettings};
use keel_store::DatabaseUrl;

use super::Config;

impl Config {
    /// The faults to start with: `KEEL_CHAOS`, with the seed's `SLOW_AUTH` and `DB_FAILURE`
    /// switches applied on top.
    pub fn chaos_settings(&self) -> ChaosSettings {
        self.chaos
            .with_seed_switches(self.slow_auth, self.db_failure)
    }

    /// The adaptive limit's settings (bounds from the config, tuning from the defaults).
    pub fn admission_limit(&self) -> AdaptiveLimitConfig {
        AdaptiveLimitConfig {
            initial: self.admission_limit_initial,
            min: self.admission_limit_min,
            max: self.admission_limit_max,
            max_wait: self.admission_max_wait,
            ..AdaptiveLimitConfig::default()
        }
    }

    /// `sqlite` or `postgres`, for logs.
    pub fn database_url_kind(&self) -> &'static str {
        match self.database_url {
            DatabaseUrl::Sqlite(_) => "sqlite",
            DatabaseUrl::Postgres(_) => "postgres",
        }
    }
}
