"""The wall clock jumping under the lifecycle (NTP stepping it, a VM resumed): two Lifecycle
objects on one SQLite store act as two workers; `time.time` jumps for all of them at once,
as it would for every process on the host, while time.monotonic runs on."""

from __future__ import annotations

import time

import pytest

from proxy.lifecycle.demand import Lifecycle
from proxy.lifecycle.status import status_document
from proxy.provision.base import Endpoint
from tests.doubles.provisioners import GatedProvisioner
from tests.harness import wait_until

HOUR = 3600.0


class Clock:
    """time.time with an offset a test can change; everything that reads it sees the jump."""

    def __init__(self, monkeypatch):
        self.offset = 0.0
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + self.offset)

    def jump(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch):
    return Clock(monkeypatch)


def die(life: Lifecycle) -> None:
    """Stop a worker's sync loop as SIGKILL would: no more renewals, no lease released."""
    life.halt()


def holder_and_other(a: Lifecycle, b: Lifecycle) -> tuple[Lifecycle, Lifecycle]:
    wait_until(lambda: a.reconciler.reconciling or b.reconciler.reconciling, 5,
               what="a reconciler")
    return (a, b) if a.reconciler.reconciling else (b, a)


def test_a_clock_jumping_an_hour_ahead_removes_no_server_under_a_stream(make, upstream, clock):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    a, b = make(provisioner, idle_timeout=5), make(provisioner, idle_timeout=5)
    a.want()
    wait_until(lambda: a.snapshot().state.phase == b.snapshot().state.phase == "ready", 10,
               what="ready")
    holder, other = holder_and_other(a, b)
    for streaming in (other, holder):  # the stream on the worker that reconciles, or not
        ticket = streaming.admit()
        time.sleep(0.3)  # its in-flight count is in the store
        clock.jump(HOUR)  # every report now looks an hour old, the stream's too
        time.sleep(3)
        assert provisioner.tear_downs == 0
        assert a.snapshot().state.phase == "ready" and a.snapshot().demand.inflight == 1
        streaming.finish(ticket)
    wait_until(lambda: a.snapshot().state.phase == "idle", 20, what="idle once the stream ended")
    assert provisioner.tear_downs == 1 and provisioner.bring_ups == 1


def test_a_clock_jumping_back_an_hour_removes_an_idle_server_after_the_idle_timeout(
        make, upstream, clock):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    a, b = make(provisioner, idle_timeout=3), make(provisioner, idle_timeout=3)
    a.want()
    wait_until(lambda: a.snapshot().state.phase == "ready", 10, what="ready")
    clock.jump(-HOUR)  # the last demand now lies an hour ahead of the clock
    started = time.monotonic()
    assert status_document(a.config, a)["idle_seconds_left"] <= 3  # /status does not say an hour
    # Not an hour and 3 s: the idle time is also measured on a clock that is never stepped.
    wait_until(lambda: a.snapshot().state.phase == "idle", 20, what="the idle server removed")
    assert time.monotonic() - started >= 2  # about the idle timeout (3 s), minus the sync tick
    time.sleep(1)
    # The demand stamped before the jump (an hour "ahead") starts no server again.
    assert provisioner.tear_downs == 1 and provisioner.bring_ups == 1
    assert a.snapshot().state.phase == "idle"
    b.want()  # new demand, stamped by the stepped-back clock, is seen as new all the same
    wait_until(lambda: a.snapshot().state.phase == "ready", 10, what="ready again on new demand")
    assert provisioner.bring_ups == 2


def test_after_a_clock_jumped_back_requests_keep_the_server_and_down_is_heard(
        make, upstream, clock):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    a, b = make(provisioner, idle_timeout=3), make(provisioner, idle_timeout=3)
    a.want()
    wait_until(lambda: a.snapshot().state.phase == b.snapshot().state.phase == "ready", 10,
               what="ready")
    a.down()
    wait_until(lambda: a.snapshot().state.phase == "idle", 10, what="the first down")
    b.want()
    wait_until(lambda: a.snapshot().state.phase == "ready", 10, what="ready again")
    clock.jump(-HOUR)
    for _ in range(6):  # a request a second for 6 s, twice the idle timeout
        worker = (a, b)[_ % 2]
        ticket = worker.admit()
        assert ticket is not None, f"the server stays while it is used ({_}, {worker.snapshot()})"
        worker.finish(ticket)
        time.sleep(1)
    assert provisioner.tear_downs == 1
    b.down()  # stamped after the first down, though the clock now reads an hour earlier
    wait_until(lambda: a.snapshot().state.phase == "idle", 10, what="the second down")
    assert provisioner.tear_downs == 2


def test_a_clock_jumping_back_an_hour_leaves_the_lease_to_be_taken_over(make, upstream, clock):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    a, b = make(provisioner), make(provisioner)
    holder, other = holder_and_other(a, b)
    clock.jump(-HOUR)  # the lease's expiry, written before, is now an hour and more away
    time.sleep(1)
    die(holder)
    wait_until(lambda: other.reconciler.reconciling, 10,
               what="the other worker to take the lease within about its ttl")
    other.want()
    wait_until(lambda: other.snapshot().state.phase == "ready", 10, what="ready through the other")


def test_a_worker_dead_after_the_clock_jumped_back_stops_counting(make, upstream, clock):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    a, b = make(provisioner), make(provisioner)
    a.want()
    wait_until(lambda: a.snapshot().state.phase == b.snapshot().state.phase == "ready", 10,
               what="ready")
    b.admit()  # a stream on b, which dies with it
    time.sleep(0.3)  # reported, with a heartbeat of the clock before the jump
    clock.jump(-HOUR)  # b's last heartbeat now lies an hour ahead
    time.sleep(1.5)
    die(b)
    wait_until(lambda: a.snapshot().demand.inflight == 0, 20, interval=0.2,
               what="the dead worker's stream to stop counting (10 s without heartbeat)")
