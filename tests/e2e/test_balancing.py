"""ejabberd's component load balancing (`domain_balancing`), as it meets xtls-component:
misconfiguration that must stop the component with a clear reason rather than loop."""

from __future__ import annotations

import subprocess
import time

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
