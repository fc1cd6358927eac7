//! Harnesses of the cargo-fuzz targets of xtls-component (docs/fuzzing.md).
//!
//! Each module has one `run(data)` that feeds arbitrary bytes to the component's real code and
//! asserts its invariants; `fuzz_targets/*.rs` are one-line wrappers around them, and
//! `tests/replay.rs` runs every committed corpus and regression input through them on stable.
//!
//! | module | what it drives |
//! |---|---|
//! | [`stanza`] | `xml::parse_stanza`, the server-stream `StreamReader`, the IQ and XTLS element parsers, base64 |
//! | [`inner_framing`] | the tunnel plaintext reader (synthetic root, inner stanza size limit) |
//! | [`tunnel`] | two tunnel engines after a real handshake, with arbitrary payloads, losses and timeouts |
//! | [`admin_json`] | the admin API's JSON request bodies through the real axum router |

pub mod admin_json;
pub mod inner_framing;
pub mod stanza;
pub mod tunnel;
mod xmlcheck;

/// The harness of a target by name, for replays.
pub fn harness(target: &str) -> Option<fn(&[u8])> {
    Some(match target {
        "stanza" => stanza::run,
        "inner_framing" => inner_framing::run,
        "tunnel" => tunnel::run,
        "admin_json" => admin_json::run,
        _ => return None,
    })
}

/// Every target, in the order scripts/fuzz runs them.
pub const TARGETS: &[&str] = &["stanza", "inner_framing", "tunnel", "admin_json"];
