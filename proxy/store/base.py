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

from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.store.changes import ChangeCounter


@dataclass(frozen=True)
class WorkerReport:
    worker: str
    inflight: int = 0
    last_activity: float = 0.0  # end of this worker's last demand request (unix time)
    wanted_at: float = 0.0  # last time this worker saw demand while not ready
    heartbeat: float = 0.0
    down_at: float = 0.0  # last time an operator asked this worker to remove the GPU server
    # The last operator's `bake` (POST /admin/bake) on this worker: when, and whether the
    # models go in the template.
    bake_at: float = 0.0
    bake_models: bool = False
    # Of `inflight`, how many each fleet server has (by name).
    inflight_by: dict[str, int] = field(default_factory=dict, hash=False)
    up_at: float = 0.0  # the last operator's `up` while a server was ready: one more server


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

    def change_counter(self) -> ChangeCounter | None:
        """The counter every worker of this host bumps before it shows a ready snapshot
        (proxy/store/changes.py); None when workers elsewhere write the store too."""

    def close(self) -> None: ...
