//! The bodies of `POST /v1/jobs`, `/v1/jobs/batch`, `/v1/process` and `/v1/schedules`, as
//! three kinds of caller: parsed or refused with a 4xx; what is parsed validates and stays in
//! a tenant key's tenant (`keel_api::fuzzing::check_bodies`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keel_api::fuzzing::check_bodies(data));
