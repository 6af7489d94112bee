"""The lifecycle as one worker sees it: the phase, demand accounting, and the sync loop.

Phases: idle → provisioning → starting → ready → destroying → idle, plus error.

Requests never touch the store: they read an in-memory snapshot and count demand in memory,
on the worker's event loop. One background thread per worker flushes this worker's demand
report to the store and reads the shared state back every `tick` seconds (and at once when a
request wakes it). The same loop drives the Reconciler, which acts only while this worker
holds the lease.

Demand is stamped with the wall clock (workers and hosts share it), and never earlier than the
latest stamp every worker knows (`after`): a clock stepped back must not make new demand look
older than old demand.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

from proxy.config import Config
from proxy.lifecycle.estimates import Estimates
from proxy.lifecycle.reconciler import Reconciler
from proxy.lifecycle.routing import Router
from proxy.lifecycle.snapshot import Snapshot
from proxy.lifecycle.state import Phase, State
from proxy.provision.base import PRIMARY, Endpoint, Provisioner
from proxy.store.base import Store, StoreError, WorkerReport
from proxy.upstream.session import Sessions

log = logging.getLogger("ollama_exoscale.lifecycle")

PHASES = tuple(phase.value for phase in Phase)
HEARTBEAT = 1.0


def after(now: float, *known: float) -> float:
    """`now`, or just after the latest of `known` when the clock reads earlier than that (it
    was stepped back): a new demand, activity or `down` always compares as newer than what
    every worker had recorded before it, so a clock stepped back an hour hides none of them."""
    latest = max(known)
    return now if now > latest else latest + 0.001


@dataclass
class Ticket:
    """One request passing through to the upstream; `demand` ones move the idle clock."""

    endpoint: Endpoint
    demand: bool
    server: str = PRIMARY  # which of the fleet's servers it goes to
    done: bool = field(default=False)


class Lifecycle(Estimates):
    """One per worker. Thread-safe; the event loop calls admit/finish/want, which touch only
    memory (a lock held for a few assignments)."""

    def __init__(
        self,
        config: Config,
        provisioner: Provisioner,
        store: Store,
        sessions: Sessions,
        *,
        start: bool = True,
    ):
        self.config = config
        self.provisioner = provisioner
        self.store = store
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.reconciler = Reconciler(config, provisioner, store, sessions, holder=self.worker)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._inflight = 0
        self._last_activity = 0.0
        self._wanted_at = 0.0
        self._down_at = 0.0
        self._up_at = 0.0
        self._bake_at = 0.0
        self._bake_models = False
        self._held = 0
        self.router = Router()
        self._reported: WorkerReport | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._snapshot = Snapshot()
        self._reports: list[WorkerReport] = []  # as of the last sync, for refresh()
        self._refresh_lock = threading.Lock()
        self._refreshed_at = 0.0  # monotonic time the last refresh() read began
        self._changes = store.change_counter()
        self._seen = -1  # the counter's value just before this worker's last store read
        self.store_error: str | None = None
        self._sync()
        self._thread = threading.Thread(target=self._loop, name="lifecycle-sync", daemon=True)
        if start:
            self._thread.start()

    # -- request side: memory only ---------------------------------------------------------

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def admit(self, demand: bool = True) -> Ticket | None:
        """A ticket to forward if the upstream is ready; None (and a wake-up wish) if not."""
        snapshot = self._snapshot
        server = self.router.choose(snapshot, self._reported.inflight_by if self._reported
                                    else {}) if snapshot.serving else None
        if server is not None:
            with self._lock:
                self._inflight += 1
                first = self._inflight == 1
            if first:  # report it soon: the reconciler may be about to call the server idle
                self._wake.set()
            return Ticket(snapshot.endpoint(server), demand, server)
        if demand:
            self.want()
        return None

    def refresh_needed(self) -> bool:
        """Whether refresh() might find the server ready, from memory alone (for the event
        loop): another worker may have shown a ready snapshot this one has not read yet.

        With the host's change counter (SQLite): only when it moved since this worker's last
        store read, so a burst of 503s while provisioning reads nothing. Without one (S3: the
        workers of other hosts cannot move it), always: each refusal waits for a store read,
        shared by the refusals that asked meanwhile. A rate limit on that read would leave a
        window in which a client told "ready" by one host is refused by another.
        """
        return self._changes is None or self._changes.read() != self._seen

    def refresh(self) -> bool:
        """Read the shared state now, not as of the last tick; True when it says ready.

        Called before a demand request is refused: another worker may already have seen the
        server ready (and told a client so in /status) while this one's snapshot is a tick old.
        Concurrent callers share one read that began after they asked. It blocks on the store.
        """
        asked = time.monotonic()
        with self._refresh_lock:
            if self._refreshed_at < asked:  # no read began since this caller asked: read now
                self._refreshed_at = time.monotonic()
                mark = self._mark()
                try:
                    state = State.from_doc(self.store.load())
                except StoreError:
                    return False  # the sync loop reports the store's trouble
                self._seen = mark
                if state.phase == Phase.READY:  # only then can this request be served
                    self._publish(Snapshot.build(state, self._reports, time.time(),
                                                 reconciler=self._snapshot.reconciler))
        return self._snapshot.serving

    def _mark(self) -> int:
        """The change counter's value, noted just before a store read."""
        return self._changes.read() if self._changes is not None else 0

    def _publish(self, snapshot: Snapshot) -> None:
        if snapshot.serving and self._changes is not None:
            self._changes.bump()  # before any client can see it (refresh_needed)
        with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()

    def finish(self, ticket: Ticket) -> None:
        """The request or stream has ended (idempotent)."""
        with self._lock:
            if ticket.done:
                return
            ticket.done = True
            self._inflight -= 1
            self.router.done(ticket.server)
            if ticket.demand:
                self._last_activity = self._activity_stamp(time.time())

    def broke(self, ticket: Ticket) -> None:
        """The ticket's server broke its request (502/504, a stream cut): passed over by this
        worker a while, and probed now."""
        self.router.broke(ticket.server)
        self.want()

    def want(self) -> None:
        """Demand while not ready: ask the reconciler to bring the server up."""
        now, known = time.time(), self._snapshot
        with self._lock:
            self._wanted_at = after(now, self._wanted_at, known.demand.wanted_at,
                                    known.state.demand_cutoff)
            self._last_activity = self._activity_stamp(now)
        if not self._wake.is_set():  # a burst of 503s wakes the loop once, not per request
            self._wake.set()

    def _activity_stamp(self, now: float) -> float:
        """When this activity happened, as the idle clock must see it: after the last activity
        and the server's ready time that every worker knows (the idle time counts from both)."""
        known = self._snapshot
        return after(now, self._last_activity, known.demand.last_activity,
                     known.state.ready_since)

    def one_more(self) -> None:
        """An operator asks for one more GPU server while one is ready (a fleet)."""
        with self._lock:
            self._up_at = after(time.time(), self._up_at, self._snapshot.state.up_handled)
        self._wake.set()

    def down(self) -> None:
        """An operator asks to remove the GPU server now (after its streams end)."""
        with self._lock:
            self._down_at = after(time.time(), self._down_at, self._snapshot.state.down_handled)
        self._wake.set()

    @property
    def can_bake(self) -> bool:
        return self.provisioner.can_bake

    def bake(self, models: bool) -> float:
        """An operator asks for a template of the GPU server (bringing one up if none); the
        lease holder bakes on its next tick. Returns when the request was stamped."""
        known = self._snapshot
        with self._lock:
            self._bake_at = after(time.time(), self._bake_at, known.demand.bake_at,
                                  known.state.bake_handled)
            self._bake_models = models
            stamped = self._bake_at
        self._wake.set()
        return stamped

    def hold(self, seconds: float) -> Snapshot:
        """Wait up to `seconds` for ready (or error); False-y slot means the hold cap is full."""
        deadline = time.monotonic() + seconds
        with self._changed:
            while True:
                snapshot = self._snapshot
                left = deadline - time.monotonic()
                if snapshot.state.phase in ("ready", "error") or left <= 0 or self._stop.is_set():
                    return snapshot
                self._changed.wait(min(left, 1.0))

    @property
    def closing(self) -> bool:
        """The worker is shutting down: holds end now."""
        return self._stop.is_set()

    def try_hold_slot(self) -> bool:
        with self._lock:
            if self._held >= self.config.max_held:
                return False
            self._held += 1
            return True

    def release_hold_slot(self) -> None:
        with self._lock:
            self._held -= 1

    # -- background: the sync loop ----------------------------------------------------------

    def _loop(self) -> None:
        synced = 0.0
        while not self._stop.is_set():
            self._wake.wait(self.config.tick)
            # However many requests wake the loop, the store sees one round per half tick:
            # a burst of demand is flushed as one batch.
            self._stop.wait(synced + self.config.tick / 2 - time.monotonic())
            self._wake.clear()
            if self._stop.is_set():
                break
            synced = time.monotonic()
            self._sync()

    def _sync(self) -> None:
        """Flush this worker's demand, read the shared state back, let the reconciler act."""
        now = time.time()
        mark = self._mark()
        try:
            self._flush(now)
            doc = self.store.load()
            reports = self.store.reports()
            self.reconciler.tick(doc, reports, now)
            self.store_error = None
        except StoreError as exc:
            # Keep answering with what we know; never act on a state we could not read.
            if self.store_error != str(exc):
                log.error("state store unavailable: %s", exc)
            self.store_error = str(exc)
            return
        self._reports = reports
        self._publish(Snapshot.build(
            self.reconciler.state or State.from_doc(doc), reports, now,
            reconciler=self.reconciler.leader,
        ))
        self._seen = mark

    def _flush(self, now: float) -> None:
        with self._lock:
            report = WorkerReport(
                self.worker, self._inflight, self._last_activity, self._wanted_at, now,
                self._down_at, self._bake_at, self._bake_models, self.router.counts(),
                self._up_at,
            )
        last = self._reported
        unchanged = last is not None and replace(last, heartbeat=now) == report
        if unchanged and abs(now - last.heartbeat) < HEARTBEAT:  # a clock stepped back too
            return
        self.store.report(report)
        self._reported = report

    def halt(self) -> None:
        """Stop syncing and reconciling at once, handing nothing over: what a killed worker
        leaves behind (its lease lapses by its time to live)."""
        self._stop.set()
        self._wake.set()
        self.reconciler.halt()

    def close(self, timeout: float = 30.0) -> None:
        """Stop syncing, let a running operation finish (up to `timeout`), give the lease up."""
        self._stop.set()
        self._wake.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            self._flush(time.time())
        except StoreError:
            pass
        self.reconciler.close(timeout)

