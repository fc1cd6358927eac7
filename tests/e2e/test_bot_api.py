"""End-to-end tests of the bot-facing API (docs/bot-api.md) through a real Prosody.

A second component process (`api_component`, module scope) serves the domain
`api.localhost` with its own store, so that it can be killed with SIGKILL without touching
the echo component of test_e2e.py.  Every test creates its own `api` bots (POST /v1/bots,
`"handler": "api"`), so each event log starts at seq 1.  Users log in with the session's
certificates (conftest.Users); as responders they pin the bot's certificate from the admin API.

Webhook retries are configured fast in this component (`[webhooks] initial_backoff_ms`,
`max_backoff_ms`) so that an outage of a few seconds is recovered from quickly; the tests
also pass, more slowly, with the documented defaults (1 s doubling).

Admin API calls inside async scenarios go through `call()` (a thread): the component may
need our XMPP client to answer (disco#info, start) before it answers the HTTP request.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.parse
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bench_delivery import run_benchmarks
from botapi_helpers import (
    FAST_WEBHOOKS_CONFIG,
    EventPoller,
    WebhookReceiver,
    call,
    delivery_problems,
    messages_received,
    new_api_bot,
    open_sse,
    poll_events,
    post_message,
    put_webhook,
    read_log,
    until,
)
from component import Component
from conftest import run
from xtls_client import reply_to_messages

ENVELOPE_KEYS = {"id", "seq", "type", "bot", "occurred_at", "tunnel_id", "peer", "data"}
HISTORY_RANK = {"accepted": 0, "queued": 1, "opening": 1, "sent": 2, "acknowledged": 3}


@pytest.fixture(scope="module")
def api_component(prosody):
    comp = Component(prosody, domain=prosody.api_component_domain, bots="", extra_config=FAST_WEBHOOKS_CONFIG)
    try:
        comp.start()
        yield comp
    finally:
        comp.cleanup()


# --------------------------------------------------------------------------- helpers


def bot_certificate(component, bot: str) -> dict:
    status, cert = component.get(f"/v1/bots/{bot}/certificate")
    assert status == 200, f"GET certificate -> {status}: {cert!r}"
    return cert


def drop_webhook(component, bot: str) -> None:
    """DELETE the bot's webhook, so that no retries to a stopped receiver outlive the test."""
    component.delete(f"/v1/bots/{bot}/webhook")


def webhook_state(component, bot: str) -> dict:
    status, hook = component.get(f"/v1/bots/{bot}/webhook")
    assert status == 200, f"GET webhook -> {status}: {hook!r}"
    return hook


def wait_webhook_drained(component, bot: str, timeout: float = 15.0) -> dict:
    """Until GET webhook says nothing is pending, and the cursor has reached last_seq."""
    deadline = time.monotonic() + timeout
    while True:
        hook = webhook_state(component, bot)
        status, log = poll_events(component, bot)  # no `after`: reads from the cursor, acks nothing
        assert status == 200, f"GET events -> {status}: {log!r}"
        if hook["pending"] == 0 and log["cursor"] == log["last_seq"] and not log["events"]:
            return {"webhook": hook, "cursor": log["cursor"], "last_seq": log["last_seq"]}
        if time.monotonic() > deadline:
            raise TimeoutError(f"webhook of {bot} not drained within {timeout} s: {hook!r}, cursor/log {log!r}")
        time.sleep(0.05)


def tunnels_of(component, bot: str) -> list[dict]:
    status, body = component.get("/v1/tunnels?" + urllib.parse.urlencode({"bot": bot}, safe="@"))
    assert status == 200, f"GET /v1/tunnels -> {status}: {body!r}"
    return body.get("tunnels") if isinstance(body, dict) else body


def check_envelope(event: dict, bot: str) -> None:
    missing = ENVELOPE_KEYS - set(event)
    assert not missing, f"event lacks {missing}: {event!r}"
    assert event["id"].startswith("evt_") and event["bot"] == bot, event
    assert isinstance(event["seq"], int) and event["seq"] >= 1, event
    assert isinstance(event["data"], dict), event


def check_message_event(event: dict, bot: str, peer: str, body: str, spki: str) -> None:
    check_envelope(event, bot)
    assert event["type"] == "message.received" and event["peer"] == peer, event
    data = event["data"]
    assert data.get("body") == body, event
    assert "<message" in data.get("stanza", "") and body in data["stanza"], event
    identity = data.get("identity") or {}
    assert identity.get("spki_sha256") == spki, event
    assert identity.get("trust") in ("tofu_new", "pinned"), event


# --------------------------------------------------------------------------- webhooks


def test_webhook_gets_every_message_in_order_and_its_reply_reaches_the_client(api_component, users):
    bot = new_api_bot(api_component, "hook")
    # Without a secret one is generated and shown once (docs/bot-api.md, Webhooks).
    scratch = WebhookReceiver()
    scratch.stop()
    status, answer = api_component.put(f"/v1/bots/{bot}/webhook", {"url": scratch.url})
    assert status in (200, 201) and str(answer.get("secret", "")).startswith("whsec_"), (status, answer)
    assert "secret" not in webhook_state(api_component, bot)
    reply = lambda e: {"body": f"re: {e['data']['body']}"} if e["type"] == "message.received" else None  # noqa: E731
    receiver = WebhookReceiver(reply=reply)
    try:
        put_webhook(api_component, bot, receiver)
        hook = webhook_state(api_component, bot)
        assert hook["url"] == receiver.url and hook["secret_set"] is True and "secret" not in hook, hook
        bodies = [f"message {i} of twenty" for i in range(20)]

        async def scenario():
            async with users.client("alice") as alice:
                tunnel = await alice.open_tunnel(bot)
                for body in bodies:
                    await tunnel.send_message(body)
                replies = [await tunnel.recv_message(timeout=10) for _ in bodies]
                assert replies == [f"re: {b}" for b in bodies], "webhook replies missing, changed or reordered"
                assert tunnel.inner_routing_seen == 0, "the component left from/to on inner stanzas (spec §1.9)"
                await tunnel.close()
                return alice.jid, alice.spki_sha256()

        peer, spki = run(scenario(), 30)
        receiver.wait_for(lambda r: r.acked("tunnel.closed"), 10, "tunnel.closed")
        drained = wait_webhook_drained(api_component, bot)
        assert receiver.invalid() == [], [d.problems for d in receiver.invalid()]
        assert delivery_problems(receiver.deliveries) == [], delivery_problems(receiver.deliveries)
        acked = sorted(receiver.acked(), key=lambda d: d.seq)
        assert [d.seq for d in acked] == list(range(1, drained["last_seq"] + 1)), "a seq was skipped or repeated"
        assert len({d.event_id for d in acked}) == len(acked)
        for d in acked:
            check_envelope(d.envelope, bot)
            assert d.event_id == d.envelope["id"]
        msgs = [d.envelope for d in acked if d.type == "message.received"]
        assert [m["data"].get("body") for m in msgs] == bodies
        for msg, body in zip(msgs, bodies):
            check_message_event(msg, bot, peer, body, spki)
        assert len({m["tunnel_id"] for m in msgs}) == 1 and msgs[0]["tunnel_id"], msgs[0]
        types = [d.type for d in acked]
        assert types.index("tunnel.opened") < types.index("message.received"), types
        assert "tunnel.closed" in types, types
    finally:
        drop_webhook(api_component, bot)
        receiver.stop()


def test_webhook_outage_loses_nothing_and_keeps_order(api_component, users):
    """500 for a while, then down, then up: every event acknowledged exactly once, in order."""
    bot = new_api_bot(api_component, "outage")
    receiver = WebhookReceiver()
    try:
        put_webhook(api_component, bot, receiver, timeout_ms=2000)
        bodies = [f"outage message {i}" for i in range(9)]

        async def scenario():
            async with users.client("alice") as alice:
                tunnel = await alice.open_tunnel(bot)
                for body in bodies[:3]:  # receiver fine
                    await tunnel.send_message(body)
                await call(receiver.wait_for, lambda r: len(r.acked("message.received")) == 3, 10, "first 3 messages")

                receiver.status = 500  # failing
                for body in bodies[3:6]:
                    await tunnel.send_message(body)
                await call(receiver.wait_for, lambda r: len(r.answered(500)) >= 2, 10, "two attempts answered 500")

                receiver.stop()  # down
                for body in bodies[6:]:
                    await tunnel.send_message(body)
                await tunnel.flush()

                def refused_attempt():
                    status, deliveries = api_component.get(f"/v1/bots/{bot}/deliveries")
                    assert status == 200, (status, deliveries)
                    return [a for a in deliveries["attempts"] if a["status"] is None]  # no HTTP answer

                await until(lambda: refused_attempt(), 15, "a delivery attempt while the receiver was down")

                receiver.status = 200
                receiver.start()  # up again, same port
                await call(receiver.wait_for, lambda r: len(r.acked("message.received")) == 9, 20, "all 9 messages")
                await tunnel.close()
                return alice.jid

        run(scenario(), 45)
        drained = wait_webhook_drained(api_component, bot)
        assert receiver.invalid() == []
        problems = delivery_problems(receiver.deliveries)
        assert problems == [], problems
        assert receiver.acked_bodies() == bodies, "messages lost, repeated or reordered"
        acked = sorted(receiver.acked(), key=lambda d: d.seq)
        assert [d.seq for d in acked] == list(range(1, drained["last_seq"] + 1))
        failed = receiver.answered(500)
        assert len({d.event_id for d in failed}) == 1, "only the head of the tunnel's queue may be retried"
        head = next(d for d in acked if d.event_id == failed[0].event_id)
        assert head.type == "message.received" and head.data["body"] == bodies[3], head.envelope
        assert all(d.envelope == head.envelope for d in failed), "a retry changed the event"
        status, deliveries = api_component.get(f"/v1/bots/{bot}/deliveries")
        assert status == 200 and deliveries["dead_letters"] == [], deliveries
        statuses = [a["status"] for a in deliveries["attempts"] if a["event_id"] == head.event_id]
        assert 500 in statuses and None in statuses and 200 in statuses, deliveries["attempts"]
        assert drained["webhook"]["dead"] == 0, drained
    finally:
        drop_webhook(api_component, bot)
        receiver.stop()


def test_a_failing_tunnel_does_not_hold_back_another(api_component, users):
    """The receiver refuses every event of alice's tunnel; bob's 40 messages still all arrive,
    in order, while alice's head is retried; once the receiver accepts, alice's follow in order."""
    bot = new_api_bot(api_component, "stuck")
    receiver = WebhookReceiver()
    stuck_tunnel: dict = {}
    receiver.respond = lambda d: 500 if d.tunnel_id and d.tunnel_id == stuck_tunnel.get("id") else 200
    try:
        put_webhook(api_component, bot, receiver, timeout_ms=2000)
        alice_bodies = [f"alice {i}" for i in range(40)]
        bob_bodies = [f"bob {i}" for i in range(40)]

        async def scenario():
            async with users.client("alice") as alice, users.client("bob") as bob:
                a = await alice.open_tunnel(bot)
                await call(receiver.wait_for, lambda r: r.acked("tunnel.established"), 10, "alice's tunnel")
                stuck_tunnel["id"] = receiver.acked("tunnel.established")[0].tunnel_id
                for body in alice_bodies:  # more than the deliverer holds per tunnel
                    await a.send_message(body)
                await a.flush()
                b = await bob.open_tunnel(bot)
                for body in bob_bodies:
                    await b.send_message(body)
                await call(
                    receiver.wait_for,
                    lambda r: [x.data.get("body") for x in r.acked("message.received")] == bob_bodies,
                    20,
                    "bob's messages, in order, while alice's tunnel is refused",
                )
                assert len({d.seq for d in receiver.answered(500)}) == 1, "only the head of alice's queue is tried"
                receiver.respond = None
                await call(receiver.wait_for, lambda r: len(r.acked("message.received")) == 80, 30, "all 80")
                await a.close()
                await b.close()

        run(scenario(), 90)
        bodies = [d.data.get("body") for d in receiver.acked("message.received")]
        assert [x for x in bodies if x.startswith("alice")] == alice_bodies
        assert [x for x in bodies if x.startswith("bob")] == bob_bodies
        assert delivery_problems(receiver.deliveries) == [], delivery_problems(receiver.deliveries)
    finally:
        drop_webhook(api_component, bot)
        receiver.stop()


def test_sse_replay_and_long_poll_give_what_the_webhook_got(api_component, users):
    bot = new_api_bot(api_component, "sse")
    receiver = WebhookReceiver()
    try:
        put_webhook(api_component, bot, receiver)
        bodies = [f"streamed {i}" for i in range(10)]

        async def scenario():
            async with users.client("alice") as alice:
                tunnel = await alice.open_tunnel(bot)
                for body in bodies:
                    await tunnel.send_message(body)
                await call(receiver.wait_for, lambda r: len(r.acked("message.received")) == 10, 10, "10 messages")
                drained = await call(wait_webhook_drained, api_component, bot)
                hooked = {d.seq: d.envelope for d in receiver.acked()}
                last = drained["last_seq"]
                assert sorted(hooked) == list(range(1, last + 1))

                with open_sse(api_component, bot, last_event_id=0) as sse:
                    assert sse.status == 200, (sse.status, sse.error_body)
                    assert sse.headers.get("content-type", "").startswith("text/event-stream"), sse.headers
                    replay = await call(sse.take, last, 10)
                    assert [e.id for e in replay] == [str(s) for s in range(1, last + 1)]
                    assert [e.event for e in replay] == [hooked[s]["type"] for s in range(1, last + 1)]
                    assert [e.json for e in replay] == [hooked[s] for s in range(1, last + 1)]

                    # Live: a long poll waiting after `last`, the stream, and the webhook all see the next events.
                    long_poll = asyncio.create_task(call(poll_events, api_component, bot, after=last, wait=10))
                    await asyncio.sleep(0.5)
                    assert not long_poll.done(), f"long poll answered without waiting: {long_poll.result()!r}"
                    await tunnel.send_message("live one")
                    status, polled = await asyncio.wait_for(long_poll, 10)
                    assert status == 200 and polled["events"], (status, polled)
                    live = await call(sse.take_until, lambda e: e.event == "message.received", 10)
                await call(receiver.wait_for, lambda r: len(r.acked("message.received")) == 11, 10, "the live message")
                await call(wait_webhook_drained, api_component, bot)
                hooked = {d.seq: d.envelope for d in receiver.acked()}
                for event in polled["events"]:
                    assert event == hooked[event["seq"]], (event, hooked.get(event["seq"]))
                assert [e.json for e in live] == [hooked[int(e.id)] for e in live]
                assert [int(e.id) for e in live] == list(range(last + 1, last + 1 + len(live)))
                assert live[-1].json["data"]["body"] == "live one"

                middle = last // 2
                with open_sse(api_component, bot, last_event_id=middle) as sse:  # replay from Last-Event-ID
                    part = await call(sse.take, len(hooked) - middle, 10)
                assert [e.json for e in part] == [hooked[s] for s in range(middle + 1, len(hooked) + 1)]
                with open_sse(api_component, bot, after=middle) as sse:  # the same with ?after=
                    part = await call(sse.take, len(hooked) - middle, 10)
                assert [e.json for e in part] == [hooked[s] for s in range(middle + 1, len(hooked) + 1)]

                log = await call(read_log, api_component, bot, 0)  # all acknowledged: reading acks nothing new
                assert log == [hooked[s] for s in range(1, len(hooked) + 1)]
                await tunnel.close()

        run(scenario(), 30)
    finally:
        drop_webhook(api_component, bot)
        receiver.stop()


# --------------------------------------------------------------------------- the bot as initiator


def test_bot_opens_tunnel_to_user_client_as_tls_server(api_component, users):
    bot = new_api_bot(api_component, "talker")
    cert = bot_certificate(api_component, bot)
    cert_der = x509.load_pem_x509_certificate(cert["pem"].encode()).public_bytes(serialization.Encoding.DER)
    bodies = [f"bot says {i}" for i in range(100)]
    keys = [uuid.uuid4().hex for _ in bodies]

    async def scenario():
        async with users.client("bob") as bob:
            bob.serve({bot: cert["pem"]}, auto_reply=reply_to_messages(lambda b: f"re: {b}"))
            poller = EventPoller(api_component, bot)
            status, first = await call(post_message, api_component, bot, {"to": bob.jid, "body": bodies[0]}, key=keys[0])
            assert status == 202, f"POST messages -> {status}: {first!r}"
            assert first["status"] == "opening" and first["to"] == bob.jid, first
            assert first["id"].startswith("msg_"), first
            status, again = await call(post_message, api_component, bot, {"to": bob.jid, "body": bodies[0]}, key=keys[0])
            assert status == 202 and again["id"] == first["id"], f"Idempotency-Key not honoured: {again!r}"
            answers = [first]
            for body, key in zip(bodies[1:], keys[1:]):
                status, answer = await call(post_message, api_component, bot, {"to": bob.jid, "body": body}, key=key)
                assert status == 202 and answer["status"] in ("opening", "queued", "sent"), (status, answer)
                answers.append(answer)
            assert len({a["id"] for a in answers}) == len(bodies)

            tunnel = await bob.next_tunnel(timeout=15)
            await tunnel.wait_open(timeout=15)
            got = [await tunnel.recv_message(timeout=15) for _ in bodies]
            assert got == bodies, "the bot's messages arrived changed or out of order"
            assert tunnel.role == "responder" and tunnel.peer_jid == bot
            assert tunnel.engine.version == "TLSv1.3"
            assert tunnel.peer_cert_der == cert_der, "the bot presented another client certificate than the API shows"
            assert tunnel.peer_xmpp_addrs() == [bot]
            assert tunnel.inner_routing_seen == 0, "the component left from/to on inner stanzas (spec §1.9)"
            assert bot in bob.disco_requests, f"the bot sent <start/> without asking disco#info: {bob.disco_requests}"
            assert [(s.from_jid, s.answer) for s in bob.start_requests] == [(bot, "proceed")], bob.start_requests

            await poller.until(lambda evs: len(messages_received(evs)) >= len(bodies), 20, "the 100 replies")
            replies = messages_received(poller.events)
            assert [e["data"].get("body") for e in replies] == [f"re: {b}" for b in bodies]
            for event, body in zip(replies, bodies):
                check_message_event(event, bot, bob.jid, f"re: {body}", bob.spki_sha256())
            tunnel_id = replies[0]["tunnel_id"]
            assert {e["tunnel_id"] for e in replies} == {tunnel_id}

            rows = [t for t in await call(tunnels_of, api_component, bot) if t["id"] == tunnel_id]
            assert len(rows) == 1 and rows[0]["role"] == "initiator" and rows[0]["peer"] == bob.jid, rows
            assert rows[0]["state"] == "open", rows
            opened = [e for e in poller.events if e["type"] == "tunnel.opened" and e["tunnel_id"] == tunnel_id]
            assert len(opened) == 1 and opened[0]["data"]["role"] == "initiator", opened
            established = [e for e in poller.events if e["type"] == "tunnel.established" and e["tunnel_id"] == tunnel_id]
            assert len(established) == 1, established
            assert re.search(r"1[._]?3", established[0]["data"]["tls_version"]), established
            assert established[0]["data"]["identity"]["spki_sha256"] == bob.spki_sha256(), established

            def history_of_all():
                out = []
                for answer in answers:
                    status, msg = api_component.get(f"/v1/bots/{bot}/messages/{answer['id']}")
                    assert status == 200, f"GET messages/{answer['id']} -> {status}: {msg!r}"
                    out.append(msg)
                return out

            async def all_acknowledged():
                msgs = await call(history_of_all)
                return msgs if all(m["status"] == "acknowledged" for m in msgs) else None

            deadline = time.monotonic() + 15
            while (msgs := await all_acknowledged()) is None:
                assert time.monotonic() < deadline, [(m["id"], m["status"]) for m in await call(history_of_all)]
                await asyncio.sleep(0.2)
            for msg, answer in zip(msgs, answers):
                statuses = [h["status"] for h in msg["history"]]
                assert msg["id"] == answer["id"] and msg["to"] == bob.jid, msg
                assert statuses[0] == "accepted" and statuses[-1] == "acknowledged" and "sent" in statuses, msg
                assert all(s in HISTORY_RANK for s in statuses), msg
                ranks = [HISTORY_RANK[s] for s in statuses]
                assert ranks == sorted(ranks), f"history out of order: {statuses}"
            assert "opening" in [h["status"] for h in msgs[0]["history"]], msgs[0]

            await tunnel.close()
            await poller.until(
                lambda evs: [e for e in evs if e["type"] == "tunnel.closed" and e["tunnel_id"] == tunnel_id],
                10, "tunnel.closed",
            )
            closed = [e for e in poller.events if e["type"] == "tunnel.closed" and e["tunnel_id"] == tunnel_id]
            assert closed[0]["data"]["code"] == "peer_close", closed
            acknowledged = {
                e["data"]["message_id"] for e in poller.events
                if e["type"] == "delivery.status" and e["data"].get("status") == "acknowledged"
            }
            assert acknowledged == {a["id"] for a in answers}, "a delivery.status 'acknowledged' event is missing"
            seqs = [e["seq"] for e in poller.events]
            assert seqs == list(range(1, len(seqs) + 1)), "event log not gap-free"

    run(scenario(), 45)


def test_client_without_xtls_gets_no_start(api_component, users):
    bot = new_api_bot(api_component, "nox")
    cert = bot_certificate(api_component, bot)

    async def scenario():
        async with users.client("mallory") as mallory:
            mallory.serve({bot: cert["pem"]}, advertise=False)  # would even accept, but says nothing
            status, answer = await call(post_message, api_component, bot, {"to": mallory.jid, "body": "anyone?"})
            assert status == 202, f"POST messages -> {status}: {answer!r}"
            assert answer["status"] == "no_xtls_support", answer
            assert bot in mallory.disco_requests, "the bot decided without asking disco#info"
            # A second message asks disco#info again; a <start/> the bot sent after the first
            # answer would have reached mallory before this second query (same bot, same path).
            asked = len(mallory.disco_requests)
            status, second = await call(post_message, api_component, bot, {"to": mallory.jid, "body": "still?"})
            assert (status, second["status"]) == (202, "no_xtls_support"), (status, second)
            await until(lambda: len(mallory.disco_requests) > asked, 10, "the second disco#info")
            assert mallory.start_requests == [], f"the bot sent <start/> anyway: {mallory.start_requests}"
            status, msg = await call(api_component.get, f"/v1/bots/{bot}/messages/{answer['id']}")
            assert status == 200, (status, msg)
            # Final: `no_xtls_support` itself (failure statuses are final statuses, like `refused`),
            # or `failed` with that reason; the last history entry says the same.
            assert msg["history"][-1]["status"] == msg["status"], msg
            if msg["status"] != "no_xtls_support":
                assert msg["status"] == "failed" and "no_xtls_support" in str(msg.get("reason")), msg
            assert "acknowledged" not in [h["status"] for h in msg["history"]], msg

    run(scenario(), 20)


def test_messages_in_clear_are_delivered_marked_or_refused_by_policy(api_component, users):
    """Spec §1.9 rule 8 through Prosody: a message sent in clear reaches an api bot as
    message.received with encrypted false; a bot created encrypted_only refuses it with
    policy-violation, and logs nothing."""
    bot = new_api_bot(api_component, "clear")
    status, strict = api_component.post(
        "/v1/bots", {"localpart": f"strict{uuid.uuid4().hex[:8]}", "handler": "api", "encrypted_only": True})
    assert status == 201 and strict["encrypted_only"] is True, (status, strict)
    strict = strict["jid"]

    async def scenario():
        async with users.client("alice") as alice:
            alice.send_raw(f"<message to='{bot}' type='chat' id='clear-1'><body>hello in clear</body></message>")
            alice.send_raw(f"<message to='{strict}' type='chat' id='clear-2'><body>also in clear</body></message>")
            await until(lambda: alice.message_errors, 10, "the strict bot's refusal")
            refusal = alice.message_errors[0]
            assert "clear-2" in refusal and "policy-violation" in refusal and "XTLS" in refusal, refusal
            status, page = await call(poll_events, api_component, bot, after=0, wait=10)
            assert status == 200, (status, page)
            received = messages_received(page["events"])
            assert len(received) == 1, page
            assert received[0]["data"]["encrypted"] is False, received[0]
            assert received[0]["data"]["body"] == "hello in clear", received[0]
            assert received[0]["data"]["identity"] is None and received[0]["tunnel_id"] is None, received[0]
            assert received[0]["peer"] == alice.jid, received[0]
            # The refusal left after the strict bot's step committed: had it logged, it would show.
            status, page = await call(poll_events, api_component, strict, after=0)
            assert status == 200 and page["events"] == [], (status, page)

    run(scenario(), 30)


def test_webhooks_cannot_reach_internal_addresses_by_default(component, users):
    """The default configuration (no webhooks.allowed_networks): a webhook URL with a loopback
    IP is refused when set, and one whose name resolves to loopback is accepted but never
    reached: its delivery fails naming the guard, and the receiver sees nothing."""
    status, made = component.post("/v1/bots", {"localpart": f"ssrf{uuid.uuid4().hex[:8]}", "handler": "api"})
    assert status == 201, (status, made)
    bot = made["jid"]
    with WebhookReceiver() as receiver:
        status, refused = component.put(f"/v1/bots/{bot}/webhook", {"url": receiver.url, "secret": receiver.secret})
        assert status == 422 and "loopback" in refused["detail"], (status, refused)
        by_name = receiver.url.replace("127.0.0.1", "localhost")
        status, hook = component.put(f"/v1/bots/{bot}/webhook", {"url": by_name, "secret": receiver.secret})
        assert status == 200, (status, hook)

        async def scenario():
            async with users.client("alice") as alice:  # an event for the webhook: a message in clear
                alice.send_raw(f"<message to='{bot}' type='chat' id='ssrf-1'><body>knock</body></message>")

                def failed_attempt():
                    status, deliveries = component.get(f"/v1/bots/{bot}/deliveries")
                    assert status == 200, (status, deliveries)
                    return [a for a in deliveries["attempts"] if a["error"]]

                await until(failed_attempt, 15, "a refused delivery attempt")
                error = failed_attempt()[0]["error"]
                assert "loopback" in error and "webhooks.allowed_networks" in error, error
                assert receiver.deliveries == [], receiver.deliveries

        run(scenario(), 30)


# --------------------------------------------------------------------------- tokens


def test_bot_tokens_reach_only_their_bot(api_component):
    own, other = new_api_bot(api_component, "tok"), new_api_bot(api_component, "other")
    status, issued = api_component.post(f"/v1/bots/{own}/tokens")
    assert status == 201, f"POST tokens -> {status}: {issued!r}"
    assert {"id", "token", "created_at"} <= set(issued), issued
    token = issued["token"]
    assert token != api_component.token

    status, body = poll_events(api_component, own, token=token)
    assert status == 200 and isinstance(body.get("events"), list), (status, body)
    local = own.split("@")[0]
    assert poll_events(api_component, local, token=token)[0] == 200, "a bot's localpart names it too"
    assert poll_events(api_component, other, token=token)[0] == 403
    assert api_component.post("/v1/bots", {"localpart": f"evil{uuid.uuid4().hex[:6]}", "handler": "api"}, token=token)[0] == 403
    assert api_component.post(f"/v1/bots/{own}/tokens", token=token)[0] == 403, "a bot token minted a token"
    assert api_component.get(f"/v1/bots/{own}", token=token)[0] == 403
    assert api_component.get("/v1/tunnels", token=token)[0] == 403
    assert api_component.get(f"/v1/bots/{other}/webhook", token=token)[0] == 403

    status, listed = api_component.get(f"/v1/bots/{own}/tokens")
    assert status == 200, (status, listed)
    rows = listed.get("tokens") if isinstance(listed, dict) else listed
    assert [r["id"] for r in rows] == [issued["id"]] and "token" not in rows[0], listed
    status, _ = api_component.delete(f"/v1/bots/{own}/tokens/{issued['id']}")
    assert status in (200, 204), status
    assert poll_events(api_component, own, token=token)[0] == 401, "a revoked token still works"


# --------------------------------------------------------------------------- throughput


def test_delivery_throughput(api_component, users, capsys):
    """Events per second through Prosody: webhook, SSE, long poll (printed, not asserted)."""
    figures = run(run_benchmarks(api_component, lambda: users.client("alice"), n=300), 60)
    with capsys.disabled():
        print()
        for line in figures["lines"]:
            print(f"[bot-api] {line}")


# --------------------------------------------------------------------------- crash (last: restarts the component)


def test_sigkill_loses_no_acknowledged_message(api_component, users):
    """No webhook: N messages, every data IQ acknowledged, SIGKILL, restart: all N are in the log."""
    bot = new_api_bot(api_component, "crash")
    bodies = [f"durable {i}" for i in range(30)]
    store = api_component.store_path

    async def scenario():
        async with users.client("bob") as bob:
            tunnel = await bob.open_tunnel(bot)
            for body in bodies:
                await tunnel.send_message(body)
            await tunnel.flush(timeout=15)  # every data IQ carrying them was acknowledged
            api_component.kill()
            return bob.jid, bob.spki_sha256()

    peer, spki = run(scenario(), 30)
    api_component.start()
    assert api_component.store_path == store and store.exists()
    status, body = poll_events(api_component, bot, after=0, limit=1000)
    assert status == 200, (status, body)
    events = body["events"]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)) and body["last_seq"] >= len(seqs), seqs
    msgs = messages_received(events)
    assert [m["data"].get("body") for m in msgs] == bodies, "acknowledged messages lost or reordered by the crash"
    for msg, text in zip(msgs, bodies):
        check_message_event(msg, bot, peer, text, spki)
    assert len({m["tunnel_id"] for m in msgs}) == 1


def test_sigterm_closes_tunnels_gracefully_and_loses_nothing(api_component, users):
    """SIGTERM while alice is sending: her tunnel ends with close_notify and then <close/>,
    the process exits 0, and after a restart the log holds every acknowledged message and the
    tunnel.closed of the shutdown."""
    bot = new_api_bot(api_component, "term")
    flushed = [f"before shutdown {i}" for i in range(20)]
    sent: list[str] = []

    async def scenario():
        async with users.client("alice") as alice:
            tunnel = await alice.open_tunnel(bot)
            for body in flushed:
                await tunnel.send_message(body)
            await tunnel.flush()  # every data IQ carrying them was acknowledged

            async def keep_sending():
                i = 0
                while tunnel.state == "open":
                    body = f"during shutdown {i}"
                    try:
                        await tunnel.send_message(body)
                    except Exception:
                        return
                    sent.append(body)
                    i += 1
                    await asyncio.sleep(0.005)

            sender = asyncio.create_task(keep_sending())
            await asyncio.sleep(0.1)
            process = api_component._proc
            await call(api_component.stop)
            assert process.returncode == 0, f"exit status {process.returncode}"
            await until(lambda: tunnel.state == "closed", 10, "the tunnel closed")
            await sender
            assert tunnel.engine.peer_eof, "close_notify arrived before the tunnel ended"
            assert tunnel.closed_by_peer, "the component sent <close/>"

    run(scenario(), 40)
    api_component.start()
    status, body = poll_events(api_component, bot, after=0, limit=1000)
    assert status == 200, (status, body)
    bodies = [m["data"].get("body") for m in messages_received(body["events"])]
    assert bodies[: len(flushed)] == flushed, "acknowledged messages lost"
    assert bodies[len(flushed):] == sent[: len(bodies) - len(flushed)], "messages reordered or invented"
    closed = [e for e in body["events"] if e["type"] == "tunnel.closed"]
    assert [e["data"]["code"] for e in closed] == ["shutdown"], closed


def test_metrics_moved_during_the_run_and_name_no_peer(api_component, users):
    """GET /metrics (admin token) after traffic through this module's component."""
    bot = new_api_bot(api_component, "metered")
    receiver = WebhookReceiver()
    try:
        put_webhook(api_component, bot, receiver)

        async def scenario():
            async with users.client("bob") as bob:
                tunnel = await bob.open_tunnel(bot)
                for i in range(5):
                    await tunnel.send_message(f"metered {i}")
                await call(receiver.wait_for, lambda r: len(r.acked("message.received")) == 5, 10, "5 deliveries")
                return bob.jid

        peer = run(scenario(), 30)
        status, text = api_component.get("/metrics")
        assert status == 200, (status, text)
        assert isinstance(text, str), text

        def value(name: str, **labels) -> float:
            want = ",".join(f'{k}="{v}"' for k, v in labels.items())
            pattern = rf"^{re.escape(name)}(\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{re.escape(name)} (\S+)$"
            m = re.search(pattern, text, re.M)
            assert m, f"{name} {labels} not in /metrics:\n{text}"
            return float(m.groups()[-1])

        assert value("xtls_component_connected") == 1
        assert value("xtls_tunnels_opened_total", role="responder", result="established") >= 1
        assert value("xtls_tunnel_stanzas_total", direction="in") >= 5
        assert value("xtls_tunnel_bytes_total", direction="out") > 0
        assert value("xtls_webhook_deliveries_total", result="delivered") >= 5
        assert value("xtls_bots") >= 1
        assert value("xtls_certificate_expiry_timestamp_seconds", bot=bot) > time.time()
        assert re.search(r'^xtls_build_info\{version="[^"]+"\} 1$', text, re.M), text
        assert "xtls_handshake_duration_seconds_count" in text
        assert peer.split("/")[0] not in text, "a peer JID leaked into a label"
        assert api_component.get("/metrics", token=False)[0] == 401
        status, tok = api_component.post(f"/v1/bots/{bot}/tokens")
        assert status == 201, (status, tok)
        assert api_component.get("/metrics", token=tok["token"])[0] == 403
    finally:
        drop_webhook(api_component, bot)
        receiver.stop()


def test_namespace_declarations_a_writer_could_trip_on_reach_the_bot(api_component, users):
    """Valid XML the XML writer once panicked on (a child redeclaring its parent's prefix, an
    explicit xmlns:xml): delivered as message.received with its namespaces, and the bot and
    the tunnel carry on (docs/fuzzing.md, crash 8)."""
    bot = new_api_bot(api_component, "prefixes")
    tricky = [
        "<message xmlns='jabber:client' xmlns:q='urn:q' q:a='1'><body>redeclared</body>"
        "<q:x xmlns:q='urn:q' q:b='2'/></message>",
        "<message xmlns='jabber:client' xmlns:xml='http://www.w3.org/XML/1998/namespace' xml:lang='en'>"
        "<body>explicit xml prefix</body></message>",
    ]

    async def scenario():
        async with users.client("alice") as alice:
            tunnel = await alice.open_tunnel(bot)
            for xml in tricky:
                await tunnel.send_stanza(xml)
            await tunnel.send_message("after them")
            deadline = time.monotonic() + 10
            while True:
                received = [e for e in await call(read_log, api_component, bot, 0) if e["type"] == "message.received"]
                if len(received) >= 3 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert [e["data"]["body"] for e in received] == ["redeclared", "explicit xml prefix", "after them"], received
            stanza = received[0]["data"]["stanza"]
            assert "urn:q" in stanza and "b='2'" in stanza, stanza
            assert tunnel.state == "open"
            await tunnel.close()

    run(scenario(), 30)
