//! The XEP-0114 link to the XMPP server: connect, handshake, read, write, keep alive,
//! reconnect (spec §3).
//!
//! This is the only code that touches the server socket. It knows neither the router nor the
//! bots: it hands every inbound stanza to a channel and writes what arrives on another.
//! Inbound stanzas are renamed from `jabber:component:accept` to `jabber:client` at this edge
//! (spec §3.6); every outbound `from`/`to` is validated before writing (spec §3.2), because one
//! bad address kills the whole stream.

use std::time::Duration;

use minidom::Element;
use rand::Rng;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};

use crate::config::{ComponentConfig, Secret};
use slot::{Probe, SlotProbe};
use xtls::stanza::{IqType, build_iq, ns};
use xtls::xml::{StreamReader, XmlEvent, XmlLimits, to_bytes};

pub mod slot;

/// What the link reports to the rest of the component.
#[derive(Debug)]
pub enum LinkEvent {
    /// The stream is authenticated (again).
    Up,
    /// A stanza from the server, in `jabber:client`.
    Stanza(Element),
    /// The stream was lost; every tunnel on it is gone (spec §3.5 rule 4): a short code
    /// (`io`, `xml`, `stream_error`, `protocol`, `timeout`, `closed`) and the details.
    Down(&'static str, String),
}

/// Whether the link is usable, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkStatus {
    /// Not authenticated yet, or reconnecting; the last problem if any.
    Connecting(Option<String>),
    /// Authenticated.
    Up,
}

/// Why the link cannot work at all.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The server refused our configuration on the first attempt (spec §3.5 rule 2).
    #[error("the server refused the component: {condition}{}", text.as_ref().map(|t| format!(" ({t})")).unwrap_or_default())]
    Refused {
        /// The stream error condition.
        condition: String,
        /// The server's text, if any.
        text: Option<String>,
    },
    /// The server closed every connection after our handshake without answering it, from
    /// the first attempt on.
    #[error(
        "the server closed the connection after the component handshake, without answering it, \
         {0} times in a row: a server that cannot route the domain does this (ejabberd: a \
         domain_balancing entry for it with `type` but no `component_number`); see the server's log"
    )]
    HandshakeUnanswered(u32),
}

/// Unanswered handshakes in a row, before any success, after which the link gives up.
const UNANSWERED_LIMIT: u32 = 3;

/// A failure of one connection attempt or session.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("XML: {0}")]
    Xml(#[from] xtls::xml::XmlError),
    #[error("stream error {condition}{}", text.as_ref().map(|t| format!(": {t}")).unwrap_or_default())]
    Stream {
        condition: String,
        text: Option<String>,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("the server closed the connection after the handshake without answering it")]
    HandshakeUnanswered,
    #[error(
        "no slot: the server routes nothing to this connection (none of {0} probes sent to the \
         component's own domain came back); ejabberd does this to connections beyond \
         domain_balancing's component_number, so another instance holds every slot"
    )]
    NoSlot(u32),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("shutting down")]
    Shutdown,
}

impl SessionError {
    fn code(&self) -> &'static str {
        match self {
            SessionError::Io(_) => "io",
            SessionError::Xml(_) => "xml",
            SessionError::Stream { .. } => "stream_error",
            SessionError::Protocol(_) => "protocol",
            SessionError::HandshakeUnanswered => "handshake_unanswered",
            SessionError::NoSlot(_) => "no_slot",
            SessionError::Timeout(_) => "timeout",
            SessionError::Shutdown => "shutdown",
        }
    }
}

/// Stream errors that mean the configuration is wrong (spec §3.5 rule 2).
const CONFIG_ERRORS: &[&str] = &[
    "not-authorized",
    "host-unknown",
    "invalid-namespace",
    "improper-addressing",
];

/// Bytes of queued outbound stanzas gathered into one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// Serializes one outbound stanza onto `buf`, or drops it (logged) when it would kill the
/// stream.
fn append_outbound(buf: &mut Vec<u8>, stanza: &Element, domain: &str) {
    if let Err(problem) = validate_outbound(stanza, domain) {
        tracing::error!(
            problem,
            stanza = stanza.name(),
            "outbound stanza dropped: it would kill the stream"
        );
        return;
    }
    let start = buf.len();
    buf.extend_from_slice(&to_stream_bytes(stanza));
    tracing::trace!(xml = %String::from_utf8_lossy(&buf[start..]), "to server");
}

/// Asks the kernel to acknowledge the next segments at once instead of delaying the ACK.
fn quickack(rd: &tokio::net::tcp::OwnedReadHalf) {
    #[cfg(target_os = "linux")]
    {
        let stream: &TcpStream = rd.as_ref();
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_quickack(true) {
            tracing::debug!(error = %e, "TCP_QUICKACK not set");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = rd;
}

/// The handshake value of XEP-0114: lowercase hex SHA-1 of stream id and secret.
pub fn handshake_digest(stream_id: &str, secret: &str) -> String {
    let digest = Sha1::digest(format!("{stream_id}{secret}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serializes an outbound stanza in the stream's default namespace.
///
/// Prosody routes only stanzas whose namespace is the stream default (it strips it and then
/// treats the stanza as `jabber:client`); a stanza written with an explicit
/// `xmlns='jabber:client'` is handed to local handlers and dropped. So the rename of spec §3.6
/// applies in both directions: the top-level declaration becomes `jabber:component:accept`,
/// and children in the same namespace inherit it.
pub fn to_stream_bytes(stanza: &Element) -> Vec<u8> {
    let bytes = to_bytes(stanza);
    let client = format!("<{} xmlns='{}'", stanza.name(), ns::CLIENT);
    match bytes.strip_prefix(client.as_bytes()) {
        Some(rest) => {
            let mut out = format!("<{} xmlns='{}'", stanza.name(), ns::COMPONENT).into_bytes();
            out.extend_from_slice(rest);
            out
        }
        None => bytes,
    }
}

/// The answer to a request the stream reader dropped for a limit: `policy-violation`
/// (modify) for an IQ get or set addressed to this domain; `None` for anything else.
fn refuse_skipped(
    name: &str,
    attrs: &[(String, String)],
    reason: &xtls::xml::XmlError,
    domain: &str,
) -> Option<Element> {
    let attr = |key: &str| {
        attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    if name != "iq" || !matches!(attr("type"), Some("get" | "set")) {
        return None;
    }
    let mut request = Element::builder("iq", ns::CLIENT).build();
    for key in ["id", "from", "to"] {
        xtls::stanza::set_attr(&mut request, key, attr(key)?);
    }
    let reply = xtls::stanza::error_reply(
        &request,
        xtls::stanza::ErrorType::Modify,
        xtls::stanza::DefinedCondition::PolicyViolation,
        &reason.to_string(),
    );
    validate_outbound(&reply, domain).ok()?;
    Some(reply)
}

/// Checks an outbound stanza's addresses against the component's domain (spec §3.2).
pub fn validate_outbound(stanza: &Element, domain: &str) -> Result<(), String> {
    let from = stanza.attr("from").ok_or("missing from")?;
    let to = stanza.attr("to").ok_or("missing to")?;
    let from = jid::Jid::new(from).map_err(|e| format!("invalid from '{from}': {e}"))?;
    if from.domain().as_str() != domain {
        return Err(format!("from '{from}' is outside {domain}"));
    }
    jid::Jid::new(to).map_err(|e| format!("invalid to '{to}': {e}"))?;
    Ok(())
}

/// The link's settings.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The component domain.
    pub domain: String,
    /// `host:port` of the server's component listener.
    pub server: String,
    /// The shared secret.
    pub secret: Secret,
    /// Whitespace keepalive interval.
    pub keepalive: Duration,
    /// XEP-0199 ping interval.
    pub ping_interval: Duration,
    /// Ping answer timeout.
    pub ping_timeout: Duration,
    /// Longest back-off.
    pub reconnect_max: Duration,
    /// Largest inbound stanza.
    pub max_stanza_bytes: usize,
}

impl LinkConfig {
    /// Builds the link settings from the `[component]` section.
    pub fn new(c: &ComponentConfig, secret: Secret, max_stanza_bytes: usize) -> LinkConfig {
        LinkConfig {
            domain: c.domain.clone(),
            server: c.server.clone(),
            secret,
            keepalive: Duration::from_secs(c.keepalive_secs),
            ping_interval: Duration::from_secs(c.ping_interval_secs),
            ping_timeout: Duration::from_secs(c.ping_timeout_secs),
            reconnect_max: Duration::from_secs(c.reconnect_max_secs),
            max_stanza_bytes,
        }
    }

    /// The server's own domain, target of keepalive pings: the parent of the component domain.
    fn ping_target(&self) -> &str {
        self.domain
            .split_once('.')
            .map(|(_, parent)| parent)
            .filter(|p| p.contains('.') || *p == "localhost")
            .unwrap_or(&self.domain)
    }
}

/// The link's channels and state across reconnects.
struct Link {
    config: LinkConfig,
    events: mpsc::Sender<LinkEvent>,
    outbound: mpsc::Receiver<Element>,
    status: watch::Sender<LinkStatus>,
    shutdown: watch::Receiver<bool>,
    /// Whether the stream was ever authenticated (config errors are fatal only before).
    ever_up: bool,
}

/// Runs the link until `shutdown` turns true; returns an error only for a configuration the
/// server refuses on the first attempt.
pub async fn run(
    config: LinkConfig,
    events: mpsc::Sender<LinkEvent>,
    outbound: mpsc::Receiver<Element>,
    status: watch::Sender<LinkStatus>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let mut link = Link {
        config,
        events,
        outbound,
        status,
        shutdown,
        ever_up: false,
    };
    let mut backoff = Duration::from_secs(1);
    let mut unanswered = 0;
    loop {
        let started = Instant::now();
        let result = link.session().await;
        let problem = match result {
            Err(SessionError::Shutdown) | Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if let SessionError::Stream { condition, text } = &problem
            && !link.ever_up
            && CONFIG_ERRORS.contains(&condition.as_str())
        {
            link.status
                .send_replace(LinkStatus::Connecting(Some(problem.to_string())));
            return Err(LinkError::Refused {
                condition: condition.clone(),
                text: text.clone(),
            });
        }
        unanswered = match problem {
            SessionError::HandshakeUnanswered if !link.ever_up => unanswered + 1,
            _ => 0,
        };
        if unanswered >= UNANSWERED_LIMIT {
            let refused = LinkError::HandshakeUnanswered(unanswered);
            link.status
                .send_replace(LinkStatus::Connecting(Some(refused.to_string())));
            return Err(refused);
        }
        // Another connection holds the domain (Prosody) or every slot of it (ejabberd): try
        // again after the longest back-off, in case it is gone by then.
        let conflict = matches!(&problem, SessionError::Stream { condition, .. } if condition == "conflict")
            || matches!(problem, SessionError::NoSlot(_));
        tracing::warn!(error = %problem, "component link lost");
        link.status
            .send_replace(LinkStatus::Connecting(Some(problem.to_string())));
        if started.elapsed() >= Duration::from_secs(30) {
            backoff = Duration::from_secs(1);
        }
        let wait = if conflict {
            link.config.reconnect_max
        } else {
            let jitter = rand::rng().random_range(0.8..1.2);
            backoff.mul_f64(jitter).min(link.config.reconnect_max)
        };
        backoff = (backoff * 2).min(link.config.reconnect_max);
        // While waiting, keep draining the outbound queue: its stanzas belong to tunnels that
        // died with the stream, and drivers must never block on a link that is down.
        let until = Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                _ = stopped(&mut link.shutdown) => return Ok(()),
                stanza = link.outbound.recv() => if stanza.is_none() { return Ok(()) },
            }
        }
    }
}

impl Link {
    /// One connection: connect, header, handshake, then [`Link::authenticated`].
    async fn session(&mut self) -> Result<(), SessionError> {
        let config = &self.config;
        let mut stream = timeout(Duration::from_secs(10), TcpStream::connect(&config.server))
            .await
            .map_err(|_| SessionError::Timeout("connect"))??;
        stream.set_nodelay(true)?;
        let mut reader = StreamReader::new(XmlLimits {
            max_element_bytes: config.max_stanza_bytes,
            max_depth: 64,
        })
        .rename_namespace(ns::COMPONENT, ns::CLIENT)
        // One stanza over a limit costs that stanza, not the stream that carries every tunnel.
        .skip_oversized();
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' to='{}'>",
            ns::COMPONENT,
            ns::STREAM,
            config.domain
        );
        stream.write_all(header.as_bytes()).await?;
        let mut buf = vec![0u8; 16 * 1024];

        // Header, then handshake (spec §3.1).
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut stream_id = None;
        let mut handshake_sent = false;
        loop {
            while let Some(event) = reader.next_event() {
                match event {
                    XmlEvent::Header(attrs) => {
                        stream_id = attrs
                            .into_iter()
                            .find(|(k, _)| k == "id")
                            .map(|(_, v)| v)
                            .filter(|v| !v.is_empty());
                    }
                    XmlEvent::Element(el) if el.name() == "error" && el.ns() == ns::STREAM => {
                        return Err(stream_error(&el));
                    }
                    XmlEvent::Element(el) if el.name() == "handshake" && handshake_sent => {
                        return self.authenticated(stream, reader, buf).await;
                    }
                    XmlEvent::Element(el) => {
                        return Err(SessionError::Protocol(format!(
                            "unexpected <{}/> before authentication",
                            el.name()
                        )));
                    }
                    XmlEvent::Skipped { name, reason, .. } => {
                        return Err(SessionError::Protocol(format!(
                            "<{name}/> before authentication: {reason}"
                        )));
                    }
                    XmlEvent::End if handshake_sent => {
                        return Err(SessionError::HandshakeUnanswered);
                    }
                    XmlEvent::End => {
                        return Err(SessionError::Protocol("server closed the stream".into()));
                    }
                }
            }
            if let (Some(id), false) = (&stream_id, handshake_sent) {
                let digest = handshake_digest(id, config.secret.expose());
                stream
                    .write_all(format!("<handshake>{digest}</handshake>").as_bytes())
                    .await?;
                handshake_sent = true;
            }
            let n = tokio::select! {
                r = timeout(deadline.saturating_duration_since(Instant::now()), stream.read(&mut buf)) => {
                    r.map_err(|_| SessionError::Timeout("handshake"))??
                }
                _ = stopped(&mut self.shutdown) => return Err(SessionError::Shutdown),
            };
            if n == 0 && handshake_sent {
                return Err(SessionError::HandshakeUnanswered);
            }
            if n == 0 {
                return Err(SessionError::Protocol(
                    "server closed the connection during the handshake".into(),
                ));
            }
            reader.feed(&buf[..n])?;
        }
    }

    /// The authenticated stream: read, write, keep alive, until it fails or shutdown.
    async fn authenticated(
        &mut self,
        stream: TcpStream,
        mut reader: StreamReader,
        mut buf: Vec<u8>,
    ) -> Result<(), SessionError> {
        let Link {
            config,
            events,
            outbound,
            status,
            shutdown,
            ever_up,
        } = self;
        tracing::info!(
            domain = config.domain,
            server = config.server,
            "component authenticated"
        );
        *ever_up = true;
        // Stanzas queued while the link was down belong to tunnels that died with it (spec §3.5
        // rule 4); sending them on the new stream would only confuse their peers.
        let mut stale = 0usize;
        while outbound.try_recv().is_ok() {
            stale += 1;
        }
        if stale > 0 {
            tracing::info!(
                count = stale,
                "stanzas queued for the lost stream discarded"
            );
        }
        let (mut rd, mut wr) = stream.into_split();
        // The link is up once an address is known to reach this connection (slot.rs): pings
        // are sent from it, and without one the server routes nothing here.
        // The first round goes out at once, each next one a round's wait later.
        let mut slot = SlotProbe::new(&config.domain);
        let mut anchor: Option<String> = None;
        // Whether a stanza went to the router: from then on a failure is a Down, found route
        // or not (a peer's tunnel may have started meanwhile).
        let mut delivered = false;
        let mut round_deadline = Instant::now();
        let mut keepalive = tokio::time::interval(config.keepalive);
        keepalive.reset();
        let mut ping = tokio::time::interval(config.ping_interval);
        ping.reset();
        let mut ping_pending: Option<(String, Instant)> = None;
        let ping_prefix = format!("ping-{:016x}-", rand::random::<u64>());
        let mut ping_count = 0u64;
        let mut wbuf: Vec<u8> = Vec::with_capacity(WRITE_BATCH_BYTES);

        let result: Result<(), SessionError> = async {
        loop {
            let ping_deadline = ping_pending.as_ref().map(|(_, at)| *at);
            tokio::select! {
                read = rd.read(&mut buf) => {
                    let n = read?;
                    if n == 0 {
                        return Err(SessionError::Protocol("server closed the connection".into()));
                    }
                    // The XTLS exchange is request, acknowledgement, next request: with Nagle on
                    // the server's socket (Prosody's default) a delayed ACK from us stalls every
                    // exchange for ~40 ms. Quick-ack mode is not sticky, so re-arm it per read.
                    quickack(&rd);
                    reader.feed(&buf[..n])?;
                    while let Some(event) = reader.next_event() {
                        match event {
                            XmlEvent::Element(el) if el.ns() == ns::STREAM && el.name() == "error" => {
                                return Err(stream_error(&el));
                            }
                            XmlEvent::Element(el) => {
                                tracing::trace!(xml = %String::from_utf8_lossy(&to_bytes(&el)), "from server");
                                if let Some((id, _)) = &ping_pending
                                    && el.name() == "iq"
                                    && el.attr("id") == Some(id.as_str())
                                {
                                    ping_pending = None;
                                    continue;
                                }
                                match slot.classify(&el) {
                                    Probe::Stanza => {}
                                    Probe::Ours(to) => {
                                        if anchor.is_none() {
                                            tracing::info!(anchor = to, probes = slot.sent(), "the server routes to this connection; link up");
                                            anchor = Some(to);
                                            status.send_replace(LinkStatus::Up);
                                            if events.send(LinkEvent::Up).await.is_err() {
                                                return Err(SessionError::Shutdown);
                                            }
                                        }
                                        continue;
                                    }
                                    Probe::Other => continue,
                                }
                                delivered = true;
                                if events.send(LinkEvent::Stanza(el)).await.is_err() {
                                    return Err(SessionError::Shutdown);
                                }
                            }
                            XmlEvent::Skipped { name, attrs, reason } => {
                                tracing::warn!(stanza = name, %reason, "stanza from the server dropped");
                                if let Some(reply) = refuse_skipped(&name, &attrs, &reason, &config.domain) {
                                    wr.write_all(&to_stream_bytes(&reply)).await?;
                                }
                            }
                            XmlEvent::End => return Err(SessionError::Protocol("server closed the stream".into())),
                            XmlEvent::Header(_) => {}
                        }
                    }
                }
                out = outbound.recv() => {
                    let Some(stanza) = out else { return Err(SessionError::Shutdown) };
                    // Whatever else is already queued goes out in the same write: one syscall
                    // and, with TCP_NODELAY, as few segments as the bytes need.
                    wbuf.clear();
                    append_outbound(&mut wbuf, &stanza, &config.domain);
                    while wbuf.len() < WRITE_BATCH_BYTES {
                        match outbound.try_recv() {
                            Ok(stanza) => append_outbound(&mut wbuf, &stanza, &config.domain),
                            Err(_) => break,
                        }
                    }
                    if !wbuf.is_empty() {
                        wr.write_all(&wbuf).await?;
                    }
                }
                _ = keepalive.tick() => {
                    wr.write_all(b" ").await?;
                }
                _ = tokio::time::sleep_until(round_deadline), if anchor.is_none() => {
                    let Some(round) = slot.next_round() else {
                        return Err(SessionError::NoSlot(slot.sent()));
                    };
                    wbuf.clear();
                    for probe in &round {
                        append_outbound(&mut wbuf, probe, &config.domain);
                    }
                    wr.write_all(&wbuf).await?;
                    round_deadline = Instant::now() + slot::ROUND_WAIT;
                }
                _ = ping.tick(), if ping_pending.is_none() && anchor.is_some() => {
                    ping_count += 1;
                    let id = format!("{ping_prefix}{ping_count}");
                    // From the anchor, so that the answer comes back to this connection.
                    let from = anchor.as_deref().unwrap_or(&config.domain);
                    let iq = build_iq(IqType::Get, &id, from, config.ping_target(), Some(Element::bare("ping", ns::PING)));
                    wr.write_all(&to_stream_bytes(&iq)).await?;
                    ping_pending = Some((id, Instant::now() + config.ping_timeout));
                }
                _ = async { tokio::time::sleep_until(ping_deadline.unwrap_or_else(Instant::now)).await }, if ping_deadline.is_some() => {
                    return Err(SessionError::Timeout("server ping"));
                }
                _ = stopped(shutdown) => {
                    // Drain what the bots queued on their way out (their `<close/>`s), then the footer.
                    while let Ok(stanza) = outbound.try_recv() {
                        if validate_outbound(&stanza, &config.domain).is_ok() {
                            wr.write_all(&to_stream_bytes(&stanza)).await?;
                        }
                    }
                    wr.write_all(b"</stream:stream>").await?;
                    wr.shutdown().await?;
                    return Err(SessionError::Shutdown);
                }
            }
        }
    }
    .await;
        // A connection that found no route here (`no slot`) and delivered nothing lost no
        // tunnel: no Down, and `run`'s log line names the problem instead.
        if (anchor.is_some() || delivered) && !matches!(result, Err(SessionError::Shutdown)) {
            let (code, reason) = match &result {
                Err(e) => (e.code(), e.to_string()),
                Ok(()) => ("closed", "closed".into()),
            };
            let _ = events.send(LinkEvent::Down(code, reason)).await;
        }
        result
    }
}

/// Resolves once shutdown is requested (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn stream_error(el: &Element) -> SessionError {
    let condition = el
        .children()
        .find(|c| c.ns() == ns::STREAM_ERRORS && c.name() != "text")
        .map(|c| c.name().to_owned())
        .unwrap_or_else(|| "undefined-condition".into());
    let text = el
        .get_child("text", ns::STREAM_ERRORS)
        .map(|t| t.text())
        .filter(|t| !t.is_empty());
    SessionError::Stream { condition, text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_matches_the_spec_vectors() {
        assert_eq!(
            handshake_digest("sid", "123456"),
            "9accec263ab84a43c6037ccf7cd48cb1d3f6df8e"
        );
        assert_eq!(
            handshake_digest("3BF96D32", "secret"),
            "b09ea9b3b7f586be8a08d0a3dd7466f110aeb136"
        );
    }

    #[test]
    fn outbound_stanzas_use_the_stream_namespace() {
        let iq = build_iq(
            IqType::Result,
            "1",
            "e@bots.localhost",
            "a@localhost/x",
            Some(Element::bare("proceed", ns::XTLS)),
        );
        let text = String::from_utf8(to_stream_bytes(&iq)).unwrap();
        assert!(
            text.starts_with("<iq xmlns='jabber:component:accept'"),
            "{text}"
        );
        assert!(
            text.contains("<proceed xmlns='urn:xmpp:tmp:xtls'/>"),
            "{text}"
        );
        let parsed: Element = text.parse().unwrap();
        assert_eq!(parsed.attr("from"), Some("e@bots.localhost"));
    }

    #[test]
    fn outbound_addresses_are_validated() {
        let ok: Element = "<message xmlns='jabber:client' from='echo@bots.example.org' to='alice@example.net/x'/>".parse().unwrap();
        assert!(validate_outbound(&ok, "bots.example.org").is_ok());
        let foreign: Element = "<message xmlns='jabber:client' from='echo@example.org' to='a@b'/>"
            .parse()
            .unwrap();
        assert!(validate_outbound(&foreign, "bots.example.org").is_err());
        let no_to: Element = "<message xmlns='jabber:client' from='bots.example.org'/>"
            .parse()
            .unwrap();
        assert!(validate_outbound(&no_to, "bots.example.org").is_err());
    }
}
