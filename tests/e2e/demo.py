"""One-command demo: a throwaway Prosody, the component, and one message through XTLS.

    python3 tests/e2e/demo.py

Installs Prosody if it is missing (Debian package), starts a private Prosody and the
xtls-component binary ($XTLS_COMPONENT_BIN or target/debug/xtls-component, built
beforehand), lets alice open a tunnel to echo@bots.localhost, send "hello through XTLS"
and print the echo, compares the bot fingerprint alice saw in TLS with the one the admin
API reports, closes the tunnel and stops everything, also on error.
"""

from __future__ import annotations

import asyncio
import sys

from component import Component
from prosody import Prosody, ensure_installed
from xtls_client import XtlsClient

BOT = "echo@bots.localhost"
TEXT = "hello through XTLS"


async def talk(prosody: Prosody, component: Component, password: str) -> bool:
    """Alice's side of the demo; True when the echo and the fingerprints match."""
    status, cert = component.get(f"/v1/bots/{BOT}/certificate")
    if status != 200:
        raise RuntimeError(f"admin API: GET certificate -> {status}: {cert!r}")
    async with XtlsClient("alice@localhost/demo", password, host="127.0.0.1", port=prosody.c2s_port) as alice:
        print(f"alice logged in as {alice.jid}")
        tunnel = await alice.open_tunnel(BOT)
        print(f"tunnel to {BOT} open (handshake {tunnel.handshake_seconds * 1000:.1f} ms)")
        await tunnel.send_message(TEXT)
        reply = await tunnel.recv_message(timeout=10)
        print(f"sent:   {TEXT!r}\nechoed: {reply!r}")
        seen = tunnel.spki_sha256()
        print(f"bot SPKI SHA-256 as alice saw it in TLS: {seen}")
        print(f"bot SPKI SHA-256 from the admin API:     {cert['spki_sha256']}")
        match = seen == cert["spki_sha256"]
        print("fingerprints match" if match else "FINGERPRINTS DIFFER")
        await tunnel.close()
        print("tunnel closed (<closed/> received)")
    return match and reply == TEXT


def main() -> int:
    ensure_installed()
    prosody = Prosody()
    component = None
    try:
        prosody.start()
        password = "demo-password"
        prosody.register("alice", password)
        print(f"Prosody running: c2s 127.0.0.1:{prosody.c2s_port}, component 127.0.0.1:{prosody.component_port}")
        component = Component(prosody)
        component.start()
        print(f"xtls-component running: admin API {component.base_url}")
        ok = asyncio.run(asyncio.wait_for(talk(prosody, component, password), 60))
        return 0 if ok else 1
    except Exception:
        if component is not None:
            print(component.diagnostics(), file=sys.stderr)
        print(prosody.diagnostics(), file=sys.stderr)
        raise
    finally:
        if component is not None:
            component.cleanup()
        prosody.cleanup()
        print("stopped Prosody and the component")


if __name__ == "__main__":
    sys.exit(main())
