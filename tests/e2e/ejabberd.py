"""A throwaway ejabberd server for the end-to-end tests, the counterpart of prosody.py.

`Ejabberd` writes a private `ejabberd.yml`, `ejabberdctl.cfg` and `inetrc` into its own
temporary directory (it never touches /etc/ejabberd, /var/lib/ejabberd or the system
service), with its own spool (Mnesia) and log directories, free loopback ports and a
unique Erlang node name, so it can run beside anything else, a system ejabberd included.

It starts the Erlang VM in the foreground exactly as `ejabberdctl foreground` would
(same `erl` arguments and environment), but without the ejabberdctl shell in between:
`setpriv` and `erl` both exec, so the pid recorded is the VM's own (`beam.smp`).  It is
stopped by that pid (SIGTERM makes the VM run `init:stop()`), never by name, and stop()
waits for the VM's helper processes (`erl_child_setup`, `inet_gethost`) to be gone too.
`ejabberdctl` is used only against this node, with this node's configuration
(`register`).

Facts this relies on (docs/servers.md): ejabberd runs as the `ejabberd` user with
HOME set to its state directory (the Erlang cookie there is private to this instance);
`ERL_DIST_PORT` + `INET_DIST_INTERFACE=127.0.0.1` keep epmd off (it would listen on
0.0.0.0:4369 and outlive the node) and the distribution port on loopback; Debian's
sample config shapes c2s traffic (here every listener says `shaper: none`); several
component domains on one `ejabberd_service` listener need `global_routes: false`, or
each component receives the traffic of all of them.  ejabberd sets TCP_NODELAY on its
listening sockets (accepted sockets inherit it), so there is no Nagle setting to make.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

from xmpp_server import XmppServer

EJABBERDCTL_BIN = "/usr/sbin/ejabberdctl"
ERL_BIN = "/usr/bin/erl"


def _erl_libs() -> str:
    """The ERL_LIBS ejabberdctl exports (where the Debian package puts the ejabberd app)."""
    try:
        script = Path(EJABBERDCTL_BIN).read_text(errors="replace")
    except FileNotFoundError as exc:
        raise RuntimeError(f"{EJABBERDCTL_BIN} is missing: apt-get install ejabberd") from exc
    match = re.search(r"^ERL_LIBS='([^']+)'", script, re.M)
    return match.group(1) if match else "/usr/lib/x86_64-linux-gnu"


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after it.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        for child in _children(todo.pop()):
            seen.append(child)
            todo.append(child)
    return seen


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Ejabberd(XmppServer):
    """One private ejabberd instance: host `localhost`, component domains `bots.localhost`
    and `api.localhost` on one `ejabberd_service` listener (same secret, `global_routes:
    false`, so each component connection gets only its own domain's traffic).

    Attributes a test uses: those of `XmppServer`, as on `Prosody` (`c2s_port`,
    `component_port`, `component_secret`, `host`, `component_domain`,
    `api_component_domain`, `log_path`, `pid`).
    """

    name = "ejabberd"
    user = "ejabberd"
    ctl_name = "ejabberdctl"
    start_timeout = 30.0
    stop_timeout = 15.0

    def __init__(self, *, log_level: str = "info", workdir: str | None = None, stock_shaper: bool = False,
                 tls_ca=None, balanced_slots: int | None = None, omit_component_number: bool = False) -> None:
        """`stock_shaper=True` limits c2s input as Debian's /etc/ejabberd/ejabberd.yml does
        (`c2s_shaper: normal`, 3,000 bytes/s, bursts of 20,000); by default it is off.
        `tls_ca` (a `PrivateCa`) gives c2s TLS with a certificate it issues: STARTTLS required
        on `c2s_port`, direct TLS on `c2s_direct_tls_port`. `balanced_slots=N` spreads
        `api.localhost` over N component connections by the destination's bare JID
        (`domain_balancing`, `type: bare_destination`; docs/servers.md has its traps);
        `omit_component_number=True` writes the `type` alone, the documented trap."""
        super().__init__(log_level=log_level, workdir=workdir)
        self.stock_shaper = stock_shaper
        self.tls_ca = tls_ca
        self.balanced_slots = balanced_slots
        self.omit_component_number = omit_component_number
        self.c2s_direct_tls_port = self._new_port() if tls_ca is not None else None
        self.dist_port = self._new_port()
        self.node = f"xtls-e2e-{secrets.token_hex(4)}@localhost"
        self.spool_dir = self.dir / "spool"  # Mnesia, and HOME (the Erlang cookie)
        self.logs_dir = self.dir / "logs"
        self.config_path = self.dir / "ejabberd.yml"
        self.ctl_config_path = self.dir / "ejabberdctl.cfg"
        self.inetrc_path = self.dir / "inetrc"
        self.log_path = self.logs_dir / "ejabberd.log"
        self.error_log_path = self.logs_dir / "error.log"
        self.run_dir = self.spool_dir
        self._write_config()

    def _write_config(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        cookie = self.spool_dir / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        # Only the listeners below: no s2s, no HTTP, no STUN; plaintext c2s on loopback.
        c2s_shaper = "c2s_shaper" if self.stock_shaper else "none"
        # Debian's /etc/ejabberd/ejabberd.yml (its admin exemption aside: no admin here).
        shapers = (
            "shaper:\n  normal:\n    rate: 3000\n    burst_size: 20000\n  fast: 100000\n"
            "shaper_rules:\n  c2s_shaper:\n    normal: all\n  s2s_shaper: fast\n"
            if self.stock_shaper else ""
        )
        certfiles, starttls, direct_tls = "[]", "false", ""
        if self.tls_ca is not None:
            # One PEM with the chain and the key: ejabberd picks it for the names it carries.
            cert, key = self.dir / "c2s.crt", self.dir / "c2s.key"
            self.tls_ca.issue(self.host, cert, key)
            pem = self.dir / "c2s.pem"
            pem.write_bytes(cert.read_bytes() + key.read_bytes())
            certfiles, starttls = f'["{pem}"]', "true"
            direct_tls = (
                f"""  -
    port: {self.c2s_direct_tls_port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    shaper: {c2s_shaper}
    tls: true
"""
            )
        balancing = ""
        if self.balanced_slots is not None:
            # component_number is required with type: the connection fails at handshake
            # ({badkey,component_number}) without it.
            balancing = f"domain_balancing:\n  {self.api_component_domain}:\n    type: bare_destination\n"
            if not self.omit_component_number:
                balancing += f"    component_number: {self.balanced_slots}\n"
        self.config_path.write_text(
            f"""# Private test configuration written by tests/e2e/ejabberd.py.
hosts:
  - {self.host}
loglevel: {self.log_level}
log_rotate_count: 0
certfiles: {certfiles}
acme:
  auto: false
auth_method: internal
auth_password_format: plain

listen:
  -
    port: {self.c2s_port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    shaper: {c2s_shaper}
    starttls: {starttls}
    starttls_required: {starttls}
{direct_tls}  -
    port: {self.component_port}
    ip: "127.0.0.1"
    module: ejabberd_service
    shaper: none
    global_routes: false
    hosts:
      {self.component_domain}:
        password: "{self.component_secret}"
      {self.api_component_domain}:
        password: "{self.component_secret}"

s2s_access: none
{balancing}{shapers}acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  register:
    deny: all

modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_roster: {{}}
"""
        )
        # Read by `ejabberdctl --config-dir DIR` (register); start() passes the same to erl.
        self.ctl_config_path.write_text(
            f"""# Private ejabberdctl configuration written by tests/e2e/ejabberd.py.
ERLANG_NODE={self.node}
INET_DIST_INTERFACE=127.0.0.1
ERL_DIST_PORT={self.dist_port}
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"
EJABBERD_PID_PATH={self.dir}/ejabberd.pid
EJABBERD_BYPASS_WARNINGS=true
"""
        )
        self.inetrc_path.write_text(
            '{lookup,["file","native"]}.\n{host,{127,0,0,1}, ["localhost"]}.\n{file, resolv, "/etc/resolv.conf"}.\n'
        )
        self._chown()

    def _env(self) -> dict[str, str]:
        """The environment ejabberdctl gives the VM, with this instance's paths."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ERL_", "EJABBERD_"))}
        env.update(
            HOME=str(self.spool_dir),
            EJABBERD_CONFIG_PATH=str(self.config_path),
            EJABBERD_LOG_PATH=str(self.log_path),
            EJABBERD_PID_PATH=str(self.dir / "ejabberd.pid"),
            ERL_CRASH_DUMP=str(self.logs_dir / "erl_crash.dump"),
            ERL_DIST_PORT=str(self.dist_port),
            ERL_INETRC=str(self.inetrc_path),
            ERL_MAX_PORTS="32000",
            ERL_MAX_ETS_TABLES="1400",
            ERL_LIBS=_erl_libs(),
        )
        return env

    def _argv(self) -> list[str]:
        """`ejabberdctl foreground`'s erl command line for this instance's ejabberdctl.cfg."""
        return [
            ERL_BIN, "-sname", self.node,
            "+K", "true", "+P", "250000", "-env", "ERL_CRASH_DUMP_BYTES", "0",
            "-kernel", "inet_dist_use_interface", "{127,0,0,1}",
            "-erl_epmd_port", str(self.dist_port), "-start_epmd", "false",
            "-mnesia", "dir", f'"{self.spool_dir}"',
            "-s", "ejabberd", "-noinput",
        ]

    def stop(self, timeout: float | None = None) -> None:
        """Stop the VM by its pid (SIGTERM: init:stop(); SIGKILL as a last resort) and wait
        until its helper processes are gone as well."""
        helpers = _descendants(self.pid) if self.pid is not None else []
        super().stop(timeout)
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in helpers) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in helpers:  # children of our VM that outlived it: ours to end, by pid
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run `ejabberdctl ARGS` against this node (its config dir, spool, logs, node name)."""
        return subprocess.run(
            self._as_user(
                EJABBERDCTL_BIN, "--config-dir", str(self.dir), "--config", str(self.config_path),
                "--spool", str(self.spool_dir), "--logs", str(self.logs_dir), "--node", self.node, *args,
            ),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=self.spool_dir,
            env=self._env(),
            timeout=timeout,
        )

    def _logs(self) -> list[tuple[str, Path, int]]:
        return [
            ("console", self.console_path, 20),
            ("error log", self.error_log_path, 20),
            ("log tail", self.log_path, 60),
        ]
