"""The reconciler's choice as a pure function: the shared state, the workers' demand, the
clocks, the config and what the reconciler remembers go in; one action comes out.

Nothing here starts a thread, touches the store or sleeps: `decide` is tested as a table
(tests/unit/lifecycle/test_decide.py), and the Reconciler only runs the action it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

from proxy.config import Config
from proxy.lifecycle import gputime, schedule
from proxy.lifecycle.state import Phase, State
from proxy.store.base import WorkerReport

HEALTH_EVERY = 15.0  # seconds between probes of a ready upstream
PROBE_EVERY = 1.0  # seconds between probes after a failed one (and while starting)
WORKER_TTL = 10.0  # a worker silent this long is dead: its in-flight requests stop counting


@dataclass(frozen=True)
class Demand:
    """What the live workers report, summed: requests in flight and the latest stamps."""

    inflight: int = 0
    last_activity: float = 0.0
    wanted_at: float = 0.0
    down_at: float = 0.0
    bake_at: float = 0.0  # the latest operator's `bake`
    bake_models: bool = False  # whether that bake keeps the models
    by_server: dict[str, int] = field(default_factory=dict, hash=False)  # of inflight
    up_at: float = 0.0  # the latest operator's `up` while a server was ready

    @classmethod
    def of(cls, reports: list[WorkerReport], now: float) -> Demand:
        bake = max(reports, key=lambda r: r.bake_at, default=None)
        by_server: dict[str, int] = {}
        for report in reports:
            if now - report.heartbeat < WORKER_TTL:
                for name, count in report.inflight_by.items():
                    by_server[name] = by_server.get(name, 0) + count
        return cls(
            by_server=by_server,
            up_at=max((r.up_at for r in reports), default=0.0),
            inflight=live_inflight(reports, now),
            last_activity=max((r.last_activity for r in reports), default=0.0),
            wanted_at=max((r.wanted_at for r in reports), default=0.0),
            down_at=max((r.down_at for r in reports), default=0.0),
            bake_at=bake.bake_at if bake else 0.0,
            bake_models=bake.bake_models if bake else False,
        )


def live_inflight(reports: list[WorkerReport], now: float) -> int:
    """Requests in flight on the workers still alive (a dead worker's stop counting)."""
    return sum(r.inflight for r in reports if now - r.heartbeat < WORKER_TTL)


@dataclass(frozen=True)
class Clock:
    now: float  # the wall clock: shared by every worker and host, but it can be stepped
    monotonic: float  # this process's clock that is never stepped


@dataclass(frozen=True)
class Memory:
    """What the reconciler remembers between ticks, outside the shared document."""

    idle_mark: tuple[float, float] = (0.0, 0.0)  # (idle_since, monotonic time first seen)
    last_health: float = -HEALTH_EVERY  # monotonic time of the last health probe: none yet
    health_wish: float = 0.0  # a worker's wish for a probe newer than this is not answered
    health_failures: int = 0  # failed health probes in a row


# -- the actions: what the reconciler does next --------------------------------------------

@dataclass(frozen=True)
class Wait:
    """Nothing to do this tick."""


@dataclass(frozen=True)
class SetAside:
    """Demand while the daily budget is used up: answered (503), never a start at midnight."""

    wanted_at: float


@dataclass(frozen=True)
class Provision:
    """Start a GPU server."""


@dataclass(frozen=True)
class AckDown:
    """An operator's `down` with no server: noted (and the warm window it falls in is off)."""

    down_at: float


@dataclass(frozen=True)
class RetryTearDown:
    """A failed removal is tried again."""


@dataclass(frozen=True)
class ResumeBringUp:
    """An interrupted bring-up (a crash, a lease moved) goes on."""


@dataclass(frozen=True)
class ResumeAwaitReady:
    """An interrupted wait for the model goes on."""


@dataclass(frozen=True)
class ResumeRemoval:
    """An interrupted removal goes on: drain until `deadline`, then remove."""

    deadline: float


@dataclass(frozen=True)
class Retire:
    """Remove (or stop) the ready server under demand: new requests wait, streams end."""

    reason: str
    down_at: float
    stop: bool


@dataclass(frozen=True)
class TearDownIdle:
    """The ready server has been idle for the idle timeout: remove or stop it."""

    idle_since: float
    idle_for: float


@dataclass(frozen=True)
class CheckHealth:
    """Probe the ready upstream (due by time, or a request found it failing)."""


@dataclass(frozen=True)
class Bake:
    """Make a template of the ready server (an operator's `bake`): demand is held meanwhile."""

    bake_at: float
    models: bool


@dataclass(frozen=True)
class ResumeBake:
    """An interrupted bake goes on (the server may be stopped, a snapshot under way)."""


@dataclass(frozen=True)
class DropBake:
    """A `bake` asked for while the bring-up failed: answered with the failure, not kept for a
    server that may come hours later."""

    bake_at: float
    reason: str


Action = (Wait | SetAside | Provision | AckDown | RetryTearDown | ResumeBringUp
          | ResumeAwaitReady | ResumeRemoval | Retire | TearDownIdle | CheckHealth | Bake
          | ResumeBake | DropBake)


def decide(state: State, demand: Demand, clock: Clock, config: Config,
           memory: Memory) -> tuple[Action, Memory]:
    """The one action for this tick, and the reconciler's memory after choosing it."""
    now = clock.now
    phase = state.phase
    down = demand.down_at > state.down_handled
    local = datetime.fromtimestamp(now, config.tz)
    # PROXY_MIN_SERVERS keeps servers up even when idle: at least one, like a warm window.
    warm = (schedule.is_warm(config.warm_windows, local) or config.min_servers > 0) and \
        now >= state.warm_off_until
    over_budget = gputime.over_budget(state.gpu_record, now, config.tz, config.daily_gpu_hours)
    new_demand = demand.wanted_at > state.demand_cutoff
    bake = demand.bake_at > state.bake_handled  # a bake needs a ready server: it brings one up

    if phase == Phase.IDLE:
        if over_budget:
            return (SetAside(demand.wanted_at) if new_demand else Wait()), memory
        if warm or new_demand or bake:
            return Provision(), memory
        return (AckDown(demand.down_at) if down else Wait()), memory
    if phase == Phase.BAKING:
        return ResumeBake(), memory
    if phase == Phase.ERROR:
        if bake:
            return DropBake(demand.bake_at, f"no GPU server to bake from: {state.last_error}"
                            ), memory
        if now < state.retry_at:
            return Wait(), memory
        since = max(state.phase_since, state.demand_cutoff)
        if (warm or demand.wanted_at > since) and not over_budget:  # demand since the failure
            return Provision(), memory
        return (RetryTearDown() if state.teardown_pending else Wait()), memory
    if phase == Phase.PROVISIONING:
        return ResumeBringUp(), memory
    if phase == Phase.STARTING:
        return ResumeAwaitReady(), memory
    if phase == Phase.DESTROYING:
        return ResumeRemoval((state.phase_since or now) + config.drain_timeout), memory
    if phase == Phase.READY:
        return _decide_ready(state, demand, clock, config, memory, down, warm, over_budget)
    return Wait(), memory


def _decide_ready(state: State, demand: Demand, clock: Clock, config: Config,
                  memory: Memory, down: bool, warm: bool, over_budget: bool
                  ) -> tuple[Action, Memory]:
    now = clock.now
    reason, fresh = retire_reason(state, down, over_budget, now, config)
    ended = schedule.last_end(config.warm_windows, datetime.fromtimestamp(now, config.tz))
    idle_since = max(demand.last_activity, state.ready_since,
                     ended.timestamp() if ended else 0.0)
    memory, idle_for = _idle_for(memory, idle_since, clock)
    if reason:
        return Retire(reason, demand.down_at, config.idle_action == "stop" and not fresh), memory
    if demand.bake_at > state.bake_handled:  # before idle: a bake is why the server is up
        return Bake(demand.bake_at, demand.bake_models), memory
    # The primary goes last: once the fleet's other servers are gone (or stopped).
    others = any(server.phase != Phase.IDLE for server in state.servers.values())
    if not warm and demand.inflight == 0 and idle_for >= config.idle_timeout and not others:
        return TearDownIdle(idle_since, idle_for), memory
    every = PROBE_EVERY if memory.health_failures else HEALTH_EVERY
    if clock.monotonic - memory.last_health >= every or demand.wanted_at > memory.health_wish:
        return CheckHealth(), probed(memory, clock, demand.wanted_at)
    return Wait(), memory


def answered_until(now: float, wanted_seen: float) -> float:
    """The time up to which demand counts as answered: now, or the latest demand seen when the
    clock has been stepped back behind it (else that old demand would act again: start a
    server the moment this one is gone, or ask for another probe)."""
    return max(now, wanted_seen)


def probed(memory: Memory, clock: Clock, wanted_seen: float) -> Memory:
    """The memory once the upstream is probed now: the wishes it answers are forgotten."""
    return replace(memory, last_health=clock.monotonic,
                   health_wish=answered_until(clock.now, wanted_seen))


def _idle_for(memory: Memory, idle_since: float, clock: Clock) -> tuple[Memory, float]:
    """Seconds without demand: by the wall clock (shared by every worker), or by how long this
    reconciler has seen the same last demand, on a clock never stepped: a wall clock stepped
    back an hour would otherwise keep an idle server (and its bill) that hour."""
    if memory.idle_mark[0] != idle_since:
        memory = replace(memory, idle_mark=(idle_since, clock.monotonic))
    return memory, max(clock.now - idle_since, clock.monotonic - memory.idle_mark[1])


def retire_reason(state: State, down: bool, over_budget: bool, now: float,
                  config: Config) -> tuple[str, bool]:
    """(why the ready server must go even under demand, "" when it may stay; whether a fresh
    server is the point, so that stopping this one will not do)."""
    hours = config.max_instance_hours
    if down:
        return "an operator asked for it (ollama-exoscale down)", False
    if over_budget:
        return f"the daily GPU budget of {config.daily_gpu_hours:g} h is used up", False
    if hours and gputime.instance_seconds(state.gpu_record, now) >= hours * 3600:
        return f"it has run for PROXY_MAX_INSTANCE_HOURS={hours:g} h", True
    return "", False
