"""The reconciler's slow work, each run on its operation thread: adopt what exists, bring up,
wait for Ollama and the model, check health, drain, remove or stop, fail with back-off.

Every change goes through `_commit`, fenced by the lease: a holder that lost it gets LeaseLost
and stops. Progress sentences from the provisioner become the document's detail and steps.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

from proxy.config import Config
from proxy.lifecycle import coldstart, gputime, schedule
from proxy.lifecycle.coldstart import server_spans
from proxy.lifecycle.decide import (
    PROBE_EVERY,
    WORKER_TTL,
    Clock,
    Memory,
    answered_until,
    live_inflight,
    probed,
)
from proxy.lifecycle.state import Phase, State
from proxy.provision.base import PRIMARY, Endpoint, Provisioner, ProvisionError
from proxy.store.base import Store
from proxy.upstream.probe import load_model, probe, server_progress
from proxy.upstream.session import Sessions

log = logging.getLogger("ollama_exoscale.lifecycle")

HEALTH_FAILURES = 3  # failed probes in a row before the upstream is re-examined
DESTROY_GRACE_TICKS = 4  # ticks to wait after announcing `destroying`, for in-flight reports
STEPS_KEPT = 40  # progress sentences of the current operation kept in the document


class LeaseLost(Exception):
    """Another worker holds the lease now; this one must stop acting."""


class Operations:
    """What the Reconciler does on its operation thread (it provides these attributes)."""

    config: Config
    provisioner: Provisioner
    store: Store
    sessions: Sessions
    holder: str
    state: State | None
    _holding: bool
    _stop: threading.Event
    _memory: Memory
    _wanted_seen: float
    _detail_saved: float
    _state_lock: threading.RLock

    @property
    def _current(self) -> State:
        """The document as this worker last wrote it (an empty one before it holds the lease)."""
        return self.state or State()

    def _cutoff(self, now: float) -> float:
        return answered_until(now, self._wanted_seen)

    def _warm_off(self, local: datetime) -> dict[str, Any]:
        """After an operator's `down` inside a warm window, that window no longer warms."""
        end = schedule.current_end(self.config.warm_windows, local)
        return {"warm_off_until": end.timestamp()} if end else {}

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
        self._commit(
            phase=Phase.READY,
            phase_since=now,
            ready_since=now,
            detail="ready",
            failures=0,
            last_error=None,
            upstream_version=version,
            **coldstart.recorded(self._current, now),
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
            inflight = self._primary_inflight(now)
            if inflight == 0:
                return True
            if now >= deadline:
                log.warning("%d requests still in flight after PROXY_DRAIN_TIMEOUT=%g s; "
                            "removing the GPU server anyway", inflight, self.config.drain_timeout)
                return True
            self._progress(f"waiting for {inflight} requests in flight to end")
            self._stop.wait(1.0)
        return False

    def _primary_inflight(self, now: float) -> int:
        """Requests in flight on the primary: all of them, unless the fleet has others."""
        reports = self.store.reports()
        if not self._current.servers:
            return live_inflight(reports, now)
        return sum(r.inflight_by.get(PRIMARY, 0) for r in reports
                   if now - r.heartbeat < WORKER_TTL)

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
        with self._state_lock:  # booked on the document as it is (fleet servers book too)
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
        with self._state_lock:  # booked on the document as it is (fleet servers book too)
            if not teardown:  # no server was made, or it is gone with the failed update
                changes.update(endpoint=None, **gputime.close_interval(
                    self._current.gpu_record, now, self.config.tz))
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


_PERCENT = re.compile(r"\s*\d+%$")


def _grown(last: str, sentence: str) -> bool:
    """The same sentence with another percent at its end."""
    return bool(_PERCENT.search(sentence)) and _PERCENT.sub("", last) == _PERCENT.sub("", sentence)
