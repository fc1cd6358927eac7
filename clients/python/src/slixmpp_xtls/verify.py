"""The short authentication string and pairing codes (the protocol's verification document):
code formats and the pieces of both exchanges that do not depend on a tunnel."""

from __future__ import annotations

import base64
import hashlib
import hmac

NS_SAS = "urn:xmpp:tmp:xtls:sas"
NS_PAIR = "urn:xmpp:tmp:xtls:pair"
SAS_LABEL = b"EXPERIMENTAL-xtls-sas"
CHANNEL_BINDING_LABEL = b"EXPORTER-Channel-Binding"
SAS28 = "acdefghikmopqruvwxy123456789"


def sas_code(exported: bytes) -> tuple[str, str]:
    """The code shown for 32 exported bytes: five characters of base 28 from the first 24 bits,
    and six digits from the first 32 bits."""
    n = int.from_bytes(exported[:3], "big")
    digits = ""
    for _ in range(5):
        digits = SAS28[n % 28] + digits
        n //= 28
    return digits, f"{int.from_bytes(exported[:4], 'big') % 1_000_000:06d}"


def commitment(nonce: bytes) -> bytes:
    """What the committer sends first: SHA-256 of its nonce."""
    return hashlib.sha256(nonce).digest()


def normalize_code(typed: str) -> str:
    """A pairing code as typed, as the PAKE's password: separators out, upper case, I/L as 1,
    O as 0."""
    kept = "".join(c for c in typed if c not in "- \t").upper()
    return kept.translate(str.maketrans({"I": "1", "L": "1", "O": "0"}))


def pair_confirmation(key: bytes, side: str, channel_binding: bytes) -> bytes:
    """The HMAC each side of a pairing sends to prove it holds the PAKE's key ("A" or "B")."""
    return hmac.new(key, f"xtls-pair confirm {side}".encode() + channel_binding, hashlib.sha256).digest()


def b64(data: bytes) -> str:
    """Standard base64 with padding, as the exchanges carry their payloads."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None, size: int | None = None) -> bytes:
    """Decodes a payload (XML whitespace ignored); `ValueError` when it is not `size` bytes."""
    raw = base64.b64decode("".join((text or "").split()), validate=True)
    if size is not None and len(raw) != size:
        raise ValueError(f"expected {size} bytes, got {len(raw)}")
    return raw
