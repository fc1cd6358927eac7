"""ejabberd's component load balancing (`domain_balancing`), as it meets xtls-component:
misconfiguration that must stop the component with a clear reason rather than loop."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from component import Component, binary_path
from ejabberd import Ejabberd


@pytest.fixture(scope="module")
def ejabberd_without_component_number():
    """A private ejabberd whose `domain_balancing` for api.localhost has `type` and no
    `component_number`: every component handshake for that domain crashes its session."""
    server = Ejabberd(balanced_slots=3, omit_component_number=True)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def test_a_balancing_entry_without_component_number_stops_the_component_and_says_why(
        ejabberd_without_component_number):
    server = ejabberd_without_component_number
    comp = Component(server, domain=server.api_component_domain, bots="")
    try:
        started = time.monotonic()
        done = subprocess.run([str(binary_path()), "serve", "--config", str(comp.config_path)],
                              capture_output=True, text=True, timeout=60, cwd=comp.dir,
                              env={"PATH": "/usr/bin:/bin", "RUST_LOG": "info"})
        elapsed = time.monotonic() - started
    finally:
        comp.cleanup()
    said = done.stderr + done.stdout
    assert done.returncode != 0, said
    assert "without answering it, 3 times in a row" in said and "component_number" in said, said
    assert elapsed < 20, f"took {elapsed:.1f} s to give up"
    assert "component authenticated" not in said
    # What the server says about it, for the record (docs/protocol.md §3.7).
    assert "badkey,component_number" in server.log_path.read_text(errors="replace") + \
        server.error_log_path.read_text(errors="replace")


# Pings every second, so that a run of a few seconds spans many of them; a connection beyond
# the slots tries again after 2 s.
FAST_LINK = "ping_interval_secs = 1\nping_timeout_secs = 2\nreconnect_max_secs = 2"


@pytest.fixture(scope="module")
def ejabberd_three_slots():
    """A private ejabberd that spreads api.localhost over 3 slots by the destination's bare
    JID (`domain_balancing`, `bare_destination`, `component_number: 3`)."""
    server = Ejabberd(balanced_slots=3)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def _readiness(comp: Component) -> tuple[int, dict]:
    status, body = comp.get("/readyz", token=False, timeout=2.0)
    return status, body if isinstance(body, dict) else {}


def _wait_for_problem(comp: Component, words: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if comp.exit_status() is not None:
            raise AssertionError(f"component exited\n{comp.diagnostics()}")
        status, body = _readiness(comp)
        problem = (body.get("component") or {}).get("problem") or ""
        last = (status, problem)
        if status == 503 and words in problem:
            return problem
        time.sleep(0.25)
    raise AssertionError(f"/readyz never said {words!r} (last: {last})\n{comp.diagnostics()}")


def test_one_instance_per_slot_all_stay_connected_and_a_fourth_waits_for_a_slot(ejabberd_three_slots):
    """Three instances take the three slots. The server's answers to the bare domain reach only
    one of them, so each one pings from an address that reaches itself: all three stay up over
    many ping intervals. A fourth gets no slot and says so; once one of the three dies, it takes
    the freed slot."""
    server = ejabberd_three_slots
    comps = [Component(server, domain=server.api_component_domain, bots="",
                       component_config=FAST_LINK) for _ in range(4)]
    try:
        for comp in comps[:3]:
            comp.start()
        time.sleep(8)  # eight ping intervals
        for comp in comps[:3]:
            status, body = _readiness(comp)
            assert status == 200, (body, comp.diagnostics())
            log = comp.log_path.read_text(errors="replace")
            assert "component link lost" not in log, comp.diagnostics()
            assert "the server routes to this connection" in log

        extra = comps[3]
        extra.start(standby=True)
        problem = _wait_for_problem(extra, "no slot", timeout=40)
        assert "component_number" in problem, problem

        comps[0].kill()
        waited = extra.wait_ready(timeout=30)
        assert "the server routes to this connection" in extra.log_path.read_text(errors="replace")
        for comp in comps[1:3]:
            assert _readiness(comp)[0] == 200, comp.diagnostics()
        print(f"the fourth instance took the freed slot {waited:.1f} s after the kill")
    finally:
        for comp in comps:
            comp.cleanup()


def test_the_route_of_a_bot_is_its_own_instance_with_one_connection(component):
    """With one connection for the domain (Prosody), every probe comes back."""
    status, body = component.get("/v1/bots/echo@bots.localhost/route")
    assert status == 200, body
    assert body["reaches_this_instance"] is True, body
    assert body["bot"] == "echo@bots.localhost"
    assert body["waited_ms"] < 3000, body
    status, body = component.get("/v1/bots/nobody@bots.localhost/route")
    assert status == 404, body


BOTS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]


def test_each_bot_reaches_exactly_one_of_three_instances_on_three_slots(ejabberd_three_slots):
    """Three instances on a 3-slot domain, each with the same nine bots (in stores of their
    own): the server routes each bot's stanzas to exactly one of them, and only that one's
    probe comes back."""
    server = ejabberd_three_slots
    bots = "\n".join(f'[[bots]]\nlocalpart = "{name}"\nhandler = "echo"\n' for name in BOTS)
    comps = [Component(server, domain=server.api_component_domain, bots=bots,
                       component_config=FAST_LINK) for _ in range(3)]
    try:
        for comp in comps:
            comp.start()
        # A probe that does not come back is waited for 3 s: ask all at once.
        asks = [(name, i) for name in BOTS for i in range(len(comps))]
        with ThreadPoolExecutor(max_workers=len(asks)) as pool:
            answers = list(pool.map(
                lambda ask: comps[ask[1]].get(f"/v1/bots/{ask[0]}@{server.api_component_domain}/route"),
                asks))
        owners: dict[str, list[int]] = {}
        for (name, i), (status, body) in zip(asks, answers):
            assert status == 200, body
            if body["reaches_this_instance"]:
                owners.setdefault(name, []).append(i)
        assert sorted(owners) == sorted(BOTS), owners
        assert all(len(held) == 1 for held in owners.values()), owners
        print("bots per instance:", [sum(held == [i] for held in owners.values()) for i in range(3)])
    finally:
        for comp in comps:
            comp.cleanup()
