//! Target `stanza`: the component's readers and parsers of network XML.
//!
//! Input: one control byte (how to split, whether to prepend a server stream header), then the
//! bytes. Drives `xml::parse_stanza` (what a bot posts), the XEP-0114 stream reader with its
//! namespace rename and skipping of oversized stanzas, fed whole and in arbitrary splits,
//! and on every element read: `Iq::parse`,
//! `XtlsElement::parse`, `classify_request`, `decode_data`, the reply builders and the
//! component stream serializer.
//!
//! Invariants: no panic; splitting the input never changes what is read (elements, skipped
//! elements, errors); no element read exceeds the depth limit; elements
//! serialize and read back to the same bytes; an XTLS element survives `to_element` then
//! `parse`; decoded `<data/>` is at most `MAX_CHUNK_ACCEPTED` bytes and re-encodes to the same
//! bytes; replies echo the request id and swap the addresses.

use minidom::Element;
use xtls::stanza::xtls::MAX_CHUNK_ACCEPTED;
use xtls::stanza::{
    DefinedCondition, ErrorType, Iq, IqType, XtlsElement, decode_data, encode_data, error_reply, ns,
};
use xtls::tunnel::classify_request;
use xtls::xml::{StreamReader, XmlEvent, XmlLimits, parse_stanza, to_bytes};
use xtls_component::link::{to_stream_bytes, validate_outbound};

use crate::xmlcheck::{Canon, assert_round_trip, assert_split_invariant, chunks, feed};

/// The header a server sends (spec §3.1), prepended when the control byte asks for it.
const SERVER_HEADER: &[u8] = b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept' id='fuzz' from='bots.example.org'>";

/// The limits of the server stream here: small enough to reach both often.
const LIMITS: XmlLimits = XmlLimits {
    max_element_bytes: 16 * 1024,
    max_depth: 16,
};

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&control, bytes)) = data.split_first() else {
        return;
    };
    if let Ok(text) = std::str::from_utf8(bytes) {
        bot_stanza(text);
    }
    let mut input = Vec::with_capacity(bytes.len() + SERVER_HEADER.len());
    if control & 0x80 != 0 {
        input.extend_from_slice(SERVER_HEADER);
    }
    input.extend_from_slice(bytes);
    // As the component reads the server stream: renamed namespace, oversized stanzas skipped.
    let reader = || {
        StreamReader::new(LIMITS)
            .rename_namespace(ns::COMPONENT, ns::CLIENT)
            .skip_oversized()
    };
    let whole = feed(&mut reader(), LIMITS, true, &[&input], |el| {
        assert_round_trip(el, LIMITS.max_depth);
        inbound(el);
    });
    let split = feed(
        &mut reader(),
        LIMITS,
        true,
        &chunks(&input, control & 0x7f),
        |_| {},
    );
    assert_split_invariant(&whole, &split);
}

/// What `POST /v1/bots/{jid}/messages` does with a `stanza` field.
fn bot_stanza(text: &str) {
    let Ok(el) = parse_stanza(text) else {
        return;
    };
    assert!(matches!(el.name(), "message" | "presence" | "iq"));
    assert_eq!(el.ns(), ns::CLIENT);
    let again = parse_stanza(&String::from_utf8(to_bytes(&el)).expect("XML output is UTF-8"))
        .expect("a serialized stanza parses again");
    assert_eq!(Canon::of(&again), Canon::of(&el));
    inbound(&el);
}

/// Everything the component does with one inbound element.
fn inbound(el: &Element) {
    // The address check accepts anything; what we write on the component stream reads back
    // as the same stanza (the namespace rename of spec §3.6 works both ways). An element in
    // no namespace cannot (see `assert_round_trip`); the component never writes one.
    let _ = validate_outbound(el, "bots.example.org");
    if el.ns().is_empty() || el.name() == "stream" {
        return;
    }
    let mut reader = StreamReader::new(XmlLimits {
        max_element_bytes: usize::MAX / 2,
        max_depth: LIMITS.max_depth,
    })
    .rename_namespace(ns::COMPONENT, ns::CLIENT);
    let mut wire = SERVER_HEADER.to_vec();
    wire.extend(to_stream_bytes(el));
    assert_eq!(reader.feed(&wire), Ok(()));
    let read: Vec<Canon> = std::iter::from_fn(|| reader.next_event())
        .filter_map(|e| match e {
            XmlEvent::Element(el) => Some(Canon::of(&el)),
            _ => None,
        })
        .collect();
    assert_eq!(
        read,
        vec![Canon::of(el)],
        "the component stream form does not read back: {}",
        String::from_utf8_lossy(&wire)
    );
    if matches!(el.name(), "message" | "presence" | "iq") {
        let reply = error_reply(
            el,
            ErrorType::Cancel,
            DefinedCondition::ServiceUnavailable,
            "",
        );
        assert_eq!(reply.attr("id"), el.attr("id"));
        assert_eq!(reply.attr("to"), Some(el.attr("from").unwrap_or_default()));
        assert_eq!(reply.attr("type"), Some("error"));
    }
    for child in el.children() {
        xtls_element(child);
    }
    let Ok(iq) = Iq::parse(el) else {
        return;
    };
    assert_eq!(iq.children.len(), el.children().count());
    let _ = iq.error_condition();
    let result = Iq::parse(&iq.result(None)).expect("our result is an IQ");
    assert_eq!(
        (result.type_, result.id.as_str()),
        (IqType::Result, iq.id.as_str())
    );
    assert_eq!(
        (result.from.as_str(), result.to.as_str()),
        (iq.to.as_str(), iq.from.as_str())
    );
    let error = Iq::parse(&iq.error(ErrorType::Modify, DefinedCondition::BadRequest, "x"))
        .expect("our error is an IQ");
    assert_eq!(error.error_condition(), "bad-request");
    assert!(
        error.children.iter().all(|c| c.name() == "error"),
        "an error reply echoes no payload (spec §1.11)"
    );
    if iq.type_.is_request() {
        match classify_request(&iq) {
            Ok(x) => {
                assert!(iq.single_payload().is_some());
                assert!(matches!(
                    x,
                    XtlsElement::Start { .. } | XtlsElement::Data { .. } | XtlsElement::Close
                ));
                assert_eq!(iq.type_, IqType::Set);
            }
            Err(reply) => {
                let reply = Iq::parse(&reply).expect("the refusal is an IQ");
                assert_eq!(reply.type_, IqType::Error);
                assert_eq!(reply.id, iq.id);
            }
        }
    }
}

/// The XTLS element parser, its inverse and the `<data/>` decoder.
fn xtls_element(el: &Element) {
    let Ok(x) = XtlsElement::parse(el) else {
        return;
    };
    assert_eq!(el.ns(), ns::XTLS);
    let built = x.to_element();
    assert_eq!(
        XtlsElement::parse(&built).as_ref(),
        Ok(&x),
        "to_element then parse changed {x:?}"
    );
    if let XtlsElement::Data { text, .. } = &x
        && let Ok(bytes) = decode_data(text)
    {
        assert!(bytes.len() <= MAX_CHUNK_ACCEPTED);
        assert_eq!(decode_data(&encode_data(&bytes)), Ok(bytes));
    }
}
