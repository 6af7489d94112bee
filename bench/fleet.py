"""Issue 17's scenario: one, two and three GPU servers behind the proxy, each an upstream that
generates at most PARALLEL answers at once (OLLAMA_NUM_PARALLEL, the rest queued, as Ollama
does) and THINK seconds an answer: requests/s should grow with the servers, the proxy's own
added latency (one client, against one upstream direct) should not.

Each fleet is a proxy of its own with PROXY_MIN_SERVERS = PROXY_MAX_SERVERS = n, so all n are
up before any figure is taken.
"""

from __future__ import annotations

import json
from typing import Any

import requests

from . import targets, wrk
from .procs import wait_until

PARALLEL = 2  # answers each upstream generates at once
THINK = 0.05  # seconds each answer takes (X-Fake-Think): a server serves PARALLEL / THINK a second
SIZES = (1, 2, 3)
CLIENTS = 24  # enough to keep three servers' six slots busy


def run(ctx) -> dict:
    """Requests/s at CLIENTS clients and p50 at one, for each fleet size, with direct's."""
    body = ctx.workdir / "fleet.json"
    body.write_text(json.dumps({"model": "llama3.2", "prompt": "bench", "stream": False}))
    header = f"X-Fake-Think: {THINK}"
    rows: list[dict[str, Any]] = []
    for size in SIZES:
        settings = {"PROXY_MIN_SERVERS": str(size), "PROXY_MAX_SERVERS": str(size),
                    "PROXY_TARGET_INFLIGHT": str(PARALLEL)}
        ours, direct = targets.start_ours(ctx.procs, ctx.workdir, f"fleet-{size}", settings,
                                          upstream_flags=("--num-parallel", str(PARALLEL)))
        state = ctx.workdir / f"fleet-{size}"
        for index in range(1, size):  # stopped with the rest, should the run be cut short
            ctx.procs.adopt_pid_file(state / f"local-upstream-gpu-{index}.json")
        wait_until(lambda t=ours, n=size: _ready(t) == n, 120, f"{size} ready servers")
        if size == 1:
            rows.append(_row(ctx, "direct", direct, 1, body, header))
        for clients in (1, CLIENTS):
            rows.append(_row(ctx, "ours", ours, size, body, header, clients))
        ctx.procs.stop(f"fleet-{size}")
        for pid_file in state.glob("local-upstream*.json"):  # the next fleet gets the cores
            ctx.procs.stop_adopted(pid_file)
    return {"rows": rows, "parallel": PARALLEL, "think_s": THINK, "clients": CLIENTS}


def _row(ctx, name, target, servers, body, header, clients=1) -> dict:
    wrk.run(target.url + "/api/generate", clients, ctx.plan.warmup_seconds, body, header)
    started = ctx.meter.start()
    result = wrk.run(target.url + "/api/generate", clients, ctx.plan.wrk_seconds, body, header)
    return {"target": name, "servers": servers, "clients": clients, **result.as_dict(),
            **ctx.meter.stop(started).as_dict()}


def _ready(target) -> int:
    try:
        lines = requests.get(target.url + "/status", timeout=5).json().get("servers") or []
    except (requests.RequestException, ValueError):
        return 0
    return sum(1 for line in lines if line.get("phase") == "ready")
