"""Two GPU servers through a real gunicorn with the `exoscale` provisioner: the fleet's
lifecycle over the real Automation API and program, the stand-in CLI on PATH, each simulated
instance the test Ollama behind its own TLS front. Load brings up `gpu-1` beside `gpu`; when
the load falls, `gpu-1` is removed by a `pulumi up` without it while a stream on `gpu` goes on."""

from __future__ import annotations

import json
import threading

import pytest
import requests

from tests.harness import wait_until
from tests.integration.test_exoscale_e2e import World

pytestmark = pytest.mark.slow
INTERVAL = 0.25  # seconds a token (the test Ollama's X-Fake-Interval, passed through)


@pytest.fixture
def world(tmp_path):
    made = World(tmp_path, PROXY_MAX_SERVERS="2", PROXY_TARGET_INFLIGHT="1",
                 PROXY_SCALE_UP_AFTER="1", PROXY_IDLE_TIMEOUT="3", PROXY_DRAIN_TIMEOUT="30")
    yield made
    made.stop_instances()


def stream(url: str, tokens: int, seen: list) -> None:
    body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": tokens}}
    with requests.post(url + "/api/generate", json=body, stream=True, timeout=120,
                       headers={"X-Fake-Interval": str(INTERVAL)}) as answer:
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    seen.append((answer.status_code, lines))


def servers(proxy) -> dict[str, str]:
    return {s["name"]: s["phase"] for s in proxy.status()["servers"]}


def test_a_second_server_comes_with_load_and_goes_while_the_first_keeps_streaming(world):
    with world.proxy() as proxy:
        requests.post(proxy.url + "/admin/up", timeout=10).raise_for_status()
        proxy.wait_phase("ready", timeout=90)
        (gpu_id,) = world.instances()
        seen: list = []
        short = threading.Thread(target=stream, args=(proxy.url, 40, seen))  # ~10 s
        long = threading.Thread(target=stream, args=(proxy.url, 400, seen))  # ~100 s
        long.start()
        short.start()

        # Two in flight on a target of one: gpu-1 is made by an update that keeps gpu.
        wait_until(lambda: servers(proxy).get("gpu-1") == "ready", 90, what="gpu-1 ready")
        assert len(world.instances()) == 2 and gpu_id in world.instances()
        short.join(60)
        # One in flight: gpu-1 is drained and removed, by an update without it (were the long
        # stream on gpu-1, its drain would wait for it, or cut it after PROXY_DRAIN_TIMEOUT).
        wait_until(lambda: "gpu-1" not in servers(proxy), 90, what="gpu-1 removed")
        assert long.is_alive(), "the long stream ended before gpu-1 went: lengthen it"
        assert list(world.instances()) == [gpu_id]  # gpu's instance untouched
        long.join(120)

        assert len(seen) == 2
        for status, lines in seen:
            assert status == 200 and lines[-1]["done"] is True, lines[-1:]  # none cut
        assert sorted(len(lines) for _, lines in seen) == [41, 401]
        assert servers(proxy) == {"gpu": "ready"} and list(world.instances()) == [gpu_id]
