"""A throwaway Prosody server for the end-to-end tests.

`Prosody` writes a private configuration into its own temporary directory (it never
touches /etc/prosody or the system service), picks free loopback ports at run time,
and runs the server in the foreground as the `prosody` user through `setpriv`, which
execs, so the pid recorded is Prosody's own.  It is stopped by that pid only, never
by process name.

Facts this relies on (shared/notes/servers.md): Prosody refuses to run as root; the
Debian sample config enables `mod_limits` (left out here) and Nagle's algorithm
(switched off here with `network_settings`); `s2s` is autoloaded and would listen on
*:5269 (disabled here); `prosody --version` starts a server, so it is never called.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PROSODY_BIN = "/usr/bin/prosody"
PROSODYCTL_BIN = "/usr/bin/prosodyctl"
PROSODY_USER = "prosody"
VIRTUAL_HOST = "localhost"
COMPONENT_DOMAIN = "bots.localhost"
API_COMPONENT_DOMAIN = "api.localhost"  # a second component domain, for a second component process


def ensure_installed() -> None:
    """Install the Debian `prosody` package when its binary is missing (demo use)."""
    if os.path.exists(PROSODY_BIN):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "prosody"], check=True, env=env)
    if not os.path.exists(PROSODY_BIN):
        raise RuntimeError(f"apt-get install prosody did not provide {PROSODY_BIN}")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, alive=lambda: True) -> None:
    """Wait until 127.0.0.1:`port` accepts TCP connections.

    `alive` is polled too, so that a server which died during start-up is reported
    at once instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if not alive():
            raise RuntimeError(f"process exited while waiting for port {port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing accepts connections on 127.0.0.1:{port} after {timeout} s")
        time.sleep(0.05)


def stop_pid(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process `proc` (by its pid), wait, SIGKILL it if it does not exit."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def log_tail(path: Path, lines: int = 60) -> str:
    """The last `lines` lines of a log file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class Prosody:
    """One private Prosody instance: VirtualHost `localhost`, Components `bots.localhost` and
    `api.localhost` (same secret; each takes one component connection).

    Attributes a test uses: `c2s_port`, `component_port`, `component_secret`,
    `host` (the VirtualHost), `component_domain`, `api_component_domain`, `log_path`, `pid`.
    """

    def __init__(self, *, log_level: str = "info", workdir: str | None = None) -> None:
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="xtls-prosody-"))
        self.host = VIRTUAL_HOST
        self.component_domain = COMPONENT_DOMAIN
        self.api_component_domain = API_COMPONENT_DOMAIN
        self.component_secret = secrets.token_hex(16)
        self.c2s_port = free_port()
        self.component_port = free_port()
        while self.component_port == self.c2s_port:
            self.component_port = free_port()
        self.log_level = log_level
        self.config_path = self.dir / "prosody.cfg.lua"
        self.log_path = self.dir / "prosody.log"
        self.console_path = self.dir / "console.log"
        self._proc: subprocess.Popen | None = None
        self._write_config()

    @property
    def pid(self) -> int | None:
        """Pid of the running Prosody process, None when stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _write_config(self) -> None:
        data = self.dir / "data"
        certs = self.dir / "certs"  # empty: no TLS, and no look into /etc/prosody/certs
        data.mkdir(parents=True, exist_ok=True)
        certs.mkdir(exist_ok=True)
        self.config_path.write_text(
            f"""-- Private test configuration written by tests/e2e/prosody.py.
pidfile = "{self.dir}/prosody.pid"
data_path = "{data}"
certificates = "{certs}"
log = {{ {{ levels = {{ min = "{self.log_level}" }}, to = "file", filename = "{self.log_path}" }} }}

interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.c2s_port} }}
c2s_direct_tls_ports = {{ }}
legacy_ssl_ports = {{ }}
component_ports = {{ {self.component_port} }}
component_interfaces = {{ "127.0.0.1" }}  -- its own default also listens on ::1
http_ports = {{ }}
https_ports = {{ }}

modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping"; "posix" }}
modules_disabled = {{ "s2s" }}

c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_plain"
storage = "internal"
network_settings = {{ nagle = false }}

VirtualHost "{self.host}"

Component "{self.component_domain}"
    component_secret = "{self.component_secret}"

Component "{self.api_component_domain}"
    component_secret = "{self.component_secret}"
"""
        )
        self._chown()

    def _chown(self) -> None:
        user = pwd.getpwnam(PROSODY_USER)
        for root, dirs, files in os.walk(self.dir):
            for name in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                os.chown(name, user.pw_uid, user.pw_gid)

    def _as_prosody(self, *argv: str) -> list[str]:
        return ["setpriv", f"--reuid={PROSODY_USER}", f"--regid={PROSODY_USER}", "--init-groups", "--", *argv]

    def start(self, timeout: float = 15.0) -> None:
        """Start Prosody in the foreground and wait until both ports accept TCP."""
        if self.pid is not None:
            raise RuntimeError(f"Prosody already running as pid {self.pid}")
        self._chown()
        console = open(self.console_path, "ab")
        try:
            self._proc = subprocess.Popen(
                self._as_prosody(PROSODY_BIN, "--config", str(self.config_path), "-F"),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        finally:
            console.close()
        alive = lambda: self._proc.poll() is None  # noqa: E731
        try:
            wait_for_port(self.c2s_port, timeout, alive)
            wait_for_port(self.component_port, timeout, alive)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"Prosody did not start: {exc}\n{self.diagnostics()}") from exc

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Prosody by its pid: SIGTERM, wait, SIGKILL as a last resort."""
        if self._proc is not None:
            stop_pid(self._proc, timeout)
            self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same ports."""
        self.stop()
        self.start()

    def register(self, user: str, password: str) -> str:
        """Create the account `user@localhost`; return its bare JID."""
        result = subprocess.run(
            self._as_prosody(PROSODYCTL_BIN, "--config", str(self.config_path), "register", user, self.host, password),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.dir,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"prosodyctl register {user} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return f"{user}@{self.host}"

    def diagnostics(self) -> str:
        """Console output and log tail, for failure messages."""
        return (
            f"--- Prosody console ({self.console_path}) ---\n{log_tail(self.console_path, 20)}\n"
            f"--- Prosody log tail ({self.log_path}) ---\n{log_tail(self.log_path)}"
        )

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
