"""The fleet's servers beyond the primary, as the reconciler runs them: the step on the tick
(proxy/lifecycle/fleet.py), and each server's slow work — bring up, wait for the model,
probe, drain, remove or stop — in an operation thread of its own, so a drain of one server
never delays the start of another.

Every change goes through `_commit`, fenced by the lease, under the state lock: the primary's
operation and these threads each change their own part of the one document.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from proxy.lifecycle import gputime
from proxy.lifecycle.decide import HEALTH_EVERY, PROBE_EVERY, WORKER_TTL, Demand
from proxy.lifecycle.fleet import DrainServer, FleetMemory, StartServer, step
from proxy.lifecycle.operations import DESTROY_GRACE_TICKS, HEALTH_FAILURES, LeaseLost, Operations
from proxy.lifecycle.phase import Phase
from proxy.lifecycle.servers import Server
from proxy.lifecycle.snapshot import Snapshot
from proxy.provision.base import PRIMARY, ProvisionError
from proxy.store.base import StoreError
from proxy.upstream.probe import probe

log = logging.getLogger("ollama_exoscale.fleet")

FLEET_RETRY = 60.0  # seconds after a fleet server failed to come up before another is tried


class Scaling(Operations):
    """The fleet operations of the Reconciler (which provides what Operations declares)."""

    _fleet_memory: FleetMemory
    _server_ops: dict[str, threading.Thread]
    _server_health: dict[str, tuple[float, int]]  # name → (monotonic last probe, failures)
    _fleet_retry_at: float  # monotonic: no fleet server is started before it
    _fleet_wish: float  # the latest worker's wish for a probe the fleet answered

    # -- on the tick: cheap, never blocking --------------------------------------------------

    def _scale(self, demand: Demand, now: float, *, warm: bool, stop_all: str) -> None:
        """The fleet's step for this tick. `stop_all`: why every server beyond the primary
        must go now (an operator's `down`, the budget), or ""."""
        state = self._current
        if self.config.max_servers <= 1 and not state.servers:
            return
        wished = demand.wanted_at > self._fleet_wish  # a worker found a server broken
        self._fleet_wish = max(self._fleet_wish, demand.wanted_at)
        busy = {name for name, op in self._server_ops.items() if op.is_alive()}
        for name, server in state.servers.items():
            if name not in busy:
                self._resume(name, server, stop_all, wished)
        members = Snapshot(state, demand).members()
        may_start = not stop_all and time.monotonic() >= self._fleet_retry_at
        asked = demand.up_at > state.up_handled
        chosen, self._fleet_memory = step(members, demand.inflight, time.monotonic(),
                                          self.config, self._fleet_memory, warm=warm,
                                          may_start=may_start, asked=asked)
        full = sum(1 for m in members if m.phase != Phase.IDLE) >= self.config.max_servers
        if asked and (isinstance(chosen, StartServer) or full):  # answered (or cannot be)
            self._commit(up_handled=demand.up_at)
        match chosen:
            case StartServer(name):
                log.info("starting GPU server %s: %d requests in flight on the fleet", name,
                         demand.inflight)
                self._set_server(name, Server(
                    Phase.PROVISIONING, now, f"starting GPU server {name}", instance_since=now,
                    instance_status=self._server_status(name)))
                self._run_for(name, lambda: self._bring_up_server(name), "bring up")
            case DrainServer(name, reason):
                log.info("draining GPU server %s: %s", name, reason)
                self._run_for(name, lambda: self._drain_server(name, reason), "drain")

    def _resume(self, name: str, server: Server, stop_all: str, wished: bool) -> None:
        """An operation for this server when one is due: resumed after a take-over, a probe,
        or its removal (a `down`, the budget, its instance-hour limit)."""
        hours = self.config.max_instance_hours
        if stop_all and server.phase in (Phase.READY, Phase.STARTING, Phase.PROVISIONING):
            self._run_for(name, lambda: self._drain_server(name, stop_all), "drain")
        elif server.phase == Phase.PROVISIONING:
            self._run_for(name, lambda: self._bring_up_server(name), "bring up (resumed)")
        elif server.phase == Phase.STARTING:
            self._run_for(name, lambda: self._await_server(name), "await ready (resumed)")
        elif server.phase == Phase.DESTROYING:
            self._run_for(name, lambda: self._drain_server(name, server.removal_reason),
                          "drain (resumed)")
        elif server.phase == Phase.READY and hours and server.instance_since and \
                time.time() - server.instance_since >= hours * 3600:
            reason = f"it has run for PROXY_MAX_INSTANCE_HOURS={hours:g} h"
            self._run_for(name, lambda: self._drain_server(name, reason), "drain")
        elif server.phase == Phase.READY and (wished or self._health_due(name)):
            self._run_for(name, lambda: self._check_server(name), "health")

    def _health_due(self, name: str) -> bool:
        last, failures = self._server_health.get(name, (-HEALTH_EVERY, 0))
        every = PROBE_EVERY if failures else HEALTH_EVERY
        return time.monotonic() - last >= every

    def _run_for(self, name: str, operation: Callable[[], None], what: str) -> None:
        def run() -> None:
            try:
                operation()
            except LeaseLost:
                log.warning("%s of %s stopped: the lease moved to another worker", what, name)
            except StoreError as exc:
                log.error("%s of %s stopped: %s", what, name, exc)
            except Exception:  # the loop must survive any provisioner bug
                log.exception("%s of %s failed unexpectedly", what, name)

        thread = threading.Thread(target=run, name=f"fleet-{name}-{what}", daemon=False)
        self._server_ops[name] = thread
        thread.start()

    # -- operations: slow, each in its server's thread ---------------------------------------

    def _bring_up_server(self, name: str) -> None:
        try:
            endpoint = self.provisioner.bring_up(self._server_progress(name), server=name)
        except ProvisionError as exc:
            self._server_failed(name, str(exc), tear_down=False)
            return
        except Exception as exc:  # a bug or an unexpected library error: show its kind only
            log.exception("bring up of %s failed unexpectedly", name)
            self._server_failed(name, f"provisioning failed unexpectedly "
                                f"({type(exc).__name__}); see the logs", tear_down=False)
            return
        self._change_server(name, lambda s: s.moved(
            Phase.STARTING, time.time(), endpoint=endpoint, instance_status="running",
            detail="the GPU server exists; waiting for Ollama and the model"))
        self._await_server(name)

    def _await_server(self, name: str) -> None:
        server = self._current.servers.get(name)
        if server is None or server.endpoint is None:
            return
        deadline = (server.phase_since or time.time()) + self.config.start_timeout
        while not self._stop.is_set():
            result = probe(self.sessions, server.endpoint, self.config.models)
            if result.ready:
                self._became_ready(name, result.version)
                self._server_health[name] = (time.monotonic(), 0)
                log.info("GPU server %s is ready", name)
                return
            if time.time() > deadline:
                self._server_failed(name, f"GPU server {name} did not become ready in "
                                    f"{self.config.start_timeout:g} s (PROXY_START_TIMEOUT): "
                                    f"{result.reason}", tear_down=True)
                return
            self._server_progress(name)(result.reason)
            self._stop.wait(PROBE_EVERY)

    def _became_ready(self, name: str, version: str | None) -> None:
        now = time.time()
        self._change_server(name, lambda s: s.moved(Phase.READY, now, ready_since=now,
                                                    detail="ready", upstream_version=version))

    def _check_server(self, name: str) -> None:
        server = self._current.servers.get(name)
        if server is None or server.endpoint is None:
            return
        ok = probe(self.sessions, server.endpoint, self.config.models).ready
        _, failures = self._server_health.get(name, (0.0, 0))
        failures = 0 if ok else failures + 1
        self._server_health[name] = (time.monotonic(), failures)
        if failures < HEALTH_FAILURES:
            return
        self._server_health.pop(name, None)
        try:
            found = self.provisioner.observe_fleet().get(name)
        except ProvisionError as exc:
            log.error("could not observe GPU server %s: %s", name, exc)
            return
        if found is None or found.instance_status != "running":
            log.warning("GPU server %s stopped answering and is gone", name)
            self._server_gone(name, stopped=found is not None)
        else:
            log.warning("GPU server %s stopped answering; waiting for it again", name)
            self._change_server(name, lambda s: s.moved(Phase.STARTING, time.time(),
                                                        endpoint=found))
            self._await_server(name)

    def _drain_server(self, name: str, reason: str) -> None:
        """Out of rotation, its requests end (at most PROXY_DRAIN_TIMEOUT), then it goes."""
        now = time.time()
        server = self._current.servers.get(name)
        if server is None:
            return
        if server.phase != Phase.DESTROYING:
            self._change_server(name, lambda s: s.moved(
                Phase.DESTROYING, now, removal_reason=reason,
                detail=f"draining GPU server {name}: {reason}"))
            deadline = now + self.config.drain_timeout
        else:
            deadline = (server.phase_since or now) + self.config.drain_timeout
        # Workers may have routed requests on a snapshot that still had it in rotation.
        self._stop.wait(DESTROY_GRACE_TICKS * self.config.tick + 0.5)
        while not self._stop.is_set():
            left = self._inflight_on(name)
            if left == 0 or time.time() >= deadline:
                if left:
                    log.warning("%d requests still on GPU server %s after PROXY_DRAIN_TIMEOUT="
                                "%g s; removing it anyway", left, name, self.config.drain_timeout)
                break
            self._server_progress(name)(f"waiting for {left} requests in flight to end")
            self._stop.wait(1.0)
        if self._stop.is_set():
            return
        stop = self.config.idle_action == "stop" and not reason.startswith("it has run")
        try:
            if stop:
                self.provisioner.stop(self._server_progress(name), server=name)
            else:
                self.provisioner.tear_down(self._server_progress(name), server=name)
        except ProvisionError as exc:
            log.error("removing GPU server %s failed: %s (tried again)", name, exc)
            error = str(exc)
            self._change_server(name, lambda s: replace(s, last_error=error))
            return
        self._server_gone(name, stopped=stop)

    def _inflight_on(self, name: str) -> int:
        now = time.time()
        return sum(r.inflight_by.get(name, 0) for r in self.store.reports()
                   if now - r.heartbeat < WORKER_TTL)

    def _server_failed(self, name: str, reason: str, *, tear_down: bool) -> None:
        """A server that will not serve: removed rather than billed, and no other tried for a
        while (FLEET_RETRY); the fleet's others serve on."""
        log.error("GPU server %s failed: %s", name, reason)
        if tear_down:
            try:
                self.provisioner.tear_down(self._server_progress(name), server=name)
            except ProvisionError as exc:
                reason = f"{reason}; removing it failed too: {exc}"
        self._fleet_retry_at = time.monotonic() + FLEET_RETRY
        self._server_gone(name, stopped=False, error=reason)

    def _server_gone(self, name: str, *, stopped: bool, error: str | None = None) -> None:
        """The server no longer runs: its GPU time booked; kept as idle if stopped."""
        with self._state_lock:
            state = self._current
            server = state.servers.get(name)
            if server is None:
                return
            now = time.time()
            booked = gputime.close_interval(state.gpu_record, now, self.config.tz,
                                            start=server.instance_since)
            servers = dict(state.servers)
            if stopped:
                servers[name] = server.moved(Phase.IDLE, now, endpoint=None, instance_since=0.0,
                                             instance_status="stopped", detail="stopped")
            else:
                servers.pop(name)
            changes: dict[str, Any] = dict(booked, servers=servers)
            if error is not None:
                changes.update(fleet_error=error)
            self._commit(**changes)

    # -- the document ------------------------------------------------------------------------

    def _set_server(self, name: str, server: Server) -> None:
        with self._state_lock:
            self._commit(servers={**self._current.servers, name: server})

    def _change_server(self, name: str, change: Callable[[Server], Server]) -> None:
        with self._state_lock:
            server = self._current.servers.get(name)
            if server is not None:
                self._commit(servers={**self._current.servers, name: change(server)})

    def _server_status(self, name: str) -> str:
        server = self._current.servers.get(name)
        return server.instance_status if server is not None else "absent"

    def _server_progress(self, name: str) -> Callable[[str], None]:
        def progress(sentence: str) -> None:
            log.info("progress of %s: %s", name, sentence)
            server = self._current.servers.get(name)
            if server is not None and server.detail != sentence:
                self._change_server(name, lambda s: replace(s, detail=sentence))
        return progress

    def _adopt_fleet(self) -> None:
        """On taking the lease: every fleet server that exists is in the document, and none
        that is gone."""
        if self.config.max_servers <= 1 and not self._current.servers:
            return  # one server: the primary's adopt alone, as before fleets
        try:
            found = self.provisioner.observe_fleet()
        except ProvisionError as exc:
            log.error("could not observe the fleet: %s", exc)
            return
        now = time.time()
        for name, endpoint in found.items():
            if name == PRIMARY or name in self._current.servers:
                continue
            log.info("adopting GPU server %s at %s", name, endpoint.url)
            running = endpoint.instance_status == "running"
            self._set_server(name, Server(
                Phase.STARTING if running else Phase.IDLE, now,
                "found an existing GPU server; checking its model" if running else "stopped",
                endpoint=endpoint if running else None, instance_since=now if running else 0.0,
                instance_status=endpoint.instance_status))
        for name, server in self._current.servers.items():
            if name not in found and server.phase in (Phase.READY, Phase.STARTING):
                log.warning("GPU server %s in the state store no longer exists", name)
                self._server_gone(name, stopped=False)

    def _join_fleet(self, timeout: float) -> None:
        for op in list(self._server_ops.values()):
            if op.is_alive():
                op.join(timeout)

