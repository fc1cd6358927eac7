"""Known keys: ssh-style, one line per peer (`JID SPKI-SHA-256 tofu|verified since`), the same
file format as the `xtls` command-line client's `known_bots`."""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

HEADER = "# JID  SPKI-SHA-256  how (tofu|verified)  since\n"


@dataclass(frozen=True)
class KnownKey:
    """One peer's key: its bare JID, SPKI SHA-256, how it came to be known, since when."""

    jid: str
    spki_sha256: str
    how: str  # "tofu" or "verified"
    since: str


class KnownKeys:
    """The keys of the peers met so far; in memory, or kept in a file when `path` is given."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._keys: dict[str, KnownKey] = {}
        if self.path is not None and self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                fields = line.split()
                if len(fields) != 4 or fields[2] not in ("tofu", "verified"):
                    raise ValueError(f"{self.path}:{number}: not `JID SPKI tofu|verified SINCE`: {line!r}")
                self._keys[fields[0]] = KnownKey(*fields)

    def get(self, jid: str) -> KnownKey | None:
        """The key known for the bare JID `jid`."""
        return self._keys.get(jid)

    def check(self, jid: str, spki_sha256: str) -> str:
        """'new', 'known' or 'changed': what the file says of `jid` presenting this key."""
        known = self._keys.get(jid)
        if known is None:
            return "new"
        return "known" if known.spki_sha256 == spki_sha256 else "changed"

    def remember(self, jid: str, spki_sha256: str, how: str = "tofu") -> KnownKey:
        """Records the key (replacing any other for `jid`) and saves the file."""
        if how not in ("tofu", "verified"):
            raise ValueError(how)
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        key = KnownKey(jid, spki_sha256, how, now.strftime("%Y-%m-%dT%H:%M:%SZ"))
        self._keys[jid] = key
        self._save()
        return key

    def forget(self, jid: str) -> KnownKey | None:
        """Drops `jid`'s key; the next tunnel with it is a first meeting again."""
        key = self._keys.pop(jid, None)
        self._save()
        return key

    def __iter__(self):
        return iter(self._keys.values())

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = HEADER + "".join(f"{k.jid} {k.spki_sha256} {k.how} {k.since}\n" for k in self._keys.values())
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".known-")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
