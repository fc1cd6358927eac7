"""The slixmpp plugin: XTLS tunnels on any `ClientXMPP`, opened (`open`) and accepted,
announced in service discovery, with events for the application."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
import xml.etree.ElementTree as ET
from typing import Callable

from slixmpp import JID
from slixmpp.plugins.base import BasePlugin
from slixmpp.stanza import Iq
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

from .identity import Identity
from .known import KnownKeys
from .tunnel import NS_XTLS, Tunnel, TunnelClosed, XtlsError, error_of

log = logging.getLogger(__name__)

NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"


class _Match(MatcherBase):
    def __init__(self, predicate: Callable[[Iq], bool]) -> None:
        super().__init__(None)
        self._predicate = predicate

    def match(self, xml) -> bool:
        return isinstance(xml, Iq) and self._predicate(xml)


class XTLS(BasePlugin):
    """End-to-end TLS tunnels through the XMPP server (`urn:xmpp:tmp:xtls`).

    Configuration (`register_plugin("xtls", {...})`):

    - `identity`: the `Identity` presented in every tunnel; by default one kept in `key_dir`
      (made on first use), or a new one in memory when `key_dir` is not given either.
    - `key_dir`: where `identity` is kept.
    - `known_keys`: a path for the peers' keys (the `xtls` client's `known_bots` format), or
      a `KnownKeys`; in memory by default.
    - `trust`: `"tofu"` (a new peer's key is remembered, a changed one refused) or `"known"`
      (only keys already in `known_keys`).
    - `accept`: whether peers may open tunnels to us: True, False, or a function of the peer's
      JID.
    - `window`: `<data/>` IQs in flight per tunnel (4).
    - `max_tunnels`: tunnels at once (100); a `start` beyond is refused, to be tried later.
    - `inbox`: stanzas kept per tunnel for `Tunnel.recv` (256); an application that only
      handles events loses nothing to it, and a peer cannot fill memory.

    Events: `xtls_opened` (a `Tunnel`), `xtls_stanza` (`(tunnel, stanza)`, routing restored),
    `xtls_iq` (`(tunnel, iq)`: an inner IQ request, which the handler must answer; without a
    handler it is answered `service-unavailable`),
    `xtls_sas` (`(tunnel, (code, digits))` when the peer ran the short authentication string
    exchange), `xtls_sas_failed` (a tunnel), `xtls_closed` (a tunnel; `tunnel.reason` says why).
    """

    name = "xtls"
    description = "XTLS: end-to-end encrypted tunnels in IQ stanzas"
    dependencies = {"xep_0030"}
    default_config = {
        "identity": None,
        "key_dir": None,
        "known_keys": None,
        "trust": "tofu",
        "accept": True,
        "window": 4,
        "max_tunnels": 100,
        "inbox": 256,
    }

    def plugin_init(self) -> None:
        identity = self.config.get("identity")
        if identity is None:
            own = str(self.xmpp.boundjid.bare)
            key_dir = self.config.get("key_dir")
            identity = (Identity.load_or_create(os.path.expanduser(key_dir), own) if key_dir
                        else Identity.generate(own))
        self.identity: Identity = identity
        known = self.config.get("known_keys")
        if known is not None and not isinstance(known, KnownKeys):
            known = KnownKeys(os.path.expanduser(known))
        self.known: KnownKeys = known if known is not None else KnownKeys()
        self._tunnels: dict[str, Tunnel] = {}
        self._pending: dict[str, tuple[str, Callable[[str, ET.Element | BaseException], None]]] = {}
        self.xmpp.register_handler(Callback("xtls answers", _Match(self._is_answer), self._on_answer))
        self.xmpp.register_handler(Callback("xtls requests", _Match(self._is_request), self._on_request))
        self.xmpp.add_event_handler("disconnected", self._on_disconnected)
        self.xmpp.add_event_handler("presence_unavailable", self._on_unavailable)

    def session_bind(self, jid) -> None:
        self.xmpp.plugin["xep_0030"].add_feature(NS_XTLS)

    def plugin_end(self) -> None:
        self.xmpp.remove_handler("xtls answers")
        self.xmpp.remove_handler("xtls requests")
        self.xmpp.plugin["xep_0030"].del_feature(feature=NS_XTLS)

    # -- the application's side ----------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """Our own key's fingerprint (SPKI SHA-256), to give to the people we talk to."""
        return self.identity.spki_sha256

    def tunnel(self, peer: str) -> Tunnel | None:
        """The live tunnel with `peer`, if any."""
        return self._tunnels.get(str(JID(peer)))

    async def supports(self, peer: str, timeout: float = 10.0) -> bool:
        """Whether `peer` lists XTLS in its service discovery."""
        query = ET.Element(f"{{{NS_DISCO_INFO}}}query")
        answer = await self._request(peer, query, timeout, "get")
        if answer.get("type") == "error":
            return False
        return any(f.get("var") == NS_XTLS for f in answer.iter(f"{{{NS_DISCO_INFO}}}feature"))

    async def open(self, peer: str, timeout: float = 30.0) -> Tunnel:
        """Opens a tunnel to `peer` (a bot's bare JID or a person's full JID) and returns it
        open; raises `XtlsError` when refused and `TunnelClosed` when the handshake failed
        (a key that changed among them: see `tunnel.reason`)."""
        key = str(JID(peer))
        if key in self._tunnels:
            raise TunnelClosed(f"a tunnel with {key} is already live")
        tunnel = Tunnel(self, key, role="initiator", local=str(self.xmpp.boundjid.full))
        self._tunnels[key] = tunnel
        try:
            await tunnel._open(timeout)
        except BaseException as exc:
            tunnel._gone("failed", tunnel.reason or str(exc) or type(exc).__name__)
            raise
        return tunnel

    # -- requests from peers -------------------------------------------------------------

    def _is_request(self, iq: Iq) -> bool:
        return iq["type"] in ("set", "get") and any(c.tag.startswith(f"{{{NS_XTLS}}}") for c in iq.xml)

    def _on_request(self, iq: Iq) -> None:
        try:
            self._handle_request(iq)
        except Exception:  # one bad tunnel must not bring an error answer to a result
            log.exception("xtls: handling %s from %s failed", iq["id"], iq["from"])
            tunnel = self._tunnels.get(str(iq["from"]))
            if tunnel is not None:
                tunnel._gone("failed", "internal error; see the log")

    def _handle_request(self, iq: Iq) -> None:
        xml = iq.xml
        child = next(c for c in xml if c.tag.startswith(f"{{{NS_XTLS}}}"))
        name = child.tag.split("}", 1)[1]
        peer = str(iq["from"])
        if name in ("proceed", "closed") or iq["type"] != "set" or len(xml) != 1:
            return self._reply_error(xml, "bad-request", "modify")
        if name == "start":
            return self._on_start(xml, peer)
        if name not in ("data", "close"):
            return self._reply_error(xml, "feature-not-implemented")
        tunnel = self._tunnels.get(peer)
        if tunnel is None:
            return self._reply_error(xml, "item-not-found")
        if name == "data":
            tunnel._on_data(xml, child)
        else:
            tunnel._on_close(xml)

    def _on_start(self, xml: ET.Element, peer: str) -> None:
        accept = self.config.get("accept", True)
        if not (accept(peer) if callable(accept) else accept):
            return self._reply_error(xml, "not-acceptable")
        existing = self._tunnels.get(peer)
        if existing is None and len(self._tunnels) >= self.config.get("max_tunnels", 100):
            return self._reply_error(xml, "resource-constraint", "wait")
        if existing is not None:
            if existing.state == "starting" and str(self.xmpp.boundjid.full).encode() < peer.encode():
                return self._reply_error(xml, "conflict")
            existing._gone("failed", f"replaced by a new start from {peer}")
        tunnel = Tunnel(self, peer, role="responder", local=xml.get("to") or str(self.xmpp.boundjid.full))
        self._tunnels[peer] = tunnel
        self._reply_result(xml, ET.Element(f"{{{NS_XTLS}}}proceed"))

    # -- IQ plumbing ---------------------------------------------------------------------

    def _send_iq(self, to: str, child: ET.Element, callback, kind: str = "set") -> str:
        iq = self.xmpp.make_iq(ito=to, itype=kind)
        iq["id"] = uuid.uuid4().hex
        iq.append(child)
        self._pending[iq["id"]] = (str(JID(to)), callback)
        self.xmpp.send(iq)
        return iq["id"]

    async def _request(self, to: str, child: ET.Element, timeout: float, kind: str = "set") -> ET.Element:
        future: asyncio.Future[ET.Element] = asyncio.get_running_loop().create_future()

        def done(_id: str, answer: ET.Element | BaseException) -> None:
            if future.done():
                return
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)

        iq_id = self._send_iq(to, child, done, kind)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self._pending.pop(iq_id, None)
            raise TimeoutError(f"no answer from {to} within {timeout} s") from None

    def _is_answer(self, iq: Iq) -> bool:
        return iq["type"] in ("result", "error") and iq["id"] in self._pending

    def _on_answer(self, iq: Iq) -> None:
        expected, callback = self._pending[iq["id"]]
        if str(iq["from"]) != expected:
            return  # an answer from anyone but the JID asked is not an answer (ignored)
        del self._pending[iq["id"]]
        try:
            callback(iq["id"], iq.xml)
        except Exception:
            log.exception("xtls: handling the answer %s from %s failed", iq["id"], iq["from"])

    def _on_unavailable(self, presence) -> None:
        """A peer that goes offline takes its TLS state with it: its tunnels end."""
        gone = str(presence["from"])
        for tunnel in list(self._tunnels.values()):
            if tunnel.peer == gone or (JID(gone).resource == "" and JID(tunnel.peer).bare == gone):
                tunnel._gone("failed", "the peer went offline")

    def _reply_result(self, request: ET.Element, payload: ET.Element | None = None) -> None:
        iq = self.xmpp.make_iq(ito=request.get("from"), itype="result", id=request.get("id"))
        if request.get("to"):
            iq["from"] = request.get("to")
        if payload is not None:
            iq.append(payload)
        self.xmpp.send(iq)

    def _reply_error(self, request: ET.Element, condition: str, kind: str = "cancel") -> None:
        iq = self.xmpp.make_iq(ito=request.get("from"), itype="error", id=request.get("id"))
        if request.get("to"):
            iq["from"] = request.get("to")
        iq["error"]["condition"] = condition
        iq["error"]["type"] = kind
        self.xmpp.send(iq)

    def _forget(self, tunnel: Tunnel) -> None:
        if self._tunnels.get(tunnel.peer) is tunnel:
            del self._tunnels[tunnel.peer]

    def _on_disconnected(self, _reason) -> None:
        for iq_id, (_, callback) in list(self._pending.items()):
            del self._pending[iq_id]
            callback(iq_id, TunnelClosed("the XMPP connection was lost"))
        for tunnel in list(self._tunnels.values()):
            tunnel._gone("failed", "the XMPP connection was lost")


__all__ = ["XTLS", "XtlsError", "TunnelClosed", "error_of"]
