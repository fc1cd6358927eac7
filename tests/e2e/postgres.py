"""A throwaway PostgreSQL server for the tests: Debian's package, run privately.

`Postgres` makes its own data directory with `initdb` (as the `postgres` user: initdb refuses
root), listens on 127.0.0.1 on a free port with its socket in that directory, trusts local
connections (nothing here is reachable from elsewhere), and runs in the foreground so that the
pid recorded is the postmaster's own; it is stopped by that pid (SIGINT: PostgreSQL's fast
shutdown), never by name. See docs/servers.md, "PostgreSQL in tests".
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xmpp_server import free_port, log_tail, wait_for_port

USER = "postgres"


def bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries (`/usr/lib/postgresql/<version>/bin`)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    return Path(found[-1]).parent


class Postgres:
    """One private PostgreSQL: `url` for clients (database `xtls`), `psql(sql)` for checks."""

    def __init__(self, *, workdir: str | None = None, tls_ca=None) -> None:
        """`tls_ca` (a `PrivateCa`): serve TLS with a certificate it issues for 127.0.0.1, and
        accept TCP clients over TLS only (`hostssl` in pg_hba.conf)."""
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="xtls-postgres-"))
        self.data = self.dir / "data"
        self.log_path = self.dir / "postgres.log"
        self.port = free_port()
        self.bin = bin_dir()
        self._proc: subprocess.Popen | None = None
        user = pwd.getpwnam(USER)
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U", USER,
                          "--encoding=UTF8", "--locale=C", "--no-sync")
        self._tls: list[str] = []
        if tls_ca is not None:
            cert, key = self.data / "server.crt", self.data / "server.key"
            tls_ca.issue("127.0.0.1", cert, key)
            for path in (cert, key):
                os.chown(path, user.pw_uid, user.pw_gid)
            key.chmod(0o600)  # PostgreSQL refuses a key others may read
            (self.data / "pg_hba.conf").write_text(
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n")
            self._tls = ["-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]

    @property
    def url(self) -> str:
        """The URL of the database `xtls`, over TCP on loopback."""
        return f"postgres://{USER}@127.0.0.1:{self.port}/xtls"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _as_postgres(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        done = subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", "--", *argv],
                              capture_output=True, text=True, cwd=self.dir, timeout=60, **kw)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def start(self, timeout: float = 30.0) -> None:
        """Starts the server in the foreground and waits until it accepts connections and the
        database `xtls` exists."""
        if self.pid is not None:
            raise RuntimeError(f"PostgreSQL already running as pid {self.pid}")
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", "--",
                 str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
                 "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off", *self._tls],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
            )
        finally:
            log.close()
        try:
            wait_for_port(self.port, timeout, lambda: self._proc.poll() is None)
            for _ in range(100):  # the port opens a moment before the server takes queries
                ready = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                       capture_output=True)
                if ready.returncode == 0:
                    break
                time.sleep(0.05)
            if not self.psql("SELECT 1 FROM pg_database WHERE datname = 'xtls'", database="postgres"):
                self.psql("CREATE DATABASE xtls", database="postgres")
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start: {exc}\n{log_tail(self.log_path)}") from exc

    def psql(self, sql: str, *, database: str = "xtls") -> str:
        """Runs `sql` with psql; returns its unaligned output."""
        done = subprocess.run(
            [str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", database,
             "-v", "ON_ERROR_STOP=1", "-A", "-t", "-c", sql],
            capture_output=True, text=True, timeout=30,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql: {done.stderr.strip()}")
        return done.stdout.strip()

    def stop(self, timeout: float = 15.0) -> None:
        """Stops the server by its pid: SIGINT (fast shutdown), SIGKILL if it does not exit."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGINT)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout)
        self._proc = None

    def cleanup(self) -> None:
        """Stops the server and removes its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    """`postgres.py run -- COMMAND…`: runs COMMAND beside a private server, with
    `XTLS_TEST_POSTGRES=postgres://postgres@127.0.0.1:PORT` in its environment (the Rust tests
    create their databases there), then stops the server by its pid and removes it."""
    if len(argv) < 3 or argv[0] != "run" or argv[1] != "--":
        print("usage: postgres.py run -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    server = Postgres()
    try:
        server.start()
        env = dict(os.environ, XTLS_TEST_POSTGRES=f"postgres://{USER}@127.0.0.1:{server.port}")
        return subprocess.run(argv[2:], env=env).returncode
    finally:
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
