//! A `--config` file's text: taken, or refused with at least one reason; never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(e) = keel::Config::from_toml(text)
    {
        assert!(!e.0.is_empty(), "refused without a reason: {text:?}");
    }
});
