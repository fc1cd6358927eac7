//! cargo-fuzz target `inner_framing`: see `xtls_component_fuzz::inner_framing` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xtls_component_fuzz::inner_framing::run(data));
