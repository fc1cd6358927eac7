//! Feeding a `StreamReader` in arbitrary splits, and the checks both XML targets share.

use minidom::{Element, Node};
use xtls::xml::{StreamReader, XmlError, XmlEvent, XmlLimits, to_bytes};

/// What a reader produced from a whole input: its events (elements serialized) and how it
/// stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Headers, serialized elements and ends, in order.
    pub events: Vec<Seen>,
    /// The first error `feed` returned, if any.
    pub error: Option<XmlError>,
}

/// One event, comparable across readers.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// The root's attributes.
    Header(Vec<(String, String)>),
    /// One depth-1 element, as `xml::to_bytes` writes it.
    Element(Vec<u8>),
    /// An element over a limit, dropped by a reader made with `skip_oversized`.
    Skipped {
        name: String,
        attrs: Vec<(String, String)>,
        reason: XmlError,
    },
    /// The root closed.
    End,
}

/// Chunk lengths from a seed: 1 to 64 bytes, or the whole rest when the seed says so.
pub fn chunks(bytes: &[u8], seed: u8) -> Vec<&[u8]> {
    if seed == 0 {
        return vec![bytes];
    }
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state % 64) as usize + 1;
        let (head, tail) = rest.split_at(n.min(rest.len()));
        out.push(head);
        rest = tail;
    }
    out
}

/// Feeds `parts` one `feed` call each, checking after every call what must hold for any
/// reader, and collects what it produced. `on_element` sees every element. `skipping`: the
/// reader was made with `skip_oversized` (a limit drops one element, not the stream).
pub fn feed(
    reader: &mut StreamReader,
    limits: XmlLimits,
    skipping: bool,
    parts: &[&[u8]],
    mut on_element: impl FnMut(&Element),
) -> Outcome {
    let mut outcome = Outcome {
        events: Vec::new(),
        error: None,
    };
    for part in parts {
        let fed = reader.feed(part);
        while let Some(event) = reader.next_event() {
            outcome.events.push(match event {
                XmlEvent::Header(attrs) => Seen::Header(attrs),
                XmlEvent::End => Seen::End,
                XmlEvent::Element(el) => {
                    assert!(
                        depth(&el) <= limits.max_depth,
                        "an element deeper than max_depth {} was emitted",
                        limits.max_depth
                    );
                    on_element(&el);
                    Seen::Element(to_bytes(&el))
                }
                XmlEvent::Skipped {
                    name,
                    attrs,
                    reason,
                } => {
                    assert!(skipping, "Skipped from a reader that does not skip");
                    assert!(
                        matches!(reason, XmlError::TooLarge(_) | XmlError::TooDeep(_)),
                        "skipped for {reason:?}"
                    );
                    Seen::Skipped {
                        name,
                        attrs,
                        reason,
                    }
                }
            });
        }
        match fed {
            // A skipping reader counts past the limit while it drops the element.
            Ok(()) if skipping => {}
            Ok(()) => assert!(
                reader.pending_bytes() <= limits.max_element_bytes,
                "{} bytes of one element buffered, limit {}",
                reader.pending_bytes(),
                limits.max_element_bytes
            ),
            Err(err) => {
                // Every error is fatal and sticky.
                assert_eq!(reader.feed(b"<message/>"), Err(err.clone()));
                assert!(reader.next_event().is_none(), "events after an error");
                outcome.error = Some(err);
                break;
            }
        }
    }
    outcome
}

/// Whole input and split input must read the same. A reader that saw its root end refuses
/// later bytes with `Ended` while the same bytes in one call are simply not read, so `Ended`
/// after `End` counts as no error.
pub fn assert_split_invariant(whole: &Outcome, split: &Outcome) {
    let normalize = |o: &Outcome| {
        let mut o = o.clone();
        if o.error == Some(XmlError::Ended) && o.events.last() == Some(&Seen::End) {
            o.error = None;
        }
        o
    };
    assert_eq!(
        normalize(whole),
        normalize(split),
        "reading in one piece and in pieces disagree"
    );
}

/// An element as XML means it: attribute order, prefixes and the split of character data
/// into text nodes do not count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Canon {
    name: String,
    ns: String,
    attrs: Vec<(String, String, String)>,
    content: Vec<CanonNode>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CanonNode {
    Element(Canon),
    Text(String),
}

impl Canon {
    /// The canonical form of `el`.
    pub fn of(el: &Element) -> Canon {
        let mut attrs: Vec<(String, String, String)> = el
            .attrs()
            .iter()
            .map(|((ns, name), value)| {
                let ns: &str = ns;
                let name: &str = name;
                (ns.to_owned(), name.to_owned(), value.clone())
            })
            .collect();
        attrs.sort();
        let mut content: Vec<CanonNode> = Vec::new();
        for node in el.nodes() {
            match node {
                Node::Element(child) => content.push(CanonNode::Element(Canon::of(child))),
                Node::Text(text) => match content.last_mut() {
                    Some(CanonNode::Text(prev)) => prev.push_str(text),
                    _ => content.push(CanonNode::Text(text.clone())),
                },
            }
        }
        content.retain(|n| !matches!(n, CanonNode::Text(t) if t.is_empty()));
        Canon {
            name: el.name().to_owned(),
            ns: el.ns(),
            attrs,
            content,
        }
    }
}

/// Serializing an element and reading it back gives the same element.
///
/// Read back where the component reads stanzas, under a root whose default namespace is
/// `jabber:client`; a top-level element in no namespace (`xmlns=''` in the input) included:
/// `to_bytes` declares `xmlns=''` on it (this harness once skipped such elements and checked
/// their children alone, out of their context: that found nothing but itself).
///
/// A top-level element named `stream`, in any namespace, is not checked either: the tunnel
/// reader refuses it as a stream header (spec §1.9 rule 1).
pub fn assert_round_trip(el: &Element, max_depth: usize) {
    if el.name() == "stream" {
        return;
    }
    let bytes = to_bytes(el);
    let limits = XmlLimits {
        max_element_bytes: usize::MAX / 2,
        max_depth,
    };
    let mut reader = StreamReader::with_synthetic_root(limits);
    let fed = reader.feed(&bytes);
    let mut again = Vec::new();
    while let Some(event) = reader.next_event() {
        if let XmlEvent::Element(el) = event {
            again.push(Canon::of(&el));
        }
    }
    assert_eq!(
        fed,
        Ok(()),
        "serialized element does not read back: {}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(
        again,
        vec![Canon::of(el)],
        "serialization does not round-trip: {}",
        String::from_utf8_lossy(&bytes)
    );
}

/// Nesting depth below the element itself (a leaf is 1).
pub fn depth(el: &Element) -> usize {
    1 + el.children().map(depth).max().unwrap_or(0)
}
