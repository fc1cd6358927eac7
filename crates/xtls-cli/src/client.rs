//! The user's end of XTLS: one XMPP session and the tunnels it carries, each a sans-IO
//! [`Tunnel`] of the engine fed with the session's stanzas and the clock.
//!
//! [`Client::next`] is the only place that waits: for a stanza, a tunnel's timer, a line the
//! person typed, or the command's deadline. Everything it learns comes back as a
//! [`Happening`]; what the tunnels want sent is written before it returns, so a command that
//! stops calling it loses nothing already accepted.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::{Duration, Instant};

use minidom::Element;
use tokio::sync::mpsc;
use xtls::stanza::xtls::XtlsElement;
use xtls::stanza::{DefinedCondition, ErrorType, Iq, IqType, build_iq, error_element, ns};
use xtls::tunnel::{
    BotCredentials, CloseReason, Event, PeerPolicy, StartDecision, Tunnel, TunnelConfig, TunnelKey,
    TunnelParams, classify_request, decide_start,
};

use crate::xmpp::{Connection, Incoming};

/// What [`Client::next`] reports.
#[derive(Debug)]
pub enum Happening {
    /// A tunnel's event (its peer's JID as the server stamps it).
    Tunnel(String, Event),
    /// A peer opened a tunnel to us and it was accepted; its handshake runs.
    Accepted(String),
    /// The answer (result or error) to an IQ sent with [`Client::query`].
    Answer(Iq),
    /// A message outside any tunnel: the server relayed it readable.
    Plain(Element),
    /// A line the person typed; `None` at the end of input.
    Input(Option<String>),
    /// The deadline set with [`Client::set_deadline`] passed.
    Deadline,
}

/// Decides whether a peer's `start` is accepted, and how its key is judged.
pub type AcceptPolicy = Box<dyn FnMut(&str) -> Option<PeerPolicy> + Send>;

/// One XMPP session and its tunnels.
pub struct Client {
    conn: Connection,
    creds: BotCredentials,
    config: TunnelConfig,
    tunnels: HashMap<String, Tunnel>,
    accept: Option<AcceptPolicy>,
    input: Option<mpsc::Receiver<String>>,
    deadline: Option<Instant>,
    /// Our IQ queries awaiting answers: id → the JID asked, which alone may answer.
    queries: HashMap<String, String>,
    happenings: VecDeque<Happening>,
    outbox: VecDeque<Element>,
    prefix: String,
    next_id: u64,
}

impl Client {
    /// A client on a logged-in session with the user's own key.
    pub fn new(conn: Connection, creds: BotCredentials) -> Client {
        Client {
            conn,
            creds,
            config: tunnel_config(),
            tunnels: HashMap::new(),
            accept: None,
            input: None,
            deadline: None,
            queries: HashMap::new(),
            happenings: VecDeque::new(),
            outbox: VecDeque::new(),
            prefix: format!("c{:016x}-", rand::random::<u64>()),
            next_id: 0,
        }
    }

    /// Our full JID.
    pub fn jid(&self) -> String {
        self.conn.jid().to_string()
    }

    /// Accepts tunnels that peers open, judged by `policy` (`None` refuses the peer).
    pub fn accept_tunnels(&mut self, policy: AcceptPolicy) {
        self.accept = Some(policy);
    }

    /// Reports the person's lines as [`Happening::Input`].
    pub fn read_input(&mut self, lines: mpsc::Receiver<String>) {
        self.input = Some(lines);
    }

    /// Reports [`Happening::Deadline`] once at `at`; `None` clears it.
    pub fn set_deadline(&mut self, at: Option<Instant>) {
        self.deadline = at;
    }

    /// The live tunnel to `peer`, if any.
    pub fn tunnel(&mut self, peer: &str) -> Option<&mut Tunnel> {
        self.tunnels.get_mut(peer).filter(|t| !t.is_gone())
    }

    /// Opens a tunnel to `peer` as initiator, its key judged by `policy`.
    pub async fn open(&mut self, peer: &str, policy: PeerPolicy) -> io::Result<()> {
        let params = self.params(peer, policy);
        self.tunnels
            .insert(peer.to_owned(), Tunnel::initiate(Instant::now(), params));
        self.flush().await
    }

    /// Sends a stanza through the tunnel to `peer`; the engine's refusal is returned.
    pub async fn send(&mut self, peer: &str, stanza: Element) -> io::Result<Result<u64, String>> {
        let Some(tunnel) = self.tunnel(peer) else {
            return Ok(Err("no tunnel is open to it".into()));
        };
        let sent = tunnel
            .send(Instant::now(), stanza)
            .map_err(|e| e.to_string());
        self.flush().await?;
        Ok(sent)
    }

    /// Closes the tunnel to `peer` gracefully (close_notify, then `<close/>`).
    pub async fn close(&mut self, peer: &str) -> io::Result<()> {
        if let Some(tunnel) = self.tunnel(peer) {
            tunnel.close(Instant::now());
        }
        self.flush().await
    }

    /// Whether any tunnel is still live.
    pub fn any_live(&self) -> bool {
        self.tunnels.values().any(|t| !t.is_gone())
    }

    /// Sends an IQ `get` with `payload` to `to`; its answer comes as [`Happening::Answer`]
    /// with the id returned.
    pub async fn query(&mut self, to: &str, payload: Element) -> io::Result<String> {
        let id = self.new_id("q");
        let iq = build_iq(IqType::Get, &id, &self.jid(), to, Some(payload));
        self.queries.insert(id.clone(), to.to_owned());
        self.conn.send(iq).await?;
        Ok(id)
    }

    /// Tells `to` that we are available (directed presence), so that it may reach this
    /// session at our bare JID.
    pub async fn announce(&mut self, to: &str) -> io::Result<()> {
        let presence = Element::builder("presence", ns::CLIENT)
            .attr(xtls::stanza::name("to"), to)
            .build();
        self.conn.send(presence).await
    }

    /// Ends the session: the stream is closed; live tunnels are simply gone.
    pub async fn logout(self) {
        self.conn.close().await;
    }

    /// Waits for the next happening; the tunnels' stanzas are written before it returns.
    pub async fn next(&mut self) -> io::Result<Happening> {
        loop {
            if let Some(h) = self.happenings.pop_front() {
                return Ok(h);
            }
            let timer = self
                .tunnels
                .values()
                .filter_map(|t| t.poll_timeout())
                .chain(self.deadline)
                .min();
            let sleep = async {
                match timer {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let input = async {
                match self.input.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                incoming = self.conn.recv() => self.on_incoming(incoming?),
                () = sleep => self.on_timers(Instant::now()),
                line = input => {
                    if line.is_none() {
                        self.input = None;
                    }
                    self.happenings.push_back(Happening::Input(line));
                }
            }
            self.flush().await?;
        }
    }

    fn on_timers(&mut self, now: Instant) {
        for tunnel in self.tunnels.values_mut() {
            if tunnel.poll_timeout().is_some_and(|at| at <= now) {
                tunnel.handle_timeout(now);
            }
        }
        if self.deadline.is_some_and(|at| at <= now) {
            self.deadline = None;
            self.happenings.push_back(Happening::Deadline);
        }
    }

    fn on_incoming(&mut self, incoming: Incoming) {
        let el = match incoming {
            Incoming::Stanza(el) => el,
            Incoming::Invalid => return,
            Incoming::InvalidRequest { id, from } => {
                let mut reply = build_iq(IqType::Error, &id, &self.jid(), &from, None);
                reply.append_child(error_element(
                    ErrorType::Modify,
                    DefinedCondition::BadRequest,
                    "",
                ));
                return self.reply(reply);
            }
        };
        match el.name() {
            "iq" => self.on_iq(&el),
            "message" => self.happenings.push_back(Happening::Plain(el)),
            "presence" if el.attr("type") == Some("unavailable") => {
                // The peer's client went away: its tunnel cannot go on (its TLS state is gone).
                let from = el.attr("from").unwrap_or_default();
                if let Some(tunnel) = self.tunnels.get_mut(from).filter(|t| !t.is_gone()) {
                    tunnel.abandon(CloseReason::PeerGone);
                }
            }
            _ => {}
        }
    }

    fn on_iq(&mut self, el: &Element) {
        let Ok(iq) = Iq::parse(el) else { return };
        let now = Instant::now();
        if !iq.type_.is_request() {
            if self.queries.get(&iq.id) == Some(&iq.from) {
                self.queries.remove(&iq.id);
                self.happenings.push_back(Happening::Answer(iq));
            } else if let Some(tunnel) = self.tunnels.get_mut(&iq.from) {
                tunnel.handle_iq(now, &iq);
            }
            return;
        }
        let Some(payload) = iq.single_payload() else {
            return self.reply(iq.error(ErrorType::Modify, DefinedCondition::BadRequest, ""));
        };
        if payload.ns() != ns::XTLS {
            let answer = match (iq.type_, payload.name(), payload.ns().as_str()) {
                (IqType::Get, "query", ns::DISCO_INFO) if payload.attr("node").is_none() => {
                    iq.result(Some(self.disco_info()))
                }
                (IqType::Get, "ping", ns::PING) => iq.result(None),
                _ => iq.error(ErrorType::Cancel, DefinedCondition::ServiceUnavailable, ""),
            };
            return self.reply(answer);
        }
        let element = match classify_request(&iq) {
            Ok(element) => element,
            Err(reply) => return self.reply(reply),
        };
        if let XtlsElement::Start { offer } = &element {
            return self.on_start(now, &iq, offer.as_ref());
        }
        match self.tunnels.get_mut(&iq.from).filter(|t| !t.is_gone()) {
            Some(tunnel) => tunnel.handle_iq(now, &iq),
            None => self.reply(iq.error(
                ErrorType::Cancel,
                DefinedCondition::ItemNotFound,
                "no such tunnel",
            )),
        }
    }

    fn on_start(&mut self, now: Instant, iq: &Iq, offer: Option<&xtls::stanza::xtls::Offer>) {
        let policy = self.accept.as_mut().and_then(|accept| accept(&iq.from));
        let Some(policy) = policy else {
            return self.reply(iq.error(
                ErrorType::Cancel,
                DefinedCondition::NotAcceptable,
                "not accepting tunnels from this address",
            ));
        };
        let live = self.tunnels.values().filter(|t| !t.is_gone()).count();
        if !self.tunnels.contains_key(&iq.from) && live >= MAX_TUNNELS {
            return self.reply(iq.error(
                ErrorType::Wait,
                DefinedCondition::ResourceConstraint,
                "too many tunnels at once",
            ));
        }
        match decide_start(self.tunnels.get(&iq.from)) {
            StartDecision::Conflict => {
                return self.reply(iq.error(ErrorType::Cancel, DefinedCondition::Conflict, ""));
            }
            StartDecision::Replace => {
                if let Some(old) = self.tunnels.get_mut(&iq.from) {
                    old.abandon(CloseReason::Replaced);
                }
                self.collect(&iq.from.clone());
            }
            StartDecision::Accept => {}
        }
        let params = self.params(&iq.from, policy);
        match Tunnel::accept(now, params, iq, offer) {
            Ok(tunnel) => {
                self.tunnels.insert(iq.from.clone(), tunnel);
                self.happenings
                    .push_back(Happening::Accepted(iq.from.clone()));
            }
            Err(refusal) => self.reply(refusal.reply),
        }
    }

    /// What we answer to disco#info: a client that speaks XTLS.
    fn disco_info(&self) -> Element {
        let mut query = Element::bare("query", ns::DISCO_INFO);
        let identity = Element::builder("identity", ns::DISCO_INFO)
            .attr(xtls::stanza::name("category"), "client")
            .attr(xtls::stanza::name("type"), "console")
            .attr(xtls::stanza::name("name"), "xtls")
            .build();
        query.append_child(identity);
        for var in [ns::DISCO_INFO, ns::XTLS, ns::PING] {
            query.append_child(
                Element::builder("feature", ns::DISCO_INFO)
                    .attr(xtls::stanza::name("var"), var)
                    .build(),
            );
        }
        query
    }

    fn reply(&mut self, stanza: Element) {
        self.outbox.push_back(stanza);
    }

    fn params(&mut self, peer: &str, policy: PeerPolicy) -> TunnelParams {
        TunnelParams {
            config: self.config.clone(),
            key: TunnelKey {
                local: self.jid(),
                peer: peer.to_owned(),
            },
            creds: self.creds.clone(),
            policy,
            id_prefix: self.new_id("t"),
        }
    }

    fn new_id(&mut self, kind: &str) -> String {
        self.next_id += 1;
        format!("{}{kind}{}", self.prefix, self.next_id)
    }

    /// Moves a tunnel's stanzas to the outbox and its events to the happenings.
    fn collect(&mut self, peer: &str) {
        let Some(tunnel) = self.tunnels.get_mut(peer) else {
            return;
        };
        while let Some(stanza) = tunnel.poll_transmit() {
            self.outbox.push_back(stanza);
        }
        while let Some(event) = tunnel.poll_event() {
            self.happenings
                .push_back(Happening::Tunnel(peer.to_owned(), event));
        }
    }

    /// Writes everything the tunnels and the answers want sent.
    async fn flush(&mut self) -> io::Result<()> {
        let peers: Vec<String> = self.tunnels.keys().cloned().collect();
        for peer in &peers {
            self.collect(peer);
        }
        self.tunnels.retain(|_, t| !t.is_gone());
        while let Some(stanza) = self.outbox.pop_front() {
            match self.conn.send(stanza).await {
                // A reply that cannot be a stanza (an address that is no JID) is dropped;
                // the session goes on.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
                other => other?,
            }
        }
        Ok(())
    }
}

/// A tunnel's configuration for a person's client: the engine's defaults, no idle timeout.
pub fn tunnel_config() -> TunnelConfig {
    TunnelConfig {
        idle_timeout: None,
        ..TunnelConfig::default()
    }
}

/// Tunnels at once; a peer's `start` beyond is refused, to be tried later.
const MAX_TUNNELS: usize = 64;

/// How long a disco#info answer may take (docs/protocol.md §1.4).
pub const DISCO_TIMEOUT: Duration = Duration::from_secs(10);
