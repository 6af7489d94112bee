"""Nothing blocks a worker's event loop, through a real gunicorn whose heartbeat timeout is 2 s:
a store that hangs and a bring-up that takes long run in background threads, so requests are
answered meanwhile and the arbiter never takes a worker for hung; held requests
(`Prefer: wait`) are coroutines, PROXY_MAX_HELD of them at most."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.harness import Proxy, upstream_env, wait_until

pytestmark = pytest.mark.slow


def answered_meanwhile(proxy: Proxy, seconds: float) -> list[int]:
    """Statuses of requests sent for `seconds`, each given 2 s (the heartbeat timeout)."""
    statuses = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for method, path in (("GET", "/status"), ("POST", "/api/show"), ("GET", "/api/tags")):
            statuses.append(requests.request(method, proxy.url + path, json={"model": "x"},
                                             timeout=2).status_code)
        time.sleep(0.2)
    return statuses


def test_a_hanging_store_delays_no_request_and_no_heartbeat(tmp_path):
    env = upstream_env(tmp_path, PROXY_WORKER_TIMEOUT=2, PROXY_IDLE_TIMEOUT=600)
    with Proxy(tmp_path, **env) as proxy:
        requests.post(proxy.url + "/admin/up", timeout=5)
        proxy.wait_phase("ready")
        workers = set(proxy.workers())
        blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # each store call now waits its 10 s busy timeout
        try:
            statuses = answered_meanwhile(proxy, 8)  # four heartbeat timeouts
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert set(statuses) <= {200, 404}  # answered from memory (404: the model "x")
        assert set(proxy.workers()) == workers  # none killed and replaced
        assert "WORKER TIMEOUT" not in proxy.logs()


def test_a_long_bring_up_delays_no_request_and_no_heartbeat(tmp_path):
    env = upstream_env(tmp_path, "--startup-delay", "8", PROXY_WORKER_TIMEOUT=2)
    with Proxy(tmp_path, **env) as proxy:
        workers = set(proxy.workers())
        assert requests.post(proxy.url + "/api/chat", json={}, timeout=2).status_code == 503
        proxy.wait_phase("provisioning")
        statuses = answered_meanwhile(proxy, 6)
        assert set(statuses) <= {200, 503}
        assert proxy.status()["provisioning_status"] in ("provisioning", "starting")
        assert set(proxy.workers()) == workers
        assert "WORKER TIMEOUT" not in proxy.logs()


def test_held_requests_wait_on_the_loop_and_beyond_max_held_get_503_at_once(tmp_path):
    env = upstream_env(tmp_path, "--startup-delay", "30", PROXY_WORKERS=1, PROXY_MAX_HOLD=3,
                       PROXY_MAX_HELD=20, PROXY_WORKER_TIMEOUT=2)
    with Proxy(tmp_path, **env) as proxy:
        barrier = threading.Barrier(30)

        def held(_):
            barrier.wait()
            return requests.post(proxy.url + "/api/chat", json={}, timeout=10,
                                 headers={"Prefer": "wait=3"})

        with ThreadPoolExecutor(30) as pool:
            answers = pool.map(held, range(30))
            # While 20 are held the worker answers everything else.
            wait_until(lambda: b"ollama_exoscale_held_requests 20.0" in requests.get(
                proxy.url + "/metrics", timeout=2).content, 5, what="20 requests held")
            assert requests.get(proxy.url + "/status", timeout=2).status_code == 200
            answers = list(answers)
        assert {a.status_code for a in answers} == {503}
        applied = [a for a in answers if a.headers.get("Preference-Applied") == "wait=3"]
        assert len(applied) == 20  # held 3 s each; the other 10 were answered at once
        assert "WORKER TIMEOUT" not in proxy.logs()


def test_proxy_threads_sizes_the_pool_that_runs_a_workers_blocking_calls():
    """The contract's PROXY_THREADS: a worker's blocking calls (asyncio.to_thread: the store
    read before a 503, the wrong-key lock, the scrape) run on at most that many threads."""
    import asyncio

    from proxy.asgi import Lifespan

    async def burst() -> set[int]:
        await Lifespan(None, None, threads=3).process_startup({}, {})

        def blocking() -> int:
            time.sleep(0.05)
            return threading.get_ident()

        return set(await asyncio.gather(*(asyncio.to_thread(blocking) for _ in range(24))))

    loop = asyncio.new_event_loop()
    try:
        used = loop.run_until_complete(burst())
    finally:
        loop.close()
    assert 1 <= len(used) <= 3
