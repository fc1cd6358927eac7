"""Throughput of the bot-facing API: message.received events per second through Prosody.

For each way of reading (webhook, Server-Sent Events, long poll) a fresh `api` bot gets `n`
messages from alice through one XTLS tunnel (alice writes them as fast as the window of
4 unacknowledged data IQs allows); the figure is `n` divided by the time from the first
send until the reader has the n-th `message.received` event.  The bodies are checked
(every one, in order); the timings are only printed.

    python3 tests/e2e/bench_delivery.py [N]       (starts its own Prosody and component)

`test_bot_api.test_delivery_throughput` runs the same measurement with the test fixtures.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Callable

from botapi_helpers import (
    FAST_WEBHOOKS_CONFIG,
    EventPoller,
    WebhookReceiver,
    call,
    messages_received,
    new_api_bot,
    open_sse,
    put_webhook,
)


async def _send(tunnel, bodies: list[str]) -> float:
    start = time.perf_counter()
    for body in bodies:
        await tunnel.send_message(body)
    return time.perf_counter() - start


def _line(way: str, n: int, elapsed: float, sending: float) -> str:
    return (
        f"{way:<9} {n} message.received events in {elapsed:6.3f} s = {n / elapsed:7.0f} events/s "
        f"(alice's sending took {sending:.3f} s)"
    )


async def bench_webhook(component, alice, n: int) -> tuple[float, float]:
    bot = await call(new_api_bot, component, "benchhook")
    receiver = WebhookReceiver()
    try:
        await call(put_webhook, component, bot, receiver)
        tunnel = await alice.open_tunnel(bot)
        bodies = [f"webhook bench {i}" for i in range(n)]
        start = time.perf_counter()
        waiter = asyncio.create_task(call(
            receiver.wait_for, lambda r: len(r.acked("message.received")) >= n, 120, f"{n} webhook deliveries"
        ))
        sending = await _send(tunnel, bodies)
        await waiter
        elapsed = time.perf_counter() - start
        assert receiver.acked_bodies() == bodies, "webhook: bodies lost, changed or reordered"
        assert receiver.invalid() == []
        await tunnel.close()
        return elapsed, sending
    finally:
        await call(component.delete, f"/v1/bots/{bot}/webhook")
        receiver.stop()


async def bench_sse(component, alice, n: int) -> tuple[float, float]:
    bot = await call(new_api_bot, component, "benchsse")
    sse = await call(open_sse, component, bot)  # from the cursor (nothing yet), then live
    try:
        assert sse.status == 200, (sse.status, sse.error_body)
        tunnel = await alice.open_tunnel(bot)
        bodies = [f"sse bench {i}" for i in range(n)]
        got: list[str] = []

        def collect() -> None:
            while len(got) < n:
                event = sse.next(timeout=60)
                if event.event == "message.received":
                    got.append(event.json["data"].get("body"))

        start = time.perf_counter()
        waiter = asyncio.create_task(call(collect))
        sending = await _send(tunnel, bodies)
        await waiter
        elapsed = time.perf_counter() - start
        assert got == bodies, "SSE: bodies lost, changed or reordered"
        await tunnel.close()
        return elapsed, sending
    finally:
        await call(sse.close)


async def bench_long_poll(component, alice, n: int) -> tuple[float, float]:
    bot = await call(new_api_bot, component, "benchpoll")
    poller = EventPoller(component, bot)
    tunnel = await alice.open_tunnel(bot)
    bodies = [f"poll bench {i}" for i in range(n)]
    start = time.perf_counter()
    waiter = asyncio.create_task(poller.until(lambda evs: len(messages_received(evs)) >= n, 120, f"{n} events"))
    sending = await _send(tunnel, bodies)
    await waiter
    elapsed = time.perf_counter() - start
    assert [e["data"].get("body") for e in messages_received(poller.events)] == bodies, "poll: bodies wrong"
    await tunnel.close()
    return elapsed, sending


async def run_benchmarks(component, client_factory: Callable, n: int = 300) -> dict:
    """All three measurements with one logged-in client from `client_factory()`; returns
    {"webhook": (elapsed, sending), "sse": ..., "poll": ..., "lines": [printable lines]}."""
    figures: dict = {"lines": []}
    async with client_factory() as alice:
        for way, bench in (("webhook", bench_webhook), ("sse", bench_sse), ("long-poll", bench_long_poll)):
            elapsed, sending = await bench(component, alice, n)
            figures[way] = (elapsed, sending)
            figures["lines"].append(_line(way, n, elapsed, sending))
    return figures


def main() -> int:
    from component import Component
    from prosody import Prosody, ensure_installed
    from xtls_client import XtlsClient

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    ensure_installed()
    prosody = Prosody()
    component = None
    try:
        prosody.start()
        prosody.register("alice", "bench-password")
        component = Component(prosody, domain=prosody.api_component_domain, bots="", extra_config=FAST_WEBHOOKS_CONFIG)
        component.start()
        factory = lambda: XtlsClient(  # noqa: E731
            "alice@localhost/bench", "bench-password", host="127.0.0.1", port=prosody.c2s_port
        )
        figures = asyncio.run(asyncio.wait_for(run_benchmarks(component, factory, n), 300))
        for line in figures["lines"]:
            print(line)
        return 0
    except Exception:
        if component is not None:
            print(component.diagnostics(), file=sys.stderr)
        print(prosody.diagnostics(), file=sys.stderr)
        raise
    finally:
        if component is not None:
            component.cleanup()
        prosody.cleanup()


if __name__ == "__main__":
    sys.exit(main())
