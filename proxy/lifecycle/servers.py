"""The fleet's servers beyond the primary (`gpu-1`, `gpu-2`, …), as the shared document holds
them: under its `servers` key, one object each, written only by the lease holder.

The primary is the document itself (proxy/lifecycle/state.py), so a store and a stack of the
single-server versions read as a fleet of one. A server here goes provisioning → starting →
ready → destroying (out of rotation: draining, then removed) and leaves the map; a stopped one
(PROXY_IDLE_ACTION=stop) stays as idle with instance_status `stopped`, to be started again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from proxy.lifecycle.phase import Phase
from proxy.provision.base import Endpoint, server_index
from proxy.store.base import StoreError


@dataclass(frozen=True)
class Server:
    phase: Phase = Phase.PROVISIONING
    phase_since: float = 0.0
    detail: str = ""
    endpoint: Endpoint | None = None
    instance_status: str = "absent"  # of a server without an endpoint: absent or stopped
    instance_since: float = 0.0  # when it was asked for (billing may start then); 0: none
    ready_since: float = 0.0
    removal_reason: str = ""  # while destroying: why it goes
    last_error: str | None = None
    upstream_version: str | None = None

    @property
    def serving(self) -> bool:
        return self.phase == Phase.READY and self.endpoint is not None

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Server:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known and v is not None}
        try:
            return cls(**typed(values))
        except (TypeError, ValueError) as exc:
            raise StoreError(f"a fleet server in the lifecycle document is not one this "
                             f"version reads: {exc}") from None

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["phase"] = self.phase.value
        doc["endpoint"] = asdict(self.endpoint) if self.endpoint else None
        return doc

    def moved(self, phase: Phase, now: float, **changes: Any) -> Server:
        return replace(self, phase=phase, phase_since=now, **changes)


def typed(values: dict[str, Any]) -> dict[str, Any]:
    """A document's `phase` and `endpoint` as their types (TypeError or ValueError if they are
    not ones this version reads); the primary's and each fleet server's alike."""
    if "phase" in values:
        values["phase"] = Phase(values["phase"])
    if "endpoint" in values:
        values["endpoint"] = Endpoint(**values["endpoint"])
    return values


def servers_from_doc(raw: Any) -> dict[str, Server]:
    """The `servers` map of a document (absent: none), in name order."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise StoreError("the lifecycle document's `servers` is not an object")
    for name in raw:
        try:
            if server_index(name) == 0:
                raise ValueError("the primary is the document itself")
        except ValueError as exc:
            raise StoreError(f"the lifecycle document names a fleet server {name!r}: {exc}"
                             ) from None
    return {name: Server.from_doc(raw[name]) for name in sorted(raw, key=server_index)}


def servers_to_doc(servers: dict[str, Server]) -> dict[str, Any]:
    return {name: server.to_doc() for name, server in servers.items()}
