"""Runs the component's container image with podman, configured the way the README tells
users to: the image's own configuration file, the rest from `XTLS_*` variables, the store on
a named volume.

`ContainerComponent` is a `Component` (same admin client, readiness polling, log scan for
secrets) whose process is a container: `start()` runs a new container on the same volume
(an upgrade or a replaced container keeps its store), `stop()` is `podman stop` (SIGTERM,
then the exit status is read), and the container's output is appended to the log file.
Containers and volumes are addressed by the unique names made here, never by image.

podman runs with runc and cgroupfs (crun refuses hybrid cgroup hierarchies) and host
networking: the container reaches the test server on loopback, and the tests reach it.
"""

from __future__ import annotations

import os
import secrets
import subprocess

from component import Component

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
DATA = "/var/lib/xtls-component"


def podman(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """Runs one podman command; raises with its output when it fails and `check` is set."""
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done


def run_once(image: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess:
    """`podman run --rm` of `image` with `args`, without checking the exit status."""
    chosen = ["--entrypoint", entrypoint] if entrypoint else []
    return podman("run", "--rm", "--network", "host", *LIMITS, *chosen, image, *args, check=False)


class ContainerComponent(Component):
    """The image `image` serving `domain` of `server` (a Prosody or an ejabberd)."""

    def __init__(self, server, image: str, *, domain: str | None = None) -> None:
        super().__init__(server, domain=domain, bots="")
        tag = secrets.token_hex(4)
        self.image = image
        self.name = f"xtls-test-{tag}"
        self.volume = f"xtls-test-{tag}"
        self.exit_code: int | None = None

    def environment(self) -> dict[str, str]:
        """The variables the container gets (passed by name, so values stay off command lines)."""
        return {
            "XTLS_COMPONENT__DOMAIN": self.domain,
            "XTLS_COMPONENT__SERVER": f"127.0.0.1:{self.server.component_port}",
            "XTLS_COMPONENT__SECRET": self.server.component_secret,
            "XTLS_ADMIN__TOKEN": self.token,
            "XTLS_ADMIN__LISTEN": f"127.0.0.1:{self.admin_port}",
            "RUST_LOG": "info,xtls_component=debug",
        }

    def start(self, timeout: float = 30.0) -> None:
        """Run a new container of the image on this component's volume; wait until ready."""
        podman("rm", "--force", "--ignore", self.name)
        variables = self.environment()
        env = {k: v for k, v in os.environ.items() if not k.startswith("XTLS_")} | variables
        self.starts += 1
        self.exit_code = None
        podman("run", "--detach", "--name", self.name, "--network", "host", *LIMITS,
               "--volume", f"{self.volume}:{DATA}", *[a for k in variables for a in ("--env", k)],
               self.image, env=env)
        try:
            self.wait_ready(timeout)
        except Exception:
            self.stop()
            raise

    def running(self) -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return state.returncode == 0 and state.stdout.strip() == "true"

    def exit_status(self) -> int | None:
        state = podman("inspect", "--format", "{{.State.ExitCode}}", self.name, check=False)
        return int(state.stdout) if state.returncode == 0 and state.stdout.strip().isdigit() else None

    @property
    def pid(self) -> int | None:
        state = podman("inspect", "--format", "{{.State.Pid}}", self.name, check=False)
        pid = int(state.stdout) if state.returncode == 0 and state.stdout.strip().isdigit() else 0
        return pid or None

    def stop(self, timeout: float = 30.0) -> None:
        """`podman stop` (the image's STOPSIGNAL, SIGTERM), keep the exit status and the output."""
        if podman("container", "exists", self.name, check=False).returncode != 0:
            return
        podman("stop", "--time", str(int(timeout)), self.name, timeout=timeout + 30)
        self.exit_code = self.exit_status()
        logs = podman("logs", self.name, check=False)
        with open(self.log_path, "a") as log:
            log.write(f"\n=== harness: container {self.name}, run #{self.starts} ===\n")
            log.write(logs.stdout + logs.stderr)
            log.write(f"=== harness: stopped, exit status {self.exit_code} ===\n")
        podman("rm", "--force", "--ignore", self.name)

    def diagnostics(self, lines: int = 80) -> str:
        if not self.running():
            return super().diagnostics(lines)
        logs = podman("logs", "--tail", str(lines), self.name, check=False)
        return f"--- container {self.name} output tail ---\n{logs.stdout}{logs.stderr}"

    def kill(self, timeout: float = 10.0) -> None:
        podman("kill", self.name, check=False)
        self.stop(timeout)

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            podman("volume", "rm", "--force", self.volume, check=False)
