"""Sans-IO TLS for a tunnel: OpenSSL (through pyOpenSSL) over memory BIOs, TLS 1.3 only, in
either role, with the peer's certificate judged during the handshake, and the TLS exporter
the short authentication string and pairing need.

Python's own `ssl` module would do for the client role, but it cannot accept a self-signed
client certificate it does not already trust (it has no verify callback) and has no exporter;
pyOpenSSL drives the same OpenSSL with both."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from .identity import Identity

#: Raw bytes per `<data/>` we send.
CHUNK_SIZE = 4096

STREAM_PREFIX = b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"


class TlsError(Exception):
    """TLS failed. `alert` is True when the peer sent a fatal alert, False for a local error;
    `rejected` is why our side refused the peer's certificate, if it did."""

    def __init__(self, message: str, *, alert: bool, rejected: str | None = None) -> None:
        super().__init__(message)
        self.alert = alert
        self.rejected = rejected


#: The largest inner stanza accepted, and its deepest nesting (as the component's engine).
MAX_STANZA = 256 * 1024
MAX_DEPTH = 32


class StanzaParser:
    """Incremental parser of the tunnel's plaintext: top-level `jabber:client` stanzas, each at
    most `MAX_STANZA` bytes and `MAX_DEPTH` levels deep, so a peer cannot fill our memory."""

    def __init__(self) -> None:
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._parser.feed(STREAM_PREFIX)
        self._root: ET.Element | None = None
        self._depth = 0
        self._unfinished = 0  # bytes fed since the last stanza was completed

    def feed(self, data: bytes) -> list[ET.Element]:
        """The stanzas `data` completes; raises `ET.ParseError` on XML that is not well formed
        or a stanza over the limits."""
        self._unfinished += len(data)
        self._parser.feed(data)
        done = []
        for event, elem in self._parser.read_events():
            if event == "start":
                self._depth += 1
                if self._root is None:
                    self._root = elem
                if self._depth > MAX_DEPTH + 1:
                    raise ET.ParseError(f"a stanza nested deeper than {MAX_DEPTH} levels")
            else:
                self._depth -= 1
                if self._depth == 1 and self._root is not None:
                    done.append(elem)
                    self._root.remove(elem)
        if done:
            self._unfinished = 0
        if self._unfinished > MAX_STANZA:
            raise ET.ParseError(f"a stanza larger than {MAX_STANZA} bytes")
        return done


class TlsEngine:
    """One TLS endpoint: bytes from the peer in, bytes for the peer out, stanzas up.

    `judge(cert_der)` is called with the peer's certificate during the handshake and returns
    why it is refused, or None to accept it; a refusal sends the peer a fatal alert.
    """

    def __init__(self, identity: Identity, *, server_side: bool, judge: Callable[[bytes], str | None]) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
        ctx.use_certificate(x509.load_pem_x509_certificate(identity.cert_pem))
        ctx.use_privatekey(serialization.load_pem_private_key(identity.key_pem, None))
        ctx.set_options(SSL.OP_NO_TICKET)
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        flags = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if server_side else 0)
        ctx.set_verify(flags, self._verify)
        self._judge = judge
        self.rejected: str | None = None
        self._tls = SSL.Connection(ctx, None)
        if server_side:
            self._tls.set_accept_state()
        else:
            self._tls.set_connect_state()
        self._parser = StanzaParser()
        self.handshake_done = False
        self.peer_eof = False

    def _verify(self, _conn, cert, _errno, depth, _ok) -> bool:
        if depth != 0:
            return True  # only the peer's own certificate is judged; there is no chain to trust
        der = cert.to_cryptography().public_bytes(serialization.Encoding.DER)
        self.rejected = self._judge(der)
        return self.rejected is None

    def start(self) -> None:
        """Begins the handshake (the client's hello)."""
        self.step()

    def step(self) -> list[ET.Element]:
        """Advances the handshake and returns the stanzas decrypted so far."""
        if not self.handshake_done:
            try:
                self._tls.do_handshake()
            except SSL.WantReadError:
                return []
            except SSL.Error as exc:
                raise self._failure(exc) from exc
            self.handshake_done = True
        stanzas = []
        while not self.peer_eof:
            try:
                plaintext = self._tls.recv(65536)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.peer_eof = True
                break
            except SSL.Error as exc:
                raise self._failure(exc) from exc
            stanzas.extend(self._parser.feed(plaintext))
        return stanzas

    def _failure(self, exc: SSL.Error) -> TlsError:
        text = str(exc)
        alert = "alert" in text.lower() and self.rejected is None and "certificate verify failed" not in text
        return TlsError(text, alert=alert, rejected=self.rejected)

    def feed(self, payload: bytes) -> list[ET.Element]:
        """Bytes from the peer; the stanzas they complete."""
        self._tls.bio_write(payload)
        return self.step()

    def write(self, plaintext: bytes) -> None:
        """Encrypts application data (after the handshake)."""
        self._tls.sendall(plaintext)

    def close_notify(self) -> None:
        """Queues a close_notify; the peer's is not awaited."""
        try:
            self._tls.shutdown()
        except SSL.Error:
            pass

    def take_chunks(self, size: int = CHUNK_SIZE) -> list[bytes]:
        """The bytes TLS wants sent, cut into chunks of at most `size`."""
        data = b""
        while True:
            try:
                data += self._tls.bio_read(65536)
            except SSL.WantReadError:
                break
        return [data[i : i + size] for i in range(0, len(data), size)]

    @property
    def peer_cert_der(self) -> bytes | None:
        """The peer's certificate (after the handshake)."""
        cert = self._tls.get_peer_certificate(as_cryptography=True)
        return None if cert is None else cert.public_bytes(serialization.Encoding.DER)

    @property
    def version(self) -> str | None:
        """The negotiated protocol version."""
        return self._tls.get_protocol_version_name()

    def export(self, label: bytes, context: bytes, length: int = 32) -> bytes:
        """The TLS exporter (RFC 8446 §7.5): keying material both ends share."""
        return self._tls.export_keying_material(label, length, context)
