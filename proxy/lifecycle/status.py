"""What the lifecycle tells people: the /status document and the 503's wording.

Both are read from a snapshot and the config, never computed in the HTTP layer: the phase a
client sees, a sentence for a person, Retry-After, GPU time and its cost, the warm windows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from proxy.config import Config
from proxy.lifecycle import gputime, schedule
from proxy.lifecycle.coldstart import median_timeline
from proxy.lifecycle.demand import Lifecycle
from proxy.lifecycle.snapshot import Snapshot

SERVICE = "ollama-exoscale"


@dataclass(frozen=True)
class Refusal:
    """Why a request gets 503 now, in a client's terms."""

    phase: str  # what the client sees: provisioning, starting, destroying, error, idle
    message: str  # a sentence for a person
    retry_after: int  # seconds
    code: str  # for OpenAI's clients: provisioning, provisioning_failed, budget_exhausted

    @property
    def provisioning(self) -> bool:
        """Whether a GPU server is on its way (no failure, no budget used up)."""
        return self.code == "provisioning"


def refusal(config: Config, lifecycle: Lifecycle, snapshot: Snapshot) -> Refusal:
    """The 503 for a request that needs the GPU server while `snapshot` is not ready."""
    retry_after = lifecycle.retry_after(snapshot)
    # A bring-up already under way runs on; the budget stops only new ones.
    if snapshot.state.phase in ("idle", "destroying") and lifecycle.budget_used_up(snapshot):
        return Refusal("idle", budget_message(config, snapshot), retry_after, "budget_exhausted")
    phase, message = explain(snapshot, retry_after)
    code = "provisioning_failed" if phase == "error" else "provisioning"
    return Refusal(phase, message, retry_after, code)


def status_document(config: Config, lifecycle: Lifecycle) -> dict[str, Any]:
    """What /status shows: never provisions, never counts as demand, holds no secret."""
    snapshot = lifecycle.snapshot()
    now = time.time()
    idle_left = None
    if snapshot.phase == "ready":
        if snapshot.demand.inflight:
            idle_left = config.idle_timeout
        else:
            idle_since = max(snapshot.demand.last_activity, snapshot.state.ready_since)
            # Never above the timeout: a clock stepped back puts idle_since in the future.
            idle_left = min(max(0, round(config.idle_timeout - (now - idle_since))),
                            round(config.idle_timeout))
    cold = snapshot.state.cold_starts
    return {
        "service": SERVICE,
        "provisioning_status": snapshot.phase,
        "detail": snapshot.state.detail,
        "steps": [{**step, "at": _iso(step["at"])} for step in snapshot.state.steps],
        "instance_status": snapshot.state.endpoint.instance_status if snapshot.state.endpoint
        else snapshot.state.instance_status,
        "remote_url": snapshot.state.endpoint.url if snapshot.state.endpoint else None,
        "zone": config.zone,
        "instance_type": config.instance_type,
        "ollama_model": ",".join(config.models),
        "idle_timeout": config.idle_timeout,
        "idle_action": config.idle_action,
        "provider": config.provisioner,
        "phase_since": _iso(snapshot.state.phase_since),
        "last_activity": _iso(snapshot.demand.last_activity),
        "in_flight": snapshot.demand.inflight,
        "idle_seconds_left": idle_left,
        "last_error": snapshot.state.last_error,
        "failures": snapshot.state.failures,
        "retry_at": _iso(snapshot.state.retry_at) if snapshot.state.phase == "error" else None,
        "retry_after": None if snapshot.phase == "ready" else lifecycle.retry_after(snapshot),
        # Unclamped, for a person (Retry-After stops at 60 s for the OpenAI SDKs).
        "expected_wait": None if snapshot.phase == "ready"
        else max(1, round(lifecycle.expected_wait(snapshot))),
        "cold_starts": {
            "count": len(cold),
            "last": cold[-1] if cold else None,
            "median": lifecycle.typical_cold_start(snapshot) if cold else None,
        },
        "cold_start_timeline": {
            "last": snapshot.state.timelines[-1] if snapshot.state.timelines else None,
            "median": median_timeline(snapshot.state.timelines),
        },
        "cold_start_estimate": lifecycle.cold_start_estimate(snapshot),
        "bake": bake_status(snapshot),
        "upstream_version": snapshot.state.upstream_version,
        "store_error": lifecycle.store_error,
        "reconciler": snapshot.reconciler,
        "gpu": gpu_usage(config, lifecycle, snapshot, now),
        "warm_windows": warm_windows(config, now),
        "servers": servers(config, snapshot, now),
        "fleet": {"max_servers": config.max_servers, "min_servers": config.min_servers,
                  "target_inflight": config.target_inflight,
                  "last_error": snapshot.state.fleet_error},
    }


def servers(config: Config, snapshot: Snapshot, now: float) -> list[dict[str, Any]]:
    """A line per GPU server: the primary (while it exists) and the fleet's others."""
    state, counts = snapshot.state, snapshot.demand.by_server
    lines = []
    if state.phase != "idle" or state.instance_status == "stopped":
        lines.append(_server_line(config, "gpu", state.phase, state.phase_since, state.endpoint,
                                  state.instance_since, counts.get("gpu", 0)
                                  if len(state.servers) else snapshot.demand.inflight,
                                  state.detail, now))
    for name, server in state.servers.items():
        lines.append(_server_line(config, name, server.phase, server.phase_since,
                                  server.endpoint, server.instance_since, counts.get(name, 0),
                                  server.detail, now))
    return lines


def _server_line(config: Config, name, phase, since, endpoint, instance_since, inflight,
                 detail, now) -> dict[str, Any]:
    seconds = round(max(0.0, now - instance_since)) if instance_since else 0
    return {
        "name": name,
        "phase": str(phase),
        "since": _iso(since),
        "in_flight": inflight,
        "gpu_seconds": seconds,  # of this server's current run
        "gpu_cost": round(seconds / 3600 * config.hourly_price, 2) if config.hourly_price
        else None,
        "upstream": endpoint.url if endpoint else None,  # the URL only: no token
        "detail": detail,
    }


def bake_status(snapshot: Snapshot) -> dict[str, Any]:
    """The last `bake`: asked for when (`requested_at`, the request it answers), whether it
    runs, the template it made or why it failed. `pending`: asked for, not taken up yet."""
    state = snapshot.state
    return {
        "running": state.phase == "baking",
        "pending": snapshot.demand.bake_at > state.bake_handled,
        "requested_at": state.bake_handled or None,
        "models": state.bake_models,
        "template": state.bake_template or None,
        "error": state.bake_error,
    }


def gpu_usage(config: Config, lifecycle: Lifecycle, snapshot: Snapshot, now: float
              ) -> dict[str, Any]:
    """GPU time of the current server, today and in all; the cost estimate; the limits."""
    record = snapshot.state.gpu_record
    seconds = {
        "instance_seconds": round(gputime.instance_seconds(record, now)),
        "today_seconds": round(gputime.today_seconds(record, now, config.tz)),
        "total_seconds": round(gputime.total_seconds(record, now)),
    }
    price = config.hourly_price
    cost = {
        key.replace("_seconds", "_cost"): round(value / 3600 * price, 2) if price else None
        for key, value in seconds.items()
    }
    return {
        **seconds, **cost,
        "hourly_price": price or None,
        "currency": config.currency,
        "instance_since": _iso(snapshot.state.instance_since),
        "max_instance_hours": config.max_instance_hours or None,
        "daily_gpu_hours": config.daily_gpu_hours or None,
        "budget_used_up": lifecycle.budget_used_up(snapshot),
    }


def warm_windows(config: Config, now: float) -> dict[str, Any]:
    local = datetime.fromtimestamp(now, config.tz)
    upcoming = schedule.next_start(config.warm_windows, local)
    return {
        "windows": [str(w) for w in config.warm_windows],
        "timezone": config.timezone,
        "warm_now": schedule.is_warm(config.warm_windows, local),
        "next_start": upcoming.isoformat(timespec="minutes") if upcoming else None,
    }


def budget_message(config: Config, snapshot: Snapshot) -> str:
    used = gputime.today_seconds(snapshot.state.gpu_record, time.time(), config.tz) / 3600
    return (
        f"The daily GPU budget of {config.daily_gpu_hours:g} h is used up ({used:.1f} h today, "
        f"PROXY_DAILY_GPU_HOURS); the GPU server starts again for requests after midnight "
        f"({config.timezone})."
    )


def explain(snapshot: Snapshot, retry_after: int) -> tuple[str, str]:
    """(phase a client sees, a sentence for a person) while not ready."""
    phase = snapshot.state.phase
    if phase == "error" and snapshot.state.retry_at <= time.time():
        phase = "provisioning"  # this request starts the retry
    detail = f" ({snapshot.state.detail})" if snapshot.state.detail else ""
    if phase == "error":
        return phase, (
            f"Starting the GPU server failed: {snapshot.state.last_error}. It is tried again on a "
            f"request after {retry_after} s."
        )
    if phase == "starting":
        return phase, (
            f"The GPU server is up and Ollama is getting ready{detail}. Retry in {retry_after} s."
        )
    if phase == "destroying":
        reason = snapshot.state.removal_reason
        why = reason if reason and reason != "idle" else "after idle time"
        return phase, (
            f"The GPU server is being removed ({why}); it will start again for this "
            f"request. Retry in {retry_after} s."
        )
    if phase == "baking":
        return phase, (
            f"The GPU server is baking a template (ollama-exoscale bake): it is stopped and "
            f"snapshotted, and serves again when the bake ends{detail}. Retry in {retry_after} s."
        )
    if phase == "ready":  # became ready between the check and now
        return phase, "The GPU server is ready. Retry now."
    return "provisioning", f"The GPU server is starting{detail}. Retry in {retry_after} s."


def _iso(timestamp: float) -> str | None:
    if not timestamp:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
