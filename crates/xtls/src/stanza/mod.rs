//! The protocol vocabulary: namespaces, IQ envelopes, the XTLS elements and stanza errors.
//!
//! Everything here is pure conversion between `minidom::Element` and typed values; nothing
//! here knows about tunnels or sockets.

pub mod xtls;

use minidom::Element;
use rxml::NcName;
use xmpp_parsers::stanza_error::StanzaError;
pub use xmpp_parsers::stanza_error::{DefinedCondition, ErrorType};

pub use xtls::{DataError, XtlsElement, XtlsParseError, decode_data, encode_data};

/// Namespace constants used across the crate.
pub mod ns {
    /// XTLS proto-XEP 0.0.5 (spec §0.1).
    pub const XTLS: &str = "urn:xmpp:tmp:xtls";
    /// XEP-0250 offers inside `start`/`proceed`.
    pub const C2CTLS: &str = "urn:xmpp:tmp:c2ctls";
    /// XEP-0189 v0.8 `keyinfo` inside an offer.
    pub const PUBKEY: &str = "urn:xmpp:tmp:pubkey";
    /// RFC 6120 stanza error conditions.
    pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
    /// RFC 6120 client namespace: stanzas inside tunnels and, after renaming, on the component stream.
    pub const CLIENT: &str = "jabber:client";
    /// XEP-0114 component stream namespace.
    pub const COMPONENT: &str = "jabber:component:accept";
    /// RFC 6120 stream namespace.
    pub const STREAM: &str = "http://etherx.jabber.org/streams";
    /// RFC 6120 stream error conditions.
    pub const STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
    /// XEP-0030 service discovery, info.
    pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
    /// XEP-0199 ping.
    pub const PING: &str = "urn:xmpp:ping";
}

/// Builds an `NcName` for a name known at compile time.
pub fn name(s: &'static str) -> NcName {
    NcName::try_from(s).expect("static XML names are valid")
}

/// Sets (or replaces) an unqualified attribute.
pub fn set_attr(element: &mut Element, attr: &'static str, value: &str) {
    element.set_attr(rxml::Namespace::NONE, name(attr), value.to_owned());
}

/// Removes an unqualified attribute if present.
pub fn remove_attr(element: &mut Element, attr: &'static str) {
    element.attrs_mut().remove(&rxml::Namespace::NONE, attr);
}

/// Whether XML 1.0 can carry `text` as character data or an attribute value (its `Char`
/// production: no control characters but tab, LF and CR, no U+FFFE or U+FFFF).
///
/// Strings from outside the XML streams (the bot API, webhook replies) must pass this before
/// they go into an element: serializing anything else panics in the XML writer.
pub fn is_xml_text(text: &str) -> bool {
    text.chars().all(|c| {
        matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}')
            || c >= '\u{10000}'
    })
}

/// Whether the writer can serialize `element`: every attribute value and text node, at any
/// depth, is XML text ([`is_xml_text`]).
pub fn carries_as_xml(element: &Element) -> bool {
    element.attrs().iter().all(|(_, value)| is_xml_text(value))
        && element.nodes().all(|node| match node {
            minidom::Node::Text(text) => is_xml_text(text),
            minidom::Node::Element(child) => carries_as_xml(child),
        })
}

/// A chat `<message/>` for the inside of a tunnel from text that came from outside (a person,
/// an API, a webhook reply): refused when XML cannot carry it, since the writer would panic on it.
pub fn checked_chat_message(body: &str, kind: &str) -> Result<Element, &'static str> {
    if !is_xml_text(body) || !is_xml_text(kind) {
        return Err("body and type must not contain control characters other than tab, CR and LF");
    }
    Ok(chat_message(body, kind))
}

/// A chat `<message/>` with one `<body/>`; the text must be XML text ([`checked_chat_message`]).
pub fn chat_message(body: &str, kind: &str) -> Element {
    let mut message = Element::builder("message", ns::CLIENT)
        .attr(name("type"), kind)
        .build();
    let mut b = Element::bare("body", ns::CLIENT);
    b.append_text(body);
    message.append_child(b);
    message
}

/// The four IQ types of RFC 6120 §8.2.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IqType {
    /// A request for information.
    Get,
    /// A request that changes state.
    Set,
    /// A successful response.
    Result,
    /// A failed response.
    Error,
}

impl IqType {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            IqType::Get => "get",
            IqType::Set => "set",
            IqType::Result => "result",
            IqType::Error => "error",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "get" => IqType::Get,
            "set" => IqType::Set,
            "result" => IqType::Result,
            "error" => IqType::Error,
            _ => return None,
        })
    }

    /// Whether this IQ is a request that must be answered.
    pub fn is_request(self) -> bool {
        matches!(self, IqType::Get | IqType::Set)
    }
}

/// Why an element is not a usable IQ.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IqError {
    /// The element is not `<iq/>` in the client namespace.
    #[error("not an IQ stanza")]
    NotIq,
    /// The `type` attribute is missing or unknown.
    #[error("missing or unknown IQ type")]
    BadType,
    /// The `id` attribute is missing.
    #[error("IQ without id")]
    NoId,
}

/// A read-only view of an IQ stanza's envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Iq {
    /// The IQ type.
    pub type_: IqType,
    /// The id, opaque and echoed byte for byte (spec §1.12 rule 4).
    pub id: String,
    /// The sender as stamped by the server, exactly as received.
    pub from: String,
    /// The addressee exactly as received (bare stays bare).
    pub to: String,
    /// The child elements (the payload, or for errors the request echo and `<error/>`).
    pub children: Vec<Element>,
}

impl Iq {
    /// Reads the envelope of an `<iq/>` element.
    pub fn parse(element: &Element) -> Result<Iq, IqError> {
        if !element.is("iq", ns::CLIENT) {
            return Err(IqError::NotIq);
        }
        let type_ = element
            .attr("type")
            .and_then(IqType::parse)
            .ok_or(IqError::BadType)?;
        let id = element.attr("id").ok_or(IqError::NoId)?.to_owned();
        Ok(Iq {
            type_,
            id,
            from: element.attr("from").unwrap_or_default().to_owned(),
            to: element.attr("to").unwrap_or_default().to_owned(),
            children: element.children().cloned().collect(),
        })
    }

    /// The single payload of a request, or `None` when there are zero or several children.
    pub fn single_payload(&self) -> Option<&Element> {
        match self.children.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The `type` of an error response's `<error/>` (`cancel`, `wait`, ...), when present.
    pub fn error_type(&self) -> Option<&str> {
        self.children
            .iter()
            .find(|c| c.name() == "error")
            .and_then(|e| e.attr("type"))
    }

    /// The defined condition of an error response (`undefined-condition` when absent).
    pub fn error_condition(&self) -> String {
        self.children
            .iter()
            .find(|c| c.name() == "error")
            .and_then(|e| {
                e.children()
                    .find(|c| c.ns() == ns::STANZAS && c.name() != "text")
            })
            .map(|c| c.name().to_owned())
            .unwrap_or_else(|| "undefined-condition".to_owned())
    }

    /// An empty `result` answering this request, from the address it was sent to.
    pub fn result(&self, payload: Option<Element>) -> Element {
        build_iq(IqType::Result, &self.id, &self.to, &self.from, payload)
    }

    /// An `error` answering this request, without echoing its payload (spec §1.11).
    pub fn error(&self, type_: ErrorType, condition: DefinedCondition, text: &str) -> Element {
        let mut iq = build_iq(IqType::Error, &self.id, &self.to, &self.from, None);
        iq.append_child(error_element(type_, condition, text));
        iq
    }
}

/// Builds an IQ stanza in the client namespace.
pub fn build_iq(
    type_: IqType,
    id: &str,
    from: &str,
    to: &str,
    payload: Option<Element>,
) -> Element {
    let mut iq = Element::builder("iq", ns::CLIENT)
        .attr(name("type"), type_.as_str())
        .attr(name("id"), id)
        .attr(name("from"), from)
        .attr(name("to"), to)
        .build();
    if let Some(payload) = payload {
        iq.append_child(payload);
    }
    iq
}

/// Builds an RFC 6120 `<error/>` element with an optional English text.
pub fn error_element(type_: ErrorType, condition: DefinedCondition, text: &str) -> Element {
    let mut error = StanzaError::new(type_, condition, "en", text);
    if text.is_empty() {
        error.texts.clear();
    }
    Element::from(error)
}

/// A stanza error answer for a request of any kind (message, presence or IQ).
pub fn error_reply(
    request: &Element,
    type_: ErrorType,
    condition: DefinedCondition,
    text: &str,
) -> Element {
    let mut reply = Element::builder(request.name(), ns::CLIENT)
        .attr(name("type"), "error")
        .build();
    if let Some(id) = request.attr("id") {
        set_attr(&mut reply, "id", id);
    }
    set_attr(&mut reply, "from", request.attr("to").unwrap_or_default());
    set_attr(&mut reply, "to", request.attr("from").unwrap_or_default());
    reply.append_child(error_element(type_, condition, text));
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    #[test]
    fn iq_envelope_and_replies() {
        let el = parse(
            "<iq xmlns='jabber:client' type='set' id='q1Zf' from='alice@example.net/laptop' to='weather@bots.example.org'><start xmlns='urn:xmpp:tmp:xtls'/></iq>",
        );
        let iq = Iq::parse(&el).unwrap();
        assert_eq!(iq.type_, IqType::Set);
        assert!(iq.single_payload().unwrap().is("start", ns::XTLS));
        let result = iq.result(None);
        assert_eq!(result.attr("id"), Some("q1Zf"));
        assert_eq!(result.attr("from"), Some("weather@bots.example.org"));
        assert_eq!(result.attr("to"), Some("alice@example.net/laptop"));
        let error = iq.error(ErrorType::Cancel, DefinedCondition::ItemNotFound, "");
        let parsed = Iq::parse(&error).unwrap();
        assert_eq!(parsed.type_, IqType::Error);
        assert_eq!(parsed.error_condition(), "item-not-found");
        assert!(parsed.children.iter().all(|c| c.name() == "error"));
    }

    #[test]
    fn iq_without_id_or_type_is_rejected() {
        assert_eq!(
            Iq::parse(&parse("<iq xmlns='jabber:client' type='get'/>")),
            Err(IqError::NoId)
        );
        assert_eq!(
            Iq::parse(&parse("<iq xmlns='jabber:client' type='nope' id='1'/>")),
            Err(IqError::BadType)
        );
        assert_eq!(
            Iq::parse(&parse("<message xmlns='jabber:client'/>")),
            Err(IqError::NotIq)
        );
    }

    #[test]
    fn xml_text_excludes_what_the_writer_refuses() {
        // Found by the `tunnel` fuzz target: a message body with U+0018 panicked in `send`.
        for bad in ["\u{18}", "a\u{0}b", "\u{b}", "\u{FFFE}", "x\u{FFFF}"] {
            assert!(!is_xml_text(bad), "{bad:?}");
        }
        for good in [
            "",
            "hi \t\r\n",
            "\u{D7FF}\u{E000}\u{FFFD}\u{10000}\u{10FFFF}",
            "é😀",
        ] {
            assert!(is_xml_text(good), "{good:?}");
            // What passes, the writer takes.
            crate::xml::to_bytes(&chat_message(good, good));
        }
    }

    #[test]
    fn error_text_is_optional() {
        let el = error_element(
            ErrorType::Wait,
            DefinedCondition::ResourceConstraint,
            "busy",
        );
        assert_eq!(el.attr("type"), Some("wait"));
        assert!(el.has_child("resource-constraint", ns::STANZAS));
        assert_eq!(el.get_child("text", ns::STANZAS).unwrap().text(), "busy");
        let el = error_element(ErrorType::Cancel, DefinedCondition::Conflict, "");
        assert!(el.get_child("text", ns::STANZAS).is_none());
    }
}
