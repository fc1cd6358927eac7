"""Helpers for the hostile-input tests (test_hostile.py, and the bystander check of
test_admin_hardening.py).

* `LoopThread`: one asyncio loop in a thread of its own for a whole test module, so that an
  XMPP client (and its tunnel) can live across tests and keep answering while a test runs
  blocking code.  `run(coro)` runs a coroutine there and waits for it.
* `Bystander`: alice's tunnel to an echo bot, opened once before the hostile actions; a test
  calls `roundtrip()` after its hostile action to prove the unrelated tunnel still works.
* `StreamTap`: a man in the middle on the XEP-0114 link, between the component and the
  server's component port.  It forwards both directions unchanged, records every top-level
  element the component writes, and can inject bytes into the server-to-component direction
  (at a stanza boundary, after the handshake) or cut the connection, so a test can play a
  hostile or broken server where Prosody itself would never produce the input.
* `rss_kib(pid)`, `assert_no_panic(component)`, and certificate builders for peers that
  present odd certificates.
"""

from __future__ import annotations

import asyncio
import datetime
import queue
import select
import socket
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xtls_client import XMPP_ADDR_OID, Identity, der_utf8string

NS_XTLS = "urn:xmpp:tmp:xtls"


# --------------------------------------------------------------------------- event loop


class LoopThread:
    """An asyncio event loop running in a daemon thread until `stop()`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="hostile-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 60.0):
        """Run `coro` on the loop and return its result (its exception is raised here)."""
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        return future.result(timeout + 5)

    def stop(self) -> None:
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


# --------------------------------------------------------------------------- bystander


class Bystander:
    """Alice's tunnel to `bot`, opened before the hostile actions and checked after each.

    `users` is a conftest.Users; every call runs on `loop`.  `roundtrip()` sends one message
    and waits for the echo; `reopen()` replaces a tunnel that a test ended on purpose (the
    component stream was lost: every tunnel on it is gone, spec §3.5 rule 4).
    """

    def __init__(self, loop: LoopThread, users, bot: str) -> None:
        self.loop = loop
        self.users = users
        self.bot = bot
        self.client = None
        self.tunnel = None
        self.opened = 0  # tunnels opened so far (1 + reopenings)
        self.roundtrips = 0

    def open(self) -> None:
        """Open the tunnel from a new client (a new full JID: nothing of an earlier tunnel,
        such as a late <close/> for it, can reach the new one)."""

        async def go():
            if self.client is not None:
                try:
                    await self.client.disconnect()
                except Exception:  # noqa: BLE001 - the old stream may be broken already
                    pass
            self.client = self.users.client("alice")
            await self.client.connect()
            self.tunnel = await self.client.open_tunnel(self.bot, timeout=15)
            self.opened += 1

        self.loop.run(go())

    reopen = open

    def roundtrip(self, what: str = "") -> float:
        """One message through the tunnel and its echo back; returns the seconds it took."""
        body = f"bystander {self.roundtrips}: {what or 'still here'} {uuid.uuid4().hex[:6]}"

        async def go():
            started = time.monotonic()
            await self.tunnel.send_message(body, timeout=10)
            while True:  # skip echoes of earlier messages that a failed test left behind
                got = await self.tunnel.recv_message(timeout=10)
                if got == body:
                    return time.monotonic() - started

        assert self.tunnel is not None and self.tunnel.state == "open", (
            f"the bystander tunnel is {getattr(self.tunnel, 'state', None)}: {getattr(self.tunnel, 'failure', None)!r}"
        )
        elapsed = self.loop.run(go(), 25)
        self.roundtrips += 1
        return elapsed

    def ensure_working(self) -> None:
        """Make sure the tunnel works before a test: reopen it if an earlier test ended it on
        purpose (the first call opens it). The check after the hostile action is strict."""
        if self.tunnel is None or self.tunnel.state != "open":
            self.open()
        try:
            self.roundtrip("before")
        except Exception:  # noqa: BLE001 - e.g. the stream was lost and the <close/> is late
            self.open()
            self.roundtrip("before, reopened")

    def close(self) -> None:
        async def go():
            if self.tunnel is not None and self.tunnel.state == "open":
                try:
                    await self.tunnel.close(timeout=5)
                except Exception:  # noqa: BLE001 - teardown: the tunnel may be gone already
                    pass
            if self.client is not None:
                await self.client.disconnect()

        self.loop.run(go(), 20)


# --------------------------------------------------------------------------- stream tap


class _Capture:
    """Incremental parse of one direction of a XEP-0114 stream into depth-1 elements."""

    def __init__(self) -> None:
        self._parser = ET.XMLPullParser(events=("start", "end"))
        self._root: ET.Element | None = None
        self.depth = 0
        self.last_byte = b""  # last non-whitespace byte seen
        self.broken = False  # the bytes stopped being XML (e.g. we injected garbage)

    def feed(self, data: bytes) -> list[ET.Element]:
        stripped = data.rstrip()
        if stripped:
            self.last_byte = stripped[-1:]
        if self.broken:
            return []
        done = []
        try:
            self._parser.feed(data)
            for event, elem in self._parser.read_events():
                if event == "start":
                    self.depth += 1
                    if self._root is None:
                        self._root = elem
                else:
                    self.depth -= 1
                    if self.depth == 1:
                        done.append(elem)
                        self._root.remove(elem)
        except ET.ParseError:
            self.broken = True
        return done

    @property
    def at_boundary(self) -> bool:
        """Between two top-level elements (nothing of a stanza half-forwarded)."""
        return not self.broken and self.depth == 1 and self.last_byte == b">"


@dataclass
class Written:
    """One top-level element the component wrote to the server."""

    connection: int  # which connection of the tap (1 = first)
    element: ET.Element
    xml: str
    at: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.element.tag.split("}")[-1]

    def attr(self, key: str) -> str | None:
        return self.element.get(key)

    def error(self) -> tuple[str, str] | None:
        """(condition, type) when this is an IQ error, else None."""
        for child in self.element:
            if child.tag.endswith("}error"):
                conditions = [c.tag.split("}")[-1] for c in child if not c.tag.endswith("}text")]
                return (conditions[0] if conditions else "(none)", child.get("type", ""))
        return None

    def children(self) -> list[str]:
        return [c.tag for c in self.element]


class _TapSession:
    def __init__(self, tap: "StreamTap", number: int, downstream: socket.socket) -> None:
        self.tap = tap
        self.number = number
        self.down = downstream  # the component
        self.up = socket.create_connection(("127.0.0.1", tap.upstream_port), timeout=10)
        self.up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.from_server = _Capture()
        self.from_component = _Capture()
        self.authenticated = False
        self.closed = threading.Event()
        self.injections: queue.Queue = queue.Queue()
        threading.Thread(target=self._server_to_component, daemon=True, name=f"tap-s2c-{number}").start()
        threading.Thread(target=self._component_to_server, daemon=True, name=f"tap-c2s-{number}").start()

    def _shutdown(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.up, self.down):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.tap._session_ended(self)

    def _server_to_component(self) -> None:
        try:
            while not self.closed.is_set():
                readable, _, _ = select.select([self.up], [], [], 0.02)
                if readable:
                    data = self.up.recv(65536)
                    if not data:
                        break
                    for el in self.from_server.feed(data):
                        if el.tag.split("}")[-1] == "handshake":
                            self.authenticated = True
                    self.down.sendall(data)
                if self.authenticated and self.from_server.at_boundary:
                    while True:
                        try:
                            data, cut, done = self.injections.get_nowait()
                        except queue.Empty:
                            break
                        if data:
                            self.down.sendall(data)
                            self.from_server.feed(data)
                        done.set()
                        if cut:
                            time.sleep(0.05)  # let the bytes leave before the connection does
                            return
        except OSError:
            pass
        finally:
            self._shutdown()

    def _component_to_server(self) -> None:
        try:
            while not self.closed.is_set():
                data = self.down.recv(65536)
                if not data:
                    break
                for el in self.from_component.feed(data):
                    self.tap._record(Written(self.number, el, ET.tostring(el, encoding="unicode")))
                self.up.sendall(data)
        except OSError:
            pass
        finally:
            self._shutdown()


class StreamTap:
    """A TCP man in the middle on the component link (see the module docstring).

    Point the component at `port`; the tap connects each accepted connection to
    127.0.0.1:`upstream_port` (the server's component port).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self._session: _TapSession | None = None
        self._written: list[Written] = []
        self._cond = threading.Condition()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True, name="tap-accept").start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._cond:
                self.connections += 1
                number = self.connections
            try:
                session = _TapSession(self, number, conn)
            except OSError:
                conn.close()
                continue
            with self._cond:
                self._session = session
                self._cond.notify_all()

    def _session_ended(self, session: _TapSession) -> None:
        with self._cond:
            if self._session is session:
                self._session = None
            self._cond.notify_all()

    def _record(self, written: Written) -> None:
        with self._cond:
            self._written.append(written)
            self._cond.notify_all()

    def authenticated_session(self, timeout: float = 15.0) -> _TapSession:
        """The current connection once the server accepted the component's handshake."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                session = self._session
                if session is not None and session.authenticated and not session.closed.is_set():
                    return session
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no authenticated component connection through the tap within {timeout} s")
                self._cond.wait(min(left, 0.05))

    def inject(self, data: bytes | str, *, cut: bool = False, timeout: float = 10.0) -> int:
        """Write `data` to the component as if the server sent it, between two stanzas of the
        current authenticated connection; with `cut`, close the connection right after.
        Returns the connection number used."""
        if isinstance(data, str):
            data = data.encode()
        session = self.authenticated_session(timeout)
        done = threading.Event()
        session.injections.put((data, cut, done))
        if not done.wait(timeout):
            raise TimeoutError("the tap found no stanza boundary to inject at")
        return session.number

    def mark(self) -> int:
        """A position in the record of written elements (for `written_since`)."""
        with self._cond:
            return len(self._written)

    def written_since(self, mark: int) -> list[Written]:
        with self._cond:
            return list(self._written[mark:])

    def wait_written(self, predicate: Callable[[Written], bool], *, since: int = 0,
                     timeout: float = 5.0) -> Written:
        """The first element written by the component after `since` matching `predicate`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for written in self._written[since:]:
                    if predicate(written):
                        return written
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [w.xml[:160] for w in self._written[since:]][-10:]
                    raise TimeoutError(f"the component wrote nothing matching within {timeout} s; last: {names}")
                self._cond.wait(left)

    def answer_to(self, iq_id: str, *, since: int = 0, timeout: float = 5.0) -> Written:
        """The component's answer (result or error IQ) to the IQ with `iq_id`."""
        return self.wait_written(
            lambda w: w.name == "iq" and w.attr("id") == iq_id and w.attr("type") in ("result", "error"),
            since=since, timeout=timeout)

    def wait_connections(self, n: int, timeout: float = 15.0) -> None:
        """Until the component has connected `n` times in all, and that one is authenticated."""
        deadline = time.monotonic() + timeout
        while self.connections < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the component did not reconnect through the tap ({self.connections} < {n})")
            time.sleep(0.02)
        self.authenticated_session(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        self._stopped = True
        self._listener.close()
        session = self._session
        if session is not None:
            session._shutdown()


# --------------------------------------------------------------------------- process checks


def rss_kib(pid: int) -> int:
    """Resident set size of process `pid` in KiB (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def assert_no_panic(component) -> None:
    """The component's log holds no Rust panic and the process is alive."""
    log = component.log_path.read_text(errors="replace") if component.log_path.exists() else ""
    lines = [line for line in log.splitlines() if "panicked" in line]
    assert not lines, f"the component panicked:\n" + "\n".join(lines[:5])
    assert component.pid is not None, f"the component process is gone\n{component.diagnostics()}"


# --------------------------------------------------------------------------- certificates


def load_key(identity: Identity):
    return serialization.load_pem_private_key(identity.key_pem, password=None)


def build_identity(
    key,
    *,
    xmpp_addrs: list[bytes] | None = None,
    cn: str = "hostile peer",
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    extra_extensions: list[x509.ExtensionType] = (),
) -> Identity:
    """A self-signed certificate for `key` with exactly the XmppAddr values given (raw DER of
    each otherName value, so a test can put a non-UTF8String there); [] leaves the
    subjectAltName out."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=365))
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if xmpp_addrs:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.OtherName(XMPP_ADDR_OID, value) for value in xmpp_addrs]),
            critical=False,
        )
    for ext in extra_extensions:
        builder = builder.add_extension(ext, critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return Identity(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        cert_der=cert.public_bytes(serialization.Encoding.DER),
    )


def xmpp_addr(jid: str) -> bytes:
    """The DER of an XmppAddr otherName value (a UTF8String)."""
    return der_utf8string(jid)


def new_key():
    return ec.generate_private_key(ec.SECP256R1())
