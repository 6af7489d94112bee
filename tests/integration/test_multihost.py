"""Several workers and several proxy processes on one coordination store, with real processes:
gunicorn, the `local` provisioner starting the test upstream, and SQLite or S3 (moto's server).

Two proxies share the state dir as two hosts share the Pulumi backend: whoever reconciles finds
the server the other started (for `local`, its pid file; for `exoscale`, the stack)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from proxy.store import open_store
from tests import harness
from tests.harness import Proxy, starts, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def start(tmp_path):
    """Start a proxy on the shared state dir; all are stopped at the end, their logs printed
    (pytest shows them when the test failed)."""
    started: list[Proxy] = []

    def start(**env) -> Proxy:
        proxy = Proxy(tmp_path, **env)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
        print(f"--- proxy {proxy.url} ---\n{proxy.logs()}")
    if started:
        started[0].kill_upstream()


def upstream_env(tmp_path, store_env, *flags: str, **env) -> dict:
    return harness.upstream_env(tmp_path, *flags, **store_env, **env)


def lease_holder(tmp_path, store_env) -> str:
    """The lease holder as the store has it ("" if none), read as a third party would."""
    store = open_store(store_env.get("PROXY_STATE_URL", ""), tmp_path, store_env)
    try:
        holder, expires_at = store.lease()
    finally:
        store.close()
    return holder if expires_at > time.time() else ""


def holder_pid(holder: str) -> int:
    return int(holder.split(":")[-2])  # host:pid:id


def assert_no_tracebacks(*proxies: Proxy) -> None:
    for proxy in proxies:
        assert "Traceback" not in proxy.logs(), proxy.logs()


def test_500_cold_requests_on_two_proxies_start_one_server(tmp_path, store_env, start):
    env = upstream_env(tmp_path, store_env, "--startup-delay", "0.3")
    a, b = start(**env, PROXY_WORKERS="4"), start(**env)
    urls = [a.url, b.url]

    def cold(n: int) -> int | str:
        try:
            return requests.post(urls[n % 2] + "/api/embed",
                                 json={"model": "llama3.2", "input": "x"}, timeout=20
                                 ).status_code
        except requests.RequestException as exc:
            return type(exc).__name__

    began = time.monotonic()
    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(cold, range(500)))
    took = time.monotonic() - began
    print(f"500 cold requests in {took:.1f} s: {answers.count(503)} × 503, "
          f"{answers.count(200)} × 200")
    assert len(answers) == 500 and set(answers) <= {503, 200}, set(answers)
    a.wait_phase("ready")
    b.wait_phase("ready")
    for url in urls:
        answer = requests.post(url + "/api/embed", json={"model": "llama3.2", "input": "x"},
                               timeout=10)
        assert answer.status_code == 200
    assert starts(tmp_path) == 1
    assert_no_tracebacks(a, b)


def test_holder_killed_during_provisioning_is_replaced_within_the_lease_time(
    tmp_path, store_env, start
):
    ttl = 3.0
    env = upstream_env(tmp_path, store_env, "--startup-delay", "4", PROXY_LEASE_TTL=str(ttl))
    a, b = start(**env), start(**env)
    assert requests.post(a.url + "/api/chat", json={}, timeout=5).status_code == 503
    a.wait_phase("provisioning")
    holder = wait_until(lambda: lease_holder(tmp_path, store_env), 10, what="a holder")
    victim, survivor = (a, b) if a.owns(holder_pid(holder)) else (b, a)
    assert victim.owns(holder_pid(holder))
    victim.kill()
    killed = time.monotonic()
    successor = wait_until(
        lambda: (h := lease_holder(tmp_path, store_env)) not in ("", holder) and h,
        3 * ttl, interval=0.1, what="a new lease holder",
    )
    took = time.monotonic() - killed
    print(f"lease taken over {took:.1f} s after the SIGKILL (ttl {ttl:g} s)")
    assert survivor.owns(holder_pid(successor))
    # The ttl, plus up to a second each for a watcher to see the last renewal and to retry.
    assert took <= ttl + 3
    survivor.wait_phase("ready", timeout=30)
    answer = requests.post(survivor.url + "/api/chat",
                           json={"model": "llama3.2", "stream": False}, timeout=10)
    assert answer.status_code == 200
    assert starts(tmp_path) == 1
    assert_no_tracebacks(survivor)


def test_a_stream_through_one_proxy_keeps_the_server_while_the_reconciler_sees_no_traffic(
    tmp_path, store_env, start
):
    env = upstream_env(tmp_path, store_env, "--chunk-interval", "0.25", "--chunks", "20",
                       PROXY_IDLE_TIMEOUT="2")
    quiet = start(**env)
    holder = wait_until(lambda: lease_holder(tmp_path, store_env), 10, what="a holder")
    assert quiet.owns(holder_pid(holder))  # the reconciler runs where there is no traffic
    busy = start(**env)
    requests.post(busy.url + "/api/chat", json={}, timeout=5)
    busy.wait_phase("ready")
    phases = []
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    with requests.post(busy.url + "/api/chat", json=chat, stream=True, timeout=30) as answer:
        assert answer.status_code == 200
        for _ in answer.iter_lines():
            phases.append(quiet.status()["provisioning_status"])
    ended = time.monotonic()
    assert len(phases) == 21
    assert set(phases) == {"ready"}  # 5 s of stream, idle timeout 2 s: kept
    quiet.wait_phase("idle", timeout=15)
    assert time.monotonic() - ended >= 2
    assert lease_holder(tmp_path, store_env) == holder
    assert starts(tmp_path) == 1
    assert_no_tracebacks(quiet, busy)
