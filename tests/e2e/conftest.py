"""Session fixtures for the end-to-end tests: one Prosody, one component, three users.

Set XTLS_E2E_PROSODY_LOG=debug to have Prosody log every stanza (shown on failure).

Tests are plain functions that run their scenario with `run(coro)` (asyncio.run with
an overall deadline), so no pytest asyncio plugin is needed.  When a test fails, the
report gets the tail of the component's and Prosody's logs.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from component import Component
from prosody import Prosody
from xtls_client import XtlsClient

USERS = {"alice": "alice-secret", "bob": "bob-secret", "mallory": "mallory-secret"}
BOT = "echo@bots.localhost"


def run(coro, timeout: float = 120.0):
    """Run one async scenario to completion on a fresh event loop."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Users:
    """Makes logged-out XtlsClients for the registered users (`async with users.client(..)`)."""

    def __init__(self, prosody: Prosody) -> None:
        self.prosody = prosody

    def client(self, name: str, *, cert_jid: str | None = None) -> XtlsClient:
        """A client for `name` with a fresh resource; `cert_jid` overrides the XmppAddr."""
        jid = f"{name}@{self.prosody.host}/e2e-{uuid.uuid4().hex[:8]}"
        return XtlsClient(jid, USERS[name], host="127.0.0.1", port=self.prosody.c2s_port, cert_jid=cert_jid)


@pytest.fixture(scope="session")
def prosody():
    server = Prosody(log_level=os.environ.get("XTLS_E2E_PROSODY_LOG", "info"))
    try:
        server.start()
        for name, password in USERS.items():
            server.register(name, password)
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def component(prosody):
    comp = Component(prosody)
    try:
        comp.start()
        yield comp
    finally:
        comp.cleanup()


@pytest.fixture(scope="session")
def users(prosody) -> Users:
    return Users(prosody)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        for name in ("component", "prosody"):
            fixture = item.funcargs.get(name)
            if fixture is not None:
                report.sections.append((f"{name} log tail", fixture.diagnostics()))
    return report
