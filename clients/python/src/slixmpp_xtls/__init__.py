"""XTLS for slixmpp: end-to-end encrypted TLS tunnels between XMPP clients and bots, carried
in IQ stanzas the servers relay but cannot read.

    import slixmpp_xtls
    xmpp.register_plugin("xtls", {"key_dir": "~/.config/mybot", "known_keys": "known_peers"})
    tunnel = await xmpp.plugin["xtls"].open("weather@bots.example.org")
"""

from slixmpp.plugins.base import register_plugin

from .identity import Identity, cert_sha256, spki_sha256, xmpp_addrs
from .known import KnownKey, KnownKeys
from .plugin import XTLS
from .tls import TlsEngine, TlsError
from .tunnel import Tunnel, TunnelClosed, XtlsError, message as chat_message
from .verify import normalize_code, sas_code

register_plugin(XTLS)

__all__ = [
    "XTLS", "Identity", "KnownKey", "KnownKeys", "TlsEngine", "TlsError", "Tunnel", "TunnelClosed", "XtlsError",
    "cert_sha256", "chat_message", "normalize_code", "sas_code", "spki_sha256", "xmpp_addrs",
]
