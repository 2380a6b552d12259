//! The query strings of `GET /v1/jobs` and `GET /v1/schedules`: parsed or refused with a
//! 4xx; pages within bounds; a tenant key lists only its own (`check_query`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(query) = std::str::from_utf8(data) {
        keel_api::fuzzing::check_query(query);
    }
});
