//! Finding an address in the component's domain whose stanzas the server routes back to this
//! very connection (docs/protocol.md §3.7).
//!
//! A server that spreads one domain over several connections (ejabberd's `domain_balancing`)
//! routes each stanza by its destination, and a reply to the bare domain lands on one fixed
//! connection. So the link sends itself probes: messages from the domain to random addresses
//! in it. The first probe that comes back names an address that reaches this connection (the
//! *anchor*); keepalive pings are sent from it, so their answers come back here whichever
//! connection the domain's own replies reach. When no probe comes back at all, the server
//! routes nothing to this connection (ejabberd: more connections than `component_number`).
//!
//! With one connection per domain (Prosody, or ejabberd without balancing) the first probe
//! comes back at once. This is sans-IO: it builds stanzas and reads them; the link sends them.
//!
//! A *route* probe asks the same of one bot's address: sent to the bot's JID, it comes back
//! to this connection only if the server routes that bot's stanzas here ([`route_probe`]).
//! The link passes route probes up like any stanza; the router answers them.

use std::time::Duration;

use minidom::Element;
use xtls::stanza::{name, ns};

/// The namespace of the probes; never seen outside the component's own domain.
pub const NS_SLOT: &str = "urn:xmpp:tmp:xtls-component:slot";

/// Probes sent at once; with N connections sharing the domain each one comes back with
/// probability 1/N.
const ROUND: u32 = 16;
/// Rounds before concluding that nothing reaches this connection: 256 probes, which all
/// miss a connection that has a slot with probability (1 - 1/N)^256 (under 10^-3 for N = 32).
const ROUNDS: u32 = 16;
/// How long one round waits for a probe to come back.
pub const ROUND_WAIT: Duration = Duration::from_secs(1);

/// The id prefix of route probes; anchor probes' ids start with `slot-`.
const ROUTE_PREFIX: &str = "route-";

/// A probe to `to` (a bot's JID) from `domain`, with a fresh id: the id, and the stanza.
pub fn route_probe(domain: &str, to: &str) -> (String, Element) {
    let id = format!("{ROUTE_PREFIX}{:016x}", rand::random::<u64>());
    let stanza = probe(domain, to, &id);
    (id, stanza)
}

/// A probe: a message from the domain to `to`, known by its `id`.
fn probe(domain: &str, to: &str, id: &str) -> Element {
    Element::builder("message", ns::CLIENT)
        .attr(name("from"), domain)
        .attr(name("to"), to)
        .attr(name("id"), id)
        .append(Element::bare("slot", NS_SLOT))
        .build()
}

/// The id of a route probe that reached this connection, if `stanza` is one. Only the
/// domain itself can send one: the server stamps every other sender's address.
pub fn route_probe_id<'s>(stanza: &'s Element, domain: &str) -> Option<&'s str> {
    (stanza.name() == "message"
        && stanza.attr("from") == Some(domain)
        && stanza.has_child("slot", NS_SLOT))
    .then(|| stanza.attr("id"))
    .flatten()
    .filter(|id| id.starts_with(ROUTE_PREFIX))
}

/// What an inbound stanza is to the probe.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// Not a probe: an ordinary stanza for the router.
    Stanza,
    /// One of this connection's probes, back: its destination reaches this connection.
    Ours(String),
    /// Another connection's probe (or one of an earlier connection): dropped.
    Other,
}

/// One connection's search for its anchor.
#[derive(Debug)]
pub struct SlotProbe {
    domain: String,
    prefix: String,
    sent: u32,
}

impl SlotProbe {
    /// A search with fresh random addresses, for one connection to `domain`.
    pub fn new(domain: &str) -> SlotProbe {
        SlotProbe {
            domain: domain.to_owned(),
            prefix: format!("slot-{:016x}-", rand::random::<u64>()),
            sent: 0,
        }
    }

    /// How many probes were sent so far.
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// The next round of probes to send, or `None` once every round went unanswered.
    pub fn next_round(&mut self) -> Option<Vec<Element>> {
        if self.sent >= ROUND * ROUNDS {
            return None;
        }
        let round = (self.sent..self.sent + ROUND)
            .map(|n| {
                let local = format!("{}{n}", self.prefix);
                probe(&self.domain, &format!("{local}@{}", self.domain), &local)
            })
            .collect();
        self.sent += ROUND;
        Some(round)
    }

    /// Tells a probe (this connection's or another's) from an ordinary stanza. Only the
    /// domain itself can send a probe: the server stamps every other sender's address.
    pub fn classify(&self, stanza: &Element) -> Probe {
        if stanza.name() != "message"
            || stanza.attr("from") != Some(self.domain.as_str())
            || !stanza.has_child("slot", NS_SLOT)
            || route_probe_id(stanza, &self.domain).is_some()
        {
            return Probe::Stanza;
        }
        let Some(to) = stanza.attr("to") else {
            return Probe::Other;
        };
        let ours = to
            .split_once('@')
            .filter(|(local, domain)| {
                *domain == self.domain
                    && stanza.attr("id") == Some(local)
                    && local
                        .strip_prefix(self.prefix.as_str())
                        .and_then(|n| n.parse::<u32>().ok())
                        .is_some_and(|n| n < self.sent)
            })
            .is_some();
        if ours {
            Probe::Ours(to.to_owned())
        } else {
            Probe::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(el: &mut Element, attr: &'static str, value: impl Into<String>) {
        el.set_attr(rxml::Namespace::NONE, name(attr), value.into());
    }

    fn back(probe: &Element) -> Element {
        // What the server delivers: the same stanza, maybe with attributes added.
        let mut el = probe.clone();
        set(&mut el, "type", "normal");
        el
    }

    #[test]
    fn a_probe_that_comes_back_names_the_anchor() {
        let mut probe = SlotProbe::new("bots.example.org");
        let round = probe.next_round().unwrap();
        assert_eq!(round.len(), ROUND as usize);
        let third = &round[2];
        let to = third.attr("to").unwrap().to_owned();
        assert!(to.ends_with("@bots.example.org"), "{to}");
        assert_eq!(probe.classify(&back(third)), Probe::Ours(to));
    }

    #[test]
    fn another_connections_probe_is_not_ours() {
        let mut ours = SlotProbe::new("bots.example.org");
        let mut theirs = SlotProbe::new("bots.example.org");
        ours.next_round().unwrap();
        let round = theirs.next_round().unwrap();
        assert_eq!(ours.classify(&round[0]), Probe::Other);
    }

    #[test]
    fn only_the_domain_can_probe() {
        let mut probe = SlotProbe::new("bots.example.org");
        let mut forged = probe.next_round().unwrap().remove(0);
        set(&mut forged, "from", "mallory@example.net/x");
        assert_eq!(probe.classify(&forged), Probe::Stanza);
        let plain: Element =
            "<message xmlns='jabber:client' from='bots.example.org' to='echo@bots.example.org'/>"
                .parse()
                .unwrap();
        assert_eq!(probe.classify(&plain), Probe::Stanza);
    }

    #[test]
    fn an_unsent_number_or_a_changed_id_is_not_ours() {
        let mut probe = SlotProbe::new("bots.example.org");
        let round = probe.next_round().unwrap();
        let mut ahead = round[0].clone();
        let unsent = format!("{}{}", probe.prefix, ROUND + 5);
        set(&mut ahead, "to", format!("{unsent}@bots.example.org"));
        set(&mut ahead, "id", unsent);
        assert_eq!(probe.classify(&ahead), Probe::Other);
        let mut renamed = round[0].clone();
        set(&mut renamed, "id", "something-else");
        assert_eq!(probe.classify(&renamed), Probe::Other);
    }

    #[test]
    fn a_route_probe_passes_the_link_and_is_known_by_its_id() {
        let mut anchor = SlotProbe::new("bots.example.org");
        anchor.next_round().unwrap();
        let (id, probe) = route_probe("bots.example.org", "echo@bots.example.org");
        assert_eq!(anchor.classify(&back(&probe)), Probe::Stanza);
        assert_eq!(
            route_probe_id(&back(&probe), "bots.example.org"),
            Some(id.as_str())
        );
        assert_eq!(route_probe_id(&probe, "other.example.org"), None);
        let mut forged = probe.clone();
        set(&mut forged, "from", "mallory@example.net/x");
        assert_eq!(route_probe_id(&forged, "bots.example.org"), None);
        let anchor_probe = anchor.next_round().unwrap().remove(0);
        assert_eq!(route_probe_id(&anchor_probe, "bots.example.org"), None);
    }

    #[test]
    fn rounds_run_out() {
        let mut probe = SlotProbe::new("bots.example.org");
        let mut rounds = 0;
        while probe.next_round().is_some() {
            rounds += 1;
        }
        assert_eq!(rounds, ROUNDS);
        assert_eq!(probe.sent(), ROUND * ROUNDS);
    }
}
