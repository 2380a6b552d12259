//! A schedule's cron expression (first line) and time zone (the rest): parsed, or refused
//! with errors under `cron` and `timezone` only; a parsed one ticks strictly forward.
#![no_main]

use chrono::{TimeZone, Utc};
use keel_core::CronSpec;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (expr, tz) = text.split_once('\n').unwrap_or((text, "UTC"));
    match CronSpec::parse(expr, tz) {
        Ok(spec) => {
            let mut t = Utc.with_ymd_and_hms(2026, 3, 29, 0, 30, 0).unwrap();
            for _ in 0..4 {
                let Some(next) = spec.next_after(t) else { break };
                assert!(next > t, "{expr:?} in {tz:?}: {next} after {t}");
                t = next;
            }
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "refused without a reason");
            for f in &e.0 {
                assert!(f.field == "cron" || f.field == "timezone", "{}", f.field);
            }
        }
    }
});
