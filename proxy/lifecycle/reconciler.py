"""The one reconciler that may call the provisioner: it compares demand with what exists.

Every worker runs a Reconciler, but only the lease holder acts. It decides on the sync loop's
tick (cheap, never blocking) and does the slow work — bring up, wait for the model, tear
down — in one background operation thread, non-daemon so that an interpreter exit waits for
it instead of abandoning a half-made server. Every write is fenced by the lease: a holder that
lost it stops writing, and the new holder resumes from the phase in the store.
"""

from __future__ import annotations

import logging
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from proxy.config import Config
from proxy.lifecycle import gputime, schedule
from proxy.lifecycle.decide import (
    PROBE_EVERY,
    AckDown,
    Action,
    CheckHealth,
    Clock,
    Demand,
    Memory,
    Provision,
    ResumeAwaitReady,
    ResumeBringUp,
    ResumeRemoval,
    Retire,
    RetryTearDown,
    SetAside,
    TearDownIdle,
    Wait,
    decide,
    live_inflight,
    probed,
)
from proxy.lifecycle.state import Phase, State
from proxy.provision.base import Endpoint, Provisioner, ProvisionError
from proxy.store.base import Store, StoreError, WorkerReport
from proxy.upstream.probe import load_model, probe, server_progress
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
        self._state_lock = threading.Lock()

    # -- the tick: decide, never block -------------------------------------------------------

    def tick(self, doc: dict[str, Any], reports: list[WorkerReport], now: float) -> None:
        if self._stop.is_set() or not self._lease(now) or self.busy:
            return
        if self.state is None:
            # Just took the lease: start from the store's document, then check it against
            # what really exists. While holding, self.state is the truth: only we write it.
            with self._state_lock:
                self.state = State.from_doc(doc)
            log.info("this worker now reconciles (%s)", self.holder)
            self._start(self._adopt, "adopt")
            return
        self._decide(reports, now)

    @property
    def _current(self) -> State:
        """The document as this worker last wrote it (an empty one before it holds the lease)."""
        return self.state or State()

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

    def _cutoff(self, now: float) -> float:
        """The time up to which demand counts as answered: now, or the latest demand seen when
        the clock has been stepped back behind it (else that old demand would start a server
        again the moment this one is gone)."""
        return max(now, self._wanted_seen)

    def _warm_off(self, local: datetime) -> dict[str, Any]:
        """After an operator's `down` inside a warm window, that window no longer warms."""
        end = schedule.current_end(self.config.warm_windows, local)
        return {"warm_off_until": end.timestamp()} if end else {}

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

    def _adopt(self) -> None:
        """On taking the lease: make the document agree with what exists."""
        state = self._current
        phase = state.phase
        if phase in (Phase.PROVISIONING, Phase.STARTING, Phase.DESTROYING):
            return  # the next tick resumes the interrupted operation
        try:
            endpoint = self.provisioner.observe()
        except ProvisionError as exc:
            log.error("could not observe what exists: %s", exc)
            return
        if endpoint is not None and endpoint.instance_status == "stopped":
            if phase != Phase.IDLE or state.instance_status != "stopped":
                log.info("the GPU server exists, stopped")
                self._gone(instance_status="stopped")
        elif endpoint is not None and phase in (Phase.IDLE, Phase.ERROR, Phase.READY):
            if phase != Phase.READY or state.endpoint != endpoint:
                log.info("adopting the GPU server that exists at %s", endpoint.url)
                self._commit(
                    phase=Phase.STARTING,
                    phase_since=time.time(),
                    endpoint=endpoint,
                    provisioning_started_at=0.0,
                    instance_since=state.instance_since or time.time(),
                    detail="found an existing GPU server; checking its model",
                )
                self._await_ready()
        elif endpoint is None and phase == Phase.READY:
            log.warning("the GPU server in the state store no longer exists")
            self._gone()

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
            phase=Phase.STARTING,
            phase_since=time.time(),
            endpoint=endpoint,
            instance_status=endpoint.instance_status,
            detail="the GPU server exists; waiting for Ollama and the model",
            marks={**self._current.marks, "server": time.time()},
        )
        self._await_ready()

    def _await_ready(self) -> None:
        state = self._current
        endpoint = state.endpoint
        deadline = (state.phase_since or time.time()) + self.config.start_timeout
        while not self._stop.is_set():
            result = probe(self.sessions, endpoint, self.config.models)
            if result.answered:
                self._mark("answers")
            if result.ready:
                self._mark("listed")
                self._record_server_stages(endpoint)
                self._load_models(endpoint)
                self._mark("loaded")
                self._become_ready(result.version)
                return
            on_server = server_progress(self.sessions, endpoint) if result.answered else None
            if on_server and on_server.get("error"):  # cloud-init/setup.sh `give_up`
                self._give_up(f"the GPU server's bring-up failed: {on_server['error']}"[:400])
                return
            self._progress(f"on the server: {on_server['detail']}" if on_server else result.reason)
            if time.time() > deadline:
                self._give_up(
                    f"the GPU server did not become ready in {self.config.start_timeout:g} s "
                    f"(PROXY_START_TIMEOUT): {result.reason}"
                )
                return
            self._stop.wait(PROBE_EVERY)

    def _give_up(self, reason: str) -> None:
        """Nothing will make this server ready: it is removed rather than billed, and the
        reason is the error shown (the next demand after the back-off starts a fresh one)."""
        self._progress(f"{reason}; removing the GPU server")
        try:
            self.provisioner.tear_down(self._progress)
        except ProvisionError as exc:
            self._fail(f"{reason}; removing it failed too: {exc}", teardown=True)
            return
        self._fail(reason)

    def _load_models(self, endpoint: Endpoint) -> None:
        """Load each model once, so the first request does not pay for it (best effort)."""
        for model in self.config.models:
            self._progress(f"loading {model} into GPU memory")
            failed = load_model(self.sessions, endpoint, model, self.config.idle_timeout,
                                self.config.read_timeout)
            if failed:
                log.warning("%s; the first request will load it", failed)

    def _record_server_stages(self, endpoint: Endpoint) -> None:
        """The server's own seconds per bring-up stage (packages, driver, …) and when each ran
        (stages run side by side), for the timeline."""
        on_server = server_progress(self.sessions, endpoint) or {}
        durations = on_server.get("durations")
        if isinstance(durations, dict):
            stages = {str(k): float(v) for k, v in durations.items()
                      if isinstance(v, (int, float))}
            with self._state_lock:
                if self.state is not None:
                    self.state = replace(self.state, server_stages=stages,
                                         server_spans=server_spans(on_server))

    def _mark(self, name: str) -> None:
        """The moment a cold-start stage ended (the first time only), kept with the document."""
        with self._state_lock:
            if self.state is not None and name not in self.state.marks:
                self.state = replace(self.state, marks={**self.state.marks, name: time.time()})

    def _become_ready(self, version: str | None) -> None:
        now = time.time()
        state = self._current
        cold_starts = list(state.cold_starts)
        timelines = list(state.timelines)
        started = state.provisioning_started_at
        if started:
            cold_starts = (cold_starts + [round(now - started, 3)])[-COLD_STARTS_KEPT:]
            timeline: dict[str, Any] = cold_start_timeline(state.marks, started)
            log.info("ready after a cold start of %.1f s (%s)", now - started,
                     ", ".join(f"{k} {v:.1f} s" for k, v in timeline.items()))
            if state.server_stages:
                timeline["on_server"] = state.server_stages  # the server's own phases
            if state.server_spans:
                timeline["on_server_spans"] = state.server_spans  # [start, end] s, overlapping
            if state.cold_mode:
                timeline["mode"] = state.cold_mode
            timelines = (timelines + [timeline])[-COLD_STARTS_KEPT:]
        self._commit(
            phase=Phase.READY,
            phase_since=now,
            ready_since=now,
            detail="ready",
            failures=0,
            last_error=None,
            cold_starts=cold_starts,
            timelines=timelines,
            upstream_version=version,
        )
        self._memory = replace(probed(self._memory, Clock(now, time.monotonic()),
                                      self._wanted_seen), health_failures=0)

    def _check_health(self) -> None:
        endpoint = self._current.endpoint
        if probe(self.sessions, endpoint, self.config.models).ready:
            self._memory = replace(self._memory, health_failures=0)
            return
        failures = self._memory.health_failures + 1
        if failures < HEALTH_FAILURES:
            self._memory = replace(self._memory, health_failures=failures)
            return
        self._memory = replace(self._memory, health_failures=0)
        found = self.provisioner.observe()
        log.warning("the ready upstream stopped answering; it %s", "exists" if found else "is gone")
        if found is None or found.instance_status == "stopped":
            self._gone(instance_status=found.instance_status if found else "absent")
        else:
            self._commit(phase=Phase.STARTING, phase_since=time.time(), endpoint=found)
            self._await_ready()

    def _tear_down_idle(self, idle_since: float, idle_for: float) -> None:
        now = time.time()
        stop = self.config.idle_action == "stop"
        sentence = "idle: stopping the GPU server" if stop else "idle: removing the GPU server"
        self._commit(phase=Phase.DESTROYING, phase_since=now, demand_cutoff=self._cutoff(now),
                     removal="stop" if stop else "destroy", removal_reason="idle",
                     **self._detail(Phase.DESTROYING, sentence, now))
        # Workers may have admitted requests on a snapshot that still said `ready`:
        # give their reports time to arrive, then look again before removing anything.
        self._stop.wait(DESTROY_GRACE_TICKS * self.config.tick + 0.5)
        if self._activity_since(idle_since):
            log.info("demand arrived while about to remove the GPU server; keeping it")
            self._commit(phase=Phase.READY, phase_since=time.time(), detail="ready")
            return
        log.info("removing the GPU server: idle for %.0f s", idle_for)
        self._remove()

    def _retire(self, reason: str, down_at: float, local: datetime, stop: bool) -> None:
        """Remove the server under demand (an operator, a cap): new requests wait, streams end."""
        now = time.time()
        sentence = f"{'stopping' if stop else 'removing'} the GPU server: {reason}"
        log.warning("%s", sentence)
        changes = self._detail(Phase.DESTROYING, sentence, now)
        changes["removal_reason"] = reason
        if down_at > self._current.down_handled:
            changes.update(down_handled=down_at, **self._warm_off(local))
        self._commit(phase=Phase.DESTROYING, phase_since=now, removal="stop" if stop else "destroy",
                     **changes)
        if self._drain(now + self.config.drain_timeout):
            self._remove(demand_cutoff=self._cutoff(time.time()))  # refused meanwhile: not demand

    def _drain(self, deadline: float) -> bool:
        """Wait for the requests in flight to end, up to `deadline`; False if stopping."""
        # Reports of requests admitted on a snapshot that still said `ready` arrive within ticks.
        self._stop.wait(DESTROY_GRACE_TICKS * self.config.tick + 0.5)
        while not self._stop.is_set():
            now = time.time()
            inflight = live_inflight(self.store.reports(), now)
            if inflight == 0:
                return True
            if now >= deadline:
                log.warning("%d requests still in flight after PROXY_DRAIN_TIMEOUT=%g s; "
                            "removing the GPU server anyway", inflight, self.config.drain_timeout)
                return True
            self._progress(f"waiting for {inflight} requests in flight to end")
            self._stop.wait(1.0)
        return False

    def _remove(self, **changes: Any) -> None:
        """Destroy the server, or stop it (the document's `removal`, set when it began)."""
        stop = self._current.removal == "stop"
        try:
            if stop:
                self.provisioner.stop(self._progress)
            else:
                self.provisioner.tear_down(self._progress)
        except ProvisionError as exc:
            verb = "stopping" if stop else "removing"
            self._fail(f"{verb} the GPU server failed: {exc}", teardown=True)
            return
        self._gone(teardown_pending=False, instance_status="stopped" if stop else "absent",
                   **changes)

    def _gone(self, **changes: Any) -> None:
        """The server no longer runs (gone, or stopped): phase idle, its GPU time booked."""
        changes.setdefault("instance_status", "absent")
        now = time.time()
        booked = gputime.close_interval(self._current.gpu_record, now, self.config.tz)
        self._commit(phase=Phase.IDLE, phase_since=now, endpoint=None, detail="", **booked,
                     **changes)

    @staticmethod
    def _detail(phase: Phase, sentence: str, now: float) -> dict[str, Any]:
        """The detail, and the first step of a new operation."""
        return {"detail": sentence,
                "steps": ({"at": round(now, 3), "phase": phase.value, "text": sentence},)}

    def _activity_since(self, idle_since: float) -> bool:
        reports = self.store.reports()
        last_activity = max((r.last_activity for r in reports), default=0.0)
        return live_inflight(reports, time.time()) > 0 or last_activity > idle_since

    def _fail(self, reason: str, teardown: bool = False) -> None:
        """Phase error with back-off; a failed tear-down keeps its endpoint and is retried."""
        state = self._current
        failures = state.failures + 1
        backoff = min(self.config.retry_base * 2 ** (failures - 1), self.config.retry_max)
        now = time.time()
        log.error("provisioning failed (attempt %d, next try in %.0f s): %s", failures, backoff,
                  reason)
        changes: dict[str, Any] = dict(
            phase=Phase.ERROR, phase_since=now, last_error=reason, failures=failures,
            retry_at=now + backoff, detail=reason, teardown_pending=teardown,
        )
        if not teardown:  # no server was made, or it is gone with the failed update
            changes.update(endpoint=None,
                           **gputime.close_interval(state.gpu_record, now, self.config.tz))
        self._commit(**changes)

    def _progress(self, sentence: str) -> None:
        """Provisioner progress → the document's detail and steps, saved at most once a second.

        A sentence not saved at once rides along with the next save, so no step is lost.
        """
        log.info("progress: %s", sentence)
        now = time.time()
        with self._state_lock:
            if self.state is not None:
                steps = list(self.state.steps)
                if not steps or steps[-1]["text"] != sentence:  # probes repeat their reason
                    if steps and _grown(steps[-1]["text"], sentence):
                        steps.pop()  # "pulling llama3.2: 43%" replaces "…: 42%"
                    steps.append({"at": round(now, 3), "phase": self.state.phase.value,
                                  "text": sentence})
                self.state = replace(self.state, detail=sentence, steps=tuple(steps[-STEPS_KEPT:]))
        if now - self._detail_saved >= 1.0:
            self._detail_saved = now
            self._commit(detail=sentence)

    def _commit(self, **changes: Any) -> None:
        with self._state_lock:
            before = self._current
            state = replace(before, **changes)
            if state.phase != before.phase:
                log.info("phase %s → %s", before.phase, state.phase)
            if not self.store.save(state.to_doc(), self.holder):
                self._holding = False
                self.state = None
                raise LeaseLost()
            self.state = state

    def halt(self) -> None:
        """Act no more, keeping the lease (it lapses by its time to live)."""
        self._stop.set()

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


def server_spans(progress: dict[str, Any]) -> dict[str, list[float]]:
    """Each stage of the server's progress document (cloud-init/progress.py) as [start, end]
    seconds from the first stage's start: stages on two tracks overlap. Malformed ones are
    left out (the document comes from the server)."""
    stages = progress.get("stages")
    if not isinstance(stages, dict):
        return {}
    spans = {str(name): (stage.get("start"), stage.get("end")) for name, stage in stages.items()
             if isinstance(stage, dict)}
    spans = {name: (start, end) for name, (start, end) in spans.items()
             if isinstance(start, (int, float)) and isinstance(end, (int, float)) and end >= start}
    first = min((start for start, _ in spans.values()), default=0.0)
    return {name: [round(start - first, 1), round(end - first, 1)]
            for name, (start, end) in sorted(spans.items(), key=lambda item: item[1])}


def cold_start_estimate(timelines: tuple[dict[str, Any], ...], mode: str) -> dict[str, Any]:
    """What the next cold start (of `mode`) should take, stage by stage: the median of each
    proxy stage over the recorded cold starts of that mode (none recorded: no figures)."""
    same = [t for t in timelines if t.get("mode") == mode]
    stages = [stage for stage, _ in STAGES if any(stage in t for t in same)]
    medians = {stage: round(statistics.median(t[stage] for t in same if stage in t), 1)
               for stage in stages}
    return {"mode": mode, "from_cold_starts": len(same), "stages": medians or None,
            "total": round(sum(medians.values()), 1) if medians else None}


def cold_start_timeline(marks: dict[str, float], started: float) -> dict[str, float]:
    """Seconds each stage of a cold start took; a stage whose end went unseen is left out."""
    timeline, since = {}, started
    for stage, mark in STAGES:
        if mark in marks:
            timeline[stage] = round(max(0.0, marks[mark] - since), 3)
            since = marks[mark]
    return timeline


_PERCENT = re.compile(r"\s*\d+%$")


def _grown(last: str, sentence: str) -> bool:
    """The same sentence with another percent at its end."""
    return bool(_PERCENT.search(sentence)) and _PERCENT.sub("", last) == _PERCENT.sub("", sentence)
