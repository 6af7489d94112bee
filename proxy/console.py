"""How the command line reads a proxy's /status for a person: a table, the estimate while
waiting, and why nothing will start the GPU server (so `wait` need not wait for nothing).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any


def format_status(status: dict[str, Any]) -> str:
    """A table for a person."""
    cold = status.get("cold_starts") or {}
    rows = [
        ("phase", status.get("provisioning_status")),
        ("detail", status.get("detail") or "-"),
        ("instance", status.get("instance_status")),
        ("upstream", status.get("remote_url") or "-"),
        ("provider", _provider(status)),
        ("model", status.get("ollama_model")),
        ("in flight", status.get("in_flight")),
        ("idle timeout", f"{status.get('idle_timeout'):g} s"),
        ("idle left", _seconds(status.get("idle_seconds_left"))),
        ("last activity", status.get("last_activity") or "-"),
        ("phase since", status.get("phase_since") or "-"),
        ("cold starts", f"{cold.get('count', 0)} (last {_seconds(cold.get('last'))}, "
                        f"median {_seconds(cold.get('median'))})"),
        ("last error", status.get("last_error") or "-"),
        ("GPU time", _gpu_time(status.get("gpu") or {})),
    ]
    servers = status.get("servers") or []
    if len(servers) > 1 or (status.get("fleet") or {}).get("max_servers", 1) > 1:
        rows += [(f"server {s.get('name')}", _server(s)) for s in servers]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _server(line: dict[str, Any]) -> str:
    """'ready, 3 in flight, since 12:00:05, 14 min GPU time (https://…)'."""
    upstream = f" ({line['upstream']})" if line.get("upstream") else ""
    return (f"{line.get('phase')}, {line.get('in_flight', 0)} in flight, since "
            f"{line.get('since') or '-'}, {_duration(line.get('gpu_seconds') or 0)} GPU time"
            f"{upstream}")


def _provider(status: dict[str, Any]) -> str:
    if status.get("provider") != "exoscale":
        return str(status.get("provider"))
    return f"exoscale ({status.get('instance_type')} in {status.get('zone')})"


def estimate(status: dict[str, Any]) -> str:
    """How long the rest should take, from the measured cold starts (or the provider's guess)."""
    cold = status.get("cold_starts") or {}
    basis = (f"the median of the last {cold['count']} cold starts is {cold['median']:.0f} s"
             if cold.get("count") else "no cold start measured yet")
    return f"about {status.get('expected_wait') or 1} s to go ({basis})"


def _gpu_time(gpu: dict[str, Any]) -> str:
    """'12 min this server, 3.4 h today (of 8 h), 10.0 h in all, ~ 4.10 EUR today'."""
    spent = {k: _duration(gpu.get(f"{k}_seconds") or 0) for k in ("instance", "today", "total")}
    limit = f" (of {gpu['daily_gpu_hours']:g} h)" if gpu.get("daily_gpu_hours") else ""
    text = (f"{spent['instance']} this server, {spent['today']} today{limit}, "
            f"{spent['total']} in all")
    if gpu.get("today_cost") is not None:
        text += f", ~ {gpu['today_cost']:.2f} {gpu.get('currency', '')} today"
    return text + (" — budget used up" if gpu.get("budget_used_up") else "")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f} s"


def nothing_coming(status: dict[str, Any], left: float, asked: bool) -> str:
    """Why nothing will start the GPU server in the `left` seconds, or "" when something may:
    it is not idle, a warm window starts it in time, or we asked for it ourselves."""
    if status.get("provisioning_status") != "idle":
        return ""
    warm = status.get("warm_windows") or {}
    if (status.get("gpu") or {}).get("budget_used_up"):
        return ("the daily GPU budget is used up (PROXY_DAILY_GPU_HOURS): no request starts "
                f"the GPU server before midnight ({warm.get('timezone') or 'UTC'})")
    if asked:
        return ""
    try:
        starts_in = datetime.fromisoformat(warm["next_start"]).timestamp() - time.time()
    except (KeyError, TypeError, ValueError):
        starts_in = None
    if starts_in is not None and starts_in <= left:
        return ""
    return ("the GPU server is idle and no request asks for it: `wait` only watches; ask for "
            "the server with `ollama-exoscale wait --up` (admin key) or send a request")
