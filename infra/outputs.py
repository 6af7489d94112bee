"""What the Pulumi program exports, read back: the stack's outputs as typed values.

Today's outputs (`remote_url`, `instance_id`, ...) describe one server: the primary `gpu` when
it is declared, else the first. `servers` maps each server's name to how to reach it; a stack
last updated before fleets has no such map, and its one server is the primary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.checks import PRIMARY, server_index
from infra.errors import UpdateFailed

OUTPUT_NAMES = (
    "remote_url", "public_ip", "instance_id", "token", "tls_certificate", "tls_server_name",
)
SERVER_OUTPUT_NAMES = ("remote_url", "public_ip", "instance_id")


@dataclass(frozen=True)
class ServerOutputs:
    """One server of the stack (no secret: the token and the certificate are shared)."""

    remote_url: str
    public_ip: str
    instance_id: str
    instance_state: str = "running"  # or "stopped"

    @classmethod
    def from_outputs(cls, name: str, outputs: Any) -> ServerOutputs:
        if not isinstance(outputs, Mapping):
            raise UpdateFailed(f"the Pulumi program's `servers` output for {name} is not a map; "
                               "check infra/program.py")
        missing = [key for key in SERVER_OUTPUT_NAMES if not outputs.get(key)]
        if missing:
            raise UpdateFailed(f"the Pulumi program did not export {', '.join(missing)} of "
                               f"server {name}; check infra/program.py")
        return cls(*(str(outputs[key]) for key in SERVER_OUTPUT_NAMES),
                   instance_state=str(outputs.get("instance_state") or "running"))


@dataclass(frozen=True)
class StackOutputs:
    """What the program exports about the GPU servers; the token is never shown.

    The top-level fields describe the primary when it exists, else the first server."""

    remote_url: str
    public_ip: str
    instance_id: str
    token: str = field(repr=False)
    tls_certificate: str = field(repr=False)
    tls_server_name: str
    instance_state: str = "running"  # or "stopped"
    servers: dict[str, ServerOutputs] = field(default_factory=dict, hash=False)

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, Any]) -> StackOutputs:
        missing = [name for name in OUTPUT_NAMES if not outputs.get(name)]
        if missing:
            raise UpdateFailed(
                f"the Pulumi program did not export {', '.join(missing)}; check infra/program.py"
            )
        state = str(outputs.get("instance_state") or "running")  # stacks made before it
        top = {name: str(outputs[name]) for name in OUTPUT_NAMES}
        servers = outputs.get("servers")
        if servers is None:  # a stack last updated before fleets: its one server, the primary
            servers = {PRIMARY: {**top, "instance_state": state}}
        if not isinstance(servers, Mapping):
            raise UpdateFailed("the Pulumi program's `servers` output is not a map; "
                               "check infra/program.py")
        return cls(**top, instance_state=state, servers={
            str(name): ServerOutputs.from_outputs(str(name), servers[name])
            for name in sorted(servers, key=_by_index)  # the CLI prints maps sorted as text
        })

    def server(self, name: str) -> ServerOutputs | None:
        """One server's outputs; None when the stack has no server of that name."""
        return self.servers.get(name)


def _by_index(name: Any) -> tuple[int, str]:
    """gpu, gpu-1, gpu-2, ..., gpu-10 (a name of no server last)."""
    try:
        return server_index(str(name)), ""
    except ValueError:
        return 1 << 30, str(name)
