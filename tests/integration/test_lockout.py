"""Wrong API keys counted per address in a file every worker maps (proxy/http/lockout.py)."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from proxy.http.lockout import SLOTS, FailureLimit
from tests.harness import Proxy, wait_until


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_an_address_is_blocked_after_the_limit_until_its_window_ends(tmp_path):
    clock = Clock()
    limit = FailureLimit(tmp_path / "f", limit=3, window=60, clock=clock)
    for _ in range(2):
        limit.record("10.0.0.1")
    assert limit.blocked_for("10.0.0.1") == 0  # two of three
    clock.now += 10
    limit.record("10.0.0.1")
    assert limit.blocked_for("10.0.0.1") == 51  # the window began with the first wrong key
    assert limit.blocked_for("10.0.0.2") == 0  # another address is not held back
    clock.now += 49.5
    assert limit.blocked_for("10.0.0.1") == 1
    clock.now += 0.5
    assert limit.blocked_for("10.0.0.1") == 0
    limit.record("10.0.0.1")  # a new window: one wrong key in it
    assert limit.blocked_for("10.0.0.1") == 0


def test_a_clock_stepped_back_ends_the_window(tmp_path):
    clock = Clock()
    limit = FailureLimit(tmp_path / "f", limit=1, window=60, clock=clock)
    limit.record("10.0.0.1")
    assert limit.blocked_for("10.0.0.1") == 61
    clock.now -= 3600
    assert limit.blocked_for("10.0.0.1") == 0


def _record(path, address: str, times: int) -> None:
    limit = FailureLimit(path, limit=100)
    for _ in range(times):
        limit.record(address)


def test_counts_are_shared_by_processes_using_the_same_file(tmp_path):
    path = tmp_path / "auth-failures"
    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=_record, args=(path, "10.0.0.1", 25)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    # Exactly 100 counted: none lost to the four processes writing at once.
    assert FailureLimit(path, limit=100).blocked_for("10.0.0.1") > 0
    assert FailureLimit(path, limit=101).blocked_for("10.0.0.1") == 0


def _hold_the_lock(path, ready) -> None:
    FailureLimit(path, limit=1)  # the table exists, sized
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a worker does while it counts (proxy/http/lockout.py)
    ready.set()
    signal.pause()


def test_a_worker_killed_while_counting_leaves_no_lock_held(tmp_path):
    path = tmp_path / "auth-failures"
    fork = multiprocessing.get_context("fork")
    ready = fork.Event()
    holder = fork.Process(target=_hold_the_lock, args=(path, ready))
    holder.start()
    assert ready.wait(10)
    os.kill(holder.pid, signal.SIGKILL)  # as gunicorn kills a worker past its timeout
    holder.join(timeout=10)
    limit = FailureLimit(path, limit=1)
    limit.record("10.0.0.1")  # would hang if the dead worker's lock were still held
    assert limit.blocked_for("10.0.0.1") > 0


def test_the_table_stays_its_size_and_keeps_the_addresses_still_counting(tmp_path):
    clock = Clock()
    path = tmp_path / "auth-failures"
    limit = FailureLimit(path, limit=1, window=60, clock=clock)
    size = path.stat().st_size
    limit.record("10.9.9.9")
    clock.now += 61  # its window has ended: its slot may be taken
    for n in range(SLOTS * 3):
        limit.record(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    assert path.stat().st_size == size
    assert limit.blocked_for("10.9.9.9") == 0
    last = f"10.{(SLOTS * 3 - 1) >> 16 & 255}.{(SLOTS * 3 - 1) >> 8 & 255}.{(SLOTS * 3 - 1) & 255}"
    assert limit.blocked_for(last) > 0  # the newest address is held back, whatever came before


@pytest.mark.slow
def test_under_gunicorn_the_limit_holds_for_the_address_whichever_worker_answers(tmp_path):
    limit = 12
    with Proxy(tmp_path, PROXY_API_KEYS="right-key", PROXY_AUTH_FAILURES=limit,
               PROXY_WORKERS=2) as proxy:
        table = str(tmp_path / "auth-failures")
        wait_until(lambda: all(table in open(f"/proc/{pid}/maps").read()
                               for pid in proxy.workers()), 20, what="both workers' apps built")

        def wrong_key(_) -> int:  # a fresh connection each: any worker may take it
            return requests.get(proxy.url + "/api/tags", timeout=10,
                                headers={"Authorization": "Bearer wrong"}).status_code

        with ThreadPoolExecutor(4) as pool:  # with one thread a worker, both workers answer
            codes = list(pool.map(wrong_key, range(limit * 2)))
        pids = set(re.findall(r"\[(\d+)\] WARNING ollama_exoscale.auth: 401", proxy.logs()))
    assert len(pids) == 2, "both workers answered wrong keys"
    # Counted per worker, the two workers would have let about 2 × limit through.
    assert limit <= codes.count(401) < limit + 4  # 4 checked at once may pass the last check
    assert codes[-1] == 429
