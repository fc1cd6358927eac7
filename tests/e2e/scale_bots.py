"""Scale check: N bots through the admin API, then start-up to ready on a store holding them.

The performance targets this measures: with 10,000 bots, start-up to ready within 2 s
(certificates loaded from the store, not regenerated) and creating a bot through the admin
API within 10 ms.

It starts a private Prosody (`prosody.Prosody`: loopback, own ports, stopped by its pid) and
one `component.Component` with no configured bots, on a fresh store, then:

1. restarts it on the empty store (`--restarts` times) for the 0-bot baseline: time from
   process spawn to the first accepted TCP connection on the admin port and to `/readyz`
   200 (polled every 5 ms), CPU time and RSS (VmRSS, VmHWM) at ready;
2. creates N bots with `POST /v1/bots` over one keep-alive `http.client` connection, timing
   every request (p50/p95/p99/max, bots/s, and p50 of the first and last tenth to show
   growth with the table), and times a trivial authenticated `GET /v1/bots/{jid}` on the
   same connection before and after, as the baseline of the create/baseline ratio;
3. restarts it (SIGTERM, wait, start on the same store) `--restarts` times with N bots and
   measures the same as in 1, checks that every bot is back and that sample bots kept their
   fingerprints (certificates loaded, not regenerated), and times the SIGTERM shutdown;
4. reads the component log of each start for its milestones (`admin API listening`,
   `component authenticated`, ...) as offsets from the spawn;
5. prints a table, and writes everything as JSON with `--json FILE`.

    cargo build --release
    XTLS_COMPONENT_BIN=target/release/xtls-component python3 tests/e2e/scale_bots.py [--bots N] [--json FILE]

Run it from the repository root as root (Prosody runs as the `prosody` user through
setpriv). The binary is $XTLS_COMPONENT_BIN, else <repo>/target/release/xtls-component.
The component runs with RUST_LOG=info (`--rust-log` to change it), as in production.
`--strict` exits with status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import shutil
import socket
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from component import REPO, Component
from prosody import Prosody

DEFAULT_RELEASE_BINARY = REPO / "target" / "release" / "xtls-component"
STARTUP_TARGET_S = 2.0
CREATE_TARGET_MS = 10.0
POLL_INTERVAL_S = 0.005
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)\s+(TRACE|DEBUG|INFO|WARN|ERROR)\s+(\S+?):?\s(.*)$")
MILESTONES = ("admin API listening", "component authenticated", "tunnels left open", "shutting down")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of `values` (p in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary_ms(seconds: list[float]) -> dict:
    """p50/p95/p99/max/mean of durations given in seconds, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "mean_ms": statistics.fmean(ms),
    }


def proc_status(pid: int) -> dict:
    """VmRSS, VmHWM (MiB) and thread count from /proc/<pid>/status, CPU seconds from stat."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            fields[key] = int(value)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    fields["cpu_s"] = (int(stat[11]) + int(stat[12])) / ticks  # utime + stime
    return {"rss_mib": fields["VmRSS"], "hwm_mib": fields["VmHWM"], "threads": fields["Threads"],
            "cpu_s": fields["cpu_s"]}


class TimedComponent(Component):
    """A `Component` whose start records the spawn time and polls /readyz every 5 ms."""

    spawned_at = 0.0  # time.monotonic() just before the spawn
    spawned_wall = 0.0  # time.time() at the same moment, to read the log's timestamps
    listening_s: float | None = None  # spawn to the first accepted TCP connection
    ready_s: float | None = None  # spawn to /readyz 200

    def start(self, timeout: float = 120.0) -> None:
        self.spawned_wall = time.time()
        self.spawned_at = time.monotonic()
        self.listening_s = self.ready_s = None
        super().start(timeout)

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Poll /readyz (a fresh connection each time, as a load balancer would) until 200."""
        status = None
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"component exited while starting\n{self.diagnostics()}")
            conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
            try:
                conn.request("GET", "/readyz")
                now = time.monotonic()
                if self.listening_s is None:
                    self.listening_s = now - self.spawned_at
                response = conn.getresponse()
                response.read()
                status = response.status
            except OSError:
                status = None  # not listening yet
            finally:
                conn.close()
            now = time.monotonic()
            if status == 200:
                self.ready_s = now - self.spawned_at
                return self.ready_s
            if now - self.spawned_at > timeout:
                raise TimeoutError(f"/readyz not 200 within {timeout} s (last: {status})\n{self.diagnostics()}")
            time.sleep(POLL_INTERVAL_S)

    def log_milestones(self) -> dict:
        """Offsets (s, from the spawn) of the last start's log lines worth knowing, and its
        warning and error counts."""
        text = self.log_path.read_text(errors="replace")
        section = text.rsplit("=== harness: start #", 1)[-1]
        found: dict = {"warnings": 0, "errors": 0, "lines": 0}
        marks: dict[str, float] = {}
        for line in section.splitlines():
            match = LOG_LINE.match(line)
            if not match:
                continue
            stamp, level, _target, message = match.groups()
            offset = datetime.fromisoformat(stamp).timestamp() - self.spawned_wall
            found["lines"] += 1
            found["warnings"] += level == "WARN"
            found["errors"] += level == "ERROR"
            marks["first log line"] = min(offset, marks.get("first log line", offset))
            for milestone in MILESTONES:
                if message.startswith(milestone) and milestone not in marks:
                    marks[milestone] = offset
        # Threads write their lines in any order: list the milestones by time.
        found["milestones"] = {k: round(v, 4) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}
        return found


class AdminClient:
    """One keep-alive HTTP/1.1 connection to the admin API, with the bearer token."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self.reconnects = 0
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def timed(self, method: str, path: str, body: dict | None = None) -> tuple[float, int, object]:
        """One request; returns (seconds from send to the whole answer read, status, body)."""
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        start = time.perf_counter()
        try:
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # The server closed the kept-alive connection: count it and retry once on a new
            # one (that sample then includes the TCP connect).
            self.reconnects += 1
            self.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            start = time.perf_counter()
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            raw = response.read()
        elapsed = time.perf_counter() - start
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = raw.decode(errors="replace")
        return elapsed, response.status, answer

    def ok(self, method: str, path: str, body: dict | None = None, want: int = 200):
        elapsed, status, answer = self.timed(method, path, body)
        if status != want:
            raise RuntimeError(f"{method} {path} answered {status}, not {want}: {answer}")
        return elapsed, answer

    def close(self) -> None:
        self.conn.close()


def measure_start(comp: TimedComponent, label: str, bots: int) -> dict:
    """Stop (SIGTERM) and start `comp` on its store; spawn-to-ready figures of the start."""
    stop_start = time.monotonic()
    comp.stop(timeout=120.0)
    stopped_s = time.monotonic() - stop_start
    comp.start()
    at_ready = proc_status(comp.pid)
    time.sleep(1.0)
    settled = proc_status(comp.pid)
    log = comp.log_milestones()
    result = {
        "label": label,
        "bots": bots,
        "previous_stop_s": stopped_s,
        "listening_s": comp.listening_s,
        "ready_s": comp.ready_s,
        "at_ready": at_ready,
        "after_1s": settled,
        "log": log,
    }
    print(f"  {label}: ready in {comp.ready_s:.3f} s (admin port open at {comp.listening_s:.3f} s), "
          f"RSS {at_ready['rss_mib']:.1f} MiB, CPU {at_ready['cpu_s']:.2f} s; "
          f"previous stop took {stopped_s:.2f} s", flush=True)
    return result


def create_bots(client: AdminClient, n: int, handler: str | None) -> tuple[list[float], list[str]]:
    """POST /v1/bots n times; per-request seconds and the created JIDs."""
    times, jids = [], []
    report_every = max(1, n // 10)
    began = time.monotonic()
    for i in range(n):
        body = {"localpart": f"scale{i:06d}"}
        if handler:
            body["handler"] = handler
        elapsed, answer = client.ok("POST", "/v1/bots", body, want=201)
        times.append(elapsed)
        jids.append(answer["jid"])
        if (i + 1) % report_every == 0:
            print(f"  {i + 1}/{n} bots created ({time.monotonic() - began:.1f} s, "
                  f"p50 so far {percentile(times, 50) * 1000:.2f} ms)", flush=True)
    return times, jids


def baseline(client: AdminClient, jid: str, count: int) -> list[float]:
    """`count` timed GET /v1/bots/{jid}."""
    return [client.ok("GET", f"/v1/bots/{jid}")[0] for _ in range(count)]


def fingerprints(client: AdminClient, jids: list[str]) -> dict[str, str]:
    return {jid: client.ok("GET", f"/v1/bots/{jid}")[1]["fingerprints"]["spki_sha256"] for jid in jids}


def sample_of(jids: list[str], k: int = 20) -> list[str]:
    step = max(1, len(jids) // k)
    return sorted(set(jids[::step] + jids[-1:]))


def store_bytes(comp: Component) -> int:
    return sum(p.stat().st_size for p in comp.dir.glob(comp.store_path.name + "*"))


def run(args) -> dict:
    binary = Path(os.environ.get("XTLS_COMPONENT_BIN") or DEFAULT_RELEASE_BINARY)
    if not os.access(binary, os.X_OK):
        sys.exit(f"no component binary at {binary}: build it with `cargo build --release` "
                 "(or set XTLS_COMPONENT_BIN to the binary to measure)")
    os.environ["RUST_LOG"] = args.rust_log  # Component.start passes it on to the binary
    report: dict = {
        "binary": str(binary),
        "bots": args.bots,
        "handler": args.handler or "(server default)",
        "rust_log": args.rust_log,
        "cpus": os.cpu_count(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    prosody = Prosody()
    comp = None
    try:
        prosody.start()
        comp = TimedComponent(prosody, binary=binary, bots="")
        report["workdir"] = str(comp.dir)
        print(f"Prosody pid {prosody.pid}; component in {comp.dir}", flush=True)
        comp.start()
        report["first_start_s"] = comp.ready_s  # creates the store file and migrates it
        print(f"  first start (new store): ready in {comp.ready_s:.3f} s", flush=True)

        print("Start-up with 0 bots:", flush=True)
        empty = [measure_start(comp, f"0 bots, run {r + 1}", 0) for r in range(args.restarts)]

        print(f"Creating {args.bots} bots through POST /v1/bots (one keep-alive connection):", flush=True)
        client = AdminClient(comp.admin_port, comp.token)
        try:
            body = {"localpart": "scale-baseline", **({"handler": args.handler} if args.handler else {})}
            first_time, first = client.ok("POST", "/v1/bots", body, want=201)
            base_before = baseline(client, first["jid"], args.baseline_requests)
            began = time.monotonic()
            create_times, jids = create_bots(client, args.bots, args.handler)
            create_wall = time.monotonic() - began
            base_after = baseline(client, first["jid"], args.baseline_requests)
            sample = sample_of(jids)
            prints_before = fingerprints(client, sample)
            reconnects = client.reconnects
        finally:
            client.close()
        tenth = max(1, len(create_times) // 10)
        report["create"] = {
            **summary_ms(create_times),
            "wall_s": create_wall,
            "bots_per_s": len(create_times) / create_wall,
            "first_tenth_p50_ms": percentile(create_times[:tenth], 50) * 1000,
            "last_tenth_p50_ms": percentile(create_times[-tenth:], 50) * 1000,
            "very_first_ms": first_time * 1000,
            "reconnects": reconnects,
        }
        report["baseline_get_before"] = summary_ms(base_before)
        report["baseline_get_after"] = summary_ms(base_after)
        report["create_over_baseline_p50"] = report["create"]["p50_ms"] / report["baseline_get_after"]["p50_ms"]
        report["rss_after_create"] = proc_status(comp.pid)
        total_bots = args.bots + 1  # with scale-baseline

        print(f"Start-up with {total_bots} bots:", flush=True)
        full = [measure_start(comp, f"{total_bots} bots, run {r + 1}", total_bots) for r in range(args.restarts)]
        client = AdminClient(comp.admin_port, comp.token)
        try:
            _, listed = client.ok("GET", "/v1/bots")
            prints_after = fingerprints(client, sample)
        finally:
            client.close()
        report["restart_check"] = {
            "bots_listed": len(listed),
            "bots_expected": total_bots,
            "sampled": len(sample),
            "fingerprints_kept": sum(prints_before[j] == prints_after.get(j) for j in sample),
        }
        stop_began = time.monotonic()
        comp.stop(timeout=120.0)
        report["final_stop_s"] = time.monotonic() - stop_began
        report["store_bytes"] = store_bytes(comp)
        report["startup_empty"] = empty
        report["startup_full"] = full
        report["startup_empty_ready_s_median"] = statistics.median(r["ready_s"] for r in empty)
        report["startup_full_ready_s_median"] = statistics.median(r["ready_s"] for r in full)
        report["targets"] = {
            "startup_ready_le_2s": report["startup_full_ready_s_median"] <= STARTUP_TARGET_S,
            "create_p50_le_10ms": report["create"]["p50_ms"] <= CREATE_TARGET_MS,
            "create_p99_le_10ms": report["create"]["p99_ms"] <= CREATE_TARGET_MS,
            "certificates_loaded_not_regenerated": (
                report["restart_check"]["fingerprints_kept"] == len(sample)
                and report["restart_check"]["bots_listed"] == total_bots
            ),
        }
        return report
    finally:
        if comp is not None:
            comp.stop(timeout=120.0)
            if args.keep:
                print(f"component files kept in {comp.dir}")
            else:
                shutil.rmtree(comp.dir, ignore_errors=True)
        prosody.cleanup()


def print_table(r: dict) -> None:
    c, before, after = r["create"], r["baseline_get_before"], r["baseline_get_after"]
    empty, full = r["startup_empty"], r["startup_full"]

    def row(name: str, *cells) -> None:
        print(f"{name:<44}" + "".join(f"{cell:>12}" for cell in cells))

    def fmt(v, spec=".2f") -> str:
        return "-" if v is None else format(v, spec)

    print()
    print(f"xtls-component scale: {r['bots']} bots (+1 baseline bot), handler {r['handler']}, "
          f"RUST_LOG={r['rust_log']}, {r['cpus']} CPUs")
    print(f"binary {r['binary']}")
    print()
    row("admin API (ms)", "p50", "p95", "p99", "max", "mean")
    for name, s in ((f"POST /v1/bots x{c['n']}", c), (f"GET /v1/bots/{{jid}} x{before['n']}, 1 bot", before),
                    (f"GET /v1/bots/{{jid}} x{after['n']}, all bots", after)):
        row(name, *(fmt(s[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms")))
    print(f"create: {c['bots_per_s']:.0f} bots/s over {c['wall_s']:.1f} s; "
          f"p50 first tenth {c['first_tenth_p50_ms']:.2f} ms, last tenth {c['last_tenth_p50_ms']:.2f} ms; "
          f"create/GET p50 ratio {r['create_over_baseline_p50']:.1f}x; reconnects {c['reconnects']}")
    print()
    row("start-up (s from spawn; RSS MiB)", "port open", "ready", "CPU s", "RSS", "HWM", "RSS +1s")
    for s in empty + full:
        ready, settled = s["at_ready"], s["after_1s"]
        row(s["label"], fmt(s["listening_s"], ".3f"), fmt(s["ready_s"], ".3f"), fmt(ready["cpu_s"]),
            fmt(ready["rss_mib"], ".1f"), fmt(ready["hwm_mib"], ".1f"), fmt(settled["rss_mib"], ".1f"))
    print(f"stop (SIGTERM to exit) with all bots: {r['final_stop_s']:.2f} s; store {r['store_bytes'] / 2**20:.1f} MiB")
    check = r["restart_check"]
    print(f"after restart: {check['bots_listed']}/{check['bots_expected']} bots listed, "
          f"{check['fingerprints_kept']}/{check['sampled']} sampled fingerprints unchanged")
    print()
    print("component log milestones (s from spawn), last start of each kind:")
    for s in (empty[-1], full[-1]):
        marks = ", ".join(f"{k} {v:.3f}" for k, v in s["log"]["milestones"].items())
        print(f"  {s['label']}: {marks or '(none)'}; {s['log']['warnings']} warnings, {s['log']['errors']} errors")
    print()
    t = r["targets"]
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    print(f"target start-up <= {STARTUP_TARGET_S} s (median ready, {r['bots'] + 1} bots): "
          f"{r['startup_full_ready_s_median']:.3f} s {verdict(t['startup_ready_le_2s'])} "
          f"(0 bots: {r['startup_empty_ready_s_median']:.3f} s)")
    print(f"target create <= {CREATE_TARGET_MS} ms: p50 {c['p50_ms']:.2f} ms {verdict(t['create_p50_le_10ms'])}, "
          f"p99 {c['p99_ms']:.2f} ms {verdict(t['create_p99_le_10ms'])}")
    print(f"certificates loaded, not regenerated: {verdict(t['certificates_loaded_not_regenerated'])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--bots", type=int, default=10000, help="bots to create (default 10000)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--restarts", type=int, default=3, help="start-ups measured per store (default 3)")
    parser.add_argument("--baseline-requests", type=int, default=500,
                        help="timed GET /v1/bots/{jid} before and after creating (default 500)")
    parser.add_argument("--handler", choices=("api", "echo"),
                        help="handler of the created bots (default: the API's default, api)")
    parser.add_argument("--rust-log", default="info", help="RUST_LOG of the component (default info)")
    parser.add_argument("--keep", action="store_true", help="keep the component's directory (log, store)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    args = parser.parse_args()
    if args.bots < 1 or args.restarts < 1 or args.baseline_requests < 1:
        parser.error("--bots, --restarts and --baseline-requests must be at least 1")
    report = run(args)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 1 if args.strict and not all(report["targets"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
