//! Two tunnels paired in memory with a fake clock: the conformance checks of spec §1.17.

use std::collections::VecDeque;
use std::sync::OnceLock;

use std::time::Duration;

use super::*;
use crate::certs::BotIdentity;
use crate::certs::Fingerprint;
use crate::stanza::encode_data;
use crate::stanza::xtls::MAX_CHUNK_ACCEPTED;
use crate::stanza::{chat_message, ns, set_attr};

const ALICE: &str = "alice@example.net/laptop";
const BOT: &str = "weather@bots.example.org";

fn creds(jid: &str) -> BotCredentials {
    // Key generation is the slow part of these tests: one identity per JID per test binary.
    static CACHE: OnceLock<std::sync::Mutex<Vec<(String, BotCredentials)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap();
    if let Some((_, c)) = cache.iter().find(|(j, _)| j == jid) {
        return c.clone();
    }
    let c = BotCredentials::new(BotIdentity::generate(jid).unwrap()).unwrap();
    cache.push((jid.to_owned(), c.clone()));
    c
}

struct Side {
    creds: BotCredentials,
    policy: PeerPolicy,
    key: TunnelKey,
    tunnel: Option<Tunnel>,
    events: Vec<Event>,
    /// Replies produced outside any tunnel (refusals).
    out: VecDeque<Element>,
    next_prefix: u32,
}

impl Side {
    fn new(local: &str, peer: &str, cert_jid: &str) -> Side {
        Side {
            creds: creds(cert_jid),
            policy: PeerPolicy::default(),
            key: TunnelKey {
                local: local.into(),
                peer: peer.into(),
            },
            tunnel: None,
            events: Vec::new(),
            out: VecDeque::new(),
            next_prefix: 0,
        }
    }

    fn prefix(&mut self) -> String {
        self.next_prefix += 1;
        format!("{}-{}-", bare(&self.key.local), self.next_prefix)
    }

    fn params(&self, config: &TunnelConfig, id_prefix: String) -> TunnelParams {
        TunnelParams {
            config: config.clone(),
            key: self.key.clone(),
            creds: self.creds.clone(),
            policy: self.policy.clone(),
            id_prefix,
        }
    }

    fn tunnel(&mut self) -> &mut Tunnel {
        self.tunnel.as_mut().expect("a tunnel exists")
    }

    fn state(&self) -> Option<State> {
        self.tunnel.as_ref().map(Tunnel::state)
    }

    fn drain(&mut self) -> Vec<Element> {
        let mut out: Vec<Element> = self.out.drain(..).collect();
        if let Some(t) = self.tunnel.as_mut() {
            while let Some(el) = t.poll_transmit() {
                out.push(el);
            }
            while let Some(ev) = t.poll_event() {
                self.events.push(ev);
            }
        }
        out
    }

    fn deliver(&mut self, now: Instant, config: &TunnelConfig, el: &Element) {
        let iq = Iq::parse(el).expect("tunnels only send IQs");
        if iq.type_ == IqType::Set
            && let Ok(XtlsElement::Start { offer }) = classify_request(&iq)
        {
            match decide_start(self.tunnel.as_ref()) {
                StartDecision::Accept => {}
                StartDecision::Conflict => {
                    self.out
                        .push_back(iq.error(ErrorType::Cancel, DefinedCondition::Conflict, ""));
                    return;
                }
                StartDecision::Replace => {
                    let t = self.tunnel.as_mut().expect("a live tunnel");
                    t.abandon(CloseReason::Replaced);
                    while let Some(ev) = t.poll_event() {
                        self.events.push(ev);
                    }
                }
            }
            let prefix = self.prefix();
            match Tunnel::accept(now, self.params(config, prefix), &iq, offer.as_ref()) {
                Ok(t) => self.tunnel = Some(t),
                Err(refusal) => self.out.push_back(refusal.reply),
            }
            return;
        }
        match self.tunnel.as_mut() {
            Some(t) if !t.is_gone() => t.handle_iq(now, &iq),
            _ if iq.type_.is_request() => {
                self.out
                    .push_back(iq.error(ErrorType::Cancel, DefinedCondition::ItemNotFound, ""))
            }
            _ => {}
        }
    }

    fn stanzas(&self) -> Vec<&Element> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Stanza(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn closed(&self) -> Option<&CloseReason> {
        self.events.iter().find_map(|e| match e {
            Event::Closed(r) => Some(r),
            _ => None,
        })
    }
}

/// Alice (initiator, a client) and the weather bot (responder), with a wire log.
struct Pair {
    now: Instant,
    config: TunnelConfig,
    alice: Side,
    bot: Side,
    /// Every stanza that crossed, with its direction (true = alice to bot).
    wire: Vec<(bool, Element)>,
}

impl Pair {
    fn new() -> Pair {
        Pair::between(ALICE, "alice@example.net")
    }

    /// A pair whose client side has another JID (the bot is always [`BOT`]).
    fn between(client: &str, client_cert: &str) -> Pair {
        Pair {
            now: Instant::now(),
            config: TunnelConfig::default(),
            alice: Side::new(client, BOT, client_cert),
            bot: Side::new(BOT, client, BOT),
            wire: Vec::new(),
        }
    }

    /// The bot side initiates too (it sends its own `start`).
    fn bot_starts(&mut self) {
        let prefix = self.bot.prefix();
        let params = self.bot.params(&self.config, prefix);
        self.bot.tunnel = Some(Tunnel::initiate(self.now, params));
    }

    fn start(&mut self) {
        let prefix = self.alice.prefix();
        let params = self.alice.params(&self.config, prefix);
        self.alice.tunnel = Some(Tunnel::initiate(self.now, params));
    }

    /// Moves everything queued on both sides once; returns whether anything moved.
    fn step_with(&mut self, mut tamper: impl FnMut(bool, Element) -> Option<Element>) -> bool {
        let from_alice = self.alice.drain();
        let from_bot = self.bot.drain();
        let moved = !from_alice.is_empty() || !from_bot.is_empty();
        for el in from_alice {
            if let Some(el) = tamper(true, el) {
                self.wire.push((true, el.clone()));
                self.bot.deliver(self.now, &self.config, &el);
            }
        }
        for el in from_bot {
            if let Some(el) = tamper(false, el) {
                self.wire.push((false, el.clone()));
                self.alice.deliver(self.now, &self.config, &el);
            }
        }
        moved
    }

    fn drive_with(&mut self, mut tamper: impl FnMut(bool, Element) -> Option<Element>) {
        for _ in 0..1000 {
            if !self.step_with(&mut tamper) {
                self.alice.drain();
                self.bot.drain();
                return;
            }
        }
        panic!("pair did not settle");
    }

    fn drive(&mut self) {
        self.drive_with(|_, el| Some(el));
    }

    fn open(&mut self) {
        self.start();
        self.drive();
        self.assert_open("");
    }

    /// Asserts both ends are open, showing each end's events otherwise.
    fn assert_open(&self, label: &str) {
        let alice = &self.alice;
        let bot = &self.bot;
        assert_eq!(
            alice.state(),
            Some(State::Open),
            "{label} alice: {:?}",
            alice.events
        );
        assert_eq!(
            bot.state(),
            Some(State::Open),
            "{label} bot: {:?}",
            bot.events
        );
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        for side in [&mut self.alice, &mut self.bot] {
            if let Some(t) = side.tunnel.as_mut() {
                if t.poll_timeout().is_some_and(|at| at <= self.now) {
                    t.handle_timeout(self.now);
                }
                while let Some(ev) = t.poll_event() {
                    side.events.push(ev);
                }
            }
        }
    }

    /// The stanzas of one direction whose payload is the named XTLS element.
    fn sent(&self, by_alice: bool, element: &str) -> Vec<&Element> {
        self.wire
            .iter()
            .filter(|(dir, el)| *dir == by_alice && el.get_child(element, ns::XTLS).is_some())
            .map(|(_, el)| el)
            .collect()
    }

    fn errors(&self, by_alice: bool) -> Vec<String> {
        self.wire
            .iter()
            .filter(|(dir, el)| *dir == by_alice && el.attr("type") == Some("error"))
            .map(|(_, el)| Iq::parse(el).unwrap().error_condition())
            .collect()
    }
}

fn message(body: &str) -> Element {
    format!("<message xmlns='jabber:client' type='chat' id='m1'><body>{body}</body></message>")
        .parse()
        .unwrap()
}

fn data_iq(from: &str, to: &str, id: &str, text: &str) -> Iq {
    let el: Element = format!(
        "<iq xmlns='jabber:client' type='set' id='{id}' from='{from}' to='{to}'><data xmlns='urn:xmpp:tmp:xtls'>{text}</data></iq>"
    )
    .parse()
    .unwrap();
    Iq::parse(&el).unwrap()
}

fn reply_condition(el: &Element) -> String {
    Iq::parse(el).unwrap().error_condition()
}

#[test]
fn c01_start_proceed_echoes_id_and_addressing() {
    let mut pair = Pair::new();
    pair.start();
    pair.step_with(|_, el| Some(el));
    let start = pair.sent(true, "start")[0].clone();
    let proceed = pair.bot.drain().into_iter().next().unwrap();
    assert_eq!(proceed.attr("type"), Some("result"));
    assert_eq!(proceed.attr("id"), start.attr("id"));
    assert_eq!(proceed.attr("from"), Some(BOT), "bare stays bare");
    assert_eq!(proceed.attr("to"), Some(ALICE));
    assert!(proceed.has_child("proceed", ns::XTLS));
    assert_eq!(
        pair.bot.state(),
        Some(State::Handshaking),
        "TLS exists when proceed is sent"
    );
}

#[test]
fn the_proceed_offer_names_pinned_certificates_instead_of_insecure() {
    let offer_of = |pair: &mut Pair| {
        pair.start();
        pair.step_with(|_, el| Some(el));
        let proceed = pair.bot.drain().into_iter().next().unwrap();
        let offer = proceed
            .get_child("proceed", ns::XTLS)
            .and_then(|p| p.get_child("offer", ns::C2CTLS))
            .expect("an offered start gets an offer back")
            .clone();
        let names: Vec<String> = offer
            .children()
            .filter_map(|k| k.get_child("name", ns::PUBKEY))
            .map(|n| n.text())
            .collect();
        (names, offer.has_child("insecure", ns::C2CTLS))
    };
    let bot_name = |pair: &Pair| {
        pair.bot
            .creds
            .identity
            .info
            .fingerprints
            .cert_sha1
            .to_lower_hex()
    };
    // Nothing pinned: the bot's own key, and it takes a key it cannot verify yet (TOFU).
    let mut pair = Pair::new();
    let (names, insecure) = offer_of(&mut pair);
    assert_eq!((names, insecure), (vec![bot_name(&pair)], true));
    // Alice's certificate pinned: named back, no <insecure/>.
    let mut pair = Pair::new();
    let alice = pair.alice.creds.identity.info.fingerprints.clone();
    pair.bot.policy.pins = vec![alice.spki_sha256.clone()];
    pair.bot.policy.pinned_cert_names = vec![alice.cert_sha1.to_lower_hex()];
    let (names, insecure) = offer_of(&mut pair);
    assert_eq!(
        (names, insecure),
        (vec![bot_name(&pair), alice.cert_sha1.to_lower_hex()], false)
    );
    // Approved keys only and none of the offered ones: no <insecure/> either.
    let mut pair = Pair::new();
    pair.bot.policy.trust = TrustMode::Pinned;
    let (_, insecure) = offer_of(&mut pair);
    assert!(!insecure);
}

#[test]
fn the_outcomes_of_a_refused_start_are_told_apart() {
    for (error_type, condition, expected, code) in [
        (
            "cancel",
            "service-unavailable",
            CloseReason::NotSupported("service-unavailable".into()),
            "not_supported",
        ),
        (
            "cancel",
            "feature-not-implemented",
            CloseReason::NotSupported("feature-not-implemented".into()),
            "not_supported",
        ),
        (
            "wait",
            "resource-constraint",
            CloseReason::Busy("resource-constraint".into()),
            "busy",
        ),
        ("cancel", "conflict", CloseReason::Conflict, "conflict"),
        (
            "cancel",
            "not-acceptable",
            CloseReason::Refused("not-acceptable".into()),
            "refused",
        ),
    ] {
        let mut pair = Pair::new();
        pair.start();
        let start = pair.alice.drain().remove(0);
        let iq = Iq::parse(&start).unwrap();
        let answer: Element = format!(
            "<iq xmlns='jabber:client' type='error' id='{}' from='{BOT}' to='{ALICE}'>\
             <error type='{error_type}'><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>",
            iq.id
        )
        .parse()
        .unwrap();
        pair.alice
            .tunnel()
            .handle_iq(pair.now, &Iq::parse(&answer).unwrap());
        pair.alice.drain();
        let closed = pair.alice.closed().expect("the tunnel ended");
        assert_eq!((closed, closed.code()), (&expected, code), "{condition}");
    }
}

#[test]
fn c02_policy_refusals_are_not_acceptable() {
    // Approved keys only, and none is: the handshake runs so that the refusal names the key
    // someone would have to approve; it ends on the data IQ carrying alice's Finished.
    let mut pair = Pair::new();
    pair.bot.policy.trust = TrustMode::Pinned;
    pair.start();
    pair.drive();
    assert_eq!(pair.errors(false), vec!["not-acceptable"]);
    let alice_key = &pair.alice.creds.identity.info.fingerprints.spki_sha256;
    let reason = pair.bot.closed().expect("the bot's tunnel closed");
    assert_eq!(reason.refused_key(), Some(alice_key), "{reason:?}");
    assert_eq!(
        reason.identity_change(),
        None,
        "no key was pinned: not a change"
    );

    // An offer with no key (SRP only) is refused too.
    let mut pair = Pair::new();
    let el: Element = format!(
        "<iq xmlns='jabber:client' type='set' id='s1' from='{ALICE}' to='{BOT}'><start xmlns='urn:xmpp:tmp:xtls'><offer xmlns='urn:xmpp:tmp:c2ctls'><srp/></offer></start></iq>"
    )
    .parse()
    .unwrap();
    pair.bot.deliver(pair.now, &pair.config, &el);
    assert_eq!(reply_condition(&pair.bot.drain()[0]), "not-acceptable");
}

#[test]
fn c03_handshake_with_client_certificates_both_ways() {
    let mut pair = Pair::new();
    pair.open();
    let a = pair.alice.tunnel().established().unwrap().clone();
    let b = pair.bot.tunnel().established().unwrap().clone();
    assert_eq!(a.tls_version, "TLSv1.3");
    assert_eq!(b.tls_version, "TLSv1.3");
    assert_eq!(
        b.peer.spki_sha256.as_ref(),
        Some(&pair.alice.creds.identity.info.fingerprints.spki_sha256)
    );
    assert_eq!(b.peer.trust, TrustVerdict::TofuNew);
    assert_eq!(
        a.peer.spki_sha256.as_ref(),
        Some(&pair.bot.creds.identity.info.fingerprints.spki_sha256)
    );
    // The first data carries method='x509', later ones do not.
    let data = pair.sent(true, "data");
    assert_eq!(
        data[0].get_child("data", ns::XTLS).unwrap().attr("method"),
        Some("x509")
    );
    assert!(data[1..].iter().all(|d| {
        d.get_child("data", ns::XTLS)
            .unwrap()
            .attr("method")
            .is_none()
    }));
}

#[test]
fn c04_pinned_peer_is_known_and_a_changed_key_is_refused() {
    let mut pair = Pair::new();
    pair.bot.policy.pins = vec![
        pair.alice
            .creds
            .identity
            .info
            .fingerprints
            .spki_sha256
            .clone(),
    ];
    pair.open();
    assert_eq!(
        pair.bot.tunnel().established().unwrap().peer.trust,
        TrustVerdict::Pinned
    );

    let mut pair = Pair::new();
    let old_pin = Fingerprint::sha256(b"another key");
    pair.bot.policy.pins = vec![old_pin.clone()];
    pair.start();
    pair.drive();
    assert_eq!(pair.errors(false), vec!["not-acceptable"]);
    // The owner learns it is a key change, with both keys, from the type alone.
    let alice_key = &pair.alice.creds.identity.info.fingerprints.spki_sha256;
    let reason = pair.bot.closed().expect("the bot's tunnel closed");
    assert_eq!(
        reason.identity_change(),
        Some((alice_key, &[old_pin][..])),
        "{reason:?}"
    );
    assert_eq!(reason.refused_key(), Some(alice_key));
    assert_eq!(
        reason,
        &CloseReason::CertificateRejected(VerifyError::PinMismatch {
            jid: "alice@example.net".into(),
            presented: alice_key.clone(),
            pinned: vec![Fingerprint::sha256(b"another key")],
        })
    );
    // Alice's TLS reads the bot's alert before the error reply arrives.
    assert!(matches!(
        pair.alice.closed(),
        Some(CloseReason::PeerAlert(_))
    ));
    assert!(
        !pair
            .alice
            .events
            .iter()
            .any(|e| matches!(e, Event::Established(_))),
        "the initiator never reports Open before its handshake data is acknowledged"
    );
}

#[test]
fn c05_wrong_or_missing_xmpp_addr_is_not_acceptable() {
    let mut pair = Pair::new();
    // Alice presents a certificate naming someone else.
    pair.alice.creds = creds("mallory@example.net");
    pair.start();
    pair.drive();
    assert_eq!(pair.errors(false), vec!["not-acceptable"]);
    assert_eq!(
        pair.bot.closed(),
        Some(&CloseReason::CertificateRejected(
            VerifyError::WrongAddress {
                expected: "alice@example.net".into(),
                found: vec!["mallory@example.net".into()],
            }
        ))
    );
    assert_eq!(pair.bot.closed().unwrap().identity_change(), None);
    assert!(
        pair.sent(false, "data").len() >= 2,
        "the alert data goes out before the error reply"
    );
    assert!(
        !pair
            .alice
            .events
            .iter()
            .any(|e| matches!(e, Event::Established(_)))
    );

    // The bot's certificate names another bot: alice refuses it.
    let mut pair = Pair::new();
    pair.bot.creds = creds("other@bots.example.org");
    pair.start();
    pair.drive();
    assert_eq!(pair.errors(true), vec!["not-acceptable"]);
    assert!(matches!(
        pair.alice.closed(),
        Some(CloseReason::CertificateRejected(VerifyError::WrongAddress { expected, .. }))
            if expected == BOT
    ));
}

#[test]
fn send_refuses_text_xml_cannot_carry_and_the_tunnel_goes_on() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    for bad in ["bell\u{7}", "nul\u{0}", "\u{FFFE}"] {
        assert_eq!(
            pair.alice.tunnel().send(now, chat_message(bad, "chat")),
            Err(SendError::NotXml),
            "{bad:?}"
        );
    }
    let mut attr = message("fine");
    set_attr(&mut attr, "id", "a\u{1b}[31m");
    assert_eq!(pair.alice.tunnel().send(now, attr), Err(SendError::NotXml));
    let mut deep = message("outer");
    let mut child = Element::bare("x", "urn:example");
    child.append_text("\u{b}");
    deep.append_child(child);
    assert_eq!(pair.alice.tunnel().send(now, deep), Err(SendError::NotXml));
    // Nothing was written, and the tunnel still carries what XML can carry.
    assert_eq!(pair.alice.tunnel().stats().stanzas_out, 0);
    assert_eq!(pair.alice.tunnel().state(), State::Open);
    pair.alice
        .tunnel()
        .send(now, message("still here"))
        .unwrap();
    pair.drive();
    let bodies: Vec<String> = pair
        .bot
        .stanzas()
        .iter()
        .map(|s| s.get_child("body", ns::CLIENT).unwrap().text())
        .collect();
    assert_eq!(bodies, ["still here"]);
}

fn inner_iq(kind: &str, id: &str) -> Element {
    format!("<iq xmlns='jabber:client' type='{kind}' id='{id}'><query xmlns='urn:x'/></iq>")
        .parse()
        .unwrap()
}

#[test]
fn an_inner_iq_gets_exactly_one_answer_each_way() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    // Alice asks; the bot answers once; a second answer, or one to nothing, is refused.
    pair.alice
        .tunnel()
        .send(now, inner_iq("get", "q1"))
        .unwrap();
    pair.drive();
    assert_eq!(pair.bot.stanzas().last().unwrap().attr("id"), Some("q1"));
    pair.bot
        .tunnel()
        .send(now, inner_iq("result", "q1"))
        .unwrap();
    assert_eq!(
        pair.bot.tunnel().send(now, inner_iq("result", "q1")),
        Err(SendError::NotAwaited)
    );
    assert_eq!(
        pair.bot
            .tunnel()
            .send(now, inner_iq("error", "never-asked")),
        Err(SendError::NotAwaited)
    );
    pair.drive();
    let answers = pair
        .alice
        .stanzas()
        .iter()
        .filter(|s| s.attr("id") == Some("q1"))
        .count();
    assert_eq!(answers, 1);
    // An answer nobody asked for is not handed to the owner.
    let before = pair.bot.stanzas().len();
    let t = pair.alice.tunnel();
    t.tls
        .as_mut()
        .unwrap()
        .write_plaintext(b"<iq xmlns='jabber:client' type='result' id='stray'/>")
        .unwrap();
    t.flush(now);
    pair.drive();
    assert_eq!(
        pair.bot.stanzas().len(),
        before,
        "unsolicited answer dropped"
    );
}

#[test]
fn a_refused_send_changes_nothing_so_the_same_answer_can_go_later() {
    let mut pair = Pair::new();
    pair.config.window = 1;
    pair.config.max_queued_out = 1;
    pair.open();
    let now = pair.now;
    pair.alice
        .tunnel()
        .send(now, inner_iq("get", "q1"))
        .unwrap();
    pair.drive();
    // The bot's queue fills: its answer is refused for now, and its own request too.
    pair.bot
        .tunnel()
        .send(now, chat_message(&"x".repeat(10_000), "chat"))
        .unwrap();
    assert_eq!(
        pair.bot.tunnel().send(now, inner_iq("result", "q1")),
        Err(SendError::Blocked)
    );
    assert_eq!(
        pair.bot.tunnel().send(now, inner_iq("get", "b1")),
        Err(SendError::Blocked)
    );
    pair.drive();
    // Once it drained, the same answer goes, once.
    pair.bot
        .tunnel()
        .send(now, inner_iq("result", "q1"))
        .unwrap();
    pair.drive();
    let answers = pair
        .alice
        .stanzas()
        .iter()
        .filter(|s| s.attr("id") == Some("q1"))
        .count();
    assert_eq!(answers, 1);
    // The refused request was never recorded: closing reports nothing unanswered.
    pair.alice.tunnel().close(now);
    pair.drive();
    assert!(
        !pair
            .bot
            .events
            .iter()
            .any(|e| matches!(e, Event::Unanswered(_))),
        "{:?}",
        pair.bot.events
    );
}

#[test]
fn our_inner_requests_fail_locally_when_the_tunnel_closes_first() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    pair.bot
        .tunnel()
        .send(now, inner_iq("set", "answered"))
        .unwrap();
    pair.bot
        .tunnel()
        .send(now, inner_iq("get", "pending"))
        .unwrap();
    pair.drive();
    pair.alice
        .tunnel()
        .send(now, inner_iq("result", "answered"))
        .unwrap();
    pair.drive();
    pair.alice.tunnel().close(now);
    pair.drive();
    let unanswered: Vec<&Element> = pair
        .bot
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Unanswered(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(unanswered.len(), 1, "{:?}", pair.bot.events);
    let local = unanswered[0];
    assert_eq!(
        (
            local.attr("id"),
            local.attr("type"),
            local.attr("from"),
            local.attr("to")
        ),
        (Some("pending"), Some("error"), Some(ALICE), Some(BOT))
    );
    let error = local.get_child("error", ns::CLIENT).unwrap();
    assert!(error.has_child("recipient-unavailable", ns::STANZAS));
    let at = |f: &dyn Fn(&Event) -> bool| pair.bot.events.iter().position(f).unwrap();
    assert!(
        at(&|e| matches!(e, Event::Unanswered(_))) < at(&|e| matches!(e, Event::Closed(_))),
        "the local answer comes before Closed"
    );
}

#[test]
fn a_peer_cannot_make_a_tunnel_remember_unanswered_requests_without_bound() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    let requests: String = (0..300)
        .map(|i| format!("<iq xmlns='jabber:client' type='get' id='r{i}'><q xmlns='urn:x'/></iq>"))
        .collect();
    let t = pair.alice.tunnel();
    t.tls
        .as_mut()
        .unwrap()
        .write_plaintext(requests.as_bytes())
        .unwrap();
    t.flush(now);
    pair.drive();
    assert_eq!(
        pair.bot.stanzas().len(),
        256,
        "the bot is handed the first 256"
    );
    // The other 44 were answered inside the tunnel by the engine itself (alice's engine,
    // which never sent them through send(), drops those answers as unsolicited).
    assert_eq!(pair.bot.tunnel().stats().stanzas_out, 44);
    assert_eq!(pair.bot.tunnel().state(), State::Open);
}

#[test]
fn c06_stanzas_flow_with_routing_restored() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    let mut m = message("forecast?");
    set_attr(&mut m, "from", ALICE);
    set_attr(&mut m, "to", BOT);
    pair.alice.tunnel().send(now, m).unwrap();
    pair.drive();
    // Routing was stripped on the wire: only the inner stanza knows nothing of addresses.
    let got = pair.bot.stanzas();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].attr("from"), Some(ALICE));
    assert_eq!(got[0].attr("to"), Some(BOT));
    assert_eq!(
        got[0].get_child("body", ns::CLIENT).unwrap().text(),
        "forecast?"
    );
    let stats = pair.bot.tunnel().stats();
    assert_eq!(stats.stanzas_in, 1);
    assert!(stats.bytes_in > 0 && stats.bytes_out > 0);
}

#[test]
fn c07_close_during_handshake_gets_closed() {
    let mut pair = Pair::new();
    pair.start();
    pair.step_with(|_, el| Some(el)); // start
    pair.step_with(|_, el| Some(el)); // proceed
    assert_eq!(pair.bot.state(), Some(State::Handshaking));
    let el: Element = format!(
        "<iq xmlns='jabber:client' type='set' id='c1' from='{ALICE}' to='{BOT}'><close xmlns='urn:xmpp:tmp:xtls'/></iq>"
    )
    .parse()
    .unwrap();
    pair.bot.deliver(pair.now, &pair.config, &el);
    let replies = pair.bot.drain();
    let closed = replies.iter().find(|r| r.attr("id") == Some("c1")).unwrap();
    assert!(closed.has_child("closed", ns::XTLS));
    assert_eq!(pair.bot.closed(), Some(&CloseReason::PeerClosed));
}

#[test]
fn c08_base64_whitespace_accepted_and_malformations_refused() {
    let mut pair = Pair::new();
    pair.start();
    // Break every data payload into lines of 10 characters with CRLF and tabs.
    pair.drive_with(|_, mut el| {
        if let Some(data) = el.get_child_mut("data", ns::XTLS) {
            let text = data.text();
            let wrapped: Vec<String> = text
                .as_bytes()
                .chunks(10)
                .map(|c| String::from_utf8(c.to_vec()).unwrap())
                .collect();
            let method = data.attr("method").map(str::to_owned);
            *data = XtlsElement::Data {
                text: format!("\n\t{}\r\n", wrapped.join("\r\n ")),
                method,
            }
            .to_element();
        }
        Some(el)
    });
    assert_eq!(pair.bot.state(), Some(State::Open));

    for bad in ["ab=c", "*AAA", "QUJD="] {
        let mut pair = Pair::new();
        pair.open();
        let now = pair.now;
        pair.bot
            .tunnel()
            .handle_iq(now, &data_iq(ALICE, BOT, "x", bad));
        let replies = pair.bot.drain();
        assert_eq!(reply_condition(&replies[0]), "bad-request", "{bad}");
        assert_eq!(
            replies[0]
                .get_child("error", ns::CLIENT)
                .unwrap()
                .attr("type"),
            Some("cancel")
        );
        assert!(pair.bot.tunnel().is_gone());
        assert!(
            replies
                .iter()
                .all(|r| r.get_child("close", ns::XTLS).is_none()),
            "no close after an error"
        );
    }
}

#[test]
fn c09_chunk_limits() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    let big = encode_data(&vec![0u8; MAX_CHUNK_ACCEPTED + 1]);
    pair.bot
        .tunnel()
        .handle_iq(now, &data_iq(ALICE, BOT, "big", &big));
    assert_eq!(reply_condition(&pair.bot.drain()[0]), "policy-violation");

    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    pair.alice
        .tunnel()
        .send(now, message(&"x".repeat(100_000)))
        .unwrap();
    pair.drive();
    for el in pair.sent(true, "data") {
        let text = el.get_child("data", ns::XTLS).unwrap().text();
        assert!(decode_data(&text).unwrap().len() <= 4096);
    }
    assert_eq!(pair.bot.stanzas().len(), 1);
}

#[test]
fn c10_window_and_ack_timeout_without_resend() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    pair.alice
        .tunnel()
        .send(now, message(&"y".repeat(50_000)))
        .unwrap();
    // The bot never answers: Alice may have at most 4 data IQs in flight.
    let sent = pair.alice.drain();
    let data: Vec<_> = sent
        .iter()
        .filter(|e| e.has_child("data", ns::XTLS))
        .collect();
    assert_eq!(data.len(), 4);
    pair.advance(Duration::from_secs(61));
    let after = pair.alice.drain();
    assert!(
        after.iter().all(|e| !e.has_child("data", ns::XTLS)),
        "no resend ever"
    );
    assert!(after.iter().any(|e| e.has_child("close", ns::XTLS)));
    assert_eq!(pair.alice.state(), Some(State::Closing));
    pair.advance(Duration::from_secs(31));
    assert_eq!(
        pair.alice.closed(),
        Some(&CloseReason::Timeout("data acknowledgement"))
    );
}

#[test]
fn c11_corrupted_record_sends_alert_then_bad_request() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    pair.alice.tunnel().send(now, message("hi")).unwrap();
    let mut out = pair.alice.drain();
    let data = out
        .iter_mut()
        .find(|e| e.has_child("data", ns::XTLS))
        .unwrap();
    let id = data.attr("id").unwrap().to_owned();
    let mut bytes = decode_data(&data.get_child("data", ns::XTLS).unwrap().text()).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    pair.bot
        .tunnel()
        .handle_iq(now, &data_iq(ALICE, BOT, &id, &encode_data(&bytes)));
    let replies = pair.bot.drain();
    assert_eq!(replies.len(), 2, "{replies:?}");
    assert!(replies[0].has_child("data", ns::XTLS), "alert first");
    assert_eq!(replies[1].attr("id"), Some(id.as_str()));
    assert_eq!(reply_condition(&replies[1]), "bad-request");
    assert!(matches!(pair.bot.closed(), Some(CloseReason::TlsError(_))));
    // Alice receives the alert: result, tunnel gone, no error sent.
    pair.alice.deliver(now, &pair.config, &replies[0]);
    let answers = pair.alice.drain();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].attr("type"), Some("result"));
    assert!(matches!(
        pair.alice.closed(),
        Some(CloseReason::PeerAlert(_))
    ));
}

#[test]
fn c12_inner_framing() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    let plain = format!(
        "<message xmlns='jabber:client' id='1'><body>one</body></message>\
         <message id='2'><body>two</body></message>\
         <message from='mallory@evil.example/x' id='3'><body>spoof</body></message>\
         <message from='{ALICE}' to='{BOT}' id='4'><body>explicit</body></message>\
         <message from='Alice@Example.NET/laptop' to='Weather@Bots.Example.org' id='5'/>\
         <message from='alice@example.net' id='6'/>\
         <message from='not a jid@@' id='7'/>\
         <message to='weather@bots.example.org/other' id='8'/>\
         <unknown xmlns='urn:x'/>"
    );
    let t = pair.alice.tunnel();
    t.tls
        .as_mut()
        .unwrap()
        .write_plaintext(plain.as_bytes())
        .unwrap();
    t.flush(now);
    pair.drive();
    let ids: Vec<_> = pair
        .bot
        .stanzas()
        .iter()
        .map(|s| s.attr("id").unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        ["1", "2", "4", "5", "6"],
        "addresses compared as normalized JIDs (5: case, 6: bare); spoofed, invalid, \
         misaddressed and non-stanza elements dropped"
    );
    let five = &pair.bot.stanzas()[3];
    assert_eq!(
        (five.attr("from"), five.attr("to")),
        (Some(ALICE), Some(BOT)),
        "routing restored to the key's own form"
    );

    // One stanza split over three records (three data IQs).
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    for part in [
        "<message xmlns='jabber:client' id='s'><bo",
        "dy>spl",
        "it</body></message>",
    ] {
        let t = pair.alice.tunnel();
        t.tls
            .as_mut()
            .unwrap()
            .write_plaintext(part.as_bytes())
            .unwrap();
        t.flush(now);
        pair.drive();
    }
    let got = pair.bot.stanzas();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].get_child("body", ns::CLIENT).unwrap().text(),
        "split"
    );

    // An XML declaration inside the tunnel: the data is acknowledged, then close.
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    let t = pair.alice.tunnel();
    t.tls
        .as_mut()
        .unwrap()
        .write_plaintext(b"<?xml version='1.0'?><message/>")
        .unwrap();
    t.flush(now);
    pair.drive();
    assert!(pair.errors(false).is_empty());
    assert_eq!(pair.sent(false, "close").len(), 1);
    assert!(matches!(pair.bot.closed(), Some(CloseReason::InnerXml(_))));
    assert_eq!(pair.alice.closed(), Some(&CloseReason::PeerClosed));
}

#[test]
fn c13_graceful_close_and_crossing_closes() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    pair.bot.tunnel().close(now);
    pair.drive();
    let bot_sent: Vec<_> = pair
        .wire
        .iter()
        .rev()
        .filter(|(d, _)| !*d)
        .take(2)
        .collect();
    assert!(bot_sent[0].1.has_child("close", ns::XTLS));
    assert!(
        bot_sent[1].1.has_child("data", ns::XTLS),
        "close_notify data before close"
    );
    assert_eq!(pair.sent(true, "closed").len(), 1);
    assert_eq!(pair.bot.closed(), Some(&CloseReason::Local));
    assert_eq!(pair.alice.closed(), Some(&CloseReason::PeerClosed));

    // Both close at once: each answers the other's close and both end.
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    pair.bot.tunnel().close(now);
    pair.alice.tunnel().close(now);
    pair.drive();
    assert!(pair.alice.tunnel().is_gone());
    assert!(pair.bot.tunnel().is_gone());
    assert!(
        pair.errors(true).is_empty() || pair.errors(true).iter().all(|c| c == "item-not-found")
    );
}

#[test]
fn c14_data_before_proceed_is_unexpected() {
    let mut pair = Pair::new();
    pair.start();
    pair.alice.drain();
    let now = pair.now;
    pair.alice
        .tunnel()
        .handle_iq(now, &data_iq(BOT, ALICE, "d", "FgMB"));
    assert_eq!(
        reply_condition(&pair.alice.drain()[0]),
        "unexpected-request"
    );
}

#[test]
fn c15_unsupported_method_and_unknown_elements() {
    let mut pair = Pair::new();
    pair.start();
    pair.drive_with(|to_bot, mut el| {
        if to_bot
            && let Some(d) = el.get_child_mut("data", ns::XTLS)
            && d.attr("method").is_some()
        {
            d.set_attr(rxml::Namespace::NONE, crate::stanza::name("method"), "srp");
        }
        Some(el)
    });
    assert_eq!(pair.errors(false), vec!["feature-not-implemented"]);

    let el: Element = format!(
        "<iq xmlns='jabber:client' type='set' id='f' from='{ALICE}' to='{BOT}'><foo xmlns='urn:xmpp:tmp:xtls'/></iq>"
    )
    .parse()
    .unwrap();
    let reply = classify_request(&Iq::parse(&el).unwrap()).unwrap_err();
    assert_eq!(reply_condition(&reply), "feature-not-implemented");
    let el: Element = format!(
        "<iq xmlns='jabber:client' type='get' id='g' from='{ALICE}' to='{BOT}'><start xmlns='urn:xmpp:tmp:xtls'/></iq>"
    )
    .parse()
    .unwrap();
    let reply = classify_request(&Iq::parse(&el).unwrap()).unwrap_err();
    assert_eq!(reply_condition(&reply), "bad-request");
}

#[test]
fn c16_handshake_deadline_and_idle_timeout() {
    let mut pair = Pair::new();
    pair.start();
    pair.step_with(|_, el| Some(el));
    pair.step_with(|_, el| Some(el));
    // Alice's ClientHello is lost; the bot's handshake deadline closes the tunnel.
    pair.alice.drain();
    pair.advance(Duration::from_secs(91));
    assert!(
        pair.bot
            .drain()
            .iter()
            .any(|e| e.has_child("close", ns::XTLS))
    );

    let mut pair = Pair::new();
    pair.open();
    pair.advance(Duration::from_secs(30 * 60 + 1));
    pair.drive();
    assert_eq!(pair.bot.closed(), Some(&CloseReason::Idle));
    // Both idle clocks run out together; whichever close lands first ends the other side.
    assert!(matches!(
        pair.alice.closed(),
        Some(CloseReason::Idle | CloseReason::PeerClosed)
    ));
}

#[test]
fn c17_simultaneous_start_tie_break_both_orders() {
    // alice@... sorts before weather@...: alice wins, the bot becomes responder.
    // zed@... sorts after weather@...: the bot wins and stays initiator.
    for (client, cert, bot_role) in [
        (ALICE, "alice@example.net", Role::Responder),
        ("zed@example.net/desk", "zed@example.net", Role::Initiator),
    ] {
        let mut pair = Pair::between(client, cert);
        pair.start();
        pair.bot_starts();
        pair.drive();
        pair.assert_open(client);
        assert_eq!(pair.bot.tunnel().role(), bot_role, "{client}");
        assert_eq!(
            pair.errors(true).len() + pair.errors(false).len(),
            1,
            "exactly one conflict"
        );
        let conflicts: Vec<_> = pair
            .errors(true)
            .into_iter()
            .chain(pair.errors(false))
            .collect();
        assert_eq!(conflicts, ["conflict"]);
        // Exactly one tunnel results: it carries stanzas both ways.
        let now = pair.now;
        pair.alice
            .tunnel()
            .send(now, message("after the race"))
            .unwrap();
        pair.bot.tunnel().send(now, message("me too")).unwrap();
        pair.drive();
        assert_eq!(pair.bot.stanzas().len(), 1);
        assert_eq!(pair.alice.stanzas().len(), 1);
    }
}

#[test]
fn c18_second_start_replaces_an_open_tunnel() {
    let mut pair = Pair::new();
    pair.open();
    // Alice restarted: her new start reaches the bot while the old tunnel is open.
    pair.alice.tunnel = None;
    pair.start();
    pair.drive();
    assert!(
        pair.bot
            .events
            .contains(&Event::Closed(CloseReason::Replaced))
    );
    assert_eq!(
        pair.bot.state(),
        Some(State::Open),
        "the new handshake works"
    );
    assert_eq!(pair.alice.state(), Some(State::Open));
    assert!(pair.errors(false).is_empty());
}

#[test]
fn c19_records_after_close_notify_are_refused_not_spun_on() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    // Alice's close_notify reaches the bot; then more bytes arrive on the same tunnel.
    let t = pair.alice.tunnel();
    t.tls.as_mut().unwrap().send_close_notify();
    t.flush(now);
    pair.drive();
    assert_eq!(
        pair.bot.state(),
        Some(State::Open),
        "close_notify alone waits for <close/>"
    );
    pair.bot.tunnel().handle_iq(
        now,
        &data_iq(ALICE, BOT, "late", &encode_data(&[0x17, 3, 3, 0, 1, 0])),
    );
    let replies = pair.bot.drain();
    let answer = replies
        .iter()
        .find(|r| r.attr("id") == Some("late"))
        .unwrap();
    assert_eq!(reply_condition(answer), "bad-request");
    assert!(pair.bot.tunnel().is_gone());
}

#[test]
fn after_the_peers_close_notify_we_send_nothing_and_close_with_our_own() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    // Alice closes her side of TLS and says nothing more.
    let t = pair.alice.tunnel();
    t.tls.as_mut().unwrap().send_close_notify();
    t.flush(now);
    pair.drive();
    assert_eq!(pair.bot.state(), Some(State::Open));
    assert_eq!(
        pair.bot.tunnel().send(now, message("too late")),
        Err(SendError::NotOpen),
        "no application data after the peer's close_notify"
    );
    // When the wait for her <close/> ends, the bot closes the normal way: its own
    // close_notify in a data IQ, then <close/> once that is acknowledged.
    let data_before = pair.sent(false, "data").len();
    pair.advance(pair.config.peer_eof_timeout + Duration::from_secs(1));
    pair.drive();
    let wire: Vec<&str> = pair
        .wire
        .iter()
        .filter(|(to_bot, _)| !to_bot)
        .filter_map(|(_, el)| el.children().next().map(|c| c.name()))
        .collect();
    let data_at = wire.iter().rposition(|n| *n == "data").unwrap();
    let close_at = wire.iter().position(|n| *n == "close").unwrap();
    assert!(data_at < close_at, "close_notify before <close/>: {wire:?}");
    assert!(pair.sent(false, "data").len() > data_before);
    assert_eq!(pair.bot.closed(), Some(&CloseReason::PeerClosed));
    assert_eq!(pair.alice.closed(), Some(&CloseReason::PeerClosed));
    assert!(pair.bot.tunnel().is_gone() && pair.alice.tunnel().is_gone());
}

#[test]
fn c20_malformed_request_ends_the_tunnel() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    let el: Element = format!(
        "<iq xmlns='jabber:client' type='get' id='g' from='{ALICE}' to='{BOT}'><data xmlns='urn:xmpp:tmp:xtls'>AAAA</data></iq>"
    )
    .parse()
    .unwrap();
    pair.bot.tunnel().handle_iq(now, &Iq::parse(&el).unwrap());
    assert_eq!(reply_condition(&pair.bot.drain()[0]), "bad-request");
    assert!(
        pair.bot.tunnel().is_gone(),
        "after any error about a tunnel it is gone"
    );
}

#[test]
fn c21_initiator_waits_for_every_handshake_ack_with_a_window_of_one() {
    let mut pair = Pair::new();
    pair.config.window = 1;
    pair.config.chunk_size = 100;
    pair.start();
    for _ in 0..1000 {
        let moved = pair.step_with(|_, el| Some(el));
        // The bot opens when it has read alice's Finished, the last handshake byte; alice
        // may open only after the ack of the IQ that carried it.
        if pair.alice.state() == Some(State::Open) {
            assert_eq!(
                pair.bot.state(),
                Some(State::Open),
                "alice opened before her Finished was acknowledged"
            );
        }
        if !moved {
            break;
        }
    }
    pair.assert_open("");
    // Small chunks and a window of one: the client's last flight took several data IQs.
    assert!(pair.sent(true, "data").len() > 3);
}

#[test]
fn c22_a_sent_stanza_is_reported_acknowledged_only_after_every_chunk_is() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    // Chunks of 4096 bytes and a window of 4: one stanza spans several data IQs; the partial
    // last chunk waits until nothing is in flight (Nagle's rule at the IQ level).
    let first = pair
        .alice
        .tunnel()
        .send(now, message(&"y".repeat(10_000)))
        .unwrap();
    let second = pair.alice.tunnel().send(now, message("short")).unwrap();
    assert!(second > first, "marks grow with the ciphertext");
    let data: Vec<Element> = pair
        .alice
        .drain()
        .into_iter()
        .filter(|e| e.has_child("data", ns::XTLS))
        .collect();
    assert_eq!(data.len(), 2, "two full chunks go at once; the rest waits");
    let acknowledged = |pair: &mut Pair| -> Vec<u64> {
        let t = pair.alice.tunnel();
        std::iter::from_fn(|| t.poll_event())
            .filter_map(|e| match e {
                Event::Acknowledged(m) => Some(m),
                _ => None,
            })
            .collect()
    };
    // Acknowledging all but the first chunk reports nothing: the first stanza starts there.
    for el in &data[1..] {
        let iq = Iq::parse(el).unwrap();
        let result = iq.result(None);
        pair.alice
            .tunnel()
            .handle_iq(now, &Iq::parse(&result).unwrap());
    }
    assert_eq!(acknowledged(&mut pair), Vec::<u64>::new());
    let iq = Iq::parse(&data[0]).unwrap();
    let result = iq.result(None);
    pair.alice
        .tunnel()
        .handle_iq(now, &Iq::parse(&result).unwrap());
    // Nothing in flight: the rest of both stanzas leaves in one partial chunk.
    let rest: Vec<Element> = pair
        .alice
        .drain()
        .into_iter()
        .filter(|e| e.has_child("data", ns::XTLS))
        .collect();
    assert_eq!(rest.len(), 1);
    assert_eq!(acknowledged(&mut pair), Vec::<u64>::new());
    let result = Iq::parse(&rest[0]).unwrap().result(None);
    pair.alice
        .tunnel()
        .handle_iq(now, &Iq::parse(&result).unwrap());
    assert_eq!(acknowledged(&mut pair), vec![second]);
}

#[test]
fn c24_small_stanzas_queued_behind_a_data_in_flight_travel_together() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    // A lone message leaves at once.
    pair.alice.tunnel().send(now, message("one")).unwrap();
    let first = pair.alice.drain();
    assert_eq!(first.len(), 1);
    // Three more while it is unacknowledged: held, not three more IQs.
    for body in ["two", "three", "four"] {
        pair.alice.tunnel().send(now, message(body)).unwrap();
    }
    assert!(
        pair.alice.drain().is_empty(),
        "partial chunks wait for the ack"
    );
    let ack = Iq::parse(&first[0]).unwrap().result(None);
    pair.alice
        .tunnel()
        .handle_iq(now, &Iq::parse(&ack).unwrap());
    let next = pair.alice.drain();
    assert_eq!(next.len(), 1, "the three travel in one data IQ");
    pair.bot.deliver(now, &pair.config.clone(), &first[0]);
    pair.bot.deliver(now, &pair.config.clone(), &next[0]);
    pair.bot.drain();
    let bodies: Vec<String> = pair
        .bot
        .stanzas()
        .iter()
        .filter_map(|s| s.get_child("body", ns::CLIENT).map(|b| b.text()))
        .collect();
    assert_eq!(bodies, ["one", "two", "three", "four"]);
}

#[test]
fn c23_the_alert_of_a_local_tls_failure_is_chunked_too() {
    // Found by the `tunnel` fuzz target: a ClientHello and a bad record in one payload made
    // the bot's whole flight plus its alert one `data` of 788 bytes with 100-byte chunks.
    let mut pair = Pair::new();
    pair.config.chunk_size = 100;
    pair.config.window = 64;
    pair.start();
    pair.step_with(|_, el| Some(el)); // start
    pair.step_with(|_, el| Some(el)); // proceed; alice's ClientHello is queued
    let mut hello = Vec::new();
    for el in pair.alice.drain() {
        if let Some(d) = el.get_child("data", ns::XTLS) {
            hello.extend(decode_data(&d.text()).unwrap());
        }
    }
    assert!(!hello.is_empty());
    hello.extend([0x17, 3, 3, 0, 1, 0]);
    let now = pair.now;
    pair.bot
        .tunnel()
        .handle_iq(now, &data_iq(ALICE, BOT, "hello", &encode_data(&hello)));
    let replies = pair.bot.drain();
    let data: Vec<usize> = replies
        .iter()
        .filter_map(|r| r.get_child("data", ns::XTLS))
        .map(|d| decode_data(&d.text()).unwrap().len())
        .collect();
    assert!(data.len() > 1, "the flight and the alert: {data:?}");
    assert!(data.iter().all(|n| (1..=100).contains(n)), "{data:?}");
    assert_eq!(reply_condition(replies.last().unwrap()), "bad-request");
    assert!(pair.bot.tunnel().is_gone());
}

#[test]
fn enum_names_round_trip_and_unknown_names_are_errors() {
    fn check<T>(all: &[T])
    where
        T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + std::str::FromStr,
        T::Err: std::fmt::Debug,
    {
        for v in all {
            assert_eq!(v.to_string().parse::<T>().unwrap(), *v);
        }
    }
    check(Role::ALL);
    check(State::ALL);
    check(PeerAuth::ALL);
    check(TrustMode::ALL);
    check(TrustVerdict::ALL);
    assert_eq!(State::Handshaking.as_str(), "handshaking");
    assert_eq!(TrustVerdict::TofuNew.as_str(), "tofu_new");
    let err = "Open".parse::<State>().unwrap_err();
    assert_eq!(err.to_string(), "unknown tunnel state 'Open'");
}

#[test]
fn c25_both_ends_export_the_same_keying_material_once_open() {
    use crate::sas::{Answerer, Committer, EXPORT_LEN, EXPORTER_LABEL, SasCode};
    let mut pair = Pair::new();
    let mut out = [0u8; EXPORT_LEN];
    pair.start();
    assert_eq!(
        pair.alice
            .tunnel()
            .export_keying_material(&mut out, EXPORTER_LABEL, b""),
        None,
        "nothing before the handshake"
    );
    pair.drive();
    pair.assert_open("exporter");
    // The short authentication string's exchange, through its own messages (crate::sas).
    let (mut committer, commit) = Committer::start([1; 32]);
    let (answerer, nonce) = Answerer::on_commit(commit, [2; 32]).unwrap();
    let (reveal, alice_context) = committer.on_nonce(nonce).unwrap();
    let bot_context = answerer.on_reveal(reveal).unwrap();
    let export = |side: &mut Side, context: &[u8]| {
        let mut out = [0u8; EXPORT_LEN];
        side.tunnel()
            .export_keying_material(&mut out, EXPORTER_LABEL, context)
            .expect("open tunnels export");
        out
    };
    let alice = export(&mut pair.alice, &alice_context);
    let bot = export(&mut pair.bot, &bot_context);
    assert_eq!(alice, bot);
    assert_eq!(SasCode::from_export(&alice), SasCode::from_export(&bot));
    assert_ne!(
        export(&mut pair.alice, &[0; 64]),
        alice,
        "the nonces are in the context"
    );

    // Another session between the same two keys (what a man in the middle holds) gives
    // another code for the same nonces.
    let mut other = Pair::new();
    other.open();
    assert_ne!(export(&mut other.alice, &alice_context), alice);
}

#[test]
fn c26_a_reply_written_before_the_ack_is_polled_leaves_just_before_it() {
    let mut pair = Pair::new();
    pair.open();
    let now = pair.now;
    let config = pair.config.clone();
    // The bot's first reply is in flight, unacknowledged.
    pair.bot.tunnel().send(now, message("reply one")).unwrap();
    let in_flight = pair.bot.drain();
    assert_eq!(in_flight.len(), 1);
    // Alice sends again; the bot answers before polling (events first, then transmit).
    pair.alice.tunnel().send(now, message("two")).unwrap();
    let from_alice = pair.alice.drain();
    pair.bot.deliver(now, &config, &from_alice[0]);
    let arrived: Vec<Event> = std::iter::from_fn(|| pair.bot.tunnel().poll_event()).collect();
    assert!(arrived.iter().any(|e| matches!(e, Event::Stanza(_))));
    pair.bot.tunnel().send(now, message("reply two")).unwrap();
    let out = pair.bot.drain();
    assert_eq!(out.len(), 2, "the reply and the result: {out:?}");
    assert!(
        out[0].has_child("data", ns::XTLS),
        "the reply first: {out:?}"
    );
    assert_eq!(
        out[1].attr("type"),
        Some("result"),
        "then the acknowledgement"
    );

    // A reply written after the acknowledgement was polled waits for the `data` in flight
    // (Nagle's rule at the IQ level): the bot of an HTTP backend answers later.
    pair.alice.deliver(now, &config, &out[1]);
    pair.alice.tunnel().send(now, message("three")).unwrap();
    let from_alice = pair.alice.drain();
    pair.bot.deliver(now, &config, &from_alice[0]);
    let ack = pair.bot.drain();
    assert_eq!(ack.len(), 1);
    assert_eq!(ack[0].attr("type"), Some("result"));
    pair.bot.tunnel().send(now, message("reply three")).unwrap();
    assert!(
        pair.bot.drain().is_empty(),
        "held behind the data in flight"
    );
    // Acknowledging both data IQs in flight releases it.
    for el in in_flight.iter().chain(&out[..1]) {
        let result = Iq::parse(el).unwrap().result(None);
        pair.bot
            .tunnel()
            .handle_iq(now, &Iq::parse(&result).unwrap());
    }
    let released = pair.bot.drain();
    assert_eq!(released.len(), 1);
    assert!(released[0].has_child("data", ns::XTLS));
}

#[test]
fn c27_held_acknowledgements_leave_at_the_deadline_and_then_are_not_held_until_a_reply() {
    let mut pair = Pair::new();
    pair.config.ack_hold = Duration::from_millis(50);
    pair.open();
    let config = pair.config.clone();
    let t0 = pair.now;
    let alice_sends = |pair: &mut Pair, body: &str| {
        let now = pair.now;
        pair.alice.tunnel().send(now, message(body)).unwrap();
        let data = pair.alice.drain();
        assert_eq!(data.len(), 1);
        pair.bot.deliver(now, &config, &data[0]);
    };
    // No reply: the result waits, and the deadline is the owner's next timer.
    alice_sends(&mut pair, "one");
    assert!(pair.bot.drain().is_empty(), "held for a reply");
    assert!(!pair.bot.tunnel().has_output());
    assert_eq!(
        pair.bot.tunnel().poll_timeout(),
        Some(t0 + Duration::from_millis(50))
    );
    pair.advance(Duration::from_millis(50));
    let out = pair.bot.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].attr("type"),
        Some("result"),
        "released alone: {out:?}"
    );
    pair.alice.deliver(pair.now, &config, &out[0]);

    // The bot did not answer: the next result is not held.
    alice_sends(&mut pair, "two");
    let out = pair.bot.drain();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].attr("type"), Some("result"), "at once: {out:?}");
    pair.alice.deliver(pair.now, &config, &out[0]);

    // Once the bot writes again, results wait for its replies again.
    let now = pair.now;
    pair.bot.tunnel().send(now, message("news")).unwrap();
    let news = pair.bot.drain();
    assert_eq!(news.len(), 1);
    pair.alice.deliver(now, &config, &news[0]);
    // Alice holds her result too, and her next message takes it along.
    assert!(pair.alice.drain().is_empty());
    pair.alice.tunnel().send(now, message("three")).unwrap();
    let from_alice = pair.alice.drain();
    assert_eq!(from_alice.len(), 2, "{from_alice:?}");
    for el in &from_alice {
        pair.bot.deliver(now, &config, el);
    }
    assert!(pair.bot.drain().is_empty(), "held again");
    pair.bot.tunnel().send(now, message("reply")).unwrap();
    let out = pair.bot.drain();
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out[0].has_child("data", ns::XTLS), "the reply first");
    assert_eq!(out[1].attr("type"), Some("result"));
}

#[test]
fn c28_held_acknowledgements_leave_behind_any_data_we_send() {
    let mut pair = Pair::new();
    pair.config.ack_hold = Duration::from_secs(30);
    pair.open();
    let config = pair.config.clone();
    let now = pair.now;
    pair.alice.tunnel().send(now, message("one")).unwrap();
    let data = pair.alice.drain();
    pair.bot.deliver(now, &config, &data[0]);
    assert!(pair.bot.drain().is_empty(), "held for a reply");
    // The bot closes instead of answering: its close_notify leaves, the result behind it.
    pair.bot.tunnel().close(now);
    let out = pair.bot.drain();
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        out[0].has_child("data", ns::XTLS),
        "close_notify first: {out:?}"
    );
    assert_eq!(out[1].attr("id"), data[0].attr("id"));
    assert_eq!(out[1].attr("type"), Some("result"));
}
