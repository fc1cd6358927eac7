"""Keys and certificates: the self-signed certificate an XTLS endpoint presents, whose
subjectAltName carries the account's bare JID as an XmppAddr, and the fingerprints people
compare."""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: id-on-xmppAddr, RFC 6120 §13.7.1.4.
XMPP_ADDR_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")


def der_utf8string(text: str) -> bytes:
    """DER encoding of an ASN.1 UTF8String, as an XmppAddr is carried."""
    body = text.encode("utf-8")
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(octets)]) + octets
    return b"\x0c" + length + body


def parse_der_utf8string(der: bytes) -> str:
    """Inverse of `der_utf8string`; `ValueError` on anything but one UTF8String."""
    if len(der) < 2 or der[0] != 0x0C:
        raise ValueError("not a DER UTF8String")
    first = der[1]
    if first < 0x80:
        n, offset = first, 2
    else:
        k = first & 0x7F
        if k == 0 or k > 4 or len(der) < 2 + k:
            raise ValueError("bad DER length")
        n, offset = int.from_bytes(der[2 : 2 + k], "big"), 2 + k
    if len(der) != offset + n:
        raise ValueError("DER UTF8String length does not match its content")
    return der[offset:].decode("utf-8")


def colon_hex(digest: bytes) -> str:
    """Uppercase hex pairs joined by ':', the notation people compare."""
    return ":".join(f"{b:02X}" for b in digest)


def spki_sha256(cert_der: bytes) -> str:
    """SHA-256 of the certificate's public key (SPKI): the fingerprint that survives renewal."""
    cert = x509.load_der_x509_certificate(cert_der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return colon_hex(hashlib.sha256(spki).digest())


def cert_sha256(cert_der: bytes) -> str:
    """SHA-256 of the whole certificate (what `openssl x509 -fingerprint -sha256` shows)."""
    return colon_hex(hashlib.sha256(cert_der).digest())


def xmpp_addrs(cert_der: bytes) -> list[str]:
    """The XmppAddr values of the certificate's subjectAltName."""
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    found = []
    for name in san.get_values_for_type(x509.OtherName):
        if name.type_id == XMPP_ADDR_OID:
            try:
                found.append(parse_der_utf8string(name.value))
            except ValueError:
                continue
    return found


@dataclass(frozen=True)
class Identity:
    """A self-signed certificate and its private key (PEM), for one bare JID."""

    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def generate(cls, bare_jid: str, *, days: int = 3650) -> "Identity":
        """A new ECDSA P-256 key and a certificate naming `bare_jid` (CN and one XmppAddr)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, bare_jid)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(
                x509.SubjectAlternativeName([x509.OtherName(XMPP_ADDR_OID, der_utf8string(bare_jid))]),
                critical=False,
            )
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=False,
                              crl_sign=False, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
        )

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike, bare_jid: str) -> "Identity":
        """The identity kept in `directory` (`key.pem`, `cert.pem`), made on first use; the
        directory is made private (0700) and the key readable by its owner alone (0600). A key
        that others can read is refused rather than used."""
        home = Path(directory)
        key_file, cert_file = home / "key.pem", home / "cert.pem"
        if not key_file.exists():
            home.mkdir(parents=True, exist_ok=True)
            home.chmod(0o700)
            made = cls.generate(bare_jid)
            cert_file.write_bytes(made.cert_pem)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(made.key_pem)
        mode = key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{key_file} can be read by other users (mode {mode:o}): chmod 600 it")
        identity = cls(cert_pem=cert_file.read_bytes(), key_pem=key_file.read_bytes())
        if bare_jid not in xmpp_addrs(identity.cert_der):
            raise ValueError(f"{cert_file} does not name {bare_jid}")
        return identity

    @property
    def cert_der(self) -> bytes:
        """The certificate, DER."""
        return x509.load_pem_x509_certificate(self.cert_pem).public_bytes(serialization.Encoding.DER)

    @property
    def spki_sha256(self) -> str:
        """The key's fingerprint, to give to the people who must recognise it."""
        return spki_sha256(self.cert_der)
