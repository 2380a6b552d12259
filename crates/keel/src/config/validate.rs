//! Checks across settings, grouped by concern. Each reads the settings it relates only
//! when all of them parsed (a setting that failed to parse has been reported already; a
//! second complaint about it would be noise) and records its problem under the setting an
//! operator should change. Two of them also settle values that depend on other settings:
//! the admission bounds left unset, and the default rate's burst.

use keel_api::Rate;
use keel_api::tls::{Tls, TlsFiles};
use keel_store::{DatabaseUrl, Pooler};

use super::settings::Parsed;
use super::sources::{Problems, Texts};

/// Runs every check, in the order their problems are reported.
pub(super) fn check(p: &mut Parsed, texts: &Texts, problems: &mut Problems) {
    nested_limits(p, problems);
    api_exposure(p, problems);
    admin_exposure(p, problems);
    tls_identity(p, problems);
    pooler_needs_postgres(p, problems);
    admission_bounds(p, texts, problems);
    default_rate_burst(p, texts, problems);
}

fn problem(problems: &mut Problems, field: &str, message: String) {
    problems.push((field.to_owned(), message));
}

/// Settings that must fit inside another: the shutdown delay inside the grace period (it
/// is spent there), the heartbeat inside the lease (or leases lapse between heartbeats and
/// running jobs are rescued from under their workers), idle pool connections inside the
/// pool, and job args inside the request body that carries them.
fn nested_limits(p: &Parsed, problems: &mut Problems) {
    // (setting, whether it fits and what to say if not), when both sides parsed.
    let rules = [
        (
            "shutdown_delay",
            p.shutdown_delay.zip(p.shutdown_grace).map(|(delay, grace)| {
                (
                    delay.is_zero() || delay < grace,
                    format!(
                        "must be shorter than shutdown_grace ({grace:?}): the delay is spent inside the grace period"
                    ),
                )
            }),
        ),
        (
            "heartbeat_interval",
            p.heartbeat_interval.zip(p.lease_timeout).map(|(heartbeat, lease)| {
                (
                    heartbeat < lease,
                    format!(
                        "must be shorter than lease_timeout ({lease:?}), or leases lapse between heartbeats"
                    ),
                )
            }),
        ),
        (
            "db_pool_min_idle",
            p.db_pool_min_idle.zip(p.db_pool_max).map(|(min, max)| {
                (min <= max, format!("must not exceed db_pool_max ({max})"))
            }),
        ),
        (
            "max_args_bytes",
            p.max_args_bytes.zip(p.max_body_bytes).map(|(args, body)| {
                (args <= body, format!("must not exceed max_body_bytes ({body})"))
            }),
        ),
    ];
    for (field, rule) in rules {
        if let Some((false, why)) = rule {
            problem(problems, field, why);
        }
    }
}

/// The API, over HTTP or gRPC, on a non-loopback address needs API keys, unless the risk
/// is accepted by name.
fn api_exposure(p: &Parsed, problems: &mut Problems) {
    let (Some(keys), Some(insecure)) = (&p.api_keys, p.insecure_no_auth) else {
        return;
    };
    if !keys.is_empty() || insecure {
        return;
    }
    for (field, addr) in [("addr", p.addr), ("grpc_addr", p.grpc_addr.flatten())] {
        if let Some(addr) = addr
            && !addr.ip().is_loopback()
        {
            problem(
                problems,
                field,
                format!(
                    "refusing to listen on non-loopback {addr} without API keys: set KEEL_API_KEYS, or pass --insecure-no-auth to accept the risk"
                ),
            );
        }
    }
}

/// The admin listener on a non-loopback address needs a token. A token that failed to
/// parse is reported under admin_token, not here too.
fn admin_exposure(p: &Parsed, problems: &mut Problems) {
    if let (Some(Some(admin)), Some(None)) = (p.admin_addr, &p.admin_token)
        && !admin.ip().is_loopback()
    {
        problem(
            problems,
            "admin_addr",
            format!(
                "refusing to put the admin listener on non-loopback {admin} without a token: it serves profiles, task dumps, configuration and the chaos switches; set KEEL_ADMIN_TOKEN (every admin request must then send Authorization: Bearer <token>), or keep it on 127.0.0.1 or ::1"
            ),
        );
    }
}

/// The pooler settings are about Postgres: on SQLite they would be silently meaningless.
fn pooler_needs_postgres(p: &Parsed, problems: &mut Problems) {
    let Some(DatabaseUrl::Sqlite(_)) = &p.database_url else {
        return;
    };
    if p.database_pooler.is_some_and(|m| m != Pooler::None) {
        problem(
            problems,
            "database_pooler",
            "applies to a postgres:// database_url only".to_owned(),
        );
    }
    if matches!(p.database_listen_url, Some(Some(_))) {
        problem(
            problems,
            "database_listen_url",
            "applies to a postgres:// database_url only".to_owned(),
        );
    }
}

/// The TLS certificate and key come as a pair, and the pair must be servable: both files
/// readable PEM, the key one rustls signs with and belonging to the first certificate.
/// Checked here so a bad pair fails `keel serve` at once, named under the setting to fix.
fn tls_identity(p: &Parsed, problems: &mut Problems) {
    let (Some(cert), Some(key)) = (&p.tls_cert, &p.tls_key) else {
        return;
    };
    match (cert, key) {
        (None, None) => {}
        (Some(_), None) => problem(
            problems,
            "tls_key",
            "is required with tls_cert: set KEEL_TLS_KEY to the certificate's private key"
                .to_owned(),
        ),
        (None, Some(_)) => problem(
            problems,
            "tls_cert",
            "is required with tls_key: set KEEL_TLS_CERT to the certificate chain".to_owned(),
        ),
        (Some(cert), Some(key)) => {
            let files = TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            };
            if let Err(e) = Tls::load(files) {
                let field = if e.path() == key.as_path() {
                    "tls_key"
                } else {
                    "tls_cert"
                };
                problem(problems, field, e.to_string());
            }
        }
    }
}

/// The admission bounds: the defaults of those not given follow the ones that are, so
/// setting only the max (say 100) does not leave the default initial limit (256) above
/// it; the result must be ordered min ≤ initial ≤ max.
fn admission_bounds(p: &mut Parsed, texts: &Texts, problems: &mut Problems) {
    let (Some(initial), Some(min), Some(max)) = (
        p.admission_limit_initial,
        p.admission_limit_min,
        p.admission_limit_max,
    ) else {
        return;
    };
    // Each parsed value is the declared default when it was not given.
    let given = |name: &str, v: u32| texts.given(name).then_some(v);
    let initial_given = given("admission_limit_initial", initial);
    let min_given = given("admission_limit_min", min);
    let max_given = given("admission_limit_max", max);
    let max = max_given.unwrap_or(max.max(min_given.unwrap_or(0)));
    let min = min_given.unwrap_or(min.min(max));
    let initial = initial_given.unwrap_or(initial.clamp(min.min(max), max));
    if min > max {
        problem(
            problems,
            "admission_limit_min",
            format!("must not exceed admission_limit_max ({max})"),
        );
    } else if !(min..=max).contains(&initial) {
        problem(
            problems,
            "admission_limit_initial",
            format!("must lie between admission_limit_min ({min}) and admission_limit_max ({max})"),
        );
    } else {
        p.admission_limit_initial = Some(initial);
        p.admission_limit_min = Some(min);
        p.admission_limit_max = Some(max);
    }
}

/// `rate_limit_burst` sets the burst of `rate_limit`, which must exist and must not name
/// a burst of its own (`RATE:BURST`): a burst is given in one place. The burst is folded
/// into `rate_limit`, which is what the rate limiter reads.
fn default_rate_burst(p: &mut Parsed, texts: &Texts, problems: &mut Problems) {
    let (Some(rate), Some(Some(burst))) = (p.rate_limit, p.rate_limit_burst) else {
        return;
    };
    match rate {
        None => problem(
            problems,
            "rate_limit_burst",
            "needs rate_limit (a burst of what?)".to_owned(),
        ),
        // The rate parsed, so its text is a rate, whose only `:` is before a burst.
        Some(_) if texts.text("rate_limit").contains(':') => problem(
            problems,
            "rate_limit_burst",
            "rate_limit already names a burst (RATE:BURST); give it in one place".to_owned(),
        ),
        Some(r) => p.rate_limit = Some(Some(Rate { burst, ..r })),
    }
}
