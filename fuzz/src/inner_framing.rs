//! Target `inner_framing`: the reader of tunnel plaintext (spec §1.9), the `StreamReader` with
//! its synthetic root that every tunnel feeds its decrypted bytes to.
//!
//! Input: two control bytes (which inner stanza size limit, how to split), then the plaintext.
//! The limits are the tunnel's own (`TunnelConfig::max_inner_stanza`, depth 32) with smaller
//! sizes too, so the limit is reached often.
//!
//! Invariants: no panic; whole and split input read the same; no element deeper than the
//! limit is produced and no more than the size limit is ever buffered for one element; a
//! `TooLarge` error needs more input than the limit; every error is sticky; every element
//! serializes and reads back to the same bytes, and a stanza also through `parse_stanza`; a
//! child in the namespaces of short authentication strings or pairing reads without panicking
//! and writes back the same.

use xtls::tunnel::TunnelConfig;
use xtls::xml::{StreamReader, XmlError, XmlLimits, parse_stanza, to_bytes};

use crate::xmlcheck::{Canon, assert_round_trip, assert_split_invariant, chunks, feed};

/// The depth limit `Tunnel` gives its inner reader.
const TUNNEL_DEPTH: usize = 32;

/// The payloads of the verification exchanges a peer may put in an inner IQ (short
/// authentication strings, pairing): read without panicking, and what reads writes back the
/// same.
fn verification_payloads(el: &minidom::Element) {
    use xtls::pair::PairMessage;
    use xtls::sas::SasMessage;
    for child in el.children() {
        if let Some(Ok(message)) = SasMessage::parse(child) {
            assert_eq!(SasMessage::parse(&message.to_element()), Some(Ok(message)));
        }
        if let Some(Ok(message)) = PairMessage::parse(child) {
            assert_eq!(PairMessage::parse(&message.to_element()), Some(Ok(message)));
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let [size, split, plaintext @ ..] = data else {
        return;
    };
    let max_element_bytes = match size % 4 {
        0 => TunnelConfig::default().max_inner_stanza,
        1 => 64,
        2 => 256,
        _ => 1024 + usize::from(*size),
    };
    let limits = XmlLimits {
        max_element_bytes,
        max_depth: TUNNEL_DEPTH,
    };
    let whole = feed(
        &mut StreamReader::with_synthetic_root(limits),
        limits,
        false,
        &[plaintext],
        |el| {
            assert_round_trip(el, TUNNEL_DEPTH);
            verification_payloads(el);
            if matches!(el.name(), "message" | "presence" | "iq")
                && el.ns() == xtls::stanza::ns::CLIENT
            {
                let text = String::from_utf8(to_bytes(el)).expect("XML output is UTF-8");
                let again = parse_stanza(&text).expect("an inner stanza parses as a bot's stanza");
                assert_eq!(Canon::of(&again), Canon::of(el));
            }
        },
    );
    if let Some(XmlError::TooLarge(limit)) = &whole.error {
        assert_eq!(*limit, max_element_bytes);
        assert!(
            plaintext.len() > max_element_bytes,
            "TooLarge below the limit"
        );
    }
    let split = feed(
        &mut StreamReader::with_synthetic_root(limits),
        limits,
        false,
        &chunks(plaintext, *split | 1),
        |_| {},
    );
    assert_split_invariant(&whole, &split);
}
