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
    name: str
    typical_cold_start: float  # seconds, used for Retry-After before any cold start is measured
    can_bake: bool  # whether `bake` and `resume_after_bake` exist (templates: exoscale only)

    def observe(self) -> Endpoint | None:
        """What exists now (None: nothing). Cheap enough to call on every lease take-over."""

    def cold_start_mode(self, stopped: bool) -> str:
        """What the next cold start does, by name (README's per-mode table): starting the
        `stopped` server again, or making one; cold starts are estimated within a mode."""

    def bring_up(self, progress: Progress) -> Endpoint:
        """Make the server exist (adopting one that already does) and return its endpoint.

        Idempotent: a second call after a crash finishes or adopts, never creates a second server.
        Raises ProvisionError with a reason a person can act on.
        """

    def tear_down(self, progress: Progress) -> None:
        """Remove the server. Idempotent: nothing to remove is success."""

    def stop(self, progress: Progress) -> None:
        """Stop the server but keep it (disk, models) for a faster bring-up; idempotent.

        A provisioner with nothing worth keeping may simply tear down.
        """

    def bake(self, progress: Progress) -> Any:
        """(can_bake only) Make a private template of the ready server, leaving it stopped;
        returns the template (proxy/provision/bake.py `Template`)."""

    def resume_after_bake(self, progress: Progress) -> None:
        """(can_bake only) Start the server a bake stopped."""
