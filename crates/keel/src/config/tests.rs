//! The configuration's tests: parsing, the checks across settings, redaction, the file,
//! and the README's table of settings.

use std::time::Duration;

use keel_resilience::{AdaptiveLimitConfig, ChaosSettings, StoreGuardConfig};
use keel_store::DatabaseUrl;

use super::*;

#[test]
fn durations_need_a_unit() {
    assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
    assert!(parse_duration("2").unwrap_err().contains("no unit"));
    assert!(parse_duration("fast").is_err());
    assert!(parse_duration("2w").unwrap_err().contains("unknown unit"));
    assert!(
        parse_duration("99999999999s")
            .unwrap_err()
            .contains("too large")
    );
}

#[test]
fn defaults_are_valid_and_safe() {
    let c = Config::resolve(&ServeArgs::default()).unwrap();
    assert!(c.addr.ip().is_loopback());
    assert!(c.admin_addr.is_some_and(|a| a.ip().is_loopback()));
    assert_eq!(c.database_url, DatabaseUrl::Sqlite("keel.db".into()));
    assert_eq!(c.request_timeout, Duration::from_secs(2));
    assert_eq!(c.queues[0].name.as_str(), "default");
}

#[test]
fn every_bad_field_is_reported_at_once() {
    let args = ServeArgs {
        addr: Some("nope".into()),
        request_timeout: Some("fast".into()),
        queues: Some("default:0".into()),
        log_format: Some("xml".into()),
        database_url: Some("mysql://x".into()),
        ..Default::default()
    };
    let err = Config::resolve(&args).unwrap_err();
    let fields: Vec<&str> = err.0.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "addr",
            "database_url",
            "request_timeout",
            "log_format",
            "queues"
        ]
    );
    let text = err.to_string();
    assert!(text.contains("5 problems"), "{text}");
}

#[test]
fn public_bind_needs_keys_or_explicit_insecurity() {
    let public = ServeArgs {
        addr: Some("0.0.0.0:8080".into()),
        ..Default::default()
    };
    let err = Config::resolve(&public).unwrap_err();
    assert!(err.to_string().contains("without API keys"), "{err}");
    let insecure = ServeArgs {
        insecure_no_auth: Some("true".into()),
        ..public.clone()
    };
    assert!(Config::resolve(&insecure).is_ok());
    let keyed = ServeArgs {
        api_keys: Some(format!("acme={}", "ab".repeat(32))),
        ..public
    };
    assert_eq!(Config::resolve(&keyed).unwrap().api_keys.len(), 1);
}

/// The gRPC listener follows the API's rule (G8): loopback by default, `off` for none, and
/// a non-loopback address only with API keys or `--insecure-no-auth`.
#[test]
fn a_public_grpc_listener_needs_api_keys() {
    let c = Config::resolve(&ServeArgs::default()).unwrap();
    assert!(
        c.grpc_addr
            .is_some_and(|a| a.ip().is_loopback() && a.port() == 50051)
    );
    let off = Config::resolve(&ServeArgs {
        grpc_addr: Some("off".into()),
        ..ServeArgs::default()
    })
    .unwrap();
    assert_eq!(off.grpc_addr, None);
    let public = ServeArgs {
        grpc_addr: Some("0.0.0.0:50051".into()),
        ..ServeArgs::default()
    };
    let err = Config::resolve(&public).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(err.0[0].0, "grpc_addr", "{err}");
    assert!(err.0[0].1.contains("without API keys"), "{err}");
    let keyed = ServeArgs {
        api_keys: Some(format!("acme={}", "ab".repeat(32))),
        ..public.clone()
    };
    assert!(Config::resolve(&keyed).is_ok());
    let accepted = ServeArgs {
        insecure_no_auth: Some("true".into()),
        ..public
    };
    assert!(Config::resolve(&accepted).is_ok());
}

#[test]
fn admin_listener_can_be_switched_off() {
    let c = Config::resolve(&ServeArgs {
        admin_addr: Some("off".into()),
        ..ServeArgs::default()
    })
    .unwrap();
    assert_eq!(c.admin_addr, None);
    assert_eq!(
        serde_json::to_value(&c).unwrap()["admin_addr"],
        serde_json::Value::Null
    );
    let err = Config::resolve(&ServeArgs {
        admin_addr: Some("of".into()),
        ..ServeArgs::default()
    })
    .unwrap_err();
    assert_eq!(err.0[0].0, "admin_addr", "{err}");
}

#[test]
fn admin_listener_stays_on_loopback() {
    let args = ServeArgs {
        admin_addr: Some("0.0.0.0:9000".into()),
        ..Default::default()
    };
    let err = Config::resolve(&args).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(err.0[0].0, "admin_addr", "{err}");
    assert!(err.0[0].1.contains("KEEL_ADMIN_TOKEN"), "{err}");
}

#[test]
fn a_public_admin_listener_needs_a_token_and_hides_it() {
    let token = "an-admin-token-of-some-length";
    let args = ServeArgs {
        admin_addr: Some("0.0.0.0:9000".into()),
        admin_token: Some(token.into()),
        ..Default::default()
    };
    let c = Config::resolve(&args).unwrap();
    assert!(c.admin_token.is_some());
    let shown = serde_json::to_value(&c).unwrap();
    assert_eq!(shown["admin_token"], "***");
    assert!(!format!("{c:?}").contains(token));
    // A bad token is reported as such, once, even on a public address.
    let weak = ServeArgs {
        admin_token: Some("short".into()),
        ..args
    };
    let err = Config::resolve(&weak).unwrap_err();
    let fields: Vec<&str> = err.0.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(fields, ["admin_token"], "{err}");
    // On loopback, no token is needed and none is shown.
    let c = Config::resolve(&ServeArgs::default()).unwrap();
    assert_eq!(
        serde_json::to_value(&c).unwrap()["admin_token"],
        serde_json::Value::Null
    );
}

#[test]
fn secrets_are_redacted() {
    let args = ServeArgs {
        database_url: Some("postgres://keel:hunter2@db:5432/keel".into()),
        api_keys: Some(format!("acme={}", "cd".repeat(32))),
        ..Default::default()
    };
    let c = Config::resolve(&args).unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains(&"cd".repeat(32)), "{shown}");
    assert!(shown.contains("keel:***@db"), "{shown}");
}

#[test]
fn file_values_sit_under_flags_and_typos_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.toml");
    std::fs::write(
        &path,
        "request_timeout = \"5s\"\nqueues = [\"a:2\", \"b:3\"]\nretention = \"1d\"\n",
    )
    .unwrap();
    let args = ServeArgs {
        config: Some(path.clone()),
        retention: Some("2d".into()),
        ..Default::default()
    };
    let c = Config::resolve(&args).unwrap();
    assert_eq!(c.request_timeout, Duration::from_secs(5));
    assert_eq!(
        c.retention,
        Duration::from_secs(2 * 86_400),
        "the flag wins"
    );
    assert_eq!(c.queues.len(), 2);
    std::fs::write(&path, "request_timeot = \"5s\"\n").unwrap();
    let err = Config::resolve(&args).unwrap_err();
    assert!(err.to_string().contains("request_timeot"), "{err}");
}

#[test]
fn protection_defaults_limit_nothing_but_concurrency() {
    let c = Config::resolve(&ServeArgs::default()).unwrap();
    assert_eq!(c.admission_limit(), AdaptiveLimitConfig::default());
    assert_eq!(c.max_queue_backlog, 0);
    assert_eq!(c.queue_depth_interval, Duration::from_secs(5));
    assert_eq!(c.rate_limit, None);
    assert!(c.tenant_rate_limits.is_empty());
    assert_eq!(c.api_key_rate_limit, None);
    assert_eq!(
        c.store_max_in_flight,
        StoreGuardConfig::default().max_in_flight
    );
    assert!(!c.chaos_settings().is_active());
    let shown = serde_json::to_value(&c).unwrap();
    assert_eq!(shown["rate_limit"], "off");
    assert_eq!(shown["admission_limit_max"], 2048);
    assert_eq!(shown["chaos"]["auth"]["latency_ms"], 0);
}

#[test]
fn every_bad_protection_setting_is_reported_at_once() {
    let args = ServeArgs {
        admission_limit_initial: Some("0".into()),
        admission_limit_min: Some("many".into()),
        max_queue_backlog: Some("-1".into()),
        queue_depth_interval: Some("0s".into()),
        rate_limit: Some("fast".into()),
        rate_limit_burst: Some("0".into()),
        tenant_rate_limits: Some("acme=1/d".into()),
        api_key_rate_limit: Some("5".into()),
        store_max_in_flight: Some("0".into()),
        chaos: Some("db.latency_ms=1".into()),
        slow_auth: Some("maybe".into()),
        db_failure: Some("sure".into()),
        ..Default::default()
    };
    let err = Config::resolve(&args).unwrap_err();
    let fields: Vec<&str> = err.0.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "admission_limit_initial",
            "admission_limit_min",
            "max_queue_backlog",
            "queue_depth_interval",
            "rate_limit",
            "rate_limit_burst",
            "tenant_rate_limits",
            "api_key_rate_limit",
            "store_max_in_flight",
            "chaos",
            "slow_auth",
            "db_failure",
        ],
        "{err}"
    );
}

#[test]
fn admission_bounds_follow_the_ones_given_and_must_be_ordered() {
    let only_max = ServeArgs {
        admission_limit_max: Some("100".into()),
        ..Default::default()
    };
    let l = Config::resolve(&only_max).unwrap().admission_limit();
    assert_eq!((l.initial, l.min, l.max), (100, 32, 100));
    assert!(l.validate().is_ok());
    let tiny = ServeArgs {
        admission_limit_max: Some("1".into()),
        ..Default::default()
    };
    let l = Config::resolve(&tiny).unwrap().admission_limit();
    assert_eq!((l.initial, l.min, l.max), (1, 1, 1));

    let crossed = ServeArgs {
        admission_limit_min: Some("50".into()),
        admission_limit_max: Some("10".into()),
        ..Default::default()
    };
    let err = Config::resolve(&crossed).unwrap_err();
    assert_eq!(err.0[0].0, "admission_limit_min", "{err}");
    let outside = ServeArgs {
        admission_limit_initial: Some("5".into()),
        admission_limit_min: Some("10".into()),
        ..Default::default()
    };
    let err = Config::resolve(&outside).unwrap_err();
    assert_eq!(err.0[0].0, "admission_limit_initial", "{err}");
}

/// A bound counts as given wherever it comes from (the file here); one given as empty text
/// is refused like any other number, not taken for unset.
#[test]
fn admission_bounds_given_in_the_file_are_followed_and_empty_is_refused() {
    let l = Config::from_toml("admission_limit_max = 100\n")
        .unwrap()
        .admission_limit();
    assert_eq!((l.initial, l.min, l.max), (100, 32, 100));
    let err = Config::from_toml("admission_limit_max = \"\"\n").unwrap_err();
    let fields: Vec<&str> = err.0.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(fields, ["admission_limit_max"], "{err}");
}

/// /debug/config shows every declared setting, no more and no fewer.
#[test]
fn the_shown_config_has_every_setting() {
    let shown = serde_json::to_value(Config::resolve(&ServeArgs::default()).unwrap()).unwrap();
    let mut keys: Vec<&str> = shown
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
    keys.sort_unstable();
    names.sort_unstable();
    assert_eq!(keys, names);
}

#[test]
fn rate_limits_take_a_burst_in_one_place() {
    let args = ServeArgs {
        rate_limit: Some("200/s".into()),
        rate_limit_burst: Some("400".into()),
        tenant_rate_limits: Some("acme=50/s:100,other=10/s:20".into()),
        api_key_rate_limit: Some("off".into()),
        ..Default::default()
    };
    let c = Config::resolve(&args).unwrap();
    assert_eq!(c.rate_limit.unwrap().to_string(), "200/s:400");
    assert_eq!(c.tenant_rate_limits.len(), 2);
    let shown = serde_json::to_value(&c).unwrap();
    assert_eq!(shown["tenant_rate_limits"]["acme"], "50/s:100");

    let twice = ServeArgs {
        rate_limit: Some("200/s:300".into()),
        ..args.clone()
    };
    let err = Config::resolve(&twice).unwrap_err();
    assert_eq!(err.0[0].0, "rate_limit_burst", "{err}");
    let orphan = ServeArgs {
        rate_limit: None,
        ..args
    };
    let err = Config::resolve(&orphan).unwrap_err();
    assert!(err.to_string().contains("needs rate_limit"), "{err}");
}

#[test]
fn the_seed_switches_add_to_keel_chaos() {
    let args = ServeArgs {
        chaos: Some("webhook.error_rate=0.5".into()),
        slow_auth: Some("true".into()),
        db_failure: Some("1".into()),
        ..Default::default()
    };
    let c = Config::resolve(&args).unwrap();
    let chaos = c.chaos_settings();
    assert_eq!(chaos.auth.latency_ms, ChaosSettings::SLOW_AUTH_MS);
    assert_eq!(chaos.store_write.error_rate, 1.0);
    assert_eq!(chaos.webhook.error_rate, 0.5);
}

#[test]
fn heartbeat_must_be_shorter_than_the_lease() {
    let args = ServeArgs {
        heartbeat_interval: Some("30s".into()),
        lease_timeout: Some("30s".into()),
        ..Default::default()
    };
    let err = Config::resolve(&args).unwrap_err();
    assert_eq!(err.0[0].0, "heartbeat_interval");
}

/// The proptest twin of the `config` fuzz target: any file text is taken, or refused
/// with at least one reason, never a panic. Lines are built from the real setting names
/// and values near what each parser expects.
mod twin {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|i| i.to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            "[ -~]{0,24}".prop_map(|s| format!("{s:?}")),
            prop::sample::select(vec![
                "\"0s\"",
                "\"1ms\"",
                "\"30s\"",
                "\"5m\"",
                "\"off\"",
                "\"0.0.0.0:0\"",
                "\"[::1]:8080\"",
                "\"sqlite://x.db\"",
                "\"postgres://u@h/d\"",
                "\"default:4,bulk:0\"",
                "\"a=00\"",
                "\"10/s:5\"",
                "\"json\"",
                "[\"a\", 1]",
                "{ a = 1 }",
                "1.5",
                "1979-05-27T07:32:00Z",
            ])
            .prop_map(str::to_owned),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_config_file_is_taken_or_refused_with_reasons(
            lines in prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(SETTINGS.iter().map(|s| s.name).collect::<Vec<_>>()).prop_map(str::to_owned),
                        "[a-z_]{1,12}",
                    ],
                    value(),
                ),
                0..8,
            ),
            junk in "[ -~\n]{0,40}",
        ) {
            let text: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
            for text in [text.as_str(), junk.as_str()] {
                if let Err(e) = Config::from_toml(text) {
                    prop_assert!(!e.0.is_empty(), "refused without a reason: {text:?}");
                }
            }
        }
    }
}
