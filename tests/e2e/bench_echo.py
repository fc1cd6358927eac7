"""Echo throughput as an ordinary client sees it: the Python test peer against the echo bot.

The cross-check for `xtls-load` (docs/performance.md): one user, logged in with slixmpp over
plaintext c2s on loopback, its sockets as the libraries leave them (Nagle on, no quick-ACK),
doing the tunnel's TLS with Python's `ssl` (OpenSSL, memory BIOs). For each in-flight value it
echoes `--messages` chat messages through the built-in `echo` bot in plain, then the same
number through one XTLS tunnel, and prints messages/s, the round trip's median and p99, the
XTLS/plain ratio and how many round trips took longer than 30 ms (the signature of a segment
held by Nagle until a delayed ACK).

The server runs with its stock network settings unless `--nodelay` is given (Prosody:
`network_settings = { nagle = false }`; ejabberd's listeners set `nodelay` themselves).
ejabberd runs without a c2s shaper unless `--stock-shaper` adds Debian's (3,000 bytes/s).

    python3 tests/e2e/bench_echo.py [--server prosody|ejabberd] [--nodelay] [--stock-shaper] \
        [--messages 2000] [--in-flight 1,4,16] [--size 140] [--api] [--json FILE] [--capture PCAP]

`--api` adds a bot with the `api` handler whose backend (a thread here: Server-Sent Events in,
`POST /v1/bots/{jid}/messages` out) echoes each message: its XTLS phase shows what a reply
written after the acknowledgement costs, beside the built-in echo's.

`--capture PCAP` records the c2s and component connections with tcpdump (Debian's package)
while the phases run: `tcpdump -r PCAP -tt -n` shows which segment waited for which ACK.

Binary: target/release/xtls-component unless $XTLS_COMPONENT_BIN says otherwise
(`scripts/bench-echo` builds it and prepares the servers and the virtual environment).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from botapi_helpers import new_api_bot, open_sse  # noqa: E402
from component import Component  # noqa: E402
from xtls_client import NS_CLIENT, Tunnel, XtlsClient, message_xml  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STALL_MS = 30.0


def cpu_seconds(pid: int | None) -> float:
    """User and system CPU time of process `pid` (the calling process when None)."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Phase:
    """One echo phase: `total` messages, at most `in_flight` of them unanswered at a time.

    `pids` names the processes whose CPU time per echo is reported (None: this one)."""

    pids: dict[str, int | None] = {}

    def __init__(self, total: int, in_flight: int, size: int) -> None:
        self.total = total
        self.in_flight = in_flight
        self.size = size
        self.sent = 0
        self.sent_at: dict[str, float] = {}
        self.rtts: list[float] = []
        self.done = asyncio.get_running_loop().create_future()
        self.started = 0.0
        self.elapsed = 0.0
        self.cpu: dict[str, float] = {}

    def start(self) -> None:
        self.cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.started = time.perf_counter()

    def next_body(self) -> str:
        """A fresh body of `size` characters that names the message."""
        tag = f"{self.sent:06d}-{uuid.uuid4().hex[:8]}-"
        body = (tag + "x" * self.size)[: max(self.size, len(tag))]
        self.sent_at[body] = time.perf_counter()
        self.sent += 1
        return body

    def answered(self, body: str) -> bool:
        """Records the echo of `body`; True when another message should go out."""
        sent = self.sent_at.pop(body, None)
        if sent is None:
            raise RuntimeError(f"an echo of a message this phase did not send: {body[:40]!r}")
        self.rtts.append((time.perf_counter() - sent) * 1000.0)
        if len(self.rtts) == self.total and not self.done.done():
            self.elapsed = time.perf_counter() - self.started
            self.cpu = {name: cpu_seconds(pid) - self.cpu[name] for name, pid in self.pids.items()}
            self.done.set_result(None)
        return self.sent < self.total

    def report(self, mode: str) -> dict:
        rtts = sorted(self.rtts)
        return {
            "mode": mode,
            "in_flight": self.in_flight,
            "messages": len(rtts),
            "seconds": round(self.elapsed, 4),
            "msg_per_s": round(len(rtts) / self.elapsed, 1),
            "rtt_ms": {
                "p50": round(statistics.median(rtts), 3),
                "p99": round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], 3),
                "max": round(rtts[-1], 3),
            },
            "stalls_over_30ms": sum(1 for r in rtts if r > STALL_MS),
            "cpu_us_per_echo": {name: round(sec * 1e6 / len(rtts), 1) for name, sec in self.cpu.items()},
        }


async def plain_phase(client: XtlsClient, bot: str, total: int, in_flight: int, size: int) -> dict:
    """Chat messages to the bot in plain, each answered in plain by the echo handler."""
    phase = Phase(total, in_flight, size)

    def send() -> None:
        client.xmpp.send_message(mto=bot, mbody=phase.next_body(), mtype="chat")

    def on_message(msg) -> None:
        if msg["type"] != "chat" or str(msg["from"].bare) != bot or not msg["body"]:
            return
        if phase.answered(msg["body"]):
            send()

    client.xmpp.add_event_handler("message", on_message)
    try:
        phase.start()
        for _ in range(min(in_flight, total)):
            send()
        await asyncio.wait_for(phase.done, 120)
    finally:
        client.xmpp.del_event_handler("message", on_message)
    return phase.report("plain")


async def xtls_phase(tunnel: Tunnel, total: int, in_flight: int, size: int) -> dict:
    """Chat messages through the open tunnel, each answered through it by the echo handler."""
    phase = Phase(total, in_flight, size)

    def send() -> None:
        tunnel.queue_stanza(message_xml(phase.next_body(), uuid.uuid4().hex[:12]))

    async def read() -> None:
        while not phase.done.done():
            stanza = await tunnel.recv_stanza(timeout=60)
            if stanza.tag != f"{{{NS_CLIENT}}}message":
                continue
            if phase.answered(stanza.findtext(f"{{{NS_CLIENT}}}body") or ""):
                send()

    phase.start()
    for _ in range(min(in_flight, total)):
        send()
    await asyncio.wait_for(read(), 120)
    return phase.report("xtls")


def start_capture(path: Path, server) -> subprocess.Popen:
    """tcpdump on loopback for the server's c2s and component ports, until terminated."""
    proc = subprocess.Popen(
        ["tcpdump", "-i", "lo", "-w", str(path), "-U", "-s", "0",
         f"tcp port {server.c2s_port} or tcp port {server.component_port}"],
        stderr=subprocess.PIPE,
    )
    # tcpdump says "listening on lo" once it captures.
    line = proc.stderr.readline().decode(errors="replace")
    if proc.poll() is not None:
        raise RuntimeError(f"tcpdump did not start: {line}{proc.stderr.read().decode(errors='replace')}")
    return proc


class ApiBackend:
    """The backend of an `api` bot, as simple as they come: one thread reads the bot's events
    over Server-Sent Events and answers every `message.received` with the same body through
    `POST /v1/bots/{jid}/messages`."""

    def __init__(self, comp: Component, bot: str) -> None:
        self.comp, self.bot = comp, bot
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._stream = open_sse(comp, bot, timeout=30)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    event = self._stream.next(0.5).json
                except TimeoutError:
                    continue
                if event.get("type") != "message.received" or not event["data"].get("body"):
                    continue
                status, answer = self.comp.post(
                    f"/v1/bots/{self.bot}/messages", {"to": event["peer"], "body": event["data"]["body"]}
                )
                if status != 202:
                    raise RuntimeError(f"POST messages -> {status}: {answer!r}")
        except BaseException as exc:  # reported by close()
            if not self._stop.is_set():
                self.failure = exc

    def close(self) -> None:
        self._stop.set()
        self._stream.close()
        self._thread.join(5)
        if self.failure is not None:
            raise RuntimeError(f"the api backend failed: {self.failure}") from self.failure


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'in flight':>9} | {'plain msg/s':>11} | {'XTLS msg/s':>10} | {'XTLS/plain':>10} | "
          f"{'p50 plain/XTLS ms':>17} | {'p99 plain/XTLS ms':>17} | {'>30 ms plain/XTLS':>17}")
    for row in rows:
        p, x = row["plain"], row["xtls"]
        print(f"{row['in_flight']:>9} | {p['msg_per_s']:>11,.0f} | {x['msg_per_s']:>10,.0f} | "
              f"{row['ratio']:>10.2f} | {p['rtt_ms']['p50']:>7.2f} / {x['rtt_ms']['p50']:<7.2f} | "
              f"{p['rtt_ms']['p99']:>7.2f} / {x['rtt_ms']['p99']:<7.2f} | "
              f"{p['stalls_over_30ms']:>7} / {x['stalls_over_30ms']:<7}")
    if any("api" in row for row in rows):
        print("api bot (an SSE backend answers through POST .../messages), XTLS:")
        for row in rows:
            a = row["api"]
            print(f"{row['in_flight']:>9} | {a['msg_per_s']:>11,.0f} msg/s | api / echo {row['api_ratio']:.2f} | "
                  f"p50 {a['rtt_ms']['p50']:.2f} ms | p99 {a['rtt_ms']['p99']:.2f} ms | >30 ms {a['stalls_over_30ms']}")
    print("CPU µs per echo, plain / XTLS:")
    for row in rows:
        p, x = row["plain"]["cpu_us_per_echo"], row["xtls"]["cpu_us_per_echo"]
        print(f"{row['in_flight']:>9} | " + " | ".join(f"{name} {p[name]:.0f} / {x[name]:.0f}" for name in p))


async def run(server, comp: Component, password: str, args) -> list[dict]:
    bot = f"echo@{comp.domain}"
    client = XtlsClient(f"bench@{server.host}/bench", password, host="127.0.0.1", port=server.c2s_port)
    await client.connect()
    rows = []
    try:
        tunnel = await client.open_tunnel(bot)
        backend = api_tunnel = None
        if args.api:
            api_bot = new_api_bot(comp, "bench")
            backend = ApiBackend(comp, api_bot)
            api_tunnel = await client.open_tunnel(api_bot)
        # One round of each to warm the paths (JIT-free, but caches, routes and the bot's task).
        await plain_phase(client, bot, 50, 1, args.size)
        await xtls_phase(tunnel, 50, 1, args.size)
        if api_tunnel is not None:
            await xtls_phase(api_tunnel, 50, 1, args.size)
        for in_flight in args.in_flight:
            plain = await plain_phase(client, bot, args.messages, in_flight, args.size)
            xtls = await xtls_phase(tunnel, args.messages, in_flight, args.size)
            row = {
                "in_flight": in_flight,
                "plain": plain,
                "xtls": xtls,
                "ratio": round(xtls["msg_per_s"] / plain["msg_per_s"], 3),
            }
            if api_tunnel is not None:
                row["api"] = await xtls_phase(api_tunnel, args.messages, in_flight, args.size)
                row["api_ratio"] = round(row["api"]["msg_per_s"] / xtls["msg_per_s"], 3)
            rows.append(row)
        await tunnel.close()
        if api_tunnel is not None:
            await api_tunnel.close()
            backend.close()
    finally:
        await client.disconnect()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", choices=("prosody", "ejabberd"), default="prosody")
    parser.add_argument("--nodelay", action="store_true",
                        help="Prosody with network_settings = { nagle = false } instead of its stock setting")
    parser.add_argument("--stock-shaper", action="store_true",
                        help="ejabberd with Debian's c2s shaper (3,000 bytes/s, bursts of 20,000)")
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--in-flight", default="1,4,16")
    parser.add_argument("--size", type=int, default=140, help="body length in characters")
    parser.add_argument("--api", action="store_true",
                        help="also echo through an api bot whose backend answers over the bot API")
    parser.add_argument("--json", type=Path, help="write the report here as well")
    parser.add_argument("--capture", type=Path, help="record the server's c2s and component ports here (tcpdump)")
    args = parser.parse_args()
    args.in_flight = [int(v) for v in args.in_flight.split(",")]

    binary = Path(os.environ.get("XTLS_COMPONENT_BIN") or REPO / "target/release/xtls-component")
    if not os.access(binary, os.X_OK):
        print(f"{binary} is missing: run scripts/bench-echo, or cargo build --release", file=sys.stderr)
        return 2
    os.environ["RUST_LOG"] = "warn"  # debug logging would be part of what is measured

    if args.server == "prosody":
        from prosody import Prosody

        server = Prosody(nagle=not args.nodelay)
        label = "Prosody, " + ("nagle = false" if args.nodelay else "stock network settings (Nagle on)")
    else:
        from ejabberd import Ejabberd

        server = Ejabberd(stock_shaper=args.stock_shaper)
        label = "ejabberd" + (", Debian's c2s shaper" if args.stock_shaper else ", no shaper")
    password = secrets.token_urlsafe(12)
    comp = capture = None
    try:
        server.start()
        server.register("bench", password)
        comp = Component(server, binary=binary)
        comp.start(timeout=60)
        Phase.pids = {"client": None, "server": server.pid, "component": comp.pid}
        if args.capture:
            capture = start_capture(args.capture, server)
        rows = asyncio.run(run(server, comp, password, args))
    finally:
        if capture is not None:
            capture.terminate()
            capture.wait(10)
        if comp is not None:
            comp.stop()
            comp.cleanup()
        server.stop()
        server.cleanup()
    title = (f"{label}; Python client (slixmpp, ssl), 1 user, echo bot, "
             f"{args.messages} messages of {args.size} characters per phase")
    print_table(title, rows)
    if args.json:
        args.json.write_text(json.dumps({"label": title, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
