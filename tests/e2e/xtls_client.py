"""An independent XTLS peer for the end-to-end tests: slixmpp for XMPP, stdlib `ssl` for TLS.

It implements both roles of docs/protocol.md §1.4–§1.10 (XTLS 0.0.5, namespace
`urn:xmpp:tmp:xtls`) on a TLS stack other than the component's rustls:

    XtlsClient (slixmpp ClientXMPP, plaintext c2s on loopback; answers disco#info)
        └─ Tunnel (one per peer JID: start/proceed, data window, acks, close)
              └─ TlsEngine (sans-IO: ssl.SSLObject over two MemoryBIOs, TLS 1.3 only), or
                 OpenSslEngine (the same over pyOpenSSL, for the TLS exporter that `ssl` lacks)
                    └─ StanzaParser (incremental parse of the inner jabber:client stanzas, §1.9)

As **initiator** (`open_tunnel`) we are the TLS client; the bot's certificate is not verified
by `ssl` (CERT_NONE): callers compare fingerprints themselves after the handshake.
As **responder** (`serve`, then `next_tunnel`) we answer the bot's disco#info and `start`
with `proceed` and are the TLS server: we request the bot's client certificate, accept only
the one pinned for that bot (the admin API shows it), and check its XmppAddr (§2.3).
Either way we present a self-signed ECDSA P-256 certificate whose subjectAltName holds
exactly one XmppAddr otherName = our bare JID (§2.2).

Every IQ this module sends is matched to its reply by id here (slixmpp's `Iq.send()` drops
a reply from a full JID to a bare-JID request, docs/servers.md), and a reply whose
`from` is not the JID the request went to is a protocol error (spec §1.12 rule 5).
Errors answered by the component surface as `XtlsError(condition)`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import ssl
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import slixmpp
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from slixmpp.stanza import Iq
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

# The helpers this peer shares with the Python plugin (clients/python), which started from it;
# other test modules import some of them from here.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python" / "src"))
from slixmpp_xtls.identity import (  # noqa: E402
    XMPP_ADDR_OID,
    cert_sha256,
    colon_hex,
    der_utf8string,
    parse_der_utf8string,
    spki_sha256,
    xmpp_addrs,
)
from slixmpp_xtls.tls import StanzaParser  # noqa: E402
from slixmpp_xtls.tls import TlsEngine as PluginEngine  # noqa: E402
from slixmpp_xtls.tls import TlsError as PluginTlsError  # noqa: E402
from slixmpp_xtls.identity import Identity as PluginIdentity  # noqa: E402
from slixmpp_xtls.verify import normalize_code, sas_code  # noqa: E402

NS_XTLS = "urn:xmpp:tmp:xtls"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_CLIENT = "jabber:client"
NS_C2CTLS = "urn:xmpp:tmp:c2ctls"  # XEP-0250 offers (spec §1.6)
NS_PUBKEY = "urn:xmpp:tmp:pubkey"  # XEP-0189 v0.8 keyinfo inside an offer
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_SAS = "urn:xmpp:tmp:xtls:sas"  # short authentication strings (docs/verification.md)
SAS_LABEL = b"EXPERIMENTAL-xtls-sas"
NS_PAIR = "urn:xmpp:tmp:xtls:pair"  # pairing codes (docs/verification.md)
CHANNEL_BINDING_LABEL = b"EXPORTER-Channel-Binding"  # RFC 9266 tls-exporter

CHUNK_SIZE = 4096  # raw bytes per <data/> we send (spec §1.7 rule 2)
WINDOW = 4  # unacknowledged <data/> IQs per tunnel (spec §1.7 rule 5)
XML_WHITESPACE = {ord(c): None for c in " \t\r\n"}  # stripped from <data/> before decoding


# --------------------------------------------------------------------------- errors


class XtlsError(Exception):
    """The peer (or a server on its behalf) answered one of our IQs with a stanza error."""

    def __init__(self, condition: str, error_type: str = "", text: str = "", *, request: str = ""):
        self.condition = condition
        self.error_type = error_type
        self.text = text
        self.request = request
        detail = f" ({text})" if text else ""
        super().__init__(f"{request or 'request'} answered with <{condition}/> type={error_type!r}{detail}")


class XtlsProtocolError(Exception):
    """The peer broke the wire rules of docs/protocol.md (wrong reply, bad framing, ...)."""


class TlsFailure(Exception):
    """TLS failed: a local handshake/record error, or a fatal alert received from the peer."""


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Identity:
    """A self-signed certificate and its key, PEM-encoded, plus the DER of the certificate."""

    cert_pem: bytes
    key_pem: bytes
    cert_der: bytes

    @classmethod
    def generate(cls, xmpp_addr: str) -> "Identity":
        """ECDSA P-256, CN and exactly one XmppAddr = `xmpp_addr`, profile of spec §2.2
        (the Python plugin's, valid for a year)."""
        made = PluginIdentity.generate(xmpp_addr, days=365)
        return cls(cert_pem=made.cert_pem, key_pem=made.key_pem, cert_der=made.cert_der)

    def load_into(self, ctx: ssl.SSLContext) -> None:
        """Load this certificate and key into `ctx` (ssl only reads files; they live a moment)."""
        with tempfile.TemporaryDirectory(prefix="xtls-id-") as tmp:
            cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert.write_bytes(self.cert_pem)
            key.write_bytes(self.key_pem)
            ctx.load_cert_chain(cert, key)


def client_context(identity: Identity) -> ssl.SSLContext:
    """TLS 1.3-only client context presenting `identity`; the peer is judged by fingerprint later."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    identity.load_into(ctx)
    return ctx


def server_context(identity: Identity, trusted_peer_pem: bytes | str | None, *, require_cert: bool = True) -> ssl.SSLContext:
    """TLS 1.3-only server context for the responder role (spec §1.8): presents `identity`,
    sends a CertificateRequest, and accepts exactly the certificate `trusted_peer_pem`.

    Python's `ssl` cannot accept an arbitrary self-signed client certificate (it has no verify
    callback), so the peer's certificate is pinned by making it the only trust anchor: the
    user compared the bot's fingerprint out of band (the admin API), which is what a pin is.
    With `require_cert=False` a peer without a certificate is admitted (CERT_OPTIONAL); a
    certificate that is presented is still checked against the pin.  No session tickets.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED if require_cert else ssl.CERT_OPTIONAL
    ctx.num_tickets = 0  # spec §1.8: no tickets, no resumption
    if trusted_peer_pem is not None:
        pem = trusted_peer_pem.decode() if isinstance(trusted_peer_pem, bytes) else trusted_peer_pem
        ctx.load_verify_locations(cadata=pem)
    identity.load_into(ctx)
    return ctx


# --------------------------------------------------------------------------- sans-IO TLS


def is_peer_alert(exc: ssl.SSLError) -> bool:
    """True when OpenSSL reports a fatal alert received from the peer (not a local failure)."""
    return "ALERT" in (exc.reason or "")


class TlsEngine:
    """One TLS endpoint over MemoryBIOs: bytes in from the peer, bytes out to it, stanzas up.

    Used as the client here and (with a server context) as the in-memory peer in
    selftest_tls.py.  Nothing in it knows about XMPP or asyncio.
    """

    def __init__(self, ctx: ssl.SSLContext, *, server_side: bool) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=None)
        self._parser = StanzaParser()
        self.handshake_done = False
        self.peer_eof = False  # close_notify received

    def step(self) -> list[ET.Element]:
        """Advance the handshake and drain decrypted stanzas. Raises ssl.SSLError, ET.ParseError."""
        if not self.handshake_done:
            if not self._handshake():
                return []
            self.handshake_done = True
        stanzas = []
        while not self.peer_eof:
            plaintext = self._read()
            if plaintext is None:
                break
            if not plaintext:  # b'' once close_notify arrived
                self.peer_eof = True
                break
            stanzas.extend(self._parser.feed(plaintext))
        return stanzas

    def _handshake(self) -> bool:
        """Advance the handshake; whether it is done."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def _read(self) -> bytes | None:
        """Decrypted bytes; None when TLS wants more input, b'' after the peer's close_notify."""
        try:
            return self._tls.read(65536)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLZeroReturnError:
            return b""

    def feed(self, payload: bytes) -> list[ET.Element]:
        """Hand bytes received from the peer to TLS; return the stanzas completed by them."""
        self._in.write(payload)
        return self.step()

    def write(self, plaintext: bytes) -> None:
        """Encrypt application data (only after the handshake)."""
        self._tls.write(plaintext)

    def close_notify(self) -> None:
        """Queue a TLS close_notify (SSL_shutdown; the peer's close_notify is not awaited)."""
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            pass

    def take_chunks(self, size: int = CHUNK_SIZE) -> list[bytes]:
        """Bytes TLS wants sent to the peer, cut into chunks of at most `size`."""
        data = self._out.read()
        return [data[i : i + size] for i in range(0, len(data), size)]

    @property
    def peer_cert_der(self) -> bytes | None:
        """DER of the peer's end-entity certificate (available after the handshake)."""
        return self._tls.getpeercert(binary_form=True)

    @property
    def version(self) -> str | None:
        return self._tls.version()


class OpenSslEngine(TlsEngine):
    """`TlsEngine`'s interface over the Python plugin's engine (pyOpenSSL), as the TLS client:
    the OpenSSL that the `cryptography` wheel bundles, reached through an API that has the TLS
    exporter (RFC 8446 §7.5) Python's `ssl` lacks, for short authentication strings. Like
    `client_context`, it accepts any server certificate: callers compare fingerprints after
    the handshake."""

    def __init__(self, identity: "Identity") -> None:
        self._engine = PluginEngine(identity, server_side=False, judge=lambda _der: None)
        self._parser = StanzaParser()
        self.handshake_done = False
        self.peer_eof = False

    def step(self) -> list[ET.Element]:
        try:
            stanzas = self._engine.step()
        except PluginTlsError as exc:
            raise ssl.SSLError(str(exc)) from exc
        self.handshake_done, self.peer_eof = self._engine.handshake_done, self._engine.peer_eof
        return stanzas

    def feed(self, payload: bytes) -> list[ET.Element]:
        try:
            stanzas = self._engine.feed(payload)
        except PluginTlsError as exc:
            raise ssl.SSLError(str(exc)) from exc
        self.handshake_done, self.peer_eof = self._engine.handshake_done, self._engine.peer_eof
        return stanzas

    def write(self, plaintext: bytes) -> None:
        self._engine.write(plaintext)

    def close_notify(self) -> None:
        self._engine.close_notify()

    def take_chunks(self, size: int = CHUNK_SIZE) -> list[bytes]:
        return self._engine.take_chunks(size)

    @property
    def peer_cert_der(self) -> bytes | None:
        return self._engine.peer_cert_der

    @property
    def version(self) -> str | None:
        return self._engine.version

    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes:
        return self._engine.export(label, context, length)


def exchange_iq(iq_id: str, element: str, payload: bytes, ns: str) -> str:
    """An inner IQ set carrying one message of a verification exchange (SAS or pairing)."""
    return (f"<iq xmlns='jabber:client' type='set' id='{iq_id}'>"
            f"<{element} xmlns='{ns}'>{base64.b64encode(payload).decode()}</{element}></iq>")


def message_xml(body: str, msg_id: str) -> bytes:
    """`<message xmlns='jabber:client' type='chat' id=..><body>..</body></message>`, no from/to."""
    msg = ET.Element("message", {"xmlns": NS_CLIENT, "type": "chat", "id": msg_id})
    ET.SubElement(msg, "body").text = body
    return ET.tostring(msg, encoding="utf-8", xml_declaration=False)


# --------------------------------------------------------------------------- XMPP side


@dataclass
class IqReply:
    """The answer to a raw IQ: `condition` is 'result' or the RFC 6120 error condition."""

    condition: str
    error_type: str
    text: str
    xml: str


def error_of(iq: Iq) -> tuple[str, str, str]:
    """(condition, type, text) of an IQ error reply."""
    return error_of_element(iq.xml)


def error_of_element(stanza: ET.Element) -> tuple[str, str, str]:
    """(condition, type, text) of a stanza error, as an element."""
    err = stanza.find(f"{{{NS_CLIENT}}}error")
    if err is None:
        return "(no <error/> element)", "", ""
    condition, text = "(no condition)", ""
    for child in err:
        if child.tag == f"{{{NS_STANZAS}}}text":
            text = child.text or ""
        elif child.tag.startswith(f"{{{NS_STANZAS}}}"):
            condition = child.tag.split("}", 1)[1]
    return condition, err.get("type", ""), text


def xtls_child(iq: Iq) -> ET.Element | None:
    """The first child of `iq` in the XTLS namespace, if any."""
    for child in iq.xml:
        if child.tag.startswith(f"{{{NS_XTLS}}}"):
            return child
    return None


class _Match(MatcherBase):
    """Matcher from a predicate (slixmpp wants MatcherBase objects)."""

    def __init__(self, predicate: Callable[[Iq], bool]) -> None:
        super().__init__(None)
        self._predicate = predicate

    def match(self, xml) -> bool:
        return isinstance(xml, Iq) and self._predicate(xml)


@dataclass
class StartRequest:
    """One `<start/>` that reached this client, and how it was answered (for assertions)."""

    from_jid: str
    to_jid: str
    offer: bool  # carried an XEP-0250 <offer/> (spec §1.6)
    offered_names: list[str]  # the keyinfo <name/>s of that offer
    answer: str = ""  # 'proceed' or the error condition we answered with
    xml: str = ""


@dataclass
class ResponderPolicy:
    """How `XtlsClient` answers peers that open tunnels to it (see `XtlsClient.serve`)."""

    trusted: dict[str, bytes | str]  # peer bare JID -> PEM of the certificate accepted for it
    advertise: bool = True  # list urn:xmpp:tmp:xtls in disco#info (spec §1.4)
    accept: bool = True  # answer <start/> with <proceed/>; False: service-unavailable
    answer_offer: bool = True  # put our own XEP-0250 offer in <proceed/> when <start/> had one
    require_peer_cert: bool = True  # CertificateRequest is always sent; False admits no certificate
    auto_reply: Callable[[ET.Element], bytes | str | list | None] | None = None


def sha1_hex(der: bytes) -> str:
    """Lowercase hex SHA-1 of a DER certificate: an XEP-0189 v0.8 keyinfo name (spec §1.6)."""
    return hashlib.sha1(der).hexdigest()


def pem_to_der(pem: bytes | str) -> bytes:
    text = pem.decode() if isinstance(pem, bytes) else pem
    return x509.load_pem_x509_certificate(text.encode()).public_bytes(serialization.Encoding.DER)


def bare(jid: str) -> str:
    return str(slixmpp.JID(jid).bare)


class Tunnel:
    """One XTLS tunnel with one peer JID, in either role (spec §1.14).

    * `role="initiator"`: we sent `<start/>` and are the TLS client (`XtlsClient.open_tunnel`).
    * `role="responder"`: the peer sent `<start/>`, we answered `<proceed/>` and are the TLS
      server, requesting the peer's certificate (`XtlsClient.serve`, `XtlsClient.next_tunnel`).

    Inner stanzas get their routing restored as spec §1.9 rule 4 says (`from` := peer,
    `to` := our JID as addressed); one whose inner `from`/`to` contradicts the carrying IQ is
    dropped and counted in `inner_dropped`.  `inner_routing_seen` counts inner stanzas that
    arrived with a `from` or `to` at all: senders must strip them.
    """

    def __init__(self, client: "XtlsClient", peer_jid: str, *, role: str = "initiator", local_jid: str | None = None) -> None:
        if role not in ("initiator", "responder"):
            raise ValueError(role)
        self.client = client
        self.peer_jid = peer_jid  # the peer's JID exactly as used on the wire (the tunnel key)
        self.role = role
        self._local_jid = local_jid  # our JID as the peer addresses it (None: our bound full JID)
        # starting, handshaking, open, failing, closing, closed, failed
        self.state = "starting" if role == "initiator" else "handshaking"
        self.engine: TlsEngine | None = None
        self.proceed_seen = False  # initiator: whether the start result carried <proceed/>
        self.handshake_seconds: float | None = None  # start sent/received -> open
        self.failure: BaseException | None = None
        self.closed_by_peer = False  # the peer sent <close/>
        self.inner_routing_seen = 0
        self.inner_dropped = 0
        self.stanzas_in = 0
        self.auto_reply: Callable[[ET.Element], bytes | str | list | None] | None = None
        self._t_start = time.monotonic()
        self._sendq: deque[tuple[bytes, bool]] = deque()  # (chunk, carries handshake bytes)
        self._inflight: dict[str, bool] = {}  # data IQ id -> carries handshake bytes
        self._hs_outstanding = 0  # handshake chunks not yet acknowledged
        self._first_data = role == "initiator"  # initiator: method='x509' on our first data only
        self._first_data_in = role == "responder"  # responder: check `method` of the peer's first data
        self._close_notify_sent = False
        self._peer_alert: ssl.SSLError | None = None
        loop = asyncio.get_running_loop()
        self._opened = loop.create_future()
        self._inbox: asyncio.Queue[ET.Element | None] = asyncio.Queue()
        self._progress = asyncio.Event()  # set whenever an ack arrives or the state changes

    # -- public API -------------------------------------------------------------------

    @property
    def bot_jid(self) -> str:
        """The peer's JID (a bot, in the tests); kept for the initiator-only callers."""
        return self.peer_jid

    @property
    def local_jid(self) -> str:
        return self._local_jid or self.client.jid

    @property
    def peer_cert_der(self) -> bytes:
        """DER of the certificate the peer presented."""
        if self.engine is None or self.engine.peer_cert_der is None:
            raise XtlsProtocolError("no peer certificate (handshake not done, or none sent)")
        return self.engine.peer_cert_der

    def spki_sha256(self) -> str:
        return spki_sha256(self.peer_cert_der)

    def cert_sha256(self) -> str:
        return cert_sha256(self.peer_cert_der)

    def peer_xmpp_addrs(self) -> list[str]:
        return xmpp_addrs(self.peer_cert_der)

    async def wait_open(self, timeout: float = 30.0) -> None:
        """Wait until the handshake is complete (responder: the peer's Finished was fed)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._opened), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{self.role} tunnel with {self.peer_jid} not open after {timeout} s: state {self.state}"
            ) from None

    async def send_message(self, body: str, msg_id: str | None = None, timeout: float = 30.0) -> str:
        """Write one chat message into the tunnel; returns once its bytes are within the window."""
        msg_id = msg_id or uuid.uuid4().hex[:12]
        await self.send_stanza(message_xml(body, msg_id), timeout)
        return msg_id

    async def send_stanza(self, xml: bytes | str, timeout: float = 30.0) -> None:
        """Write one inner stanza (routing already stripped); returns once it is within the window."""
        self.queue_stanza(xml)
        await self._wait(lambda: not self._sendq, timeout, "window space for send_stanza")

    def queue_stanza(self, xml: bytes | str) -> None:
        """Write one inner stanza now and queue its records (no waiting; for callbacks)."""
        self._check_usable("send")
        if self.state != "open":
            raise XtlsProtocolError(f"send in state {self.state}")
        self.engine.write(xml.encode() if isinstance(xml, str) else xml)
        self._enqueue(handshake=False)

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until every data IQ we sent has been acknowledged."""
        await self._wait(lambda: not self._sendq and not self._inflight, timeout, "acks of our data")

    async def recv_stanza(self, timeout: float = 10.0) -> ET.Element:
        """Next stanza received through the tunnel, routing restored (spec §1.9 rule 4)."""
        try:
            stanza = await asyncio.wait_for(self._inbox.get(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no stanza through the tunnel with {self.peer_jid} within {timeout} s (state {self.state})"
            ) from None
        if stanza is None:
            self._inbox.put_nowait(None)  # keep waking later callers
            raise XtlsProtocolError(f"tunnel with {self.peer_jid} ended ({self.state})") from self.failure
        return stanza

    async def recv_message(self, timeout: float = 10.0) -> str:
        """Body of the next message received through the tunnel."""
        stanza = await self.recv_stanza(timeout)
        if stanza.tag != f"{{{NS_CLIENT}}}message":
            raise XtlsProtocolError(f"expected a jabber:client message, got {ET.tostring(stanza)!r}")
        body = stanza.find(f"{{{NS_CLIENT}}}body")
        if body is None:
            raise XtlsProtocolError(f"message without body: {ET.tostring(stanza)!r}")
        return body.text or ""

    # -- short authentication strings (docs/verification.md) ------------------------------

    async def _recv_iq(self, predicate: Callable[[ET.Element], bool], timeout: float) -> ET.Element:
        """The next inner IQ `predicate` accepts; other stanzas meanwhile are an error."""
        stanza = await self.recv_stanza(timeout)
        if stanza.tag != f"{{{NS_CLIENT}}}iq" or not predicate(stanza):
            raise XtlsProtocolError(f"expected a SAS IQ, got {ET.tostring(stanza)!r}")
        return stanza

    def _export(self, label: bytes, context: bytes) -> bytes:
        """32 bytes of the TLS exporter (pyOpenSSL only: Python's ssl has none)."""
        if not hasattr(self.engine, "export_keying_material"):
            raise XtlsProtocolError("this TLS engine has no exporter: log in with tls='openssl'")
        return self.engine.export_keying_material(label, 32, context)

    def _sas_code(self, context: bytes) -> tuple[str, str]:
        return sas_code(self._export(SAS_LABEL, context))

    async def start_sas(self, timeout: float = 10.0, *, tamper_their_nonce: bool = False) -> tuple[str, str]:
        """Run the exchange as the committer; returns the code (sas28x5, six digits).
        `tamper_their_nonce` uses another nonce than the one received, as a man in the middle
        that changed it in transit would make us do: the codes then differ."""
        ours = os.urandom(32)
        commit_id, reveal_id = f"sas-{uuid.uuid4().hex[:8]}", f"sas-{uuid.uuid4().hex[:8]}"
        await self.send_stanza(exchange_iq(commit_id, "commit", hashlib.sha256(ours).digest(), NS_SAS), timeout)
        reply = await self._recv_iq(lambda s: s.get("id") == commit_id, timeout)
        if reply.get("type") != "result":
            raise XtlsError(*error_of_element(reply), request="sas commit")
        theirs = base64.b64decode(reply.findtext(f"{{{NS_SAS}}}nonce") or "")
        if tamper_their_nonce:
            theirs = bytes([theirs[0] ^ 1]) + theirs[1:]
        await self.send_stanza(exchange_iq(reveal_id, "reveal", ours, NS_SAS), timeout)
        ack = await self._recv_iq(lambda s: s.get("id") == reveal_id, timeout)
        if ack.get("type") != "result":
            raise XtlsError(*error_of_element(ack), request="sas reveal")
        return self._sas_code(ours + theirs)

    async def answer_sas(self, timeout: float = 10.0) -> tuple[str, str]:
        """Answer an exchange the peer starts; returns the code once the reveal checks out."""
        commit = await self._recv_iq(lambda s: s.find(f"{{{NS_SAS}}}commit") is not None, timeout)
        committed = base64.b64decode(commit.findtext(f"{{{NS_SAS}}}commit") or "")
        ours = os.urandom(32)
        await self.send_stanza(
            f"<iq xmlns='jabber:client' type='result' id='{commit.get('id')}'>"
            f"<nonce xmlns='{NS_SAS}'>{base64.b64encode(ours).decode()}</nonce></iq>", timeout)
        reveal = await self._recv_iq(lambda s: s.find(f"{{{NS_SAS}}}reveal") is not None, timeout)
        theirs = base64.b64decode(reveal.findtext(f"{{{NS_SAS}}}reveal") or "")
        if hashlib.sha256(theirs).digest() != committed:
            raise XtlsProtocolError("the revealed nonce does not match its commitment")
        await self.send_stanza(f"<iq xmlns='jabber:client' type='result' id='{reveal.get('id')}'/>", timeout)
        return self._sas_code(theirs + ours)

    async def pair(self, code: str, timeout: float = 10.0) -> None:
        """Pair with the code the bot's operator showed us (SPAKE2 side A, docs/verification.md);
        returns once the bot proved it knows the code too.  Raises XtlsError when the bot refuses
        (`not-authorized`: a wrong code, or none waiting)."""
        from spake2 import SPAKE2_A

        own, bot = self.local_jid.split("/")[0], self.peer_jid.split("/")[0]
        spake = SPAKE2_A(normalize_code(code).encode(), idA=own.encode(), idB=bot.encode())
        pake_id, confirm_id = f"pair-{uuid.uuid4().hex[:8]}", f"pair-{uuid.uuid4().hex[:8]}"
        await self.send_stanza(exchange_iq(pake_id, "pake", spake.start(), NS_PAIR), timeout)
        reply = await self._recv_iq(lambda s: s.get("id") == pake_id, timeout)
        if reply.get("type") != "result":
            raise XtlsError(*error_of_element(reply), request="pair")
        key = spake.finish(base64.b64decode(reply.findtext(f"{{{NS_PAIR}}}pake") or ""))
        cb = self._export(CHANNEL_BINDING_LABEL, b"")
        ours = hmac.new(key, b"xtls-pair confirm A" + cb, hashlib.sha256).digest()
        await self.send_stanza(exchange_iq(confirm_id, "confirm", ours, NS_PAIR), timeout)
        reply = await self._recv_iq(lambda s: s.get("id") == confirm_id, timeout)
        if reply.get("type") != "result":
            raise XtlsError(*error_of_element(reply), request="pair confirm")
        theirs = base64.b64decode(reply.findtext(f"{{{NS_PAIR}}}confirm") or "")
        expected = hmac.new(key, b"xtls-pair confirm B" + cb, hashlib.sha256).digest()
        if not hmac.compare_digest(theirs, expected):
            raise XtlsProtocolError("the bot's confirmation does not match: it does not know the code")

    async def close(self, timeout: float = 30.0) -> None:
        """Graceful close (spec §1.10 rule 1): close_notify in a data IQ, then <close/> -> <closed/>."""
        self._check_usable("close")
        self.engine.close_notify()
        self._close_notify_sent = True
        self._enqueue(handshake=False)
        await self.flush(timeout)
        self._check_usable("close")
        self.state = "closing"
        reply = await self.client._request(self.peer_jid, ET.Element(f"{{{NS_XTLS}}}close"), timeout)
        if self.state == "closed":  # crossing closes: the peer's <close/> ended it first (§1.10 rule 4)
            return
        if reply["type"] == "error":
            self._set_gone("failed", XtlsError(*error_of(reply), request="close"))
            raise self.failure
        if reply.xml.find(f"{{{NS_XTLS}}}closed") is None:
            self._set_gone("failed", XtlsProtocolError(f"result to <close/> without <closed/>: {reply}"))
            raise self.failure
        self._set_gone("closed", None)

    # -- opening ----------------------------------------------------------------------

    async def _open(self, timeout: float) -> None:
        """Initiator: start -> proceed -> ClientHello ... -> open."""
        self._t_start = time.monotonic()
        reply = await self.client._request(self.peer_jid, ET.Element(f"{{{NS_XTLS}}}start"), timeout)
        if self.state != "starting":  # lost a simultaneous-start tie-break meanwhile (spec §1.11)
            raise self.failure or XtlsProtocolError(f"tunnel to {self.peer_jid} {self.state}")
        if reply["type"] == "error":
            self._set_gone("failed", XtlsError(*error_of(reply), request="start"))
            raise self.failure
        self.proceed_seen = reply.xml.find(f"{{{NS_XTLS}}}proceed") is not None
        self.state = "handshaking"
        self.engine = self.client.new_client_engine()
        self.engine.step()  # produces the ClientHello
        self._enqueue(handshake=True)
        remaining = max(0.1, timeout - (time.monotonic() - self._t_start))
        try:
            await asyncio.wait_for(asyncio.shield(self._opened), remaining)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"tunnel to {self.peer_jid} not open after {timeout} s: state {self.state}, "
                f"handshake_done={self.engine.handshake_done}, unacked={len(self._inflight)}, "
                f"queued={len(self._sendq)}"
            ) from None

    def _accept(self, ctx: ssl.SSLContext) -> None:
        """Responder: the TLS server state exists from the moment we answer proceed (spec §1.5 rule 9)."""
        self._t_start = time.monotonic()
        self.engine = TlsEngine(ctx, server_side=True)

    def _check_open(self) -> None:
        if self.state != "handshaking" or not self.engine.handshake_done:
            return
        # spec §1.8: the initiator is open only once every handshake data IQ is acknowledged;
        # the responder once the client's Finished was fed.
        if self.role == "initiator" and self._hs_outstanding:
            return
        self.state = "open"
        self.handshake_seconds = time.monotonic() - self._t_start
        if not self._opened.done():
            self._opened.set_result(None)

    def _peer_identity_problem(self) -> str | None:
        """Responder: the XmppAddr check of spec §2.3 on the client certificate (the pin was
        already checked by `ssl`).  None when acceptable."""
        der = self.engine.peer_cert_der
        if der is None:
            policy = self.client._responder
            if policy is not None and not policy.require_peer_cert:
                return None
            return "the peer presented no certificate"
        expected = bare(self.peer_jid)
        addrs = xmpp_addrs(der)
        if expected not in addrs:
            return f"peer certificate XmppAddr {addrs} does not name {expected}"
        return None

    # -- sending ----------------------------------------------------------------------

    def _enqueue(self, *, handshake: bool) -> None:
        for chunk in self.engine.take_chunks():
            self._sendq.append((chunk, handshake))
            if handshake:
                self._hs_outstanding += 1
        self._pump()

    def _pump(self) -> None:
        while self._sendq and len(self._inflight) < WINDOW and self.state in ("handshaking", "open"):
            chunk, handshake = self._sendq.popleft()
            data = ET.Element(f"{{{NS_XTLS}}}data")
            if self._first_data:
                data.set("method", "x509")
                self._first_data = False
            data.text = base64.b64encode(chunk).decode("ascii")
            iq_id = self.client._send_iq(self.peer_jid, data, self._on_data_reply)
            self._inflight[iq_id] = handshake

    def _on_data_reply(self, iq_id: str, reply: Iq | BaseException) -> None:
        handshake = self._inflight.pop(iq_id, None)
        if handshake is None or self.state in ("closed", "failed"):
            return
        if isinstance(reply, BaseException):
            self._set_gone("failed", reply)
            return
        if reply["type"] == "error":  # spec §1.7 rule 6: any error on data kills the tunnel
            self._set_gone("failed", XtlsError(*error_of(reply), request="data"))
            return
        if handshake:
            self._hs_outstanding -= 1
        if self.state == "failing" and not self._inflight:
            self._set_gone("failed", TlsFailure(f"peer sent a TLS alert: {self._peer_alert}"))
            return
        self._pump()
        self._check_open()
        self._progress.set()

    # -- receiving --------------------------------------------------------------------

    def _on_data(self, iq: Iq, data: ET.Element) -> None:
        """An inbound <data/> IQ-set for this tunnel (spec §1.7, §1.11)."""
        if self.state == "starting":  # spec §1.11: data before our proceed arrived
            self.client._reply_error(iq, "unexpected-request", "cancel")
            self._set_gone("failed", XtlsProtocolError("peer sent <data/> before answering <start/>"))
            return
        if self.state not in ("handshaking", "open", "closing"):
            self.client._reply_error(iq, "item-not-found", "cancel")
            return
        if self._first_data_in:  # spec §1.6: missing method = x509, anything else unsupported
            self._first_data_in = False
            method = data.get("method")
            if method not in (None, "x509"):
                self.client._reply_error(iq, "feature-not-implemented", "cancel")
                self._set_gone("failed", XtlsProtocolError(f"peer's first <data/> has method={method!r}"))
                return
        text = (data.text or "").translate(XML_WHITESPACE)
        try:
            payload = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.client._reply_error(iq, "bad-request", "cancel")
            self._set_gone("failed", XtlsProtocolError(f"peer sent bad base64: {text[:40]!r}"))
            return
        if len(payload) > 65535:  # spec §1.7 rule 2
            self.client._reply_error(iq, "policy-violation", "cancel")
            self._set_gone("failed", XtlsProtocolError(f"peer sent a chunk of {len(payload)} bytes"))
            return
        was_done = self.engine.handshake_done
        try:
            stanzas = self.engine.feed(payload)
        except ssl.SSLError as exc:
            if is_peer_alert(exc):  # spec §1.11: result, then discard
                self.client._reply_result(iq)
                self._peer_alert = exc
                if self._inflight:  # the reply to our data may say why (e.g. not-acceptable)
                    self.state = "failing"
                else:
                    self._set_gone("failed", TlsFailure(f"peer sent a TLS alert: {exc}"))
                return
            alerts = self.engine.take_chunks()  # local failure sequence, spec §1.11
            for chunk in alerts:
                alert = ET.Element(f"{{{NS_XTLS}}}data")
                alert.text = base64.b64encode(chunk).decode("ascii")
                self.client._send_iq(self.peer_jid, alert, lambda *_: None)
            rejected = isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE" in (exc.reason or "")
            self.client._reply_error(iq, "not-acceptable" if rejected else "bad-request", "cancel")
            self._set_gone("failed", TlsFailure(f"local TLS error on the peer's data: {exc}"))
            return
        except ET.ParseError as exc:  # spec §1.9 rule 1: result, then close
            self.client._reply_result(iq)
            self._set_gone("failed", XtlsProtocolError(f"bad XML inside the tunnel: {exc}"))
            self.client._send_iq(self.peer_jid, ET.Element(f"{{{NS_XTLS}}}close"), lambda *_: None)
            return
        if self.role == "responder" and not was_done and self.engine.handshake_done:
            problem = self._peer_identity_problem()
            if problem is not None:  # spec §1.11: rejected certificate
                self.client._reply_error(iq, "not-acceptable", "cancel")
                self._set_gone("failed", XtlsProtocolError(problem))
                return
        self.client._reply_result(iq)
        if self.state == "handshaking":
            self._enqueue(handshake=True)
            self._check_open()
        for stanza in stanzas:
            self._deliver(stanza)
        self._progress.set()

    def _deliver(self, stanza: ET.Element) -> None:
        """Restore routing (spec §1.9 rule 4), queue for the reader, run the auto-reply."""
        frm, to = stanza.get("from"), stanza.get("to")
        if frm is not None or to is not None:
            self.inner_routing_seen += 1
        try:
            if frm is not None and bare(frm) != bare(self.peer_jid):
                self.inner_dropped += 1
                return
            if to is not None and to not in (self.local_jid, bare(self.local_jid)):
                self.inner_dropped += 1
                return
        except slixmpp.InvalidJID:
            self.inner_dropped += 1
            return
        stanza.set("from", self.peer_jid)
        stanza.set("to", self.local_jid)
        self.stanzas_in += 1
        self._inbox.put_nowait(stanza)
        if self.auto_reply is None or self.state != "open" or self.engine.peer_eof:
            return
        answer = self.auto_reply(stanza)
        if answer is None:
            return
        for xml in answer if isinstance(answer, list) else [answer]:
            self.engine.write(xml.encode() if isinstance(xml, str) else xml)
        self._enqueue(handshake=False)

    def _on_close(self, iq: Iq) -> None:
        """The peer closed the tunnel (spec §1.10 rule 2): answer <closed/>."""
        reply = iq.reply(clear=True)
        reply.append(ET.Element(f"{{{NS_XTLS}}}closed"))
        self.client.xmpp.send(reply)
        self.closed_by_peer = True
        if self.state == "closing":  # crossing closes: either answer ends it
            self._set_gone("closed", None)
        elif self._close_notify_sent:
            self._set_gone("failed", XtlsProtocolError(
                "peer sent <close/> right after our close_notify instead of waiting for ours (spec §1.10 rule 5)"
            ))
        elif self.engine is not None and self.engine.peer_eof:  # close_notify, then <close/>: graceful
            self._set_gone("closed", None)
        else:
            self._set_gone("failed", XtlsProtocolError(f"peer closed the tunnel in state {self.state} without close_notify"))

    # -- state helpers ----------------------------------------------------------------

    def _set_gone(self, state: str, failure: BaseException | None) -> None:
        if self.state in ("closed", "failed"):
            return
        self.state = state
        self.failure = failure
        self._sendq.clear()
        self.client._forget(self)
        if not self._opened.done():  # only reachable with a failure: closing needs an open tunnel
            self._opened.set_exception(failure or XtlsProtocolError(f"tunnel with {self.peer_jid} {state}"))
            self._opened.exception()  # mark retrieved; _open re-raises it
        self._inbox.put_nowait(None)
        self._progress.set()

    def _check_usable(self, what: str) -> None:
        if self.state in ("failed", "closed", "failing"):
            raise XtlsProtocolError(f"cannot {what}: tunnel with {self.peer_jid} is {self.state}") from self.failure

    async def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self._check_usable(f"wait for {what}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"tunnel with {self.peer_jid}: no {what} within {timeout} s "
                    f"(state {self.state}, unacked {len(self._inflight)}, queued {len(self._sendq)})"
                )
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), left)
            except asyncio.TimeoutError:
                pass


def reply_to_messages(answer: Callable[[str], str | None]) -> Callable[[ET.Element], bytes | None]:
    """An `auto_reply` that answers every message with a body by `answer(body)` (None: no reply)."""

    def auto_reply(stanza: ET.Element) -> bytes | None:
        if stanza.tag != f"{{{NS_CLIENT}}}message":
            return None
        body = stanza.findtext(f"{{{NS_CLIENT}}}body")
        if body is None:
            return None
        text = answer(body)
        return None if text is None else message_xml(text, uuid.uuid4().hex[:12])

    return auto_reply


class XtlsClient:
    """A logged-in XMPP client that opens XTLS tunnels as initiator and, after `serve()`,
    accepts them as responder.

    `identity` is the certificate and key our TLS endpoint presents (as client and as server);
    by default a new one whose XmppAddr is our own bare JID.  Bots trust on first use and
    refuse a changed key (spec §2.3), so callers that log in as the same user twice should
    pass the same identity.

    The client always answers disco#info (spec §1.4); it lists `urn:xmpp:tmp:xtls` only when
    it serves as responder with `advertise=True`.  `disco_requests` and `start_requests`
    record what reached it.
    """

    def __init__(self, jid: str, password: str, *, host: str, port: int, identity: Identity | None = None,
                 tls: str = "ssl") -> None:
        self.xmpp = slixmpp.ClientXMPP(
            jid,
            password,
            plugin_config={"feature_mechanisms": {"unencrypted_plain": True, "unencrypted_scram": True}},
        )
        # Plaintext c2s on loopback only: no direct TLS, no STARTTLS.
        self.xmpp.enable_direct_tls = False
        self.xmpp.enable_starttls = False
        self.xmpp.enable_plaintext = True
        self._host, self._port = host, port
        self.identity = identity or Identity.generate(slixmpp.JID(jid).bare)
        self.tls_context = client_context(self.identity)
        if tls not in ("ssl", "openssl"):
            raise ValueError(tls)
        self._tls_backend = tls  # the initiator's TLS stack: stdlib ssl, or pyOpenSSL
        self._pending: dict[str, tuple[str, Callable[[str, Iq | BaseException], None]]] = {}
        self._tunnels: dict[str, Tunnel] = {}
        self._responder: ResponderPolicy | None = None
        self._server_contexts: dict[str, ssl.SSLContext] = {}
        self.disco_requests: list[str] = []  # `from` of every disco#info query answered
        self.start_requests: list[StartRequest] = []  # every <start/> that reached us
        self.accepted_tunnels: list[Tunnel] = []  # responder tunnels, in order of acceptance
        self.xtls_requests: list[str] = []  # every XTLS IQ get/set that reached us, as XML
        self.message_errors: list[str] = []  # every <message type='error'/> that reached us, as XML
        # Hostile-peer tests: a request for which this returns True is recorded and left
        # unanswered (e.g. a peer that never acknowledges the bot's <data/>).
        self.ignore_request: Callable[[Iq], bool] | None = None
        self._accepted: asyncio.Queue[Tunnel] = asyncio.Queue()
        self.xmpp.register_handler(
            Callback("xtls replies", _Match(self._is_our_reply), self._on_reply)
        )
        self.xmpp.register_handler(
            Callback("xtls requests", _Match(self._is_xtls_request), self._on_request)
        )
        self.xmpp.register_handler(
            Callback("disco#info", _Match(self._is_disco_info_get), self._on_disco_info)
        )
        self.xmpp.add_event_handler("message_error", lambda m: self.message_errors.append(str(m)))
        self.xmpp.add_event_handler("disconnected", self._on_disconnected)

    @property
    def jid(self) -> str:
        """Our full JID as bound by the server."""
        return str(self.xmpp.boundjid.full)

    def spki_sha256(self) -> str:
        """Fingerprint of our own certificate's key."""
        return spki_sha256(self.identity.cert_der)

    # -- responder role ---------------------------------------------------------------

    def serve(
        self,
        trusted: dict[str, bytes | str] | None = None,
        *,
        advertise: bool = True,
        accept: bool = True,
        answer_offer: bool = True,
        require_peer_cert: bool = True,
        auto_reply: Callable[[ET.Element], bytes | str | list | None] | None = None,
    ) -> None:
        """Accept tunnels opened to us (spec §1.5, responder = TLS server).

        `trusted` maps a peer's bare JID to the PEM certificate we accept for it (the bot's
        certificate from the admin API); a `start` from a peer without an entry is refused with
        `not-acceptable` (spec §1.5 rule 3).  `advertise=False` leaves `urn:xmpp:tmp:xtls` out
        of disco#info; `accept=False` answers `start` with `service-unavailable`.  `auto_reply`
        is called with every inner stanza received on an open responder tunnel (routing
        restored) and may return inner stanza(s) to send back at once.
        """
        self._responder = ResponderPolicy(
            trusted={bare(k): v for k, v in (trusted or {}).items()},
            advertise=advertise,
            accept=accept,
            answer_offer=answer_offer,
            require_peer_cert=require_peer_cert,
            auto_reply=auto_reply,
        )
        self._server_contexts.clear()

    async def next_tunnel(self, timeout: float = 10.0) -> Tunnel:
        """The next tunnel a peer opened to us (returned at once after our <proceed/>)."""
        try:
            return await asyncio.wait_for(self._accepted.get(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{self.jid}: no <start/> accepted within {timeout} s "
                f"(disco#info queries: {len(self.disco_requests)}, starts: {len(self.start_requests)})"
            ) from None

    def _server_context(self, peer_bare: str) -> ssl.SSLContext:
        if peer_bare not in self._server_contexts:
            policy = self._responder
            self._server_contexts[peer_bare] = server_context(
                self.identity, policy.trusted.get(peer_bare), require_cert=policy.require_peer_cert
            )
        return self._server_contexts[peer_bare]

    def _on_start(self, iq: Iq, start: ET.Element) -> None:
        """A peer wants a tunnel with us (spec §1.5, §1.6, §1.11)."""
        peer = str(iq["from"])
        offer = start.find(f"{{{NS_C2CTLS}}}offer")
        names = [] if offer is None else [(n.text or "").strip().lower() for n in offer.iter(f"{{{NS_PUBKEY}}}name")]
        record = StartRequest(peer, str(iq["to"]), offer is not None, names, xml=str(iq))
        self.start_requests.append(record)

        def refuse(condition: str, error_type: str) -> None:
            record.answer = condition
            self._reply_error(iq, condition, error_type)

        policy = self._responder
        if policy is None or not policy.accept:
            return refuse("service-unavailable", "cancel")
        if iq["type"] != "set" or len(iq.xml) != 1:
            return refuse("bad-request", "modify")
        if offer is not None and not names:  # e.g. only <srp/>: we need a certificate (spec §1.6)
            return refuse("not-acceptable", "cancel")
        peer_bare = bare(peer)
        trusted = policy.trusted.get(peer_bare)
        if trusted is None and policy.require_peer_cert:  # nothing pinned for this peer
            return refuse("not-acceptable", "cancel")
        existing = self._tunnels.get(peer)
        if existing is not None:
            if existing.role == "initiator" and existing.state == "starting":
                # Simultaneous start (spec §1.11): the JID that sorts first (i;octet) has priority.
                if self.jid.encode() < peer.encode():
                    return refuse("conflict", "cancel")
                existing._set_gone("failed", XtlsProtocolError(f"lost the simultaneous-start tie-break to {peer}"))
            else:  # the peer lost its state: replace silently
                existing._set_gone("failed", XtlsProtocolError(f"replaced by a new <start/> from {peer}"))
        tunnel = Tunnel(self, peer, role="responder", local_jid=str(iq["to"]))
        tunnel.auto_reply = policy.auto_reply
        tunnel._accept(self._server_context(peer_bare))
        self._tunnels[peer] = tunnel
        reply = iq.reply(clear=True)
        proceed = ET.Element(f"{{{NS_XTLS}}}proceed")
        if offer is not None and policy.answer_offer:  # XEP-0250 as XTLS 0.0.5 §4.2 asks
            ours = ET.SubElement(proceed, f"{{{NS_C2CTLS}}}offer")
            keyinfo = ET.SubElement(ours, f"{{{NS_PUBKEY}}}keyinfo")
            ET.SubElement(keyinfo, f"{{{NS_PUBKEY}}}name").text = sha1_hex(self.identity.cert_der)
            known = set()
            if trusted is not None:
                der = pem_to_der(trusted)
                known = {sha1_hex(der), hashlib.sha256(der).hexdigest()}
            if not known.intersection(names):
                ET.SubElement(ours, f"{{{NS_C2CTLS}}}insecure")
        reply.append(proceed)
        self.xmpp.send(reply)
        record.answer = "proceed"
        self.accepted_tunnels.append(tunnel)
        self._accepted.put_nowait(tunnel)

    # -- disco ------------------------------------------------------------------------

    def _is_disco_info_get(self, iq: Iq) -> bool:
        return iq["type"] == "get" and iq.xml.find(f"{{{NS_DISCO_INFO}}}query") is not None

    def _on_disco_info(self, iq: Iq) -> None:
        self.disco_requests.append(str(iq["from"]))
        query = ET.Element(f"{{{NS_DISCO_INFO}}}query")
        node = iq.xml.find(f"{{{NS_DISCO_INFO}}}query").get("node")
        if node is not None:
            query.set("node", node)
        ET.SubElement(query, f"{{{NS_DISCO_INFO}}}identity", {"category": "client", "type": "pc", "name": "xtls e2e peer"})
        features = [NS_DISCO_INFO]
        if self._responder is not None and self._responder.advertise:
            features.append(NS_XTLS)
        for var in features:
            ET.SubElement(query, f"{{{NS_DISCO_INFO}}}feature", {"var": var})
        reply = iq.reply(clear=True)
        reply.append(query)
        self.xmpp.send(reply)

    # -- connection -------------------------------------------------------------------

    async def connect(self, timeout: float = 15.0) -> None:
        """Connect over plaintext c2s, authenticate, bind; return at session start."""
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        def fail(reason):
            if not started.done():
                started.set_exception(ConnectionError(f"{self.xmpp.requested_jid}: {reason}"))

        self.xmpp.add_event_handler("session_start", lambda _: started.done() or started.set_result(None), disposable=True)
        self.xmpp.add_event_handler("failed_all_auth", lambda _: fail("authentication failed"), disposable=True)
        self.xmpp.add_event_handler("connection_failed", lambda e: fail(f"connection failed: {e}"), disposable=True)
        self.xmpp.connect(self._host, self._port)
        try:
            await asyncio.wait_for(started, timeout)
        except BaseException as exc:
            self.xmpp.cancel_connection_attempt()
            self.xmpp.abort()
            if isinstance(exc, asyncio.TimeoutError):
                raise TimeoutError(f"{self.xmpp.requested_jid}: no session within {timeout} s") from None
            raise

    async def disconnect(self) -> None:
        """Close the XMPP stream (tunnels still open just die)."""
        if self.xmpp.transport is not None:
            await asyncio.wait_for(self.xmpp.disconnect(wait=2.0), 5.0)

    async def __aenter__(self) -> "XtlsClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.disconnect()

    def _on_disconnected(self, reason) -> None:
        failure = ConnectionError(f"XMPP stream of {self.jid} lost: {reason}")
        for iq_id, (_, callback) in list(self._pending.items()):
            del self._pending[iq_id]
            callback(iq_id, failure)
        for tunnel in list(self._tunnels.values()):
            tunnel._set_gone("failed", failure)

    # -- tunnels ----------------------------------------------------------------------

    def new_client_engine(self) -> "TlsEngine | OpenSslEngine":
        """A TLS client presenting our identity, on the stack this client was made with."""
        if self._tls_backend == "openssl":
            return OpenSslEngine(self.identity)
        return TlsEngine(self.tls_context, server_side=False)

    async def open_tunnel(self, bot_jid: str, timeout: float = 30.0) -> Tunnel:
        """start -> proceed -> TLS 1.3 handshake -> open (all handshake data acked)."""
        key = str(slixmpp.JID(bot_jid))
        if key in self._tunnels:
            raise XtlsProtocolError(f"a tunnel with {key} is already live")
        tunnel = Tunnel(self, key)
        self._tunnels[key] = tunnel
        try:
            await tunnel._open(timeout)
        except BaseException:
            tunnel._set_gone("failed", tunnel.failure or XtlsProtocolError("open abandoned"))
            raise
        return tunnel

    def _forget(self, tunnel: Tunnel) -> None:
        if self._tunnels.get(tunnel.peer_jid) is tunnel:
            del self._tunnels[tunnel.peer_jid]

    # -- raw IQs ----------------------------------------------------------------------

    async def send_raw_iq(self, to: str, child: str | ET.Element, itype: str = "set", timeout: float = 10.0) -> IqReply:
        """Send one IQ with `child` (XML text or element) and return how it was answered."""
        element = ET.fromstring(child) if isinstance(child, str) else child
        reply = await self._request(to, element, timeout, itype)
        if reply["type"] == "error":
            condition, error_type, text = error_of(reply)
        else:
            condition, error_type, text = "result", "", ""
        return IqReply(condition, error_type, text, str(reply))

    def send_raw(self, xml: str) -> None:
        """Write `xml` to the c2s stream as it is, in order with everything else we send (no
        reply is awaited: for results, errors and stanzas that get no answer)."""
        self.xmpp.send(xml)

    # -- IQ plumbing ------------------------------------------------------------------

    def _send_iq(self, to: str, child: ET.Element, callback, itype: str = "set") -> str:
        iq = self.xmpp.make_iq(ito=to, itype=itype)
        iq["id"] = uuid.uuid4().hex
        iq.append(child)
        self._pending[iq["id"]] = (str(slixmpp.JID(to)), callback)
        self.xmpp.send(iq)
        return iq["id"]

    async def _request(self, to: str, child: ET.Element, timeout: float, itype: str = "set") -> Iq:
        fut = asyncio.get_running_loop().create_future()

        def done(_iq_id: str, reply: Iq | BaseException) -> None:
            if fut.done():
                return
            if isinstance(reply, BaseException):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

        iq_id = self._send_iq(to, child, done, itype)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(iq_id, None)
            raise TimeoutError(f"no answer to <{child.tag.split('}')[-1]}/> sent to {to} within {timeout} s") from None

    def _is_our_reply(self, iq: Iq) -> bool:
        return iq["type"] in ("result", "error") and iq["id"] in self._pending

    def _on_reply(self, iq: Iq) -> None:
        expected_from, callback = self._pending.pop(iq["id"])
        if str(iq["from"]) != expected_from:
            callback(iq["id"], XtlsProtocolError(
                f"reply to an IQ sent to {expected_from} came from {iq['from']} (spec §1.12): {iq}"
            ))
            return
        callback(iq["id"], iq)

    def _is_xtls_request(self, iq: Iq) -> bool:
        return iq["type"] in ("set", "get") and xtls_child(iq) is not None

    def _on_request(self, iq: Iq) -> None:
        self.xtls_requests.append(str(iq))
        if self.ignore_request is not None and self.ignore_request(iq):
            return
        child = xtls_child(iq)
        name = child.tag.split("}", 1)[1]
        if name == "start":
            self._on_start(iq, child)
            return
        tunnel = self._tunnels.get(str(iq["from"]))
        if name in ("proceed", "closed"):  # known elements, wrong IQ type (spec §1.11)
            self._reply_error(iq, "bad-request", "modify")
        elif name not in ("data", "close"):
            self._reply_error(iq, "feature-not-implemented", "cancel")
        elif iq["type"] != "set" or len(iq.xml) != 1:
            self._reply_error(iq, "bad-request", "modify")
        elif tunnel is None:
            self._reply_error(iq, "item-not-found", "cancel")
        elif name == "data":
            tunnel._on_data(iq, child)
        else:
            tunnel._on_close(iq)

    def _reply_result(self, iq: Iq) -> None:
        self.xmpp.send(iq.reply(clear=True))

    def _reply_error(self, iq: Iq, condition: str, error_type: str) -> None:
        reply = iq.reply(clear=True)
        reply["type"] = "error"
        reply["error"]["condition"] = condition
        reply["error"]["type"] = error_type
        self.xmpp.send(reply)
