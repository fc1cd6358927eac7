//! Replays every committed input of every target on stable, without libFuzzer: the seed
//! corpus (`corpus/<target>/`) and the inputs of crashes found so far
//! (`regressions/<target>/`, see docs/fuzzing.md). Run with
//! `cargo test --manifest-path fuzz/Cargo.toml`.

use std::path::Path;

#[test]
fn every_committed_input_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut replayed = 0;
    for target in xtls_component_fuzz::TARGETS {
        let run = xtls_component_fuzz::harness(target).expect("a known target");
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                continue;
            };
            let mut files: Vec<_> = entries
                .map(|e| e.expect("a directory entry").path())
                .collect();
            files.sort();
            for file in files {
                let data = std::fs::read(&file).expect("a readable input");
                let name = file.display().to_string();
                if std::panic::catch_unwind(|| run(&data)).is_err() {
                    panic!("{name} fails (cargo fuzz run {target} {name} reproduces it)");
                }
                replayed += 1;
            }
        }
    }
    assert!(replayed > 0, "no committed input found");
    println!("{replayed} inputs replayed");
}
