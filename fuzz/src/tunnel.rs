//! Target `tunnel`: two tunnel engines, Alice (initiator) and the weather bot (responder),
//! with a fake clock, as `crates/xtls/src/tunnel/tests.rs` pairs them.
//!
//! Input (decoded with `arbitrary`): a setup (how far to drive before the fuzzer takes over:
//! by default a real handshake to Open; chunk size, window, queue and inner stanza limits;
//! which certificate Alice presents and how the bot trusts), then up to [`MAX_OPS`]
//! operations: deliver, drop, duplicate, reorder or tamper with queued stanzas, inject crafted
//! XTLS IQs (any type, any id, any payload, arbitrary base64 or bytes), send stanzas from
//! either bot side, close, abandon or restart a side, advance the clock.
//!
//! Invariants, checked after every call into an engine:
//! - no panic;
//! - one call emits at most `window + 2` stanzas (unless the tunnel failed and sent its
//!   alert, spec §1.11); every emitted stanza is an IQ from the
//!   tunnel's local JID to its peer; request ids are never reused; `data` carries 1 to
//!   `chunk_size` bytes of valid base64; at most `window` `data` are unacknowledged;
//! - every IQ request handed to a live tunnel gets exactly one answer with its id;
//! - what `send` accepts without an acknowledgement in between stays within
//!   `max_queued_out` plus one window and the stanza itself (the engine's buffer is bounded);
//! - events: at most one `Established`, nothing after `Closed`, `Closed` exactly when the
//!   engine says it is gone; an inner stanza carries the peer's and our JID and is one the
//!   other side really sent (nothing forged gets through);
//! - a live tunnel in `Starting`, `Handshaking` or `Closing`, or asked to close, has a deadline;
//! - at the end both sides close, every stanza is delivered and deadlines fire: both tunnels
//!   end up gone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use minidom::Element;
use xtls::certs::{BotIdentity, Fingerprint};
use xtls::stanza::chat_message;
use xtls::stanza::{
    DefinedCondition, ErrorType, Iq, IqType, XtlsElement, build_iq, decode_data, encode_data,
    error_element, is_xml_text, ns, remove_attr, set_attr,
};
use xtls::tunnel::{
    BotCredentials, CloseReason, Event, PeerAuth, PeerPolicy, SendError, StartDecision, State,
    TrustMode, Tunnel, TunnelConfig, TunnelKey, TunnelParams, classify_request, decide_start,
};
use xtls::xml::{parse_stanza, to_bytes};

use crate::xmlcheck::Canon;

const ALICE: &str = "alice@example.net/laptop";
const BOT: &str = "weather@bots.example.org";

/// Operations read from one input at most.
pub const MAX_OPS: usize = 200;
/// Bytes of big stanzas one input may send in all (keeps one run fast).
const BIG_BUDGET: usize = 1024 * 1024;

/// Key generation is slow: one identity per JID per process.
struct Identities {
    alice: BotCredentials,
    bot: BotCredentials,
    mallory: BotCredentials,
}

fn identities() -> &'static Identities {
    static IDS: OnceLock<Identities> = OnceLock::new();
    IDS.get_or_init(|| {
        let creds = |jid: &str| {
            BotCredentials::new(BotIdentity::generate(jid).expect("key generation"))
                .expect("a fresh key is usable")
        };
        Identities {
            alice: creds("alice@example.net"),
            bot: creds(BOT),
            mallory: creds("mallory@example.net"),
        }
    })
}

/// How the run begins.
#[derive(Debug, Arbitrary)]
enum Prefix {
    /// A real handshake first: both tunnels open (when the setup allows it).
    Open,
    /// Alice's `start` is queued; nothing delivered.
    Starting,
    /// Both sides sent `start` (the tie-break of spec §1.11).
    Crossing,
    /// No tunnel yet; only injected or restarted ones.
    Nothing,
}

#[derive(Debug, Arbitrary)]
enum Chunk {
    Default,
    Medium,
    Small,
}

#[derive(Debug, Arbitrary)]
enum Cert {
    /// Alice's own certificate.
    Alice,
    /// One naming another JID: refused by the bot.
    Mallory,
}

#[derive(Debug, Arbitrary)]
enum Trust {
    Tofu,
    PinnedAlice,
    PinnedOther,
    PinnedNone,
    Optional,
}

#[derive(Debug, Arbitrary)]
struct Setup {
    prefix: Prefix,
    chunk: Chunk,
    window: u8,
    small_queue: bool,
    small_inner: bool,
    no_idle: bool,
    no_offer: bool,
    cert: Cert,
    trust: Trust,
    /// Both ends keep acknowledgements back for a reply (`TunnelConfig::ack_hold`).
    hold_acks: bool,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
enum Kind {
    Set,
    Result,
    Error,
    Get,
    Bogus,
}

#[derive(Debug, Arbitrary)]
enum IdChoice {
    /// The id of one of the last requests the receiving side sent (a plausible answer).
    Recent(u8),
    /// A fixed id of our own.
    Fixed(u8),
}

#[derive(Debug, Arbitrary, Clone, Copy)]
enum OfferChoice {
    None,
    Empty,
    Srp,
    Key,
    Insecure,
}

#[derive(Debug, Arbitrary)]
enum DataText {
    /// Valid base64 of arbitrary bytes.
    Base64(Vec<u8>),
    /// Valid base64 with XML whitespace inside.
    Wrapped(Vec<u8>),
    /// Anything.
    Raw(String),
    /// One byte over the accepted chunk size.
    Oversized,
    Empty,
}

#[derive(Debug, Arbitrary)]
enum Method {
    None,
    X509,
    Srp,
    Other(String),
}

#[derive(Debug, Arbitrary)]
enum Payload {
    None,
    Start(OfferChoice),
    Proceed(OfferChoice),
    Data {
        text: DataText,
        method: Method,
    },
    Close,
    Closed,
    /// `<foo xmlns='urn:xmpp:tmp:xtls'/>`.
    Unknown,
    /// A payload in another namespace.
    Foreign,
    /// Two children.
    Two,
    /// An `<error/>` with a condition picked by the byte.
    StanzaError(u8),
}

#[derive(Debug, Arbitrary)]
struct Crafted {
    kind: Kind,
    id: IdChoice,
    payload: Payload,
}

#[derive(Debug, Arbitrary)]
enum Tamper {
    /// Flips one bit of the decoded `<data/>` bytes.
    FlipBit { at: u16, bit: u8 },
    /// Cuts the decoded `<data/>` bytes.
    Truncate(u16),
    /// Appends bytes to the decoded `<data/>` bytes.
    Append(Vec<u8>),
    /// Replaces the IQ type.
    SetKind(Kind),
    /// Replaces the id.
    SetId(u8),
    /// Replaces the payload.
    Replace(Payload),
    /// Adds a second child.
    ExtraChild,
}

#[derive(Debug, Arbitrary)]
enum Outgoing {
    /// A chat message with this body.
    Chat(String),
    /// A stanza as a bot would post it (ignored unless `parse_stanza` accepts it).
    Xml(String),
    /// A message of (n + 1) KiB.
    Big(u8),
}

#[derive(Debug, Arbitrary)]
enum Op {
    Deliver {
        from_alice: bool,
        pick: u8,
    },
    /// Everything queued, in order, both directions.
    Step,
    Drop {
        from_alice: bool,
        pick: u8,
    },
    Duplicate {
        from_alice: bool,
        pick: u8,
    },
    Tamper {
        from_alice: bool,
        pick: u8,
        how: Tamper,
    },
    Inject {
        to_alice: bool,
        iq: Crafted,
    },
    Send {
        alice: bool,
        what: Outgoing,
    },
    Close {
        alice: bool,
    },
    Abandon {
        alice: bool,
    },
    /// The side forgets its tunnel silently and starts a new one.
    Restart {
        alice: bool,
    },
    Advance {
        millis: u32,
    },
    /// `handle_timeout` whether or not a deadline passed.
    Timeout {
        alice: bool,
    },
}

/// What one tunnel instance has shown so far.
#[derive(Debug, Default)]
struct Instance {
    established: bool,
    closed: bool,
    close_requested: bool,
    /// Our `data` ids not yet answered.
    in_flight: HashSet<String>,
    /// Plaintext bytes `send` accepted since the last answer reached the tunnel.
    accepted_since_answer: usize,
}

struct Side {
    alice: bool,
    creds: BotCredentials,
    policy: PeerPolicy,
    key: TunnelKey,
    tunnel: Option<Tunnel>,
    instance: Instance,
    /// Stanzas emitted and not yet delivered, dropped or tampered with.
    outbox: VecDeque<Element>,
    /// Every request id this side ever emitted.
    request_ids: HashSet<String>,
    /// Requests of the peer this side's tunnels got and did not answer yet, by id: an
    /// answer may wait for a reply (`TunnelConfig::ack_hold`), never come twice.
    owed: HashMap<String, usize>,
    /// The last few, for crafted answers.
    recent: VecDeque<String>,
    /// Every stanza this side's bot handed to `send`, routing stripped.
    sent: HashSet<Canon>,
    tunnels_made: u32,
}

impl Side {
    fn new(alice: bool, creds: BotCredentials, policy: PeerPolicy) -> Side {
        let (local, peer) = if alice { (ALICE, BOT) } else { (BOT, ALICE) };
        Side {
            alice,
            creds,
            policy,
            key: TunnelKey {
                local: local.into(),
                peer: peer.into(),
            },
            tunnel: None,
            instance: Instance::default(),
            outbox: VecDeque::new(),
            request_ids: HashSet::new(),
            owed: HashMap::new(),
            recent: VecDeque::new(),
            sent: HashSet::new(),
            tunnels_made: 0,
        }
    }

    fn params(&mut self, config: &TunnelConfig) -> TunnelParams {
        self.tunnels_made += 1;
        TunnelParams {
            config: config.clone(),
            key: self.key.clone(),
            creds: self.creds.clone(),
            policy: self.policy.clone(),
            id_prefix: format!(
                "{}-{}-",
                if self.alice { "a" } else { "b" },
                self.tunnels_made
            ),
        }
    }

    fn live(&mut self) -> Option<&mut Tunnel> {
        self.tunnel.as_mut().filter(|t| !t.is_gone())
    }
}

struct World {
    now: Instant,
    config: TunnelConfig,
    alice: Side,
    bot: Side,
    big_budget: usize,
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(setup) = Setup::arbitrary(&mut u) else {
        return;
    };
    let mut world = World::new(&setup);
    world.begin(&setup);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        world.apply(op);
    }
    world.settle();
}

impl World {
    fn new(setup: &Setup) -> World {
        let ids = identities();
        let defaults = TunnelConfig::default();
        let config = TunnelConfig {
            chunk_size: match setup.chunk {
                Chunk::Default => defaults.chunk_size,
                Chunk::Medium => 1024,
                Chunk::Small => 100,
            },
            window: match setup.window {
                0 => defaults.window,
                w => 1 + usize::from(w % 8),
            },
            max_queued_out: if setup.small_queue {
                8 * 1024
            } else {
                defaults.max_queued_out
            },
            max_inner_stanza: if setup.small_inner {
                2 * 1024
            } else {
                defaults.max_inner_stanza
            },
            idle_timeout: if setup.no_idle {
                None
            } else {
                defaults.idle_timeout
            },
            send_offer: !setup.no_offer,
            ack_hold: if setup.hold_acks {
                Duration::from_millis(50)
            } else {
                defaults.ack_hold
            },
            ..defaults
        };
        let alice_creds = match setup.cert {
            Cert::Alice => ids.alice.clone(),
            Cert::Mallory => ids.mallory.clone(),
        };
        let alice_spki = ids.alice.identity.info.fingerprints.spki_sha256.clone();
        let bot_policy = match setup.trust {
            Trust::Tofu => PeerPolicy::default(),
            Trust::PinnedAlice => PeerPolicy {
                trust: TrustMode::Pinned,
                pins: vec![alice_spki],
                ..PeerPolicy::default()
            },
            Trust::PinnedOther => PeerPolicy {
                pins: vec![Fingerprint::sha256(b"another key")],
                ..PeerPolicy::default()
            },
            Trust::PinnedNone => PeerPolicy {
                trust: TrustMode::Pinned,
                ..PeerPolicy::default()
            },
            Trust::Optional => PeerPolicy {
                peer_auth: PeerAuth::Optional,
                ..PeerPolicy::default()
            },
        };
        World {
            now: Instant::now(),
            config,
            alice: Side::new(true, alice_creds, PeerPolicy::default()),
            bot: Side::new(false, ids.bot.clone(), bot_policy),
            big_budget: BIG_BUDGET,
        }
    }

    fn side(&mut self, alice: bool) -> &mut Side {
        if alice {
            &mut self.alice
        } else {
            &mut self.bot
        }
    }

    fn begin(&mut self, setup: &Setup) {
        match setup.prefix {
            Prefix::Nothing => {}
            Prefix::Starting => self.initiate(true),
            Prefix::Crossing => {
                self.initiate(true);
                self.initiate(false);
            }
            Prefix::Open => {
                self.initiate(true);
                for _ in 0..1000 {
                    if !self.step() {
                        break;
                    }
                }
                let happy = matches!(setup.cert, Cert::Alice)
                    && matches!(
                        setup.trust,
                        Trust::Tofu | Trust::PinnedAlice | Trust::Optional
                    );
                if happy {
                    for side in [&self.alice, &self.bot] {
                        assert_eq!(
                            side.tunnel.as_ref().map(Tunnel::state),
                            Some(State::Open),
                            "the handshake prefix did not open {}",
                            side.key.local
                        );
                    }
                }
            }
        }
    }

    /// A side opens a new tunnel as initiator (forgetting any old one).
    fn initiate(&mut self, alice: bool) {
        let now = self.now;
        let config = self.config.clone();
        let side = self.side(alice);
        let params = side.params(&config);
        side.tunnel = Some(Tunnel::initiate(now, params));
        side.instance = Instance::default();
        self.drain(alice);
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Deliver { from_alice, pick } => {
                if let Some(el) = take(&mut self.side(from_alice).outbox, pick) {
                    self.deliver(!from_alice, el);
                }
            }
            Op::Step => {
                self.step();
            }
            Op::Drop { from_alice, pick } => {
                take(&mut self.side(from_alice).outbox, pick);
            }
            Op::Duplicate { from_alice, pick } => {
                let outbox = &self.side(from_alice).outbox;
                if !outbox.is_empty() {
                    let el = outbox[usize::from(pick) % outbox.len()].clone();
                    self.deliver(!from_alice, el);
                }
            }
            Op::Tamper {
                from_alice,
                pick,
                how,
            } => {
                let receiver_recent = self.side(!from_alice).recent.clone();
                if let Some(el) = take(&mut self.side(from_alice).outbox, pick) {
                    let el = tamper(el, how, &receiver_recent);
                    self.deliver(!from_alice, el);
                }
            }
            Op::Inject { to_alice, iq } => {
                let el = self.craft(to_alice, iq);
                self.deliver(to_alice, el);
            }
            Op::Send { alice, what } => self.send(alice, what),
            Op::Close { alice } => {
                let now = self.now;
                if let Some(t) = self.side(alice).live() {
                    t.close(now);
                    self.side(alice).instance.close_requested = true;
                    self.drain(alice);
                }
            }
            Op::Abandon { alice } => {
                if let Some(t) = self.side(alice).live() {
                    t.abandon(CloseReason::PeerGone);
                    self.drain(alice);
                }
            }
            Op::Restart { alice } => self.initiate(alice),
            Op::Advance { millis } => {
                self.now += Duration::from_millis(u64::from(millis));
                self.fire_timeouts();
            }
            Op::Timeout { alice } => {
                let now = self.now;
                if let Some(t) = self.side(alice).tunnel.as_mut() {
                    t.handle_timeout(now);
                    self.drain(alice);
                }
            }
        }
    }

    fn fire_timeouts(&mut self) {
        let now = self.now;
        for alice in [true, false] {
            if let Some(t) = self.side(alice).tunnel.as_mut()
                && t.poll_timeout().is_some_and(|at| at <= now)
            {
                t.handle_timeout(now);
                self.drain(alice);
            }
        }
    }

    /// Delivers everything queued, Alice's first; whether anything moved.
    fn step(&mut self) -> bool {
        let from_alice: Vec<Element> = self.alice.outbox.drain(..).collect();
        let from_bot: Vec<Element> = self.bot.outbox.drain(..).collect();
        let moved = !from_alice.is_empty() || !from_bot.is_empty();
        for el in from_alice {
            self.deliver(false, el);
        }
        for el in from_bot {
            self.deliver(true, el);
        }
        moved
    }

    fn send(&mut self, alice: bool, what: Outgoing) {
        let stanza = match what {
            // What the bot API and webhook replies let through (they refuse the rest with 422;
            // the XML writer panics on it).
            Outgoing::Chat(body) if is_xml_text(&body) => chat_message(&body, "chat"),
            Outgoing::Chat(_) => return,
            Outgoing::Xml(text) => match parse_stanza(&text) {
                Ok(el) => el,
                Err(_) => return,
            },
            Outgoing::Big(n) => {
                let size = (usize::from(n) + 1) * 1024;
                if size > self.big_budget {
                    return;
                }
                self.big_budget -= size;
                chat_message(&"x".repeat(size), "chat")
            }
        };
        let mut stripped = stanza.clone();
        remove_attr(&mut stripped, "from");
        remove_attr(&mut stripped, "to");
        let bytes = to_bytes(&stripped);
        let canon = Canon::of(&stripped);
        let now = self.now;
        let (window, chunk, max_queued) = (
            self.config.window,
            self.config.chunk_size,
            self.config.max_queued_out,
        );
        let side = self.side(alice);
        side.sent.insert(canon);
        let Some(t) = side.tunnel.as_mut() else {
            return;
        };
        let state = t.state();
        let sent = t.send(now, stanza);
        if state != State::Open {
            assert_eq!(sent, Err(SendError::NotOpen), "send outside Open");
        }
        if sent.is_ok() {
            let instance = &mut side.instance;
            instance.accepted_since_answer += bytes.len();
            assert!(
                instance.accepted_since_answer <= max_queued + window * chunk + bytes.len(),
                "send accepted {} bytes without any answer (max_queued_out {max_queued})",
                instance.accepted_since_answer
            );
        }
        self.drain(alice);
    }

    /// What the owner of a side (the session driver) does with an inbound stanza.
    fn deliver(&mut self, to_alice: bool, el: Element) {
        let now = self.now;
        let config = self.config.clone();
        let Ok(iq) = Iq::parse(&el) else {
            // Not an IQ for the engine: the driver answers it, no tunnel sees it.
            return;
        };
        if iq.type_ == IqType::Set
            && let Ok(XtlsElement::Start { offer }) = classify_request(&iq)
        {
            let side = self.side(to_alice);
            match decide_start(side.live().map(|t| &*t)) {
                StartDecision::Accept => {}
                StartDecision::Conflict => {
                    side.outbox.push_back(iq.error(
                        ErrorType::Cancel,
                        DefinedCondition::Conflict,
                        "",
                    ));
                    return;
                }
                StartDecision::Replace => {
                    if let Some(t) = side.live() {
                        t.abandon(CloseReason::Replaced);
                    }
                    self.drain(to_alice);
                }
            }
            let side = self.side(to_alice);
            let params = side.params(&config);
            match Tunnel::accept(now, params, &iq, offer.as_ref()) {
                Ok(t) => {
                    side.tunnel = Some(t);
                    side.instance = Instance::default();
                    *side.owed.entry(iq.id.clone()).or_default() += 1;
                    let out = self.drain(to_alice);
                    assert_eq!(answers(&out, &iq.id), 1, "a start gets one answer");
                }
                Err(refusal) => {
                    let reply = Iq::parse(&refusal.reply).expect("a refusal is an IQ");
                    assert_eq!(
                        (reply.type_, reply.id.as_str()),
                        (IqType::Error, iq.id.as_str())
                    );
                    side.outbox.push_back(refusal.reply);
                }
            }
            return;
        }
        let side = self.side(to_alice);
        if side.live().is_none() {
            if iq.type_.is_request() {
                side.outbox.push_back(iq.error(
                    ErrorType::Cancel,
                    DefinedCondition::ItemNotFound,
                    "",
                ));
            }
            return;
        }
        if !iq.type_.is_request() {
            side.instance.in_flight.remove(&iq.id);
            side.instance.accepted_since_answer = 0;
        }
        if iq.type_.is_request() {
            *side.owed.entry(iq.id.clone()).or_default() += 1;
        }
        if let Some(t) = side.live() {
            t.handle_iq(now, &iq);
        }
        let out = self.drain(to_alice);
        if iq.type_.is_request() {
            // Answered at once, unless it waits for a reply; answered twice never (`drain`).
            let owed = self.side(to_alice).owed.get(&iq.id).copied().unwrap_or(0);
            assert!(
                owed == 0 || !self.config.ack_hold.is_zero(),
                "a request to a live tunnel gets its answer at once: {out:?}"
            );
        }
    }

    /// Moves what a side's tunnel emitted to its outbox, checking it; returns the stanzas.
    fn drain(&mut self, alice: bool) -> Vec<Element> {
        let window = self.config.window;
        let chunk = self.config.chunk_size;
        let side = self.side(alice);
        let Some(t) = side.tunnel.as_mut() else {
            return Vec::new();
        };
        let out: Vec<Element> = std::iter::from_fn(|| t.poll_transmit()).collect();
        let events: Vec<Event> = std::iter::from_fn(|| t.poll_event()).collect();
        let gone = t.is_gone();
        let state = t.state();
        let deadline = t.poll_timeout();
        // A local TLS failure sends what TLS queued and its alert beyond the window (spec
        // §1.11), in chunks, and the tunnel is gone. (Answers are counted in `owed`.)
        let requests = out
            .iter()
            .filter(|el| matches!(el.attr("type"), Some("set" | "get")))
            .count();
        assert!(
            gone || requests <= window + 2,
            "one call emitted {requests} requests with a window of {window}"
        );
        for el in &out {
            let iq = Iq::parse(el).expect("a tunnel emits IQs only");
            assert_eq!(iq.from, side.key.local, "emitted from another JID");
            assert_eq!(iq.to, side.key.peer, "emitted to another JID");
            if !iq.type_.is_request() {
                match side.owed.get_mut(&iq.id) {
                    Some(n) if *n > 0 => *n -= 1,
                    _ => panic!("an answer to no request, or a second one: {el:?}"),
                }
                continue;
            }
            assert_eq!(iq.type_, IqType::Set);
            assert!(
                side.request_ids.insert(iq.id.clone()),
                "request id {} reused",
                iq.id
            );
            side.recent.push_back(iq.id.clone());
            if side.recent.len() > 16 {
                side.recent.pop_front();
            }
            let payload = iq.single_payload().expect("one payload per request");
            match XtlsElement::parse(payload).expect("an XTLS payload") {
                XtlsElement::Data { text, .. } => {
                    let bytes = decode_data(&text).expect("we send valid base64");
                    assert!(!bytes.is_empty(), "empty data sent");
                    assert!(bytes.len() <= chunk, "{} bytes in one data", bytes.len());
                    side.instance.in_flight.insert(iq.id.clone());
                }
                XtlsElement::Close => side.instance.in_flight.clear(),
                XtlsElement::Start { .. } => {}
                other => panic!("{other:?} sent as a request"),
            }
        }
        if gone {
            // The alert of a local TLS failure goes out beyond the window (spec §1.11).
            side.instance.in_flight.clear();
        }
        assert!(
            side.instance.in_flight.len() <= window,
            "{} data unacknowledged with a window of {window}",
            side.instance.in_flight.len()
        );
        let (side, peer) = if alice {
            (&mut self.alice, &self.bot)
        } else {
            (&mut self.bot, &self.alice)
        };
        let peer_sent = &peer.sent;
        for event in events {
            let instance = &mut side.instance;
            assert!(!instance.closed, "{event:?} after Closed");
            match event {
                Event::Established(_) => {
                    assert!(!instance.established, "established twice");
                    instance.established = true;
                }
                Event::Stanza(stanza) => {
                    assert_eq!(stanza.attr("from"), Some(side.key.peer.as_str()));
                    assert_eq!(stanza.attr("to"), Some(side.key.local.as_str()));
                    let mut stripped = stanza.clone();
                    remove_attr(&mut stripped, "from");
                    remove_attr(&mut stripped, "to");
                    assert!(
                        peer_sent.contains(&Canon::of(&stripped)),
                        "delivered a stanza the peer never sent: {}",
                        String::from_utf8_lossy(&to_bytes(&stripped))
                    );
                }
                // A local error for one of our inner requests the peer left unanswered: it
                // comes just before Closed, addressed as if from the peer.
                Event::Unanswered(answer) => {
                    assert_eq!(answer.attr("from"), Some(side.key.peer.as_str()));
                    assert_eq!(answer.attr("to"), Some(side.key.local.as_str()));
                    assert_eq!(answer.attr("type"), Some("error"));
                }
                Event::Writable | Event::Acknowledged(_) => {}
                Event::Closed(_) => instance.closed = true,
            }
        }
        let instance = &side.instance;
        assert_eq!(instance.closed, gone, "Closed reported iff gone");
        if state == State::Open {
            assert!(instance.established, "Open without Established");
        }
        let needs_deadline = matches!(state, State::Starting | State::Handshaking | State::Closing)
            || (state == State::Open && instance.close_requested);
        if needs_deadline {
            assert!(deadline.is_some(), "{state:?} without a deadline");
        }
        if gone {
            assert!(deadline.is_none(), "a gone tunnel with a deadline");
        }
        side.outbox.extend(out.iter().cloned());
        out
    }

    fn craft(&mut self, to_alice: bool, crafted: Crafted) -> Element {
        let side = self.side(to_alice);
        let id = match crafted.id {
            IdChoice::Recent(n) if !side.recent.is_empty() => {
                side.recent[usize::from(n) % side.recent.len()].clone()
            }
            IdChoice::Recent(n) | IdChoice::Fixed(n) => format!("x{n}"),
        };
        let mut el = build_iq(IqType::Set, &id, &side.key.peer, &side.key.local, None);
        set_kind(&mut el, crafted.kind);
        for child in payload(crafted.payload) {
            el.append_child(child);
        }
        el
    }

    /// Both sides close; everything is delivered and every deadline fires until both are gone.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let now = self.now;
            for alice in [true, false] {
                let side = self.side(alice);
                if side.instance.close_requested {
                    continue;
                }
                if let Some(t) = side.live() {
                    t.close(now);
                    side.instance.close_requested = true;
                    self.drain(alice);
                }
            }
            if self.step() {
                continue;
            }
            let next = [&self.alice, &self.bot]
                .iter()
                .filter_map(|s| s.tunnel.as_ref().and_then(Tunnel::poll_timeout))
                .min();
            match next {
                Some(at) => {
                    self.now = self.now.max(at);
                    self.fire_timeouts();
                }
                None => {
                    for side in [&self.alice, &self.bot] {
                        if let Some(t) = &side.tunnel {
                            assert!(t.is_gone(), "{} stuck in {:?}", side.key.local, t.state());
                        }
                    }
                    return;
                }
            }
        }
        panic!("the pair did not settle after closing");
    }
}

/// Removes the queued stanza at `pick` (modulo the queue length).
fn take(queue: &mut VecDeque<Element>, pick: u8) -> Option<Element> {
    if queue.is_empty() {
        return None;
    }
    let at = usize::from(pick) % queue.len();
    queue.remove(at)
}

/// How many answers (result or error) to `id` are in `out`.
fn answers(out: &[Element], id: &str) -> usize {
    out.iter()
        .filter(|el| {
            el.attr("id") == Some(id) && matches!(el.attr("type"), Some("result" | "error"))
        })
        .count()
}

fn set_kind(el: &mut Element, kind: Kind) {
    let value = match kind {
        Kind::Set => "set",
        Kind::Result => "result",
        Kind::Error => "error",
        Kind::Get => "get",
        Kind::Bogus => "subscribe",
    };
    set_attr(el, "type", value);
}

fn offer(choice: OfferChoice) -> Option<Element> {
    let mut offer = Element::bare("offer", ns::C2CTLS);
    match choice {
        OfferChoice::None => return None,
        OfferChoice::Empty => {}
        OfferChoice::Srp => {
            offer.append_child(Element::bare("srp", ns::C2CTLS));
        }
        OfferChoice::Key => {
            let mut name = Element::bare("name", ns::PUBKEY);
            name.append_text("0123456789abcdef0123456789abcdef01234567");
            let mut keyinfo = Element::bare("keyinfo", ns::PUBKEY);
            keyinfo.append_child(name);
            offer.append_child(keyinfo);
        }
        OfferChoice::Insecure => {
            offer.append_child(Element::bare("insecure", ns::C2CTLS));
        }
    }
    Some(offer)
}

fn payload(payload: Payload) -> Vec<Element> {
    let with_offer = |name: &str, choice: OfferChoice| {
        let mut el = Element::bare(name, ns::XTLS);
        if let Some(offer) = offer(choice) {
            el.append_child(offer);
        }
        vec![el]
    };
    match payload {
        Payload::None => Vec::new(),
        Payload::Start(o) => with_offer("start", o),
        Payload::Proceed(o) => with_offer("proceed", o),
        Payload::Data { text, method } => {
            let text = match text {
                DataText::Base64(bytes) => encode_data(&bytes),
                DataText::Wrapped(bytes) => encode_data(&bytes)
                    .as_bytes()
                    .chunks(7)
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect::<Vec<_>>()
                    .join("\r\n "),
                DataText::Raw(text) => text,
                DataText::Oversized => encode_data(&vec![0x17; 65_536]),
                DataText::Empty => String::new(),
            };
            let method = match method {
                Method::None => None,
                Method::X509 => Some("x509".to_owned()),
                Method::Srp => Some("srp".to_owned()),
                Method::Other(m) => Some(m),
            };
            vec![XtlsElement::Data { text, method }.to_element()]
        }
        Payload::Close => vec![XtlsElement::Close.to_element()],
        Payload::Closed => vec![XtlsElement::Closed.to_element()],
        Payload::Unknown => vec![Element::bare("foo", ns::XTLS)],
        Payload::Foreign => vec![Element::bare("query", ns::DISCO_INFO)],
        Payload::Two => vec![
            XtlsElement::Close.to_element(),
            XtlsElement::Close.to_element(),
        ],
        Payload::StanzaError(n) => {
            let conditions = [
                DefinedCondition::ItemNotFound,
                DefinedCondition::BadRequest,
                DefinedCondition::Conflict,
                DefinedCondition::NotAcceptable,
                DefinedCondition::ServiceUnavailable,
                DefinedCondition::FeatureNotImplemented,
                DefinedCondition::ResourceConstraint,
                DefinedCondition::RecipientUnavailable,
                DefinedCondition::UnexpectedRequest,
                DefinedCondition::PolicyViolation,
            ];
            let condition = conditions[usize::from(n) % conditions.len()].clone();
            vec![error_element(ErrorType::Cancel, condition, "")]
        }
    }
}

/// Applies a tamper to a stanza in transit.
fn tamper(el: Element, how: Tamper, receiver_recent: &VecDeque<String>) -> Element {
    let Ok(iq) = Iq::parse(&el) else {
        return el;
    };
    let data = || {
        iq.children
            .iter()
            .find_map(|c| match XtlsElement::parse(c) {
                Ok(XtlsElement::Data { text, method }) => {
                    decode_data(&text).ok().map(|bytes| (bytes, method))
                }
                _ => None,
            })
    };
    let rebuild = |children: Vec<Element>| {
        let mut out = build_iq(iq.type_, &iq.id, &iq.from, &iq.to, None);
        for child in children {
            out.append_child(child);
        }
        out
    };
    let with_data = |bytes: &[u8], method: Option<String>| {
        rebuild(vec![
            XtlsElement::Data {
                text: encode_data(bytes),
                method,
            }
            .to_element(),
        ])
    };
    match how {
        Tamper::FlipBit { at, bit } => match data() {
            Some((mut bytes, method)) if !bytes.is_empty() => {
                let at = usize::from(at) % bytes.len();
                bytes[at] ^= 1 << (bit % 8);
                with_data(&bytes, method)
            }
            _ => el,
        },
        Tamper::Truncate(len) => match data() {
            Some((bytes, method)) => {
                let len = usize::from(len) % (bytes.len() + 1);
                with_data(&bytes[..len], method)
            }
            None => el,
        },
        Tamper::Append(extra) => match data() {
            Some((mut bytes, method)) => {
                bytes.extend_from_slice(&extra);
                with_data(&bytes, method)
            }
            None => el,
        },
        Tamper::SetKind(kind) => {
            let mut el = el;
            set_kind(&mut el, kind);
            el
        }
        Tamper::SetId(n) => {
            let mut el = el;
            let id = if receiver_recent.is_empty() {
                format!("x{n}")
            } else {
                receiver_recent[usize::from(n) % receiver_recent.len()].clone()
            };
            set_attr(&mut el, "id", &id);
            el
        }
        Tamper::Replace(p) => rebuild(payload(p)),
        Tamper::ExtraChild => {
            let mut el = el;
            el.append_child(Element::bare("extra", ns::XTLS));
            el
        }
    }
}
