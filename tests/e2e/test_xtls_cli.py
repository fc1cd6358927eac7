"""The `xtls` command-line client as a person uses it, through a real XMPP server whose c2s
TLS certificate comes from a private CA the test creates (`--ca-file`), against the
component's bots: `xtls send` and its exit statuses for each outcome, and `xtls chat` driven
in a pseudo-terminal (type, read the screen) through a short authentication string compared
with the one the component shows.

The servers here are their own (`tls_server`, conftest.py), not the session's plaintext ones.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from component import REPO, Component
from conftest import TLS_USERS, USERS

XTLS_BIN = Path(os.environ.get("XTLS_CLI_BIN") or REPO / "target" / "debug" / "xtls")
ECHO = "echo@bots.localhost"


class Xtls:
    """Runs `xtls` as one user, with its own configuration directory."""

    def __init__(self, server, user: str, home: Path, *, direct_tls: bool = False) -> None:
        self.server = server
        self.user = user
        self.home = home
        port = server.c2s_direct_tls_port if direct_tls else server.c2s_port
        self.env = dict(
            os.environ,
            XTLS_CONFIG_DIR=str(home),
            XTLS_JID=f"{user}@{server.host}",
            XTLS_PASSWORD={**USERS, **TLS_USERS}[user],
            XTLS_SERVER=f"127.0.0.1:{port}",
            XTLS_CA_FILE=str(server.ca.ca_file),
        )
        self.direct_tls = direct_tls

    def argv(self, *args: str) -> list[str]:
        extra = ["--direct-tls"] if self.direct_tls and args[0] in ("send", "chat") else []
        return [str(XTLS_BIN), *args[:1], *extra, *args[1:]]

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def send_json(self, peer: str, text: str, *extra: str, env=None) -> tuple[int, dict]:
        done = self.run("send", "--json", peer, text, *extra, env=env)
        try:
            return done.returncode, json.loads(done.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"no JSON from xtls send ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def known(self) -> list[dict]:
        done = self.run("known", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def spki_of(component, bot: str) -> str:
    status, cert = component.get(f"/v1/bots/{bot}/certificate")
    assert status == 200, cert
    return cert["spki_sha256"]


def new_bot(component, prefix: str, **fields) -> str:
    status, made = component.post("/v1/bots", {"localpart": f"{prefix}{uuid.uuid4().hex[:6]}", "handler": "echo",
                                               **fields})
    assert status == 201, made
    return made["jid"]


def test_send_prints_the_echo_and_remembers_the_bots_key_on_first_use(tls_component, tls_server, homes):
    alice = Xtls(tls_server, "alice", homes / "alice")
    first = alice.run("send", ECHO, "hello through the tunnel")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "hello through the tunnel\n"
    spki = spki_of(tls_component, ECHO)
    assert f"key {spki}" in first.stderr and "NEW: first meeting" in first.stderr, first.stderr
    assert [(k["spki_sha256"], k["how"]) for k in alice.known() if k["jid"] == ECHO] == [(spki, "tofu")]

    code, answer = alice.send_json(ECHO, "and again, in JSON")
    assert code == 0, answer
    assert answer == {**answer, "outcome": "delivered", "reply": "and again, in JSON", "key": "known",
                      "spki_sha256": spki, "tls_version": "TLSv1.3"}, answer
    # The tunnels were closed by the client, not left to time out.
    closed = [t for t in tls_component.get(f"/v1/tunnels?bot={ECHO}")[1] if t["peer"].startswith("alice@")]
    assert len(closed) == 2 and all(t.get("close_reason") == "peer_close" for t in closed), closed


def test_send_over_direct_tls_logs_in_on_the_direct_tls_port(tls_component, tls_server, homes):
    alice = Xtls(tls_server, "alice", homes / "alice", direct_tls=True)
    done = alice.run("send", ECHO, "direct")
    assert (done.returncode, done.stdout) == (0, "direct\n"), done.stderr


def test_login_failures_are_said_in_words_and_exit_1(tls_component, tls_server, homes):
    alice = Xtls(tls_server, "alice", homes / "alice")
    wrong = alice.run("send", ECHO, "x", env={"XTLS_PASSWORD": "not-the-password"})
    assert wrong.returncode == 1 and "wrong user name or password" in wrong.stderr, wrong.stderr
    untrusted = alice.run("send", ECHO, "x", env={"XTLS_CA_FILE": str(Path(__file__).parent / "absent.pem")})
    assert untrusted.returncode == 1 and "absent.pem" in untrusted.stderr, untrusted.stderr
    env = {k: v for k, v in alice.env.items() if k != "XTLS_CA_FILE"}
    system_roots = subprocess.run(alice.argv("send", ECHO, "x"), env=env, capture_output=True, text=True,
                                  timeout=60, stdin=subprocess.DEVNULL)
    assert system_roots.returncode == 1, system_roots.stderr
    assert "--ca-file" in system_roots.stderr and "UnknownIssuer" in system_roots.stderr, system_roots.stderr
    assert USERS["alice"] not in wrong.stderr + untrusted.stderr + system_roots.stderr


def test_send_exit_statuses_tell_each_outcome_apart(tls_component, tls_server, homes):
    comp = tls_component
    bob = Xtls(tls_server, "bob", homes / "bob")
    # 4: no XTLS: an account that does not exist, and one whose server answers for it.
    for peer in (f"nobody-{uuid.uuid4().hex[:6]}@{tls_server.host}", f"alice@{tls_server.host}"):
        code, answer = bob.send_json(peer, "x")
        assert (code, answer["outcome"]) == (4, "no_xtls"), answer
    # 3: a bot that only lets in keys someone approved refuses ours in the handshake.
    strict = new_bot(comp, "strict", trust="manual")
    code, answer = bob.send_json(strict, "x")
    assert (code, answer["outcome"]) == (3, "refused"), answer
    # 6: an api bot delivers to a backend that is not there: no answer comes.
    silent = new_bot(comp, "silent", handler="api")
    code, answer = bob.send_json(silent, "anyone?", "--timeout", "4")
    assert (code, answer["outcome"]) == (6, "timeout") and "delivered" in answer["error"], answer
    # ... and with --no-wait, delivery is the success.
    code, answer = bob.send_json(silent, "just take it", "--no-wait")
    assert (code, answer["outcome"], answer["reply"]) == (0, "delivered", None), answer
    # 5: the bot's operator replaced its key.
    bot = new_bot(comp, "rekey")
    code, answer = bob.send_json(bot, "first")
    assert code == 0, answer
    old = answer["spki_sha256"]
    status, rotated = comp.post(f"/v1/bots/{bot}/certificate/rotate", {"new_key": True, "overlap_secs": 0})
    assert status == 200, rotated
    new = spki_of(comp, bot)
    assert new != old
    changed = bob.run("send", bot, "second")
    assert changed.returncode == 5, changed.stderr
    assert f"THE KEY OF {bot} HAS CHANGED" in changed.stderr and old in changed.stderr and new in changed.stderr, changed.stderr
    assert f"xtls trust {bot} {new}" in changed.stderr, changed.stderr
    assert [k["spki_sha256"] for k in bob.known() if k["jid"] == bot] == [old], "never accepted silently"
    trusted = bob.run("trust", bot, new)
    assert trusted.returncode == 0, trusted.stderr
    code, answer = bob.send_json(bot, "third")
    assert (code, answer["reply"], answer["key"]) == (0, "third", "verified"), answer
    for jid in (strict, silent, bot):
        comp.delete(f"/v1/bots/{jid}")


class Terminal:
    """A program in a pseudo-terminal: type lines, wait for text on the screen."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the program, on the terminal
            os.execve(argv[0], argv, env)
        self.screen = ""

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def expect(self, text: str, timeout: float = 20) -> str:
        """Reads until `text` is on the screen; returns the screen so far."""
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            self._read(text, deadline)
        return self.screen

    def expect_line(self, text: str, timeout: float = 20) -> str:
        """Reads until a whole line holding `text` is on the screen; returns that line."""
        deadline = time.monotonic() + timeout
        while not (lines := [line for line in self.screen.split("\n")[:-1] if text in line]):
            self._read(text, deadline)
        return lines[0]

    def _read(self, text: str, deadline: float) -> None:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} never appeared; the screen:\n{self.screen}"
        ready, _, _ = select.select([self.fd], [], [], left)
        if ready:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the program ended
                chunk = b""
            assert chunk, f"{text!r} never appeared before the end; the screen:\n{self.screen}"
            self.screen += chunk.decode(errors="replace").replace("\r\n", "\n")

    def wait(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            assert time.monotonic() < deadline, f"still running; the screen:\n{self.screen}"
            try:  # keep draining the screen so the program never blocks on it
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.screen += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:
                time.sleep(0.05)


def test_chat_in_a_terminal_shows_the_key_echoes_compares_a_code_and_quits(tls_component, tls_server, homes):
    comp = tls_component
    bot = new_bot(comp, "chat")
    person = Xtls(tls_server, "mallory", homes / "mallory")
    term = Terminal(person.argv("chat", bot), person.env)
    screen = term.expect("/quit leave.")
    spki = spki_of(comp, bot)
    assert f"Tunnel open to {bot} (TLSv1.3" in screen and f"key {spki}" in screen and "NEW" in screen, screen
    term.type("hello from a terminal")
    term.expect(f"{bot}: hello from a terminal")
    term.type("/sas")
    screen = term.expect("yes/no")
    shown = screen.split("Short authentication string: ", 1)[1].split("\n", 1)[0]
    live = [t for t in comp.get(f"/v1/tunnels?bot={bot}")[1] if t["state"] == "open"]
    assert len(live) == 1, live
    sas = comp.get(f"/v1/tunnels/{live[0]['id']}")[1]["sas"]
    assert sas["state"] == "ready" and sas["started_by"] == "peer", sas
    assert shown == f"{sas['sas28x5']} ({sas['decimal']})", (shown, sas)
    term.type("yes")
    term.expect("is now verified")
    term.type("/quit")
    term.expect("Closed.")
    assert term.wait() == 0
    assert [k["how"] for k in person.known() if k["jid"] == bot] == ["verified"]
    row = comp.get(f"/v1/tunnels/{live[0]['id']}")[1]
    assert row["state"] == "closed" and row["close_reason"] == "peer_close", row
    comp.delete(f"/v1/bots/{bot}")


def test_chat_with_a_pairing_code_lets_a_new_key_into_a_verified_only_bot(tls_component, tls_server, homes):
    comp = tls_component
    bot = new_bot(comp, "pair", trust="verified_only")
    person = Xtls(tls_server, "bob", homes / "bob")
    refused = person.run("send", bot, "let me in")
    assert refused.returncode == 3 and "pairing code" in refused.stderr, refused.stderr
    status, minted = comp.post(f"/v1/bots/{bot}/peers/bob@{tls_server.host}/pairing", {"ttl_secs": 300})
    assert status == 201, minted
    term = Terminal(person.argv("chat", "--pair", minted["code"].lower(), bot), person.env)
    term.expect(f"{bot}'s key is now verified (paired with the code its operator gave you)")
    term.type("paired now")
    term.expect(f"{bot}: paired now")
    term.type("/quit")
    term.expect("Closed.")
    assert term.wait() == 0
    assert [k["how"] for k in person.known() if k["jid"] == bot] == ["verified"]
    _, keys = comp.get(f"/v1/bots/{bot}/peers/bob@{tls_server.host}/keys")
    assert [(k["verified"], k["compared"]) for k in keys] == [(True, "pairing")], keys
    done = person.run("send", bot, "no code needed any more")
    assert (done.returncode, done.stdout) == (0, "no code needed any more\n"), done.stderr
    comp.delete(f"/v1/bots/{bot}")


def json_event(term: Terminal, event: str) -> dict:
    """The first line of `xtls --json listen` output that reports `event`, parsed."""
    return json.loads(term.expect_line(f'"event":"{event}"'))


def wait_for(check, timeout: float = 15, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} not met in {timeout} s"
        time.sleep(0.1)
    return value


def test_listen_takes_a_bots_push_and_two_people_chat_through_their_own_tunnel(tls_component, tls_server, homes):
    """The bot, told that the listening person is available, opens a tunnel to her bare JID (xtls
    is the TLS server then); then another person chats to her full JID, and each sees what the
    other types."""
    comp = tls_component
    alice = Xtls(tls_server, "alice", homes / "alice")
    bob = Xtls(tls_server, "bob", homes / "bob")
    bot = new_bot(comp, "pusher", handler="api")
    listener = Terminal(alice.argv("--json", "listen", "--announce", bot), alice.env)
    online = json_event(listener, "online")
    full = online["jid"]
    assert full.startswith(f"alice@{tls_server.host}/") and online["announced"] == [bot], online

    # Told that alice is available, the bot reaches her at her bare JID. The presence reaches
    # the component a moment after listen sent it: until then the bot answers peer_unavailable,
    # and a backend tries again, as this does.
    def push():
        status, sent = comp.post(f"/v1/bots/{bot}/messages", {"to": f"alice@{tls_server.host}",
                                                              "body": "the bot pushes"})
        assert status == 202, sent
        return sent if sent["status"] != "peer_unavailable" else None

    sent = wait_for(push, what="the bot learning that alice is available")
    listener.expect('"body":"the bot pushes"')
    opened = [json.loads(line) for line in listener.screen.splitlines() if '"event":"opened"' in line]
    assert opened == [{"event": "opened", "peer": bot, "spki_sha256": spki_of(comp, bot), "key": "new"}], opened
    wait_for(lambda: comp.get(f"/v1/bots/{bot}/messages/{sent['id']}")[1]["status"] == "acknowledged",
             what="the push acknowledged")
    # The bot's side starts a short authentication string; the listener shows the same code.
    (row,) = [t for t in comp.get(f"/v1/tunnels?bot={bot}")[1] if t["peer"] == full and t["state"] == "open"]
    status, started = comp.post(f"/v1/tunnels/{row['id']}/sas")
    assert status == 200, started
    shown = json_event(listener, "sas")
    sas = wait_for(lambda: (comp.get(f"/v1/tunnels/{row['id']}")[1]["sas"] or {}).get("sas28x5") and
                   comp.get(f"/v1/tunnels/{row['id']}")[1]["sas"], what="the bot's code")
    assert (shown["sas28x5"], shown["decimal"]) == (sas["sas28x5"], sas["decimal"]), (shown, sas)
    assert shown["spki_sha256"] == spki_of(comp, bot) and sas["started_by"] == "bot", (shown, sas)

    talker = Terminal(bob.argv("chat", full), bob.env)
    screen = talker.expect("/quit leave.")
    alice_spki = json.loads(alice.run("whoami", "--json").stdout)["spki_sha256"]
    assert f"Tunnel open to {full}" in screen and f"key {alice_spki}" in screen, screen
    talker.type("hello alice")
    listener.expect('"body":"hello alice"')
    bob_spki = json.loads(bob.run("whoami", "--json").stdout)["spki_sha256"]
    bob_opened = [json.loads(line) for line in listener.screen.splitlines()
                  if '"event":"opened"' in line and f'"peer":"bob@{tls_server.host}/' in line]
    assert [(o["spki_sha256"], o["key"]) for o in bob_opened] == [(bob_spki, "new")], bob_opened
    listener.type("hello bob")
    talker.expect(f"{full}: hello bob")
    talker.type("/quit")
    talker.expect("Closed.")
    assert talker.wait() == 0
    listener.expect('"event":"closed"')
    os.write(listener.fd, b"\x04")  # Ctrl-D: the end of input
    assert listener.wait() == 0
    assert {(k["jid"], k["how"]) for k in alice.known()} >= {(bot, "tofu"), (f"bob@{tls_server.host}", "tofu")}
    comp.delete(f"/v1/bots/{bot}")


def test_the_readme_walkthrough_against_the_demo_chats_verifies_and_warns_of_a_changed_key(tmp_path):
    """README, "Talk to a bot": `scripts/demo --serve`, source its file, `xtls chat` the echo bot,
    /sas and yes, then the operator replaces the key and `xtls` refuses with the warning."""
    demo = subprocess.Popen([sys.executable, str(Path(__file__).parent / "demo.py"), "--serve"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed = ""
        while "Ctrl-C stops everything" not in printed:
            line = demo.stdout.readline()
            assert line, f"the demo ended early:\n{printed}"
            printed += line
        env_file = Path(re.search(r"^ +\. (\S+/xtls\.env)$", printed, re.M).group(1))
        env = dict(os.environ)
        for line in env_file.read_text().splitlines():
            if line.startswith("export "):
                key, value = line[len("export "):].split("=", 1)
                env[key] = value
        assert env_file.stat().st_mode & 0o077 == 0, "the demo's file holds a token and a password"

        term = Terminal([str(XTLS_BIN), "chat", ECHO], env)
        term.expect("NEW: first meeting")
        term.type("hello")
        term.expect(f"{ECHO}: hello")
        term.type("/sas")
        screen = term.expect("yes/no")
        code = screen.split("Short authentication string: ", 1)[1].split(" ", 1)[0]
        api, token = env["XTLS_API"], env["XTLS_TOKEN"]
        rows = curl_json(f"{api}/tunnels?bot={ECHO}", token)
        assert [r["sas"]["sas28x5"] for r in rows if r["state"] == "open"] == [code], rows
        term.type("yes")
        term.expect("is now verified")
        term.type("/quit")
        term.expect("Closed.")
        assert term.wait() == 0

        curl_json(f"{api}/bots/{ECHO}/certificate/rotate", token, {"new_key": True, "overlap_secs": 0})
        changed = subprocess.run([str(XTLS_BIN), "send", ECHO, "still you?"], env=env, capture_output=True,
                                 text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert changed.returncode == 5, changed.stderr
        assert f"THE KEY OF {ECHO} HAS CHANGED. Nothing was sent." in changed.stderr, changed.stderr
        assert "(verified since" in changed.stderr and f"xtls trust {ECHO} " in changed.stderr, changed.stderr
    finally:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, rest
    assert "stopped Prosody and the component" in rest and not env_file.parent.exists()


def curl_json(url: str, token: str, body: dict | None = None):
    """What the README's curl commands do, with the standard library."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}, method="GET")
    if body is not None:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())
