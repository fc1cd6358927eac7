"""A client on XTLS: opens a tunnel to PEER, sends TEXT, prints the answer and the peer's key.

    XTLS_JID=alice@example.org XTLS_PASSWORD=... python3 send.py weather@bots.example.org 'hello'

Same optional settings as echo_bot.py; XTLS_CONFIG_DIR defaults to ./xtls-client. A key that
changed since the last time stops it with exit status 5.
"""

import asyncio
import os
import sys
from pathlib import Path

import slixmpp

import slixmpp_xtls


async def send(peer: str, text: str) -> int:
    home = Path(os.environ.get("XTLS_CONFIG_DIR", "xtls-client"))
    xmpp = slixmpp.ClientXMPP(os.environ["XTLS_JID"], os.environ["XTLS_PASSWORD"])
    xmpp.register_plugin("xep_0030")
    xmpp.register_plugin("xtls", {"key_dir": str(home / "key"), "known_keys": str(home / "known_peers")})
    if os.environ.get("XTLS_CA_FILE"):
        xmpp.ca_certs = os.environ["XTLS_CA_FILE"]
    online = asyncio.get_running_loop().create_future()
    xmpp.add_event_handler("session_start", lambda _: online.done() or online.set_result(None))
    xmpp.add_event_handler("failed_all_auth", lambda _: online.done() or online.set_exception(
        PermissionError("the server refused the login")))
    server = os.environ.get("XTLS_SERVER")
    if server:
        host, port = server.rsplit(":", 1)
        xmpp.connect(host, int(port))
    else:
        xmpp.connect()
    await asyncio.wait_for(online, 30)
    try:
        if not await xmpp.plugin["xtls"].supports(peer):
            print(f"{peer} does not support XTLS", file=sys.stderr)
            return 4
        try:
            tunnel = await xmpp.plugin["xtls"].open(peer)
        except slixmpp_xtls.TunnelClosed as closed:
            print(f"the tunnel to {peer} failed: {closed}", file=sys.stderr)
            return 5 if "key changed" in str(closed) else 3
        print(f"{peer}: key {tunnel.peer_spki_sha256} ({tunnel.key_status})", file=sys.stderr)
        await tunnel.send_message(text)
        print(await tunnel.recv_message(timeout=30))
        await tunnel.close()
        return 0
    finally:
        await xmpp.disconnect()


if __name__ == "__main__":
    sys.exit(asyncio.run(send(sys.argv[1], sys.argv[2])))
