"""The store on one host: SQLite in the state dir.

WAL mode makes it safe across the processes of one host; the file is created with mode 0600
because the document holds the upstream token.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from proxy.store.base import StoreError, WorkerReport
from proxy.store.changes import ChangeCounter


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
        self._add_column("workers", "bake_at REAL DEFAULT 0")
        self._add_column("workers", "bake_models INTEGER DEFAULT 0")
        self._add_column("workers", "inflight_by TEXT DEFAULT '{}'")
        self._add_column("workers", "up_at REAL DEFAULT 0")

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
            "INSERT INTO workers (worker, inflight, last_activity, wanted_at, heartbeat, down_at, "
            "bake_at, bake_models, inflight_by, up_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(worker) DO UPDATE "
            "SET inflight = excluded.inflight, last_activity = excluded.last_activity, "
            "wanted_at = excluded.wanted_at, heartbeat = excluded.heartbeat, "
            "down_at = excluded.down_at, bake_at = excluded.bake_at, "
            "bake_models = excluded.bake_models, inflight_by = excluded.inflight_by, "
            "up_at = excluded.up_at",
            (*tuple(asdict(report).values())[:-2], json.dumps(report.inflight_by),
             report.up_at),
        )

    def reports(self) -> list[WorkerReport]:
        rows = self._run(
            "SELECT worker, inflight, last_activity, wanted_at, heartbeat, down_at, bake_at, "
            "bake_models, inflight_by, up_at FROM workers"
        )
        return [WorkerReport(*row[:5], down_at=row[5] or 0.0, bake_at=row[6] or 0.0,
                             bake_models=bool(row[7]), inflight_by=_counts(row[8]),
                             up_at=row[9] or 0.0)
                for row in rows]

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

    def change_counter(self) -> ChangeCounter:
        return ChangeCounter(self.path.with_name(self.path.name + ".changes"))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _counts(text: str | None) -> dict[str, int]:
    """A report's in-flight count by server (a store of an older version has none)."""
    try:
        counts = json.loads(text or "{}")
        return {str(k): int(v) for k, v in counts.items()}
    except (ValueError, TypeError, AttributeError):
        return {}
