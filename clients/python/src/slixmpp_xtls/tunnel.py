"""One XTLS tunnel with one peer, in either role: `start`/`proceed`, the TLS handshake in
`<data/>` IQs with a window of unacknowledged ones, inner stanzas with their routing stripped
and restored, `close`/`closed`; the short authentication string and pairing inside it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from typing import TYPE_CHECKING, Callable

from slixmpp import JID, InvalidJID

from .identity import spki_sha256
from .tls import TlsEngine, TlsError
from .verify import (CHANNEL_BINDING_LABEL, NS_PAIR, NS_SAS, SAS_LABEL, b64, commitment, normalize_code,
                     pair_confirmation, sas_code, unb64)

if TYPE_CHECKING:
    from .plugin import XTLS

log = logging.getLogger(__name__)

NS_XTLS = "urn:xmpp:tmp:xtls"
NS_CLIENT = "jabber:client"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
MAX_CHUNK = 65535
MAX_QUEUED = 1 << 20  # ciphertext waiting for the window, per tunnel
HANDSHAKE_TIMEOUT = 90.0
ACK_TIMEOUT = 60.0
XML_WHITESPACE = {ord(c): None for c in " \t\r\n"}


class XtlsError(Exception):
    """The peer (or a server for it) answered with a stanza error `condition`."""

    def __init__(self, condition: str, text: str = "", *, request: str = "") -> None:
        self.condition = condition
        self.text = text
        detail = f" ({text})" if text else ""
        super().__init__(f"{request or 'request'} answered with {condition}{detail}")


class TunnelClosed(Exception):
    """The tunnel is gone; `reason` says why."""


class TunnelBusy(Exception):
    """The peer does not take our data fast enough: more than 1 MiB waits for its window."""


def bare(jid: str) -> str:
    """The bare form of `jid`."""
    return str(JID(jid).bare)


def error_of(stanza: ET.Element) -> tuple[str, str]:
    """(condition, text) of a stanza error."""
    err = stanza.find(f"{{{NS_CLIENT}}}error")
    condition, text = "undefined-condition", ""
    for child in [] if err is None else list(err):
        if child.tag == f"{{{NS_STANZAS}}}text":
            text = child.text or ""
        elif child.tag.startswith(f"{{{NS_STANZAS}}}"):
            condition = child.tag.split("}", 1)[1]
    return condition, text


def message(body: str) -> bytes:
    """An inner chat message without routing."""
    msg = ET.Element("message", {"xmlns": NS_CLIENT, "type": "chat", "id": uuid.uuid4().hex[:12]})
    ET.SubElement(msg, "body").text = body
    return ET.tostring(msg)


def _inner_iq(kind: str, iq_id: str, ns: str = "", name: str = "", payload: bytes | None = None) -> bytes:
    iq = ET.Element("iq", {"xmlns": NS_CLIENT, "type": kind, "id": iq_id})
    if name:
        ET.SubElement(iq, f"{{{ns}}}{name}").text = None if payload is None else b64(payload)
    return ET.tostring(iq, default_namespace=None)


class Tunnel:
    """One tunnel. `state` is starting, handshaking, open, closing, closed or failed; `reason`
    says why it ended. The application reads `peer_spki_sha256` and `key_status` ("new",
    "known", "verified") once it is open."""

    def __init__(self, plugin: "XTLS", peer: str, *, role: str, local: str) -> None:
        self.plugin = plugin
        self.peer = peer
        self.local = local
        self.role = role
        self.state = "starting" if role == "initiator" else "handshaking"
        self.reason: str | None = None
        self.key_status: str | None = None
        self.engine = TlsEngine(plugin.identity, server_side=role == "responder", judge=self._judge)
        self._window = plugin.config.get("window", 4)
        self._sendq: deque[tuple[bytes, bool]] = deque()
        self._inflight: dict[str, bool] = {}
        self._hs_outstanding = 0
        self._first_data_out = role == "initiator"
        self._first_data_in = role == "responder"
        self._close_notify_sent = False
        self._key_verdict: str | None = None
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._progress = asyncio.Event()
        # Stanzas for `recv`; the oldest go once an application that reads events only has
        # left `inbox` of them unread, so a peer cannot fill our memory.
        self._inbox: deque[ET.Element] = deque(maxlen=plugin.config.get("inbox", 256))
        self._waiting: dict[str, asyncio.Future[ET.Element]] = {}
        self._sas_answer: tuple[bytes, bytes] | None = None  # (their commitment, our nonce)
        loop = asyncio.get_running_loop()
        self._timers = [loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_deadline)]

    # -- what the application uses -------------------------------------------------------

    @property
    def peer_spki_sha256(self) -> str | None:
        """The fingerprint of the key the peer presented."""
        der = self.engine.peer_cert_der
        return None if der is None else spki_sha256(der)

    async def wait_open(self, timeout: float = 30.0) -> None:
        """Returns once the handshake is done and the peer accepted; raises why otherwise."""
        await asyncio.wait_for(asyncio.shield(self._opened), timeout)

    async def send_message(self, body: str, timeout: float = 30.0) -> None:
        """Sends a chat message through the tunnel."""
        await self.send(message(body), timeout)

    async def send(self, stanza: bytes | str | ET.Element, timeout: float = 30.0) -> None:
        """Sends an inner stanza (no `from`/`to`); returns once it fits the window."""
        self.write(stanza)
        await self._wait(lambda: not self._sendq, timeout, "room in the window")

    def write(self, stanza: bytes | str | ET.Element) -> None:
        """Queues an inner stanza without waiting (for event handlers)."""
        if self.state != "open" or self._close_notify_sent:
            raise TunnelClosed(f"the tunnel with {self.peer} is {self.state}")
        if sum(len(chunk) for chunk, _ in self._sendq) > MAX_QUEUED:
            raise TunnelBusy(f"{self.peer} does not acknowledge our data: more than 1 MiB waits")
        if isinstance(stanza, ET.Element):
            stanza.attrib.pop("from", None)
            stanza.attrib.pop("to", None)
            stanza = ET.tostring(stanza)
        raw = stanza.encode() if isinstance(stanza, str) else stanza
        self.engine.write(_without_routing(raw))
        self._enqueue(handshake=False)

    async def recv(self, timeout: float = 30.0) -> ET.Element:
        """The next inner stanza (routing restored), in order; the same stanzas also come as
        `xtls_stanza` events."""
        await self._wait(lambda: bool(self._inbox), timeout, "stanza")
        return self._inbox.popleft()

    async def recv_message(self, timeout: float = 30.0) -> str:
        """The body of the next message."""
        while True:
            stanza = await self.recv(timeout)
            body = stanza.find(f"{{{NS_CLIENT}}}body")
            if stanza.tag == f"{{{NS_CLIENT}}}message" and body is not None:
                return body.text or ""

    async def request(self, iq: bytes, timeout: float = 30.0) -> ET.Element:
        """Sends an inner IQ request and returns its answer (an error raises `XtlsError`)."""
        iq_id = ET.fromstring(iq).get("id") or ""
        future: asyncio.Future[ET.Element] = asyncio.get_running_loop().create_future()
        self._waiting[iq_id] = future
        try:
            await self.send(iq, timeout)
            answer = await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(iq_id, None)
        if answer.get("type") == "error":
            raise XtlsError(*error_of(answer), request="inner IQ")
        return answer

    async def start_sas(self, timeout: float = 30.0) -> tuple[str, str]:
        """Runs the short authentication string exchange as committer; returns the code to
        compare with the peer's: (five characters, six digits)."""
        ours = os.urandom(32)
        answer = await self.request(_inner_iq("set", f"sas-{uuid.uuid4().hex[:8]}", NS_SAS, "commit",
                                              commitment(ours)), timeout)
        theirs = unb64(answer.findtext(f"{{{NS_SAS}}}nonce"), 32)
        await self.request(_inner_iq("set", f"sas-{uuid.uuid4().hex[:8]}", NS_SAS, "reveal", ours), timeout)
        return sas_code(self.engine.export(SAS_LABEL, ours + theirs))

    async def pair(self, code: str, timeout: float = 30.0) -> None:
        """Pairs with the code the peer's operator gave (SPAKE2, side A); once it returns the
        peer proved it knows the code, and its key is recorded as verified."""
        from spake2 import SPAKE2_A

        spake = SPAKE2_A(normalize_code(code).encode(), idA=bare(self.local).encode(), idB=bare(self.peer).encode())
        answer = await self.request(_inner_iq("set", f"pair-{uuid.uuid4().hex[:8]}", NS_PAIR, "pake",
                                              spake.start()), timeout)
        key = spake.finish(unb64(answer.findtext(f"{{{NS_PAIR}}}pake")))
        cb = self.engine.export(CHANNEL_BINDING_LABEL, b"")
        answer = await self.request(_inner_iq("set", f"pair-{uuid.uuid4().hex[:8]}", NS_PAIR, "confirm",
                                              pair_confirmation(key, "A", cb)), timeout)
        theirs = unb64(answer.findtext(f"{{{NS_PAIR}}}confirm"), 32)
        if theirs != pair_confirmation(key, "B", cb):
            raise XtlsError("not-authorized", "the peer does not know the code", request="pair")
        self.verified()

    def verified(self) -> None:
        """Records the peer's key as verified (after the codes were compared, or a pairing)."""
        spki = self.peer_spki_sha256
        if spki is not None:
            self.plugin.known.remember(bare(self.peer), spki, "verified")
            self.key_status = "verified"

    async def close(self, timeout: float = 30.0) -> None:
        """Closes gracefully: close_notify, then `<close/>` answered by `<closed/>`."""
        if self.state in ("closed", "failed"):
            return
        if self.state == "open" and not self._close_notify_sent:
            self.engine.close_notify()
            self._close_notify_sent = True
            self._enqueue(handshake=False)
            await self._wait(lambda: not self._sendq and not self._inflight, timeout, "acks before closing")
        if self.state in ("closed", "failed"):
            return
        self.state = "closing"
        try:
            reply = await self.plugin._request(self.peer, ET.Element(f"{{{NS_XTLS}}}close"), timeout)
        except (XtlsError, TimeoutError, asyncio.TimeoutError) as exc:
            self._gone("failed", f"close: {exc}")
            return
        if reply.find(f"{{{NS_XTLS}}}closed") is None and self.state == "closing":
            self._gone("failed", "the answer to <close/> carried no <closed/>")
        self._gone("closed", "closed by us")

    # -- judging the peer ----------------------------------------------------------------

    def _judge(self, cert_der: bytes) -> str | None:
        """Called by TLS with the peer's certificate: its XmppAddr must be the peer's bare JID,
        and its key the one we know for it, if we know one."""
        try:
            return self._judge_certificate(cert_der)
        except Exception as exc:  # a hostile certificate must fail the handshake, nothing else
            return f"the certificate cannot be read: {exc}"

    def _judge_certificate(self, cert_der: bytes) -> str | None:
        from .identity import xmpp_addrs

        expected = bare(self.peer)
        names = xmpp_addrs(cert_der)
        if expected not in names:
            return f"the certificate names {names}, not {expected}"
        spki = spki_sha256(cert_der)
        verdict = self.plugin.known.check(expected, spki)
        if verdict == "changed":
            known = self.plugin.known.get(expected)
            return f"key changed: {expected} presented {spki}, not the key known since {known.since}: {known.spki_sha256}"
        if verdict == "new" and self.plugin.config.get("trust", "tofu") != "tofu":
            return f"{expected} presented {spki}, a key not known"
        self._key_verdict = verdict
        return None

    # -- the wire ------------------------------------------------------------------------

    async def _open(self, timeout: float) -> None:
        """Initiator: start -> proceed -> handshake -> open."""
        started = time.monotonic()
        reply = await self.plugin._request(self.peer, ET.Element(f"{{{NS_XTLS}}}start"), timeout)
        if self.state != "starting":
            raise TunnelClosed(self.reason or f"the tunnel with {self.peer} is {self.state}")
        if reply.get("type") == "error":
            condition, text = error_of(reply)
            self._gone("failed", f"start refused: {condition}")
            raise XtlsError(condition, text, request="start")
        self.state = "handshaking"
        self.engine.start()
        self._enqueue(handshake=True)
        await self.wait_open(max(0.1, timeout - (time.monotonic() - started)))

    def _enqueue(self, *, handshake: bool) -> None:
        for chunk in self.engine.take_chunks():
            self._sendq.append((chunk, handshake))
            if handshake:
                self._hs_outstanding += 1
        self._pump()

    def _pump(self) -> None:
        while self._sendq and len(self._inflight) < self._window and self.state in ("handshaking", "open"):
            chunk, handshake = self._sendq.popleft()
            data = ET.Element(f"{{{NS_XTLS}}}data")
            if self._first_data_out:
                data.set("method", "x509")
                self._first_data_out = False
            data.text = base64.b64encode(chunk).decode("ascii")
            iq_id = self.plugin._send_iq(self.peer, data, self._on_ack)
            self._inflight[iq_id] = handshake
            self._timers.append(asyncio.get_running_loop().call_later(ACK_TIMEOUT, self._ack_deadline, iq_id))
        self._progress.set()

    def _on_ack(self, iq_id: str, reply: ET.Element | BaseException) -> None:
        handshake = self._inflight.pop(iq_id, None)
        if handshake is None or self.state in ("closed", "failed"):
            return
        if isinstance(reply, BaseException):
            return self._gone("failed", str(reply))
        if reply.get("type") == "error":
            condition, text = error_of(reply)
            return self._gone("failed", f"the peer refused our data: {condition} {text}".strip())
        if handshake:
            self._hs_outstanding -= 1
        self._pump()
        self._check_open()

    def _check_open(self) -> None:
        if self.state != "handshaking" or not self.engine.handshake_done:
            return
        if self.role == "initiator" and self._hs_outstanding:
            return
        self.state = "open"
        spki = self.peer_spki_sha256
        peer_bare = bare(self.peer)
        if self._key_verdict == "new" and spki is not None:
            try:
                if self.plugin.known.get(peer_bare) is None:  # a pin is only set where none was
                    self.plugin.known.remember(peer_bare, spki, "tofu")
            except OSError as exc:
                log.warning("cannot record the key of %s: %s", peer_bare, exc)
            self.key_status = "new"
        else:
            known = self.plugin.known.get(peer_bare)
            self.key_status = "verified" if known is not None and known.how == "verified" else "known"
        if not self._opened.done():
            self._opened.set_result(None)
        self._progress.set()
        self.plugin.xmpp.event("xtls_opened", self)

    def _on_data(self, iq: ET.Element, data: ET.Element) -> None:
        """A `<data/>` request for this tunnel."""
        if self.state == "starting":
            self.plugin._reply_error(iq, "unexpected-request")
            return self._gone("failed", "data before our start was answered")
        if self.state not in ("handshaking", "open", "closing"):
            return self.plugin._reply_error(iq, "item-not-found")
        if self._first_data_in:
            self._first_data_in = False
            if data.get("method") not in (None, "x509"):
                self.plugin._reply_error(iq, "feature-not-implemented")
                return self._gone("failed", f"unsupported method {data.get('method')!r}")
        text = (data.text or "").translate(XML_WHITESPACE)
        try:
            payload = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self.plugin._reply_error(iq, "bad-request")
            return self._gone("failed", "the peer sent data that is not base64")
        if len(payload) > MAX_CHUNK:
            self.plugin._reply_error(iq, "policy-violation")
            return self._gone("failed", f"the peer sent a chunk of {len(payload)} bytes")
        try:
            stanzas = self.engine.feed(payload)
        except TlsError as exc:
            if exc.alert:
                self.plugin._reply_result(iq)
                return self._gone("failed", f"the peer's TLS refused: {exc}")
            for chunk in self.engine.take_chunks():  # our alert
                alert = ET.Element(f"{{{NS_XTLS}}}data")
                alert.text = base64.b64encode(chunk).decode("ascii")
                self.plugin._send_iq(self.peer, alert, lambda *_: None)
            self.plugin._reply_error(iq, "not-acceptable" if exc.rejected else "bad-request")
            return self._gone("failed", f"certificate refused: {exc.rejected}" if exc.rejected else f"TLS: {exc}")
        except ET.ParseError as exc:
            self.plugin._reply_result(iq)
            self._gone("failed", f"the peer sent XML that is not well formed: {exc}")
            self.plugin._send_iq(self.peer, ET.Element(f"{{{NS_XTLS}}}close"), lambda *_: None)
            return
        self.plugin._reply_result(iq)
        if self.state == "handshaking":
            self._enqueue(handshake=True)
            self._check_open()
        for stanza in stanzas:
            self._deliver(stanza)
        self._progress.set()

    def _deliver(self, stanza: ET.Element) -> None:
        """Restores routing, handles verification IQs, hands the rest up."""
        frm, to = stanza.get("from"), stanza.get("to")
        try:
            if frm is not None and bare(frm) != bare(self.peer):
                return
            if to is not None and to not in (self.local, bare(self.local)):
                return
        except InvalidJID:
            return
        stanza.set("from", self.peer)
        stanza.set("to", self.local)
        if stanza.tag == f"{{{NS_CLIENT}}}iq":
            kind, iq_id = stanza.get("type"), stanza.get("id") or ""
            if kind in ("result", "error") and iq_id in self._waiting:
                future = self._waiting.pop(iq_id)
                if not future.done():
                    future.set_result(stanza)
                return
            if kind == "set" and self._on_sas(stanza):
                return
            if kind in ("get", "set"):
                # Requests have their own event, and get an error when nobody handles it: an
                # inner IQ request gets exactly one answer.
                if self.plugin.xmpp.event_handled("xtls_iq"):
                    self.plugin.xmpp.event("xtls_iq", (self, stanza))
                elif self.state == "open" and not self._close_notify_sent:
                    self.write(_inner_error(iq_id, "service-unavailable"))
                return
        self._inbox.append(stanza)
        self._progress.set()
        self.plugin.xmpp.event("xtls_stanza", (self, stanza))

    def _on_sas(self, iq: ET.Element) -> bool:
        """Answers the peer's short authentication string exchange; True when `iq` was one."""
        commit = iq.find(f"{{{NS_SAS}}}commit")
        reveal = iq.find(f"{{{NS_SAS}}}reveal")
        iq_id = iq.get("id") or ""
        if commit is None and reveal is None:
            return False
        if self.state != "open" or self._close_notify_sent:
            return True  # closing: no answer can go through the tunnel any more
        try:
            if commit is not None:
                ours = os.urandom(32)
                self._sas_answer = (unb64(commit.text, 32), ours)
                self.write(_inner_iq("result", iq_id, NS_SAS, "nonce", ours))
                return True
            theirs = unb64(reveal.text, 32)
            if self._sas_answer is None:
                self.write(_inner_error(iq_id, "unexpected-request"))
                return True
            committed, ours = self._sas_answer
            self._sas_answer = None
            if commitment(theirs) != committed:
                self.write(_inner_error(iq_id, "not-acceptable"))
                self.plugin.xmpp.event("xtls_sas_failed", self)
                return True
            self.write(_inner_iq("result", iq_id))
            self.plugin.xmpp.event("xtls_sas", (self, sas_code(self.engine.export(SAS_LABEL, theirs + ours))))
        except ValueError:
            self.write(_inner_error(iq_id, "bad-request"))
        except TunnelBusy:
            pass  # the peer floods us with requests and takes no answers: they wait with it
        return True

    def _on_close(self, iq: ET.Element) -> None:
        """The peer's `<close/>`: answer `<closed/>`."""
        self.plugin._reply_result(iq, ET.Element(f"{{{NS_XTLS}}}closed"))
        graceful = self.state == "closing" or self.engine.peer_eof
        self._gone("closed" if graceful else "failed",
                   "closed by the peer" if graceful else "the peer closed without close_notify")

    def _gone(self, state: str, reason: str) -> None:
        if self.state in ("closed", "failed"):
            return
        self.state = state
        self.reason = reason
        self._sendq.clear()
        for timer in self._timers:
            timer.cancel()
        self.plugin._forget(self)
        if not self._opened.done():
            self._opened.set_exception(TunnelClosed(reason))
            self._opened.exception()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(TunnelClosed(reason))
        self._progress.set()
        self.plugin.xmpp.event("xtls_closed", self)

    def _handshake_deadline(self) -> None:
        if self.state in ("starting", "handshaking"):
            self._fail_and_close(f"the handshake did not finish within {HANDSHAKE_TIMEOUT:.0f} s")

    def _ack_deadline(self, iq_id: str) -> None:
        if iq_id in self._inflight and self.state not in ("closed", "failed"):
            self._fail_and_close(f"our data was not acknowledged within {ACK_TIMEOUT:.0f} s")

    def _fail_and_close(self, reason: str) -> None:
        """Ends the tunnel and tells the peer with `<close/>` (best effort)."""
        self._gone("failed", reason)
        self.plugin._send_iq(self.peer, ET.Element(f"{{{NS_XTLS}}}close"), lambda *_: None)

    async def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.state in ("closed", "failed"):
                raise TunnelClosed(f"the tunnel with {self.peer} ended: {self.reason}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the tunnel with {self.peer}: no {what} within {timeout} s")
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), left)
            except asyncio.TimeoutError:
                pass


def _without_routing(stanza: bytes) -> bytes:
    """The stanza with `from` and `to` removed from its start tag: the tunnel stands for them."""
    match = re.match(rb"\s*<[^>]*>", stanza)
    if match is None:
        return stanza
    start = re.sub(rb"""\s(?:from|to)\s*=\s*(?:'[^']*'|"[^"]*")""", b"", match.group(0))
    return start + stanza[match.end():]


def _inner_error(iq_id: str, condition: str) -> bytes:
    iq = ET.Element("iq", {"xmlns": NS_CLIENT, "type": "error", "id": iq_id})
    error = ET.SubElement(iq, "error", {"type": "cancel"})
    ET.SubElement(error, f"{{{NS_STANZAS}}}{condition}")
    return ET.tostring(iq)
