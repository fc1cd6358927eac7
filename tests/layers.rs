//! The component's layers, and the rule that imports point down only.
//!
//! Every top-level module of `src/` has a rank in [`LAYERS`]; a module may name another
//! (`crate::other`) only when the other's rank is lower. That keeps the module graph free of
//! cycles and the data flow readable: link → router → session → delivery → store, with the
//! API beside them and `app` wiring everything. A new module must be added here, in the layer
//! where it belongs, or this test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules of the library, lowest layer first. Modules on one line share a rank
/// and must not name each other.
const LAYERS: &[&[&str]] = &[
    // Leaves: typed configuration, counters.
    &["config", "metrics"],
    // The SQL store, and the server link (which knows neither router nor session).
    &["store", "link"],
    // What the bot backend sees: the typed events, their log, webhooks.
    &["delivery"],
    // The bot table and one driver per bot, owning the tunnels.
    &["session"],
    // Inbound stanzas to the addressed bot.
    &["router"],
    // The HTTP admin and bot API.
    &["api"],
    // Wiring and ordered shutdown.
    &["app"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The `.rs` files under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its line and doc comments: a line is cut at the first `//`
/// outside a string literal (`"http://..."` stays code).
fn code(text: &str) -> String {
    let cut = |line: &str| -> usize {
        let (mut in_string, mut escaped) = (false, false);
        let bytes = line.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                _ if escaped => escaped = false,
                b'\\' if in_string => escaped = true,
                b'"' => in_string = !in_string,
                b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return i,
                _ => {}
            }
        }
        line.len()
    };
    text.lines()
        .map(|line| &line[..cut(line)])
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names through `crate::`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a, b::c, d::{e, f}}`: the first name of each top-level item.
            let (mut depth, mut item_start) = (0usize, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        rest = &group[i..];
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        item_start = false;
                        let name = ident(&group[i..]);
                        if !name.is_empty() {
                            found.insert(name);
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// module -> the other top-level modules it names.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_str().unwrap().trim_end_matches(".rs").to_owned();
        if ["lib", "main", "bin"].contains(&module.as_str()) {
            continue; // the crate root and the binaries sit above every layer
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let names = named_modules(&code(&text));
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(names.into_iter().filter(|n| *n != module));
    }
    graph
}

#[test]
fn every_module_has_a_layer() {
    let unplaced: Vec<String> = module_graph()
        .into_keys()
        .filter(|m| rank(m).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules without a layer in tests/layers.rs: {unplaced:?}"
    );
}

#[test]
fn imports_point_down_only() {
    let mut upward = Vec::new();
    for (module, names) in module_graph() {
        let Some(own) = rank(&module) else { continue };
        for name in names {
            match rank(&name) {
                Some(r) if r < own => {}
                Some(_) => upward.push(format!("{module} -> {name}")),
                None => upward.push(format!("{module} -> {name} (unknown module)")),
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not point to a lower layer:\n  {}",
        upward.join("\n  ")
    );
}

#[test]
fn the_reader_finds_grouped_and_nested_imports() {
    let found = named_modules(
        "use crate::{store::{self, Store}, config::X};\nlet x = crate::metrics::m();\n",
    );
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["config", "metrics", "store"]
    );
    assert!(code("// crate::api in a comment\n").trim().is_empty());
    let kept = code("let u = \"http://x\"; crate::store::now(); // crate::api\n");
    assert_eq!(
        named_modules(&kept).into_iter().collect::<Vec<_>>(),
        ["store"]
    );
}
