//! The `Idempotency-Key` (and `Request-Timeout`) header values: taken or refused with a
//! 4xx; a key taken is 1..=255 visible ASCII (`check_headers`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_api::fuzzing::check_headers(data));
