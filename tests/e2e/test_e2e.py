"""End-to-end tests: a real Prosody, the xtls-component binary, and a Python XTLS peer.

Alice, Bob and Mallory log in over c2s and talk XTLS (docs/protocol.md §1) to the
component's echo bot `echo@bots.localhost`; the admin API is checked over real HTTP.
The walking path runs against ejabberd as well (its own server, component and users).
Order matters only at the end: the Prosody restart and the unauthenticated DELETEs
run last so that a failure there cannot break the other tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import time
import urllib.parse
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from component import binary_path
from conftest import BOT, run
from xtls_client import Identity, XtlsError, cert_sha256, spki_sha256, xmpp_addrs

START = "<start xmlns='urn:xmpp:tmp:xtls'/>"
CLOSE = "<close xmlns='urn:xmpp:tmp:xtls'/>"


def data(payload: str) -> str:
    return f"<data xmlns='urn:xmpp:tmp:xtls'>{payload}</data>"


def tunnels_of(component, bot: str = BOT) -> list[dict]:
    """GET /v1/tunnels?bot=..; the tunnel list (a JSON array, or an object with `tunnels`)."""
    status, body = component.get("/v1/tunnels?" + urllib.parse.urlencode({"bot": bot}, safe="@"))
    assert status == 200, f"GET /v1/tunnels -> {status}: {body!r}"
    listing = body.get("tunnels") if isinstance(body, dict) else body
    assert isinstance(listing, list), f"GET /v1/tunnels: no tunnel list in {body!r}"
    return listing


def new_echo_bot(component, prefix: str) -> str:
    """Create an echo bot with a fresh localpart; return its bare JID."""
    status, made = component.post("/v1/bots", {"localpart": f"{prefix}{uuid.uuid4().hex[:6]}", "handler": "echo"})
    assert status == 201, made
    return made["jid"]


def tunnel_of_peer(component, peer: str) -> dict:
    rows = [t for t in tunnels_of(component) if t.get("peer") == peer]
    assert len(rows) == 1, f"expected one tunnel with peer {peer}, got {rows!r}"
    return rows[0]


async def echo_roundtrip(tunnel, body: str) -> None:
    await tunnel.send_message(body)
    got = await tunnel.recv_message(timeout=10)
    assert got == body, f"echo bot answered {got!r} to {body!r}"

async def gets_in(users, name: str, bot: str, identity=None, *, echo: bool = False) -> bool:
    """Whether `name` (with `identity`, else the session's key) opens a tunnel to `bot`; a
    refusal must be the trust mode's (`not-acceptable` on the data carrying the Finished)."""
    async with users.client(name, identity=identity) as client:
        try:
            tunnel = await client.open_tunnel(bot)
        except XtlsError as refused:
            assert (refused.request, refused.condition) == ("data", "not-acceptable"), refused
            return False
        if echo:
            await echo_roundtrip(tunnel, "in")
        await tunnel.close()
        return True



def walking_path(component, users, capsys) -> None:
    """Certificate from the admin API, tunnel, 100 echoes in order, tunnel table, close:
    through whichever server `component` and `users` are connected to."""
    status, cert = component.get(f"/v1/bots/{BOT}/certificate")
    assert status == 200, f"GET certificate -> {status}: {cert!r}"
    missing = {"jid", "pem", "spki_sha256", "cert_sha256", "cert_sha1", "not_before", "not_after"} - set(cert)
    assert not missing, f"certificate JSON lacks {missing}: {cert!r}"
    assert cert["jid"] == BOT
    der = x509.load_pem_x509_certificate(cert["pem"].encode()).public_bytes(serialization.Encoding.DER)
    assert spki_sha256(der) == cert["spki_sha256"], "spki_sha256 does not match the PEM"
    assert cert_sha256(der) == cert["cert_sha256"], "cert_sha256 does not match the PEM"
    sha1_colon = ":".join(f"{b:02X}" for b in hashlib.sha1(der).digest())
    assert sha1_colon == cert["cert_sha1"], "cert_sha1 does not match the PEM"
    # The form offers carry (docs/protocol.md §2.4): lowercase hex, no separators.
    assert cert["offer"] == {"sha1": hashlib.sha1(der).hexdigest(),
                             "sha256": hashlib.sha256(der).hexdigest()}, cert["offer"]
    assert xmpp_addrs(der) == [BOT], "the bot certificate must carry exactly one XmppAddr = its JID"

    async def scenario():
        async with users.client("alice") as alice:
            tunnel = await alice.open_tunnel(BOT)
            assert tunnel.proceed_seen, "result to <start/> without <proceed/> (spec §1.5)"
            assert tunnel.peer_cert_der == der, "the bot presented another certificate than the API shows"
            assert tunnel.spki_sha256() == cert["spki_sha256"]
            assert tunnel.peer_xmpp_addrs() == [BOT]

            bodies = [f"message {i}: hello through XTLS" for i in range(100)]

            async def send_all():
                for body in bodies:
                    await tunnel.send_message(body)

            started = time.monotonic()
            sender = asyncio.create_task(send_all())
            received = [await tunnel.recv_message(timeout=15) for _ in bodies]
            await sender
            elapsed = time.monotonic() - started
            assert received == bodies, "echoes missing, changed or out of order"

            row = tunnel_of_peer(component, alice.jid)
            assert row.get("state") == "open", row
            assert row.get("role") == "responder", row
            assert (row.get("peer_identity") or {}).get("spki_sha256") == alice.spki_sha256(), row
            assert isinstance(row.get("stanzas_in"), int) and row["stanzas_in"] >= 100, row

            await tunnel.close()
            assert tunnel.state == "closed"
            deadline = time.monotonic() + 5
            while (row := tunnel_of_peer(component, alice.jid)).get("state") != "closed":
                assert time.monotonic() < deadline, f"tunnel not listed as closed after <closed/>: {row}"
                await asyncio.sleep(0.1)
            return tunnel.handshake_seconds, elapsed

    handshake, elapsed = run(scenario())
    server = type(users.server).__name__
    with capsys.disabled():
        print(
            f"\n[e2e] {server}: handshake (start sent -> open): {handshake * 1000:.1f} ms; "
            f"100 messages echoed in {elapsed:.3f} s = {100 / elapsed:.0f} messages/s"
        )


def test_walking_path(component, users, capsys):
    """The walking path through Prosody."""
    walking_path(component, users, capsys)


def test_walking_path_ejabberd(ejabberd_component, ejabberd_users, capsys):
    """The same walking path through ejabberd (component on its `ejabberd_service` listener)."""
    walking_path(ejabberd_component, ejabberd_users, capsys)


def test_start_to_unknown_bot(component, users):
    async def scenario():
        async with users.client("alice") as alice:
            reply = await alice.send_raw_iq("nobody@bots.localhost", START)
            assert (reply.condition, reply.error_type) == ("service-unavailable", "cancel"), reply

    run(scenario())


def test_data_and_close_without_tunnel(component, users):
    async def scenario():
        async with users.client("alice") as alice:
            reply = await alice.send_raw_iq(BOT, data("FgMBAAA="))
            assert (reply.condition, reply.error_type) == ("item-not-found", "cancel"), reply
            reply = await alice.send_raw_iq(BOT, CLOSE)
            assert (reply.condition, reply.error_type) == ("item-not-found", "cancel"), reply

    run(scenario())


@pytest.mark.parametrize("bad", ["ab=c", "*"])
def test_bad_base64_kills_only_its_tunnel(component, users, bad):
    """bad-request for bad base64 (spec §1.7 rule 1); Bob's tunnel beside it keeps echoing."""

    async def scenario():
        async with users.client("bob") as bob, users.client("alice") as alice:
            bob_tunnel = await bob.open_tunnel(BOT)
            await echo_roundtrip(bob_tunnel, "before")

            reply = await alice.send_raw_iq(BOT, START)
            assert reply.condition == "result", reply
            reply = await alice.send_raw_iq(BOT, data(bad))
            assert (reply.condition, reply.error_type) == ("bad-request", "cancel"), reply
            reply = await alice.send_raw_iq(BOT, data("FgMBAAA="))
            assert reply.condition == "item-not-found", f"tunnel still alive after bad-request: {reply}"

            await echo_roundtrip(bob_tunnel, "after")
            await bob_tunnel.close()

    run(scenario())


def test_foreign_xmppaddr_is_not_acceptable(component, users):
    """Mallory presenting alice's JID in her certificate is refused (spec §2.3, §1.11)."""

    async def scenario():
        async with users.client("mallory", cert_jid="alice@localhost") as mallory:
            try:
                await mallory.open_tunnel(BOT)
            except XtlsError as refused:
                assert refused.request == "data", refused
                assert (refused.condition, refused.error_type) == ("not-acceptable", "cancel"), refused
            else:
                pytest.fail("mallory presenting a certificate with XmppAddr alice@localhost was admitted")
        # Control: the same account with an honest certificate is admitted.
        async with users.client("mallory") as mallory:
            tunnel = await mallory.open_tunnel(BOT)
            await echo_roundtrip(tunnel, "honest now")
            await tunnel.close()

    run(scenario())


def test_changed_key_is_refused_under_tofu(component, users):
    """The echo bot trusts on first use: a second key for the same JID is refused (spec §2.3)."""

    async def scenario():
        async with users.client("bob") as bob:  # pins bob's session key if not yet pinned
            tunnel = await bob.open_tunnel(BOT)
            await echo_roundtrip(tunnel, "my usual key")
            await tunnel.close()
        async with users.client("bob", identity=Identity.generate("bob@localhost")) as bob:
            try:
                await bob.open_tunnel(BOT)
            except XtlsError as refused:
                assert (refused.request, refused.condition) == ("data", "not-acceptable"), refused
            else:
                pytest.fail("bob with a new key was admitted although another key is pinned for him")

    run(scenario())


def test_bot_answers_disco_and_presence(component, users):
    """disco#info lists XTLS (spec §1.4) and the bot's fingerprints; other IQs get
    service-unavailable; a subscriber sees the bot online."""

    async def scenario():
        async with users.client("bob") as bob:
            reply = await bob.send_raw_iq(BOT, "<query xmlns='http://jabber.org/protocol/disco#info'/>", itype="get")
            assert reply.condition == "result", reply
            assert "urn:xmpp:tmp:xtls" in reply.xml, reply.xml
            # The bot's fingerprint in-band (XEP-0128 form), as the admin API shows it.
            _, bot = component.get(f"/v1/bots/{BOT}")
            spki = bot["fingerprints"]["spki_sha256"]
            assert f"<field var=\"spki-sha256\"" in reply.xml.replace("'", '"'), reply.xml
            assert spki in reply.xml, reply.xml
            reply = await bob.send_raw_iq(BOT, "<query xmlns='jabber:iq:version'/>", itype="get")
            assert (reply.condition, reply.error_type) == ("service-unavailable", "cancel"), reply
            loop = asyncio.get_running_loop()
            online = loop.create_future()

            def on_available(p):
                if p["from"].bare == BOT and not online.done():
                    online.set_result(p)

            bob.xmpp.add_event_handler("presence_available", on_available)
            bob.xmpp.send_presence()  # presence reaches available resources only
            bob.xmpp.send_presence_subscription(pto=BOT)
            # Prosody turns the bot's `subscribed` into a roster push; its available presence
            # then reaches bob: the bot is online in his roster.
            await asyncio.wait_for(online, 10)

    run(scenario())


def test_bot_lifecycle_through_the_api(component, users):
    """Create a bot over HTTP, tunnel to it, close the tunnel and delete the bot over HTTP."""
    weather = "weather@bots.localhost"
    status, bot = component.post("/v1/bots", {"localpart": "weather", "handler": "echo", "peer_auth": "required"})
    assert status == 201, f"POST /v1/bots -> {status}: {bot!r}"
    assert bot["jid"] == weather and bot["handler"] == "echo", bot
    assert set(bot["fingerprints"]) == {"spki_sha256", "cert_sha256", "cert_sha1", "offer"}, bot
    assert component.post("/v1/bots", {"localpart": "weather", "handler": "echo"})[0] == 409
    assert component.post("/v1/bots", {"localpart": "bad/part", "handler": "echo"})[0] == 422
    assert component.post("/v1/bots", {"localpart": "x", "handler": "parrot"})[0] == 422
    assert component.get("/v1/bots/nobody@bots.localhost")[0] == 404
    assert component.get("/v1/tunnels/0000000000000000")[0] == 404
    assert weather in [b["jid"] for b in component.get("/v1/bots")[1]]

    async def scenario():
        async with users.client("alice") as alice:
            tunnel = await alice.open_tunnel(weather)
            assert tunnel.spki_sha256() == bot["fingerprints"]["spki_sha256"]
            await echo_roundtrip(tunnel, "weather?")
            row = tunnel_of_peer_for(component, weather, alice.jid)
            assert row["state"] == "open", row
            status, answer = component.delete(f"/v1/tunnels/{row['id']}")
            assert status == 202, f"DELETE tunnel -> {status}: {answer!r}"
            deadline = time.monotonic() + 10
            while tunnel.state not in ("closed", "failed"):
                assert time.monotonic() < deadline, f"bot did not close the tunnel: {tunnel.state}"
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 10
            while (row := component.get(f"/v1/tunnels/{row['id']}")[1])["state"] != "closed":
                assert time.monotonic() < deadline, row
                time.sleep(0.05)
            assert row["close_reason"].startswith("local_close"), row
            status, peers = component.get(f"/v1/bots/{weather}/peers")
            assert status == 200 and [p["jid"] for p in peers] == ["alice@localhost"], peers
            assert peers[0]["pins"][0]["spki_sha256"] == alice.spki_sha256(), peers

    run(scenario())
    assert component.delete(f"/v1/bots/{weather}")[0] == 204
    assert component.get(f"/v1/bots/{weather}")[0] == 404

    async def gone():
        async with users.client("alice") as alice:
            reply = await alice.send_raw_iq(weather, START)
            assert (reply.condition, reply.error_type) == ("service-unavailable", "cancel"), reply

    run(gone())


def tunnel_of_peer_for(component, bot: str, peer: str) -> dict:
    rows = [t for t in tunnels_of(component, bot) if t.get("peer") == peer and t.get("state") != "closed"]
    assert len(rows) == 1, f"expected one live tunnel of {peer} to {bot}: {rows}"
    return rows[0]


def test_reconnect_after_prosody_restart(component, prosody, users, capsys):
    prosody.stop()
    down = component.wait_not_ready(timeout=10)
    prosody.start()
    up = component.wait_ready(timeout=30)

    async def scenario():
        async with users.client("alice") as alice:
            tunnel = await alice.open_tunnel(BOT)
            await echo_roundtrip(tunnel, "after the restart")
            await tunnel.close()

    run(scenario())
    with capsys.disabled():
        print(f"\n[e2e] /readyz non-200 {down:.2f} s after Prosody stopped; 200 again {up:.2f} s after it restarted")


ADMIN_ROUTES = [
    ("GET", "/v1/bots"),
    ("POST", "/v1/bots"),
    ("GET", f"/v1/bots/{BOT}"),
    ("DELETE", f"/v1/bots/{BOT}"),
    ("GET", f"/v1/bots/{BOT}/certificate"),
    ("GET", f"/v1/bots/{BOT}/peers"),
    ("GET", "/v1/tunnels"),
    ("GET", "/v1/tunnels/1"),
    ("DELETE", "/v1/tunnels/1"),
]


def test_admin_api_requires_token(component):
    assert component.get("/healthz", token=False)[0] == 200
    wrong = []
    for method, path in ADMIN_ROUTES:
        body = {"localpart": "intruder", "handler": "echo"} if method == "POST" else None
        for token in (False, "not-the-token"):
            status, answer = component.request(method, path, token=token, body=body)
            if status != 401:
                wrong.append(f"{method} {path} with token={token!r} -> {status} {answer!r}")
    assert not wrong, "routes not answering 401:\n" + "\n".join(wrong)
    status, bot = component.get(f"/v1/bots/{BOT}")
    assert status == 200, f"echo bot gone after unauthenticated requests: {status} {bot!r}"


def test_a_changed_key_gets_in_once_approved_over_http(component, users):
    """Trust on first use pins mallory's key; her new device's key is refused until the bot's
    backend approves it over HTTP (a bot token), after which both keys get in; a removed key
    is refused again; the audit log says who did what."""
    bot = new_echo_bot(component, "keys")
    status, issued = component.post(f"/v1/bots/{bot}/tokens")
    assert status == 201, issued
    token = issued["token"]
    first, second = users.identity("mallory"), Identity.generate("mallory@localhost")
    keys = f"/v1/bots/{bot}/peers/mallory@localhost/keys"

    async def refused(identity):
        async with users.client("mallory", identity=identity) as mallory:
            with pytest.raises(XtlsError) as err:
                await mallory.open_tunnel(bot)
            assert (err.value.request, err.value.condition) == ("data", "not-acceptable"), err.value

    async def admitted(identity, text):
        async with users.client("mallory", identity=identity) as mallory:
            tunnel = await mallory.open_tunnel(bot)
            await echo_roundtrip(tunnel, text)
            await tunnel.close()

    run(admitted(first, "first use"))
    run(refused(second))
    new_key = spki_sha256(second.cert_der)
    status, pin = component.request("PUT", f"{keys}/{new_key}", token=token, body={"compared": new_key})
    assert status == 201 and pin["verified"], pin
    run(admitted(second, "my new device"))
    run(admitted(first, "my old device still works"))
    old_key = spki_sha256(first.cert_der)
    status, _ = component.request("DELETE", f"{keys}/{old_key}", token=token)
    assert status == 204
    run(refused(first))

    status, log = component.get(f"/v1/audit?bot={urllib.parse.quote(bot)}")
    assert status == 200, log
    actor = f"bot-token:{issued['id']}"
    assert [(e["action"], e["actor"], e["spki_sha256"]) for e in log["entries"]] == [
        ("removed", actor, old_key),
        ("verified", actor, new_key),
        ("pinned_on_first_use", "component", old_key),
    ]


def test_the_fingerprint_subcommand_prints_what_the_api_shows(component):
    """`xtls-component fingerprint` reads the store offline, beside the running component."""
    _, bot = component.get(f"/v1/bots/{BOT}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XTLS_")}
    command = [str(binary_path()), "fingerprint", "--config", str(component.config_path)]
    done = subprocess.run([*command, "echo", "--json"], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["jid"] == BOT
    for key in ("spki_sha256", "cert_sha256", "cert_sha1"):
        assert printed[key] == bot["fingerprints"][key], key
    person = subprocess.run([*command, BOT], capture_output=True, text=True, timeout=30, env=env)
    assert person.returncode == 0 and bot["fingerprints"]["spki_sha256"] in person.stdout, person
    missing = subprocess.run([*command, "nobody"], capture_output=True, text=True, timeout=30, env=env)
    assert missing.returncode == 1 and "nobody@" in missing.stderr, missing


def test_manual_and_verified_only_admit_only_keys_someone_decided_on(component, users):
    """`manual`: an unknown key is refused and reported (peer.identity_new, accepted false)
    until approved over HTTP; `verified_only` (set on the running bot) then refuses the
    approved key until someone verifies it."""
    from botapi_helpers import poll_events

    status, made = component.post("/v1/bots", {"localpart": f"gate{uuid.uuid4().hex[:6]}", "handler": "api",
                                               "trust": "manual"})
    assert status == 201 and made["trust"] == "manual", made
    bot = made["jid"]
    mallory = users.identity("mallory")
    key = spki_sha256(mallory.cert_der)
    keys = f"/v1/bots/{bot}/peers/mallory@localhost/keys"

    def opens():
        return gets_in(users, "mallory", bot)

    def waiting_keys() -> list[str]:
        _, body = poll_events(component, bot, after=0, limit=1000)
        return [e["data"]["spki_sha256"] for e in body["events"]
                if e["type"] == "peer.identity_new" and e["data"]["accepted"] is False]

    assert not run(opens()), "manual: an unknown key is refused"
    assert waiting_keys() == [key], "and reported with the key to approve"
    status, _ = component.request("PUT", f"{keys}/{key}", body={})
    assert status == 201
    assert run(opens()), "approved: it gets in"

    status, patched = component.request("PATCH", f"/v1/bots/{bot}", body={"trust": "verified_only"})
    assert status == 200 and patched["trust"] == "verified_only", patched
    assert not run(opens()), "verified_only: approved is not enough"
    assert waiting_keys() == [key, key]
    status, pin = component.request("PUT", f"{keys}/{key}", body={"compared": key})
    assert status == 200 and pin["verified"], pin
    assert run(opens()), "verified: it gets in"


def test_private_keys_are_unreadable_without_the_store_key(prosody):
    """The store seals every bot's private key with a key file of its own (mode 0600, made on
    first start): the database alone yields no private key, and without the key file the
    component refuses to start, saying why, instead of running with unreadable bots."""
    import sqlite3
    import stat

    from component import Component

    comp = Component(prosody, domain=prosody.api_component_domain)
    try:
        comp.start()
        _, bots = comp.get("/v1/bots")
        assert bots, "the config declares a bot"
        comp.stop()
        key_file = comp.store_path.with_name(comp.store_path.name + ".key")
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        with sqlite3.connect(comp.store_path) as db:
            stored = [bytes(row[0]) for row in db.execute("SELECT key_der FROM bot_keys")]
        assert stored and all(value.startswith(b"xk1\0") for value in stored), "sealed"
        assert all(b"\x30\x81" not in value[:40] for value in stored), "no PKCS#8 header in sight"
        assert "created a new store key" in comp.log_path.read_text()

        hidden = key_file.with_name("moved-away.key")
        key_file.rename(hidden)
        try:
            with pytest.raises(RuntimeError, match="exited"):
                comp.start(timeout=15)
            log = comp.log_path.read_text()
            assert "restore the key file" in log, comp.diagnostics()
            assert not key_file.exists(), "no new key that would open nothing"
        finally:
            hidden.rename(key_file)
        comp.start()
        assert comp.get("/v1/bots")[1] == bots, "the same bots and keys with the key back"
    finally:
        comp.cleanup()


def test_a_peer_of_its_own_trust_mode_meets_it_on_its_next_tunnel(component, users):
    """A `tofu` bot with `manual` set for one peer refuses that peer's unknown key; cleared,
    the bot's trust on first use admits it."""
    status, made = component.post("/v1/bots", {"localpart": f"own{uuid.uuid4().hex[:6]}", "handler": "echo"})
    assert status == 201 and made["trust"] == "tofu", made
    bot = made["jid"]
    peer = f"/v1/bots/{bot}/peers/mallory@localhost"

    def opens():
        return gets_in(users, "mallory", bot, echo=True)

    status, view = component.request("PUT", peer, body={"trust": "manual"})
    assert status == 200 and view["effective_trust"] == "manual", view
    assert not run(opens())
    status, view = component.request("PUT", peer, body={"trust": None})
    assert status == 200 and view["effective_trust"] == "tofu", view
    assert run(opens())
    status, view = component.get(peer)
    assert status == 200 and len(view["keys"]) == 1, view


def test_a_rotated_certificate_is_announced_then_served_and_open_tunnels_keep_working(component, users):
    """A rotation with an overlap is announced in the API and in disco#info while tunnels still
    get the active certificate; once active, new tunnels get the new one (same key: pins hold),
    a tunnel opened before keeps echoing, and the old certificate is listed as retired."""
    bot = new_echo_bot(component, "rot")
    path = f"/v1/bots/{bot}/certificate"
    _, first = component.get(path)
    first_der = x509.load_pem_x509_certificate(first["pem"].encode()).public_bytes(serialization.Encoding.DER)

    def disco_fields(xml: str) -> dict[str, str]:
        import xml.etree.ElementTree as ET

        ns = {"x": "jabber:x:data"}
        form = ET.fromstring(xml).find(".//x:x", ns)
        assert form is not None, xml
        return {f.get("var"): f.findtext("x:value", namespaces=ns) for f in form.findall("x:field", ns)}

    async def scenario():
        async with users.client("alice") as alice, users.client("bob") as bob:
            before = await alice.open_tunnel(bot)
            assert before.peer_cert_der == first_der
            await echo_roundtrip(before, "before the rotation")

            status, announced = component.post(f"{path}/rotate", {"overlap_secs": 3600})
            assert status == 200, announced
            nxt = announced["next"]
            assert nxt and nxt["spki_sha256"] == first["spki_sha256"] and not nxt["new_key"], announced
            assert announced["cert_sha256"] == first["cert_sha256"], "active until the overlap ends"
            reply = await bob.send_raw_iq(bot, "<query xmlns='http://jabber.org/protocol/disco#info'/>", itype="get")
            fields = disco_fields(reply.xml)
            assert fields["cert-sha256"] == first["cert_sha256"], fields
            assert fields["next-cert-sha256"] == nxt["cert_sha256"], fields
            assert fields["next-spki-sha256"] == nxt["spki_sha256"], fields
            assert fields["next-active-at"] == nxt["active_at"], fields
            during = await bob.open_tunnel(bot)
            assert during.peer_cert_der == first_der, "the next certificate is served before its time"
            await during.close()

            status, active = component.post(f"{path}/rotate", {"overlap_secs": 0})
            assert status == 200, active
            assert active["next"] is None and active["spki_sha256"] == first["spki_sha256"], active
            assert active["cert_sha256"] != first["cert_sha256"], active
            assert [r["cert_sha256"] for r in active["retired"]] == [first["cert_sha256"]], active
            new_der = x509.load_pem_x509_certificate(active["pem"].encode()).public_bytes(serialization.Encoding.DER)
            after = await bob.open_tunnel(bot)
            assert after.peer_cert_der == new_der, "new tunnels get the active certificate"
            assert after.spki_sha256() == first["spki_sha256"], "the key, and so the pin, is the same"
            await echo_roundtrip(after, "after the rotation")
            await after.close()
            await echo_roundtrip(before, "the tunnel opened before still works")
            await before.close()
            reply = await bob.send_raw_iq(bot, "<query xmlns='http://jabber.org/protocol/disco#info'/>", itype="get")
            fields = disco_fields(reply.xml)
            assert fields["cert-sha256"] == active["cert_sha256"] and "next-cert-sha256" not in fields, fields

    run(scenario())
    status, log = component.get(f"/v1/audit?bot={urllib.parse.quote(bot)}")
    assert status == 200, log
    assert [e["action"] for e in log["entries"] if e["action"].startswith("certificate_")] == [
        "certificate_activated", "certificate_rotated", "certificate_rotated",
    ], log
    component.delete(f"/v1/bots/{bot}")


async def closed_by_the_bot(tunnel, when: str, timeout: float = 10.0) -> None:
    """Wait until the bot closed `tunnel` (its <close/>, or the tunnel ended)."""
    deadline = time.monotonic() + timeout
    while not tunnel.closed_by_peer and tunnel.state not in ("closed", "failed"):
        assert time.monotonic() < deadline, f"the bot kept the tunnel open {when}: {tunnel.state}"
        await asyncio.sleep(0.05)


def sas_of(component, tunnel_id: str) -> dict | None:
    status, row = component.get(f"/v1/tunnels/{tunnel_id}")
    assert status == 200, row
    return row.get("sas")


def test_short_authentication_strings_match_through_prosody_and_confirming_verifies_the_key(component, users):
    """A client on OpenSSL (pyOpenSSL's exporter) and the bot on rustls compute the same code
    from their TLS sessions, whichever side starts; confirming it over HTTP verifies the key."""
    bot = new_echo_bot(component, "sas")

    async def scenario():
        async with users.client("bob", tls="openssl") as bob:
            tunnel = await bob.open_tunnel(bot)
            tunnel_id = tunnel_of_peer_for(component, bot, bob.jid)["id"]
            # The person starts it from the client.
            code, digits = await tunnel.start_sas()
            shown = sas_of(component, tunnel_id)
            assert shown["state"] == "ready" and shown["started_by"] == "peer", shown
            assert (shown["sas28x5"], shown["decimal"]) == (code, digits), (shown, code, digits)
            status, wrong = component.post(f"/v1/tunnels/{tunnel_id}/sas/confirm", {"code": "aaaaa"})
            assert status == 422, wrong
            status, confirmed = component.post(f"/v1/tunnels/{tunnel_id}/sas/confirm", {"code": code})
            assert status == 200 and confirmed["state"] == "confirmed", confirmed
            await echo_roundtrip(tunnel, "the exchange left the tunnel as it was")

            # The bot starts it (its backend or operator, over HTTP).
            status, started = component.post(f"/v1/tunnels/{tunnel_id}/sas")
            assert status == 200 and started["state"] == "exchanging", started
            code2 = await tunnel.answer_sas()
            deadline = time.monotonic() + 5
            while (shown := sas_of(component, tunnel_id))["state"] != "ready":
                assert time.monotonic() < deadline, shown
                await asyncio.sleep(0.05)
            assert shown["started_by"] == "bot" and (shown["sas28x5"], shown["decimal"]) == code2, shown
            assert code2 != (code, digits), "fresh nonces, another code"
            await tunnel.close()

    run(scenario())
    status, pins = component.get(f"/v1/bots/{bot}/peers/bob@localhost/keys")
    assert status == 200, pins
    assert pins and pins[0]["verified"] and pins[0]["compared"].startswith("sas:"), pins
    component.delete(f"/v1/bots/{bot}")


def test_a_nonce_changed_in_transit_gives_codes_that_differ_and_rejecting_closes(component, users):
    """What a man in the middle would cause: the client uses another nonce than the bot sent.
    The two codes differ, the person rejects it over HTTP, and the bot closes the tunnel."""
    bot = new_echo_bot(component, "sasx")

    async def scenario():
        async with users.client("bob", tls="openssl") as bob:
            tunnel = await bob.open_tunnel(bot)
            tunnel_id = tunnel_of_peer_for(component, bot, bob.jid)["id"]
            code = await tunnel.start_sas(tamper_their_nonce=True)
            shown = sas_of(component, tunnel_id)
            assert shown["state"] == "ready", shown
            assert (shown["sas28x5"], shown["decimal"]) != code, (shown, code)
            status, rejected = component.post(f"/v1/tunnels/{tunnel_id}/sas/reject")
            assert status == 200 and rejected["state"] == "rejected", rejected
            await closed_by_the_bot(tunnel, "after the rejected code")

    run(scenario())
    status, pins = component.get(f"/v1/bots/{bot}/peers/bob@localhost/keys")
    assert pins and not pins[0]["verified"], pins
    component.delete(f"/v1/bots/{bot}")


def test_a_pairing_code_lets_a_new_key_into_a_verified_only_bot_and_a_wrong_one_does_not(component, users):
    """The operator mints a code; the person types it into a client on OpenSSL; SPAKE2 runs
    through Prosody against the bot's rustls tunnel. The right code verifies the key (the bot
    admitted it for pairing alone until then) and proves the bot knew the code; a wrong code
    is refused, closes the tunnel and pins nothing."""
    status, made = component.post("/v1/bots", {"localpart": f"pair{uuid.uuid4().hex[:6]}", "handler": "echo",
                                                "trust": "verified_only"})
    assert status == 201, made
    bot = made["jid"]
    status, minted = component.post(f"/v1/bots/{bot}/peers/bob@localhost/pairing", {"ttl_secs": 300})
    assert status == 201 and len(minted["code"]) == 11 and minted["attempts"] == 3, minted
    status, wrong = component.post(f"/v1/bots/{bot}/peers/mallory@localhost/pairing")
    assert status == 201, wrong

    async def scenario():
        async with users.client("bob", tls="openssl") as bob:
            tunnel = await bob.open_tunnel(bot)
            assert tunnel_of_peer_for(component, bot, bob.jid)["peer_identity"]["trust"] == "pairing"
            await tunnel.send_message("before pairing")  # dropped: the bot sees nothing yet
            await tunnel.pair(minted["code"].lower().replace("-", " "))
            await echo_roundtrip(tunnel, "paired")
            await tunnel.close()
        async with users.client("bob", tls="openssl") as bob:
            again = await bob.open_tunnel(bot)  # verified now: admitted like any verified key
            await echo_roundtrip(again, "no code needed any more")
            await again.close()
        async with users.client("mallory", tls="openssl") as mallory:
            tunnel = await mallory.open_tunnel(bot)
            with pytest.raises(XtlsError) as refused:
                await tunnel.pair("00000-00000" if wrong["code"] != "00000-00000" else "11111-11111")
            assert refused.value.condition == "not-authorized", refused.value
            await closed_by_the_bot(tunnel, "after the wrong pairing code")

    run(scenario())
    _, keys = component.get(f"/v1/bots/{bot}/peers/bob@localhost/keys")
    assert [(k["verified"], k["compared"]) for k in keys] == [(True, "pairing")], keys
    _, keys = component.get(f"/v1/bots/{bot}/peers/mallory@localhost/keys")
    assert keys == [], keys
    # Spent, and the wrong one still has attempts left until revoked.
    status, _ = component.request("DELETE", f"/v1/bots/{bot}/peers/bob@localhost/pairing")
    assert status == 404
    status, _ = component.request("DELETE", f"/v1/bots/{bot}/peers/mallory@localhost/pairing")
    assert status == 204
    status, log = component.get(f"/v1/audit?bot={urllib.parse.quote(bot)}")
    assert [(e["action"], e["compared"]) for e in log["entries"]] == [("verified", "pairing")], log
    component.delete(f"/v1/bots/{bot}")
