"""Helpers for testing the bot-facing API (docs/bot-api.md): a webhook receiver, an SSE reader,
poll helpers and small async utilities.  Standard library only.

`WebhookReceiver` is a real HTTP server (http.server, one thread per connection) on
127.0.0.1 with a free port.  It verifies every delivery as docs/bot-api.md describes the
Standard Webhooks signature (`whsec_` secret, HMAC-SHA256 over "<id>.<timestamp>.<body>",
`webhook-signature: v1,<base64>`), records it (`Delivery`: event id, seq, type, tunnel_id,
body, what we answered), answers `status` (200 by default; set it to 500 to fail), with a
JSON `{"reply": ...}` computed by `reply(envelope)` when that callback returns something.
`stop()` closes the listener *and* every open keep-alive connection, so the sender really
sees a server that is down; `start()` binds the same port again.

`SseStream` reads `GET /v1/bots/{jid}/events` as Server-Sent Events (http.client, a reader
thread parses `id`/`event`/`data` lines and keep-alive comments), optionally sending
`Last-Event-ID`.  `poll_events` / `EventPoller` read the same log by polling; polling with
`after=N` acknowledges up to N (the shared cursor), so `EventPoller` is for bots without
a webhook, and `read_log(after=0)` only acknowledges what it has already paged past.

The HTTP calls to the admin API are synchronous (urllib, in component.py): inside an async
scenario call them through `call(...)` (asyncio.to_thread), so that the event loop keeps
serving the XMPP client while the component answers (it may need that client to answer).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import queue
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

SIGNATURE_TOLERANCE_S = 300  # Standard Webhooks' recommended timestamp tolerance

# Appended to the config of the component the bot-API tests run: retries after 200 ms,
# doubling to at most 1 s, instead of the documented 1 s doubling to 10 min.
FAST_WEBHOOKS_CONFIG = """
[webhooks]
initial_backoff_ms = 200
max_backoff_ms = 1000
# The test receivers listen on loopback, which webhooks may not reach by default.
allowed_networks = ["127.0.0.0/8", "::1/128"]
"""


# --------------------------------------------------------------------------- async utilities


async def call(fn: Callable, *args, **kwargs):
    """Run a blocking call (admin API request, receiver wait) in a thread."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate` until it returns something truthy (returned); TimeoutError names `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- signatures


def new_webhook_secret(nbytes: int = 32) -> str:
    """A `whsec_<base64>` secret as docs/bot-api.md takes it."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(nbytes)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key: the base64-decoded part after `whsec_`."""
    if not secret.startswith("whsec_"):
        raise ValueError(f"webhook secret does not start with whsec_: {secret[:10]!r}")
    return base64.b64decode(secret[len("whsec_"):], validate=True)


def sign(secret: str, msg_id: str, timestamp: str | int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`."""
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def verify_delivery(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> list[str]:
    """What is wrong with one delivery's headers and signature ([] when it is valid)."""
    problems = []
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    signature = headers.get("webhook-signature")
    for name, value in (("webhook-id", msg_id), ("webhook-timestamp", timestamp), ("webhook-signature", signature)):
        if not value:
            problems.append(f"missing {name} header")
    if problems:
        return problems
    if not timestamp.isdigit():
        problems.append(f"webhook-timestamp is not Unix seconds: {timestamp!r}")
    elif abs((now if now is not None else time.time()) - int(timestamp)) > SIGNATURE_TOLERANCE_S:
        problems.append(f"webhook-timestamp {timestamp} is more than {SIGNATURE_TOLERANCE_S} s from now")
    expected = sign(secret, msg_id, timestamp, body)
    offered = [part for part in signature.split() if part.startswith("v1,")]
    if not offered:
        problems.append(f"no v1 signature in {signature!r}")
    elif not any(hmac.compare_digest(part, expected) for part in offered):
        problems.append(f"signature mismatch: got {signature!r}")
    content_type = headers.get("content-type", "")
    if not content_type.startswith("application/json"):
        problems.append(f"content-type is {content_type!r}, not application/json")
    try:
        envelope = json.loads(body)
    except ValueError:
        problems.append(f"body is not JSON: {body[:80]!r}")
    else:
        if not isinstance(envelope, dict) or envelope.get("id") != msg_id:
            problems.append(f"webhook-id {msg_id!r} is not the event id of the body")
    return problems


# --------------------------------------------------------------------------- webhook receiver


@dataclass
class Delivery:
    """One POST that reached the receiver, and what it answered."""

    n: int  # arrival order, from one counter shared with `answered_n`
    arrived: float  # time.monotonic()
    event_id: str | None  # the webhook-id header
    timestamp: str | None
    headers: dict[str, str]
    body: bytes
    envelope: dict | None
    problems: list[str]  # signature/header problems; [] = valid
    status: int = 0  # the HTTP status we answered
    answered_n: int = 0  # counter value taken just before the answer was written
    answered: float = 0.0  # time.monotonic() just before the answer was written
    reply: Any = None  # the `reply` value we sent back, if any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def seq(self) -> int | None:
        return None if self.envelope is None else self.envelope.get("seq")

    @property
    def type(self) -> str | None:
        return None if self.envelope is None else self.envelope.get("type")

    @property
    def tunnel_id(self) -> str | None:
        return None if self.envelope is None else self.envelope.get("tunnel_id")

    @property
    def data(self) -> dict:
        return {} if self.envelope is None else (self.envelope.get("data") or {})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # SO_REUSEADDR: bind the same port again after stop()

    def __init__(self, address, owner: "WebhookReceiver") -> None:
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        pass  # a connection reset or dropped by stop(): nothing to report

    def drop_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would offer
    disable_nagle_algorithm = True  # TCP_NODELAY on accepted connections, as common servers do

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def do_POST(self):  # noqa: N802
        self.server.owner._handle(self)

    def _not_allowed(self):
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_DELETE = _not_allowed  # noqa: N815

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


class WebhookReceiver:
    """A webhook endpoint on 127.0.0.1 (see the module docstring).

    `status`: what a valid delivery is answered with (mutable at any time).  `respond`,
    when set, decides the status per delivery instead.  `reply(envelope)` may return the
    value of `reply` for a 2xx answer (a dict such as {"body": ...}, a list, or None for no
    body).  `delay` seconds are slept before answering.  Invalid signatures get 401.
    """

    def __init__(
        self,
        secret: str | None = None,
        *,
        reply: Callable[[dict], Any] | None = None,
        status: int = 200,
        path: str = "/hook",
        port: int = 0,
    ) -> None:
        self.secret = secret or new_webhook_secret()
        self.reply = reply
        self.status = status
        self.respond: Callable[[Delivery], int] | None = None
        self.delay = 0.0
        self.path = path
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._counter = 0
        self._deliveries: list[Delivery] = []
        self.start()

    # -- lifecycle --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen (again) on the same port."""
        if self._server is not None:
            return
        self._server = _Server(("127.0.0.1", self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Go down: stop accepting, close the listener and every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        self._thread.join(timeout=5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "WebhookReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what arrived -----------------------------------------------------------------

    @property
    def deliveries(self) -> list[Delivery]:
        """Every POST so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._deliveries)

    def acked(self, type: str | None = None) -> list[Delivery]:  # noqa: A002
        """Deliveries answered with a 2xx (optionally of one event type), in answer order."""
        return sorted(
            (d for d in self.deliveries if d.ok and (type is None or d.type == type)), key=lambda d: d.answered_n
        )

    def acked_bodies(self) -> list[str | None]:
        """`data.body` of the acknowledged message.received events, in seq order."""
        return [d.data.get("body") for d in sorted(self.acked("message.received"), key=lambda d: d.seq)]

    def answered(self, status: int) -> list[Delivery]:
        return [d for d in self.deliveries if d.status == status]

    def invalid(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.problems]

    def wait_for(self, predicate: Callable[["WebhookReceiver"], Any], timeout: float, what: str = "condition"):
        """Block until `predicate(self)` is truthy (re-checked on every delivery); return it."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"webhook receiver: not within {timeout} s: {what}")
            with self._changed:
                self._changed.wait(min(left, 0.1))

    # -- the handler ------------------------------------------------------------------

    def _handle(self, handler: _Handler) -> None:
        arrived = time.monotonic()
        body = handler.read_body()
        headers = {k.lower(): v for k, v in handler.headers.items()}
        problems = verify_delivery(self.secret, headers, body)
        try:
            envelope = json.loads(body)
            if not isinstance(envelope, dict):
                envelope = None
        except ValueError:
            envelope = None
        with self._lock:
            self._counter += 1
            delivery = Delivery(
                n=self._counter, arrived=arrived, event_id=headers.get("webhook-id"),
                timestamp=headers.get("webhook-timestamp"), headers=headers, body=body,
                envelope=envelope, problems=problems,
            )
        if handler.path.split("?")[0] != self.path:
            status = 404
        elif problems:
            status = 401
        elif self.respond is not None:
            status = self.respond(delivery)
        else:
            status = self.status
        payload = b""
        if 200 <= status < 300 and self.reply is not None and envelope is not None:
            delivery.reply = self.reply(envelope)
            if delivery.reply is not None:
                payload = json.dumps({"reply": delivery.reply}).encode()
        if self.delay:
            time.sleep(self.delay)
        with self._changed:
            self._counter += 1
            delivery.status = status
            delivery.answered_n = self._counter
            delivery.answered = time.monotonic()
            self._deliveries.append(delivery)
            self._changed.notify_all()
        try:
            handler.send_response(status)
            if payload:
                handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            handler.wfile.flush()
        except OSError:
            pass  # stopped while answering: the sender sees a broken connection


def delivery_problems(deliveries: list[Delivery]) -> list[str]:
    """Violations of docs/bot-api.md's delivery rules in a receiver's record:

    * an invalid signature or header;
    * an event id acknowledged (2xx) twice;
    * one id carrying different envelopes on different attempts;
    * within one tunnel: an attempt at an event before every earlier event (lower seq) of
      that tunnel had been answered 2xx ("the next waits until the previous one is
      acknowledged"), and 2xx answers out of seq order.
    Dead-lettered events are not modelled: callers that expect dead letters check on their own.
    """
    problems = [f"seq {d.seq}: {p}" for d in deliveries for p in d.problems]
    acked: dict[str, Delivery] = {}
    envelopes: dict[str, dict | None] = {}
    for d in sorted(deliveries, key=lambda d: d.n):
        if d.event_id in envelopes and envelopes[d.event_id] != d.envelope:
            problems.append(f"event {d.event_id} was delivered with different bodies")
        envelopes.setdefault(d.event_id, d.envelope)
        if d.ok:
            if d.event_id in acked:
                problems.append(f"event {d.event_id} (seq {d.seq}) acknowledged twice")
            else:
                acked[d.event_id] = d
    by_tunnel: dict[str, list[Delivery]] = {}
    for d in deliveries:
        if d.tunnel_id is not None:
            by_tunnel.setdefault(d.tunnel_id, []).append(d)
    for tunnel, ds in by_tunnel.items():
        seqs = sorted({d.seq for d in ds})
        first_ok = {}
        for d in sorted((d for d in ds if d.ok), key=lambda d: d.answered_n):
            first_ok.setdefault(d.seq, d)
        ok_order = [d.seq for d in sorted(first_ok.values(), key=lambda d: d.answered_n)]
        if ok_order != sorted(ok_order):
            problems.append(f"tunnel {tunnel}: 2xx answers out of seq order: {ok_order}")
        for d in ds:
            for earlier in seqs:
                if earlier >= d.seq:
                    break
                ok = first_ok.get(earlier)
                if ok is None or ok.answered_n > d.n:
                    problems.append(
                        f"tunnel {tunnel}: seq {d.seq} attempted (#{d.n}) before seq {earlier} was acknowledged"
                    )
                    break
    return problems


# --------------------------------------------------------------------------- admin API shortcuts


def new_api_bot(component, prefix: str) -> str:
    """Create a bot with `"handler": "api"` and a fresh localpart; return its bare JID."""
    localpart = f"{prefix}{secrets.token_hex(4)}"
    status, bot = component.post("/v1/bots", {"localpart": localpart, "handler": "api"})
    assert status == 201, f"POST /v1/bots (api) -> {status}: {bot!r}"
    assert bot["jid"] == f"{localpart}@{component.domain}" and bot["handler"] == "api", bot
    return bot["jid"]


def put_webhook(component, bot: str, receiver: "WebhookReceiver", **extra) -> dict:
    """PUT the bot's webhook to `receiver` with the receiver's secret; returns the answer."""
    body = {"url": receiver.url, "secret": receiver.secret, **extra}
    status, answer = component.put(f"/v1/bots/{bot}/webhook", body)
    assert status in (200, 201), f"PUT webhook -> {status}: {answer!r}"
    assert "secret" not in answer, f"PUT webhook echoed a secret we supplied: {answer!r}"
    return answer


def post_message(component, bot: str, body: dict, *, key: str | None = None, token: bool | str = True):
    """POST /v1/bots/{bot}/messages (with an Idempotency-Key when given); returns (status, body)."""
    headers = {"Idempotency-Key": key} if key else None
    return component.post(f"/v1/bots/{bot}/messages", body, headers=headers, token=token, timeout=30.0)


def messages_received(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "message.received"]


# --------------------------------------------------------------------------- reading the log


def events_path(bot: str, **params) -> str:
    query = {k: v for k, v in params.items() if v is not None}
    return f"/v1/bots/{bot}/events" + ("?" + urllib.parse.urlencode(query) if query else "")


def poll_events(component, bot: str, *, after: int | None = None, limit: int | None = None,
                wait: int | None = None, token: bool | str = True):
    """`GET /v1/bots/{bot}/events` once; returns (status, body).  `wait` is whole seconds."""
    if wait is not None and int(wait) != wait:
        raise ValueError(f"wait is whole seconds, not {wait!r}")
    path = events_path(bot, after=after, limit=limit, wait=None if wait is None else int(wait))
    return component.get(path, token=token, timeout=(wait or 0) + 10.0)


def read_log(component, bot: str, after: int = 0, token: bool | str = True) -> list[dict]:
    """Every stored event with seq > `after`, paging by 1000 (acknowledges only what it paged past)."""
    events: list[dict] = []
    while True:
        status, body = poll_events(component, bot, after=after, limit=1000, token=token)
        assert status == 200, f"GET events?after={after} -> {status}: {body!r}"
        batch = body["events"]
        if not batch:
            return events
        events.extend(batch)
        after = batch[-1]["seq"]


class EventPoller:
    """Reads a bot's log by polling with `after` = the last seq seen (acknowledging as it goes)."""

    def __init__(self, component, bot: str, after: int = 0, token: bool | str = True) -> None:
        self.component = component
        self.bot = bot
        self.after = after
        self.token = token
        self.events: list[dict] = []
        self.last_body: dict | None = None

    def poll(self, wait: int = 1, limit: int = 1000) -> list[dict]:
        status, body = poll_events(self.component, self.bot, after=self.after, limit=limit, wait=wait, token=self.token)
        assert status == 200, f"GET events of {self.bot} after={self.after} -> {status}: {body!r}"
        self.last_body = body
        batch = body["events"]
        if batch:
            self.after = batch[-1]["seq"]
            self.events.extend(batch)
        return batch

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]

    async def until(self, predicate: Callable[[list[dict]], Any], timeout: float, what: str):
        """Long-poll until `predicate(self.events)` is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.events)
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"events of {self.bot}: not within {timeout} s: {what} (have {len(self.events)})")
            await call(self.poll, 1)


# --------------------------------------------------------------------------- Server-Sent Events


@dataclass
class SseEvent:
    id: str | None
    event: str
    data: str

    @property
    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class SseStream:
    """One `text/event-stream` GET, parsed by a reader thread (see the module docstring)."""

    base_url: str
    path: str
    token: str | None
    last_event_id: int | str | None = None
    timeout: float = 10.0
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    error_body: bytes = b""
    comments: int = 0  # ": keep-alive" and other comment lines seen
    received: list[SseEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        url = urllib.parse.urlsplit(self.base_url)
        self._events: queue.Queue[SseEvent | BaseException | None] = queue.Queue()
        self._conn = http.client.HTTPConnection(url.hostname, url.port, timeout=self.timeout)
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = str(self.last_event_id)
        self._conn.connect()
        self._sock = self._conn.sock
        self._conn.request("GET", self.path, headers=headers)
        self._resp = self._conn.getresponse()
        self.status = self._resp.status
        self.headers = {k.lower(): v for k, v in self._resp.getheaders()}
        self._closed = False
        if self.status != 200:
            self.error_body = self._resp.read()
            self._conn.close()
            self._thread = None
            return
        self._sock.settimeout(None)  # the reader blocks; close() unblocks it
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        data: list[str] = []
        event_type, event_id = "", None
        try:
            while True:
                raw = self._resp.readline()
                if not raw:
                    break
                line = raw.decode("utf-8").rstrip("\r\n")
                if line == "":
                    if data:
                        event = SseEvent(event_id, event_type or "message", "\n".join(data))
                        self.received.append(event)
                        self._events.put(event)
                    data, event_type = [], ""
                    continue
                if line.startswith(":"):
                    self.comments += 1
                    continue
                name, _, value = line.partition(":")
                if value.startswith(" "):
                    value = value[1:]
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event_type = value
                elif name == "id" and "\0" not in value:
                    event_id = value
        except Exception as exc:  # noqa: BLE001 - a broken stream ends the reader, reported once
            if not self._closed:
                self._events.put(exc)
        self._events.put(None)

    def next(self, timeout: float = 10.0) -> SseEvent:
        """The next event; TimeoutError when none comes, EOFError when the stream ended."""
        try:
            item = self._events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"SSE {self.path}: no event within {timeout} s") from None
        if item is None:
            self._events.put(None)
            raise EOFError(f"SSE {self.path}: stream ended")
        if isinstance(item, BaseException):
            raise EOFError(f"SSE {self.path}: {item}") from item
        return item

    def take(self, n: int, timeout: float = 10.0) -> list[SseEvent]:
        """The next `n` events within `timeout` seconds overall."""
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"SSE {self.path}: {len(out)} of {n} events within {timeout} s")
            out.append(self.next(left))
        return out

    def take_until(self, predicate: Callable[[SseEvent], bool], timeout: float = 10.0) -> list[SseEvent]:
        """Events up to and including the first one for which `predicate` is true."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"SSE {self.path}: no matching event within {timeout} s ({len(out)} others)")
            out.append(self.next(left))
            if predicate(out[-1]):
                return out

    def close(self) -> None:
        """Hang up (unblocks the reader thread first, then closes the connection)."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._resp.close()
        self._conn.close()

    def __enter__(self) -> "SseStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_sse(component, bot: str, *, last_event_id: int | None = None, after: int | None = None,
             token: bool | str = True, timeout: float = 10.0) -> SseStream:
    """SSE on `/v1/bots/{bot}/events` of `component` (anything with base_url and token)."""
    bearer = component.token if token is True else (token or None)
    return SseStream(component.base_url, events_path(bot, after=after), bearer, last_event_id, timeout)
