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
from datetime import datetime
from typing import Any

from proxy.config import Config
from proxy.lifecycle import gputime, schedule
from proxy.lifecycle.baking import Baking
from proxy.lifecycle.decide import (
    AckDown,
    Action,
    Bake,
    CheckHealth,
    Clock,
    Demand,
    DropBake,
    Memory,
    Provision,
    ResumeAwaitReady,
    ResumeBake,
    ResumeBringUp,
    ResumeRemoval,
    Retire,
    RetryTearDown,
    SetAside,
    TearDownIdle,
    Wait,
    decide,
)
from proxy.lifecycle.fleet import FleetMemory
from proxy.lifecycle.operations import LeaseLost
from proxy.lifecycle.scaling import Scaling
from proxy.lifecycle.state import Phase, State
from proxy.provision.base import Provisioner
from proxy.store.base import Store, StoreError, WorkerReport
from proxy.upstream.session import Sessions

log = logging.getLogger("ollama_exoscale.lifecycle")

HEALTH_FAILURES = 3  # failed probes in a row before the upstream is re-examined
DESTROY_GRACE_TICKS = 4  # ticks to wait after announcing `destroying`, for in-flight reports
COLD_STARTS_KEPT = 20
# A cold start's stages, each ending at its mark: the stack update, the boot until Ollama
# answers, the model pull until /api/tags lists every model, the model load into GPU memory.
STAGES = (("stack_update", "server"), ("boot", "answers"), ("model_pull", "listed"),
          ("model_load", "loaded"))
STEPS_KEPT = 40  # progress sentences of the current operation kept in the document
REPORTS_KEPT = 86400.0  # seconds a dead worker's report is kept (its last activity counts)


class Reconciler(Scaling, Baking):
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
        self.state: State | None = None  # the document as last written, while holder
        self.leader = ""  # who held the lease at the last look: this worker or another
        self._holding = False
        self._lease_renewed = 0.0
        self._operation: threading.Thread | None = None
        self._stop = threading.Event()
        # Changed by decide() on the tick and by operations, never both at once: no decision
        # is taken while an operation runs.
        self._memory = Memory()
        self._wanted_seen = 0.0  # the latest demand in the reports, as of the last decision
        self._detail_saved = 0.0
        # Reentrant: a fleet server's change reads and commits the document under it.
        self._state_lock = threading.RLock()
        self._adopted = False  # the take-over's adopt has run: the fleet may step
        self._fleet_memory = FleetMemory()
        self._server_ops: dict[str, threading.Thread] = {}
        self._server_health: dict[str, tuple[float, int]] = {}
        self._fleet_retry_at = 0.0
        self._fleet_wish = 0.0

    # -- the tick: decide, never block -------------------------------------------------------

    def tick(self, doc: dict[str, Any], reports: list[WorkerReport], now: float) -> None:
        if self._stop.is_set() or not self._lease(now):
            return
        if self._adopted and self.state is not None:
            self._step_fleet(reports, now)  # the fleet's servers do not wait for the primary's
        if self.busy:
            return
        if self.state is None:
            # Just took the lease: start from the store's document, then check it against
            # what really exists. While holding, self.state is the truth: only we write it.
            with self._state_lock:
                self.state = State.from_doc(doc)
            log.info("this worker now reconciles (%s)", self.holder)
            self._adopted = False
            self._start(self._take_over, "adopt")
            return
        self._decide(reports, now)

    def _take_over(self) -> None:
        try:
            self._adopt_fleet()
            self._adopt()
        finally:  # the fleet steps from the next tick, whatever the adopt found
            self._adopted = True

    def _step_fleet(self, reports: list[WorkerReport], now: float) -> None:
        state, demand = self._current, Demand.of(reports, now)
        local = datetime.fromtimestamp(now, self.config.tz)
        warm = schedule.is_warm(self.config.warm_windows, local) and now >= state.warm_off_until
        stop_all = ""
        if demand.down_at > state.down_handled:
            stop_all = "an operator asked for it (ollama-exoscale down)"
        elif gputime.over_budget(state.gpu_record, now, self.config.tz,
                                 self.config.daily_gpu_hours):
            stop_all = f"the daily GPU budget of {self.config.daily_gpu_hours:g} h is used up"
        self._scale(demand, now, warm=warm, stop_all=stop_all)

    @property
    def reconciling(self) -> bool:
        """Whether this worker holds the lease and acts (it has read the shared state)."""
        return self.state is not None

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
            self.state = None
        self._holding = held
        return held

    def _other_holder(self) -> str:
        holder, expires_at = self.store.lease()
        return holder if expires_at > time.time() else ""

    def _decide(self, reports: list[WorkerReport], now: float) -> None:
        state = self._current
        demand = Demand.of(reports, now)
        self._wanted_seen = demand.wanted_at
        action, self._memory = decide(state, demand, Clock(now, time.monotonic()), self.config,
                                      self._memory)
        self._act(action, now)
        if now - state.reports_pruned > 3600:
            self._prune(reports, now)

    def _act(self, action: Action, now: float) -> None:
        """Run the chosen action: a commit on the tick, or an operation in its thread."""
        local = datetime.fromtimestamp(now, self.config.tz)
        match action:
            case Wait():
                pass
            case SetAside(wanted_at):
                self._commit(demand_cutoff=wanted_at)
            case Provision():
                self._begin_provisioning(now)
            case AckDown(down_at):
                self._commit(down_handled=down_at, **self._warm_off(local))
            case RetryTearDown():
                self._start(self._remove, "tear down (retry)")
            case ResumeBringUp():
                self._start(self._bring_up, "bring up (resumed)")
            case ResumeAwaitReady():
                self._start(self._await_ready, "await ready (resumed)")
            case ResumeRemoval(deadline):
                self._start(lambda: self._drain(deadline) and self._remove(),
                            "tear down (resumed)")
            case Retire(reason, down_at, stop):
                self._start(lambda: self._retire(reason, down_at, local, stop), "retire")
            case TearDownIdle(idle_since, idle_for):
                self._start(lambda: self._tear_down_idle(idle_since, idle_for),
                            "tear down (idle)")
            case CheckHealth():
                self._start(self._check_health, "health")
            case Bake(bake_at, models):
                self._start(lambda: self._bake(bake_at, models), "bake")
            case ResumeBake():
                self._start(self._bake_resumed, "bake (resumed)")
            case DropBake(bake_at, reason):
                self._commit(bake_handled=bake_at, bake_error=reason)

    def _begin_provisioning(self, now: float) -> None:
        self._commit(
            phase=Phase.PROVISIONING,
            phase_since=now,
            provisioning_started_at=now,
            instance_since=now,  # billing may start with the request
            marks={"requested": now},
            server_stages={},
            server_spans={},
            cold_mode=self.provisioner.cold_start_mode(
                self._current.instance_status == "stopped"),
            demand_cutoff=self._cutoff(now),
            teardown_pending=False,
            **self._detail(Phase.PROVISIONING, "starting the GPU server", now),
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

    def halt(self) -> None:
        """Act no more, keeping the lease (it lapses by its time to live)."""
        self._stop.set()

    def close(self, timeout: float) -> None:
        self._stop.set()
        if self._operation is not None and self._operation.is_alive():
            self._operation.join(timeout)
        self._join_fleet(timeout)
        if self._holding:
            try:
                self.store.release(self.holder)
            except StoreError:
                pass
            self._holding = False
