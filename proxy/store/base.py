"""The coordination store every worker (and every proxy host) shares.

It holds three things:
- the lifecycle document (phase, endpoint, errors, cold starts), written only by the lease holder;
- one demand report per worker (in-flight count, last activity, last wake-up wish, heartbeat),
  each written only by its own worker, so workers never contend with each other;
- the lease that elects the one reconciler allowed to call the provisioner.

SQLite in the state dir is the embedded default: WAL mode makes it safe across processes on
one host. The file is created with mode 0600 because the document holds the upstream token.
Several hosts share an S3 bucket instead (proxy/store/s3.py), chosen by PROXY_STATE_URL.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from proxy.config import ConfigError


@dataclass(frozen=True)
class WorkerReport:
    worker: str
    inflight: int = 0
    last_activity: float = 0.0  # end of this worker's last demand request (unix time)
    wanted_at: float = 0.0  # last time this worker saw demand while not ready
    heartbeat: float = 0.0
    down_at: float = 0.0  # last time an operator asked this worker to remove the GPU server


class StoreError(Exception):
    """The store could not be read or written."""


class Store(Protocol):
    def load(self) -> dict[str, Any]:
        """The lifecycle document ({} before the first save)."""

    def save(self, doc: dict[str, Any], holder: str) -> bool:
        """Write the document if `holder` still holds the lease; False if it does not."""

    def report(self, report: WorkerReport) -> None:
        """Write this worker's demand report."""

    def reports(self) -> list[WorkerReport]:
        """Every worker's last report."""

    def forget(self, worker: str) -> None:
        """Drop a worker's report (it exited cleanly)."""

    def acquire(self, holder: str, ttl: float) -> bool:
        """Take or renew the lease for `ttl` seconds; True if `holder` holds it now."""

    def release(self, holder: str) -> None:
        """Give the lease up if `holder` holds it."""

    def lease(self) -> tuple[str, float]:
        """(holder, expires_at); ("", 0) when nobody ever held it."""

    def close(self) -> None: ...


class SqliteStore:
    """The Store on one SQLite file; one connection per instance, guarded by a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Created private before SQLite opens it: the document holds the upstream token.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(self.path), timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._set_wal()
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS lifecycle (id INTEGER PRIMARY KEY CHECK (id = 1),
                doc TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS workers (worker TEXT PRIMARY KEY, inflight INTEGER,
                last_activity REAL, wanted_at REAL, heartbeat REAL, down_at REAL DEFAULT 0);
            CREATE TABLE IF NOT EXISTS lease (id INTEGER PRIMARY KEY CHECK (id = 1),
                holder TEXT NOT NULL, expires_at REAL NOT NULL);
            """
        )
        self._add_column("workers", "down_at REAL DEFAULT 0")

    def _add_column(self, table: str, column: str) -> None:
        """Bring a store made by an older version up to date (any worker may be first)."""
        names = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
        if column.split()[0] in names:
            return
        try:
            self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise StoreError(f"state store {self.path}: {exc}") from exc

    def _set_wal(self) -> None:
        """WAL mode (kept in the file); workers opening at once may find it busy: retry."""
        deadline = time.monotonic() + 10
        while True:
            try:
                if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise StoreError(f"state store {self.path}: {exc}") from exc
                time.sleep(0.05)

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from exc

    def load(self) -> dict[str, Any]:
        rows = self._run("SELECT doc FROM lifecycle WHERE id = 1")
        return json.loads(rows[0][0]) if rows else {}

    def save(self, doc: dict[str, Any], holder: str) -> bool:
        text = json.dumps(doc, separators=(",", ":"))
        try:
            with self._lock:
                # One transaction: the lease check and the write cannot be split by a take-over.
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    row = self._db.execute(
                        "SELECT holder, expires_at FROM lease WHERE id = 1"
                    ).fetchone()
                    if not row or row[0] != holder or row[1] < time.time():
                        self._db.execute("ROLLBACK")
                        return False
                    self._db.execute(
                        "INSERT INTO lifecycle (id, doc) VALUES (1, ?) "
                        "ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                        (text,),
                    )
                    self._db.execute("COMMIT")
                    return True
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.path}: {exc}") from exc

    def report(self, report: WorkerReport) -> None:
        self._run(
            "INSERT INTO workers (worker, inflight, last_activity, wanted_at, heartbeat, down_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(worker) DO UPDATE SET "
            "inflight = excluded.inflight, last_activity = excluded.last_activity, "
            "wanted_at = excluded.wanted_at, heartbeat = excluded.heartbeat, "
            "down_at = excluded.down_at",
            tuple(asdict(report).values()),
        )

    def reports(self) -> list[WorkerReport]:
        rows = self._run(
            "SELECT worker, inflight, last_activity, wanted_at, heartbeat, down_at FROM workers"
        )
        return [WorkerReport(*row[:5], down_at=row[5] or 0.0) for row in rows]

    def forget(self, worker: str) -> None:
        self._run("DELETE FROM workers WHERE worker = ?", (worker,))

    def acquire(self, holder: str, ttl: float) -> bool:
        now = time.time()
        self._run(
            "INSERT INTO lease (id, holder, expires_at) VALUES (1, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET holder = excluded.holder, "
            "expires_at = excluded.expires_at WHERE lease.holder = ? OR lease.expires_at < ?",
            (holder, now + ttl, holder, now),
        )
        return self.lease()[0] == holder

    def release(self, holder: str) -> None:
        self._run("UPDATE lease SET expires_at = 0 WHERE id = 1 AND holder = ?", (holder,))

    def lease(self) -> tuple[str, float]:
        rows = self._run("SELECT holder, expires_at FROM lease WHERE id = 1")
        return (rows[0][0], rows[0][1]) if rows else ("", 0.0)

    def close(self) -> None:
        with self._lock:
            self._db.close()


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
