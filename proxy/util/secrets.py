"""One scrubber for every text we log or show: known secrets, bearer tokens, URL passwords.

`known` is the process's own: every secret it holds (API keys, Exoscale credentials, the
remote token once seen) is registered there, and every log record passes through it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

MIN_LENGTH = 4  # shorter values would blank out ordinary words; no key we accept is that short
MARK = "[secret]"
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_URL_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


class Scrubber:
    """Replaces the secrets it knows, and any bearer token or URL password, with [secret]."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()  # longest first: a secret inside another goes too
        self.learn(*secrets)

    def learn(self, *values: str | None) -> None:
        with self._lock:
            known = set(self._secrets)
            known.update(v for v in values if v and len(v) >= MIN_LENGTH)
            self._secrets = tuple(sorted(known, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MARK)
        text = _BEARER.sub(rf"\1{MARK}", text)
        return _URL_PASSWORD.sub(f"://{MARK}@", text)


known = Scrubber()
