"""Self-test of the Python XTLS peer's two roles, with no XMPP server and no component.

Two `xtls_client.XtlsClient`s (the exact code the e2e tests use) talk through `FakeServer`,
an in-process stand-in for Prosody: it serializes every stanza a client sends, stamps the
sender's JID in `from` as a server does, and hands it to the addressee's slixmpp stanza
machinery on the next event-loop turn (in order).  One client plays the bot
(`weather@bots.localhost`, bare JID, initiator) and one the user (`alice@localhost/phone`,
responder = TLS server); both TLS stacks are Python's `ssl`, so this checks the XMPP and
tunnel logic of the responder role (spec §1.4-§1.11), not interop with rustls.

Run:  python3 tests/e2e/selftest_responder.py   (or: python3 -m pytest -q tests/e2e/selftest_responder.py)
"""

from __future__ import annotations

import asyncio
import sys
import xml.etree.ElementTree as ET

import slixmpp

from xtls_client import (
    NS_CLIENT,
    NS_XTLS,
    Identity,
    XtlsClient,
    XtlsError,
    XtlsProtocolError,
    reply_to_messages,
    sha1_hex,
)

BOT = "weather@bots.localhost"
USER = "alice@localhost/phone"
USER_BARE = "alice@localhost"
DISCO = "<query xmlns='http://jabber.org/protocol/disco#info'/>"
START = f"<start xmlns='{NS_XTLS}'/>"


class FakeServer:
    """Routes stanzas between attached clients by exact `to` (then bare JID), in order."""

    def __init__(self) -> None:
        self.clients: dict[str, XtlsClient] = {}
        self.log: list[ET.Element] = []  # every stanza routed, as delivered

    def attach(self, client: XtlsClient, jid: str) -> XtlsClient:
        client.xmpp.boundjid = slixmpp.JID(jid)
        client.xmpp.send = lambda stanza, use_filters=True: self._route(jid, stanza)
        self.clients[jid] = client
        return client

    def _route(self, sender: str, stanza) -> None:
        text = str(stanza)
        element = ET.fromstring(f"<stream xmlns='{NS_CLIENT}'>{text}</stream>")[0]
        element.set("from", sender)  # the server stamps the sender
        self.log.append(element)
        to = element.get("to", "")
        target = self.clients.get(to) or self.clients.get(str(slixmpp.JID(to).bare))
        if target is None:
            raise AssertionError(f"FakeServer: nobody at {to!r} for {text}")
        asyncio.get_running_loop().call_soon(target.xmpp._spawn_event, element)


def make_pair(*, bot_identity: Identity | None = None, **serve):
    """(server, bot, user, bot_identity, user_identity); the user serves with `serve` options,
    trusting the bot's certificate unless `serve` gives `trusted`."""
    server = FakeServer()
    bot_id = bot_identity or Identity.generate(BOT)
    user_id = Identity.generate(USER_BARE)
    bot = server.attach(XtlsClient(BOT, "x", host="127.0.0.1", port=1, identity=bot_id), BOT)
    user = server.attach(XtlsClient(USER, "x", host="127.0.0.1", port=1, identity=user_id), USER)
    serve.setdefault("trusted", {BOT: bot_id.cert_pem})
    user.serve(**serve)
    return server, bot, user, bot_id, user_id


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --------------------------------------------------------------------------- tests


def test_disco_advertises_xtls_only_when_serving():
    async def scenario():
        server, bot, user, *_ = make_pair()
        reply = await bot.send_raw_iq(USER, DISCO, itype="get")
        assert reply.condition == "result" and "urn:xmpp:tmp:xtls" in reply.xml, reply
        assert "http://jabber.org/protocol/disco#info" in reply.xml, reply
        user.serve({BOT: b""}, advertise=False)
        reply = await bot.send_raw_iq(USER, DISCO, itype="get")
        assert reply.condition == "result" and "urn:xmpp:tmp:xtls" not in reply.xml, reply
        assert user.disco_requests == [BOT, BOT]
        # A plain initiator-only client answers disco#info too, without the feature.
        reply = await user.send_raw_iq(BOT, DISCO, itype="get")
        assert reply.condition == "result" and "urn:xmpp:tmp:xtls" not in reply.xml, reply

    run(scenario())


def test_bot_opens_tunnel_user_answers_as_tls_server():
    async def scenario():
        server, bot, user, bot_id, user_id = make_pair(auto_reply=reply_to_messages(lambda b: f"re: {b}"))
        tunnel = await bot.open_tunnel(USER)
        assert tunnel.proceed_seen
        accepted = await user.next_tunnel(timeout=5)
        await accepted.wait_open(timeout=5)
        assert accepted.role == "responder" and accepted.state == "open"
        assert accepted.peer_jid == BOT and accepted.local_jid == USER
        assert accepted.engine.version == "TLSv1.3"
        assert accepted.peer_cert_der == bot_id.cert_der  # the bot's client certificate
        assert accepted.peer_xmpp_addrs() == [BOT]
        assert tunnel.peer_cert_der == user_id.cert_der  # we served the user's certificate
        assert tunnel.peer_xmpp_addrs() == [USER_BARE]
        assert [s.answer for s in user.start_requests] == ["proceed"]
        assert user.start_requests[0].from_jid == BOT and not user.start_requests[0].offer
        # The responder's own data never carries `method` (spec §1.6: initiator's first data only).
        user_data = [d for x in server.log if x.get("from") == USER for d in x.iter(f"{{{NS_XTLS}}}data")]
        bot_data = [d for x in server.log if x.get("from") == BOT for d in x.iter(f"{{{NS_XTLS}}}data")]
        assert user_data and all(d.get("method") is None for d in user_data)
        assert bot_data[0].get("method") == "x509" and all(d.get("method") is None for d in bot_data[1:])

        bodies = [f"message {i} <&>" for i in range(100)]
        for body in bodies:
            await tunnel.send_message(body)
        replies = [await tunnel.recv_message(timeout=5) for _ in bodies]
        assert replies == [f"re: {b}" for b in bodies]
        seen = [await accepted.recv_stanza(timeout=1) for _ in bodies]
        assert [s.findtext(f"{{{NS_CLIENT}}}body") for s in seen] == bodies
        assert {(s.get("from"), s.get("to")) for s in seen} == {(BOT, USER)}  # routing restored
        assert accepted.inner_routing_seen == 0 and tunnel.inner_routing_seen == 0

        await tunnel.close()  # the bot closes: close_notify, then <close/>
        assert tunnel.state == "closed"
        assert accepted.state == "closed" and accepted.closed_by_peer and accepted.failure is None
        assert accepted.engine.peer_eof

    run(scenario())


def test_responder_sends_and_closes():
    async def scenario():
        _, bot, user, *_ = make_pair()
        tunnel = await bot.open_tunnel(USER)
        accepted = await user.next_tunnel(timeout=5)
        await accepted.wait_open(timeout=5)
        await accepted.send_message("hello from the user")
        assert await tunnel.recv_message(timeout=5) == "hello from the user"
        await accepted.close()
        assert accepted.state == "closed"
        await asyncio.sleep(0.05)
        assert tunnel.state == "closed" and tunnel.failure is None, (tunnel.state, tunnel.failure)

    run(scenario())


def test_start_refusals():
    async def scenario():
        # Not serving at all: service-unavailable (spec §1.5 rule 2).
        server = FakeServer()
        bot = server.attach(XtlsClient(BOT, "x", host="127.0.0.1", port=1, identity=Identity.generate(BOT)), BOT)
        plain = server.attach(XtlsClient(USER, "x", host="127.0.0.1", port=1), USER)
        reply = await bot.send_raw_iq(USER, START)
        assert (reply.condition, reply.error_type) == ("service-unavailable", "cancel"), reply
        assert [s.answer for s in plain.start_requests] == ["service-unavailable"]

        _, bot, user, *_ = make_pair(accept=False)
        reply = await bot.send_raw_iq(USER, START)
        assert (reply.condition, reply.error_type) == ("service-unavailable", "cancel"), reply

        # Serving, but nothing pinned for this peer: not-acceptable (spec §1.5 rule 3).
        _, bot, user, *_ = make_pair(trusted={})
        reply = await bot.send_raw_iq(USER, START)
        assert (reply.condition, reply.error_type) == ("not-acceptable", "cancel"), reply

        _, bot, user, *_ = make_pair()
        reply = await bot.send_raw_iq(USER, START, itype="get")
        assert (reply.condition, reply.error_type) == ("bad-request", "modify"), reply
        srp_only = f"<start xmlns='{NS_XTLS}'><offer xmlns='urn:xmpp:tmp:c2ctls'><srp/></offer></start>"
        reply = await bot.send_raw_iq(USER, srp_only)
        assert (reply.condition, reply.error_type) == ("not-acceptable", "cancel"), reply
        reply = await bot.send_raw_iq(USER, f"<foo xmlns='{NS_XTLS}'/>")
        assert (reply.condition, reply.error_type) == ("feature-not-implemented", "cancel"), reply
        reply = await bot.send_raw_iq(USER, f"<data xmlns='{NS_XTLS}'>FgMBAAA=</data>")
        assert (reply.condition, reply.error_type) == ("item-not-found", "cancel"), reply
        reply = await bot.send_raw_iq(USER, f"<close xmlns='{NS_XTLS}'/>")
        assert (reply.condition, reply.error_type) == ("item-not-found", "cancel"), reply

    run(scenario())


def test_offer_answered_with_our_offer_and_first_data_method():
    async def scenario():
        _, bot, user, bot_id, user_id = make_pair()
        start = (
            f"<start xmlns='{NS_XTLS}'><offer xmlns='urn:xmpp:tmp:c2ctls'>"
            f"<keyinfo xmlns='urn:xmpp:tmp:pubkey'><name>{sha1_hex(bot_id.cert_der)}</name></keyinfo>"
            "</offer></start>"
        )
        reply = await bot.send_raw_iq(USER, start)
        assert reply.condition == "result", reply
        proceed = ET.fromstring(reply.xml).find(f"{{{NS_XTLS}}}proceed")
        assert proceed is not None, reply.xml
        names = [n.text for n in proceed.iter("{urn:xmpp:tmp:pubkey}name")]
        assert names == [sha1_hex(user_id.cert_der)], reply.xml
        assert proceed.find("{urn:xmpp:tmp:c2ctls}offer/{urn:xmpp:tmp:c2ctls}insecure") is None, reply.xml
        assert user.start_requests[-1].offer and user.start_requests[-1].offered_names == [sha1_hex(bot_id.cert_der)]
        # A first data with an unsupported method ends the tunnel (spec §1.6).
        reply = await bot.send_raw_iq(USER, f"<data xmlns='{NS_XTLS}' method='srp'>FgMBAAA=</data>")
        assert (reply.condition, reply.error_type) == ("feature-not-implemented", "cancel"), reply
        reply = await bot.send_raw_iq(USER, f"<data xmlns='{NS_XTLS}'>FgMBAAA=</data>")
        assert reply.condition == "item-not-found", reply

        # An offer naming a key we have not pinned gets <insecure/> in ours.
        start = start.replace(sha1_hex(bot_id.cert_der), "00" * 20)
        reply = await bot.send_raw_iq(USER, start)
        assert reply.condition == "result", reply
        assert "insecure" in reply.xml, reply.xml
        # <close/> during the handshake: <closed/> (spec §1.10 rule 2).
        reply = await bot.send_raw_iq(USER, f"<close xmlns='{NS_XTLS}'/>")
        assert reply.condition == "result" and "closed" in reply.xml, reply

    run(scenario())


def test_wrong_bot_certificate_is_not_acceptable():
    async def scenario():
        # The user pinned another certificate for the bot: ssl refuses the client certificate.
        _, bot, user, *_ = make_pair(trusted={BOT: Identity.generate(BOT).cert_pem})
        try:
            await bot.open_tunnel(USER, timeout=5)
        except XtlsError as refused:
            assert (refused.request, refused.condition) == ("data", "not-acceptable"), refused
        else:
            raise AssertionError("the responder accepted a certificate other than the pinned one")
        accepted = user.accepted_tunnels[-1]
        assert accepted.state == "failed", accepted.state

        # Pinned certificate, but its XmppAddr names someone else (spec §2.3).
        liar = Identity.generate("other@bots.localhost")
        _, bot, user, *_ = make_pair(bot_identity=liar, trusted={BOT: liar.cert_pem})
        try:
            await bot.open_tunnel(USER, timeout=5)
        except XtlsError as refused:
            assert (refused.request, refused.condition) == ("data", "not-acceptable"), refused
        else:
            raise AssertionError("the responder accepted a certificate without the bot's XmppAddr")
        assert "XmppAddr" in str(user.accepted_tunnels[-1].failure)

    run(scenario())


def test_second_start_replaces_open_tunnel():
    async def scenario():
        _, bot, user, *_ = make_pair(auto_reply=reply_to_messages(lambda b: b.upper()))
        first = await bot.open_tunnel(USER)
        old = await user.next_tunnel(timeout=5)
        await old.wait_open(timeout=5)
        bot._forget(first)  # the bot "restarts": forgets its tunnel without a word
        second = await bot.open_tunnel(USER)
        new = await user.next_tunnel(timeout=5)
        await new.wait_open(timeout=5)
        assert old.state == "failed" and "replaced" in str(old.failure), old.failure
        await second.send_message("again")
        assert await second.recv_message(timeout=5) == "AGAIN"

    run(scenario())


def test_simultaneous_start_tie_break():
    """alice@localhost/phone < weather@bots.localhost: alice's start wins (spec §1.11)."""

    async def scenario():
        server, bot, user, bot_id, user_id = make_pair(auto_reply=reply_to_messages(lambda b: f"user: {b}"))
        bot.serve({USER_BARE: user_id.cert_pem}, auto_reply=reply_to_messages(lambda b: f"bot: {b}"))
        results = await asyncio.gather(user.open_tunnel(BOT, timeout=5), bot.open_tunnel(USER, timeout=5), return_exceptions=True)
        winner, loser = results
        assert not isinstance(winner, BaseException), winner
        assert isinstance(loser, XtlsProtocolError) and "tie-break" in str(loser), loser
        assert [s.answer for s in user.start_requests] == ["conflict"]
        assert [s.answer for s in bot.start_requests] == ["proceed"]
        assert winner.role == "initiator" and winner.state == "open"
        responder = bot.accepted_tunnels[0]
        await responder.wait_open(timeout=5)
        await winner.send_message("hi")
        assert await winner.recv_message(timeout=5) == "bot: hi"

    run(scenario())


if __name__ == "__main__":
    import pytest

    sys.exit(pytest.main([__file__, "-q"]))
