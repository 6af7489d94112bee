"""The SQLite store: a fenced document, per-worker reports, and a lease that moves on expiry."""

import os
import stat
import time

from proxy.store import open_store
from proxy.store.base import WorkerReport
from proxy.store.sqlite import SqliteStore


def two_stores(tmp_path):
    """Two connections to one file, as two workers have."""
    return SqliteStore(tmp_path / "state.db"), SqliteStore(tmp_path / "state.db")


def test_only_one_holder_gets_the_lease_until_it_expires(tmp_path):
    a, b = two_stores(tmp_path)
    assert a.acquire("a", ttl=0.3)
    assert not b.acquire("b", ttl=0.3)
    assert a.acquire("a", ttl=0.3)  # renewal
    time.sleep(0.35)
    assert b.acquire("b", ttl=5)
    assert not a.acquire("a", ttl=5)
    assert a.lease()[0] == "b"


def test_released_lease_is_taken_at_once(tmp_path):
    a, b = two_stores(tmp_path)
    assert a.acquire("a", ttl=60)
    a.release("a")
    assert b.acquire("b", ttl=60)


def test_document_is_written_only_by_the_lease_holder(tmp_path):
    a, b = two_stores(tmp_path)
    assert a.acquire("a", ttl=60)
    assert a.save({"phase": "provisioning"}, "a")
    assert not b.save({"phase": "idle"}, "b")
    assert b.load() == {"phase": "provisioning"}


def test_reports_from_every_worker_are_visible_to_all(tmp_path):
    a, b = two_stores(tmp_path)
    a.report(WorkerReport("w1", inflight=2, last_activity=10.0, wanted_at=5.0, heartbeat=11.0))
    b.report(WorkerReport("w2", inflight=1, last_activity=12.0, wanted_at=0.0, heartbeat=12.0))
    a.report(WorkerReport("w1", inflight=0, last_activity=13.0, wanted_at=5.0, heartbeat=13.0))
    reports = {r.worker: r for r in b.reports()}
    assert reports["w1"].inflight == 0 and reports["w1"].last_activity == 13.0
    assert reports["w2"].inflight == 1
    b.forget("w2")
    assert [r.worker for r in a.reports()] == ["w1"]


def test_store_file_is_private_to_its_owner(tmp_path):
    store = open_store("", tmp_path / "state")
    store.acquire("x", 1)
    mode = stat.S_IMODE(os.stat(tmp_path / "state" / "state.db").st_mode)
    assert mode & 0o077 == 0


def test_many_processes_can_open_a_new_store_at_once(tmp_path):
    import subprocess
    import sys

    # Each waits for the same instant, then opens the new file and writes at once.
    code = (
        "import sys, time\n"
        "from proxy.store.base import WorkerReport\n"
        "from proxy.store.sqlite import SqliteStore\n"
        "time.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
        "store = SqliteStore(sys.argv[1]); store.report(WorkerReport(sys.argv[3]))\n"
        "store.acquire(sys.argv[3], 5)"
    )
    start = str(time.time() + 1.5)
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "state.db"), start, str(n)],
                         stderr=subprocess.PIPE)
        for n in range(16)
    ]
    errors = [p.communicate(timeout=30)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 16, errors
