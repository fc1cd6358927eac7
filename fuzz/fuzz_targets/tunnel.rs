//! cargo-fuzz target `tunnel`: see `xtls_component_fuzz::tunnel` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xtls_component_fuzz::tunnel::run(data));
