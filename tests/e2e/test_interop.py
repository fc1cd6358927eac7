"""The interoperability matrix of the other end, through Prosody and ejabberd with c2s TLS on
a private CA: the Python plugin (`clients/python`, OpenSSL) as a bot answering the `xtls`
client (rustls), as a client of the component's bot, and person to person with `xtls listen`.

The Python side runs the package's own examples as separate processes, as their README says.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import TLS_USERS, run
from test_xtls_cli import ECHO, Terminal, Xtls, json_event, new_bot

CLIENTS = Path(__file__).resolve().parents[2] / "clients" / "python"


class PythonPeer:
    """One of the package's examples as an account of the TLS server, with its own config dir."""

    def __init__(self, server, user: str, home: Path) -> None:
        self.env = dict(
            os.environ,
            PYTHONPATH=str(CLIENTS / "src"),
            XTLS_JID=f"{user}@{server.host}",
            XTLS_PASSWORD=TLS_USERS[user],
            XTLS_SERVER=f"127.0.0.1:{server.c2s_port}",
            XTLS_CA_FILE=str(server.ca.ca_file),
            XTLS_CONFIG_DIR=str(home),
        )

    def argv(self, example: str, *args: str) -> list[str]:
        return [sys.executable, str(CLIENTS / "examples" / example), *args]

    def run(self, example: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(example, *args), env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


def test_a_python_bot_answers_the_xtls_client_through_its_own_tunnel_and_codes_match(tls_server, homes):
    pybot = PythonPeer(tls_server, "pybot", homes / "pybot")
    bot = Terminal(pybot.argv("echo_bot.py"), pybot.env)
    try:
        online = bot.expect("; key ")
        full, bot_key = re.search(r"online as (\S+); key (\S+)", online).groups()
        carol = Xtls(tls_server, "carol", homes / "carol")
        done = carol.run("send", full, "hello, python")
        assert (done.returncode, done.stdout) == (0, "echo: hello, python\n"), done.stderr
        assert f"key {bot_key}" in done.stderr, done.stderr
        carol_key = json.loads(carol.run("whoami", "--json").stdout)["spki_sha256"]
        bot.expect(f"opened a tunnel; key {carol_key} (new)")
        assert [(k["jid"], k["spki_sha256"]) for k in carol.known()] == [(f"pybot@{tls_server.host}", bot_key)]

        chat = Terminal(carol.argv("chat", full), carol.env)
        chat.expect("/quit leave.")
        assert "known since" in chat.screen, chat.screen
        chat.type("/sas")
        screen = chat.expect("yes/no")
        code, digits = re.search(r"Short authentication string: (\w+) \((\d+)\)", screen).groups()
        bot.expect(f"compares the code {code} ({digits})")
        chat.type("yes")
        chat.expect("is now verified")
        chat.type("/quit")
        chat.expect("Closed.")
        assert chat.wait() == 0
    finally:
        os.kill(bot.pid, 15)
        bot.wait()


def test_a_python_client_talks_to_the_components_bot_and_to_a_person_running_xtls_listen(
        tls_component, tls_server, homes):
    carol = PythonPeer(tls_server, "carol", homes / "carol-python")
    done = carol.run("send.py", ECHO, "from python")
    assert (done.returncode, done.stdout) == (0, "from python\n"), done.stderr
    spki = tls_component.get(f"/v1/bots/{ECHO}/certificate")[1]["spki_sha256"]
    assert f"{ECHO}: key {spki} (new)" in done.stderr, done.stderr
    again = carol.run("send.py", ECHO, "again")
    assert again.returncode == 0 and f"key {spki} (known)" in again.stderr, again.stderr

    alice = Xtls(tls_server, "alice", homes / "alice")
    listener = Terminal(alice.argv("--json", "listen"), alice.env)
    full = json_event(listener, "online")["jid"]
    client = subprocess.Popen(carol.argv("send.py", full, "hello alice, from python"), env=carol.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listener.expect('"body":"hello alice, from python"')
    listener.type("hello carol, from xtls")
    out, err = client.communicate(timeout=60)
    assert (client.returncode, out) == (0, "hello carol, from xtls\n"), err
    alice_key = json.loads(alice.run("whoami", "--json").stdout)["spki_sha256"]
    assert f"key {alice_key} (new)" in err, err
    os.write(listener.fd, b"\x04")
    assert listener.wait() == 0


def test_the_python_client_compares_a_code_with_the_component_and_pairs_with_a_code(
        tls_component, tls_server, homes):
    """The plugin's own API, in this process: `start_sas()` gives the code the component shows,
    and `pair(code)` lets its key into a bot that admits verified keys only."""
    import slixmpp

    sys.path.insert(0, str(CLIENTS / "src"))
    import slixmpp_xtls  # noqa: F401  (registers the plugin)

    comp, host = tls_component, tls_server.host
    bot = new_bot(comp, "pysas")
    strict = new_bot(comp, "pypair", trust="verified_only")
    status, minted = comp.post(f"/v1/bots/{strict}/peers/carol@{host}/pairing", {"ttl_secs": 300})
    assert status == 201, minted
    home = homes / "carol-python"

    async def scenario():
        xmpp = slixmpp.ClientXMPP(f"carol@{host}", TLS_USERS["carol"])
        xmpp.register_plugin("xep_0030")
        xmpp.register_plugin("xtls", {"key_dir": str(home / "key"), "known_keys": str(home / "known_peers")})
        xmpp.ca_certs = str(tls_server.ca.ca_file)
        online = asyncio.get_running_loop().create_future()
        xmpp.add_event_handler("session_start", lambda _: online.done() or online.set_result(None))
        xmpp.connect("127.0.0.1", tls_server.c2s_port)
        await asyncio.wait_for(online, 30)
        try:
            tunnel = await xmpp.plugin["xtls"].open(bot)
            code = await tunnel.start_sas()
            (row,) = [t for t in comp.get(f"/v1/tunnels?bot={bot}")[1]
                      if t["peer"] == str(xmpp.boundjid.full) and t["state"] == "open"]
            sas = comp.get(f"/v1/tunnels/{row['id']}")[1]["sas"]
            assert (sas["sas28x5"], sas["decimal"]) == code and sas["started_by"] == "peer", (sas, code)
            await tunnel.close()
            assert tunnel.state == "closed", tunnel.reason

            paired = await xmpp.plugin["xtls"].open(strict)
            await paired.pair(minted["code"].lower())
            assert paired.key_status == "verified"
            await paired.send_message("paired from python")
            assert await paired.recv_message() == "paired from python"
            await paired.close()
        finally:
            await xmpp.disconnect()

    run(scenario())
    _, keys = comp.get(f"/v1/bots/{strict}/peers/carol@{host}/keys")
    assert [(k["verified"], k["compared"]) for k in keys] == [(True, "pairing")], keys
    for jid in (bot, strict):
        comp.delete(f"/v1/bots/{jid}")
