"""The admin API is closed by default: token required even on loopback, `Host` allow-list,
bounded bodies and deadlines, a connection cap, no CORS unless configured, clear answers
to malformed input.

A component of its own (`tight`) runs with small limits so deadlines are reached quickly;
the session component shows the defaults.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import urllib.parse

import pytest

from component import Component, binary_path
from conftest import BOT
from hostile_helpers import Bystander, LoopThread, assert_no_panic


def raw(component, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None,
        token: bool = True):
    """One request with full control of the headers (Host included); (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", component.admin_port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        sent = {"Host": f"127.0.0.1:{component.admin_port}"}
        if token:
            sent["Authorization"] = f"Bearer {component.token}"
        if body is not None:
            sent["Content-Type"] = "application/json"
            sent["Content-Length"] = str(len(body))
        sent.update(headers or {})
        for name, value in sent.items():
            if value is not None:
                conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            decoded = data.decode(errors="replace")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, decoded
    finally:
        conn.close()


@pytest.fixture(scope="module", autouse=True)
def bystander(users, component):
    """Alice's tunnel to the echo bot of the session component, opened before this module's
    first request; `test_an_unrelated_tunnel_still_works` checks it at the end."""
    loop = LoopThread()
    b = Bystander(loop, users, BOT)
    try:
        b.open()
        yield b
        b.close()
    finally:
        loop.stop()


@pytest.fixture(scope="module")
def tight(prosody):
    comp = Component(prosody, domain=prosody.api_component_domain, bots="", admin_config="""
header_timeout_secs = 1
body_timeout_secs = 1
max_body_bytes = 4096
max_connections = 3
cors_origins = ["https://console.example.org"]
""")
    try:
        comp.start()
        yield comp
    finally:
        comp.cleanup()


def test_no_token_configured_refuses_to_start_and_says_how_to_set_one(tmp_path):
    config = tmp_path / "no-token.toml"
    config.write_text('[component]\ndomain = "bots.localhost"\nserver = "127.0.0.1:1"\nsecret = "s3cret"\n')
    for command in ("check-config", "serve"):
        run = subprocess.run([str(binary_path()), command, "--config", str(config)], capture_output=True,
                             text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        assert run.returncode != 0, run
        message = run.stderr + run.stdout
        assert "admin.token" in message and "XTLS_ADMIN__TOKEN" in message, message


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-123456", "Bearer xtb_" + "A" * 43,
                                           "Basic YWRtaW46YWRtaW4=", "Bearer "])
def test_a_token_is_required_even_on_loopback(component, authorization):
    status, headers, body = raw(component, "GET", "/v1/bots", token=False,
                                headers={"Authorization": authorization})
    assert status == 401, body
    assert headers["content-type"] == "application/problem+json"
    assert headers.get("www-authenticate") == "Bearer"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.2", "localhost.evil.example", None])
def test_a_host_outside_the_allow_list_is_refused(component, host):
    status, _, body = raw(component, "GET", "/v1/bots", headers={"Host": host})
    assert status == 421, body
    assert "admin.allowed_hosts" in body["detail"]
    status, _, body = raw(component, "GET", "/metrics", headers={"Host": host})
    assert status == 421, body


@pytest.mark.parametrize("host", ["10.1.2.3:8347", "pod.cluster.local", None])
def test_the_probes_answer_whatever_the_host(component, host):
    # Orchestrators probe with the pod's address as Host; the probes carry nothing secret.
    for probe in ("/healthz", "/readyz"):
        status, _, body = raw(component, "GET", probe, token=False, headers={"Host": host})
        assert status == 200, (probe, body)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "127.0.0.1", "[::1]:8347"])
def test_loopback_names_are_allowed_by_default(component, host):
    status, _, body = raw(component, "GET", "/v1/bots", headers={"Host": host})
    assert status == 200, body


def test_an_oversized_body_is_refused_before_it_is_read(tight):
    status, _, body = raw(tight, "POST", "/v1/bots", body=b'{"localpart": "' + b"a" * 8000 + b'"}')
    assert status == 413, body
    assert "4096" in body["detail"]


def test_an_oversized_chunked_body_is_refused(tight):
    # No Content-Length: the limit is found while reading. The server may answer and close
    # before the client has sent everything, so send what it takes and then read the answer.
    with socket.create_connection(("127.0.0.1", tight.admin_port), timeout=10) as sock:
        sock.sendall(f"POST /v1/bots HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tight.token}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        try:
            for _ in range(10):
                sock.sendall(b"3e8\r\n" + b"a" * 1000 + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = sock.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer


def test_a_body_that_does_not_arrive_in_time_is_answered_408(tight):
    with socket.create_connection(("127.0.0.1", tight.admin_port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/bots HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {tight.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"loc".encode())
        answer = sock.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 408"), answer


def test_headers_that_never_end_cost_a_connection_only_until_the_deadline(tight):
    # max_connections = 3: three clients trickling headers hold every slot until the
    # 1 s header deadline closes them; a fourth request is then served.
    stalled = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", tight.admin_port), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        stalled.append(sock)
    try:
        status, _, body = raw(tight, "GET", "/healthz")
        assert status == 200, body
        for sock in stalled:
            # Closed by the server (hyper may write a 408 first): the read reaches the end.
            sock.settimeout(5)
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
            assert received == b"" or received.startswith(b"HTTP/1.1 408"), received
    finally:
        for sock in stalled:
            sock.close()


def test_no_cors_unless_configured(component, tight):
    origin = "https://console.example.org"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    _, headers, _ = raw(component, "OPTIONS", "/v1/bots", token=False, headers=preflight)
    assert not any(h.startswith("access-control-") for h in headers), headers
    _, headers, _ = raw(component, "GET", "/v1/bots", headers={"Origin": origin})
    assert not any(h.startswith("access-control-") for h in headers), headers
    # Configured: that origin, and only it.
    status, headers, _ = raw(tight, "OPTIONS", "/v1/bots", token=False, headers=preflight)
    assert status == 200 and headers.get("access-control-allow-origin") == origin, headers
    assert "authorization" in headers.get("access-control-allow-headers", "").lower()
    _, headers, _ = raw(tight, "GET", "/v1/bots", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in headers, headers


@pytest.mark.parametrize("body", [b"{", b"[]", b'{"localpart": 7}', b'{"localpart": "x", "admin": true}',
                                  b"\xff\xfe", b'{"localpart": "x", "handler": "shell"}'])
def test_malformed_json_is_a_422_problem(component, body):
    status, headers, answer = raw(component, "POST", "/v1/bots", body=body)
    assert status == 422, answer
    assert headers["content-type"] == "application/problem+json" and answer["detail"]


@pytest.mark.parametrize("localpart", ["", "a@b", "a/b", "a b", "a\u0000b", "x" * 1024, "a\"b", "a:b",
                                        "../../etc/passwd"])
def test_localparts_that_are_not_valid_are_refused(component, localpart):
    status, answer = component.post("/v1/bots", {"localpart": localpart})
    assert status == 422, answer


@pytest.mark.parametrize("path", ["/v1/bots/..%2F..%2Fetc%2Fpasswd", "/v1/bots/%2e%2e/certificate",
                                  "/v1/bots/echo%00/peers", "/v1/bots/" + "x" * 3000,
                                  "/v1/bots/a%40b%40c/webhook"])
def test_path_traversal_and_junk_in_a_jid_are_not_found(component, path):
    status, answer = component.get(path)
    assert status == 404, answer


@pytest.mark.parametrize("to", ["", "@", "alice@", "a@b@c", "alice@localhost/" + "r" * 1100, "alice@loc alhost"])
def test_messages_to_invalid_jids_are_refused(component, to):
    status, answer = component.post(f"/v1/bots/{urllib.parse.quote('echo@' + component.domain)}/messages",
                                    {"to": to, "body": "hi"})
    assert status == 422, answer


def test_after_all_that_the_api_still_answers(component, tight):
    for comp in (component, tight):
        status, _ = comp.get("/v1/bots")
        assert status == 200


def test_an_unrelated_tunnel_still_works(component, tight, bystander):
    """The tunnel opened before everything above still carries a message both ways, and no
    request above made a component panic."""
    bystander.roundtrip("after the admin API was attacked")
    assert bystander.opened == 1, "the tunnel had to be reopened"
    for comp in (component, tight):
        assert_no_panic(comp)


def test_the_log_scan_finds_a_leaked_secret(prosody):
    # Every Component checks its log at cleanup (Component.assert_log_has_no_secrets); this
    # shows the check can fail.
    comp = Component(prosody)
    try:
        for leak in (comp.token, prosody.component_secret, "-----BEGIN PRIVATE KEY-----"):
            comp.log_path.write_text(f"INFO something happened: {leak}\n")
            with pytest.raises(AssertionError, match="contains secrets"):
                comp.assert_log_has_no_secrets()
        comp.log_path.write_text("INFO nothing to see\n")
        comp.assert_log_has_no_secrets()
    finally:
        comp.log_path.unlink(missing_ok=True)
        comp.cleanup()
