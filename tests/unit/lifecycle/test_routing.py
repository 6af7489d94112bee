"""Which server a worker sends a request to: the snapshot's counts, its own, the broken ones."""

from __future__ import annotations

from proxy.lifecycle.decide import Demand
from proxy.lifecycle.routing import BROKEN_FOR, Router
from proxy.lifecycle.servers import Server
from proxy.lifecycle.snapshot import Snapshot
from proxy.lifecycle.state import Phase, State
from proxy.provision.base import Endpoint


def fleet(by_server: dict[str, int], *, draining: tuple[str, ...] = ()) -> Snapshot:
    servers = {name: Server(Phase.DESTROYING if name in draining else Phase.READY, 1.0,
                            endpoint=Endpoint(f"http://127.0.0.1:{9000 + i}"))
               for i, name in enumerate(("gpu-1", "gpu-2"), start=1)}
    state = State(phase=Phase.READY, endpoint=Endpoint("http://127.0.0.1:9000"),
                  servers=servers)
    return Snapshot(state, Demand(inflight=sum(by_server.values()), by_server=by_server))


def test_one_server_gets_every_request_and_is_counted():
    router = Router()
    one = Snapshot(State(phase=Phase.READY, endpoint=Endpoint("http://127.0.0.1:9000")))
    assert [router.choose(one, {}) for _ in range(3)] == ["gpu"] * 3
    assert router.counts() == {"gpu": 3}
    router.done("gpu")
    assert router.counts() == {"gpu": 2}


def test_nothing_is_chosen_while_no_server_serves():
    assert Router().choose(Snapshot(State(phase=Phase.PROVISIONING)), {}) is None


def test_the_fewest_in_flight_counting_this_workers_own_not_yet_reported():
    router = Router()
    snapshot = fleet({"gpu": 4, "gpu-1": 1, "gpu-2": 2})
    assert router.choose(snapshot, {}) == "gpu-1"  # 1 in flight
    assert router.choose(snapshot, {}) == "gpu-1"  # 1 + 1 of ours: ties with gpu-2 (2), lower
    assert router.choose(snapshot, {}) == "gpu-2"  # gpu-1 now 1 + 2


def test_this_workers_reported_requests_are_not_counted_twice():
    router = Router()
    for _ in range(3):
        router.choose(fleet({"gpu": 0, "gpu-1": 0, "gpu-2": 0}), {})  # gpu, gpu-1, gpu-2
    reported = router.counts()  # the store now has them, in the snapshot's sums as well
    assert router.choose(fleet(reported), reported) == "gpu"


def test_a_draining_server_gets_nothing_new():
    router = Router()
    snapshot = fleet({"gpu": 5, "gpu-1": 0, "gpu-2": 5}, draining=("gpu-1",))
    assert router.choose(snapshot, {}) == "gpu"


def test_a_broken_server_is_passed_over_for_a_while(monkeypatch):
    router = Router()
    snapshot = fleet({"gpu": 3, "gpu-1": 0, "gpu-2": 3})
    router.broke("gpu-1")
    assert router.choose(snapshot, {}) == "gpu"
    clock = __import__("time").monotonic() + BROKEN_FOR + 1
    monkeypatch.setattr("proxy.lifecycle.routing.time.monotonic", lambda: clock)
    assert router.choose(snapshot, {}) == "gpu-1"


def test_when_every_ready_server_broke_lately_they_are_tried_anyway():
    router = Router()
    snapshot = fleet({"gpu": 0, "gpu-1": 0, "gpu-2": 0})
    for name in ("gpu", "gpu-1", "gpu-2"):
        router.broke(name)
    assert router.choose(snapshot, {}) == "gpu"


def test_the_fleet_is_ready_while_any_server_serves():
    snapshot = fleet({"gpu": 0, "gpu-1": 0, "gpu-2": 0})
    broken_primary = Snapshot(State(phase=Phase.ERROR, servers=snapshot.state.servers))
    assert broken_primary.serving and broken_primary.phase == "ready"
    assert Router().choose(broken_primary, {}) == "gpu-1"
    assert Snapshot(State(phase=Phase.STARTING)).phase == "starting"
