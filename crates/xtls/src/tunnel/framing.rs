//! The plaintext inside a tunnel (spec §1.9): a stream of stanzas under a synthetic root,
//! read incrementally with size and depth caps, routing restored before delivery.

use minidom::Element;

use super::{CloseReason, Event, Tunnel, bare};
use crate::stanza::{ns, set_attr};
use crate::xml::{StreamReader, XmlLimits};

impl Tunnel {
    /// Parses plaintext into stanzas and queues them as events.
    pub(super) fn deliver_plaintext(&mut self, plaintext: &[u8]) -> Result<(), CloseReason> {
        if plaintext.is_empty() {
            return Ok(());
        }
        let max_inner_stanza = self.config.max_inner_stanza;
        let mut inner = self.inner.take().unwrap_or_else(|| {
            Box::new(StreamReader::with_synthetic_root(XmlLimits {
                max_element_bytes: max_inner_stanza,
                max_depth: 32,
            }))
        });
        let fed = inner.feed(plaintext);
        while let Some(event) = inner.next_event() {
            if let crate::xml::XmlEvent::Element(stanza) = event
                && let Some(stanza) = self.restore_routing(stanza)
            {
                self.stats.stanzas_in += 1;
                self.events.push_back(Event::Stanza(stanza));
            }
        }
        // Keep the reader only while a stanza is under way: the bytes end with the `>` of a
        // complete top-level element (and at most whitespace, which carries nothing).
        let ends_a_stanza = plaintext
            .iter()
            .rev()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'>');
        if fed.is_err() || !(ends_a_stanza && inner.at_rest()) {
            self.inner = Some(inner);
        }
        fed.map_err(|e| CloseReason::InnerXml(e.to_string()))
    }

    /// Spec §1.9 rules 4 and 5.
    pub(super) fn restore_routing(&self, mut stanza: Element) -> Option<Element> {
        if stanza.ns() != ns::CLIENT || !matches!(stanza.name(), "message" | "presence" | "iq") {
            tracing::debug!(tunnel = %self.key, element = stanza.name(), "non-stanza element in tunnel ignored");
            return None;
        }
        // Addresses compare as JIDs, normalized (RFC 7622 preparation): `Alice@Example.NET`
        // is `alice@example.net`, the form the key holds.
        if let Some(from) = stanza.attr("from")
            && jid::Jid::new(from).map_or(true, |j| j.to_bare().to_string() != bare(&self.key.peer))
        {
            tracing::warn!(tunnel = %self.key, from, "inner stanza from another JID dropped");
            return None;
        }
        if let Some(to) = stanza.attr("to")
            && jid::Jid::new(to).map_or(true, |j| {
                let j = j.to_string();
                j != self.key.local && j != bare(&self.key.local)
            })
        {
            tracing::warn!(tunnel = %self.key, to, "inner stanza to another JID dropped");
            return None;
        }
        set_attr(&mut stanza, "from", &self.key.peer);
        set_attr(&mut stanza, "to", &self.key.local);
        Some(stanza)
    }
}
