"""An echo bot on XTLS: it logs into an ordinary account, accepts the tunnels people open to
it and answers every message inside them.

    XTLS_JID=echo@example.org XTLS_PASSWORD=... python3 echo_bot.py

Optional: XTLS_SERVER=host:port (else DNS), XTLS_CA_FILE (a private server's CA),
XTLS_CONFIG_DIR (where its key and the peers' keys are kept; ./echo-bot by default).
"""

import asyncio
import os
from pathlib import Path

import slixmpp

import slixmpp_xtls


class EchoBot(slixmpp.ClientXMPP):
    def __init__(self, jid: str, password: str, home: Path) -> None:
        super().__init__(jid, password)
        self.register_plugin("xep_0030")
        self.register_plugin("xtls", {"key_dir": str(home / "key"), "known_keys": str(home / "known_peers")})
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("xtls_opened", self.on_opened)
        self.add_event_handler("xtls_stanza", self.on_stanza)
        self.add_event_handler("xtls_sas", self.on_sas)

    async def on_start(self, _event) -> None:
        self.send_presence()
        print(f"online as {self.boundjid.full}; key {self.plugin['xtls'].fingerprint}", flush=True)

    def on_opened(self, tunnel: slixmpp_xtls.Tunnel) -> None:
        print(f"{tunnel.peer} opened a tunnel; key {tunnel.peer_spki_sha256} ({tunnel.key_status})", flush=True)

    def on_stanza(self, event) -> None:
        tunnel, stanza = event
        body = stanza.findtext("{jabber:client}body")
        if stanza.tag == "{jabber:client}message" and body is not None:
            tunnel.write(slixmpp_xtls.chat_message(f"echo: {body}"))

    def on_sas(self, event) -> None:
        tunnel, (code, digits) = event
        print(f"{tunnel.peer} compares the code {code} ({digits})", flush=True)


def main() -> None:
    bot = EchoBot(os.environ["XTLS_JID"], os.environ["XTLS_PASSWORD"],
                  Path(os.environ.get("XTLS_CONFIG_DIR", "echo-bot")))
    if os.environ.get("XTLS_CA_FILE"):
        bot.ca_certs = os.environ["XTLS_CA_FILE"]
    server = os.environ.get("XTLS_SERVER")
    if server:
        host, port = server.rsplit(":", 1)
        bot.connect(host, int(port))
    else:
        bot.connect()
    bot.loop.run_forever()


if __name__ == "__main__":
    main()
