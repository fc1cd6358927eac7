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

mod tls;

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use minidom::Element;

use crate::certs::Fingerprint;
use crate::stanza::xtls::{Offer, XtlsElement};
use crate::stanza::{
    DataError, DefinedCondition, ErrorType, Iq, IqType, build_iq, decode_data, ns, remove_attr,
    set_attr,
};
use crate::xml::{StreamReader, XmlLimits, to_bytes};

pub use tls::{
    BotCredentials, CredentialsError, PeerAuth, PeerPolicy, TrustMode, TrustVerdict, VerifyError,
    judge,
};
use tls::{TlsFailure, TlsSession};

/// Tunable timers and limits of one tunnel (spec §1.13).
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Raw bytes per `<data/>` sent.
    pub chunk_size: usize,
    /// Unacknowledged `data` IQs allowed per tunnel.
    pub window: usize,
    /// Time allowed for the answer to our `start`.
    pub start_timeout: Duration,
    /// Time allowed from `start` to an open tunnel.
    pub handshake_timeout: Duration,
    /// Time allowed for the acknowledgement of one `data`.
    pub ack_timeout: Duration,
    /// Time allowed for the answer to our `close`.
    pub close_timeout: Duration,
    /// Idle time after which an open tunnel is closed; `None` disables.
    pub idle_timeout: Option<Duration>,
    /// Time we wait for the peer's `close` after its close_notify.
    pub peer_eof_timeout: Duration,
    /// Largest inner stanza, in bytes of plaintext.
    pub max_inner_stanza: usize,
    /// Plaintext and ciphertext queued for sending beyond which `send` refuses.
    pub max_queued_out: usize,
    /// Whether the initiator puts a XEP-0250 offer in its `start`.
    pub send_offer: bool,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            chunk_size: 4096,
            window: 4,
            start_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(90),
            ack_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(30 * 60)),
            peer_eof_timeout: Duration::from_secs(30),
            max_inner_stanza: 256 * 1024,
            max_queued_out: 1024 * 1024,
            send_offer: true,
        }
    }
}

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

/// Why a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// We closed it gracefully (operator or bot request).
    Local,
    /// The peer sent `<close/>`.
    PeerClosed,
    /// The peer's TLS sent a fatal alert.
    PeerAlert(String),
    /// Our TLS refused the peer's bytes.
    TlsError(String),
    /// The peer's certificate was refused, and why.
    CertificateRejected(VerifyError),
    /// The peer answered one of our IQs with an error.
    PeerError(String),
    /// The peer refused our `start` (condition given).
    Refused(String),
    /// The peer sent something the protocol forbids in this state.
    Protocol(String),
    /// The tunnel plaintext was not acceptable XML (spec §1.9 rules 1 and 6).
    InnerXml(String),
    /// A deadline passed (which one given).
    Timeout(&'static str),
    /// No application data for the idle timeout.
    Idle,
    /// A new `start` from the same peer replaced the tunnel.
    Replaced,
    /// The peer went unavailable or its server reported it gone.
    PeerGone,
    /// The component stream to the server was lost.
    ConnectionLost,
    /// The component is shutting down.
    Shutdown,
    /// The bot was deleted.
    BotDeleted,
    /// What arrived could not be stored, so it was refused.
    StoreUnavailable,
}

impl CloseReason {
    /// The key the peer presented and the keys pinned for it, when the tunnel ended because
    /// the peer's key changed (spec §2.3 step 6).
    pub fn identity_change(&self) -> Option<(&Fingerprint, &[Fingerprint])> {
        match self {
            CloseReason::CertificateRejected(VerifyError::PinMismatch {
                presented,
                pinned,
                ..
            }) => Some((presented, pinned)),
            _ => None,
        }
    }

    /// A short stable code for the API and the store.
    pub fn code(&self) -> &'static str {
        match self {
            CloseReason::Local => "local_close",
            CloseReason::PeerClosed => "peer_close",
            CloseReason::PeerAlert(_) => "peer_alert",
            CloseReason::TlsError(_) => "tls_error",
            CloseReason::CertificateRejected(_) => "certificate_rejected",
            CloseReason::PeerError(_) => "peer_error",
            CloseReason::Refused(_) => "refused",
            CloseReason::Protocol(_) => "protocol_error",
            CloseReason::InnerXml(_) => "inner_xml",
            CloseReason::Timeout(_) => "timeout",
            CloseReason::Idle => "idle",
            CloseReason::Replaced => "replaced",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::ConnectionLost => "connection_lost",
            CloseReason::Shutdown => "shutdown",
            CloseReason::BotDeleted => "bot_deleted",
            CloseReason::StoreUnavailable => "store_unavailable",
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())?;
        match self {
            CloseReason::CertificateRejected(e) => write!(f, ": {e}"),
            CloseReason::PeerAlert(s)
            | CloseReason::TlsError(s)
            | CloseReason::PeerError(s)
            | CloseReason::Refused(s)
            | CloseReason::Protocol(s)
            | CloseReason::InnerXml(s) => write!(f, ": {s}"),
            CloseReason::Timeout(which) => write!(f, ": {which}"),
            _ => Ok(()),
        }
    }
}

/// What the handshake established about the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// SPKI SHA-256 of the peer's key; `None` when it presented no certificate.
    pub spki_sha256: Option<Fingerprint>,
    /// Certificate DER, kept so pins can answer any digest (spec §1.6).
    pub cert_der: Option<Vec<u8>>,
    /// The trust verdict.
    pub trust: TrustVerdict,
}

/// Facts of an established tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// Negotiated TLS version.
    pub tls_version: String,
    /// Negotiated cipher suite.
    pub cipher_suite: String,
    /// The peer's identity.
    pub peer: PeerIdentity,
}

/// What the tunnel reports to its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The handshake finished and the peer was accepted.
    Established(Established),
    /// A stanza arrived through the tunnel, routing restored (spec §1.9 rule 4).
    Stanza(Element),
    /// `send` may be called again after it refused with [`SendError::Blocked`].
    Writable,
    /// Every `data` carrying the stanza that [`Tunnel::send`] marked so was acknowledged.
    Acknowledged(u64),
    /// The tunnel is gone.
    Closed(CloseReason),
}

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

/// Why [`Tunnel::send`] refused a stanza.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// The tunnel is not open (yet or any more).
    #[error("tunnel is not open")]
    NotOpen,
    /// The outbound queue is full; wait for [`Event::Writable`].
    #[error("tunnel send queue is full")]
    Blocked,
}

/// Byte and stanza counters, each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Stats {
    /// Inner stanzas delivered to us.
    pub stanzas_in: u64,
    /// Inner stanzas we sent.
    pub stanzas_out: u64,
    /// Raw TLS bytes received.
    pub bytes_in: u64,
    /// Raw TLS bytes sent.
    pub bytes_out: u64,
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
    /// The reader of the inner stream; dropped between stanzas (its parser keeps an 8 KiB
    /// token buffer, half an idle tunnel's memory) and made again for the next one.
    inner: Option<Box<StreamReader>>,
    plaintext: Vec<u8>,
    transmit: VecDeque<Element>,
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
            inner: None,
            plaintext: Vec::new(),
            transmit: VecDeque::new(),
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
        let policy = &params.policy;
        if offer.is_some_and(|o| o.key_names.is_empty()) {
            return Err(refuse(
                DefinedCondition::NotAcceptable,
                "an X.509 client certificate is required; SRP is not supported",
            ));
        }
        if policy.trust == TrustMode::Pinned && policy.pins.is_empty() {
            return Err(refuse(
                DefinedCondition::NotAcceptable,
                "this bot accepts pinned peers only",
            ));
        }
        let peer_bare = bare(&params.key.peer).to_owned();
        let proceed_offer = offer.map(|_| Offer {
            key_names: vec![
                params
                    .creds
                    .identity
                    .info
                    .fingerprints
                    .cert_sha1
                    .to_lower_hex(),
            ],
            srp: false,
            // We keep pins as SPKI digests: a named certificate cannot be matched to one.
            insecure: true,
        });
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
            key_names: vec![
                tunnel
                    .creds
                    .identity
                    .info
                    .fingerprints
                    .cert_sha1
                    .to_lower_hex(),
            ],
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

    /// Whether the tunnel reached its terminal state.
    pub fn is_gone(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether [`Tunnel::poll_transmit`] or [`Tunnel::poll_event`] has something.
    pub fn has_output(&self) -> bool {
        !self.transmit.is_empty() || !self.events.is_empty()
    }

    /// The next stanza to write to the server.
    pub fn poll_transmit(&mut self) -> Option<Element> {
        self.transmit.pop_front()
    }

    /// The next event for the owner.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest instant at which [`Tunnel::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        [
            self.handshake_deadline,
            self.close_deadline,
            self.idle_deadline,
            self.peer_eof_deadline,
            self.outstanding.iter().map(|o| o.deadline).min(),
        ]
        .into_iter()
        .flatten()
        .min()
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
                        self.transmit.push_back(reply);
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
                    | XtlsElement::Closed => self.transmit.push_back(iq.error(
                        ErrorType::Modify,
                        DefinedCondition::BadRequest,
                        "",
                    )),
                }
            }
        }
    }

    /// Queues a stanza for the peer: routing stripped (spec §1.9 rule 4), encrypted, chunked.
    /// Returns its mark: [`Event::Acknowledged`] with this mark (or a later one) follows once
    /// the peer acknowledged every `data` carrying it.
    pub fn send(&mut self, now: Instant, mut stanza: Element) -> Result<u64, SendError> {
        if self.state != State::Open || self.close_pending.is_some() {
            return Err(SendError::NotOpen);
        }
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
        self.stats.stanzas_out += 1;
        self.touch(now);
        self.flush(now);
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

    /// Handles passed deadlines.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if self.state == State::Closing {
            if self.close_deadline.is_some_and(|d| d <= now) {
                let reason = self
                    .closing_reason
                    .take()
                    .unwrap_or(CloseReason::Timeout("close answer"));
                self.finish(reason);
            }
            return;
        }
        if self.state == State::Starting {
            if self.outstanding.iter().any(|o| o.deadline <= now) {
                // Best effort: the peer may have created state for our `start`.
                self.outstanding.clear();
                self.send_close_iq(now);
                self.finish(CloseReason::Timeout("start answer"));
            }
            return;
        }
        if self.handshake_deadline.is_some_and(|d| d <= now) {
            self.begin_closing(now, CloseReason::Timeout("handshake"));
            return;
        }
        if self
            .outstanding
            .iter()
            .any(|o| matches!(o.kind, Request::Data { .. }) && o.deadline <= now)
        {
            self.begin_closing(now, CloseReason::Timeout("data acknowledgement"));
            return;
        }
        if self.peer_eof_deadline.is_some_and(|d| d <= now) {
            self.begin_closing(now, CloseReason::PeerClosed);
            return;
        }
        if self.idle_deadline.is_some_and(|d| d <= now) {
            self.close_with(now, CloseReason::Idle);
        }
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
        self.transmit
            .push_back(iq.result(Some(XtlsElement::Closed.to_element())));
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
            Err(e @ DataError::BadBase64(_)) => {
                let text = e.to_string();
                self.fail(
                    iq,
                    DefinedCondition::BadRequest,
                    &text,
                    CloseReason::Protocol(text.clone()),
                );
                return;
            }
            Err(e @ DataError::TooLarge(_)) => {
                let text = e.to_string();
                self.fail(
                    iq,
                    DefinedCondition::PolicyViolation,
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
            self.transmit.push_back(iq.result(None));
            return;
        }
        let tls = self.tls.as_mut().expect("a tunnel past Starting has TLS");
        let mut plaintext = std::mem::take(&mut self.plaintext);
        let fed = tls.feed(&bytes, &mut plaintext);
        let eof = match fed {
            Ok(eof) => eof,
            Err(TlsFailure::PeerAlert(alert)) => {
                self.transmit.push_back(iq.result(None));
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
                self.transmit
                    .push_back(iq.error(ErrorType::Cancel, condition, &text));
                self.finish(reason);
                return;
            }
        };
        self.transmit.push_back(iq.result(None));
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

    /// Parses plaintext into stanzas and queues them as events.
    fn deliver_plaintext(&mut self, plaintext: &[u8]) -> Result<(), CloseReason> {
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
    fn restore_routing(&self, mut stanza: Element) -> Option<Element> {
        if stanza.ns() != ns::CLIENT || !matches!(stanza.name(), "message" | "presence" | "iq") {
            tracing::debug!(tunnel = %self.key, element = stanza.name(), "non-stanza element in tunnel ignored");
            return None;
        }
        if let Some(from) = stanza.attr("from")
            && bare(from) != bare(&self.key.peer)
        {
            tracing::warn!(tunnel = %self.key, from, "inner stanza from another JID dropped");
            return None;
        }
        if let Some(to) = stanza.attr("to")
            && to != self.key.local
            && to != bare(&self.key.local)
        {
            tracing::warn!(tunnel = %self.key, to, "inner stanza to another JID dropped");
            return None;
        }
        set_attr(&mut stanza, "from", &self.key.peer);
        set_attr(&mut stanza, "to", &self.key.local);
        Some(stanza)
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
                    let condition = iq.error_condition();
                    self.finish(CloseReason::Refused(condition));
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
        if let Some(tls) = self.tls.as_mut() {
            let mut out = Vec::new();
            tls.drain_output(&mut out);
            self.bytes_queued += out.len() as u64;
            self.out_bytes.extend(out);
        }
        // Nagle's rule at the IQ level, once open: full chunks fill the window, a partial one
        // goes only when nothing is in flight. Small stanzas queued behind an unacknowledged
        // `data` then travel together in the next one: with many messages in flight the server
        // routes a fraction of the IQs (docs/performance.md, window sweep), and a lone message
        // still leaves at once. Handshake flights are never held back.
        while !self.out_bytes.is_empty()
            && self.data_in_flight() < self.config.window
            && (self.state != State::Open
                || self.data_in_flight() == 0
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
        self.transmit
            .push_back(iq.error(ErrorType::Cancel, condition, text));
        self.finish(reason);
    }

    fn finish(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        self.outstanding.clear();
        self.out_bytes.clear();
        self.tls = None;
        self.events.push_back(Event::Closed(reason));
    }

    fn touch(&mut self, now: Instant) {
        self.idle_deadline = self.config.idle_timeout.map(|d| now + d);
    }

    fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        format!("{}{}", self.id_prefix, self.next_id)
    }

    fn request(&mut self, now: Instant, kind: Request, payload: Element) {
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
