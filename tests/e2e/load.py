"""Runs `xtls-load` against a private Prosody and an xtls-component with many echo bots.

The stack is the one the end-to-end tests use (tests/e2e/prosody.py, component.py): Prosody
on loopback with its own config, ports and data, stopped by pid; the component with
`--bots` echo bots named echo0..echoN-1 and limits raised for the load (tunnels per peer,
start rate); then `xtls-load` with both pids so it can read their CPU time and memory.

    python3 tests/e2e/load.py [--users 10] [--bots 10] [--window 1,4] [--nodelay] \
        [--sample-limits] [--json-dir DIR] [--no-cross-check] [-- xtls-load options...]

Afterwards, unless `--no-cross-check`, the Python test peer runs the same echo through the
same kind of server (tests/e2e/bench_echo.py, one user and the echo bot, the tool's in-flight
values): a figure from the tool alone is not a figure users will see.

`--nodelay` switches Nagle's algorithm off in Prosody (`network_settings = { nagle = false }`;
it is on by default, as in a stock Prosody); `--sample-limits` adds
the c2s rate limits of Debian's sample configuration. `--pin` gives the server the first CPU
and the component and the tool the others: steadier figures, but on two cores it puts the
tool's client-side TLS on the component's core (docs/performance.md). Each value of `--window` restarts the
component with that `[tunnel] window` and runs the tool with the same window on the users'
side. Binaries: release builds from target/release unless $XTLS_COMPONENT_BIN / $XTLS_LOAD_BIN
say otherwise (scripts/load builds them). See docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from component import Component  # noqa: E402
from prosody import Prosody  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def bots_toml(count: int) -> str:
    """`count` echo bots, echo0..echo{count-1}."""
    return "".join(f'[[bots]]\nlocalpart = "echo{n}"\nhandler = "echo"\n' for n in range(count))


def limits_toml(users: int, bots: int, window: int) -> str:
    """Limits wide enough that the load, not a limit, decides the figures."""
    tunnels = users * bots
    return f"""
[limits]
tunnels_per_bot = {max(users, 1000)}
tunnels_per_peer = {max(bots, 16)}
tunnels_total = {max(tunnels, 10000)}
starts_per_peer_per_minute = {max(bots * 60, 120)}
start_burst_per_peer = {max(bots, 20)}
bot_queue = 65536
outbound_queue = 65536

[tunnel]
window = {window}
idle_timeout_secs = 0
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--bots", type=int, default=10)
    parser.add_argument("--window", default="4", help="comma-separated windows, one component run each")
    parser.add_argument("--nodelay", action="store_true",
                        help="Prosody with network_settings = { nagle = false } (default: stock, Nagle on)")
    parser.add_argument("--sample-limits", action="store_true", help="Debian sample c2s rate limits")
    parser.add_argument("--pin", action="store_true",
                        help="pin the server to CPU 0 and the component and the tool to the others")
    parser.add_argument("--json-dir", type=Path, help="write one JSON report per window here")
    parser.add_argument("--no-cross-check", action="store_true",
                        help="skip the Python client's run (tests/e2e/bench_echo.py) after the tool's")
    parser.add_argument("tool_args", nargs=argparse.REMAINDER, help="after --: options for xtls-load")
    args = parser.parse_args()
    tool_args = [a for a in args.tool_args if a != "--"]

    component_bin = Path(os.environ.get("XTLS_COMPONENT_BIN") or REPO / "target/release/xtls-component")
    load_bin = Path(os.environ.get("XTLS_LOAD_BIN") or REPO / "target/release/xtls-load")
    for b in (component_bin, load_bin):
        if not os.access(b, os.X_OK):
            print(f"{b} is missing: run scripts/load, or cargo build --release --bins", file=sys.stderr)
            return 2
    # Debug logging would be part of what is measured.
    os.environ["RUST_LOG"] = "warn"

    label = ", ".join(
        ["Prosody " + ("nagle=false" if args.nodelay else "stock Nagle")]
        + (["sample rate limits"] if args.sample_limits else [])
    )
    server = Prosody(nagle=not args.nodelay, sample_limits=args.sample_limits)
    password = secrets.token_urlsafe(12)
    status = 0
    try:
        server.start()
        cpus = sorted(os.sched_getaffinity(0))
        pin = args.pin and len(cpus) >= 2
        if pin:
            # The server gets a core of its own: runs differ less from one another.
            for task in os.listdir(f"/proc/{server.pid}/task"):
                os.sched_setaffinity(int(task), {cpus[0]})
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: server.register(f"load{n}", password), range(args.users)))
        for window in [int(w) for w in args.window.split(",")]:
            comp = Component(
                server,
                binary=component_bin,
                bots=bots_toml(args.bots),
                extra_config=limits_toml(args.users, args.bots, window),
            )
            try:
                comp.start(timeout=120)
                if pin:
                    for task in os.listdir(f"/proc/{comp.pid}/task"):
                        os.sched_setaffinity(int(task), set(cpus[1:]))
                argv = [
                    str(load_bin),
                    "--server", f"127.0.0.1:{server.c2s_port}",
                    "--host", server.host,
                    "--users", str(args.users),
                    "--bot-domain", comp.domain,
                    "--bots", str(args.bots),
                    "--window", str(window),
                    "--component-pid", str(comp.pid),
                    "--server-pid", str(server.pid),
                    "--label", f"{label}, window {window}",
                ]
                if args.json_dir:
                    args.json_dir.mkdir(parents=True, exist_ok=True)
                    argv += ["--json", str(args.json_dir / f"load-window{window}.json")]
                result = subprocess.run(
                    argv + tool_args,
                    env=dict(os.environ, XTLS_LOAD_PASSWORD=password),
                    preexec_fn=(lambda: os.sched_setaffinity(0, set(cpus[1:]))) if pin else None,
                )
                status = status or result.returncode
            finally:
                comp.stop()
                comp.cleanup()
    finally:
        server.stop()
        server.cleanup()
    if not args.no_cross_check:
        status = status or cross_check(args, tool_args, component_bin)
    return status


def cross_check(args, tool_args: list[str], component_bin: Path) -> int:
    """The same echo, plain against XTLS, from a client we did not write for speed: the
    Python test peer (one user, the echo bot, sockets as the libraries leave them), so a figure
    from the tool never stands alone (docs/performance.md)."""
    in_flight = "1,16"
    for n, arg in enumerate(tool_args):
        if arg == "--in-flight" and n + 1 < len(tool_args):
            in_flight = tool_args[n + 1]
        elif arg.startswith("--in-flight="):
            in_flight = arg.split("=", 1)[1]
    in_flight = ",".join(v for v in in_flight.split(",") if int(v) > 0) or "1"
    argv = [sys.executable, str(Path(__file__).with_name("bench_echo.py")), "--in-flight", in_flight]
    if args.nodelay:
        argv.append("--nodelay")
    print(f"\ncross-check with the Python client: {' '.join(argv[1:])}", flush=True)
    return subprocess.run(argv, env=dict(os.environ, XTLS_COMPONENT_BIN=str(component_bin))).returncode


if __name__ == "__main__":
    sys.exit(main())
