"""The one reconciler that may call the provisioner: it compares demand with what exists.

Every worker runs a Reconciler, but only the lease holder acts. It decides on the sync loop's
tick (cheap, never blocking) and does the slow work — bring up, wait for the model, tear
down — in one background operation thread, non-daemon so that an interpreter exit waits for
it instead of abandoning a half-made server. Every write is fenced by the lease: a holder that
lost it stops writing, and the new holder resumes from the phase in the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from .config import Config
from .provisioner import Endpoint, Provisioner, ProvisionError
from .store import Store, StoreError, WorkerReport
from .upstream import Sessions, probe

log = logging.getLogger("ollama_exoscale.lifecycle")

HEALTH_EVERY = 15.0  # seconds between probes of a ready upstream
HEALTH_FAILURES = 3  # failed probes in a row before the upstream is re-examined
PROBE_EVERY = 1.0  # seconds between readiness probes while starting
DESTROY_GRACE_TICKS = 4  # ticks to wait after announcing `destroying`, for in-flight reports
COLD_STARTS_KEPT = 20
REPORTS_KEPT = 86400.0  # seconds a dead worker's report is kept (its last activity counts)


class LeaseLost(Exception):
    """Another worker holds the lease now; this one must stop acting."""


class Reconciler:
    def __init__(
        self,
        config: Config,
        provisioner: Provisioner,
        store: Store,
        sessions: Sessions,
        *,
        holder: str,
    ):
        self.config = config
        self.provisioner = provisioner
        self.store = store
        self.sessions = sessions
        self.holder = holder
        self.doc: dict[str, Any] | None = None  # the document as last written, while holder
        self.leader = ""  # who held the lease at the last look: this worker or another
        self._holding = False
        self._lease_renewed = 0.0
        self._operation: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_health = 0.0
        self._health_failures = 0
        self._detail_saved = 0.0
        self._doc_lock = threading.Lock()

    # -- the tick: decide, never block -------------------------------------------------------

    def tick(self, doc: dict[str, Any], reports: list[WorkerReport], now: float) -> None:
        if self._stop.is_set() or not self._lease(now) or self.busy:
            return
        if self.doc is None:
            # Just took the lease: start from the store's document, then check it against
            # what really exists. While holding, self.doc is the truth: only we write it.
            with self._doc_lock:
                self.doc = dict(doc)
            log.info("this worker now reconciles (%s)", self.holder)
            self._start(self._adopt, "adopt")
            return
        self._decide(reports, now)

    @property
    def busy(self) -> bool:
        return self._operation is not None and self._operation.is_alive()

    def _lease(self, now: float) -> bool:
        """Hold (or try to take) the lease; renew it well before it expires."""
        ttl = self.config.lease_ttl
        # abs(): a clock stepped back must not stop the renewals that keep the expiry near.
        since = abs(now - self._lease_renewed)
        if self._holding and since < ttl / 5:
            return True
        if not self._holding and since < min(1.0, ttl / 5):
            return False  # a non-holder tries about once a second
        held = self.store.acquire(self.holder, ttl)
        self._lease_renewed = now
        self.leader = self.holder if held else self._other_holder()
        if self._holding and not held:
            log.warning("this worker lost the lease; another reconciles now")
        if not held:
            self.doc = None
        self._holding = held
        return held

    def _other_holder(self) -> str:
        holder, expires_at = self.store.lease()
        return holder if expires_at > time.time() else ""

    def _decide(self, reports: list[WorkerReport], now: float) -> None:
        doc = self.doc or {}
        phase = doc.get("phase", "idle")
        live = [r for r in reports if now - r.heartbeat < 10.0]
        inflight = sum(r.inflight for r in live)
        last_activity = max((r.last_activity for r in reports), default=0.0)
        wanted_at = max((r.wanted_at for r in reports), default=0.0)

        if phase == "idle" and wanted_at > doc.get("demand_cutoff", 0.0):
            self._begin_provisioning(now)
        elif phase == "error" and now >= doc.get("retry_at", 0.0):
            if wanted_at > doc.get("phase_since", 0.0):  # demand since the failure
                self._begin_provisioning(now)
            elif doc.get("teardown_pending"):
                self._start(lambda: self._tear_down(None), "tear down (retry)")
        elif phase == "provisioning":
            self._start(self._bring_up, "bring up (resumed)")
        elif phase == "starting":
            self._start(self._await_ready, "await ready (resumed)")
        elif phase == "destroying":
            self._start(lambda: self._tear_down(None), "tear down (resumed)")
        elif phase == "ready":
            idle_since = max(last_activity, doc.get("ready_since", 0.0))
            if inflight == 0 and now - idle_since >= self.config.idle_timeout:
                self._start(lambda: self._tear_down(idle_since), "tear down (idle)")
            elif self._health_due(now, wanted_at):
                self._last_health = now
                self._start(self._check_health, "health")
        if now - doc.get("reports_pruned", 0.0) > 3600:
            self._prune(reports, now)

    def _health_due(self, now: float, wanted_at: float) -> bool:
        """Probe a ready upstream every HEALTH_EVERY; at once when a request found it failing
        (a worker's wish since the last probe), and each PROBE_EVERY after a failed probe."""
        every = PROBE_EVERY if self._health_failures else HEALTH_EVERY
        return now - self._last_health >= every or wanted_at > self._last_health

    def _begin_provisioning(self, now: float) -> None:
        self._commit(
            phase="provisioning",
            phase_since=now,
            provisioning_started_at=now,
            demand_cutoff=now,
            teardown_pending=False,
            detail="starting the GPU server",
            last_error=None,
            endpoint=None,
        )
        self._start(self._bring_up, "bring up")

    def _prune(self, reports: list[WorkerReport], now: float) -> None:
        for report in reports:
            if now - report.heartbeat > max(REPORTS_KEPT, 2 * self.config.idle_timeout):
                self.store.forget(report.worker)
        self._commit(reports_pruned=now)

    # -- operations: slow, in the background thread -----------------------------------------

    def _start(self, operation: Callable[[], None], name: str) -> None:
        def run() -> None:
            try:
                operation()
            except LeaseLost:
                log.warning("operation %r stopped: the lease moved to another worker", name)
            except StoreError as exc:
                log.error("operation %r stopped: %s", name, exc)
            except Exception:  # the loop must survive any provisioner bug
                log.exception("operation %r failed unexpectedly", name)

        self._operation = threading.Thread(target=run, name=f"lifecycle-{name}", daemon=False)
        self._operation.start()

    def _adopt(self) -> None:
        """On taking the lease: make the document agree with what exists."""
        doc = self.doc or {}
        phase = doc.get("phase", "idle")
        if phase in ("provisioning", "starting", "destroying"):
            return  # the next tick resumes the interrupted operation
        try:
            endpoint = self.provisioner.observe()
        except ProvisionError as exc:
            log.error("could not observe what exists: %s", exc)
            return
        if endpoint is not None and phase in ("idle", "error", "ready"):
            if phase != "ready" or doc.get("endpoint") != asdict(endpoint):
                log.info("adopting the GPU server that exists at %s", endpoint.url)
                self._commit(
                    phase="starting",
                    phase_since=time.time(),
                    endpoint=asdict(endpoint),
                    provisioning_started_at=0.0,
                    detail="found an existing GPU server; checking its model",
                )
                self._await_ready()
        elif endpoint is None and phase == "ready":
            log.warning("the GPU server in the state store no longer exists")
            self._commit(phase="idle", phase_since=time.time(), endpoint=None, detail="")

    def _bring_up(self) -> None:
        try:
            endpoint = self.provisioner.bring_up(self._progress)
        except ProvisionError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # a bug or an unexpected library error: show its kind only
            log.exception("bring up failed unexpectedly")
            self._fail(f"provisioning failed unexpectedly ({type(exc).__name__}); see the logs")
            return
        self._commit(
            phase="starting",
            phase_since=time.time(),
            endpoint=asdict(endpoint),
            detail="the GPU server exists; waiting for Ollama and the model",
        )
        self._await_ready()

    def _await_ready(self) -> None:
        doc = self.doc or {}
        endpoint = Endpoint(**doc["endpoint"])
        deadline = doc.get("phase_since", time.time()) + self.config.start_timeout
        while not self._stop.is_set():
            result = probe(self.sessions, endpoint, self.config.models)
            if result.ready:
                self._become_ready(result.version)
                return
            self._progress(result.reason)
            if time.time() > deadline:
                self._fail(
                    f"the GPU server did not become ready in {self.config.start_timeout:g} s: "
                    f"{result.reason}"
                )
                return
            self._stop.wait(PROBE_EVERY)

    def _become_ready(self, version: str | None) -> None:
        now = time.time()
        doc = self.doc or {}
        cold_starts = list(doc.get("cold_starts", []))
        started = doc.get("provisioning_started_at") or 0.0
        if started:
            cold_starts = (cold_starts + [round(now - started, 3)])[-COLD_STARTS_KEPT:]
            log.info("ready after a cold start of %.1f s", now - started)
        self._commit(
            phase="ready",
            phase_since=now,
            ready_since=now,
            detail="ready",
            failures=0,
            last_error=None,
            cold_starts=cold_starts,
            upstream_version=version,
        )
        self._last_health = now
        self._health_failures = 0

    def _check_health(self) -> None:
        endpoint = Endpoint(**(self.doc or {})["endpoint"])
        if probe(self.sessions, endpoint, self.config.models).ready:
            self._health_failures = 0
            return
        self._health_failures += 1
        if self._health_failures < HEALTH_FAILURES:
            return
        self._health_failures = 0
        found = self.provisioner.observe()
        log.warning("the ready upstream stopped answering; it %s", "exists" if found else "is gone")
        if found is None:
            self._commit(phase="idle", phase_since=time.time(), endpoint=None, detail="")
        else:
            self._commit(phase="starting", phase_since=time.time(), endpoint=asdict(found))
            self._await_ready()

    def _tear_down(self, idle_since: float | None) -> None:
        if idle_since is not None:
            now = time.time()
            self._commit(phase="destroying", phase_since=now, demand_cutoff=now,
                         detail="idle: removing the GPU server")
            # Workers may have admitted requests on a snapshot that still said `ready`:
            # give their reports time to arrive, then look again before removing anything.
            self._stop.wait(DESTROY_GRACE_TICKS * self.config.tick + 0.5)
            if self._activity_since(idle_since):
                log.info("demand arrived while about to remove the GPU server; keeping it")
                self._commit(phase="ready", phase_since=time.time(), detail="ready")
                return
            log.info("removing the GPU server: idle for %.0f s", time.time() - idle_since)
        try:
            self.provisioner.tear_down(self._progress)
        except ProvisionError as exc:
            self._fail(f"removing the GPU server failed: {exc}", teardown=True)
            return
        self._commit(
            phase="idle", phase_since=time.time(), endpoint=None, detail="", teardown_pending=False
        )

    def _activity_since(self, idle_since: float) -> bool:
        now = time.time()
        reports = self.store.reports()
        live = [r for r in reports if now - r.heartbeat < 10.0]
        last_activity = max((r.last_activity for r in reports), default=0.0)
        return sum(r.inflight for r in live) > 0 or last_activity > idle_since

    def _fail(self, reason: str, teardown: bool = False) -> None:
        """Phase error with back-off; a failed tear-down keeps its endpoint and is retried."""
        doc = self.doc or {}
        failures = doc.get("failures", 0) + 1
        backoff = min(self.config.retry_base * 2 ** (failures - 1), self.config.retry_max)
        now = time.time()
        log.error("provisioning failed (attempt %d, next try in %.0f s): %s", failures, backoff,
                  reason)
        changes: dict[str, Any] = dict(
            phase="error", phase_since=now, last_error=reason, failures=failures,
            retry_at=now + backoff, detail=reason, teardown_pending=teardown,
        )
        if not teardown:
            changes["endpoint"] = None
        self._commit(**changes)

    def _progress(self, sentence: str) -> None:
        """Provisioner progress → the document's detail, saved at most once a second."""
        log.info("progress: %s", sentence)
        now = time.time()
        with self._doc_lock:
            if self.doc is not None:
                self.doc["detail"] = sentence
        if now - self._detail_saved >= 1.0:
            self._detail_saved = now
            self._commit(detail=sentence)

    def _commit(self, **changes: Any) -> None:
        with self._doc_lock:
            doc = dict(self.doc or {})
            doc.update(changes)
            if "phase" in changes and changes["phase"] != (self.doc or {}).get("phase"):
                log.info("phase %s → %s", (self.doc or {}).get("phase", "idle"), changes["phase"])
            if not self.store.save(doc, self.holder):
                self._holding = False
                self.doc = None
                raise LeaseLost()
            self.doc = doc

    def close(self, timeout: float) -> None:
        self._stop.set()
        if self._operation is not None and self._operation.is_alive():
            self._operation.join(timeout)
        if self._holding:
            try:
                self.store.release(self.holder)
            except StoreError:
                pass
            self._holding = False
