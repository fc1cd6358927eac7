"""Hostile input: every row of docs/security.md's table, each with the answer the spec gives
it, and each followed by the same check: alice's tunnel to the echo bot, opened before the
hostile action, still carries a message both ways (`Bystander.roundtrip`), and the component
has not panicked.

The component under attack (`hostile`, module scope) serves `echo@api.localhost` with small
limits so that deadlines pass quickly and floods hit their caps (`HOSTILE_CONFIG`). It talks
to Prosody through a `StreamTap` (hostile_helpers.py): a man in the middle on the XEP-0114
link that records every element the component writes and can inject what a hostile or
broken server would send, where Prosody would never produce the input (stanzas without
`from`, child-less IQs that Prosody answers itself for clients, stream errors, a connection
cut mid-stanza; see docs/servers.md).

Peers are real clients (alice, bob, mallory) logged in over c2s to Prosody, using the
Python XTLS peer of xtls_client.py, which can also send raw IQs and raw TLS bytes. All XMPP
work runs on one event loop in a thread (`LoopThread`), so the bystander's client keeps
answering between and during the tests.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import re
import ssl
import time
import urllib.parse
import uuid
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from component import Component
from hostile_helpers import (
    Bystander,
    LoopThread,
    StreamTap,
    assert_no_panic,
    build_identity,
    load_key,
    new_key,
    rss_kib,
    xmpp_addr,
)
from xtls_client import (
    NS_XTLS,
    Identity,
    TlsEngine,
    XtlsError,
    client_context,
    message_xml,
    xtls_child,
)

START = f"<start xmlns='{NS_XTLS}'/>"
CLOSE = f"<close xmlns='{NS_XTLS}'/>"

# Small limits so that every deadline passes and every cap is reached within seconds.
HANDSHAKE_TIMEOUT = 2
ACK_TIMEOUT = 2
MAX_INNER = 16384
MAX_STANZA = 131072  # below Prosody's c2s limit (256 KiB): a user can send more than this
# Room for the ordinary tests' starts from one peer (the certificate cases open two tunnels
# each, ten cases in a row, faster than the 10/s refill), far below the floods' 100.
START_BURST = 20
STARTS_PER_MINUTE = 600  # 10 per second
HANDSHAKES = 32
HOSTILE_CONFIG = f"""
[tunnel]
handshake_timeout_secs = {HANDSHAKE_TIMEOUT}
ack_timeout_secs = {ACK_TIMEOUT}
close_timeout_secs = 3
max_inner_stanza = {MAX_INNER}

[limits]
start_burst_per_peer = {START_BURST}
starts_per_peer_per_minute = {STARTS_PER_MINUTE}
handshakes = {HANDSHAKES}
max_stanza_bytes = {MAX_STANZA}
"""


def data(payload: str | bytes, method: str | None = None) -> str:
    if isinstance(payload, bytes):
        payload = base64.b64encode(payload).decode()
    attr = f" method='{method}'" if method else ""
    return f"<data xmlns='{NS_XTLS}'{attr}>{payload}</data>"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def loop():
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def tap(prosody):
    t = StreamTap(prosody.component_port)
    yield t
    t.close()


@pytest.fixture(scope="module")
def hostile(prosody, tap):
    """The component under attack: its own domain, store and small limits, behind the tap."""
    via_tap = SimpleNamespace(component_domain=prosody.api_component_domain, component_port=tap.port,
                              component_secret=prosody.component_secret)
    comp = Component(via_tap, extra_config=HOSTILE_CONFIG)
    # [component] is written by Component; reconnect fast after the stream-loss cases.
    text = comp.config_path.read_text()
    comp.config_path.write_text(text.replace("[component]\n", "[component]\nreconnect_max_secs = 1\n", 1))
    try:
        comp.start()
        yield comp
    finally:
        comp.cleanup()


@pytest.fixture(scope="module")
def bot(hostile) -> str:
    return f"echo@{hostile.domain}"


@pytest.fixture(scope="module")
def bystander_tunnel(loop, users, hostile, bot):
    b = Bystander(loop, users, bot)
    b.open()
    yield b
    b.close()


@pytest.fixture
def bystander(bystander_tunnel, hostile):
    """Alice's tunnel, open and working before the test (reopened if an earlier test ended it
    on purpose)."""
    hostile.wait_ready(15)  # after a test that cost the component its stream
    bystander_tunnel.ensure_working()
    return bystander_tunnel


@pytest.fixture
def api_component(hostile):
    """The same component under the name conftest's report hook knows: a failing test's
    report then carries its log tail."""
    return hostile


@pytest.fixture
def h(loop, users, api_component, tap, bot):
    return Hostile(loop, users, api_component, tap, bot)


def survived(bystander: Bystander, hostile: Component, what: str = "") -> None:
    """The shared check after every hostile action."""
    bystander.roundtrip(f"after {what}")
    assert_no_panic(hostile)


class Hostile:
    """What a case needs: peers, the component, its admin API, the tap."""

    def __init__(self, loop, users, comp, tap, bot) -> None:
        self.loop, self.users, self.comp, self.tap, self.bot = loop, users, comp, tap, bot

    @asynccontextmanager
    async def peer(self, name: str = "mallory", **kw):
        client = self.users.client(name, **kw)
        await client.connect()
        try:
            yield client
        finally:
            await client.disconnect()

    def run(self, coro, timeout: float = 60.0):
        return self.loop.run(coro, timeout)

    async def api(self, path: str):
        status, body = await asyncio.to_thread(self.comp.get, path)
        assert status == 200, (path, status, body)
        return body

    async def tunnels(self, peer: str) -> list[dict]:
        query = urllib.parse.urlencode({"bot": self.bot, "peer": peer}, safe="@/")
        rows = await self.api(f"/v1/tunnels?{query}")
        return rows.get("tunnels") if isinstance(rows, dict) else rows

    async def close_reason(self, peer: str, timeout: float = 5.0) -> str:
        """close_reason of the newest tunnel with `peer`, once it is closed."""
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.tunnels(peer)
            if rows and rows[0]["state"] == "closed":
                return rows[0]["close_reason"] or ""
            assert time.monotonic() < deadline, f"tunnel with {peer} not closed: {rows}"
            await asyncio.sleep(0.05)

    async def raw_start(self, client, to: str | None = None) -> None:
        reply = await client.send_raw_iq(to or self.bot, START)
        assert reply.condition == "result" and "proceed" in reply.xml, reply

    async def assert_gone(self, client, to: str | None = None) -> None:
        """The raw tunnel of `client` no longer exists: data for it is item-not-found."""
        reply = await client.send_raw_iq(to or self.bot, data("FgMBAAA="))
        assert (reply.condition, reply.error_type) == ("item-not-found", "cancel"), (
            f"the tunnel survived the error: {reply}")


def answered(reply, condition: str, error_type: str) -> None:
    assert (reply.condition, reply.error_type) == (condition, error_type), reply
    assert "<data" not in reply.xml.split("<error")[0], f"the error echoes the payload: {reply.xml}"


async def wait_for(predicate, timeout: float, what: str) -> float:
    """Poll `predicate` until true; return the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


# --------------------------------------------------------------------------- tunnel requests

# (case id, IQ type, child XML, whether a raw tunnel is started first, expected condition,
#  expected type). With a tunnel started, the error must also end it (spec §1.11).
REQUESTS = [
    ("data-before-start", "set", data("FgMBAAA="), False, "item-not-found", "cancel"),
    ("close-without-tunnel", "set", CLOSE, False, "item-not-found", "cancel"),
    ("unknown-xtls-element", "set", f"<foo xmlns='{NS_XTLS}'/>", False, "feature-not-implemented", "cancel"),
    ("unknown-xtls-element-on-a-tunnel", "set", f"<foo xmlns='{NS_XTLS}'/>", True, "feature-not-implemented", "cancel"),
    ("start-in-get", "get", START, False, "bad-request", "modify"),
    ("data-in-get-on-a-tunnel", "get", data("FgMBAAA="), True, "bad-request", "modify"),
    ("close-in-get-on-a-tunnel", "get", CLOSE, True, "bad-request", "modify"),
    ("proceed-in-set", "set", f"<proceed xmlns='{NS_XTLS}'/>", False, "bad-request", "modify"),
    ("closed-in-set-on-a-tunnel", "set", f"<closed xmlns='{NS_XTLS}'/>", True, "bad-request", "modify"),
    ("first-data-with-method-srp", "set", data("FgMBAAA=", method="srp"), True, "feature-not-implemented", "cancel"),
    ("start-offering-srp-only", "set",
     f"<start xmlns='{NS_XTLS}'><offer xmlns='urn:xmpp:tmp:c2ctls'><srp/></offer></start>", False,
     "not-acceptable", "cancel"),
    ("iq-in-a-foreign-namespace", "get", "<query xmlns='jabber:iq:version'/>", False, "service-unavailable", "cancel"),
]


@pytest.mark.parametrize("itype,child,with_tunnel,condition,error_type",
                         [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS])
def test_tunnel_request(h, bystander, hostile, itype, child, with_tunnel, condition, error_type):
    """XTLS requests that are wrong in themselves or in their tunnel's state (spec §1.11)."""

    async def scenario():
        async with h.peer() as mallory:
            if with_tunnel:
                await h.raw_start(mallory)
            answered(await mallory.send_raw_iq(h.bot, child, itype=itype), condition, error_type)
            if with_tunnel:
                await h.assert_gone(mallory)

    h.run(scenario())
    survived(bystander, hostile, "a bad request")


def test_data_after_close(h, bystander, hostile):
    async def scenario():
        async with h.peer() as mallory:
            await h.raw_start(mallory)
            reply = await mallory.send_raw_iq(h.bot, CLOSE)
            assert reply.condition == "result" and "closed" in reply.xml, reply
            answered(await mallory.send_raw_iq(h.bot, data("FgMBAAA=")), "item-not-found", "cancel")
            answered(await mallory.send_raw_iq(h.bot, CLOSE), "item-not-found", "cancel")

    h.run(scenario())
    survived(bystander, hostile, "data after close")


def test_start_to_unknown_bot(h, bystander, hostile):
    async def scenario():
        async with h.peer() as mallory:
            answered(await mallory.send_raw_iq(f"nobody@{hostile.domain}", START), "service-unavailable", "cancel")

    h.run(scenario())
    survived(bystander, hostile, "a start to nobody")


def test_data_to_another_form_of_the_bot_jid(h, bystander, hostile):
    """A tunnel is keyed by the bot JID as addressed (spec §1.2): data sent to the full JID
    of a bot whose tunnel was opened on its bare JID belongs to no tunnel."""

    async def scenario():
        async with h.peer() as mallory:
            await h.raw_start(mallory)
            answered(await mallory.send_raw_iq(f"{h.bot}/elsewhere", data("FgMBAAA=")), "item-not-found", "cancel")
            reply = await mallory.send_raw_iq(h.bot, data("FgMB"))  # the bare-JID tunnel is untouched
            assert reply.condition == "result", reply

    h.run(scenario())
    survived(bystander, hostile, "data to the full JID")


def test_forged_answers_get_no_answer(h, bystander, hostile):
    """Results and errors for ids the bot never sent are dropped: never answered (RFC 6120
    §8.2.3), never taken for an ack of a live tunnel's data."""

    async def scenario():
        async with h.peer() as mallory:
            await h.raw_start(mallory)
            mark = h.tap.mark()
            forged = [f"forged-{uuid.uuid4().hex[:8]}" for _ in range(3)]
            mallory.send_raw(f"<iq type='result' id='{forged[0]}' to='{h.bot}'/>")
            mallory.send_raw(f"<iq type='result' id='{forged[1]}' to='{h.bot}'><closed xmlns='{NS_XTLS}'/></iq>")
            mallory.send_raw(f"<iq type='error' id='{forged[2]}' to='{h.bot}'><error type='cancel'>"
                             "<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")
            reply = await mallory.send_raw_iq(h.bot, data("FgMB"))  # still alive, in order after them
            assert reply.condition == "result", reply
            answers = [w for w in h.tap.written_since(mark) if w.attr("id") in forged]
            assert not answers, [w.xml for w in answers]

    h.run(scenario())
    survived(bystander, hostile, "forged answers")


# --------------------------------------------------------------------------- <data/> encoding

# Spec §1.7 rule 1: XML whitespace is stripped, then strict RFC 4648 §4 base64 with padding.
BAD_BASE64 = {
    "misplaced-padding": "ab=c",
    "padding-inside": "AA=A",
    "padding-after-a-full-quantum": "AAAA=",
    "too-much-padding": "A===",
    "only-padding": "====",
    "missing-padding": "AAA",
    "incomplete-padding": "Zg=",
    "non-zero-trailing-bits": "Zh==",
    "non-alphabet-character": "*AAA",
    "url-safe-alphabet": "ab-_",
    "dot": "AA.A",
    "non-xml-whitespace": "AA\u00a0AAA",
    "full-width-letters": "ＡＡＡＡ",
}


@pytest.mark.parametrize("text", BAD_BASE64.values(), ids=BAD_BASE64.keys())
def test_bad_base64(h, bystander, hostile, text):
    """bad-request (cancel) and the tunnel is gone (spec §1.7 rule 1, §1.11)."""

    async def scenario():
        async with h.peer() as mallory:
            await h.raw_start(mallory)
            answered(await mallory.send_raw_iq(h.bot, data(text)), "bad-request", "cancel")
            await h.assert_gone(mallory)

    h.run(scenario())
    survived(bystander, hostile, "bad base64")


GOOD_BASE64 = {
    "line-breaks-and-tabs": "Fg\r\nMB\tAA==\n",  # 16 03 01 00: the start of a TLS record header
    "spaces": " F g M B ",
    "empty": "",
}


@pytest.mark.parametrize("text", GOOD_BASE64.values(), ids=GOOD_BASE64.keys())
def test_base64_with_xml_whitespace_is_accepted(h, bystander, hostile, text):
    async def scenario():
        async with h.peer() as mallory:
            await h.raw_start(mallory)
            reply = await mallory.send_raw_iq(h.bot, data(text))
            assert reply.condition == "result", reply

    h.run(scenario())
    survived(bystander, hostile, "whitespace in base64")


@pytest.mark.parametrize("size", [65536, 90_000])  # base64 of 90 000 bytes stays under MAX_STANZA
def test_chunk_over_the_limit(h, bystander, hostile, size):
    """A chunk of more than 65 535 raw bytes: policy-violation (cancel), tunnel gone (§1.7 rule 2)."""

    async def scenario():
        async with h.peer() as mallory:
            await h.raw_start(mallory)
            answered(await mallory.send_raw_iq(h.bot, data(os.urandom(size))), "policy-violation", "cancel")
            await h.assert_gone(mallory)

    h.run(scenario())
    survived(bystander, hostile, f"a chunk of {size} bytes")


def test_chunk_of_exactly_the_limit_is_accepted(h, bystander, hostile):
    """65 535 raw bytes of real records in one <data/>: accepted, and what they carry arrives."""

    async def scenario():
        async with h.peer() as mallory:
            tunnel = await mallory.open_tunnel(h.bot)
            bodies = [f"{i}:" + "z" * (MAX_INNER - 400) for i in range(5)]  # each under the inner limit
            for i, body in enumerate(bodies):
                tunnel.engine.write(message_xml(body, f"big{i}"))
            records = b"".join(tunnel.engine.take_chunks(1 << 20))
            assert len(records) > 65535, len(records)
            for chunk in (records[:65535], records[65535:]):
                reply = await mallory.send_raw_iq(h.bot, data(chunk))
                assert reply.condition == "result", reply
            got = [await tunnel.recv_message(timeout=10) for _ in bodies]
            assert got == bodies
            await tunnel.close()

    h.run(scenario())
    survived(bystander, hostile, "a chunk of 65535 bytes")


# --------------------------------------------------------------------------- TLS records


def tls12_only_context(identity) -> ssl.SSLContext:
    ctx = client_context(identity)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# What a peer can put where its ClientHello belongs, and whether rustls queues an alert for it.
HANDSHAKE_GARBAGE = {
    # A ClientHello whose body is random: rustls sends decode_error.
    "client-hello-with-a-random-body": (bytes([0x16, 3, 1, 0, 12, 1, 0, 0, 8]) + os.urandom(8), True),
    # A record of an unknown content type.
    "unknown-record-type": (bytes([0x99, 3, 3, 0, 16]) + os.urandom(16), True),
    # A handshake header announcing more than rustls buffers: refused without an alert.
    "huge-handshake-length": (bytes([0x16, 3, 1, 0, 8, 1, 0xff, 0xff, 0xff]) + os.urandom(4), False),
    "random-bytes": (os.urandom(48), False),
}


@pytest.mark.parametrize("garbage,alert", HANDSHAKE_GARBAGE.values(), ids=HANDSHAKE_GARBAGE.keys())
def test_tls_garbage_during_the_handshake(h, bystander, hostile, garbage, alert):
    """Garbage where the ClientHello belongs: bad-request (cancel), tunnel gone; the TLS alert
    rustls queued goes out first, in a <data/> (spec §1.11, local TLS failure sequence)."""

    async def scenario():
        async with h.peer() as mallory:
            await h.raw_start(mallory)
            before = len(mallory.xtls_requests)
            answered(await mallory.send_raw_iq(h.bot, data(garbage)), "bad-request", "cancel")
            if alert:
                alerts = [x for x in mallory.xtls_requests[before:] if "<data" in x]
                assert alerts, "no TLS alert was sent before the error reply"
            await h.assert_gone(mallory)
            assert (await h.close_reason(mallory.jid)).startswith("tls_error")

    h.run(scenario())
    survived(bystander, hostile, "TLS garbage")


def test_tls_garbage_in_an_open_tunnel(h, bystander, hostile):
    async def scenario():
        async with h.peer() as mallory:
            tunnel = await mallory.open_tunnel(h.bot)
            answered(await mallory.send_raw_iq(h.bot, data(bytes([0x17, 3, 3, 0, 32]) + os.urandom(32))),
                     "bad-request", "cancel")
            await wait_for(lambda: tunnel.state == "failed", 5, "the alert reaching the peer's TLS")
            assert (await h.close_reason(mallory.jid)).startswith("tls_error")

    h.run(scenario())
    survived(bystander, hostile, "TLS garbage in an open tunnel")


def test_truncated_record_then_another(h, bystander, hostile):
    """Half a record is buffered (result: TLS waits for the rest); the next record then fails
    the AEAD check: bad-request (cancel)."""

    async def scenario():
        async with h.peer() as mallory:
            tunnel = await mallory.open_tunnel(h.bot)
            tunnel.engine.write(message_xml("first", "t1"))
            first = b"".join(tunnel.engine.take_chunks())
            reply = await mallory.send_raw_iq(h.bot, data(first[: len(first) // 2]))
            assert reply.condition == "result", reply
            tunnel.engine.write(message_xml("second", "t2"))
            second = b"".join(tunnel.engine.take_chunks())
            answered(await mallory.send_raw_iq(h.bot, data(second)), "bad-request", "cancel")
            assert (await h.close_reason(mallory.jid)).startswith("tls_error")

    h.run(scenario())
    survived(bystander, hostile, "a truncated record")


def test_replayed_record(h, bystander, hostile):
    """A record the bot already accepted, sent again: bad-request (cancel); TLS sequence
    numbers make every replay a decryption failure (spec §1.7 rule 6)."""

    async def scenario():
        async with h.peer() as mallory:
            tunnel = await mallory.open_tunnel(h.bot)
            tunnel.engine.write(message_xml("once", "r1"))
            record = b"".join(tunnel.engine.take_chunks())
            reply = await mallory.send_raw_iq(h.bot, data(record))
            assert reply.condition == "result", reply
            assert await tunnel.recv_message(timeout=10) == "once"
            answered(await mallory.send_raw_iq(h.bot, data(record)), "bad-request", "cancel")
            assert (await h.close_reason(mallory.jid)).startswith("tls_error")

    h.run(scenario())
    survived(bystander, hostile, "a replayed record")


def test_client_hello_for_tls12_only(h, bystander, hostile, users):
    """TLS 1.3 only (spec §1.8): a TLS 1.2 ClientHello gets an alert, then bad-request (cancel)."""

    async def scenario():
        async with h.peer() as mallory:
            mallory.tls_context = tls12_only_context(users.identity("mallory"))
            with pytest.raises(XtlsError) as refused:
                await mallory.open_tunnel(h.bot)
            assert (refused.value.request, refused.value.condition, refused.value.error_type) == (
                "data", "bad-request", "cancel"), refused.value
            assert (await h.close_reason(mallory.jid)).startswith("tls_error")

    h.run(scenario())
    survived(bystander, hostile, "a TLS 1.2 ClientHello")


# --------------------------------------------------------------------------- peer certificates


def malformed_certificate(identity):
    """`identity`'s certificate re-signed with notBefore in month 13: OpenSSL sends it, an
    X.509 parser must refuse it."""
    key = load_key(identity)
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    good = build_identity(key, xmpp_addrs=[xmpp_addr("mallory@localhost")], not_before=start)

    def tlv(der: bytes, off: int) -> tuple[int, int]:  # (header length, content length)
        n = der[off + 1]
        if n < 0x80:
            return 2, n
        k = n & 0x7F
        return 2 + k, int.from_bytes(der[off + 2: off + 2 + k], "big")

    def length(n: int) -> bytes:
        if n < 0x80:
            return bytes([n])
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([0x80 | len(raw)]) + raw

    der = good.cert_der
    hdr, _ = tlv(der, 0)
    tbs_hdr, tbs_len = tlv(der, hdr)
    tbs = der[hdr: hdr + tbs_hdr + tbs_len]
    alg_hdr, alg_len = tlv(der, hdr + len(tbs))
    alg = der[hdr + len(tbs): hdr + len(tbs) + alg_hdr + alg_len]
    assert tbs.count(b"200101000000Z") == 1
    tbs = tbs.replace(b"200101000000Z", b"201301000000Z")
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    body = tbs + alg + b"\x03" + length(len(signature) + 1) + b"\x00" + signature
    bad = b"\x30" + length(len(body)) + body
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    return Identity(cert_pem=pem, key_pem=good.key_pem, cert_der=bad)


def reissued(identity, **kw):
    """A new certificate for `identity`'s key (the key pinned for the user stays the same)."""
    return build_identity(load_key(identity), **kw)


NOW = datetime.datetime.now(datetime.timezone.utc)
# case id -> (certificate for mallory built from her session identity, or None for no
# certificate at all; expected outcome: an error condition on her handshake data, or "open").
CERTIFICATES = {
    "no-client-certificate": (None, "not-acceptable", "presented no certificate"),
    "no-xmppaddr": (lambda ident: reissued(ident, xmpp_addrs=[]), "not-acceptable", "has no XmppAddr for"),
    "no-xmppaddr-but-cn-names-the-peer": (
        lambda ident: reissued(ident, xmpp_addrs=[], cn="mallory@localhost"), "not-acceptable", "has no XmppAddr for"),
    "another-xmppaddr": (lambda ident: reissued(ident, xmpp_addrs=[xmpp_addr("alice@localhost")]),
                         "not-acceptable", "has no XmppAddr for"),
    "xmppaddr-with-a-resource": (
        lambda ident: reissued(ident, xmpp_addrs=[xmpp_addr("mallory@localhost/phone")]),
        "not-acceptable", "has no XmppAddr for"),
    "xmppaddr-not-a-utf8string": (  # an IA5String where the UTF8String belongs
        lambda ident: reissued(ident, xmpp_addrs=[b"\x16\x11mallory@localhost"]), "not-acceptable", "has no XmppAddr for"),
    "another-key-for-the-same-jid": (
        lambda ident: build_identity(new_key(), xmpp_addrs=[xmpp_addr("mallory@localhost")]),
        "not-acceptable", "does not match the key pinned"),
    "malformed-certificate": (malformed_certificate, "not-acceptable", "unreadable"),
    # Accepted: spec §2.2, expiry is not relied on; the pinned key is the identity.
    "expired-certificate-of-the-pinned-key": (
        lambda ident: reissued(ident, xmpp_addrs=[xmpp_addr("mallory@localhost")],
                               not_before=NOW - datetime.timedelta(days=400),
                               not_after=NOW - datetime.timedelta(days=1)), "open", ""),
    # Accepted: one XmppAddr among several matches (spec §2.3 step 4).
    "another-xmppaddr-and-the-right-one": (
        lambda ident: reissued(ident, xmpp_addrs=[xmpp_addr("alice@localhost"), xmpp_addr("mallory@localhost")]),
        "open", ""),
}


@pytest.mark.parametrize("make,outcome,reason", CERTIFICATES.values(), ids=CERTIFICATES.keys())
def test_peer_certificate(h, bystander, hostile, users, make, outcome, reason):
    """The certificate mallory presents under peer_auth = required, trust = tofu (spec §2.3):
    refused with not-acceptable (cancel) on the data IQ that carried it, unless noted."""
    session_identity = users.identity("mallory")

    async def scenario():
        async with h.peer() as mallory:  # her usual key: pinned on first use
            tunnel = await mallory.open_tunnel(h.bot)
            await tunnel.close()
        identity = make(session_identity) if make else session_identity
        async with h.peer(identity=identity) as mallory:
            if make is None:  # a TLS 1.3 client without any certificate
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                mallory.tls_context = ctx
            if outcome == "open":
                tunnel = await mallory.open_tunnel(h.bot)
                await tunnel.send_message("accepted")
                assert await tunnel.recv_message() == "accepted"
                rows = await h.tunnels(mallory.jid)
                assert rows[0]["peer_identity"]["trust"] == "pinned", rows[0]
                await tunnel.close()
                return
            with pytest.raises(XtlsError) as refused:
                await mallory.open_tunnel(h.bot)
            assert (refused.value.request, refused.value.condition, refused.value.error_type) == (
                "data", outcome, "cancel"), refused.value
            assert reason in refused.value.text, refused.value.text
            assert (await h.close_reason(mallory.jid)).startswith("certificate_rejected")

    h.run(scenario())
    survived(bystander, hostile, "a bad certificate")


# --------------------------------------------------------------------------- deadlines


def client_hello(identity) -> bytes:
    """The bytes of a real TLS 1.3 ClientHello."""
    engine = TlsEngine(client_context(identity), server_side=False)
    engine.step()
    return b"".join(engine.take_chunks())


def bot_closes(client) -> bool:
    """Whether the bot sent `client` a <close/> (requests only: <closed/> comes in results)."""
    return any(re.search(r"<close[ />]", x) for x in client.xtls_requests)


@pytest.mark.parametrize("trickle", [False, True], ids=["silent-after-proceed", "slowloris-one-byte-at-a-time"])
def test_handshake_that_stalls(h, bystander, hostile, users, trickle):
    """A handshake that never finishes: after tunnel.handshake_timeout_secs the bot sends
    <close/> (spec §1.11: no reply possible), however busy the peer keeps it."""
    hello = client_hello(users.identity("mallory"))

    async def scenario():
        async with h.peer() as mallory:
            started = time.monotonic()
            await h.raw_start(mallory)
            sent = 0
            while not bot_closes(mallory):
                assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 3, "no <close/> after the handshake deadline"
                if trickle and sent < len(hello):
                    reply = await mallory.send_raw_iq(h.bot, data(hello[sent: sent + 1]))
                    if bot_closes(mallory):
                        break
                    assert reply.condition == "result", reply
                    sent += 1
                    await asyncio.sleep(0.2)
                else:
                    await asyncio.sleep(0.02)
            elapsed = time.monotonic() - started
            assert HANDSHAKE_TIMEOUT - 0.3 <= elapsed <= HANDSHAKE_TIMEOUT + 1.5, elapsed
            assert not trickle or 0 < sent < len(hello), sent
            assert await h.close_reason(mallory.jid) == "timeout: handshake"
            await h.assert_gone(mallory)

    h.run(scenario())
    survived(bystander, hostile, "a stalled handshake")


def test_peer_that_never_acknowledges(h, bystander, hostile):
    """The peer never answers the bot's <data/>: after tunnel.ack_timeout_secs the bot sends
    <close/>, and never resends (spec §1.7 rule 6)."""

    async def scenario():
        async with h.peer() as mallory:
            tunnel = await mallory.open_tunnel(h.bot)
            dropped = []

            def deaf(iq):
                child = xtls_child(iq)
                if child is not None and child.tag.endswith("}data"):
                    dropped.append(child.text)
                    return True
                return False

            mallory.ignore_request = deaf
            started = time.monotonic()
            await tunnel.send_message("answer me, I will not acknowledge it")
            await wait_for(lambda: tunnel.closed_by_peer, ACK_TIMEOUT + 3, "the bot's <close/>")
            elapsed = time.monotonic() - started
            assert ACK_TIMEOUT - 0.3 <= elapsed <= ACK_TIMEOUT + 1.5, elapsed
            assert dropped and len(set(dropped)) == len(dropped), "a <data/> was sent twice"
            assert await h.close_reason(mallory.jid) == "timeout: data acknowledgement"

    h.run(scenario())
    survived(bystander, hostile, "a peer that never acknowledges")


# --------------------------------------------------------------------------- inside the tunnel

# Plaintext that breaks the inner framing (spec §1.9 rules 1 and 6): the carrying <data/> is
# acknowledged with a result, then the bot sends <close/>.
INNER_REFUSED = {
    "malformed": b"<message xmlns='jabber:client'><body>x</message>",
    "doctype": b"<!DOCTYPE message><message xmlns='jabber:client'/>",
    "entity-expansion": (b"<!DOCTYPE m [<!ENTITY a 'aaaaaaaaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>"
                         b"<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;'>]><message><body>&c;&c;&c;</body></message>"),
    "external-entity": b"<!DOCTYPE m SYSTEM 'file:///etc/passwd'><message><body>&x;</body></message>",
    "undefined-entity-reference": b"<message xmlns='jabber:client'><body>&lol;</body></message>",
    "comment": b"<message xmlns='jabber:client'><!-- hi --><body>x</body></message>",
    "processing-instruction": b"<?evil x?><message xmlns='jabber:client'/>",
    "xml-declaration": b"<?xml version='1.0'?><message xmlns='jabber:client'/>",
    "text-between-stanzas": b"hello<message xmlns='jabber:client'/>",
    "not-utf-8": b"<message xmlns='jabber:client'><body>\xff\xfe</body></message>",
    "nested-too-deep": (b"<message xmlns='jabber:client'>" + b"<x>" * 40 + b"</x>" * 40 + b"</message>"),
    "over-the-inner-stanza-limit": b"<message xmlns='jabber:client'><body>" + b"y" * (MAX_INNER + 10) + b"</body></message>",
}
STREAM_HEADER_INSIDE = pytest.param(
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
    b"<message xmlns='jabber:client'><body>inside a stream header</body></message>",
    id="a-stream-header")


@pytest.mark.parametrize("plaintext", [*INNER_REFUSED.values(), STREAM_HEADER_INSIDE],
                         ids=[*INNER_REFUSED.keys(), "a-stream-header"])
def test_inner_xml_refused(h, bystander, hostile, plaintext):
    async def scenario():
        async with h.peer() as mallory:
            tunnel = await mallory.open_tunnel(h.bot)
            tunnel.queue_stanza(plaintext)
            await wait_for(lambda: tunnel.closed_by_peer, 2, "the bot's <close/>")
            assert not isinstance(tunnel.failure, XtlsError), f"the data IQ was refused: {tunnel.failure}"
            assert (await h.close_reason(mallory.jid)).startswith("inner_xml")

    h.run(scenario())
    survived(bystander, hostile, "bad inner XML")


def test_inner_stanza_split_at_every_byte(h, bystander, hostile):
    """One stanza, one TLS record and one <data/> per byte, multi-byte characters cut in
    half: delivered whole (spec §1.7: TLS is a byte stream)."""
    body = "héllo ☃ 𝄞 — split everywhere"

    async def scenario():
        async with h.peer() as mallory:
            tunnel = await mallory.open_tunnel(h.bot)
            raw = message_xml(body, "bytewise")
            for i in range(len(raw)):  # each call: one TLS record, sent in a <data/> of its own
                tunnel.queue_stanza(raw[i: i + 1])
            await tunnel.flush()
            assert await tunnel.recv_message(timeout=10) == body
            assert tunnel.state == "open"
            await tunnel.close()

    h.run(scenario())
    survived(bystander, hostile, "a stanza split at every byte")


def test_inner_stanzas_that_are_dropped_or_ignored(h, bystander, hostile):
    """Inner `from` of another bare JID, inner `to` another JID: dropped (spec §1.9 rule 4);
    an element that is no stanza: ignored (rule 5). The tunnel stays up: the honest message
    after them is the first thing echoed."""

    async def scenario():
        async with h.peer() as mallory:
            tunnel = await mallory.open_tunnel(h.bot)
            spoofs = [
                f"<message xmlns='jabber:client' from='alice@localhost/x'><body>spoof-from</body></message>",
                f"<message xmlns='jabber:client' from='alice@localhost'><body>spoof-bare</body></message>",
                f"<message xmlns='jabber:client' to='other@{h.comp.domain}'><body>spoof-to</body></message>",
                f"<message xmlns='jabber:client' to='alice@localhost'><body>spoof-to-user</body></message>",
                "<foo xmlns='urn:example:not-a-stanza'><body>not a stanza</body></foo>",
                "<message xmlns='urn:example:other'><body>wrong namespace</body></message>",
            ]
            for xml in spoofs:
                await tunnel.send_stanza(xml)
            # Same bare JID, another resource: allowed, routing restored from the IQ.
            await tunnel.send_stanza(f"<message xmlns='jabber:client' from='mallory@localhost/other'>"
                                     f"<body>own bare JID</body></message>")
            await tunnel.send_message("honest")
            assert await tunnel.recv_message(timeout=10) == "own bare JID"
            assert await tunnel.recv_message(timeout=10) == "honest"
            rows = await h.tunnels(mallory.jid)
            assert rows[0]["state"] == "open" and rows[0]["stanzas_in"] == 2, rows[0]
            await tunnel.close()

    h.run(scenario())
    survived(bystander, hostile, "spoofed inner stanzas")


# --------------------------------------------------------------------------- duplicate starts


def test_duplicate_start_replaces_the_half_open_tunnel(h, bystander, hostile):
    """A second <start/> from the same full JID: the peer lost its state; the old tunnel is
    discarded (close_reason `replaced`) and the new one handled normally (spec §1.11)."""

    async def scenario():
        async with h.peer() as mallory:
            await h.raw_start(mallory)
            await h.raw_start(mallory)
            tunnel = await mallory.open_tunnel(h.bot)  # a third start, and a real handshake
            await tunnel.send_message("third time")
            assert await tunnel.recv_message() == "third time"
            rows = await h.tunnels(mallory.jid)
            assert [r["state"] for r in rows] == ["open", "closed", "closed"], rows
            assert all(r["close_reason"] == "replaced" for r in rows[1:]), rows
            await tunnel.close()

    h.run(scenario())
    survived(bystander, hostile, "duplicate starts")


def test_start_on_an_open_tunnel_replaces_it(h, bystander, hostile):
    async def scenario():
        async with h.peer() as mallory:
            first = await mallory.open_tunnel(h.bot)
            await first.send_message("first")
            assert await first.recv_message() == "first"
            first._set_gone("failed", None)  # mallory "restarts": she forgets the tunnel
            second = await mallory.open_tunnel(h.bot)
            await second.send_message("second")
            assert await second.recv_message() == "second"
            rows = await h.tunnels(mallory.jid)
            assert [(r["state"], r["close_reason"]) for r in rows] == [("open", None), ("closed", "replaced")], rows
            await second.close()

    h.run(scenario())
    survived(bystander, hostile, "a start on an open tunnel")


@pytest.mark.parametrize("name,bot_wins", [("mallory", True), ("bob", False)],
                         ids=["bot-jid-sorts-first", "peer-jid-sorts-first"])
def test_crossing_starts(h, bystander, hostile, name, bot_wins):
    """The bot and the peer send <start/> at once (spec §1.11 tie-break, i;octet order of the
    two JIDs): the side whose JID sorts first answers the other's start with `conflict`
    (cancel); exactly one tunnel results and it works."""

    async def scenario():
        async with h.peer(name) as peer:
            status, cert = await asyncio.to_thread(h.comp.get, f"/v1/bots/{h.bot}/certificate")
            assert status == 200, cert
            peer.serve({h.bot: cert["pem"]})
            held = asyncio.get_running_loop().create_future()

            def hold_bot_start(iq):
                child = xtls_child(iq)
                if child is not None and child.tag.endswith("}start") and not held.done():
                    held.set_result(iq)
                    return True
                return False

            peer.ignore_request = hold_bot_start
            opening = asyncio.create_task(asyncio.to_thread(h.comp.post, "/v1/tunnels", {"bot": h.bot, "peer": peer.jid}))
            bot_start = await asyncio.wait_for(held, 10)
            peer.ignore_request = None
            assert (await opening)[0] == 202
            # Crossing: our own start leaves before we look at the bot's.
            if bot_wins:
                ours = asyncio.create_task(peer.send_raw_iq(h.bot, START))
                await asyncio.sleep(0)  # one step: our start is queued, its answer not yet in
                peer._on_request(bot_start)  # no start of ours is known to the client: proceed
                answered(await ours, "conflict", "cancel")
                tunnel = await peer.next_tunnel()
                await tunnel.wait_open()
                assert tunnel.role == "responder"
            else:
                ours = asyncio.create_task(peer.open_tunnel(h.bot))
                await asyncio.sleep(0)
                peer._on_request(bot_start)  # our start is pending and sorts first: conflict
                assert peer.start_requests[-1].answer == "conflict", peer.start_requests
                tunnel = await ours
            await tunnel.send_message("after the race")
            assert await tunnel.recv_message() == "after the race"
            rows = await h.tunnels(peer.jid)
            live = [r for r in rows if r["state"] != "closed"]
            assert len(live) == 1 and live[0]["role"] == ("initiator" if bot_wins else "responder"), rows
            if not bot_wins:  # the bot gave up its own start for ours
                assert [(r["role"], r["close_reason"]) for r in rows[1:]] == [("initiator", "replaced")], rows
            await tunnel.close()

    h.run(scenario())
    survived(bystander, hostile, "crossing starts")


# --------------------------------------------------------------------------- start floods


def flood_report(capsys, what: str, rss_before: int, rss_after: int, seconds: float, n: int, ok: int) -> None:
    with capsys.disabled():
        print(f"\n[hostile] {what}: {n} starts in {seconds:.2f} s, {ok} proceeded, {n - ok} resource-constraint; "
              f"component RSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MiB "
              f"({(rss_after - rss_before) / 1024:+.1f} MiB)")


MIB = 1024  # KiB per MiB, for rss_kib


def test_start_flood_from_one_peer(h, bystander, hostile, capsys):
    """One peer sends <start/>s as fast as it can: after limits.start_burst_per_peer, each is
    answered resource-constraint (wait) until its bucket refills; other peers are unaffected."""
    n = 100
    rss_before = rss_kib(hostile.pid)

    async def scenario():
        async with h.peer() as mallory:
            started = time.monotonic()
            replies = await asyncio.gather(*(mallory.send_raw_iq(h.bot, START) for _ in range(n)))
            seconds = time.monotonic() - started
            ok = [r for r in replies if r.condition == "result"]
            refused = [r for r in replies if r.condition != "result"]
            assert all((r.condition, r.error_type) == ("resource-constraint", "wait") for r in refused), refused[:3]
            allowed = START_BURST + STARTS_PER_MINUTE / 60 * seconds + 1
            assert 1 <= len(ok) <= allowed, (len(ok), allowed)
            # Another peer is not limited by mallory's bucket: bob opens a tunnel at once.
            async with h.peer("bob") as bob:
                tunnel = await bob.open_tunnel(h.bot)
                await tunnel.close()
            # Mallory's bucket refills (10 per second here).
            await asyncio.sleep(0.5)
            await h.raw_start(mallory)
            assert (await mallory.send_raw_iq(h.bot, CLOSE)).condition == "result"
            return seconds, len(ok)

    seconds, ok = h.run(scenario())
    survived(bystander, hostile, "a start flood from one peer")
    rss_after = rss_kib(hostile.pid)
    flood_report(capsys, "flood from one peer (c2s)", rss_before, rss_after, seconds, n, ok)
    assert rss_after - rss_before < 50 * MIB


def inject_starts(tap, peers: list[str], bot: str) -> list[str]:
    """Inject one <start/> from each of `peers` as the server would deliver them; their ids."""
    ids = [f"flood-{i}-{uuid.uuid4().hex[:6]}" for i in range(len(peers))]
    blob = "".join(f"<iq type='set' id='{i}' from='{p}' to='{bot}'>{START}</iq>" for i, p in zip(ids, peers))
    tap.inject(blob)
    return ids


def answers(tap, ids: list[str], since: int, timeout: float = 30.0) -> dict[str, tuple[str, str]]:
    """The component's answer to each id: ("result", "") or (condition, type)."""
    wanted = set(ids)
    deadline = time.monotonic() + timeout
    got: dict[str, tuple[str, str]] = {}
    while len(got) < len(wanted):
        for w in tap.written_since(since):
            if w.attr("id") in wanted and w.name == "iq" and w.attr("type") in ("result", "error"):
                got[w.attr("id")] = w.error() or ("result", "")
        if len(got) < len(wanted):
            assert time.monotonic() < deadline, f"{len(wanted) - len(got)} of {len(wanted)} starts unanswered"
            time.sleep(0.05)
    return got


@pytest.mark.parametrize("kind,n,rounds", [("resources", 500, 1), ("users", 3000, 2)],
                         ids=["many-resources-of-one-user", "many-users"])
def test_start_flood_from_many(h, bystander, hostile, capsys, kind, n, rounds):
    """Starts from many full JIDs of one user (one bucket: limits.start_burst_per_peer), or
    from many users (a bucket each: limits.handshakes caps the half-open tunnels). Every
    start gets exactly one answer, proceed or resource-constraint (wait); the tunnel beside
    keeps working while the cap is full. Delivered through the tap, as the server would.
    Memory: a second round of new users must not grow the process as the first did."""
    rss_start = rss_kib(hostile.pid)
    for round_ in range(1, rounds + 1):
        flood_round(h, bystander, hostile, capsys, kind, n, f"{kind} round {round_}/{rounds}")
    assert rss_kib(hostile.pid) - rss_start < 50 * MIB


def flood_round(h, bystander, hostile, capsys, kind, n, what):
    tag = uuid.uuid4().hex[:6]
    peers = ([f"swarm{tag}@localhost/r{i}" for i in range(n)] if kind == "resources"
             else [f"u{i}x{tag}@localhost/r" for i in range(n)])
    rss_before = rss_kib(hostile.pid)
    mark = h.tap.mark()
    started = time.monotonic()
    ids = inject_starts(h.tap, peers, h.bot)
    got = answers(h.tap, ids, mark)
    seconds = time.monotonic() - started
    ok = [i for i in ids if got[i] == ("result", "")]
    refused = {got[i] for i in ids if got[i] != ("result", "")}
    assert refused == {("resource-constraint", "wait")}, refused
    cap = START_BURST + STARTS_PER_MINUTE / 60 * seconds + 1 if kind == "resources" else HANDSHAKES
    assert 1 <= len(ok) <= cap, (len(ok), cap)
    survived(bystander, hostile, "a start flood from many")  # while the half-open tunnels hold the cap
    # Clean up: each admitted peer closes its half-open tunnel, which frees the cap (unless
    # the handshake deadline already ended it: item-not-found).
    by_id = dict(zip(ids, peers))
    mark = h.tap.mark()
    close_ids = [f"c{i}" for i in ok]
    h.tap.inject("".join(f"<iq type='set' id='c{i}' from='{by_id[i]}' to='{h.bot}'>{CLOSE}</iq>" for i in ok))
    assert set(answers(h.tap, close_ids, mark).values()) <= {("result", ""), ("item-not-found", "cancel")}
    rss_after = rss_kib(hostile.pid)
    flood_report(capsys, f"flood from {n} {what} (injected)", rss_before, rss_after, seconds, n, len(ok))


# --------------------------------------------------------------------------- the component stream

PEER = "mallory@localhost/tap"
NS_STREAMS = "urn:ietf:params:xml:ns:xmpp-streams"
# What a server could deliver on the component stream (injected through the tap, since
# Prosody itself never sends most of it), and the component's answer: None = no answer at all
# (the stanza is dropped; answering would need an address the stream cannot carry), else
# "result" or (condition, type). {id}, {bot}, {domain} are filled in.
STREAM_INPUT = {
    "iq-without-from": (f"<iq type='set' id='{{id}}' to='{{bot}}'>{START}</iq>", None),
    "iq-with-an-invalid-from": (f"<iq type='set' id='{{id}}' from='a@b@c' to='{{bot}}'>{START}</iq>", None),
    "iq-with-an-empty-from": (f"<iq type='set' id='{{id}}' from='' to='{{bot}}'>{START}</iq>", None),
    "iq-without-to": (f"<iq type='set' id='{{id}}' from='{PEER}'>{START}</iq>", None),
    "iq-with-an-invalid-to": (f"<iq type='set' id='{{id}}' from='{PEER}' to='a@b@c'>{START}</iq>", None),
    "iq-to-another-domain": (f"<iq type='set' id='{{id}}' from='{PEER}' to='echo@elsewhere.example'>{START}</iq>",
                             None),
    "child-less-iq-to-a-bot": (f"<iq type='set' id='{{id}}' from='{PEER}' to='{{bot}}'/>", ("bad-request", "modify")),
    "child-less-iq-to-a-bot-full-jid": (f"<iq type='get' id='{{id}}' from='{PEER}' to='{{bot}}/res'/>",
                                        ("bad-request", "modify")),
    "iq-with-two-xtls-children": (
        f"<iq type='set' id='{{id}}' from='{PEER}' to='{{bot}}'>{START}{data('FgMB')}</iq>", ("bad-request", "modify")),
    "iq-with-two-foreign-children": (
        f"<iq type='get' id='{{id}}' from='{PEER}' to='{{bot}}'><a xmlns='urn:x'/><b xmlns='urn:x'/></iq>",
        ("bad-request", "modify")),
    "iq-with-a-bogus-type": (f"<iq type='bogus' id='{{id}}' from='{PEER}' to='{{bot}}'>{START}</iq>",
                             ("bad-request", "modify")),
    "iq-without-type": (f"<iq id='{{id}}' from='{PEER}' to='{{bot}}'>{START}</iq>", ("bad-request", "modify")),
    "child-less-iq-to-the-component-domain": (f"<iq type='get' id='{{id}}' from='{PEER}' to='{{domain}}'/>",
                                              ("bad-request", "modify")),
    "unknown-query-to-the-component-domain": (
        f"<iq type='get' id='{{id}}' from='{PEER}' to='{{domain}}'><query xmlns='jabber:iq:version'/></iq>",
        ("service-unavailable", "cancel")),
    # The echo bot answers a plain message in plain (the load tool's baseline), once.
    "message-in-clear-to-the-echo-bot": (
        f"<message id='{{id}}' from='{PEER}' to='{{bot}}'><body>hi</body></message>", "message"),
    "message-to-the-component-domain": (
        f"<message id='{{id}}' from='{PEER}' to='{{domain}}'><body>hi</body></message>", None),
    "presence-of-a-bogus-type": (f"<presence id='{{id}}' type='bogus' from='{PEER}' to='{{bot}}'/>", None),
    "unknown-top-level-element": ("<foo xmlns='urn:example:x' id='{id}'><bar/></foo>", None),
    "nested-60-levels-under-the-cap": (
        f"<message id='{{id}}' from='{PEER}' to='{{bot}}'>" + "<x xmlns='urn:x'>" * 60 + "</x>" * 60 + "</message>",
        None),
    "stanza-in-the-jabber-client-namespace": (
        f"<iq xmlns='jabber:client' type='set' id='{{id}}' from='{PEER}' to='{{bot}}'>{START}</iq>", "result"),
    "start-from-the-bot-itself": (f"<iq type='set' id='{{id}}' from='{{bot}}/loop' to='{{bot}}'>{START}</iq>",
                                  "result"),
}


@pytest.mark.parametrize("xml,expected", STREAM_INPUT.values(), ids=STREAM_INPUT.keys())
def test_stream_input(h, bystander, hostile, xml, expected):
    """Stanzas a server could deliver that a client could not send (Prosody stamps `from`,
    checks `to`, and answers child-less IQs itself): the component answers what it can
    address, drops the rest, and the stream stays up."""
    iq_id = f"h-{uuid.uuid4().hex[:8]}"
    connection = h.tap.connections
    mark = h.tap.mark()
    h.tap.inject(xml.format(id=iq_id, bot=h.bot, domain=h.comp.domain))
    # Probes after it, answered in order: a ping to the domain (the router answers it) and a
    # disco#info to the bot (its own driver answers it, after anything it had before). Once
    # both are answered, every answer to the hostile stanza has been written.
    probe = f"probe-{iq_id}"
    h.tap.inject(f"<iq type='get' id='{probe}' from='{PEER}' to='{h.comp.domain}'><ping xmlns='urn:xmpp:ping'/></iq>")
    bot_probe = f"bot-probe-{iq_id}"
    h.tap.inject(f"<iq type='get' id='{bot_probe}' from='{PEER}' to='{h.bot}'>"
                 "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
    assert h.tap.answer_to(probe, since=mark).attr("type") == "result"
    assert h.tap.answer_to(bot_probe, since=mark).attr("type") == "result"
    written = [w for w in h.tap.written_since(mark) if w.attr("id") == iq_id]
    if expected is None:
        assert not written, [w.xml for w in written]
    elif expected == "message":
        assert len(written) == 1, [w.xml for w in written]
        assert written[0].name == "message" and written[0].attr("to") == PEER, written[0].xml
        assert [c.text for c in written[0].element if c.tag.endswith("}body")] == ["hi"], written[0].xml
    else:
        assert len(written) == 1, [w.xml for w in written]
        assert (written[0].error() or "result") == expected, written[0].xml
    to_itself = [w for w in h.tap.written_since(mark) if (w.attr("to") or "").startswith(h.bot)]
    assert len(to_itself) <= 1, f"the component keeps talking to itself: {[w.xml for w in to_itself]}"
    assert h.tap.connections == connection, "the component stream was dropped"
    survived(bystander, hostile, "odd input on the component stream")


# Stanzas beyond what the component reads from its stream, sent by an ordinary user through
# Prosody (which forwards both to the component).
OVERSIZED = [
    pytest.param(
        lambda to: (f"<message to='{to}' type='chat'><body>deep</body>"
                    + "<x xmlns='urn:x'>" * 100 + "</x>" * 100 + "</message>"),
        id="nested-deeper-than-the-cap"),
    pytest.param(
        lambda to: f"<message to='{to}' type='chat'><body>{'h' * (MAX_STANZA + 1000)}</body></message>",
        id="larger-than-limits.max_stanza_bytes"),
]


@pytest.mark.parametrize("make", OVERSIZED)
def test_stanza_the_stream_cannot_hold(h, bystander, hostile, make):
    """One user's stanza that the component's stream reader refuses (nesting deeper than 64,
    more than limits.max_stanza_bytes): it must cost that stanza only, not the stream that
    carries every tunnel of the domain."""
    connection = h.tap.connections
    log_before = len(hostile.log_path.read_text(errors="replace"))

    async def scenario():
        async with h.peer() as mallory:
            mallory.send_raw(make(h.bot))
            # A stanza after it, through the same stream: answered once the big one is handled.
            try:
                return await mallory.send_raw_iq(h.bot, "<ping xmlns='urn:xmpp:ping'/>", itype="get", timeout=2)
            except TimeoutError as lost:
                return lost

    ping = h.run(scenario())
    lost = [line for line in hostile.log_path.read_text(errors="replace")[log_before:].splitlines()
            if "component link lost" in line]
    assert not lost and h.tap.connections == connection, (
        f"one stanza from one user dropped the component stream, and every tunnel with it: {lost}")
    assert getattr(ping, "condition", None) == "result", ping
    survived(bystander, hostile, "an oversized stanza")


def test_an_oversized_request_is_answered_policy_violation(h, bystander, hostile):
    """An IQ request over limits.max_stanza_bytes is read to its end without being kept and
    answered policy-violation (modify); the stream and the tunnel beside it stay."""
    connection = h.tap.connections

    async def scenario():
        async with h.peer() as mallory:
            big = f"<ping xmlns='urn:xmpp:ping'><pad>{'p' * (MAX_STANZA + 1000)}</pad></ping>"
            return await mallory.send_raw_iq(h.bot, big, itype="get", timeout=10)

    answer = h.run(scenario())
    assert (answer.condition, answer.error_type) == ("policy-violation", "modify"), answer
    assert h.tap.connections == connection, "the component stream was dropped"
    survived(bystander, hostile, "an oversized request")


# What a server can do to the stream itself. Each ends the stream: every tunnel on it is gone
# (spec §3.5 rule 4). The answer: reconnect with back-off (component.reconnect_max_secs = 1
# here), then a paced <close/> to each former peer, and new tunnels work.
STREAM_BREAKS = {
    "stream-error-system-shutdown": (
        f"<stream:error><system-shutdown xmlns='{NS_STREAMS}'/></stream:error></stream:stream>", True),
    "stream-error-conflict": (
        f"<stream:error><conflict xmlns='{NS_STREAMS}'/><text xmlns='{NS_STREAMS}'>Replaced</text>"
        "</stream:error></stream:stream>", True),
    # A configuration error once it has been up: keep retrying, do not exit (spec §3.5 rule 2).
    "stream-error-not-authorized-after-being-up": (
        f"<stream:error><not-authorized xmlns='{NS_STREAMS}'/></stream:error></stream:stream>", True),
    "stream-error-without-a-condition": ("<stream:error/></stream:stream>", True),
    "closes-mid-stanza": (
        f"<iq type='set' id='cut' from='{PEER}' to='{{bot}}'><data xmlns='{NS_XTLS}'>FgMBAAA", True),
    "closes-without-a-word": ("", True),
    "ends-the-stream": ("</stream:stream>", False),
    "sends-bytes-that-are-not-xml": ("\x01\x02<<&&>>", False),
}


@pytest.mark.parametrize("raw,cut", STREAM_BREAKS.values(), ids=STREAM_BREAKS.keys())
def test_server_breaks_the_stream(h, bystander, hostile, raw, cut):
    """The server sends a stream error, garbage, or closes the connection (through the tap,
    as Prosody would not on demand)."""
    connection = h.tap.connections
    old = bystander.tunnel
    log_before = len(hostile.log_path.read_text(errors="replace"))
    h.tap.inject(raw.format(bot=h.bot), cut=cut)
    h.tap.wait_connections(connection + 1, timeout=10)  # without `cut`, the component leaves by itself
    hostile.wait_ready(10)

    async def former_peer_told():
        # Paced at 10 per second over every tunnel the stream took with it (spec §3.5 rule 4),
        # and earlier cases leave tunnels behind: allow for a queue.
        await wait_for(lambda: old.closed_by_peer, 30, "the bot's <close/> for the tunnel lost with the stream")

    h.run(former_peer_told())
    assert_no_panic(hostile)
    assert "component link lost" in hostile.log_path.read_text(errors="replace")[log_before:]
    bystander.reopen()
    survived(bystander, hostile, "a broken stream")


