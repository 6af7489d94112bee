"""More than one GPU server, through a real gunicorn with the `local` provisioner: server i is
the fake Ollama on PROXY_LOCAL_ADDR's port + i, each generating at most OLLAMA_NUM_PARALLEL
answers at once (the rest queue, as Ollama's do). A load ramp takes the fleet from zero to
three servers and back; no stream is cut, never more than PROXY_MAX_SERVERS start."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.harness import Proxy, free_port, upstream_env, wait_until

pytestmark = pytest.mark.slow

PARALLEL = 2  # answers each server generates at once


def fleet_env(tmp_path, **env) -> dict:
    base = free_port()
    while any(_taken(base + i) for i in (1, 2, 3)):  # server i listens on base + i
        base = free_port()
    return upstream_env(
        tmp_path, "--chunk-interval", "0.1",
        PROXY_LOCAL_ADDR=f"127.0.0.1:{base}", OLLAMA_NUM_PARALLEL=str(PARALLEL),
        PROXY_MAX_SERVERS="3", PROXY_TARGET_INFLIGHT=str(PARALLEL), PROXY_SCALE_UP_AFTER="1",
        PROXY_IDLE_TIMEOUT="3", PROXY_WORKERS="2", **env,
    )


def _taken(port: int) -> bool:
    import socket
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stream(url: str, tokens: int, seen: list) -> None:
    """One streamed generation of `tokens` tokens; its lines (the last must say done)."""
    body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": tokens}}
    with requests.post(url + "/api/generate", json=body, stream=True, timeout=60) as answer:
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    seen.append((answer.status_code, lines))


def generated(proxy: Proxy) -> dict[str, int]:
    """Generate requests each server's Ollama has answered, by server name (as a worker that
    has synced since the last server came up sees them)."""
    upstreams: dict = {}

    def synced() -> bool:
        upstreams.update({s["name"]: s["upstream"] for s in proxy.status()["servers"]})
        return len(upstreams) == 3 and all(upstreams.values())

    wait_until(synced, 5, what="every worker to see the three servers")
    return {name: requests.get(url + "/__stats", timeout=5).json()["requests"]
            .get("POST /api/generate", 0) for name, url in upstreams.items()}


def servers(proxy: Proxy) -> dict[str, str]:
    return {s["name"]: s["phase"] for s in proxy.status()["servers"]}


def test_a_load_ramp_takes_the_fleet_from_zero_to_three_servers_and_back(tmp_path):
    with Proxy(tmp_path, **fleet_env(tmp_path)) as proxy:
        requests.post(proxy.url + "/admin/up", timeout=10).raise_for_status()
        proxy.wait_phase("ready")
        assert servers(proxy) == {"gpu": "ready"}

        seen: list = []
        streams = [threading.Thread(target=stream, args=(proxy.url, 150, seen))
                   for _ in range(3 * PARALLEL)]
        for thread in streams:
            thread.start()
            time.sleep(0.1)
        # Six in flight on a target of two each: a second server, then a third, one at a time.
        wait_until(lambda: servers(proxy).get("gpu-1") == "ready", 40, what="gpu-1 ready")
        wait_until(lambda: servers(proxy).get("gpu-2") == "ready", 40, what="gpu-2 ready")
        # New requests go to the least loaded servers: the new ones get them (the first six
        # stay on the primary, queued by its Ollama: a forwarded request stays where it went).
        # (A worker a tick behind may not see the newest server yet: both new ones get some.)
        before = generated(proxy)
        more = [threading.Thread(target=stream, args=(proxy.url, 20, seen)) for _ in range(4)]
        for thread in more:
            thread.start()
        for thread in more:
            thread.join(60)
        after = generated(proxy)
        assert after["gpu"] == before["gpu"], (before, after)
        assert after["gpu-1"] > 0 and after["gpu-2"] > 0, after
        assert after["gpu-1"] + after["gpu-2"] == 4, after
        for thread in streams:
            thread.join(120)
        assert len(seen) == 3 * PARALLEL + 4
        for status, lines in seen:
            assert status == 200 and lines[-1]["done"] is True, lines[-1:]  # none cut

        # Idle: the newest goes first, each after an idle timeout; the primary last.
        wait_until(lambda: "gpu-2" not in servers(proxy), 60, what="gpu-2 removed")
        assert "gpu-1" in servers(proxy) or "gpu" in servers(proxy)
        wait_until(lambda: servers(proxy) == {}, 60, what="every server removed")
        proxy.wait_phase("idle")  # on every worker (one may be a tick behind)
        starts = (tmp_path / "starts").read_text().splitlines()
        assert len(starts) == 3  # never more than PROXY_MAX_SERVERS started
