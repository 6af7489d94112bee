"""The shared lifecycle document as a type: what the reconciler writes and every worker reads.

Stored as the same JSON as before it had a type (a flat object of these keys), so a store
written by an earlier version loads, and keys this version does not know are kept as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from proxy.lifecycle.phase import Phase
from proxy.lifecycle.servers import Server, servers_from_doc, servers_to_doc, typed
from proxy.provision.base import Endpoint
from proxy.store.base import StoreError


@dataclass(frozen=True)
class State:
    phase: Phase = Phase.IDLE
    phase_since: float = 0.0
    detail: str = ""  # the latest progress sentence
    steps: tuple[dict[str, Any], ...] = ()  # this operation's progress: {at, phase, text}
    endpoint: Endpoint | None = None
    instance_status: str = "absent"  # of a server without an endpoint: absent or stopped
    last_error: str | None = None
    retry_at: float = 0.0  # while in error: when demand may try again
    failures: int = 0  # failed bring-ups in a row (the back-off doubles with each)
    teardown_pending: bool = False  # a removal failed and is tried again
    removal: str = ""  # while destroying: "destroy" or "stop"
    removal_reason: str = ""  # while destroying: "idle", or why it goes under demand
    provisioning_started_at: float = 0.0
    cold_mode: str = ""  # what the running cold start does (Provisioner.cold_start_mode)
    ready_since: float = 0.0
    upstream_version: str | None = None
    marks: dict[str, float] = field(default_factory=dict)  # when each cold-start stage ended
    server_stages: dict[str, float] = field(default_factory=dict)  # the server's own seconds
    server_spans: dict[str, list[float]] = field(default_factory=dict)  # [start, end] of each
    cold_starts: tuple[float, ...] = ()  # the last cold starts' seconds
    timelines: tuple[dict[str, Any], ...] = ()  # each cold start's seconds by stage
    instance_since: float = 0.0  # when the current GPU server was asked for; 0: none
    gpu_days: dict[str, float] = field(default_factory=dict)  # GPU seconds of servers gone
    gpu_seconds: float = 0.0  # GPU seconds of servers gone, in all
    demand_cutoff: float = 0.0  # demand up to this time has been answered (or set aside)
    down_handled: float = 0.0  # the last operator's `down` acted on
    warm_off_until: float = 0.0  # a `down` inside a warm window turns it off until its end
    reports_pruned: float = 0.0
    bake_handled: float = 0.0  # the last operator's `bake` acted on (done, failed or dropped)
    bake_models: bool = False  # while baking: the models go into the template
    bake_serve: bool = False  # while baking: serve again afterwards (else go idle)
    bake_template: str = ""  # the template the last bake made
    bake_error: str | None = None  # why the last bake failed
    servers: dict[str, Server] = field(default_factory=dict)  # the fleet beyond this, the primary
    fleet_error: str | None = None  # why the last fleet server beyond the primary failed
    up_handled: float = 0.0  # the last operator's `up` (one more server) acted on
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer version, kept

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> State:
        """StoreError for a document this version cannot read (a phase it does not know)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        # A null stood for the default: no endpoint, no error, "absent", no GPU days.
        values = {key: value for key, value in doc.items() if key in known and value is not None}
        try:
            typed(values)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"the lifecycle document is not one this version reads: {exc}"
                             ) from None
        for name in ("steps", "cold_starts", "timelines"):
            if name in values:
                values[name] = tuple(values[name])
        values["servers"] = servers_from_doc(values.get("servers"))
        return cls(**values, extra={k: v for k, v in doc.items() if k not in known})

    def to_doc(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        doc["phase"] = self.phase.value
        doc["endpoint"] = asdict(self.endpoint) if self.endpoint else None
        for name in ("steps", "cold_starts", "timelines"):
            doc[name] = list(doc[name])
        doc["servers"] = servers_to_doc(self.servers)
        return {**self.extra, **doc}

    @property
    def gpu_record(self) -> dict[str, Any]:
        """The GPU-time fields, as proxy.lifecycle.gputime reads them."""
        return {"instance_since": self.instance_since, "gpu_days": self.gpu_days,
                "gpu_seconds": self.gpu_seconds,
                "fleet_since": [s.instance_since for s in self.servers.values()
                                if s.instance_since]}
