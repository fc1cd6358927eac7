//! Tunnel engine benchmarks, each against a baseline measured in the same run.
//!
//! **`per_stanza`**: one ~200-byte chat message (`<message type='chat'>` with `from`/`to`)
//! from the bot (responder engine) to the peer (initiator engine) and the peer's reply back,
//! over a tunnel opened by a real handshake beforehand.
//!
//! - `per_stanza/engine`: two [`Tunnel`] engines. Each direction: `send` (serialize, strip
//!   routing, encrypt, chunk, base64, build the `data` IQ), the IQ serialized as the component
//!   writes it ([`to_stream_bytes`]) and parsed back from those bytes by a stream reader set up
//!   as the component's, [`Iq::parse`], `handle_iq` (decode, decrypt, parse the inner stanza,
//!   restore routing), then the `result` ack the same way back to the sender.
//! - `per_stanza/floor`: the unavoidable part of the same work with the same crates: a
//!   handshaken rustls `ServerConnection`/`ClientConnection` pair, `writer().write_all` of
//!   the same inner bytes (serialized once, outside the loop), `write_tls`, base64, the same
//!   IQ built directly with minidom and serialized, parsed back by the same reader, base64
//!   decode, `read_tls`/`process_new_packets`/`reader().read`, the inner stanza parsed by the
//!   same tunnel-plaintext reader, and the same `result` ack serialized and parsed.
//!
//! Target: engine time ≤ 1.5 × floor time.
//!
//! **`handshake`**: a whole handshake to an open tunnel: TLS 1.3, client certificate, ECDSA
//! P-256 keys made by [`BotIdentity::generate`]. The randomness of TLS makes it impractical to
//! replay a recorded client flight, so both benchmarks run the *pair* (client and server) and
//! the ratio compares like with like.
//!
//! - `handshake/engine`: [`Tunnel::initiate`] (peer) and [`Tunnel::accept`] on its `start`
//!   (bot), every IQ serialized and parsed as on the wire, until both are open (the
//!   initiator's last flight acknowledged).
//! - `handshake/engine_direct`: the same with the IQ elements handed over without XML
//!   serialization: the engine's own share, for attribution.
//! - `handshake/raw_rustls`: a rustls client and server built from the same certificates and
//!   keys (configurations built once), verifiers that accept the certificate without parsing
//!   it but do check the CertificateVerify signature, bytes moved between them in memory.
//!
//! Target: engine rate ≥ 0.8 × raw rate (engine time ≤ 1.25 × raw time).
//!
//! `scripts/bench` prints the ratios; `scripts/callgrind` counts instructions per iteration.
//! With `XTLS_BENCH_COUNT_STEPS` set, the number of measured steps run is printed at exit
//! (what `scripts/callgrind` divides by).

use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use criterion::{Criterion, criterion_group};
use minidom::Element;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, ClientConnection, Connection, DigitallySignedStruct, DistinguishedName,
    ServerConfig, ServerConnection, SignatureScheme,
};
use rxml::NcName;
use xtls::certs::BotIdentity;
use xtls::stanza::chat_message;
use xtls::stanza::{Iq, XtlsElement, ns, remove_attr, set_attr};
use xtls::tunnel::{
    BotCredentials, Event, PeerPolicy, State, Tunnel, TunnelConfig, TunnelKey, TunnelParams,
    classify_request,
};
use xtls::xml::{StreamReader, XmlEvent, XmlLimits, to_bytes};
use xtls_component::link::to_stream_bytes;

const ALICE: &str = "alice@example.net/laptop";
const ALICE_BARE: &str = "alice@example.net";
const BOT: &str = "weather@bots.example.org";
/// Serialized size of the chat message with its routing attributes.
const MESSAGE_BYTES: usize = 200;

/// Measured steps run so far (for `scripts/callgrind`).
static STEPS: AtomicU64 = AtomicU64::new(0);

fn count_step() {
    STEPS.fetch_add(1, Ordering::Relaxed);
}

/// The component's reader of the server stream (`component.rs`), its header already read.
fn stream_reader() -> StreamReader {
    let mut reader = StreamReader::new(XmlLimits {
        max_element_bytes: 1024 * 1024,
        max_depth: 64,
    })
    .rename_namespace(ns::COMPONENT, ns::CLIENT)
    .skip_oversized();
    let header = format!(
        "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' from='bots.example.org' id='s1'>",
        ns::COMPONENT,
        ns::STREAM
    );
    reader.feed(header.as_bytes()).expect("a valid header");
    while reader.next_event().is_some() {}
    reader
}

/// Parses one serialized stanza with `reader`.
fn parse_wire(reader: &mut StreamReader, bytes: &[u8]) -> Element {
    reader.feed(bytes).expect("well-formed stanza");
    match reader.next_event() {
        Some(XmlEvent::Element(el)) => el,
        other => panic!("expected one stanza, got {other:?}"),
    }
}

/// A chat message `from` → `to` whose serialization is [`MESSAGE_BYTES`] long.
fn message(from: &str, to: &str) -> Element {
    let build = |body: &str| {
        let mut m = chat_message(body, "chat");
        set_attr(&mut m, "from", from);
        set_attr(&mut m, "to", to);
        m
    };
    let overhead = to_bytes(&build("")).len();
    let body: String = "The forecast for tomorrow: sunny, light wind. "
        .chars()
        .cycle()
        .take(MESSAGE_BYTES.saturating_sub(overhead))
        .collect();
    build(&body)
}

struct Identities {
    alice: BotIdentity,
    bot: BotIdentity,
}

fn identities() -> Identities {
    Identities {
        alice: BotIdentity::generate(ALICE_BARE).expect("key generation"),
        bot: BotIdentity::generate(BOT).expect("key generation"),
    }
}

// ---------------------------------------------------------------------------------------------
// The engine pair.

/// One side of an engine pair: its tunnel and the reader of the stream it receives on.
struct Side {
    params: TunnelParams,
    tunnel: Option<Tunnel>,
    reader: StreamReader,
    next_prefix: u64,
    stanzas: u64,
    acks: u64,
    established: u64,
}

impl Side {
    fn new(local: &str, peer: &str, identity: &BotIdentity) -> Side {
        Side {
            params: TunnelParams {
                config: TunnelConfig::default(),
                key: TunnelKey {
                    local: local.into(),
                    peer: peer.into(),
                },
                creds: BotCredentials::new(identity.clone()).expect("usable key"),
                policy: PeerPolicy::default(),
                id_prefix: String::new(),
            },
            tunnel: None,
            reader: stream_reader(),
            next_prefix: 0,
            stanzas: 0,
            acks: 0,
            established: 0,
        }
    }

    fn fresh_params(&mut self) -> TunnelParams {
        self.next_prefix += 1;
        let mut params = self.params.clone();
        params.id_prefix = format!("{}-{}-", self.params.key.local, self.next_prefix);
        params
    }

    fn tunnel(&mut self) -> &mut Tunnel {
        self.tunnel.as_mut().expect("a tunnel exists")
    }

    /// Takes the tunnel's events, keeping counts.
    fn drain_events(&mut self) {
        let Some(t) = self.tunnel.as_mut() else {
            return;
        };
        while let Some(event) = t.poll_event() {
            match event {
                Event::Stanza(s) => {
                    self.stanzas += 1;
                    black_box(s);
                }
                Event::Acknowledged(_) => self.acks += 1,
                Event::Established(_) => self.established += 1,
                Event::Closed(reason) => panic!("tunnel closed: {reason}"),
                Event::Writable | Event::Unanswered(_) => {}
            }
        }
    }

    /// Handles one received IQ: `start` creates the responder, anything else goes to the tunnel.
    fn receive(&mut self, now: Instant, el: &Element) {
        let iq = Iq::parse(el).expect("tunnels send IQs");
        if self.tunnel.is_none() {
            let Ok(XtlsElement::Start { offer }) = classify_request(&iq) else {
                panic!("the first IQ is a start");
            };
            let params = self.fresh_params();
            let tunnel = Tunnel::accept(now, params, &iq, offer.as_ref()).expect("accepted");
            self.tunnel = Some(tunnel);
        } else {
            self.tunnel().handle_iq(now, &iq);
        }
    }
}

/// The peer (initiator, `alice`) and the bot (responder).
struct EnginePair {
    now: Instant,
    alice: Side,
    bot: Side,
    /// Whether IQs cross as XML bytes (true) or as elements.
    wire: bool,
}

impl EnginePair {
    fn new(ids: &Identities, wire: bool) -> EnginePair {
        EnginePair {
            now: Instant::now(),
            alice: Side::new(ALICE, BOT, &ids.alice),
            bot: Side::new(BOT, ALICE, &ids.bot),
            wire,
        }
    }

    /// Moves one stanza from `from` to `to`, through XML bytes when `wire` is set.
    fn cross(now: Instant, wire: bool, to: &mut Side, el: Element) {
        if wire {
            let bytes = to_stream_bytes(&el);
            drop(el);
            let el = parse_wire(&mut to.reader, &bytes);
            to.receive(now, &el);
        } else {
            to.receive(now, &el);
        }
    }

    /// Moves queued stanzas both ways until nothing moves.
    fn pump(&mut self) {
        let (now, wire) = (self.now, self.wire);
        loop {
            let mut moved = false;
            while let Some(el) = self.alice.tunnel.as_mut().and_then(Tunnel::poll_transmit) {
                Self::cross(now, wire, &mut self.bot, el);
                moved = true;
            }
            while let Some(el) = self.bot.tunnel.as_mut().and_then(Tunnel::poll_transmit) {
                Self::cross(now, wire, &mut self.alice, el);
                moved = true;
            }
            self.alice.drain_events();
            self.bot.drain_events();
            if !moved {
                return;
            }
        }
    }

    /// A full handshake from scratch: both tunnels open afterwards.
    fn handshake(&mut self) {
        self.bot.tunnel = None;
        let params = self.alice.fresh_params();
        self.alice.tunnel = Some(Tunnel::initiate(self.now, params));
        self.pump();
        debug_assert_eq!(self.alice.tunnel().state(), State::Open);
        debug_assert_eq!(self.bot.tunnel().state(), State::Open);
    }

    /// The bot sends `to_alice`, Alice answers with `to_bot`; both acknowledged.
    fn round_trip(&mut self, to_alice: &Element, to_bot: &Element) {
        let now = self.now;
        self.bot
            .tunnel()
            .send(now, to_alice.clone())
            .expect("open tunnel");
        self.pump();
        self.alice
            .tunnel()
            .send(now, to_bot.clone())
            .expect("open tunnel");
        self.pump();
    }
}

#[inline(never)]
fn per_stanza_engine(pair: &mut EnginePair, to_alice: &Element, to_bot: &Element) {
    count_step();
    pair.round_trip(to_alice, to_bot);
}

#[inline(never)]
fn handshake_engine(pair: &mut EnginePair) {
    count_step();
    pair.handshake();
}

// ---------------------------------------------------------------------------------------------
// The floor: bare rustls, base64, minidom and the same XML readers.

/// A verifier that takes any certificate but checks the handshake signature with it.
#[derive(Debug)]
struct AcceptAnyKey(Arc<CryptoProvider>);

impl AcceptAnyKey {
    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
}

impl ServerCertVerifier for AcceptAnyKey {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for AcceptAnyKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Raw rustls configurations with the same profile as the engine's (TLS 1.3 only, client
/// certificate required, no tickets, no SNI, no resumption).
struct RawConfigs {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl RawConfigs {
    fn new(ids: &Identities) -> RawConfigs {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(AcceptAnyKey(provider.clone()));
        let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls13)
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(vec![ids.bot.cert_der().clone()], ids.bot.private_key())
            .expect("usable key");
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(vec![ids.alice.cert_der().clone()], ids.alice.private_key())
            .expect("usable key");
        client.enable_sni = false;
        client.resumption = rustls::client::Resumption::disabled();
        RawConfigs {
            client: Arc::new(client),
            server: Arc::new(server),
        }
    }

    /// A fresh connection pair, handshake done.
    fn handshake(&self) -> (Connection, Connection) {
        let name = ServerName::try_from("xtls.invalid").expect("a valid name");
        let mut client: Connection = ClientConnection::new(self.client.clone(), name)
            .expect("client")
            .into();
        let mut server: Connection = ServerConnection::new(self.server.clone())
            .expect("server")
            .into();
        let mut buf = Vec::with_capacity(4096);
        loop {
            let mut moved = false;
            while client.wants_write() {
                client.write_tls(&mut buf).expect("write to a Vec");
            }
            if !buf.is_empty() {
                moved = true;
                feed(&mut server, &buf).expect("server accepts");
                buf.clear();
            }
            while server.wants_write() {
                server.write_tls(&mut buf).expect("write to a Vec");
            }
            if !buf.is_empty() {
                moved = true;
                feed(&mut client, &buf).expect("client accepts");
                buf.clear();
            }
            if !moved {
                break;
            }
        }
        debug_assert!(!client.is_handshaking() && !server.is_handshaking());
        (client, server)
    }
}

/// Feeds all of `bytes` to a connection.
fn feed(conn: &mut Connection, mut bytes: &[u8]) -> Result<rustls::IoState, rustls::Error> {
    let mut state = None;
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes).expect("read from a slice");
        state = Some(conn.process_new_packets()?);
    }
    Ok(state.expect("some bytes"))
}

#[inline(never)]
fn handshake_raw(configs: &RawConfigs) {
    count_step();
    black_box(configs.handshake());
}

/// The attribute names the floor uses, made once.
struct Names {
    type_: NcName,
    id: NcName,
    from: NcName,
    to: NcName,
}

impl Names {
    fn new() -> Names {
        let n = |s: &str| NcName::try_from(s).expect("valid name");
        Names {
            type_: n("type"),
            id: n("id"),
            from: n("from"),
            to: n("to"),
        }
    }
}

/// One end of the floor pipeline.
struct FloorSide {
    conn: Connection,
    jid: &'static str,
    /// The component stream reader (IQs in).
    reader: StreamReader,
    /// The tunnel-plaintext reader (inner stanzas in).
    inner: StreamReader,
    /// The inner bytes this side sends (routing already stripped).
    out: Vec<u8>,
    tls: Vec<u8>,
    plaintext: Vec<u8>,
    next_id: u64,
    stanzas: u64,
}

impl FloorSide {
    fn new(conn: Connection, jid: &'static str, out: Vec<u8>) -> FloorSide {
        FloorSide {
            conn,
            jid,
            reader: stream_reader(),
            inner: StreamReader::with_synthetic_root(XmlLimits {
                max_element_bytes: TunnelConfig::default().max_inner_stanza,
                max_depth: 32,
            }),
            out,
            tls: Vec::with_capacity(1024),
            plaintext: Vec::with_capacity(1024),
            next_id: 0,
            stanzas: 0,
        }
    }
}

struct Floor {
    names: Names,
    alice: FloorSide,
    bot: FloorSide,
}

/// One direction of the floor: `from` encrypts its inner bytes, `to` reads the stanza, acks.
fn floor_send(names: &Names, from: &mut FloorSide, to: &mut FloorSide) {
    // Sender: encrypt, base64, the `data` IQ as the stream carries it.
    from.conn.writer().write_all(&from.out).expect("buffered");
    from.tls.clear();
    while from.conn.wants_write() {
        from.conn.write_tls(&mut from.tls).expect("write to a Vec");
    }
    from.next_id += 1;
    let id = format!("{}-{}", from.jid, from.next_id);
    let data = Element::builder("data", ns::XTLS)
        .append(STANDARD.encode(&from.tls))
        .build();
    let iq = Element::builder("iq", ns::COMPONENT)
        .attr(names.type_.clone(), "set")
        .attr(names.id.clone(), id.as_str())
        .attr(names.from.clone(), from.jid)
        .attr(names.to.clone(), to.jid)
        .append(data)
        .build();
    let bytes = to_bytes(&iq);
    drop(iq);

    // Receiver: parse, base64 decode, decrypt, parse the inner stanza.
    let iq = parse_wire(&mut to.reader, &bytes);
    debug_assert_eq!(iq.attr("type"), Some("set"));
    let text = iq.get_child("data", ns::XTLS).expect("a data IQ").text();
    let raw = STANDARD.decode(text.as_bytes()).expect("valid base64");
    let state = feed(&mut to.conn, &raw).expect("valid records");
    let n = state.plaintext_bytes_to_read();
    to.plaintext.resize(n, 0);
    to.conn
        .reader()
        .read_exact(&mut to.plaintext)
        .expect("plaintext");
    to.inner.feed(&to.plaintext).expect("well-formed stanza");
    match to.inner.next_event() {
        Some(XmlEvent::Element(stanza)) => {
            to.stanzas += 1;
            black_box(stanza);
        }
        other => panic!("expected a stanza, got {other:?}"),
    }

    // The ack: receiver builds and serializes it, sender parses it.
    let ack = Element::builder("iq", ns::COMPONENT)
        .attr(names.type_.clone(), "result")
        .attr(names.id.clone(), iq.attr("id").expect("an id"))
        .attr(names.from.clone(), to.jid)
        .attr(names.to.clone(), from.jid)
        .build();
    let bytes = to_bytes(&ack);
    drop(ack);
    let ack = parse_wire(&mut from.reader, &bytes);
    debug_assert_eq!(ack.attr("type"), Some("result"));
    debug_assert_eq!(ack.attr("id"), Some(id.as_str()));
    black_box(ack);
}

#[inline(never)]
fn per_stanza_floor(floor: &mut Floor) {
    count_step();
    floor_send(&floor.names, &mut floor.bot, &mut floor.alice);
    floor_send(&floor.names, &mut floor.alice, &mut floor.bot);
}

// ---------------------------------------------------------------------------------------------

fn per_stanza(c: &mut Criterion) {
    let ids = identities();
    let to_alice = message(BOT, ALICE);
    let to_bot = message(ALICE, BOT);
    assert_eq!(to_bytes(&to_alice).len(), MESSAGE_BYTES);

    let mut pair = EnginePair::new(&ids, true);
    pair.handshake();
    pair.round_trip(&to_alice, &to_bot);
    assert_eq!((pair.alice.stanzas, pair.bot.stanzas), (1, 1));
    assert_eq!((pair.alice.acks, pair.bot.acks), (1, 1));

    let configs = RawConfigs::new(&ids);
    let (client, server) = configs.handshake();
    let inner = |m: &Element| {
        let mut m = m.clone();
        remove_attr(&mut m, "from");
        remove_attr(&mut m, "to");
        to_bytes(&m)
    };
    let mut floor = Floor {
        names: Names::new(),
        alice: FloorSide::new(client, ALICE, inner(&to_bot)),
        bot: FloorSide::new(server, BOT, inner(&to_alice)),
    };
    floor_send(&floor.names, &mut floor.bot, &mut floor.alice);
    floor_send(&floor.names, &mut floor.alice, &mut floor.bot);
    assert_eq!((floor.alice.stanzas, floor.bot.stanzas), (1, 1));

    let mut group = c.benchmark_group("per_stanza");
    group.bench_function("engine", |b| {
        b.iter(|| per_stanza_engine(&mut pair, &to_alice, &to_bot))
    });
    group.bench_function("floor", |b| b.iter(|| per_stanza_floor(&mut floor)));
    group.finish();
    assert_eq!(pair.alice.stanzas, pair.bot.stanzas);
}

fn handshake(c: &mut Criterion) {
    let ids = identities();
    let mut wire = EnginePair::new(&ids, true);
    let mut direct = EnginePair::new(&ids, false);
    for pair in [&mut wire, &mut direct] {
        pair.handshake();
        assert_eq!((pair.alice.established, pair.bot.established), (1, 1));
    }
    let configs = RawConfigs::new(&ids);

    let mut group = c.benchmark_group("handshake");
    group.bench_function("engine", |b| b.iter(|| handshake_engine(&mut wire)));
    group.bench_function("engine_direct", |b| {
        b.iter(|| handshake_engine(&mut direct))
    });
    group.bench_function("raw_rustls", |b| b.iter(|| handshake_raw(&configs)));
    group.finish();
}

criterion_group!(benches, per_stanza, handshake);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    if std::env::var_os("XTLS_BENCH_COUNT_STEPS").is_some() {
        eprintln!("xtls-bench-steps: {}", STEPS.load(Ordering::Relaxed));
    }
}
