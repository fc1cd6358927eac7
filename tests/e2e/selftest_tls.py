"""Self-test of the Python XTLS peer's TLS half, with no XMPP server and no component.

Pairs `xtls_client.TlsEngine` as TLS client (the exact code the e2e tests use) with a
`TlsEngine` in server mode over the same MemoryBIO plumbing, and moves the bytes between
them the way <data/> IQs would: in chunks of at most 4096 bytes, in order.  It checks
the certificate profile of spec §2.2 (including its DER test vector), the fingerprints
of §2.4, the inner framing of §1.9, close_notify, and that a rejected client
certificate reaches the client as a peer alert.

Run:  python3 tests/e2e/selftest_tls.py     (or: python3 -m pytest -q tests/e2e/selftest_tls.py)
"""

from __future__ import annotations

import hashlib
import ssl
import sys
import xml.etree.ElementTree as ET

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from xtls_client import (
    CHUNK_SIZE,
    NS_CLIENT,
    XMPP_ADDR_OID,
    Identity,
    StanzaParser,
    TlsEngine,
    client_context,
    der_utf8string,
    is_peer_alert,
    message_xml,
    parse_der_utf8string,
    spki_sha256,
    xmpp_addrs,
)

ALICE = "alice@localhost"
BOT = "echo@bots.localhost"


def server_context(bot: Identity, trusted_client: Identity) -> ssl.SSLContext:
    """A TLS 1.3 server that requires a client certificate and trusts exactly `trusted_client`.

    Python's ssl cannot accept an arbitrary self-signed client certificate, so the test
    server pins the one it expects by making it its only trust anchor.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # spec §1.8: no tickets
    ctx.load_verify_locations(cadata=trusted_client.cert_pem.decode())
    bot.load_into(ctx)
    return ctx


def pump(src: TlsEngine, dst: TlsEngine) -> tuple[int, list[ET.Element]]:
    """Move everything `src` wants to send into `dst`, chunk by chunk; return (chunks, stanzas)."""
    chunks = src.take_chunks()
    stanzas = []
    for chunk in chunks:
        assert 0 < len(chunk) <= CHUNK_SIZE, len(chunk)
        stanzas.extend(dst.feed(chunk))
    return len(chunks), stanzas


def handshake(client: TlsEngine, server: TlsEngine) -> int:
    """Run the handshake to completion; return the number of chunks exchanged."""
    client.step()  # ClientHello
    total = 0
    for _ in range(10):
        n1, _ = pump(client, server)
        n2, _ = pump(server, client)
        total += n1 + n2
        if client.handshake_done and server.handshake_done and n1 == 0 and n2 == 0:
            return total
    raise AssertionError(
        f"handshake did not finish: client {client.handshake_done}, server {server.handshake_done}"
    )


def new_pair(client_id: Identity, bot_id: Identity, trusted: Identity | None = None):
    client = TlsEngine(client_context(client_id), server_side=False)
    server = TlsEngine(server_context(bot_id, trusted or client_id), server_side=True)
    return client, server


def body_of(stanza: ET.Element) -> str:
    assert stanza.tag == f"{{{NS_CLIENT}}}message", stanza.tag
    return stanza.findtext(f"{{{NS_CLIENT}}}body")


# --------------------------------------------------------------------------- tests


def test_spec_der_vector():
    """spec §2.2: SAN extension DER for weather@bots.example.org."""
    expected = bytes.fromhex(
        "3028" "a026" "06082b06010505070805" "a01a"
        "0c18" + "weather@bots.example.org".encode().hex()
    )
    san = x509.SubjectAlternativeName(
        [x509.OtherName(XMPP_ADDR_OID, der_utf8string("weather@bots.example.org"))]
    )
    assert san.public_bytes() == expected, san.public_bytes().hex()


def test_utf8string_roundtrip():
    for text in ["a@b", "ü" * 100, "x" * 300, ""]:
        assert parse_der_utf8string(der_utf8string(text)) == text
    for bad in [b"", b"\x13\x01a", b"\x0c\x05ab", b"\x0c\x81"]:
        try:
            parse_der_utf8string(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_certificate_profile():
    ident = Identity.generate(ALICE)
    cert = x509.load_der_x509_certificate(ident.cert_der)
    assert xmpp_addrs(ident.cert_der) == [ALICE]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(list(san)) == 1, "exactly one SAN entry"
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o.dotted_string for o in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    try:
        cert.extensions.get_extension_for_class(x509.BasicConstraints)
        raise AssertionError("basicConstraints must be absent")
    except x509.ExtensionNotFound:
        pass
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fp = spki_sha256(ident.cert_der)
    assert fp == ":".join(f"{b:02X}" for b in hashlib.sha256(spki).digest())
    assert len(fp) == 32 * 3 - 1 and fp == fp.upper()
    other = Identity.generate(ALICE)
    assert spki_sha256(other.cert_der) != fp
    assert xmpp_addrs(Identity.generate("bob@localhost").cert_der) == ["bob@localhost"]


def test_handshake_messages_and_close():
    alice, bot = Identity.generate(ALICE), Identity.generate(BOT)
    client, server = new_pair(alice, bot)
    chunks = handshake(client, server)
    assert chunks >= 3, chunks  # ClientHello, server flight, client Certificate..Finished
    assert client.version == server.version == "TLSv1.3"
    assert client.peer_cert_der == bot.cert_der
    assert spki_sha256(client.peer_cert_der) == spki_sha256(bot.cert_der)
    assert xmpp_addrs(client.peer_cert_der) == [BOT]
    assert xmpp_addrs(server.peer_cert_der) == [ALICE]

    # 100 messages, one record each, echoed back in order.
    for i in range(100):
        client.write(message_xml(f"msg {i} <&>", f"m{i}"))
        _, got = pump(client, server)
        assert [body_of(s) for s in got] == [f"msg {i} <&>"]
        server.write(ET.tostring(got[0]))
        _, back = pump(server, client)
        assert [body_of(s) for s in back] == [f"msg {i} <&>"]
        assert back[0].get("id") == f"m{i}" and back[0].get("from") is None

    # A stanza larger than one chunk is split and reassembled.
    big = "x" * 20000
    client.write(message_xml(big, "big"))
    n, got = pump(client, server)
    assert n >= 5 and [body_of(s) for s in got] == [big]

    # Two stanzas in one record.
    client.write(message_xml("one", "1") + b"\n " + message_xml("two", "2"))
    _, got = pump(client, server)
    assert [body_of(s) for s in got] == ["one", "two"]

    # close_notify from the client reaches the server as a clean EOF.
    client.close_notify()
    n, _ = pump(client, server)
    assert n == 1 and server.peer_eof


def test_rejected_client_certificate_is_a_peer_alert():
    """The server refuses the client certificate: the client sees a TLS alert (spec §1.11)."""
    alice, bot, stranger = Identity.generate(ALICE), Identity.generate(BOT), Identity.generate(ALICE)
    client, server = new_pair(alice, bot, trusted=stranger)
    client.step()
    pump(client, server)
    pump(server, client)
    assert client.handshake_done  # TLS 1.3: the client finishes before its certificate is judged
    try:
        pump(client, server)
        raise AssertionError("server accepted an untrusted client certificate")
    except ssl.SSLError as exc:
        assert not is_peer_alert(exc), exc  # local failure on the server side
    alert = server.take_chunks()
    assert len(alert) == 1
    try:
        client.feed(alert[0])
        raise AssertionError("client did not notice the alert")
    except ssl.SSLError as exc:
        assert is_peer_alert(exc), exc


def test_stanza_parser_framing():
    parser = StanzaParser()
    data = message_xml("split", "s")
    assert parser.feed(data[:5]) == [] and parser.feed(data[5:17]) == []
    got = parser.feed(data[17:])
    assert [body_of(s) for s in got] == ["split"]
    bare = parser.feed(b"<message type='chat'><body>no xmlns</body></message>")
    assert [body_of(s) for s in bare] == ["no xmlns"]  # default namespace is jabber:client
    try:
        StanzaParser().feed(b"<?xml version='1.0'?><message/>")
        raise AssertionError("XML declaration inside the tunnel was accepted")
    except ET.ParseError:
        pass


if __name__ == "__main__":
    import pytest

    sys.exit(pytest.main([__file__, "-q"]))
