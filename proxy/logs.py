"""Logging: one line per event that matters, to stderr, never with a secret in it."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger("ollama_exoscale")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
