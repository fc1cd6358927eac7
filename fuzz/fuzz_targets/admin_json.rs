//! cargo-fuzz target `admin_json`: see `xtls_component_fuzz::admin_json` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xtls_component_fuzz::admin_json::run(data));
