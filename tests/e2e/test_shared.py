"""Several active instances on one PostgreSQL store behind ejabberd's `domain_balancing`
(`instances.mode = "shared"`): each bot is run by the instance the server routes it to, any
instance answers for any bot, and a replacement takes over what a killed instance ran."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import urllib.parse
import uuid

import pytest

from botapi_helpers import (FAST_WEBHOOKS_CONFIG, EventPoller, SseStream, WebhookReceiver, call,
                            delivery_problems, messages_received, new_api_bot, post_message, put_webhook,
                            read_log)
from component import Component
from conftest import Users, _running, run
from ejabberd import Ejabberd
from test_balancing import FAST_LINK
from test_e2e import data, echo_roundtrip
from xmpp_server import free_port

PASSWORD = "pg-password-never-shown"
SHARED = '[instances]\nmode = "shared"\n'
BOTS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]


@pytest.fixture(scope="module")
def balanced():
    """A private ejabberd spreading api.localhost over 3 slots, with the test users."""
    yield from _running(Ejabberd(balanced_slots=3))


def _instances(server, postgres, count: int) -> tuple[list[Component], str]:
    database = f"xtls_{free_port()}"
    postgres.psql(f"CREATE DATABASE {database}", database="postgres")
    url = f"postgres://postgres:{PASSWORD}@127.0.0.1:{postgres.port}/{database}"
    token = secrets.token_urlsafe(24)
    comps: list[Component] = []
    for _ in range(count):
        comp = Component(server, domain=server.api_component_domain, bots="", store_url=url,
                         store_key=comps[0].store_key if comps else None, token=token,
                         extra_config=FAST_WEBHOOKS_CONFIG + SHARED, component_config=FAST_LINK)
        comp.config_path.write_text(comp.config_path.read_text() + f'advertise_url = "{comp.base_url}"\n')
        comps.append(comp)
    return comps, database


def _owners(postgres, database: str) -> dict[str, tuple[str, int]]:
    rows = postgres.psql("SELECT bot_jid, instance_id, epoch FROM bot_owners ORDER BY bot_jid",
                         database=database)
    owners = {}
    for line in rows.splitlines():
        bot, instance, epoch = line.split("|")
        owners[bot] = (instance, int(epoch))
    return owners


def _wait_for_owners(postgres, database: str, bots: list[str], timeout: float,
                     not_on: str | None = None) -> dict[str, tuple[str, int]]:
    deadline = time.monotonic() + timeout
    owners: dict = {}
    while time.monotonic() < deadline:
        owners = _owners(postgres, database)
        if all(b in owners and owners[b][0] != not_on for b in bots):
            return owners
        time.sleep(0.2)
    raise AssertionError(f"not every bot has an owner: {owners}")


def test_three_instances_share_the_store_and_each_bot_runs_on_one(balanced, postgres):
    """Three instances on three slots: every bot is claimed by the instance its stanzas reach,
    tunnels to every bot carry messages, any instance answers for any bot (passing the request
    to the owner), and after a SIGKILL a replacement takes the freed slot and the dead one's
    bots, which then open new tunnels with their keys unchanged."""
    server = balanced
    users = Users(server)
    comps, database = _instances(server, postgres, 4)
    running, spare = comps[:3], comps[3]
    domain = server.api_component_domain
    try:
        for comp in running:
            comp.start()
        ids = [comp.get("/v1/instances")[1]["this"] for comp in running]
        bots = []
        for name in BOTS:
            status, made = running[0].post("/v1/bots", {"localpart": name, "handler": "echo"})
            assert status == 201, made
            bots.append(made["jid"])
        owners = _wait_for_owners(postgres, database, bots, timeout=20)
        assert {owner for owner, _ in owners.values()} <= set(ids), (owners, ids)
        per_instance = [sum(owner == i for owner, _ in owners.values()) for i in ids]
        print("bots per instance:", per_instance)

        # The owner is the instance the server routes the bot to.
        for bot in bots:
            owner = ids.index(owners[bot][0])
            _, route = running[owner].get(f"/v1/bots/{bot}/route")
            assert route["reaches_this_instance"] is True, (bot, route)

        # Tunnels to every bot, wherever it runs.
        async def talk(bot: str, rounds: int) -> None:
            async with users.client("alice") as client:
                tunnel = await client.open_tunnel(bot)
                for i in range(rounds):
                    await echo_roundtrip(tunnel, f"{bot} {i}")
                await tunnel.close()

        async def everyone(rounds: int, bots: list[str] = bots) -> None:
            await asyncio.gather(*(talk(bot, rounds) for bot in bots))

        # Thirty tunnels spread over the nine bots, a hundred messages each, all at once.
        started = time.monotonic()
        run(everyone(100, [bots[i % len(bots)] for i in range(30)]), 300)
        print(f"30 tunnels x 100 echoes across three instances in {time.monotonic() - started:.1f} s")

        # Any instance answers for any bot: the same view, and a change made through one
        # instance is the owner's.
        bot = bots[0]
        owner = ids.index(owners[bot][0])
        other = running[(owner + 1) % 3]
        views = [comp.get(f"/v1/bots/{bot}")[1] for comp in running]
        assert all("fingerprints" in v and v["fingerprints"] == views[0]["fingerprints"] for v in views), views
        status, changed = other.patch(f"/v1/bots/{bot}", {"encrypted_only": True})
        assert status == 200 and changed["encrypted_only"] is True, changed
        assert running[owner].get(f"/v1/bots/{bot}")[1]["encrypted_only"] is True
        status, live = other.get("/v1/tunnels?" + urllib.parse.urlencode({"bot": bot}, safe="@"))
        assert status == 200, live

        # SIGKILL the owner of the most bots under live tunnels to every bot. The others' tunnels
        # go on; the spare takes the freed slot and exactly the dead one's bots; the old tunnels
        # of those are gone (item-not-found), and new ones open with the same keys.
        victim = max(range(3), key=lambda i: per_instance[i])
        lost = [b for b in bots if owners[b][0] == ids[victim]]
        # And an `api` bot of the victim's, whose acknowledged messages must survive it.
        for i in range(12):
            relay = new_api_bot(running[0], f"relay{i}")
            if _wait_for_owners(postgres, database, [relay], timeout=20)[relay][0] == ids[victim]:
                break
        else:
            raise AssertionError("twelve new bots, none on the instance to kill")
        bodies = [f"durable {i}" for i in range(30)]
        fingerprints = {b: running[(victim + 1) % 3].get(f"/v1/bots/{b}")[1]["fingerprints"] for b in lost}

        async def kill_under_traffic() -> tuple[str, dict, float]:
            async with contextlib.AsyncExitStack() as stack:
                clients = {b: await stack.enter_async_context(users.client("alice")) for b in bots}
                tunnels = {b: await clients[b].open_tunnel(b) for b in bots}
                for b in bots:
                    await echo_roundtrip(tunnels[b], "before")
                durable = await clients[bots[0]].open_tunnel(relay)
                for body in bodies:
                    await durable.send_message(body)
                await durable.flush(timeout=15)  # every data IQ carrying them was acknowledged
                running[victim].kill()
                killed = time.monotonic()
                for b in set(bots) - set(lost):
                    await echo_roundtrip(tunnels[b], "while the slot is free")
                await asyncio.to_thread(spare.start, 60)
                spare_id = spare.get("/v1/instances")[1]["this"]
                after = await asyncio.to_thread(
                    _wait_for_owners, postgres, database, lost, 30, ids[victim])
                took = time.monotonic() - killed
                for b in lost:
                    # The spare closes what the dead instance left open, and tells the peers.
                    for _ in range(100):
                        if tunnels[b].closed_by_peer:
                            break
                        await asyncio.sleep(0.1)
                    assert tunnels[b].closed_by_peer, f"no <close/> for the old tunnel to {b}"
                for b in bots:
                    if b in lost:
                        reply = await clients[b].send_raw_iq(b, data("FgMBAAA="))
                        assert (reply.condition, reply.error_type) == ("item-not-found", "cancel"), reply
                    else:
                        await echo_roundtrip(tunnels[b], "after")
                        await tunnels[b].close()
                return spare_id, after, took

        spare_id, after, took = run(kill_under_traffic())
        print(f"the spare owned the dead instance's {len(lost)} bots {took:.1f} s after the kill")
        for b in lost:
            assert after[b][0] == spare_id and after[b][1] > owners[b][1], (b, owners[b], after[b])
        for b in set(bots) - set(lost):
            assert after[b] == owners[b], "a bot of a live instance changed hands"
        run(everyone(3))
        # Every acknowledged message reached the log once, read through another instance.
        survivor = running[(victim + 1) % 3]
        log = read_log(survivor, relay)
        assert [m["data"]["body"] for m in messages_received(log)] == bodies, log
        for b in lost:
            assert spare.get(f"/v1/bots/{b}")[1]["fingerprints"] == fingerprints[b]

        # The spare closed the dead instance's rows of the bots it took (the others would once
        # its heartbeat is old enough).
        deadline = time.monotonic() + 40
        left = None
        while time.monotonic() < deadline:
            left = postgres.psql(f"SELECT count(*) FROM tunnels WHERE instance_id = '{ids[victim]}' "
                                 "AND state != 'closed'", database=database)
            if left == "0":
                break
            time.sleep(1)
        assert left == "0", f"{left} tunnel rows of the dead instance still open"
        closed = postgres.psql(f"SELECT count(*) FROM tunnels WHERE instance_id = '{ids[victim]}' "
                               "AND close_reason = 'instance_lost'", database=database)
        assert int(closed) == len(lost) + 1, (closed, lost)

        # The survivors stayed connected all along, over many ping intervals.
        for i in set(range(3)) - {victim}:
            assert running[i].get("/readyz", token=False)[0] == 200
            log = running[i].log_path.read_text(errors="replace")
            assert "component link lost" not in log, running[i].diagnostics()
    finally:
        logs = [c.log_path.read_text(errors="replace") for c in comps if c.log_path.exists()]
        for comp in comps:
            comp.cleanup()
        assert not any(PASSWORD in log for log in logs), "the store password is in a component's log"


def test_any_instance_reads_events_and_sends_once_per_key_for_a_bot_another_runs(balanced, postgres):
    """An `api` bot runs on one of three instances: its event stream and its log, read through
    another one, hold what a peer sent it, live; one Idempotency-Key sent through two other
    instances makes one message."""
    users = Users(balanced)
    comps, database = _instances(balanced, postgres, 3)
    try:
        for comp in comps:
            comp.start()
        ids = [comp.get("/v1/instances")[1]["this"] for comp in comps]
        bot = new_api_bot(comps[0], "relay")
        owners = _wait_for_owners(postgres, database, [bot], timeout=20)
        owner = ids.index(owners[bot][0])
        first, second = (comps[(owner + 1) % 3], comps[(owner + 2) % 3])
        cert = first.get(f"/v1/bots/{bot}/certificate")[1]

        async def scenario():
            async with users.client("alice") as alice, users.client("bob") as bob:
                tunnel = await alice.open_tunnel(bot)
                sse = await call(SseStream, first.base_url, f"/v1/bots/{bot}/events", first.token)
                assert sse.status == 200, sse.error_body
                await tunnel.send_message("hello through the owner")
                streamed = await call(sse.take_until, lambda e: e.event == "message.received", 15)
                sse.close()
                assert streamed[-1].json["data"]["body"] == "hello through the owner", streamed
                poller = EventPoller(first, bot)
                got = await poller.until(messages_received, 15, "the message alice sent")
                assert [e["data"]["body"] for e in got] == ["hello through the owner"], got

                bob.serve({bot: cert["pem"]}, auto_reply=None)
                key = uuid.uuid4().hex
                status, one = await call(post_message, first, bot, {"to": bob.jid, "body": "once"}, key=key)
                assert status == 202, one
                status, two = await call(post_message, second, bot, {"to": bob.jid, "body": "once"}, key=key)
                assert status == 202 and two["id"] == one["id"], (one, two)
                from_bot = await bob.next_tunnel(timeout=15)
                assert await from_bot.recv_message(timeout=10) == "once"
                await tunnel.close()

                # A tunnel by its id, through an instance that does not run it: closed by the
                # owner; and one opened through another such instance.
                status, rows = await call(second.get, "/v1/tunnels?" + urllib.parse.urlencode(
                    {"bot": bot, "state": "open"}, safe="@"))
                assert status == 200, rows
                rows = rows.get("tunnels") if isinstance(rows, dict) else rows
                [row] = [r for r in rows if r["peer"] == bob.jid]
                status, closing = await call(second.delete, f"/v1/tunnels/{row['id']}")
                assert status == 202, (closing, from_bot.state, [
                    line for line in comps[owner].log_path.read_text().splitlines() if row["id"] in line])
                for _ in range(100):
                    if from_bot.state == "closed":
                        break
                    await asyncio.sleep(0.1)
                assert from_bot.state == "closed" and from_bot.closed_by_peer, from_bot.state
                status, opening = await call(first.post, "/v1/tunnels", {"bot": bot, "peer": bob.jid})
                assert status == 202 and opening["bot"] == bot, opening
                again = await bob.next_tunnel(timeout=15)
                await again.wait_open(timeout=15)

        run(scenario(), 60)
        count = postgres.psql(f"SELECT count(*) FROM messages WHERE bot_jid = '{bot}'", database=database)
        assert count == "1", count
    finally:
        for comp in comps:
            comp.cleanup()


def test_a_replacement_delivers_the_webhooks_its_dead_predecessor_left_pending(balanced, postgres):
    """An `api` bot's webhook receiver goes down after three deliveries; three more messages
    arrive, acknowledged and pending; the bot's instance is SIGKILLed and a spare takes it
    over. Once the receiver is back, it gets the three pending ones, in order, and none of
    those it had acknowledged again."""
    users = Users(balanced)
    comps, database = _instances(balanced, postgres, 4)
    running, spare = comps[:3], comps[3]
    receiver = WebhookReceiver()
    try:
        for comp in running:
            comp.start()
        ids = [comp.get("/v1/instances")[1]["this"] for comp in running]
        bot = new_api_bot(running[0], "hooked")
        owner = ids.index(_wait_for_owners(postgres, database, [bot], timeout=20)[bot][0])
        other = running[(owner + 1) % 3]
        put_webhook(other, bot, receiver, timeout_ms=2000)
        bodies = [f"pending {i}" for i in range(6)]

        async def scenario():
            async with users.client("alice") as alice:
                tunnel = await alice.open_tunnel(bot)
                for body in bodies[:3]:
                    await tunnel.send_message(body)
                await call(receiver.wait_for, lambda r: len(r.acked("message.received")) == 3, 15,
                           "the first three messages")
                receiver.stop()
                for body in bodies[3:]:
                    await tunnel.send_message(body)
                await tunnel.flush(timeout=15)  # acknowledged: stored, pending delivery
                running[owner].kill()
                await asyncio.to_thread(spare.start, 60)
                spare_id = spare.get("/v1/instances")[1]["this"]
                await asyncio.to_thread(_wait_for_owners, postgres, database, [bot], 30, ids[owner])
                assert _owners(postgres, database)[bot][0] == spare_id
                receiver.start()  # up again, same port
                await call(receiver.wait_for, lambda r: len(r.acked("message.received")) == 6, 30,
                           "the three pending messages, from the spare")

        run(scenario(), 90)
        assert receiver.invalid() == []
        assert delivery_problems(receiver.deliveries) == []
        assert receiver.acked_bodies() == bodies, "webhook deliveries lost, repeated or reordered"
    finally:
        receiver.stop()
        for comp in comps:
            comp.cleanup()

