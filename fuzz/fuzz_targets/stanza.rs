//! cargo-fuzz target `stanza`: see `xtls_component_fuzz::stanza` and docs/fuzzing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| xtls_component_fuzz::stanza::run(data));
