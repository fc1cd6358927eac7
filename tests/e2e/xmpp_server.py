"""What the throwaway XMPP servers of the end-to-end tests share (prosody.py, ejabberd.py),
and the process helpers the other test modules use too (free_port, wait_for_port,
stop_pid, log_tail).

`XmppServer` holds one private server instance: its temporary directory (owned by the
server's system user, which it runs as through `setpriv`), the VirtualHost, the two
component domains and their secret, free loopback ports, and the process, which it
starts in the foreground and stops by its pid only, never by process name.  A subclass
writes its own configuration and says how to run the server (`_argv`, `_env`,
`run_dir`), how to call its control tool (`ctl`) and which logs to show (`_logs`).
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

VIRTUAL_HOST = "localhost"
COMPONENT_DOMAIN = "bots.localhost"
API_COMPONENT_DOMAIN = "api.localhost"  # a second component domain, for a second component process


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


class XmppServer:
    """One private server: VirtualHost `localhost`, component domains `bots.localhost` and
    `api.localhost` (same secret; each takes one component connection).

    Attributes a test uses: `c2s_port`, `component_port`, `component_secret`,
    `host` (the VirtualHost), `component_domain`, `api_component_domain`, `log_path`, `pid`.

    A subclass sets the class attributes below and, in its `__init__`, calls this one, sets
    its paths (`log_path` at least) and writes its configuration.
    """

    name = "XMPP server"  # in messages, e.g. "Prosody did not start"
    user = "nobody"  # the system user the server runs as; it owns `dir`
    ctl_name = "ctl"  # the control tool, in messages
    start_timeout = 15.0
    stop_timeout = 10.0
    log_path: Path

    def __init__(self, *, log_level: str = "info", workdir: str | None = None) -> None:
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"xtls-{self.name.lower()}-"))
        self.host = VIRTUAL_HOST
        self.component_domain = COMPONENT_DOMAIN
        self.api_component_domain = API_COMPONENT_DOMAIN
        self.component_secret = secrets.token_hex(16)
        self._ports: set[int] = set()
        self.c2s_port = self._new_port()
        self.component_port = self._new_port()
        self.log_level = log_level
        self.console_path = self.dir / "console.log"
        self.run_dir = self.dir  # the server's working directory
        self._proc: subprocess.Popen | None = None

    def _new_port(self) -> int:
        """A free loopback port that this instance has not taken for anything else yet."""
        port = free_port()
        while port in self._ports:
            port = free_port()
        self._ports.add(port)
        return port

    @property
    def pid(self) -> int | None:
        """Pid of the running server process, None when stopped."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _chown(self) -> None:
        user = pwd.getpwnam(self.user)
        for root, dirs, files in os.walk(self.dir):
            for name in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
                os.chown(name, user.pw_uid, user.pw_gid)

    def _as_user(self, *argv: str) -> list[str]:
        """`argv` run as the server's user (setpriv execs, so the pid stays the command's)."""
        return ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups", "--", *argv]

    def _argv(self) -> list[str]:
        """The command that runs the server in the foreground (as root; `start` adds setpriv)."""
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        """The server's environment; None: this process's own."""
        return None

    def _logs(self) -> list[tuple[str, Path, int]]:
        """(title, file, lines) of the logs `diagnostics` shows."""
        return [("console", self.console_path, 20), ("log tail", self.log_path, 60)]

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run the server's control tool with `args` against this instance."""
        raise NotImplementedError

    def start(self, timeout: float | None = None) -> None:
        """Start the server in the foreground and wait until both ports accept TCP."""
        if self.pid is not None:
            raise RuntimeError(f"{self.name} already running as pid {self.pid}")
        self._chown()
        console = open(self.console_path, "ab")
        try:
            self._proc = subprocess.Popen(
                self._as_user(*self._argv()),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                env=self._env(),
            )
        finally:
            console.close()
        alive = lambda: self._proc.poll() is None  # noqa: E731
        timeout = self.start_timeout if timeout is None else timeout
        try:
            wait_for_port(self.c2s_port, timeout, alive)
            wait_for_port(self.component_port, timeout, alive)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {exc}\n{self.diagnostics()}") from exc

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server by its pid: SIGTERM, wait, SIGKILL as a last resort."""
        if self._proc is not None:
            stop_pid(self._proc, self.stop_timeout if timeout is None else timeout)
            self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same ports and data."""
        self.stop()
        self.start()

    def register(self, user: str, password: str) -> str:
        """Create the account `user@localhost`; return its bare JID."""
        result = self.ctl("register", user, self.host, password)
        if result.returncode != 0:
            raise RuntimeError(
                f"{self.ctl_name} register {user} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return f"{user}@{self.host}"

    def diagnostics(self) -> str:
        """Console output and log tails, for failure messages."""
        return "\n".join(
            f"--- {self.name} {title} ({path}) ---\n{log_tail(path, lines)}" for title, path, lines in self._logs()
        )

    def cleanup(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
