"""The component on a PostgreSQL store (Debian's package, run privately by `postgres.py`),
through a real Prosody: the same bots, keys, pins and tunnels as on SQLite, kept across
restarts; one instance per store until several can share it; no password in any output."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from component import Component, binary_path
from conftest import run
from postgres import Postgres
from private_ca import PrivateCa
from test_e2e import gets_in, new_echo_bot, tunnels_of
from xmpp_server import free_port

PASSWORD = "pg-password-never-shown"


@pytest.fixture()
def pg_component(prosody, postgres):
    """A component on a fresh database, its URL carrying a password (trust auth ignores it)."""
    database = f"xtls_{free_port()}"
    postgres.psql(f"CREATE DATABASE {database}", database="postgres")
    url = f"postgres://postgres:{PASSWORD}@127.0.0.1:{postgres.port}/{database}"
    comp = Component(prosody, domain=prosody.api_component_domain, bots="", store_url=url)
    try:
        comp.start()
        yield comp, database
    finally:
        log = comp.log_path.read_text(errors="replace") if comp.log_path.exists() else ""
        comp.cleanup()
        assert PASSWORD not in log, "the store password is in the component's log"


def test_bots_keys_and_pins_live_in_postgres_and_survive_a_restart(pg_component, postgres, users):
    comp, database = pg_component
    bot = new_echo_bot(comp, "pg")
    status, before = comp.get(f"/v1/bots/{bot}")
    assert status == 200, before
    assert run(gets_in(users, "alice", bot, echo=True)), "alice reaches the bot and it echoes"
    assert postgres.psql(f"SELECT count(*) FROM peer_pins WHERE bot_jid = '{bot}'", database=database) == "1"
    assert postgres.psql(f"SELECT count(*) FROM bots WHERE jid = '{bot}'", database=database) == "1"

    comp.restart()
    status, after = comp.get(f"/v1/bots/{bot}")
    assert status == 200 and after["fingerprints"] == before["fingerprints"], (before, after)
    assert run(gets_in(users, "alice", bot, echo=True)), "the pin of the first run still lets alice in"
    assert postgres.psql(f"SELECT count(*) FROM peer_pins WHERE bot_jid = '{bot}'", database=database) == "1"
    closed = [t for t in tunnels_of(comp, bot) if t["state"] == "closed"]
    assert len(closed) == 2, tunnels_of(comp, bot)
    # The private key is sealed with the configured key, never stored in clear.
    # The offline command reads the same database, beside the running instance.
    printed = subprocess.run([str(binary_path()), "fingerprint", "--config", str(comp.config_path), bot, "--json"],
                             capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["spki_sha256"] == after["fingerprints"]["spki_sha256"]
    assert PASSWORD not in printed.stdout + printed.stderr
    magic = postgres.psql(f"SELECT encode(substr(key_der, 1, 4), 'hex') FROM bot_keys WHERE bot_jid = '{bot}'",
                          database=database)
    assert magic == b"xk1\0".hex(), magic


def test_a_second_instance_on_the_same_database_stops_at_once_and_says_why(pg_component, tmp_path):
    comp, database = pg_component
    config = comp.config_path.read_text()
    config = re.sub(r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{free_port()}"', config, count=1)
    second = tmp_path / "second.toml"
    second.write_text(config)
    done = subprocess.run([str(binary_path()), "serve", "--config", str(second)], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin", "RUST_LOG": "info"}, cwd=tmp_path)
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert "another xtls-component (connected from 127.0.0.1" in said, said
    assert "already serves the store postgres://postgres@127.0.0.1:" in said and f"/{database}" in said, said
    assert PASSWORD not in said, said
    assert comp.get("/readyz")[0] == 200
    assert comp.running()


def test_a_postgres_store_without_a_shared_key_is_refused_before_it_starts(prosody, postgres, tmp_path):
    config = tmp_path / "xtls.toml"
    config.write_text(f"""[component]
domain = "{prosody.api_component_domain}"
server = "127.0.0.1:{prosody.component_port}"
secret = "{prosody.component_secret}"
[admin]
listen = "127.0.0.1:{free_port()}"
token = "token-0123456789abcdef"
[store]
url = "postgres://postgres:{PASSWORD}@127.0.0.1:{postgres.port}/xtls"
""")
    done = subprocess.run([str(binary_path()), "serve", "--config", str(config)], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert "store.key" in said and "same for every instance" in said, said
    assert PASSWORD not in said, said


def test_tls_to_postgres_is_verified_against_the_ca_the_url_names(prosody, tmp_path):
    """`sslmode=verify-full&sslrootcert=CA` connects over TLS (the server takes TLS clients
    only) and checks the server's certificate; without that CA the start fails and says why."""
    ca = PrivateCa(tmp_path / "ca")
    server = Postgres(tls_ca=ca)
    try:
        server.start()
        url = f"postgres://postgres:{PASSWORD}@127.0.0.1:{server.port}/xtls?sslmode=verify-full&sslrootcert={ca.ca_file}"
        comp = Component(prosody, domain=prosody.api_component_domain, bots="", store_url=url)
        try:
            comp.start()
            bot = new_echo_bot(comp, "tls")
            assert server.psql(f"SELECT count(*) FROM bots WHERE jid = '{bot}'") == "1"
            over_tls = server.psql("SELECT DISTINCT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                                   "WHERE a.application_name = 'xtls-component'")
            assert over_tls == "t", over_tls
        finally:
            comp.cleanup()
        unverified = Component(prosody, domain=prosody.api_component_domain, bots="",
                               store_url=url.split("&sslrootcert=")[0])
        try:
            with pytest.raises(RuntimeError):
                unverified.start(timeout=20)
            said = unverified.log_path.read_text(errors="replace")
            assert "cannot use the store at postgres://postgres@127.0.0.1:" in said, said
            assert "certificate" in said.lower() or "unknown issuer" in said.lower(), said
            assert PASSWORD not in said, said
        finally:
            unverified.cleanup()
    finally:
        server.cleanup()


@pytest.mark.parametrize("server_name", ["prosody", "ejabberd"])
def test_a_standby_takes_over_when_the_active_instance_dies(server_name, request, postgres):
    """Prosody takes one connection per component domain (and ejabberd, without
    domain_balancing, would split stanzas between connections), so two instances on one store
    run as active and standby (`instances.mode = "failover"`). SIGKILL the active one: the
    standby takes the store's lock, connects, and serves the same bots with the same keys
    and pins; the old instance, started again, waits as the standby."""
    server = request.getfixturevalue(server_name)
    users = request.getfixturevalue("users" if server_name == "prosody" else "ejabberd_users")
    database = f"xtls_{free_port()}"
    postgres.psql(f"CREATE DATABASE {database}", database="postgres")
    url = f"postgres://postgres:{PASSWORD}@127.0.0.1:{postgres.port}/{database}"
    mode = '[instances]\nmode = "failover"\n'
    first = Component(server, domain=server.api_component_domain, bots="", store_url=url, extra_config=mode)
    second = Component(server, domain=server.api_component_domain, bots="", store_url=url,
                       store_key=first.store_key, extra_config=mode)
    # The first one says where its admin API is: the standby points there.
    first.config_path.write_text(first.config_path.read_text() + f'advertise_url = "{first.base_url}"\n')
    try:
        first.start()
        bot = new_echo_bot(first, "ha")
        _, before = first.get(f"/v1/bots/{bot}")
        assert run(gets_in(users, "alice", bot, echo=True))

        second.start(standby=True)
        status, ready = second.get("/readyz", token=False)
        problem = ready["component"]["problem"]
        assert status == 503 and "standby" in problem, ready
        _, listed = first.get("/v1/instances")
        assert listed["instances"][0]["admin_url"] == first.base_url, listed
        assert f"instance {listed['this']}" in problem and first.base_url in problem, problem
        assert second.get("/healthz", token=False)[0] == 200
        status, refused = second.get("/v1/bots")
        assert status == 503 and "standby" in refused["detail"], refused
        assert refused["detail"].endswith(f"serves the API at {first.base_url}"), refused

        async def kill_under_a_live_tunnel():
            async with users.client("bob") as client:
                await client.open_tunnel(bot)
                first.kill()
                return second.wait_ready(timeout=30)

        took = run(kill_under_a_live_tunnel())
        print(f"{server_name}: standby ready {took:.2f} s after the active instance was killed")
        status, after = second.get(f"/v1/bots/{bot}")
        assert status == 200 and after["fingerprints"] == before["fingerprints"], (before, after)
        assert run(gets_in(users, "alice", bot, echo=True)), "alice's pin from the first instance holds"
        pinned = postgres.psql(f"SELECT peer FROM peer_pins WHERE bot_jid = '{bot}' ORDER BY peer", database=database)
        assert pinned.split() == [f"alice@{server.host}", f"bob@{server.host}"], pinned
        rows = tunnels_of(second, bot)
        assert [t["state"] for t in rows] == ["closed"] * 3, rows
        # Bob's tunnel was open on the killed instance: closed for it, by the new one.
        lost = [t["peer"].split("@")[0] for t in rows if t["close_reason"] == "instance_lost"]
        assert lost == ["bob"], rows
        status, instances = second.get("/v1/instances")
        assert status == 200 and [i["id"] for i in instances["instances"]] == [instances["this"]], instances

        first.start(standby=True)
        assert second.get("/readyz", token=False)[0] == 200
    finally:
        logs = [c.log_path.read_text(errors="replace") for c in (first, second) if c.log_path.exists()]
        first.cleanup()
        second.cleanup()
        assert not any(PASSWORD in log for log in logs), "the store password is in a component's log"
