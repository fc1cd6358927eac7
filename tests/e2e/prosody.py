"""A throwaway Prosody server for the end-to-end tests.

`Prosody` writes a private configuration into its own temporary directory (it never
touches /etc/prosody or the system service), picks free loopback ports at run time,
and runs the server in the foreground as the `prosody` user through `setpriv`, which
execs, so the pid recorded is Prosody's own.  It is stopped by that pid only, never
by process name (all of that is shared with ejabberd.py, in xmpp_server.py).

Facts this relies on (docs/servers.md): Prosody refuses to run as root; the
Debian sample config enables `mod_limits` (left out here) and leaves Nagle's algorithm on
(left on here too unless a test asks otherwise); `s2s` is autoloaded and would listen on
*:5269 (disabled here); `prosody --version` starts a server, so it is never called.
"""

from __future__ import annotations

import os
import subprocess

from xmpp_server import XmppServer

PROSODY_BIN = "/usr/bin/prosody"
PROSODYCTL_BIN = "/usr/bin/prosodyctl"


def ensure_installed() -> None:
    """Install the Debian `prosody` package when its binary is missing (demo use)."""
    if os.path.exists(PROSODY_BIN):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "prosody"], check=True, env=env)
    if not os.path.exists(PROSODY_BIN):
        raise RuntimeError(f"apt-get install prosody did not provide {PROSODY_BIN}")


class Prosody(XmppServer):
    """One private Prosody instance: VirtualHost `localhost`, Components `bots.localhost` and
    `api.localhost` (same secret; each takes one component connection).

    Attributes a test uses: those of `XmppServer` (`c2s_port`, `component_port`,
    `component_secret`, `host`, `component_domain`, `api_component_domain`, `log_path`, `pid`).
    """

    name = "Prosody"
    user = "prosody"
    ctl_name = "prosodyctl"
    start_timeout = 15.0
    stop_timeout = 10.0

    def __init__(
        self,
        *,
        log_level: str = "info",
        workdir: str | None = None,
        nagle: bool = True,
        sample_limits: bool = False,
        tls_ca=None,
    ) -> None:
        """`nagle=False` switches Nagle's algorithm off (`network_settings = { nagle = false }`);
        by default it stays on, as in a stock Prosody. `sample_limits=True`
        adds the c2s/s2s rate limits of Debian's sample configuration (mod_limits).
        `tls_ca` (a `PrivateCa`) gives c2s TLS with a certificate it issues: STARTTLS required
        on `c2s_port`, direct TLS on `c2s_direct_tls_port`, no plaintext authentication."""
        super().__init__(log_level=log_level, workdir=workdir)
        self.nagle = nagle
        self.sample_limits = sample_limits
        self.tls_ca = tls_ca
        self.c2s_direct_tls_port = self._new_port() if tls_ca is not None else None
        self.config_path = self.dir / "prosody.cfg.lua"
        self.log_path = self.dir / "prosody.log"
        self._write_config()

    def _write_config(self) -> None:
        data = self.dir / "data"
        certs = self.dir / "certs"  # empty without tls_ca; never /etc/prosody/certs
        data.mkdir(parents=True, exist_ok=True)
        certs.mkdir(exist_ok=True)
        direct_tls = ""
        encryption = "c2s_require_encryption = false\nallow_unencrypted_plain_auth = true\n"
        if self.tls_ca is not None:
            # Prosody finds <host>.crt and <host>.key in `certificates` by itself.
            self.tls_ca.issue(self.host, certs / f"{self.host}.crt", certs / f"{self.host}.key")
            direct_tls = f"{self.c2s_direct_tls_port} "
            encryption = "c2s_require_encryption = true\n"

        network = "" if self.nagle else "network_settings = { nagle = false }\n"
        # Debian's /etc/prosody/prosody.cfg.lua, word for word.
        limits = (
            'limits = {\n  c2s = { rate = "10kb/s" };\n  s2sin = { rate = "30kb/s" };\n}\n'
            if self.sample_limits else ""
        )
        modules = '; "limits"' if self.sample_limits else ""
        if self.tls_ca is not None:
            modules += '; "tls"'
        self.config_path.write_text(
            f"""-- Private test configuration written by tests/e2e/prosody.py.
pidfile = "{self.dir}/prosody.pid"
data_path = "{data}"
certificates = "{certs}"
log = {{ {{ levels = {{ min = "{self.log_level}" }}, to = "file", filename = "{self.log_path}" }} }}

interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.c2s_port} }}
c2s_direct_tls_ports = {{ {direct_tls}}}
legacy_ssl_ports = {{ }}
component_ports = {{ {self.component_port} }}
component_interfaces = {{ "127.0.0.1" }}  -- its own default also listens on ::1
http_ports = {{ }}
https_ports = {{ }}

modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping"; "posix"{modules} }}
modules_disabled = {{ "s2s" }}

{encryption}authentication = "internal_plain"
storage = "internal"
{network}{limits}

VirtualHost "{self.host}"

Component "{self.component_domain}"
    component_secret = "{self.component_secret}"

Component "{self.api_component_domain}"
    component_secret = "{self.component_secret}"
"""
        )
        self._chown()

    def _argv(self) -> list[str]:
        return [PROSODY_BIN, "--config", str(self.config_path), "-F"]

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run `prosodyctl ARGS` with this instance's configuration."""
        return subprocess.run(
            self._as_user(PROSODYCTL_BIN, "--config", str(self.config_path), *args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.dir,
            timeout=timeout,
        )
