"""What every coordination store guarantees, checked on SQLite and on S3 (moto's server):
a lease with one holder that moves only once it lapses, a document only the holder writes, and
demand reports every worker sees."""

from __future__ import annotations

import time

import pytest

from proxy.store import open_store
from proxy.store.base import WorkerReport
from proxy.store.sqlite import SqliteStore
from tests.harness import MotoS3


@pytest.fixture(params=["sqlite", "s3"])
def two_stores(request, tmp_path):
    """Two connections to one store, as two workers (or two hosts) have."""
    if request.param == "sqlite":
        stores = [SqliteStore(tmp_path / "state.db") for _ in range(2)]
    else:
        moto = request.getfixturevalue("moto")
        url = moto.url(moto.bucket())
        stores = [open_store(url, tmp_path, MotoS3.CREDENTIALS) for _ in range(2)]
    yield stores
    for store in stores:
        store.close()


def test_a_new_store_is_empty(two_stores):
    a, _ = two_stores
    assert a.load() == {}
    assert a.lease() == ("", 0.0)
    assert a.reports() == []


def test_only_one_holder_gets_the_lease_while_it_is_renewed(two_stores):
    a, b = two_stores
    assert a.acquire("a", ttl=0.6)
    assert not b.acquire("b", ttl=0.6)
    for _ in range(3):
        time.sleep(0.25)
        assert a.acquire("a", ttl=0.6)  # renewal
        assert not b.acquire("b", ttl=0.6)
    assert b.lease()[0] == "a"


def test_a_lease_not_renewed_is_taken_over_after_its_ttl(two_stores):
    a, b = two_stores
    assert a.acquire("a", ttl=0.4)
    assert not b.acquire("b", ttl=5)
    time.sleep(0.45)
    assert b.acquire("b", ttl=5)
    assert not a.acquire("a", ttl=5)
    assert a.lease()[0] == "b"


def test_a_released_lease_is_taken_at_once(two_stores):
    a, b = two_stores
    assert a.acquire("a", ttl=60)
    a.release("a")
    assert b.acquire("b", ttl=60)


def test_the_document_is_written_only_by_the_lease_holder(two_stores):
    a, b = two_stores
    assert a.acquire("a", ttl=60)
    assert a.save({"phase": "provisioning"}, "a")
    assert not b.save({"phase": "idle"}, "b")
    assert b.load() == {"phase": "provisioning"}
    assert a.save({"phase": "starting", "detail": "x"}, "a")
    assert b.load() == {"phase": "starting", "detail": "x"}


def test_a_holder_whose_lease_lapsed_writes_nothing(two_stores):
    a, b = two_stores
    assert a.acquire("a", ttl=0.3)
    assert a.save({"phase": "provisioning"}, "a")
    time.sleep(0.35)
    assert not a.save({"phase": "ready"}, "a")  # nobody took it over, still not allowed
    assert b.load() == {"phase": "provisioning"}


def test_a_deposed_holder_cannot_overwrite_its_successor(two_stores):
    a, b = two_stores
    assert a.acquire("a", ttl=0.3)
    assert a.save({"phase": "provisioning"}, "a")
    b.load()
    assert not b.acquire("b", ttl=60)
    time.sleep(0.35)
    assert b.acquire("b", ttl=60)
    assert b.save({"phase": "starting"}, "b")
    assert not a.save({"phase": "idle"}, "a")
    assert not a.acquire("a", ttl=60)
    assert a.load() == {"phase": "starting"}


def test_reports_from_every_worker_are_visible_to_all(two_stores):
    a, b = two_stores
    a.report(WorkerReport("host:1:w1", inflight=2, last_activity=10.0, wanted_at=5.0,
                          heartbeat=11.0))
    b.report(WorkerReport("other:2:w2", inflight=1, last_activity=12.0, heartbeat=12.0))
    assert {r.worker: r.inflight for r in b.reports()} == {"host:1:w1": 2, "other:2:w2": 1}
    a.report(WorkerReport("host:1:w1", inflight=0, last_activity=13.0, wanted_at=5.0,
                          heartbeat=13.0))
    reports = {r.worker: r for r in b.reports()}
    assert reports["host:1:w1"] == WorkerReport("host:1:w1", 0, 13.0, 5.0, 13.0)
    assert reports["other:2:w2"].inflight == 1
    b.forget("other:2:w2")
    assert [r.worker for r in a.reports()] == ["host:1:w1"]


def test_a_report_keeps_its_fleet_fields(two_stores):
    a, b = two_stores
    report = WorkerReport("host:1:w1", inflight=3, heartbeat=11.0, bake_at=2.0,
                          bake_models=True, inflight_by={"gpu": 1, "gpu-1": 2}, up_at=9.5)
    a.report(report)
    assert b.reports() == [report]
