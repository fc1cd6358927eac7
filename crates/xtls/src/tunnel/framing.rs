//! The plaintext inside a tunnel (spec §1.9): a stream of stanzas under a synthetic root,
//! read incrementally with size and depth caps, routing restored before delivery.

use minidom::Element;

use std::collections::VecDeque;

use super::{CloseReason, Event, SendError, Tunnel, TunnelKey, bare};
use crate::stanza::{DefinedCondition, ErrorType, error_element, ns, remove_attr, set_attr};
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
        let mut overloaded = false;
        while let Some(event) = inner.next_event() {
            if let crate::xml::XmlEvent::Element(stanza) = event
                && let Some(stanza) = self.restore_routing(stanza)
            {
                self.stats.stanzas_in += 1;
                match self.inner_iqs.on_receive(&stanza) {
                    Received::Deliver => self.events.push_back(Event::Stanza(stanza)),
                    Received::Unsolicited => {
                        tracing::debug!(tunnel = %self.key, "inner IQ answer to no request dropped");
                    }
                    // Answered here, so the peer still gets exactly one answer; but a peer that
                    // asks faster than it takes our answers does not get a growing queue.
                    Received::TooMany if self.out_bytes.len() >= self.config.max_queued_out => {
                        overloaded = true;
                    }
                    Received::TooMany => {
                        let answer = self.inner_iqs.refusal(&stanza);
                        overloaded |= !self.answer_inside(answer);
                    }
                }
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
        fed.map_err(|e| CloseReason::InnerXml(e.to_string()))?;
        if overloaded {
            return Err(CloseReason::Overloaded);
        }
        Ok(())
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

/// Inner IQ requests still awaiting an answer, each way, with a cap so a peer cannot make a
/// tunnel remember without bound.
#[derive(Debug, Default)]
pub(super) struct InnerIqs {
    /// Ids of our requests the peer has not answered.
    ours: VecDeque<String>,
    /// Ids of the peer's requests we have not answered.
    theirs: VecDeque<String>,
}

impl InnerIqs {
    /// Gives back the memory of an empty direction (see `Tunnel::release_idle_queues`).
    pub(super) fn release_idle(&mut self) {
        for queue in [&mut self.ours, &mut self.theirs] {
            if queue.is_empty() && queue.capacity() > 0 {
                *queue = VecDeque::new();
            }
        }
    }
}

/// What sending an inner stanza changes in the bookkeeping.
pub(super) enum SentIq {
    /// Our request with this id now awaits the peer's answer.
    Request(String),
    /// It answers the peer's request at this place in the queue.
    Answer(usize),
    /// Not an IQ request or answer.
    NotAnIq,
}

/// What to do with an inner stanza the peer sent.
pub(super) enum Received {
    /// Hand it to the owner.
    Deliver,
    /// An answer to nothing we asked: drop it.
    Unsolicited,
    /// A request beyond the cap: answer it here.
    TooMany,
}

impl InnerIqs {
    /// Requests remembered each way, at most.
    const CAP: usize = 256;

    /// The request or answer kind of an inner IQ, with its id.
    fn kind(stanza: &Element) -> Option<(bool, &str)> {
        if stanza.name() != "iq" || stanza.ns() != ns::CLIENT {
            return None;
        }
        let request = match stanza.attr("type") {
            Some("get" | "set") => true,
            Some("result" | "error") => false,
            _ => return None,
        };
        Some((request, stanza.attr("id").unwrap_or_default()))
    }

    /// Whether `stanza` may be sent, and what sending it will change ([`Self::record_send`]).
    pub(super) fn check_send(&self, stanza: &Element) -> Result<SentIq, SendError> {
        match Self::kind(stanza) {
            Some((true, _)) if self.ours.len() >= Self::CAP => Err(SendError::TooManyRequests),
            Some((true, id)) => Ok(SentIq::Request(id.to_owned())),
            Some((false, id)) => match self.theirs.iter().position(|p| p == id) {
                Some(at) => Ok(SentIq::Answer(at)),
                None => Err(SendError::NotAwaited),
            },
            None => Ok(SentIq::NotAnIq),
        }
    }

    /// Records a stanza [`Self::check_send`] allowed, once it is written.
    pub(super) fn record_send(&mut self, sent: SentIq) {
        match sent {
            SentIq::Request(id) => self.ours.push_back(id),
            SentIq::Answer(at) => {
                self.theirs.remove(at);
            }
            SentIq::NotAnIq => {}
        }
    }

    pub(super) fn on_receive(&mut self, stanza: &Element) -> Received {
        match Self::kind(stanza) {
            Some((true, id)) => {
                if self.theirs.len() >= Self::CAP {
                    return Received::TooMany;
                }
                self.theirs.push_back(id.to_owned());
                Received::Deliver
            }
            Some((false, id)) => match self.ours.iter().position(|p| p == id) {
                Some(at) => {
                    self.ours.remove(at);
                    Received::Deliver
                }
                None => Received::Unsolicited,
            },
            None => Received::Deliver,
        }
    }

    /// The inner `resource-constraint` answering a request beyond the cap.
    pub(super) fn refusal(&self, request: &Element) -> Element {
        answer_to(
            request.attr("id").unwrap_or_default(),
            error_element(
                ErrorType::Wait,
                DefinedCondition::ResourceConstraint,
                "too many requests await an answer in this tunnel",
            ),
        )
    }

    /// Local errors for our requests still unanswered, as if from the peer; forgets them.
    pub(super) fn unanswered(&mut self, key: &TunnelKey) -> Vec<Element> {
        self.ours
            .drain(..)
            .map(|id| {
                let mut answer = answer_to(
                    &id,
                    error_element(
                        ErrorType::Cancel,
                        DefinedCondition::RecipientUnavailable,
                        "the tunnel closed before the peer answered",
                    ),
                );
                set_attr(&mut answer, "from", &key.peer);
                set_attr(&mut answer, "to", &key.local);
                answer
            })
            .collect()
    }
}

/// An inner `<iq type='error'/>` with `id`, carrying `error`.
fn answer_to(id: &str, error: Element) -> Element {
    let mut iq = Element::builder("iq", ns::CLIENT).build();
    set_attr(&mut iq, "type", "error");
    set_attr(&mut iq, "id", id);
    iq.append_child(error);
    iq
}

impl Tunnel {
    /// Writes an inner stanza of our own making (an answer the owner never sees); `false`
    /// when TLS would not take it.
    fn answer_inside(&mut self, mut stanza: Element) -> bool {
        remove_attr(&mut stanza, "from");
        remove_attr(&mut stanza, "to");
        let bytes = crate::xml::to_bytes(&stanza);
        let written = self
            .tls
            .as_mut()
            .is_some_and(|tls| tls.write_plaintext(&bytes).is_ok());
        if written {
            self.stats.stanzas_out += 1;
        }
        written
    }
}
