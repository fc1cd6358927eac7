"""The interoperability matrix of the other end, through Prosody and ejabberd with c2s TLS on
a private CA: the Python plugin (`clients/python`, OpenSSL) as a bot answering the `xtls`
client (rustls), as a client of the component's bot, and person to person with `xtls listen`.

The Python side runs the package's own examples as separate processes, as their README says.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import TLS_USERS
from test_xtls_cli import ECHO, Terminal, Xtls, json_event

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
