//! What each part of Keel takes from the configuration: the settings cut into the config
//! types of the store pool, the store guard, the API listener, the API and the runtime, so
//! `App` wiring reads as a list of parts and a new setting is used in one place.

use std::time::Duration;

use keel_api::tls::TlsFiles;
use keel_api::{ApiConfig, ConnectionLimits, JobCacheConfig, RateLimitConfig};
use keel_resilience::{AdaptiveLimitConfig, Chaos, ChaosSettings, StoreGuardConfig};
use keel_runtime::{MaintenanceConfig, RuntimeConfig, WebhookConfig};
use keel_store::{DatabaseUrl, PgOptions};

use super::Config;

/// How much longer than the request timeout a Postgres statement may run. A statement
/// outliving its request (which gave up at the deadline and dropped its future) is cut by
/// the server this long after; a live request never waits on a statement that long, so it
/// is never cut first.
const STATEMENT_TIMEOUT_MARGIN: Duration = Duration::from_secs(1);

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

    /// The TLS certificate and key every listener serves, when both are set (validation
    /// refuses one without the other).
    pub fn tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }

    /// `sqlite` or `postgres`, for logs.
    pub fn database_url_kind(&self) -> &'static str {
        match self.database_url {
            DatabaseUrl::Sqlite(_) => "sqlite",
            DatabaseUrl::Postgres(_) => "postgres",
        }
    }

    /// The Postgres pool: its size and timeouts, and a statement timeout just past the
    /// request deadline.
    pub fn pg_options(&self) -> PgOptions {
        PgOptions {
            max_connections: self.db_pool_max,
            min_idle: self.db_pool_min_idle,
            max_lifetime: Some(self.db_pool_max_lifetime),
            acquire_timeout: self.db_acquire_timeout,
            statement_timeout: Some(self.request_timeout + STATEMENT_TIMEOUT_MARGIN),
            pooler: self.database_pooler,
            listen_url: self.database_listen_url.as_ref().map(|u| u.0.clone()),
            ..PgOptions::default()
        }
    }

    /// The store guard (the database bulkhead; the breaker keeps its defaults).
    pub fn store_guard(&self) -> StoreGuardConfig {
        StoreGuardConfig {
            max_in_flight: self.store_max_in_flight,
            ..StoreGuardConfig::default()
        }
    }

    /// The API listener's connection limits.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
            ..ConnectionLimits::default()
        }
    }

    /// The API: deadlines, body limits, keys, admission, rate limits and the read cache.
    pub fn api_config(&self) -> ApiConfig {
        ApiConfig {
            request_timeout: self.request_timeout,
            max_body_bytes: self.max_body_bytes,
            max_args_bytes: self.max_args_bytes,
            idempotency_ttl: self.idempotency_ttl,
            max_lease_wait: self.max_lease_wait,
            api_keys: self.api_keys.clone(),
            admission: self.admission_limit(),
            max_queue_backlog: self.max_queue_backlog,
            rate_limits: RateLimitConfig {
                tenant_default: self.rate_limit,
                tenants: self.tenant_rate_limits.clone(),
                per_key: self.api_key_rate_limit,
            },
            job_cache: JobCacheConfig {
                capacity: self.job_cache_capacity,
                ..JobCacheConfig::default()
            },
            process_poll: ApiConfig::DEFAULT_PROCESS_POLL,
        }
    }

    /// The webhook executor, injecting `chaos`'s webhook faults.
    pub fn webhook_config(&self, chaos: &Chaos) -> WebhookConfig {
        WebhookConfig {
            allow_private: self.webhook_allow_private,
            host_concurrency: self.webhook_host_concurrency,
            host_wait: self.webhook_host_wait,
            host_rate: self.webhook_host_rate_limit,
            signing_secret: self.webhook_signing_secret.clone(),
            chaos: chaos.clone(),
            ..WebhookConfig::default()
        }
    }

    /// The runtime: queues, leases, maintenance, leadership and the webhook executor.
    pub fn runtime_config(&self, chaos: &Chaos) -> RuntimeConfig {
        RuntimeConfig {
            worker_id: self.worker_id.clone(),
            queues: self.queues.clone(),
            prefetch: self.prefetch,
            lease_for: self.lease_timeout,
            heartbeat_every: self.heartbeat_interval,
            poll_interval: self.poll_interval,
            shutdown_grace: self.shutdown_grace,
            maintenance: MaintenanceConfig {
                interval: self.maintenance_interval,
                retention: self.retention,
                ..MaintenanceConfig::default()
            },
            leader_ttl: self.leader_ttl,
            webhook: self.webhook_config(chaos),
            ..RuntimeConfig::default()
        }
    }
}
