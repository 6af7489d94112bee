"""The shared state: `open_store(PROXY_STATE_URL)` gives the one store every worker (and
every proxy host) uses; the contract is proxy/store/base.py."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from proxy.config import ConfigError
from proxy.store.base import Store
from proxy.store.sqlite import SqliteStore


def open_store(
    state_url: str, state_dir: Path, env: Mapping[str, str] | None = None
) -> Store:
    """The store `PROXY_STATE_URL` names; SQLite in the state dir when it is empty.

    An S3 store is checked on opening (credentials from `env`, default os.environ): a bad URL,
    missing credentials or an unreachable bucket raise ConfigError, one line for a person.
    """
    if not state_url:
        return SqliteStore(Path(state_dir) / "state.db")
    parts = urlsplit(state_url)
    if parts.scheme == "sqlite":
        return SqliteStore(Path(parts.netloc + parts.path))
    if parts.scheme == "s3":
        from proxy.store.s3 import open_s3_store  # requests and XML only for those who use S3

        return open_s3_store(state_url, os.environ if env is None else env)
    raise ConfigError(
        f"PROXY_STATE_URL={state_url!r} is not a store URL; use sqlite:///path/state.db or "
        "s3://bucket/prefix?endpoint=https://sos-at-vie-2.exo.io"
    )
