"""What a request sees of the lifecycle: the shared state as of the last sync, and the demand
the live workers report. A worker replaces its snapshot whole on each sync; readers never lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.lifecycle.decide import Demand
from proxy.lifecycle.state import Phase, State
from proxy.store.base import WorkerReport


@dataclass(frozen=True)
class Snapshot:
    state: State = field(default_factory=State)
    demand: Demand = field(default_factory=Demand)  # summed over live workers
    reconciler: str = ""  # the lease holder (host:pid:id) as last seen; "" when none is known

    @property
    def serving(self) -> bool:
        """Requests can be forwarded: ready, with an upstream to forward to."""
        return self.state.phase == Phase.READY and self.state.endpoint is not None

    @classmethod
    def build(cls, state: State, reports: list[WorkerReport], now: float, reconciler: str = ""
              ) -> Snapshot:
        return cls(state, Demand.of(reports, now), reconciler)
