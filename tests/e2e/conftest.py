"""Session fixtures for the end-to-end tests: one Prosody, one component, three users;
and, for the tests that also run against ejabberd, one ejabberd with its own component
and the same three users (started only when such a test is selected).

Set XTLS_E2E_PROSODY_LOG=debug to have Prosody log every stanza (shown on failure);
XTLS_E2E_EJABBERD_LOG=debug does the same for ejabberd.

Tests are plain functions that run their scenario with `run(coro)` (asyncio.run with
an overall deadline), so no pytest asyncio plugin is needed.  When a test fails, the
report gets the tail of the component's and the server's logs.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from component import Component
from ejabberd import Ejabberd
from private_ca import PrivateCa
from postgres import Postgres
from prosody import Prosody
from xmpp_server import XmppServer
from xtls_client import Identity, XtlsClient

USERS = {"alice": "alice-secret", "bob": "bob-secret", "mallory": "mallory-secret"}
BOT = "echo@bots.localhost"
# More accounts on the TLS servers: Python bots and clients of the interoperability tests.
TLS_USERS = {"pybot": "pybot-secret", "carol": "carol-secret"}


def run(coro, timeout: float = 120.0):
    """Run one async scenario to completion on a fresh event loop."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Users:
    """Makes logged-out XtlsClients for the registered users (`async with users.client(..)`).

    Each user keeps one certificate for the whole session, as one device would: the echo
    bot trusts on first use and refuses a changed key (spec §2.3).
    """

    def __init__(self, server: XmppServer) -> None:
        self.server = server
        self._identities: dict[tuple[str, str], Identity] = {}

    def identity(self, name: str, cert_jid: str | None = None) -> Identity:
        """The session's certificate for `name`, with XmppAddr `cert_jid` (default: own JID)."""
        xmpp_addr = cert_jid or f"{name}@{self.server.host}"
        key = (name, xmpp_addr)
        if key not in self._identities:
            self._identities[key] = Identity.generate(xmpp_addr)
        return self._identities[key]

    def client(self, name: str, *, cert_jid: str | None = None, identity: Identity | None = None,
               tls: str = "ssl") -> XtlsClient:
        """A client for `name` with a fresh resource, presenting `identity`, else the session's
        certificate with XmppAddr `cert_jid`; `tls="openssl"` opens tunnels over pyOpenSSL
        (which has the TLS exporter for short authentication strings)."""
        jid = f"{name}@{self.server.host}/e2e-{uuid.uuid4().hex[:8]}"
        return XtlsClient(
            jid, USERS[name], host="127.0.0.1", port=self.server.c2s_port,
            identity=identity or self.identity(name, cert_jid), tls=tls,
        )


def _running(server):
    """Start `server`, register USERS, yield it; stop it and remove its files afterwards."""
    try:
        server.start()
        for name, password in USERS.items():
            server.register(name, password)
        yield server
    finally:
        server.cleanup()


def _component(server):
    comp = Component(server)
    try:
        comp.start()
        yield comp
    finally:
        comp.cleanup()


@pytest.fixture(scope="session")
def prosody():
    yield from _running(Prosody(log_level=os.environ.get("XTLS_E2E_PROSODY_LOG", "info")))


@pytest.fixture(scope="session")
def component(prosody):
    yield from _component(prosody)


@pytest.fixture(scope="session")
def users(prosody) -> Users:
    return Users(prosody)


@pytest.fixture(scope="session")
def ejabberd():
    yield from _running(Ejabberd(log_level=os.environ.get("XTLS_E2E_EJABBERD_LOG", "info")))


@pytest.fixture(scope="session")
def ejabberd_component(ejabberd):
    yield from _component(ejabberd)


@pytest.fixture(scope="session")
def ejabberd_users(ejabberd) -> Users:
    return Users(ejabberd)


@pytest.fixture(scope="session", params=["prosody", "ejabberd"])
def tls_server(request, tmp_path_factory):
    """Prosody, then ejabberd, with c2s TLS on a certificate from a private CA (`server.ca`),
    and the accounts of USERS and TLS_USERS: for the `xtls` client and the Python plugin."""
    ca = PrivateCa(tmp_path_factory.mktemp("ca"))
    server = Prosody(tls_ca=ca) if request.param == "prosody" else Ejabberd(tls_ca=ca)
    server.ca = ca
    for server in _running(server):
        for name, password in TLS_USERS.items():
            server.register(name, password)
        yield server


@pytest.fixture(scope="session")
def tls_component(tls_server):
    yield from _component(tls_server)


@pytest.fixture(scope="session")
def homes(tls_server, tmp_path_factory) -> Path:
    """The users' configuration directories, kept for the session: one key per user, as on one
    device (the bots pin it on first use and would refuse a second one)."""
    return tmp_path_factory.mktemp("homes")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        for name in ("component", "api_component", "prosody", "ejabberd_component", "ejabberd"):
            fixture = item.funcargs.get(name)
            if fixture is not None:
                report.sections.append((f"{name} log tail", fixture.diagnostics()))
    return report


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL (Debian's package, loopback, own data directory and port), one per
    test module, stopped by its pid."""
    server = Postgres()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()

