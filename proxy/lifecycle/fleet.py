"""How many GPU servers the fleet needs, and the one step toward it: a pure function.

The primary server (`gpu`) keeps the single-server lifecycle of proxy/lifecycle/decide.py: it
comes up on the first demand and goes last, exactly as before fleets. The servers beyond it
(`gpu-1`, `gpu-2`, …) come and go here, one step at a time: a start when the fleet has stayed
above its target for PROXY_SCALE_UP_AFTER seconds, a drain when it has stayed below for
PROXY_IDLE_TIMEOUT. Nothing here starts a thread or reads the store: it is tested as a table
(tests/unit/lifecycle/test_fleet.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from proxy.config import Config
from proxy.lifecycle.state import Phase
from proxy.provision.base import PRIMARY, server_index, server_name

COMING = (Phase.PROVISIONING, Phase.STARTING)


@dataclass(frozen=True)
class Member:
    """What a scaling step needs of one server: its name, phase and requests in flight."""

    name: str
    phase: Phase
    inflight: int = 0
    draining: bool = False  # taken out of rotation: ends its requests, then goes


@dataclass(frozen=True)
class FleetMemory:
    """Since when (monotonic seconds) the fleet has been above or below what it needs."""

    above_since: float | None = None
    below_since: float | None = None


@dataclass(frozen=True)
class Hold:
    """No step now."""


@dataclass(frozen=True)
class StartServer:
    name: str


@dataclass(frozen=True)
class DrainServer:
    """Take `name` out of rotation, let its requests end, then remove (or stop) it."""

    name: str
    reason: str


Step = Hold | StartServer | DrainServer


def needed(inflight: int, config: Config, warm: bool = False) -> int:
    """ceil(in flight / target), within PROXY_MIN_SERVERS and PROXY_MAX_SERVERS; a warm window
    keeps at least one."""
    floor = max(config.min_servers, 1 if warm else 0)
    return min(max(math.ceil(inflight / config.target_inflight), floor), config.max_servers)


def step(members: list[Member], inflight: int, now: float, config: Config,
         memory: FleetMemory, *, warm: bool = False, may_start: bool = True,
         asked: bool = False) -> tuple[Step, FleetMemory]:
    """The fleet's next step, given its servers (the primary among them) and the requests in
    flight over every worker and host. `may_start`: no budget or operator's `down` forbids a
    new server; `asked`: an operator's `up` wants one more now. `now` is a clock that is never
    stepped."""
    if config.max_servers <= 1:
        return Hold(), FleetMemory()  # one server: decide.py alone, as before fleets
    serving = [m for m in members if m.phase == Phase.READY and not m.draining]
    coming = [m for m in members if m.phase in COMING]
    existing = [m for m in members if m.phase != Phase.IDLE]  # draining ones hold a place too
    need = needed(inflight, config, warm)
    # Above: more needed than serve or come, with one serving (the first start is the primary's).
    above = (bool(serving) and not coming and need > len(serving) and may_start
             and len(existing) < config.max_servers)
    memory = replace(memory, above_since=_since(memory.above_since, above, now))
    room = bool(serving) and not coming and may_start and len(existing) < config.max_servers
    if asked and room:
        return StartServer(_free_name(members, config)), replace(memory, above_since=None)
    if above and now - memory.above_since >= config.scale_up_after:
        return StartServer(_free_name(members, config)), replace(memory, above_since=None)
    # Below: more serve than needed, counting the primary as needed while it serves (it goes
    # last, by decide.py's idle rule, once no other server is left).
    extras = [m for m in serving if m.name != PRIMARY]
    primary_serving = any(m.name == PRIMARY for m in serving)
    below = bool(extras) and not coming and len(serving) > max(need, int(primary_serving))
    memory = replace(memory, below_since=_since(memory.below_since, below, now))
    if below and now - memory.below_since >= config.idle_timeout:
        newest = max(extras, key=lambda m: server_index(m.name))
        reason = f"the fleet needs {need} of its {len(serving)} servers"
        return DrainServer(newest.name, reason), replace(memory, below_since=None)
    return Hold(), memory


def pick(members: list[Member], own: dict[str, int]) -> str | None:
    """The ready server with the fewest requests in flight (the store's count plus this
    worker's own, not yet reported), the primary first among equals; None when none serves."""
    serving = [m for m in members if m.phase == Phase.READY and not m.draining]
    if not serving:
        return None
    best = min(serving, key=lambda m: (m.inflight + own.get(m.name, 0), server_index(m.name)))
    return best.name


def _since(since: float | None, holds: bool, now: float) -> float | None:
    if not holds:
        return None
    return now if since is None else since


def _free_name(members: list[Member], config: Config) -> str:
    """A stopped server's name (it starts again, its disk kept), else the lowest name not in
    use (stable names: gpu-1 comes back as gpu-1)."""
    stopped = [m.name for m in members if m.phase == Phase.IDLE and m.name != PRIMARY]
    if stopped:
        return min(stopped, key=server_index)
    taken = {m.name for m in members}
    return next(server_name(i) for i in range(1, config.max_servers + len(taken) + 1)
                if server_name(i) not in taken)
