"""One-command demo: a throwaway Prosody, the component, and one message through XTLS.

    python3 tests/e2e/demo.py            # the whole path once, then stop
    python3 tests/e2e/demo.py --serve    # stay up for a person with the `xtls` client

Installs Prosody if it is missing (Debian package), starts a private Prosody and the
xtls-component binary ($XTLS_COMPONENT_BIN or target/debug/xtls-component, built
beforehand), lets alice open a tunnel to echo@bots.localhost, send "hello through XTLS"
and print the echo, compares the bot fingerprint alice saw in TLS with the one the admin
API reports, closes the tunnel and stops everything, also on error.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from component import Component
from private_ca import PrivateCa
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


PASSWORD = "demo-password"


@contextlib.contextmanager
def running(prosody: Prosody):
    """Prosody with the account alice@localhost and the component with its echo bot, until the
    block ends; their logs are printed when it ends by an error."""
    ensure_installed()
    component = None
    try:
        prosody.start()
        prosody.register("alice", PASSWORD)
        print(f"Prosody running: c2s 127.0.0.1:{prosody.c2s_port}, component 127.0.0.1:{prosody.component_port}")
        component = Component(prosody)
        component.start()
        print(f"xtls-component running: admin API {component.base_url}")
        yield component
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


def main() -> int:
    prosody = Prosody()
    with running(prosody) as component:
        ok = asyncio.run(asyncio.wait_for(talk(prosody, component, PASSWORD), 60))
        return 0 if ok else 1


def serve() -> int:
    """Prosody with c2s TLS from a private CA, the component with its echo bot, and the account
    alice@localhost, until Ctrl-C; the settings for `xtls` go to an environment file."""
    root = Path(tempfile.mkdtemp(prefix="xtls-demo-"))
    prosody = Prosody(tls_ca=PrivateCa(root / "ca"))
    try:
        with running(prosody) as component:
            env_file = root / "xtls.env"
            env_file.touch(mode=0o600)
            env_file.write_text(
                f"""# Written by scripts/demo --serve: the settings of the demo's account for xtls.
export XTLS_JID=alice@localhost
export XTLS_PASSWORD={PASSWORD}
export XTLS_SERVER=127.0.0.1:{prosody.c2s_port}
export XTLS_CA_FILE={prosody.tls_ca.ca_file}
export XTLS_CONFIG_DIR={root / "xtls-config"}
export XTLS_API={component.base_url}/v1
export XTLS_TOKEN={component.token}
"""
            )
            print(INSTRUCTIONS.format(env_file=env_file, root=root), flush=True)
            asyncio.run(until_signalled())
            return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


INSTRUCTIONS = """Prosody (c2s with STARTTLS, certificate from a private CA) and xtls-component are running.
The account alice@localhost talks to the bot echo@bots.localhost. In another terminal:

    . {env_file}
    xtls chat echo@bots.localhost

Then, in the chat, /sas shows a short code; the component shows the same code in the tunnel's row:

    curl -s -H "Authorization: Bearer $XTLS_TOKEN" "$XTLS_API/tunnels?bot=echo@bots.localhost"

To see what a changed key looks like, replace the bot's key as its operator would, then chat again:

    curl -s -X POST -H "Authorization: Bearer $XTLS_TOKEN" -H 'Content-Type: application/json' \\
         -d '{{"new_key": true, "overlap_secs": 0}}' "$XTLS_API/bots/echo@bots.localhost/certificate/rotate"

Ctrl-C stops everything and removes {root}."""


async def until_signalled() -> None:
    """Returns on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


if __name__ == "__main__":
    sys.exit(serve() if "--serve" in sys.argv[1:] else main())
