"""Logging: one line per event that matters, to stderr, as text or JSON, never with a secret.

Every known secret (API keys, Exoscale credentials, the upstream token once seen), bearer
token and URL password is replaced by `[secret]` in every record that goes through the
project's loggers (proxy/util/secrets.py): a last guard behind code that already avoids
logging them.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import datetime, timezone

from proxy.util.secrets import known as scrub


def register_secrets(values: Iterable[str | None]) -> None:
    """Values that must never appear in a log line."""
    scrub.learn(*values)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))  # message, arguments and traceback alike


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return scrub(json.dumps(line))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    root = logging.getLogger("ollama_exoscale")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
