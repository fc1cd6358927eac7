"""Faults of ordinary operation, with real processes: a wrong component secret, the SQLite
store locked by another process, the disk holding it full.

The store faults use a bot with the `api` handler (its stanzas go to the durable event
log): while the store cannot take a write, every new piece of work (a `start`, a `data`
whose stanzas would need storing) is refused with `resource-constraint` (type `wait`),
/readyz says why, nothing is corrupted, and everything works again once the condition
clears. Nothing acknowledged is ever missing from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import subprocess
import threading
import time
import types
from pathlib import Path

import pytest

from botapi_helpers import call, messages_received, new_api_bot, poll_events
from component import Component, binary_path
from conftest import run
from xtls_client import XtlsError


def test_a_wrong_component_secret_exits_with_the_servers_reason_and_no_retry_storm(prosody):
    comp = Component(prosody)
    config = comp.config_path.read_text().replace(prosody.component_secret, "not-the-secret")
    comp.config_path.write_text(config)
    try:
        started = time.monotonic()
        run_ = subprocess.run([str(binary_path()), "serve", "--config", str(comp.config_path)],
                              capture_output=True, text=True, timeout=30, cwd=comp.dir,
                              env={"PATH": "/usr/bin:/bin", "RUST_LOG": "info"})
        elapsed = time.monotonic() - started
    finally:
        comp.cleanup()
    output = run_.stderr + run_.stdout
    assert run_.returncode != 0, output
    assert "not-authorized" in output, output
    assert elapsed < 10, f"took {elapsed:.1f} s to give up"
    # One attempt, not a loop: the handshake was sent once.
    assert output.count("component authenticated") == 0
    assert output.lower().count("reconnect") <= 1, output
    assert "not-the-secret" not in output


@contextlib.contextmanager
def durable_component(prosody, store_dir: Path | None = None):
    """A component of its own (api domain) whose store a test may lock or starve of space,
    in `store_dir` when given."""
    comp = Component(prosody, domain=prosody.api_component_domain, bots="")
    if store_dir is not None:
        default = comp.store_path
        comp.store_path = store_dir / "xtls.db"
        comp.config_path.write_text(comp.config_path.read_text().replace(
            f'url = "sqlite://{default}"', f'url = "sqlite://{comp.store_path}"'))
        assert str(comp.store_path) in comp.config_path.read_text()
    try:
        comp.start()
        yield comp
        log = comp.log_path.read_text()
        assert "panicked" not in log
    finally:
        comp.cleanup()


@contextlib.contextmanager
def store_locked(path: Path):
    """Another process's write lock on the store (sqlite3 in this process is another
    connection with its own file locks, as a second program would hold them)."""
    other = sqlite3.connect(path, timeout=1, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("CREATE TABLE IF NOT EXISTS lock_holder (x)")
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def readyz(component) -> tuple[int, dict]:
    return component.get("/readyz", token=False)


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


async def refused_while_unavailable(component, users, bot: str, user: str, fault) -> None:
    """With a tunnel open and one message stored, start `fault()`: /readyz says why, a
    message sent through the open tunnel and a new tunnel are both refused with
    resource-constraint (wait)."""
    async with users.client(user) as client:
        tunnel = await client.open_tunnel(bot)
        await tunnel.send_message("stored before the fault")
        await tunnel.flush()
        with fault():
            status, body = await call(readyz, component)
            assert status == 503 and body["store"]["ok"] is False, body
            await tunnel.send_message("refused during the fault")
            # The data IQ's answer is an error, after which the tunnel is gone (the client
            # stops waiting for acknowledgements then, so watch the failure, not flush()).
            deadline = time.monotonic() + 20
            while tunnel.failure is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert isinstance(tunnel.failure, XtlsError), tunnel.failure
            assert (tunnel.failure.condition, tunnel.failure.error_type) == ("resource-constraint", "wait")
            async with users.client(user) as other:
                with pytest.raises(XtlsError) as refused:
                    await other.open_tunnel(bot, timeout=20)
                assert (refused.value.condition, refused.value.error_type) == ("resource-constraint", "wait")


def recovers(component, users, bot: str, user: str, body: str) -> None:
    """After the fault: ready again, a new tunnel works, and its message is in the log."""
    deadline = time.monotonic() + 20
    while readyz(component)[0] != 200:
        assert time.monotonic() < deadline, f"/readyz not back to 200: {readyz(component)}"
        time.sleep(0.2)

    async def scenario():
        async with users.client(user) as client:
            tunnel = await client.open_tunnel(bot)
            await tunnel.send_message(body)
            await tunnel.flush()

    run(scenario(), 60)
    status, page = poll_events(component, bot, after=0, limit=1000)
    assert status == 200, page
    bodies = [m["data"].get("body") for m in messages_received(page["events"])]
    assert body in bodies and "stored before the fault" in bodies, bodies
    assert "refused during the fault" not in bodies, "a refused stanza was stored"


def test_a_store_locked_by_another_process(prosody, users):
    with durable_component(prosody) as comp:
        bot = new_api_bot(comp, "locked")
        run(refused_while_unavailable(comp, users, bot, "alice", lambda: store_locked(comp.store_path)), 120)
        assert integrity(comp.store_path) == "ok"
        recovers(comp, users, bot, "bob", "after the lock")
        assert "database is locked" in comp.log_path.read_text(), "the log names the cause"


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs of its own: the store can be starved of space without touching the
    machine's disks."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"cannot mount a tmpfs (needs root): {done.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@contextlib.contextmanager
def disk_full(mount: Path):
    filler = mount / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
    try:
        yield
    finally:
        filler.unlink()


def test_a_full_disk(prosody, users, small_disk):
    # Found by this test: a commit failing on a full disk left the writer connection inside
    # a transaction, so later acknowledged stanzas went into it and were never committed.
    # The store now reopens such a connection (store::writer_is_clean).
    with durable_component(prosody, small_disk) as comp:
        bot = new_api_bot(comp, "full")
        run(refused_while_unavailable(comp, users, bot, "alice", lambda: disk_full(small_disk)), 120)
        assert integrity(comp.store_path) == "ok"
        recovers(comp, users, bot, "bob", "after the disk was freed")
        assert "full" in comp.log_path.read_text().lower(), "the log names the cause"


class TcpProxy:
    """A TCP relay between the component and the server, so a test can cut the component's
    link while the users' own connections to the server stay up."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inside, _ = self.listener.accept()
            except OSError:
                return
            try:
                outside = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                inside.close()
                continue
            with self.lock:
                self.pairs.append((inside, outside))
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> int:
        """Ends every relayed connection (both sides see it drop); returns how many."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        return len(pairs)

    def close(self) -> None:
        self.listener.close()
        self.cut()


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        await asyncio.sleep(0.05)


def test_a_cut_server_link_closes_tunnels_with_a_reason_and_paced_close_and_loses_nothing(prosody, users):
    """The component's link to the server drops while alice (still connected to the server)
    has a tunnel open and sending: the component reconnects, reports the tunnel closed with a
    reason, sends alice a <close/> for it (spec §3.5), and every stanza she saw acknowledged is
    in the bot's log."""
    proxy = TcpProxy(prosody.component_port)
    via_proxy = types.SimpleNamespace(
        component_domain=prosody.api_component_domain, component_port=proxy.port,
        component_secret=prosody.component_secret, api_component_domain=prosody.api_component_domain)
    comp = Component(via_proxy, bots="")
    try:
        comp.start()
        bot = new_api_bot(comp, "cut")
        acknowledged: list[str] = []

        async def scenario():
            async with users.client("alice") as alice:
                tunnel = await alice.open_tunnel(bot)
                for i in range(20):
                    await tunnel.send_message(f"before the cut {i}")
                    await tunnel.flush()
                    acknowledged.append(f"before the cut {i}")
                assert proxy.cut() == 1
                await call(comp.wait_ready, 30)
                await wait_for(lambda: tunnel.closed_by_peer, 15, "paced <close/> from the component")
                # A new tunnel works at once.
                again = await alice.open_tunnel(bot)
                await again.send_message("after the reconnect")
                await again.flush()
                acknowledged.append("after the reconnect")
                await again.close()
                return tunnel

        run(scenario(), 90)
        status, tunnels = comp.get(f"/v1/tunnels?bot={bot}")
        assert status == 200, tunnels
        first = min(tunnels, key=lambda t: t["opened_at"])
        assert first["state"] == "closed" and first["close_reason"] == "connection_lost", first
        status, page = poll_events(comp, bot, after=0, limit=1000)
        bodies = [m["data"].get("body") for m in messages_received(page["events"])]
        missing = [b for b in acknowledged if b not in bodies]
        assert not missing, f"acknowledged but not in the log: {missing}"
        closed = [e for e in page["events"] if e["type"] == "tunnel.closed" and e["tunnel_id"] == first["id"]]
        assert closed and closed[0]["data"].get("reason") == "connection_lost", closed
    finally:
        comp.cleanup()
        proxy.close()


def test_a_server_restart_during_traffic_loses_nothing_acknowledged(prosody, users):
    """Prosody restarts while alice sends: the component reconnects by itself, the tunnel is
    reported closed with a reason, and every acknowledged stanza is in the bot's log."""
    with durable_component(prosody) as comp:
        bot = new_api_bot(comp, "restart")
        acknowledged: list[str] = []

        async def scenario():
            async with users.client("alice") as alice:
                tunnel = await alice.open_tunnel(bot)
                i = 0
                restarted = False
                while True:
                    body = f"message {i}"
                    try:
                        await tunnel.send_message(body)
                        await tunnel.flush(timeout=5)
                    except Exception:
                        break  # the server went away under the client
                    if tunnel.failure is not None or tunnel.state != "open":
                        break  # flush() also returns when the data IQ was answered with an error
                    acknowledged.append(body)
                    i += 1
                    if i == 15 and not restarted:
                        restarted = True
                        asyncio.get_running_loop().run_in_executor(None, prosody.restart)

        with contextlib.suppress(Exception):
            run(scenario(), 60)
        comp.wait_ready(timeout=30)
        assert len(acknowledged) >= 15
        status, page = poll_events(comp, bot, after=0, limit=1000)
        bodies = [m["data"].get("body") for m in messages_received(page["events"])]
        missing = [b for b in acknowledged if b not in bodies]
        assert not missing, f"acknowledged but not in the log: {missing}"
        status, tunnels = comp.get(f"/v1/tunnels?bot={bot}")
        (tunnel,) = tunnels
        assert tunnel["state"] == "closed" and tunnel["close_reason"] == "connection_lost", tunnel

        async def after():
            async with users.client("bob") as bob:
                tunnel = await bob.open_tunnel(bot)
                await tunnel.send_message("after the restart")
                await tunnel.flush()

        run(after(), 60)
