"""Runs the xtls-component binary against a test server (Prosody or ejabberd), and talks to its admin API.

`Component` writes the component's TOML config into its own temporary directory,
launches `xtls-component serve --config FILE` (binary from $XTLS_COMPONENT_BIN, else
<repo>/target/debug/xtls-component; this module never builds it) with stdout and stderr
in a log file there, waits for `GET /readyz` == 200, and stops the process by its pid.
`kill()` ends it with SIGKILL (a crash: no shutdown code runs); `start()` again runs it on
the same config, store file, admin port and log, so `kill(); start()` is a crash and restart.

The admin client is stdlib urllib: `get/post/delete(path, token=True)` return
`(status, body)` where body is the decoded JSON (or the raw text when it is not JSON,
or None when empty); `token=False` omits the Authorization header, a string sends that
string as the bearer token instead of the right one; `headers` adds request headers.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from openapi_check import OpenApiChecker
from xmpp_server import free_port, log_tail, stop_pid

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BINARY = REPO / "target" / "debug" / "xtls-component"


def binary_path() -> Path:
    """The component binary the tests run."""
    return Path(os.environ.get("XTLS_COMPONENT_BIN") or DEFAULT_BINARY)


ECHO_BOT = """[[bots]]
localpart = "echo"
handler = "echo"
"""


class Component:
    """One xtls-component process serving bots through `server`: a `Prosody` or an
    `Ejabberd` (anything with `component_domain`, `component_port` and `component_secret`).

    By default it serves `echo@bots.localhost` on the component domain `bots.localhost`.
    `domain` picks another domain the server declares (e.g. `server.api_component_domain`),
    `bots` replaces the `[[bots]]` TOML (use "" for none), `admin_config` adds keys to the
    `[admin]` section, `component_config` to `[component]`, and `extra_config` is appended
    to the file as is (e.g. a `[webhooks]` section). `https_ca` (a PEM file) makes the admin client speak HTTPS, trusting that
    file to name 127.0.0.1; the config must then give `[admin.tls]`.
    """

    def __init__(
        self,
        server,
        *,
        binary: Path | None = None,
        domain: str | None = None,
        bots: str = ECHO_BOT,
        extra_config: str = "",
        admin_config: str = "",
        https_ca: Path | None = None,
        store_url: str | None = None,
        store_key: str | None = None,
        component_config: str = "",
        token: str | None = None,
    ) -> None:
        self.server = server
        self.binary = binary or binary_path()
        self.domain = domain or server.component_domain
        self.dir = Path(tempfile.mkdtemp(prefix="xtls-component-"))
        self.admin_port = free_port()
        self.token = token or secrets.token_urlsafe(24)
        self.config_path = self.dir / "xtls.toml"
        self.log_path = self.dir / "component.log"
        self.store_path = self.dir / "xtls.db"
        # Another store (PostgreSQL) takes its key in the configuration: every instance on it
        # must seal with the same one.
        self.store_url = store_url or f"sqlite://{self.store_path}"
        self.store_key = store_key or ("" if store_url is None else base64.b64encode(secrets.token_bytes(32)).decode())
        store_key_line = f'key = "{self.store_key}"' if self.store_key else ""
        self.base_url = f"http://127.0.0.1:{self.admin_port}"
        self.ssl: ssl.SSLContext | None = None
        if https_ca is not None:
            self.base_url = f"https://127.0.0.1:{self.admin_port}"
            self.ssl = ssl.create_default_context(cafile=str(https_ca))
        self._openapi: OpenApiChecker | None = None
        self._secrets: set[str] = set()
        self.starts = 0  # how many times start() launched the binary
        self._proc: subprocess.Popen | None = None
        self.config_path.write_text(
            f"""[component]
domain = "{self.domain}"
server = "127.0.0.1:{server.component_port}"
secret = "{server.component_secret}"
{component_config}

[admin]
listen = "127.0.0.1:{self.admin_port}"
token = "{self.token}"
{admin_config}

[store]
url = "{self.store_url}"
{store_key_line}

{bots}
{extra_config}"""
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, timeout: float = 30.0, *, standby: bool = False) -> None:
        """Launch the binary and wait until /readyz answers 200 (503 with `standby=True`: an
        instance that waits while another one serves the store)."""
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError(
                f"component binary {self.binary} is missing or not executable: "
                "build it first (cargo build) or set XTLS_COMPONENT_BIN"
            )
        # The component reads XTLS_* variables as config overrides (XTLS_A__B = a.b), so the
        # harness's own XTLS_COMPONENT_BIN would become an unknown key: the file is the config.
        env = {k: v for k, v in os.environ.items() if not k.startswith("XTLS_")}
        env.setdefault("RUST_LOG", "info,xtls_component=debug")
        env.setdefault("RUST_BACKTRACE", "1")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== harness: start #{self.starts} of {self.binary} ===\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [str(self.binary), "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
            )
        try:
            if standby:
                self._poll_readyz(lambda status: status == 503, timeout, "503")
            else:
                self.wait_ready(timeout)
        except Exception:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Poll /readyz until 200; return the seconds it took."""
        return self._poll_readyz(lambda status: status == 200, timeout, "200")

    def wait_not_ready(self, timeout: float = 10.0) -> float:
        """Poll /readyz until it answers anything but 200 (or nothing); return the seconds it took."""
        return self._poll_readyz(lambda status: status != 200, timeout, "non-200")

    def _poll_readyz(self, wanted, timeout: float, what: str) -> float:
        start = time.monotonic()
        status = None
        while True:
            if not self.running():
                raise RuntimeError(f"component exited (status {self.exit_status()}) while waiting for /readyz\n"
                                   f"{self.diagnostics()}")
            try:
                status, _ = self.get("/readyz", token=False, timeout=2.0)
            except OSError:
                status = None  # not listening (yet)
            if wanted(status):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(
                    f"/readyz not {what} within {timeout} s (last: {status})\n{self.diagnostics()}"
                )
            time.sleep(0.1)

    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def exit_status(self) -> int | None:
        """The exit status of the last run, once it ended."""
        return None if self._proc is None else self._proc.returncode

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the component by its pid: SIGTERM, wait, SIGKILL as a last resort."""
        if self._proc is not None:
            stop_pid(self._proc, timeout)
            self._proc = None

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the component by its pid (a crash) and reap it; the store file stays."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=timeout)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== harness: SIGKILL (exit status {self._proc.returncode}) ===\n".encode())
        self._proc = None

    def restart(self, *, crash: bool = False, timeout: float = 30.0) -> None:
        """Stop (SIGTERM, or SIGKILL with `crash=True`) and start again on the same config,
        store, ports and log; returns once /readyz answers 200."""
        if crash:
            self.kill()
        else:
            self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        """Stop the process, check its log holds no secret, remove its files."""
        self.stop()
        try:
            self.assert_log_has_no_secrets()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def secrets_seen(self) -> set[str]:
        """Every secret this component was given or gave out: the component secret, the
        admin token, bot tokens, webhook secrets and pairing codes that went through
        `request`, and the store key it made beside its store."""
        key_file = self.store_path.with_name(self.store_path.name + ".key")
        store_key = key_file.read_text().strip() if key_file.exists() else ""
        return {self.server.component_secret, self.token, store_key, self.store_key, *self._secrets} - {""}

    def assert_log_has_no_secrets(self) -> None:
        """Raise AssertionError naming the kind of secret found in the component's log."""
        if not self.log_path.exists():
            return
        log = self.log_path.read_text(errors="replace")
        kinds = {self.server.component_secret: "the component secret", self.token: "the admin token"}
        key_file = self.store_path.with_name(self.store_path.name + ".key")
        if key_file.exists():
            kinds[key_file.read_text().strip()] = "the store key"
        if self.store_key:
            kinds[self.store_key] = "the store key"
        leaked = sorted({kinds.get(s) or ("a bot token" if s.startswith("xtb_") else
                                          "a pairing code" if len(s) == 11 and s[5] == "-" else "a webhook secret")
                         for s in self.secrets_seen() if s and s in log})
        if "PRIVATE KEY" in log:
            leaked.append("a PEM private key")
        assert not leaked, f"the component log {self.log_path} contains secrets: {leaked}"

    def diagnostics(self, lines: int = 80) -> str:
        return f"--- component log tail ({self.log_path}) ---\n{log_tail(self.log_path, lines)}"

    # -- admin API ---------------------------------------------------------------------

    def request(self, method: str, path: str, *, token: bool | str = True, body=None, timeout: float = 10.0,
                headers: dict[str, str] | None = None):
        """One HTTP request to the admin API; returns (status, decoded body)."""
        extra = headers or {}
        headers = {"Accept": "application/json"}
        if token is True:
            headers["Authorization"] = f"Bearer {self.token}"
        elif isinstance(token, str):
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        headers.update(extra)
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl) as resp:
                status, content_type, answer = resp.status, resp.headers.get("Content-Type"), _decode(resp.read())
        except urllib.error.HTTPError as err:
            status, content_type, answer = err.code, err.headers.get("Content-Type"), _decode(err.read())
        self._secrets.update(_secret_values(body) | _secret_values(answer))
        try:
            checker = self.openapi()
        except urllib.error.HTTPError as err:
            if err.code != 503:
                raise
            return status, answer  # a standby: no API document to check against yet
        checker.check(method, path, status, content_type, answer)
        if 200 <= status < 300:
            checker.check_request(method, path, body)
        return status, answer

    def openapi(self) -> OpenApiChecker:
        """The checker for this binary's OpenAPI document (fetched once per process run)."""
        if self._openapi is None:
            req = urllib.request.Request(self.base_url + "/v1/openapi.json",
                                         headers={"Authorization": f"Bearer {self.token}"})
            with urllib.request.urlopen(req, timeout=10, context=self.ssl) as resp:
                self._openapi = OpenApiChecker(json.loads(resp.read()))
        return self._openapi

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body=body, **kw)

    def delete(self, path: str, **kw):
        return self.request("DELETE", path, **kw)

    def put(self, path: str, body=None, **kw):
        return self.request("PUT", path, body=body, **kw)

    def patch(self, path: str, body=None, **kw):
        return self.request("PATCH", path, body=body, **kw)


def _secret_values(value) -> set[str]:
    """Bot tokens (xtb_...), webhook secrets (whsec_...) and pairing codes (`code`) anywhere
    in a JSON value."""
    if isinstance(value, str):
        return {value} if value.startswith(("xtb_", "whsec_")) else set()
    if isinstance(value, dict):
        codes = {value["code"]} if isinstance(value.get("code"), str) and len(value["code"]) == 11 else set()
        return codes.union(*map(_secret_values, value.values()))
    if isinstance(value, list):
        return set().union(*map(_secret_values, value))
    return set()


def _decode(raw: bytes):
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
