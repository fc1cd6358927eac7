"""HTTPS on the admin and metrics listeners (`[admin.tls]`, `[metrics.tls]`), checked with
OpenSSL through Python's `ssl` as the client: the certificate verifies for `localhost` and
127.0.0.1, plain HTTP gets nothing, a silent client loses its connection at the header
deadline, a renewed certificate is served after SIGHUP without a restart, a reload with a
broken key is refused and the old certificate kept, and `check-config` names a key that
does not fit its certificate.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from component import Component, binary_path
from xmpp_server import free_port

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def make_cert(cert: Path, key: Path, name: str = "localhost") -> bytes:
    """Writes a self-signed P-256 certificate for `name` and its key; returns the DER."""
    secret = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    # A subject of its own: OpenSSL finds a self-signed certificate's issuer by name.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {serial:x}"[:64])])
    now = datetime.datetime.now(datetime.timezone.utc)
    built = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(secret.public_key())
        .serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        # The address too: clients here connect to 127.0.0.1, which resolves without /etc/hosts.
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name), x509.IPAddress(LOOPBACK)]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(secret, hashes.SHA256())
    )
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(secret.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return built.public_bytes(serialization.Encoding.DER)


class Files:
    """The listener's certificate and key, and a CA bundle the client trusts."""

    def __init__(self, root: Path) -> None:
        self.cert, self.key, self.trusted = root / "admin.crt", root / "admin.key", root / "trusted.pem"
        self.der = make_cert(self.cert, self.key)
        self.trusted.write_bytes(self.cert.read_bytes())

    def renew(self) -> bytes:
        """A new key and certificate in the same files; the client trusts both."""
        old = self.cert.read_bytes()
        self.der = make_cert(self.cert, self.key)
        self.trusted.write_bytes(old + self.cert.read_bytes())
        return self.der


def tls_section(files: Files) -> str:
    return f'cert_file = "{files.cert}"\nkey_file = "{files.key}"\n'


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("admin-tls"))


@pytest.fixture(scope="module")
def secure(prosody, files):
    metrics_port = free_port()
    comp = Component(
        prosody, domain=prosody.api_component_domain, bots="", https_ca=files.trusted,
        admin_config="header_timeout_secs = 1\n[admin.tls]\n" + tls_section(files),
        extra_config=f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n[metrics.tls]\n' + tls_section(files),
    )
    comp.metrics_port = metrics_port
    comp.start()
    try:
        yield comp
    finally:
        comp.cleanup()


def served_certificate(port: int, trusted: Path) -> tuple[bytes, str, str | None]:
    """The DER certificate, TLS version and ALPN protocol a verifying client sees."""
    context = ssl.create_default_context(cafile=str(trusted))
    context.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True), tls.version(), tls.selected_alpn_protocol()


def wait_for_log(comp: Component, text: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = comp.log_path.read_text(errors="replace")
        if text in log:
            return log
        assert time.monotonic() < deadline, f"{text!r} not logged\n{comp.diagnostics()}"
        time.sleep(0.1)


def test_the_admin_api_answers_over_verified_https(secure, files):
    status, bots = secure.get("/v1/bots")
    assert status == 200 and bots == []
    der, version, alpn = served_certificate(secure.admin_port, files.trusted)
    assert der == files.der
    assert version == "TLSv1.3" and alpn == "http/1.1"


def test_a_wrong_name_is_refused_by_the_client(secure, files):
    context = ssl.create_default_context(cafile=str(files.trusted))
    with socket.create_connection(("127.0.0.1", secure.admin_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            context.wrap_socket(raw, server_hostname="admin.example.org")


def test_plain_http_gets_no_answer(secure):
    conn = http.client.HTTPConnection("127.0.0.1", secure.admin_port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            conn.request("GET", "/healthz")
            conn.getresponse()
    finally:
        conn.close()


def test_metrics_are_served_over_https_on_their_own_listener(secure, files):
    context = ssl.create_default_context(cafile=str(files.trusted))
    conn = http.client.HTTPSConnection("127.0.0.1", secure.metrics_port, timeout=10, context=context)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert b"xtls_" in resp.read()
    finally:
        conn.close()


def test_healthcheck_reads_the_scheme_from_the_configuration(secure):
    done = subprocess.run([str(binary_path()), "healthcheck", "--config", str(secure.config_path)],
                          capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if not k.startswith("XTLS_")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "healthy"


def test_a_silent_client_loses_its_connection_at_the_header_deadline(secure):
    with socket.create_connection(("127.0.0.1", secure.admin_port), timeout=10) as raw:
        started = time.monotonic()
        assert raw.recv(1) == b"", "the server closes a handshake that never starts"
        assert time.monotonic() - started < 8
    assert secure.get("/healthz", token=False)[0] == 200


def test_a_renewed_certificate_is_served_after_sighup(secure, files):
    before = secure.get("/v1/bots")[0]
    new = files.renew()
    os.kill(secure.pid, signal.SIGHUP)
    wait_for_log(secure, "applied=admin.tls, metrics.tls")
    for port in (secure.admin_port, secure.metrics_port):
        assert served_certificate(port, files.trusted)[0] == new
    secure.ssl = ssl.create_default_context(cafile=str(files.trusted))
    assert before == secure.get("/v1/bots")[0] == 200


def test_a_broken_key_on_reload_keeps_the_certificate_in_service(secure, files):
    serving = files.der
    good_key = files.key.read_bytes()
    files.key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    try:
        os.kill(secure.pid, signal.SIGHUP)
        log = wait_for_log(secure, "the running one stays")
        assert "admin.tls" in log
    finally:
        files.key.write_bytes(good_key)
    assert served_certificate(secure.admin_port, files.trusted)[0] == serving
    assert secure.pid is not None


def test_check_config_names_a_key_that_does_not_fit(tmp_path, files):
    other_cert, other_key = tmp_path / "other.crt", tmp_path / "other.key"
    make_cert(other_cert, other_key)
    config = tmp_path / "xtls.toml"
    config.write_text(f"""[component]
domain = "bots.localhost"
secret = "a-secret"
[admin]
token = "a-long-token"
[admin.tls]
cert_file = "{files.cert}"
key_file = "{other_key}"
""")
    done = subprocess.run([str(binary_path()), "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if not k.startswith("XTLS_")})
    assert done.returncode == 2
    assert "admin.tls" in done.stderr and "does not fit" in done.stderr, done.stderr
    assert "PRIVATE KEY" not in done.stderr + done.stdout
