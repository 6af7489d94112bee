"""What the lifecycle asks of a provisioner: bring a GPU server up, tear it down, say what exists.

A provisioner does the slow, blocking work; the lifecycle calls it only from its background
operation thread, never from a request thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

# Called with a short sentence for a person, e.g. "creating compute instance (2/4)".
Progress = Callable[[str], None]

# The first GPU server's name: the stack's resource name of today's one server, so a stack
# made before fleets keeps its instance. The next ones are gpu-1, gpu-2, ... (stable names).
PRIMARY = "gpu"


def server_name(index: int) -> str:
    """The name of the fleet's server number `index` (0: the primary)."""
    return PRIMARY if index == 0 else f"{PRIMARY}-{index}"


def server_index(name: str) -> int:
    """The inverse of server_name (ValueError for a name it does not make)."""
    if name == PRIMARY:
        return 0
    prefix, _, number = name.rpartition("-")
    if prefix != PRIMARY or not number.isdigit() or number.startswith("0"):
        raise ValueError(f"not a server name: {name!r} (expected {PRIMARY} or {PRIMARY}-N)")
    return int(number)


@dataclass(frozen=True)
class Endpoint:
    """Where the upstream Ollama answers and how to reach it."""

    url: str  # base URL, e.g. "http://127.0.0.1:11435" or "https://203.0.113.7:11434"
    token: str | None = None  # bearer token the upstream's front requires; never shown
    ca_cert: str | None = None  # PEM of the upstream's self-signed certificate, pinned
    server_hostname: str | None = None  # the name that certificate is issued to
    instance_status: str = "running"  # running | stopped | absent


class ProvisionError(Exception):
    """Bringing up or tearing down failed; the message is a sentence for a person, no secrets."""


class Provisioner(Protocol):
    """One provisioner serves the whole fleet: `server` names which GPU server a call is about
    (PRIMARY, today's one server, by default). Calls about different servers may come from
    different operation threads at once; a provisioner serializes what must be (one stack)."""

    name: str
    typical_cold_start: float  # seconds, used for Retry-After before any cold start is measured
    can_bake: bool  # whether `bake` and `resume_after_bake` exist (templates: exoscale only)

    def observe(self) -> Endpoint | None:
        """What exists now of the primary (None: nothing). Cheap enough to call on every lease
        take-over."""

    def observe_fleet(self) -> dict[str, Endpoint]:
        """Every server that exists now (running or stopped), by name."""

    def cold_start_mode(self, stopped: bool) -> str:
        """What the next cold start does, by name (README's per-mode table): starting the
        `stopped` server again, or making one; cold starts are estimated within a mode."""

    def bring_up(self, progress: Progress, server: str = PRIMARY) -> Endpoint:
        """Make the server exist (adopting one that already does) and return its endpoint.

        Idempotent: a second call after a crash finishes or adopts, never creates a second server.
        Raises ProvisionError with a reason a person can act on.
        """

    def tear_down(self, progress: Progress, server: str = PRIMARY) -> None:
        """Remove the server. Idempotent: nothing to remove is success."""

    def stop(self, progress: Progress, server: str = PRIMARY) -> None:
        """Stop the server but keep it (disk, models) for a faster bring-up; idempotent.

        A provisioner with nothing worth keeping may simply tear down.
        """

    def bake(self, progress: Progress) -> Any:
        """(can_bake only) Make a private template of the ready server, leaving it stopped;
        returns the template (proxy/provision/bake.py `Template`)."""

    def resume_after_bake(self, progress: Progress) -> None:
        """(can_bake only) Start the server a bake stopped."""
