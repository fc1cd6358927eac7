//! Incremental XML stream reading: bytes in, depth-1 elements out.
//!
//! Both XML streams of the component use this reader: the XEP-0114 stream from the server
//! (whose root is the server's `<stream:stream>`), and the plaintext inside a tunnel (spec
//! §1.9 rule 3: a synthetic, never-transmitted root is fed first). It enforces the RFC 6120
//! restricted-XML profile through rxml (no DTD, no entities, no processing instructions,
//! no comments) and caps the size and nesting depth of each element so a hostile peer cannot
//! make it buffer without bound.

use std::collections::VecDeque;

use minidom::Element;
use minidom::tree_builder::TreeBuilder;
use rxml::error::EndOrError;
use rxml::{Parse, RawEvent, RawParser};

/// RFC 6120's stream namespace.
const STREAM_NS: &str = "http://etherx.jabber.org/streams";

/// The synthetic root fed before tunnel plaintext (spec §1.9 rule 3).
const SYNTHETIC_ROOT: &[u8] =
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";

/// Caps applied to each depth-1 element.
#[derive(Debug, Clone, Copy)]
pub struct XmlLimits {
    /// Largest serialized size of one depth-1 element, in bytes.
    pub max_element_bytes: usize,
    /// Deepest nesting allowed below the stream root.
    pub max_depth: usize,
}

impl Default for XmlLimits {
    fn default() -> Self {
        Self {
            max_element_bytes: 1024 * 1024,
            max_depth: 64,
        }
    }
}

/// Why a stream could not be read further; every variant is fatal for the stream.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum XmlError {
    /// The bytes are not well-formed restricted XML.
    #[error("not well-formed XML: {0}")]
    NotWellFormed(String),
    /// One element exceeded [`XmlLimits::max_element_bytes`].
    #[error("element larger than {0} bytes")]
    TooLarge(usize),
    /// Elements nested deeper than [`XmlLimits::max_depth`].
    #[error("elements nested deeper than {0} levels")]
    TooDeep(usize),
    /// Character data other than whitespace between depth-1 elements.
    #[error("character data between top-level elements")]
    StrayText,
    /// The stream was used after it reported an error or its end.
    #[error("stream already ended")]
    Ended,
}

/// What the reader produced.
#[derive(Debug, Clone, PartialEq)]
pub enum XmlEvent {
    /// The stream root was opened; its attributes as (qualified name, value) pairs.
    Header(Vec<(String, String)>),
    /// One complete depth-1 element.
    Element(Element),
    /// A depth-1 element over a limit, read to its end and dropped (readers made with
    /// [`StreamReader::skip_oversized`]): its local name, the attributes read before the
    /// limit was hit, and which limit.
    Skipped {
        /// The element's local name (`iq`, `message`, ...).
        name: String,
        /// Its attributes as (qualified name, value), as far as they were read.
        attrs: Vec<(String, String)>,
        /// The limit it exceeded.
        reason: XmlError,
    },
    /// The stream root was closed.
    End,
}

/// A depth-1 element's local name and the attributes read so far.
type Head = (String, Vec<(String, String)>);

/// Incremental reader of an XML stream.
pub struct StreamReader {
    parser: RawParser,
    builder: TreeBuilder,
    limits: XmlLimits,
    /// Current element depth, 0 outside the root, 1 inside the root only.
    depth: usize,
    /// Bytes consumed by the depth-1 element under construction.
    element_bytes: usize,
    /// Attributes of the root element seen so far, reported in [`XmlEvent::Header`].
    root_attrs: Vec<(String, String)>,
    /// Namespace value to rewrite in `xmlns` declarations, and its replacement.
    rename_ns: Option<(&'static str, &'static str)>,
    /// Whether the header of a synthetic root is swallowed rather than reported.
    synthetic_root: bool,
    /// Events decoded but not yet taken.
    out: VecDeque<XmlEvent>,
    failed: Option<XmlError>,
    /// Whether an element over a limit is skipped (the stream goes on) rather than fatal.
    skip_oversized: bool,
    /// The root's head events, replayed into a fresh tree builder after a skipped element.
    root_events: Vec<RawEvent>,
    /// Whether the root's head is complete (no more events for `root_events`).
    root_ready: bool,
    /// The depth-1 element being skipped, and the limit it hit.
    skipping: Option<(Head, XmlError)>,
    /// Name and attributes of the depth-1 element being read (for [`XmlEvent::Skipped`]).
    current: Head,
    /// Inside a tunnel, a depth-1 element named `stream` whose head is being read: its prefix,
    /// and the namespace its own attributes bind to that prefix (None: inherited). Whether it
    /// is a stream header is known once the head is complete.
    maybe_header: Option<(Option<String>, Option<String>)>,
}

impl StreamReader {
    /// A reader for a stream whose root arrives in the bytes.
    pub fn new(limits: XmlLimits) -> Self {
        Self {
            parser: RawParser::new(),
            builder: TreeBuilder::new(),
            limits,
            depth: 0,
            element_bytes: 0,
            root_attrs: Vec::new(),
            rename_ns: None,
            synthetic_root: false,
            out: VecDeque::new(),
            failed: None,
            skip_oversized: false,
            root_events: Vec::new(),
            root_ready: false,
            skipping: None,
            current: Default::default(),
            maybe_header: None,
        }
    }

    /// Makes an element over a limit cost only itself: it is read to its end without being
    /// kept and reported as [`XmlEvent::Skipped`] (for the server stream, which carries every
    /// tunnel; inside a tunnel a limit ends the tunnel instead).
    pub fn skip_oversized(mut self) -> Self {
        self.skip_oversized = true;
        self
    }

    /// A reader for root-less stanza sequences (tunnel plaintext, spec §1.9).
    pub fn with_synthetic_root(limits: XmlLimits) -> Self {
        let mut reader = Self::new(limits);
        reader.synthetic_root = true;
        reader
            .feed(SYNTHETIC_ROOT)
            .expect("the synthetic root is well-formed");
        reader
    }

    /// Rewrites every `xmlns` declaration equal to `from` into `to` (the component stream
    /// edge renames `jabber:component:accept` to `jabber:client`, spec §3.6).
    pub fn rename_namespace(mut self, from: &'static str, to: &'static str) -> Self {
        self.rename_ns = Some((from, to));
        self
    }

    /// Feeds bytes; complete elements become available through [`StreamReader::next_event`].
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), XmlError> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        loop {
            match self.parser.parse(&mut bytes, false) {
                Ok(Some(event)) => {
                    if let Err(err) = self.handle(event) {
                        self.failed = Some(err.clone());
                        return Err(err);
                    }
                }
                Ok(None) => {
                    self.failed = Some(XmlError::Ended);
                    return Ok(());
                }
                Err(EndOrError::NeedMoreData) => return Ok(()),
                Err(EndOrError::Error(err)) => {
                    let err = XmlError::NotWellFormed(err.to_string());
                    self.failed = Some(err.clone());
                    return Err(err);
                }
            }
        }
    }

    /// Takes the next decoded event, if any.
    pub fn next_event(&mut self) -> Option<XmlEvent> {
        self.out.pop_front()
    }

    /// Whether the reader sits between top-level elements with nothing undelivered: no
    /// element begun, none waiting, no error. Bytes of a token the parser holds unfinished
    /// are not visible here; the caller knows whether its input ended at a `>`.
    pub fn at_rest(&self) -> bool {
        self.depth == 1
            && self.element_bytes == 0
            && self.out.is_empty()
            && self.failed.is_none()
            && self.skipping.is_none()
    }

    /// Bytes of the element under construction (a partial stanza), for diagnostics.
    pub fn pending_bytes(&self) -> usize {
        self.element_bytes
    }

    fn handle(&mut self, event: RawEvent) -> Result<(), XmlError> {
        if self.skipping.is_some() {
            return self.skip(event, false);
        }
        // Only the events of depth-1 elements count: the root's head (the synthetic one too,
        // whatever the limit) and whitespace between stanzas are no stanza's bytes.
        let in_element =
            self.depth >= 2 || (self.depth == 1 && matches!(event, RawEvent::ElementHeadOpen(..)));
        if in_element {
            self.element_bytes += event.metrics().len();
            if self.element_bytes > self.limits.max_element_bytes {
                let limit = XmlError::TooLarge(self.limits.max_element_bytes);
                return self.over_limit(event, limit, false);
            }
        }
        let event = match event {
            RawEvent::XmlDeclaration(..) => return Ok(()),
            RawEvent::ElementHeadOpen(_, (ref prefix, ref name)) => {
                self.depth += 1;
                if self.depth == 2 {
                    if self.synthetic_root && name.as_str() == "stream" {
                        // Perhaps a stream header: decided when its head (and so its
                        // namespace) is complete.
                        let prefix = prefix.as_ref().map(|p| p.as_str().to_owned());
                        self.maybe_header = Some((prefix, None));
                    }
                    self.current = (name.as_str().to_owned(), Vec::new());
                }
                if self.depth > self.limits.max_depth + 1 {
                    return self.over_limit(event, XmlError::TooDeep(self.limits.max_depth), true);
                }
                event
            }
            RawEvent::Attribute(metrics, (prefix, name), value) => {
                let value = match self.rename_ns {
                    Some((from, to))
                        if value == from
                            && (prefix.is_none() && name.as_str() == "xmlns"
                                || prefix.as_ref().is_some_and(|p| p.as_str() == "xmlns")) =>
                    {
                        to.to_owned()
                    }
                    _ => value,
                };
                if self.depth == 2
                    && let Some((element_prefix, declared)) = self.maybe_header.as_mut()
                {
                    // `xmlns:p` for the element's prefix p, or `xmlns` when it has none.
                    let binds = match (&prefix, element_prefix.as_deref()) {
                        (Some(p), Some(ep)) => p.as_str() == "xmlns" && name.as_str() == ep,
                        (None, None) => name.as_str() == "xmlns",
                        _ => false,
                    };
                    if binds {
                        *declared = Some(value.clone());
                    }
                }
                if self.depth <= 2 {
                    let qname = match &prefix {
                        Some(p) => format!("{}:{}", p.as_str(), name.as_str()),
                        None => name.as_str().to_owned(),
                    };
                    if self.depth == 1 {
                        self.root_attrs.push((qname, value.clone()));
                    } else if self.skip_oversized {
                        self.current.1.push((qname, value.clone()));
                    }
                }
                RawEvent::Attribute(metrics, (prefix, name), value)
            }
            RawEvent::ElementHeadClose(..) => {
                if self.depth == 2
                    && let Some((prefix, declared)) = self.maybe_header.take()
                {
                    // The synthetic root binds `stream:` to the streams namespace and the
                    // default namespace to jabber:client.
                    let namespace = declared.unwrap_or_else(|| match prefix.as_deref() {
                        Some("stream") => STREAM_NS.to_owned(),
                        Some(_) => String::new(),
                        None => "jabber:client".to_owned(),
                    });
                    if namespace == STREAM_NS {
                        // Spec §1.9 rules 1 and 5: no stream header inside a tunnel; another
                        // element named `stream` is just an element, ignored like any other.
                        return Err(XmlError::NotWellFormed(
                            "a stream header inside the tunnel".into(),
                        ));
                    }
                }
                if self.depth == 1 && !self.synthetic_root {
                    self.out
                        .push_back(XmlEvent::Header(std::mem::take(&mut self.root_attrs)));
                }
                event
            }
            RawEvent::ElementFoot(..) => {
                self.depth -= 1;
                self.process(event)?;
                match self.depth {
                    0 => self.out.push_back(XmlEvent::End),
                    1 => {
                        self.element_bytes = 0;
                        if let Some(mut element) = self.builder.unshift_child() {
                            forget_prefixes(&mut element);
                            self.out.push_back(XmlEvent::Element(element));
                        }
                    }
                    _ => {}
                }
                return Ok(());
            }
            RawEvent::Text(_, ref text) if self.depth == 1 => {
                // Whitespace between stanzas is a keepalive (RFC 6120 §4.6.1); never kept.
                if text.chars().all(|c| matches!(c, ' ' | '\t' | '\r' | '\n')) {
                    return Ok(());
                }
                return Err(XmlError::StrayText);
            }
            RawEvent::Text(..) => event,
        };
        self.process(event)
    }

    fn process(&mut self, event: RawEvent) -> Result<(), XmlError> {
        if self.skip_oversized && !self.root_ready {
            self.root_ready = matches!(event, RawEvent::ElementHeadClose(..));
            self.root_events.push(event.clone());
        }
        self.builder
            .process_event(event)
            .map_err(|err| XmlError::NotWellFormed(err.to_string()))
    }

    /// `event` hit a limit: fatal, or (with [`StreamReader::skip_oversized`]) the start of
    /// skipping the depth-1 element it belongs to. `counted`: the event's depth change is
    /// already applied.
    fn over_limit(
        &mut self,
        event: RawEvent,
        reason: XmlError,
        counted: bool,
    ) -> Result<(), XmlError> {
        let opens = matches!(event, RawEvent::ElementHeadOpen(..)) && !counted;
        let depth = self.depth + usize::from(opens);
        if !self.skip_oversized || depth < 2 {
            return Err(reason);
        }
        let (name, attrs) = match &event {
            RawEvent::ElementHeadOpen(_, (_, name)) if depth == 2 => {
                (name.as_str().to_owned(), Vec::new())
            }
            _ => std::mem::take(&mut self.current),
        };
        self.skipping = Some(((name, attrs), reason));
        // The partial element goes with the tree builder; the root is rebuilt at its end.
        self.builder = TreeBuilder::new();
        self.skip(event, counted)
    }

    /// Follows the depth of a skipped element without keeping anything of it.
    fn skip(&mut self, event: RawEvent, counted: bool) -> Result<(), XmlError> {
        if !counted {
            match event {
                RawEvent::ElementHeadOpen(..) => self.depth += 1,
                RawEvent::ElementFoot(..) => self.depth -= 1,
                _ => {}
            }
        }
        if self.depth == 1 {
            let ((name, attrs), reason) = self.skipping.take().expect("an element is skipped");
            self.element_bytes = 0;
            for event in self.root_events.clone() {
                self.builder
                    .process_event(event)
                    .map_err(|err| XmlError::NotWellFormed(err.to_string()))?;
            }
            self.out.push_back(XmlEvent::Skipped {
                name,
                attrs,
                reason,
            });
        }
        Ok(())
    }
}

/// Parses one stanza written by a bot (`message`, `presence` or `iq`; `jabber:client` is the
/// default namespace), with the same restrictions as tunnel plaintext.
pub fn parse_stanza(text: &str) -> Result<Element, XmlError> {
    let mut reader = StreamReader::with_synthetic_root(XmlLimits::default());
    reader.feed(text.as_bytes())?;
    let mut found = Vec::new();
    while let Some(event) = reader.next_event() {
        if let XmlEvent::Element(el) = event {
            found.push(el);
        }
    }
    if reader.pending_bytes() > 0 {
        return Err(XmlError::NotWellFormed("incomplete element".into()));
    }
    match found.pop() {
        // Spec §1.9 rule 5: a peer ignores anything else, so refuse it here, not silently there.
        Some(el)
            if found.is_empty()
                && matches!(el.name(), "message" | "presence" | "iq")
                && el.ns() == crate::stanza::ns::CLIENT =>
        {
            Ok(el)
        }
        Some(_) if !found.is_empty() => Err(XmlError::NotWellFormed("more than one stanza".into())),
        Some(el) => Err(XmlError::NotWellFormed(format!(
            "<{} xmlns='{}'/> is not a stanza",
            el.name(),
            el.ns()
        ))),
        None => Err(XmlError::NotWellFormed("no stanza".into())),
    }
}

/// Serializes an element to its XML bytes (no declaration).
pub fn to_bytes(element: &Element) -> Vec<u8> {
    let unprefixed;
    let element = if declares_prefixes(element) {
        let mut copy = element.clone();
        forget_prefixes(&mut copy);
        unprefixed = copy;
        &unprefixed
    } else {
        element
    };
    let mut out = Vec::with_capacity(256);
    element
        .write_to(&mut out)
        .expect("writing XML to a Vec cannot fail");
    // minidom writes a root in no namespace without `xmlns=''`; inside a stream whose default
    // namespace is jabber:client it would read back in that namespace, its children with it.
    // Found by the `inner_framing` fuzz target.
    if element.ns().is_empty() {
        let head = 1 + element.name().len();
        if out.get(1..head) == Some(element.name().as_bytes())
            && !out[head..].starts_with(b" xmlns=")
        {
            out.splice(head..head, b" xmlns=''".iter().copied());
        }
    }
    out
}

/// Whether an element or one of its descendants carries namespace declarations of its own.
fn declares_prefixes(element: &Element) -> bool {
    !element.prefixes.declared_prefixes().is_empty() || element.children().any(declares_prefixes)
}

/// Drops the prefix declarations an element tree was parsed with; names keep their namespaces.
///
/// minidom's writer replays the declarations it finds on each element and panics on some that
/// are valid XML: a descendant redeclaring a prefix of the root (even to the same namespace),
/// `xmlns:xml` stated explicitly, a prefix named like the writer's own `tns0`. Without them the
/// writer declares every namespace itself, which always yields the same names. Found by the
/// `inner_framing` fuzz target.
fn forget_prefixes(element: &mut Element) {
    element.prefixes = Default::default();
    for child in element.children_mut() {
        forget_prefixes(child);
    }
}

#[cfg(test)]
mod parse_stanza_tests {
    use super::*;

    #[test]
    fn an_element_in_no_namespace_keeps_it_when_written_and_read_again() {
        let mut reader = StreamReader::with_synthetic_root(XmlLimits::default());
        reader
            .feed(b"<iq xmlns='' type='result'><q>x</q></iq><message><x xmlns=''/></message>")
            .unwrap();
        let mut written = Vec::new();
        while let Some(XmlEvent::Element(el)) = reader.next_event() {
            written.extend(to_bytes(&el));
        }
        assert!(written.starts_with(b"<iq xmlns='' type='result'><q>x</q></iq>"));
        let mut again = StreamReader::with_synthetic_root(XmlLimits::default());
        again.feed(&written).unwrap();
        let Some(XmlEvent::Element(iq)) = again.next_event() else {
            panic!("an element")
        };
        assert_eq!(iq.ns(), "");
        assert_eq!(iq.get_child("q", "").map(|q| q.text()), Some("x".into()));
        let Some(XmlEvent::Element(message)) = again.next_event() else {
            panic!("an element")
        };
        assert!(message.get_child("x", "").is_some());
    }

    #[test]
    fn declarations_the_writer_would_refuse_are_written_as_its_own() {
        // Each of these once made minidom's writer panic on an element we had just parsed.
        for input in [
            "<iq xmlns:q='urn:q' q:a='en' type='result' id='r0'>\
             <q:query xmlns:q='urn:q' q:attr='v'><q>item</q></q:query></iq>",
            "<iq xmlns:q='urn:a' q:a='1'><q:query xmlns:q='urn:b'/></iq>",
            "<iq xmlns:xml='http://www.w3.org/XML/1998/namespace' xml:lang='en'/>",
            "<iq xmlns:tns0='urn:a' tns0:x='1'><c xmlns:z='urn:b' z:y='2'/></iq>",
        ] {
            let mut reader = StreamReader::with_synthetic_root(XmlLimits::default());
            reader.feed(input.as_bytes()).unwrap();
            let Some(XmlEvent::Element(el)) = reader.next_event() else {
                panic!("an element from {input}")
            };
            let written = to_bytes(&el);
            let mut again = StreamReader::with_synthetic_root(XmlLimits::default());
            again.feed(&written).unwrap();
            let Some(XmlEvent::Element(back)) = again.next_event() else {
                panic!("{} reads back", String::from_utf8_lossy(&written))
            };
            assert_eq!(back, el, "{input}");
        }
    }

    #[test]
    fn a_built_element_with_declarations_is_written_too() {
        let child = Element::builder("query", "urn:q")
            .prefix(Some("q".into()), "urn:q")
            .unwrap()
            .build();
        let el = Element::builder("iq", crate::stanza::ns::CLIENT)
            .prefix(Some("q".into()), "urn:q")
            .unwrap()
            .attr_ns("urn:q".into(), "a".try_into().unwrap(), "1")
            .append(child)
            .build();
        let written = String::from_utf8(to_bytes(&el)).unwrap();
        let back = parse_stanza(&written).unwrap();
        assert_eq!(
            back.get_child("query", "urn:q").map(Element::name),
            Some("query")
        );
    }

    #[test]
    fn one_stanza_in_the_client_namespace() {
        let el = parse_stanza("<message><body>hi</body></message>").unwrap();
        assert_eq!(el.ns(), "jabber:client");
        assert!(parse_stanza("<message/><message/>").is_err());
        assert!(parse_stanza("<message>").is_err());
        assert!(parse_stanza("<foo/>").is_err());
        assert!(parse_stanza("").is_err());
        assert!(parse_stanza("<!DOCTYPE x><message/>").is_err());
    }

    #[test]
    fn a_stanza_in_another_namespace_is_refused() {
        // Found by the `stanza` fuzz target: these parsed, and the peer then dropped them.
        for other in [
            "<x:iq xmlns:x='jabber:component:accept' type='get' id='1'/>",
            "<message xmlns='urn:other'><body>hi</body></message>",
            "<presence xmlns='jabber:server'/>",
        ] {
            assert!(parse_stanza(other).is_err(), "{other}");
        }
        let el = parse_stanza("<c:message xmlns:c='jabber:client'/>").unwrap();
        assert_eq!(el.ns(), "jabber:client");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elements(reader: &mut StreamReader) -> Vec<Element> {
        std::iter::from_fn(|| reader.next_event())
            .filter_map(|e| match e {
                XmlEvent::Element(el) => Some(el),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn synthetic_root_yields_stanzas_split_at_every_byte() {
        let input = b"<message type='chat' id='a'><body>hi &amp; bye</body></message> \n<iq xmlns='jabber:client' type='get' id='b'/>";
        let mut reader = StreamReader::with_synthetic_root(XmlLimits::default());
        let mut got = Vec::new();
        for byte in input {
            reader.feed(std::slice::from_ref(byte)).unwrap();
            got.extend(elements(&mut reader));
        }
        assert_eq!(got.len(), 2);
        assert!(got[0].is("message", "jabber:client"));
        assert_eq!(
            got[0].get_child("body", "jabber:client").unwrap().text(),
            "hi & bye"
        );
        assert!(got[1].is("iq", "jabber:client"));
    }

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept' id='abc'>";

    /// Feeds `body` after the stream header, in pieces of `step` bytes, to a reader that skips
    /// oversized elements; returns its events after the header.
    fn skipping_events(body: &str, step: usize) -> Vec<XmlEvent> {
        let limits = XmlLimits {
            max_element_bytes: 300,
            max_depth: 4,
        };
        let mut reader = StreamReader::new(limits)
            .rename_namespace("jabber:component:accept", "jabber:client")
            .skip_oversized();
        let input = format!("{HEADER}{body}");
        let mut events = Vec::new();
        for piece in input.as_bytes().chunks(step) {
            reader.feed(piece).unwrap();
            events.extend(std::iter::from_fn(|| reader.next_event()));
        }
        events.retain(|e| !matches!(e, XmlEvent::Header(_)));
        events
    }

    #[test]
    fn an_oversized_element_is_skipped_and_the_stream_goes_on() {
        let deep = format!(
            "<iq type='get' id='d' from='a@b/c' to='x@bots'>{}{}</iq>",
            "<x xmlns='urn:x'>".repeat(8),
            "</x>".repeat(8)
        );
        let big_text = format!("<message id='t'><body>{}</body></message>", "h".repeat(400));
        let many_children = format!("<message id='m'>{}</message>", "<a/>".repeat(100));
        let big_attr = format!(
            "<iq id='b' type='set' to='x@bots' from='a@b/c' z='{}' xmlns:p='urn:p'><p:q/></iq>",
            "v".repeat(400)
        );
        for oversized in [&deep, &big_text, &many_children, &big_attr] {
            let body = format!(
                "<message id='1'><body>one</body></message>{oversized}<presence id='2'><x xmlns='urn:y'/></presence>"
            );
            for step in [1, 7, body.len() + HEADER.len()] {
                let events = skipping_events(&body, step);
                assert_eq!(
                    events.len(),
                    3,
                    "{oversized} in steps of {step}: {events:?}"
                );
                let XmlEvent::Element(first) = &events[0] else {
                    panic!("{events:?}")
                };
                assert!(first.is("message", "jabber:client"));
                let XmlEvent::Skipped {
                    name,
                    attrs,
                    reason,
                } = &events[1]
                else {
                    panic!("{events:?}")
                };
                assert!(name == "iq" || name == "message", "{name}");
                assert!(attrs.iter().any(|(k, _)| k == "id"), "{attrs:?}");
                assert!(matches!(
                    reason,
                    XmlError::TooLarge(300) | XmlError::TooDeep(4)
                ));
                // The root was rebuilt: namespaces still resolve after the skipped element.
                let XmlEvent::Element(last) = &events[2] else {
                    panic!("{events:?}")
                };
                assert!(last.is("presence", "jabber:client"), "{last:?}");
                assert!(last.get_child("x", "urn:y").is_some());
            }
        }
    }

    #[test]
    fn the_stream_end_after_a_skipped_element_is_seen() {
        let body = format!("<message>{}</message></stream:stream>", "<a/>".repeat(100));
        let events = skipping_events(&body, 5);
        assert!(matches!(events[0], XmlEvent::Skipped { .. }));
        assert_eq!(events[1], XmlEvent::End);
    }

    #[test]
    fn without_skipping_a_limit_ends_the_stream() {
        let mut reader = StreamReader::new(XmlLimits {
            max_element_bytes: 300,
            max_depth: 4,
        });
        reader.feed(HEADER.as_bytes()).unwrap();
        let err = reader
            .feed(format!("<message>{}</message>", "<a/>".repeat(100)).as_bytes())
            .unwrap_err();
        assert_eq!(err, XmlError::TooLarge(300));
    }

    #[test]
    fn an_element_named_stream_in_another_namespace_is_no_header() {
        for element in [
            "<stream xmlns='urn:example:media'><track/></stream>",
            "<x:stream xmlns:x='urn:example:media'/>",
            "<stream/>",
        ] {
            let mut reader = StreamReader::with_synthetic_root(XmlLimits::default());
            reader.feed(element.as_bytes()).unwrap();
            assert!(
                matches!(reader.next_event(), Some(XmlEvent::Element(e)) if e.name() == "stream"),
                "{element}"
            );
        }
    }

    #[test]
    fn a_stream_header_inside_a_tunnel_is_refused() {
        for header in [
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='x'>",
            "<s:stream xmlns:s='http://etherx.jabber.org/streams'>",
        ] {
            let mut reader = StreamReader::with_synthetic_root(XmlLimits::default());
            assert!(
                matches!(
                    reader.feed(header.as_bytes()),
                    Err(XmlError::NotWellFormed(_))
                ),
                "{header}"
            );
        }
    }

    #[test]
    fn server_stream_reports_header_and_renames_namespace() {
        let mut reader = StreamReader::new(XmlLimits::default())
            .rename_namespace("jabber:component:accept", "jabber:client");
        reader
            .feed(b"<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='jabber:component:accept' id='abc' from='bots.localhost'><handshake/><message to='a@b'/></stream:stream>")
            .unwrap();
        let header = match reader.next_event() {
            Some(XmlEvent::Header(attrs)) => attrs,
            other => panic!("expected header, got {other:?}"),
        };
        assert!(header.contains(&("id".to_owned(), "abc".to_owned())));
        let els = [reader.next_event(), reader.next_event()];
        for el in &els {
            match el {
                Some(XmlEvent::Element(el)) => assert_eq!(el.ns(), "jabber:client"),
                other => panic!("expected element, got {other:?}"),
            }
        }
        assert_eq!(reader.next_event(), Some(XmlEvent::End));
    }

    #[test]
    fn doctype_entities_and_declarations_inside_are_rejected() {
        for bad in [
            &b"<!DOCTYPE x [<!ENTITY a 'b'>]><message/>"[..],
            b"<message>&lol;</message>",
            b"<?xml version='1.0'?><message/>",
            b"<!-- c --><message/>",
            b"hello<message/>",
        ] {
            let mut reader = StreamReader::with_synthetic_root(XmlLimits::default());
            assert!(
                reader.feed(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn limits_are_enforced() {
        let limits = XmlLimits {
            max_element_bytes: 100,
            max_depth: 3,
        };
        let mut reader = StreamReader::with_synthetic_root(limits);
        let big = format!("<message><body>{}</body></message>", "x".repeat(200));
        assert_eq!(reader.feed(big.as_bytes()), Err(XmlError::TooLarge(100)));
        let mut reader = StreamReader::with_synthetic_root(limits);
        assert_eq!(
            reader.feed(b"<a><b><c><d/></c></b></a>"),
            Err(XmlError::TooDeep(3))
        );
        let mut reader = StreamReader::with_synthetic_root(limits);
        reader.feed(b"<a><b><c/></b></a>").unwrap();
        assert_eq!(elements(&mut reader).len(), 1);
    }

    #[test]
    fn the_root_head_is_no_stanza_s_bytes() {
        // Found by the `inner_framing` fuzz target: the synthetic root's 84 bytes counted
        // against the first inner stanza, and a limit below them panicked in the constructor.
        let stanza = b"<message><body>0123456789</body></message>";
        let limits = XmlLimits {
            max_element_bytes: stanza.len(),
            max_depth: 4,
        };
        let mut reader = StreamReader::with_synthetic_root(limits);
        reader.feed(b"\n  \n").unwrap();
        reader.feed(stanza).unwrap();
        assert_eq!(elements(&mut reader).len(), 1);
        let mut reader = StreamReader::with_synthetic_root(XmlLimits {
            max_element_bytes: 8,
            max_depth: 4,
        });
        assert_eq!(reader.feed(stanza), Err(XmlError::TooLarge(8)));
        // The server's stream header does not count either.
        let mut reader = StreamReader::new(limits);
        let header = format!(
            "<stream:stream xmlns='jabber:component:accept' xmlns:stream='http://etherx.jabber.org/streams' id='{}'>",
            "x".repeat(100)
        );
        reader.feed(header.as_bytes()).unwrap();
        reader.feed(stanza).unwrap();
        assert!(matches!(reader.next_event(), Some(XmlEvent::Header(_))));
        assert_eq!(elements(&mut reader).len(), 1);
    }

    #[test]
    fn whitespace_keepalives_do_not_accumulate() {
        let mut reader = StreamReader::with_synthetic_root(XmlLimits::default());
        for _ in 0..1000 {
            reader.feed(b" ").unwrap();
        }
        reader.feed(b"<presence/>").unwrap();
        assert_eq!(elements(&mut reader).len(), 1);
        assert_eq!(reader.pending_bytes(), 0);
    }
}
