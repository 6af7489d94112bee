"""What a worker tells clients of the wait: Retry-After, the expected wait, the next cold
start's stages, and whether the daily budget is used up; read from a snapshot, never the store.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from proxy.config import Config
from proxy.lifecycle import gputime
from proxy.lifecycle.coldstart import cold_start_estimate
from proxy.lifecycle.snapshot import Snapshot
from proxy.provision.base import Provisioner

RETRY_AFTER_MAX = 60  # the OpenAI SDKs honour Retry-After only up to 60 s
# Once a cold start is overdue, clients are told to wait at least this long: the OpenAI SDKs
# retry only twice, and two retries of 1 s would be spent within a second.
RETRY_AFTER_OVERDUE = 10


class Estimates:
    """The Lifecycle's estimates (it provides these attributes)."""

    config: Config
    provisioner: Provisioner
    _snapshot: Snapshot

    def budget_used_up(self, snapshot: Snapshot | None = None) -> bool:
        """No new GPU server today: PROXY_DAILY_GPU_HOURS is used up."""
        snapshot = snapshot or self._snapshot
        return gputime.over_budget(snapshot.state.gpu_record, time.time(), self.config.tz,
                                   self.config.daily_gpu_hours)

    def retry_after(self, snapshot: Snapshot | None = None) -> int:
        """Whole seconds until it is worth asking again (1 to 60, what the OpenAI SDKs honour);
        at least RETRY_AFTER_OVERDUE while a bring-up runs past its expected end."""
        snapshot = snapshot or self._snapshot
        wait = self.expected_wait(snapshot)
        if snapshot.state.phase in ("provisioning", "starting") and wait <= 0:
            return RETRY_AFTER_OVERDUE
        return _clamp(wait)

    def expected_wait(self, snapshot: Snapshot | None = None) -> float:
        """Seconds until ready (or a retry is allowed), from the phase and past cold starts."""
        snapshot = snapshot or self._snapshot
        now = time.time()
        if snapshot.state.phase == "idle" and self.budget_used_up(snapshot):
            return gputime.next_midnight(now, self.config.tz) - now
        if snapshot.state.phase == "error":
            return snapshot.state.retry_at - now
        typical = self.typical_cold_start(snapshot)
        if snapshot.state.phase in ("provisioning", "starting"):
            return typical - (now - snapshot.state.provisioning_started_at)
        return typical

    def cold_start_estimate(self, snapshot: Snapshot | None = None) -> dict[str, Any]:
        """The next cold start's stages, from the recorded ones of the same mode (a stopped
        server starts again; otherwise one is made)."""
        snapshot = snapshot or self._snapshot
        stopped = snapshot.state.endpoint is None and snapshot.state.instance_status == "stopped"
        mode = self.provisioner.cold_start_mode(stopped)
        return cold_start_estimate(snapshot.state.timelines, mode)

    def typical_cold_start(self, snapshot: Snapshot | None = None) -> float:
        snapshot = snapshot or self._snapshot
        if snapshot.state.cold_starts:
            return statistics.median(snapshot.state.cold_starts)
        return self.provisioner.typical_cold_start


def _clamp(seconds: float) -> int:
    return int(min(max(1, round(seconds)), RETRY_AFTER_MAX))
