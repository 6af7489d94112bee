"""What a request sees of the lifecycle: the shared state as of the last sync, and the demand
the live workers report. A worker replaces its snapshot whole on each sync; readers never lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.lifecycle.decide import Demand
from proxy.lifecycle.fleet import Member
from proxy.lifecycle.state import Phase, State
from proxy.provision.base import PRIMARY, Endpoint
from proxy.store.base import WorkerReport


@dataclass(frozen=True)
class Snapshot:
    state: State = field(default_factory=State)
    demand: Demand = field(default_factory=Demand)  # summed over live workers
    reconciler: str = ""  # the lease holder (host:pid:id) as last seen; "" when none is known

    @property
    def serving(self) -> bool:
        """Requests can be forwarded: a server is ready, with an upstream to forward to."""
        primary = self.state.phase == Phase.READY and self.state.endpoint is not None
        return primary or any(s.serving for s in self.state.servers.values())

    @property
    def phase(self) -> str:
        """The fleet's phase, as people see it: `ready` while any server serves, else the
        primary's (with one server, simply its phase)."""
        return Phase.READY.value if self.serving else self.state.phase.value

    def members(self) -> list[Member]:
        """The fleet, the primary first: each server's phase and requests in flight."""
        counts = self.demand.by_server
        primary = Member(PRIMARY, self.state.phase if self.state.endpoint or
                         self.state.phase != Phase.READY else Phase.IDLE,
                         counts.get(PRIMARY, 0))
        return [primary] + [
            Member(name, server.phase if server.endpoint or server.phase != Phase.READY
                   else Phase.IDLE, counts.get(name, 0), server.phase == Phase.DESTROYING)
            for name, server in self.state.servers.items()
        ]

    def endpoint(self, name: str) -> Endpoint | None:
        """Where server `name` answers (None: it does not serve now)."""
        if name == PRIMARY:
            return self.state.endpoint
        server = self.state.servers.get(name)
        return server.endpoint if server is not None else None

    @classmethod
    def build(cls, state: State, reports: list[WorkerReport], now: float, reconciler: str = ""
              ) -> Snapshot:
        return cls(state, Demand.of(reports, now), reconciler)
