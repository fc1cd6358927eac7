//! The XTLS tunnel engine: one tunnel as a sans-IO state machine (spec §1.5–§1.14).
//!
//! ```text
//!            IQ stanzas (ciphertext)                      plaintext stanzas and events
//!   peer ──▶ handle_iq(now, iq) ─────────┐          ┌───▶ poll_event(): Established, Stanza,
//!                                        │  Tunnel  │                   Writable, Closed
//!   peer ◀── poll_transmit() ◀───────────┤ (rustls) ◀──── send(now, stanza), close(now)
//!            handle_timeout(now) ───────▶└──────────┘     poll_timeout() ─▶ next deadline
//! ```
//!
//! The contract: construct with [`Tunnel::accept`] (responder, on a peer's `start`) or
//! [`Tunnel::initiate`] (initiator). Feed every IQ of the tunnel's key with
//! [`Tunnel::handle_iq`], and call [`Tunnel::handle_timeout`] once the instant from
//! [`Tunnel::poll_timeout`] has passed (spurious calls are harmless). After every call drain
//! [`Tunnel::poll_transmit`] (stanzas to write, in order) and [`Tunnel::poll_event`]. Time is
//! an [`Instant`] supplied by the caller and must not go backwards. Once
//! [`Tunnel::is_gone`] is true and both queues are drained, the tunnel can be dropped.
//!
//! No sockets, no clock, no tasks: everything that happens is a consequence of these calls.

mod events;
mod framing;
mod timers;
mod tls;

use std::collections::VecDeque;
use std::fmt;
use std::time::Instant;

use minidom::Element;

use crate::stanza::xtls::{Offer, XtlsElement};
use crate::stanza::{
    DefinedCondition, ErrorType, Iq, IqType, build_iq, carries_as_xml, decode_data, remove_attr,
};
use crate::xml::{StreamReader, to_bytes};

pub use tls::{
    BotCredentials, CredentialsError, PeerAuth, PeerPolicy, TrustMode, TrustVerdict, VerifyError,
    judge,
};
use tls::{TlsFailure, TlsSession};

pub use events::{CloseReason, Established, Event, PeerIdentity, SendError, Stats};
pub use timers::TunnelConfig;

/// The identity of a tunnel on the wire (spec §1.2): local JID as addressed, peer JID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelKey {
    /// Our JID exactly as the peer addresses it (bare or full), normalized.
    pub local: String,
    /// The peer's JID as stamped by the server, normalized.
    pub peer: String,
}

impl fmt::Display for TunnelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} <-> {}", self.local, self.peer)
    }
}

/// Which end of the tunnel we are (spec §1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub enum Role {
    /// We sent `start`: TLS client.
    Initiator,
    /// We answered `proceed`: TLS server.
    Responder,
}

named_enum!(Role, "tunnel role", {
    Initiator => "initiator",
    Responder => "responder",
});

/// The states of spec §1.14.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
pub enum State {
    /// Initiator: `start` sent, no answer yet.
    Starting,
    /// TLS handshake in progress.
    Handshaking,
    /// Application data flows.
    Open,
    /// We sent `close` and wait for `closed`.
    Closing,
    /// Terminal.
    Closed,
}

named_enum!(State, "tunnel state", {
    Starting => "starting",
    Handshaking => "handshaking",
    Open => "open",
    Closing => "closing",
    Closed => "closed",
});

/// What the owner of a table of tunnels does with a peer's `start` (spec §1.14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartDecision {
    /// No live tunnel has the key: handle the `start` as new ([`Tunnel::accept`]).
    Accept,
    /// We win a simultaneous start: answer `conflict`, keep waiting for our `proceed`.
    Conflict,
    /// Abandon the live tunnel ([`CloseReason::Replaced`]), then handle the `start` as new.
    Replace,
}

/// Decides a peer's `start` given the live tunnel with the same key, if any (spec §1.14).
///
/// A true race (both sent `start`) is won by the JID that sorts first (i;octet): ours is the
/// `from` of our start (`key.local`), theirs the `from` of theirs (`key.peer`). In any other
/// live state the peer lost its state, and the old tunnel gives way.
pub fn decide_start(live: Option<&Tunnel>) -> StartDecision {
    match live.filter(|t| !t.is_gone()) {
        None => StartDecision::Accept,
        Some(t) if t.state == State::Starting && t.key.local.as_bytes() < t.key.peer.as_bytes() => {
            StartDecision::Conflict
        }
        Some(_) => StartDecision::Replace,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Start,
    /// `start..end`: the chunk's place in the ciphertext we ever queued.
    Data {
        handshake: bool,
        start: u64,
        end: u64,
    },
    Close,
}

#[derive(Debug)]
struct Outstanding {
    id: String,
    kind: Request,
    deadline: Instant,
}

/// One XTLS tunnel.
pub struct Tunnel {
    key: TunnelKey,
    role: Role,
    state: State,
    config: TunnelConfig,
    creds: BotCredentials,
    policy: PeerPolicy,
    tls: Option<TlsSession>,
    id_prefix: String,
    next_id: u64,
    /// Our requests awaiting an answer, oldest first.
    outstanding: VecDeque<Outstanding>,
    /// Ciphertext produced by TLS and not yet put into a `data` IQ.
    out_bytes: VecDeque<u8>,
    /// Whether our first `data` went out (it carries `method`).
    sent_first_data: bool,
    /// Whether the peer's first `data` arrived (its `method` is checked).
    seen_first_data: bool,
    /// Initiator: `data` IQs carrying handshake bytes not yet acknowledged.
    hs_unacked: usize,
    /// A graceful close is under way: `<close/>` follows once all data is acknowledged.
    close_pending: Option<CloseReason>,
    /// Why we are in `Closing`.
    closing_reason: Option<CloseReason>,
    handshake_deadline: Option<Instant>,
    close_deadline: Option<Instant>,
    idle_deadline: Option<Instant>,
    peer_eof_deadline: Option<Instant>,
    blocked: bool,
    /// Ciphertext bytes ever queued for the peer.
    bytes_queued: u64,
    /// Marks of sent stanzas not yet acknowledged, oldest first.
    marks: VecDeque<u64>,
    /// Inner IQ requests: ours awaiting the peer's answer, and the peer's awaiting ours
    /// (spec §1.9 rule 7).
    inner_iqs: framing::InnerIqs,
    /// The reader of the inner stream; dropped between stanzas (its parser keeps an 8 KiB
    /// token buffer, half an idle tunnel's memory) and made again for the next one.
    inner: Option<Box<StreamReader>>,
    plaintext: Vec<u8>,
    transmit: VecDeque<Element>,
    /// Acknowledgements of the peer's `data` not yet in `transmit`, and when the first was
    /// made: they leave when polled, after our `data` (see `settle_acks`).
    acks: Vec<Element>,
    acks_at: Option<Instant>,
    /// Until when they wait for the owner's reply ([`TunnelConfig::ack_hold`]).
    acks_held_until: Option<Instant>,
    /// A `data` of ours was queued since they were made: they can leave behind it.
    acks_ride: bool,
    /// Whether the owner answers what arrives: false once a hold ran out with no reply,
    /// true again when the owner writes.
    expect_reply: bool,
    events: VecDeque<Event>,
    stats: Stats,
    established: Option<Established>,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tunnel")
            .field("key", &self.key)
            .field("role", &self.role)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// What a new tunnel is made of.
#[derive(Debug, Clone)]
pub struct TunnelParams {
    /// Timers and limits.
    pub config: TunnelConfig,
    /// The tunnel's key.
    pub key: TunnelKey,
    /// The bot's TLS credentials.
    pub creds: BotCredentials,
    /// How the peer is judged.
    pub policy: PeerPolicy,
    /// Prefix of the IQ ids this tunnel originates: unique in the process and unpredictable
    /// (spec §1.12 rule 1).
    pub id_prefix: String,
}

/// Why a `start` was refused before any tunnel existed.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The error IQ to send.
    pub reply: Element,
    /// The condition, for logs.
    pub condition: DefinedCondition,
}

impl Tunnel {
    fn new(role: Role, params: TunnelParams) -> Tunnel {
        let TunnelParams {
            config,
            key,
            creds,
            policy,
            id_prefix,
        } = params;
        Tunnel {
            key,
            role,
            state: State::Starting,
            config,
            creds,
            policy,
            tls: None,
            id_prefix,
            next_id: 0,
            outstanding: VecDeque::new(),
            out_bytes: VecDeque::new(),
            sent_first_data: false,
            seen_first_data: false,
            hs_unacked: 0,
            close_pending: None,
            closing_reason: None,
            handshake_deadline: None,
            close_deadline: None,
            idle_deadline: None,
            peer_eof_deadline: None,
            blocked: false,
            bytes_queued: 0,
            marks: VecDeque::new(),
            inner_iqs: framing::InnerIqs::default(),
            inner: None,
            plaintext: Vec::new(),
            transmit: VecDeque::new(),
            acks: Vec::new(),
            acks_at: None,
            acks_held_until: None,
            acks_ride: false,
            expect_reply: true,
            events: VecDeque::new(),
            stats: Stats::default(),
            established: None,
        }
    }

    /// Answers a peer's `start` as responder (spec §1.5): on success the `proceed` is queued
    /// and the TLS server exists; on refusal the error reply is returned.
    ///
    /// `id_prefix` must be unique in the process and unpredictable (spec §1.12 rule 1).
    pub fn accept(
        now: Instant,
        params: TunnelParams,
        start: &Iq,
        offer: Option<&Offer>,
    ) -> Result<Tunnel, Box<Refusal>> {
        let refuse = |condition: DefinedCondition, text: &str| {
            Box::new(Refusal {
                reply: start.error(ErrorType::Cancel, condition.clone(), text),
                condition,
            })
        };
        if offer.is_some_and(|o| o.key_names.is_empty()) {
            return Err(refuse(
                DefinedCondition::NotAcceptable,
                "an X.509 client certificate is required; SRP is not supported",
            ));
        }
        let peer_bare = bare(&params.key.peer).to_owned();
        let proceed_offer = offer.map(|offer| proceed_offer(&params, offer));
        let mut tunnel = Tunnel::new(Role::Responder, params);
        tunnel.tls = Some(TlsSession::server(
            &tunnel.creds,
            &peer_bare,
            tunnel.policy.clone(),
        ));
        tunnel.state = State::Handshaking;
        tunnel.handshake_deadline = Some(now + tunnel.config.handshake_timeout);
        let proceed = XtlsElement::Proceed {
            offer: proceed_offer,
        }
        .to_element();
        tunnel.transmit.push_back(start.result(Some(proceed)));
        Ok(tunnel)
    }

    /// Opens a tunnel as initiator: queues the `start` (spec §1.5).
    pub fn initiate(now: Instant, params: TunnelParams) -> Tunnel {
        let mut tunnel = Tunnel::new(Role::Initiator, params);
        let offer = tunnel.config.send_offer.then(|| Offer {
            key_names: own_key_names(&tunnel.creds),
            ..Offer::default()
        });
        tunnel.handshake_deadline = Some(now + tunnel.config.handshake_timeout);
        tunnel.request(
            now,
            Request::Start,
            XtlsElement::Start { offer }.to_element(),
        );
        tunnel
    }

    /// The tunnel's key.
    pub fn key(&self) -> &TunnelKey {
        &self.key
    }

    /// Our role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Facts of the handshake, once established.
    pub fn established(&self) -> Option<&Established> {
        self.established.as_ref()
    }

    /// Fills `out` from the tunnel's TLS exporter (RFC 8446 §7.5) with this label and
    /// context: keying material both ends share and no one else can compute, for the
    /// short authentication string ([`crate::sas`]) and channel bindings. `None` until the
    /// handshake is done and once the TLS session is dropped.
    pub fn export_keying_material(
        &self,
        out: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Option<()> {
        self.established.as_ref()?;
        self.tls
            .as_ref()?
            .export_keying_material(out, label, context)
            .ok()
    }

    /// Whether the tunnel reached its terminal state.
    pub fn is_gone(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether [`Tunnel::poll_transmit`] or [`Tunnel::poll_event`] has something.
    pub fn has_output(&self) -> bool {
        !self.transmit.is_empty()
            || (!self.acks.is_empty() && self.acks_held_until.is_none())
            || !self.events.is_empty()
    }

    /// The next stanza to write to the server.
    ///
    /// Poll the events first and act on them (a bot answering what arrived writes its reply
    /// then), then every stanza, and write them together: a reply written while the
    /// acknowledgement of the `data` that prompted it still waits here is not held back by
    /// the window's batching, and leaves just before that acknowledgement.
    pub fn poll_transmit(&mut self) -> Option<Element> {
        if !self.acks.is_empty() && self.acks_held_until.is_none() {
            self.settle_acks();
        }
        let next = self.transmit.pop_front();
        if next.is_none() {
            self.release_idle_queues();
        }
        next
    }

    /// The next event for the owner.
    pub fn poll_event(&mut self) -> Option<Event> {
        let next = self.events.pop_front();
        if next.is_none() {
            self.release_idle_queues();
        }
        next
    }

    /// Gives back the memory of the queues that are empty: a queue keeps the capacity its
    /// busiest moment needed, and an idle tunnel would hold about 2 KiB of it for good
    /// (docs/performance.md). Called when the owner has polled everything out.
    fn release_idle_queues(&mut self) {
        fn release<T>(queue: &mut VecDeque<T>) {
            if queue.is_empty() && queue.capacity() > 0 {
                *queue = VecDeque::new();
            }
        }
        release(&mut self.transmit);
        release(&mut self.events);
        release(&mut self.out_bytes);
        release(&mut self.outstanding);
        release(&mut self.marks);
        if self.acks.is_empty() && self.acks.capacity() > 0 {
            self.acks = Vec::new();
        }
        if self.plaintext.is_empty() && self.plaintext.capacity() > 0 {
            self.plaintext = Vec::new();
        }
        self.inner_iqs.release_idle();
    }

    /// Handles an IQ of this tunnel's key other than `start` (which the owner routes to
    /// [`Tunnel::accept`] or the tie-break): `data` and `close` requests, and answers to ours.
    pub fn handle_iq(&mut self, now: Instant, iq: &Iq) {
        if self.state == State::Closed {
            return;
        }
        match iq.type_ {
            IqType::Result | IqType::Error => self.handle_response(now, iq),
            IqType::Get | IqType::Set => {
                let payload = match classify_request(iq) {
                    Ok(payload) => payload,
                    Err(reply) => {
                        // A malformed XTLS request: answered, and the tunnel is gone (spec §1.11).
                        self.answer(reply);
                        self.finish(CloseReason::Protocol("malformed XTLS request".into()));
                        return;
                    }
                };
                match payload {
                    XtlsElement::Data { text, method } => {
                        self.handle_data(now, iq, &text, method.as_deref())
                    }
                    XtlsElement::Close => self.handle_close(iq),
                    // `start` is routed by the owner; reaching here means a bug upstream.
                    XtlsElement::Start { .. }
                    | XtlsElement::Proceed { .. }
                    | XtlsElement::Closed => {
                        self.answer(iq.error(ErrorType::Modify, DefinedCondition::BadRequest, ""))
                    }
                }
            }
        }
    }

    /// Queues a stanza for the peer: routing stripped (spec §1.9 rule 4), encrypted, chunked.
    /// Returns its mark: [`Event::Acknowledged`] with this mark (or a later one) follows once
    /// the peer acknowledged every `data` carrying it.
    pub fn send(&mut self, now: Instant, mut stanza: Element) -> Result<u64, SendError> {
        // After the peer's close_notify, no more application data (spec §1.10 rule 5).
        if self.state != State::Open
            || self.close_pending.is_some()
            || self.peer_eof_deadline.is_some()
        {
            return Err(SendError::NotOpen);
        }
        if !carries_as_xml(&stanza) {
            return Err(SendError::NotXml);
        }
        // Checked first, recorded only once the stanza is written: a refused send changes
        // nothing, so the same stanza can be sent again.
        let iq = self.inner_iqs.check_send(&stanza)?;
        if self.out_bytes.len() >= self.config.max_queued_out {
            self.blocked = true;
            return Err(SendError::Blocked);
        }
        remove_attr(&mut stanza, "from");
        remove_attr(&mut stanza, "to");
        let bytes = to_bytes(&stanza);
        let tls = self.tls.as_mut().expect("an open tunnel has TLS");
        if tls.write_plaintext(&bytes).is_err() {
            self.blocked = true;
            return Err(SendError::Blocked);
        }
        self.inner_iqs.record_send(iq);
        self.stats.stanzas_out += 1;
        self.touch(now);
        // The reply the held acknowledgements waited for: it leaves now, and they behind it.
        self.expect_reply = true;
        let riding = self.acks_held_until.take().is_some();
        self.flush_with(now, riding);
        let mark = self.bytes_queued;
        self.marks.push_back(mark);
        Ok(mark)
    }

    /// Closes gracefully: close_notify in a `data`, then `<close/>` after its ack (spec §1.10).
    pub fn close(&mut self, now: Instant) {
        self.close_with(now, CloseReason::Local);
    }

    /// [`Tunnel::close`], reporting `reason` when it is done (shutdown, bot deleted).
    pub fn close_because(&mut self, now: Instant, reason: CloseReason) {
        self.close_with(now, reason);
    }

    /// Ends the tunnel at once without sending anything (the stream is gone, or the peer is).
    pub fn abandon(&mut self, reason: CloseReason) {
        self.finish(reason);
    }

    fn close_with(&mut self, now: Instant, reason: CloseReason) {
        match self.state {
            State::Starting => {
                self.outstanding.clear();
                self.send_close_iq(now);
                self.finish(reason);
            }
            State::Handshaking | State::Open => {
                if self.close_pending.is_some() {
                    return;
                }
                self.idle_deadline = None;
                if let Some(tls) = self.tls.as_mut() {
                    tls.send_close_notify();
                }
                self.close_pending = Some(reason);
                self.flush(now);
            }
            State::Closing | State::Closed => {}
        }
    }

    fn handle_close(&mut self, iq: &Iq) {
        // Spec §1.10 rule 2: reply, keep what is complete, drop the rest.
        self.answer(iq.result(Some(XtlsElement::Closed.to_element())));
        let reason = match self.state {
            State::Closing => self
                .closing_reason
                .take()
                .unwrap_or(CloseReason::PeerClosed),
            _ => CloseReason::PeerClosed,
        };
        self.finish(reason);
    }

    fn handle_data(&mut self, now: Instant, iq: &Iq, text: &str, method: Option<&str>) {
        if self.state == State::Starting {
            self.fail(
                iq,
                DefinedCondition::UnexpectedRequest,
                "data before proceed",
                CloseReason::Protocol("data before proceed".into()),
            );
            return;
        }
        let bytes = match decode_data(text) {
            Ok(bytes) => bytes,
            Err(e) => {
                let text = e.to_string();
                self.fail(
                    iq,
                    e.condition(),
                    &text,
                    CloseReason::Protocol(text.clone()),
                );
                return;
            }
        };
        if !self.seen_first_data
            && self.role == Role::Responder
            && let Some(method) = method.filter(|m| *m != "x509")
        {
            {
                let text = format!("method '{method}' is not supported");
                self.fail(
                    iq,
                    DefinedCondition::FeatureNotImplemented,
                    &text,
                    CloseReason::Protocol(text.clone()),
                );
                return;
            }
        }
        self.seen_first_data = true;
        self.stats.bytes_in += bytes.len() as u64;
        if bytes.is_empty() {
            self.acknowledge(now, iq);
            return;
        }
        let tls = self.tls.as_mut().expect("a tunnel past Starting has TLS");
        let mut plaintext = std::mem::take(&mut self.plaintext);
        let fed = tls.feed(&bytes, &mut plaintext);
        let eof = match fed {
            Ok(eof) => eof,
            Err(TlsFailure::PeerAlert(alert)) => {
                self.answer(iq.result(None));
                // Stanzas completed before the alert still count; a parse error no longer does.
                let _ = self.deliver_plaintext(&plaintext);
                self.finish(CloseReason::PeerAlert(alert));
                return;
            }
            Err(failure) => {
                // Spec §1.11, local TLS failure: the alert goes first, then the error reply.
                // What TLS queued before the alert (a whole handshake flight, say) can be
                // larger than a chunk: spec §1.7 rule 2 holds here too.
                let mut alert = Vec::new();
                tls.drain_output(&mut alert);
                self.release_acks();
                for chunk in alert.chunks(self.config.chunk_size.max(1)) {
                    let data = XtlsElement::data(chunk, None).to_element();
                    let id = self.fresh_id();
                    self.transmit.push_back(build_iq(
                        IqType::Set,
                        &id,
                        &self.key.local,
                        &self.key.peer,
                        Some(data),
                    ));
                }
                let (condition, reason) = match failure {
                    TlsFailure::CertificateRejected(why) => (
                        DefinedCondition::NotAcceptable,
                        CloseReason::CertificateRejected(why),
                    ),
                    TlsFailure::Protocol(text) | TlsFailure::PeerAlert(text) => {
                        (DefinedCondition::BadRequest, CloseReason::TlsError(text))
                    }
                };
                let text = reason.to_string();
                self.answer(iq.error(ErrorType::Cancel, condition, &text));
                self.finish(reason);
                return;
            }
        };
        self.acknowledge(now, iq);
        let inner_ok = self.deliver_plaintext(&plaintext);
        let had_plaintext = !plaintext.is_empty();
        plaintext.clear();
        self.plaintext = plaintext;
        if let Err(reason) = inner_ok {
            self.begin_closing(now, reason);
            return;
        }
        if self.state == State::Open && had_plaintext {
            self.touch(now);
        }
        if eof && self.peer_eof_deadline.is_none() {
            self.peer_eof_deadline = Some(now + self.config.peer_eof_timeout);
        }
        // TLS output first: an initiator's last handshake flight must count as unacknowledged
        // before the Open rule is checked (spec §1.8). Nothing goes out after our `<close/>`.
        if matches!(self.state, State::Handshaking | State::Open) {
            self.flush(now);
            self.check_open(now);
        }
    }

    fn handle_response(&mut self, now: Instant, iq: &Iq) {
        let Some(pos) = self.outstanding.iter().position(|o| o.id == iq.id) else {
            tracing::debug!(tunnel = %self.key, id = iq.id, "answer to no outstanding request dropped");
            return;
        };
        let request = self.outstanding.remove(pos).expect("position is valid");
        let ok = iq.type_ == IqType::Result;
        match request.kind {
            Request::Start => {
                if ok {
                    self.handle_proceed(now, iq);
                } else {
                    self.finish(start_refused(iq));
                }
            }
            Request::Data { handshake, .. } => {
                if !ok {
                    // Spec §1.7 rule 6–7: no resend, no `close`.
                    self.finish(CloseReason::PeerError(iq.error_condition()));
                    return;
                }
                if handshake {
                    self.hs_unacked -= 1;
                }
                self.report_acknowledged();
                // Flush first: handshake bytes still queued behind a full window must count
                // as unacknowledged before the Open rule is checked (spec §1.8).
                self.flush(now);
                self.check_open(now);
            }
            Request::Close => {
                let reason = self.closing_reason.take().unwrap_or(CloseReason::Local);
                self.finish(reason);
            }
        }
    }

    fn handle_proceed(&mut self, now: Instant, iq: &Iq) {
        // Spec §1.5 rule 7: an empty result counts as proceed.
        let offer = iq
            .children
            .iter()
            .find_map(|c| match XtlsElement::parse(c) {
                Ok(XtlsElement::Proceed { offer }) => offer,
                _ => None,
            });
        if let Some(offer) = offer
            && offer.key_names.is_empty()
            && !offer.insecure
        {
            self.send_close_iq(now);
            self.finish(CloseReason::Refused(
                "peer offer accepts no X.509 key".into(),
            ));
            return;
        }
        let peer_bare = bare(&self.key.peer).to_owned();
        self.tls = Some(TlsSession::client(
            &self.creds,
            &peer_bare,
            self.policy.clone(),
        ));
        self.state = State::Handshaking;
        self.flush(now);
    }

    fn check_open(&mut self, now: Instant) {
        if self.state != State::Handshaking {
            return;
        }
        let Some(tls) = self.tls.as_mut() else {
            return;
        };
        if tls.is_handshaking() || (self.role == Role::Initiator && self.hs_unacked > 0) {
            return;
        }
        let (tls_version, cipher_suite, cert) = tls.negotiated();
        let judged = tls.take_judged();
        let peer = match cert {
            None => PeerIdentity {
                spki_sha256: None,
                cert_der: None,
                trust: TrustVerdict::Unauthenticated,
            },
            // What the verifier concluded of this very certificate during the handshake.
            Some(der) if judged.as_ref().is_some_and(|j| j.cert_der == der) => {
                let judged = judged.expect("checked above");
                PeerIdentity {
                    spki_sha256: Some(judged.spki_sha256),
                    cert_der: Some(der),
                    trust: judged.trust,
                }
            }
            Some(der) => match judge(bare(&self.key.peer), &self.policy, &der) {
                Ok((info, trust)) => PeerIdentity {
                    spki_sha256: Some(info.fingerprints.spki_sha256),
                    cert_der: Some(der),
                    trust,
                },
                Err(e) => {
                    // The verifier already accepted it; a disagreement is a bug, fail closed.
                    self.begin_closing(now, CloseReason::CertificateRejected(e));
                    return;
                }
            },
        };
        let established = Established {
            tls_version,
            cipher_suite,
            peer,
        };
        self.state = State::Open;
        self.handshake_deadline = None;
        self.touch(now);
        self.established = Some(established.clone());
        self.events.push_back(Event::Established(established));
    }

    /// Moves TLS output into `data` IQs within the window; sends `<close/>` when due.
    fn flush(&mut self, now: Instant) {
        self.flush_with(now, false);
    }

    /// [`Tunnel::flush`]; `riding`: an acknowledgement is leaving, so held bytes go too.
    fn flush_with(&mut self, now: Instant, riding: bool) {
        if let Some(tls) = self.tls.as_mut() {
            let mut out = Vec::new();
            tls.drain_output(&mut out);
            self.bytes_queued += out.len() as u64;
            self.out_bytes.extend(out);
        }
        // Nagle's rule at the IQ level, once open: full chunks fill the window, a partial one
        // goes only when nothing is in flight, or along with an acknowledgement of the peer's
        // `data` when that is polled (`settle_acks`). Small stanzas queued behind an
        // unacknowledged `data` then travel together in the next one: with many messages in
        // flight the server routes a fraction of the IQs (docs/performance.md, window sweep),
        // and a lone message still leaves at once. Handshake flights are never held back.
        while !self.out_bytes.is_empty()
            && self.data_in_flight() < self.config.window
            && (self.state != State::Open
                || self.data_in_flight() == 0
                || riding
                || self.out_bytes.len() >= self.config.chunk_size)
        {
            // (Called only in Handshaking and Open: `begin_closing` empties the queue.)
            let n = self.out_bytes.len().min(self.config.chunk_size);
            let chunk: Vec<u8> = self.out_bytes.drain(..n).collect();
            let start = self.bytes_queued - self.out_bytes.len() as u64 - n as u64;
            let method = (self.role == Role::Initiator && !self.sent_first_data).then_some("x509");
            self.sent_first_data = true;
            self.stats.bytes_out += chunk.len() as u64;
            let handshake = self.state == State::Handshaking;
            if handshake {
                self.hs_unacked += 1;
            }
            self.request(
                now,
                Request::Data {
                    handshake,
                    start,
                    end: start + n as u64,
                },
                XtlsElement::data(&chunk, method).to_element(),
            );
        }
        if self.blocked && self.out_bytes.len() < self.config.max_queued_out / 2 {
            self.blocked = false;
            self.events.push_back(Event::Writable);
        }
        if self.close_pending.is_some() && self.out_bytes.is_empty() && self.data_in_flight() == 0 {
            let reason = self.close_pending.take().expect("checked above");
            self.begin_closing(now, reason);
        }
    }

    /// Reports the marks of sent stanzas whose every byte the peer has acknowledged.
    fn report_acknowledged(&mut self) {
        let unacked_from = self
            .outstanding
            .iter()
            .filter_map(|o| match o.kind {
                Request::Data { start, .. } => Some(start),
                _ => None,
            })
            .min()
            .unwrap_or(self.bytes_queued - self.out_bytes.len() as u64);
        let mut newest = None;
        while self.marks.front().is_some_and(|m| *m <= unacked_from) {
            newest = self.marks.pop_front();
        }
        if let Some(mark) = newest {
            self.events.push_back(Event::Acknowledged(mark));
        }
    }

    fn data_in_flight(&self) -> usize {
        self.outstanding
            .iter()
            .filter(|o| matches!(o.kind, Request::Data { .. }))
            .count()
    }

    /// Sends `<close/>` and waits for `<closed/>` (spec §1.10 rule 3).
    fn begin_closing(&mut self, now: Instant, reason: CloseReason) {
        if matches!(self.state, State::Closing | State::Closed) {
            return;
        }
        // The data they answer was accepted: its results go before our `<close/>`.
        self.release_acks();
        self.state = State::Closing;
        self.closing_reason = Some(reason);
        self.handshake_deadline = None;
        self.idle_deadline = None;
        self.peer_eof_deadline = None;
        self.close_pending = None;
        // Unanswered data no longer matters; its answers are dropped as unknown.
        self.outstanding.clear();
        self.out_bytes.clear();
        self.send_close_iq(now);
        self.close_deadline = Some(now + self.config.close_timeout);
    }

    fn send_close_iq(&mut self, now: Instant) {
        self.request(now, Request::Close, XtlsElement::Close.to_element());
    }

    /// Answers a request with an error and ends the tunnel (spec §1.11: no `close` after).
    fn fail(&mut self, iq: &Iq, condition: DefinedCondition, text: &str, reason: CloseReason) {
        self.answer(iq.error(ErrorType::Cancel, condition, text));
        self.finish(reason);
    }

    /// Queues an answer to a peer's request after the acknowledgements made before it, so
    /// answers keep the order of the requests.
    fn answer(&mut self, reply: Element) {
        self.release_acks();
        self.transmit.push_back(reply);
    }

    fn finish(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        self.release_acks();
        self.state = State::Closed;
        self.outstanding.clear();
        self.out_bytes.clear();
        self.tls = None;
        // Spec §1.9 rule 7: our inner requests the peer did not answer fail locally.
        for answer in self.inner_iqs.unanswered(&self.key) {
            self.events.push_back(Event::Unanswered(answer));
        }
        self.events.push_back(Event::Closed(reason));
    }

    fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("{}{}", self.id_prefix, self.next_id)
    }

    /// Queues the `result` for the peer's `data`. Once open it is kept until polled
    /// (`settle_acks`), or until something ends the tunnel; during the handshake it goes
    /// first, before the flight that feeding the payload produced (spec §1.7 rule 5).
    fn acknowledge(&mut self, now: Instant, iq: &Iq) {
        if self.state != State::Open {
            self.transmit.push_back(iq.result(None));
            return;
        }
        self.acks.push(iq.result(None));
        self.acks_at.get_or_insert(now);
    }

    /// Queues the acknowledgements made since the last poll behind our `data`, once the
    /// owner has acted on the events: a bot's reply to what arrived is written by then, and
    /// leaves first, even when Nagle's rule at the IQ level (see `flush`) would hold it.
    /// With nothing to go behind, they wait up to [`TunnelConfig::ack_hold`] for a reply
    /// the owner writes later (one from an HTTP backend, say); an owner that let a hold run
    /// out is not waited for again until it writes.
    ///
    /// Servers that leave Nagle's algorithm on (Prosody's default) write each stanza on its
    /// own, and the kernel sends a write at once only when nothing sent is unacknowledged.
    /// A `result` is a segment the peer's client has nothing to answer, so its kernel delays
    /// the ACK, and what the server writes to it next waits for that (~40 ms). A `data`
    /// first is answered at once, and the `result` behind it leaves with that answer's ACK.
    fn settle_acks(&mut self) {
        let at = self.acks_at.expect("set with the first ack");
        if self.state == State::Open {
            self.flush_with(at, true);
        }
        let hold = self.state == State::Open
            && !self.acks_ride
            && self.expect_reply
            && !self.config.ack_hold.is_zero();
        if hold {
            self.acks_held_until = Some(at + self.config.ack_hold);
        } else {
            self.release_acks();
        }
    }

    /// Moves the acknowledgements made into `transmit`.
    fn release_acks(&mut self) {
        self.acks_at = None;
        self.acks_held_until = None;
        self.acks_ride = false;
        self.transmit.extend(self.acks.drain(..));
    }

    fn request(&mut self, now: Instant, kind: Request, payload: Element) {
        if matches!(kind, Request::Data { .. }) && !self.acks.is_empty() {
            // Whatever made this `data` (a reply, a close_notify, bytes the window held), the
            // acknowledgements waiting, held or not, leave behind it at the next poll.
            self.acks_ride = true;
            self.acks_held_until = None;
        }
        let id = self.fresh_id();
        let timeout = match kind {
            Request::Start => self.config.start_timeout,
            Request::Data { .. } => self.config.ack_timeout,
            Request::Close => self.config.close_timeout,
        };
        self.outstanding.push_back(Outstanding {
            id: id.clone(),
            kind,
            deadline: now + timeout,
        });
        self.transmit.push_back(build_iq(
            IqType::Set,
            &id,
            &self.key.local,
            &self.key.peer,
            Some(payload),
        ));
    }
}

/// The bare part of a JID string (everything before the first `/`).
pub fn bare(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

/// How offers name our key: the certificate's SHA-1, lower-case hex (spec §2.4).
fn own_key_names(creds: &BotCredentials) -> Vec<String> {
    vec![creds.identity.info.fingerprints.cert_sha1.to_lower_hex()]
}

/// The offer a responder returns in `<proceed/>` (spec §1.6): its own key, then the offered
/// names of certificates it holds pins for; `<insecure/>` only when none of the offered names
/// is pinned and the trust mode accepts a key it cannot verify yet (trust on first use).
fn proceed_offer(params: &TunnelParams, offer: &Offer) -> Offer {
    let policy = &params.policy;
    let known: Vec<String> = offer
        .key_names
        .iter()
        .map(|name| name.to_ascii_lowercase())
        .filter(|name| policy.pinned_cert_names.contains(name))
        .collect();
    Offer {
        insecure: known.is_empty() && policy.trust == TrustMode::Tofu,
        key_names: own_key_names(&params.creds)
            .into_iter()
            .chain(known)
            .collect(),
        srp: false,
    }
}

/// What an error answering our `start` means (spec §1.14): not supported, busy, conflict, or
/// refused.
fn start_refused(iq: &Iq) -> CloseReason {
    let condition = iq.error_condition();
    match (condition.as_str(), iq.error_type()) {
        ("conflict", _) => CloseReason::Conflict,
        ("service-unavailable" | "feature-not-implemented", _) => {
            CloseReason::NotSupported(condition)
        }
        (_, Some("wait")) => CloseReason::Busy(condition),
        _ => CloseReason::Refused(condition),
    }
}

/// Checks the shape of an IQ request in the XTLS namespace (spec §1.11 rows on malformed
/// IQs): exactly one child, a known element, the right IQ type. The error reply otherwise.
pub fn classify_request(iq: &Iq) -> Result<XtlsElement, Element> {
    let Some(payload) = iq.single_payload() else {
        return Err(iq.error(
            ErrorType::Modify,
            DefinedCondition::BadRequest,
            "an IQ request carries exactly one child",
        ));
    };
    let element = XtlsElement::parse(payload).map_err(|e| match e {
        crate::stanza::XtlsParseError::Unknown(_) => iq.error(
            ErrorType::Cancel,
            DefinedCondition::FeatureNotImplemented,
            &e.to_string(),
        ),
        crate::stanza::XtlsParseError::ForeignNamespace => {
            iq.error(ErrorType::Cancel, DefinedCondition::ServiceUnavailable, "")
        }
    })?;
    let right_type = match element {
        XtlsElement::Start { .. } | XtlsElement::Data { .. } | XtlsElement::Close => {
            iq.type_ == IqType::Set
        }
        XtlsElement::Proceed { .. } | XtlsElement::Closed => false,
    };
    if !right_type {
        return Err(iq.error(
            ErrorType::Modify,
            DefinedCondition::BadRequest,
            "XTLS element in the wrong IQ type",
        ));
    }
    Ok(element)
}

#[cfg(test)]
mod tests;
