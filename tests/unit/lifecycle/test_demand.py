"""The lifecycle across workers, in one process: two Lifecycle objects on one SQLite store
behave as two gunicorn workers do (each has its own connection, sync loop and reconciler)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from proxy.lifecycle.demand import Lifecycle
from proxy.provision.base import Endpoint
from proxy.store.sqlite import SqliteStore
from proxy.upstream.session import Sessions
from tests.doubles import fake_ollama
from tests.doubles.provisioners import GatedProvisioner
from tests.harness import wait_until


def phase_of(life: Lifecycle) -> str:
    return life.snapshot().state.phase


def test_demand_on_two_workers_brings_up_one_server(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url), open_gate=False)
    a, b = make(provisioner), make(provisioner)
    assert a.admit() is None and b.admit() is None
    wait_until(lambda: phase_of(a) == "provisioning", 5, what="provisioning")
    assert b.admit() is None
    provisioner.gate.set()
    wait_until(lambda: phase_of(a) == phase_of(b) == "ready", 10, what="ready on both")
    assert provisioner.bring_ups == 1
    ticket = b.admit()
    assert ticket is not None and ticket.endpoint.url == upstream.url
    b.finish(ticket)


def test_not_ready_until_the_upstream_lists_the_model(make):
    slow = fake_ollama.start_in_thread(models="llama3.2", tags_delay=1.5)
    try:
        life = make(GatedProvisioner(Endpoint(slow.url)))
        life.want()
        wait_until(lambda: phase_of(life) == "starting", 5, what="starting")
        assert "llama3.2" in life.snapshot().state.detail
        assert life.admit() is None
        wait_until(lambda: phase_of(life) == "ready", 10, what="ready")
    finally:
        slow.close()


def test_every_progress_step_reaches_the_store_even_in_a_burst(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    provisioner.sentences = [f"creating resource {n}" for n in range(5)]  # within a second
    a, b = make(provisioner), make(provisioner)
    a.want()
    wait_until(lambda: phase_of(b) == "ready", 10, what="ready")
    steps = b.snapshot().state.steps
    texts = [step["text"] for step in steps]
    assert texts[:6] == ["starting the GPU server"] + provisioner.sentences
    assert {step["phase"] for step in steps[:6]} == {"provisioning"}
    assert [step["at"] for step in steps] == sorted(step["at"] for step in steps)


def test_failed_provisioning_shows_the_reason_and_backs_off(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    provisioner.fail_with = "quota exceeded for gpua5000"
    life = make(provisioner, retry_base=1.0)
    life.want()
    wait_until(lambda: phase_of(life) == "error", 5, what="error")
    snapshot = life.snapshot()
    assert snapshot.state.last_error == "quota exceeded for gpua5000"
    assert snapshot.state.retry_at > time.time()
    # Demand during the back-off does not retry at once: no tight loop of cloud calls.
    for _ in range(10):
        life.want()
        time.sleep(0.05)
    assert provisioner.bring_ups == 1
    assert 1 <= life.retry_after() <= 1
    provisioner.fail_with = None
    wait_until(lambda: time.time() >= snapshot.state.retry_at, 3)
    life.want()
    wait_until(lambda: phase_of(life) == "ready", 5, what="ready after the retry")
    assert provisioner.bring_ups == 2
    assert life.snapshot().state.last_error is None


def test_back_off_doubles_with_each_failure(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    provisioner.fail_with = "boom"
    life = make(provisioner, retry_base=0.2)
    delays = []
    for attempt in range(3):
        life.want()
        wait_until(lambda n=attempt + 1: life.snapshot().state.failures == n, 5, what="a failure")
        snapshot = life.snapshot()
        delays.append(snapshot.state.retry_at - snapshot.state.phase_since)
        time.sleep(max(0.0, snapshot.state.retry_at - time.time()))
    assert delays == pytest.approx([0.2, 0.4, 0.8], abs=0.01)


def test_idle_server_is_removed_after_the_timeout(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    life = make(provisioner, idle_timeout=1.0)
    life.want()
    wait_until(lambda: phase_of(life) == "ready", 5, what="ready")
    ticket = life.admit()
    life.finish(ticket)
    ended = time.time()
    wait_until(lambda: phase_of(life) == "idle", 10, what="idle")
    assert provisioner.tear_downs == 1
    assert time.time() - ended >= 1.0


def test_no_removal_while_a_request_is_in_flight_on_another_worker(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    a, b = make(provisioner, idle_timeout=0.5), make(provisioner, idle_timeout=0.5)
    a.want()
    wait_until(lambda: phase_of(b) == "ready", 5, what="ready")
    stream = b.admit()  # a long stream on worker b; worker a sees no traffic
    time.sleep(2.0)
    assert phase_of(a) == "ready" and provisioner.tear_downs == 0
    assert a.snapshot().demand.inflight == 1
    b.finish(stream)
    ended = time.time()
    wait_until(lambda: phase_of(a) == "idle", 10, what="idle after the stream")
    assert provisioner.tear_downs == 1
    assert time.time() - ended >= 0.5  # idle time counts from the end of the stream


def test_demand_after_removal_brings_the_server_back(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    life = make(provisioner, idle_timeout=0.3)
    life.want()
    wait_until(lambda: phase_of(life) == "ready", 5, what="ready")
    wait_until(lambda: phase_of(life) == "idle", 10, what="idle")
    life.want()
    wait_until(lambda: phase_of(life) == "ready", 5, what="ready again")
    assert provisioner.bring_ups == 2
    assert len(life.snapshot().state.cold_starts) == 2


def test_a_restart_adopts_the_server_that_exists(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    provisioner.exists = True  # left running by a previous proxy whose store is gone
    life = make(provisioner)
    wait_until(lambda: phase_of(life) == "ready", 5, what="ready by adoption")
    assert provisioner.bring_ups == 0


def test_the_lease_moves_when_its_holder_closes(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    a = make(provisioner)
    wait_until(lambda: a.reconciler.reconciling, 5, what="a holds the lease")
    b = make(provisioner)
    a.close(timeout=5)
    wait_until(lambda: b.reconciler.reconciling, 5, what="b takes the lease")
    b.want()
    wait_until(lambda: phase_of(b) == "ready", 5, what="ready through b")


def test_hold_returns_when_ready(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url), open_gate=False)
    life = make(provisioner)
    life.want()
    started = time.monotonic()
    assert life.hold(0.3).state.phase != "ready"
    assert time.monotonic() - started >= 0.3
    provisioner.gate.set()
    assert life.hold(10).state.phase == "ready"


class Remote:
    """The SQLite store seen as another kind (as S3 is): no host counter goes with it."""

    def __init__(self, store: SqliteStore):
        self._store = store

    def __getattr__(self, name):
        return getattr(self._store, name)

    def change_counter(self) -> None:
        return None


def late_worker(a: Lifecycle, store) -> Lifecycle:
    """A worker that syncs once, as it starts, and then not again (no sync loop)."""
    return Lifecycle(a.config, a.provisioner, store, Sessions(4), start=False)


def test_a_refusal_reads_the_store_only_once_another_worker_has_shown_ready(make, upstream,
                                                                          tmp_path):
    provisioner = GatedProvisioner(Endpoint(upstream.url), open_gate=False)
    a = make(provisioner)
    a.want()
    wait_until(lambda: phase_of(a) == "provisioning", 5, what="provisioning")
    b = late_worker(a, SqliteStore(tmp_path / "state.db"))
    try:
        assert b.admit() is None and not b.refresh_needed()  # nobody shows ready: no read
        provisioner.gate.set()
        wait_until(lambda: a.snapshot().serving, 10, what="ready on a")
        assert phase_of(b) == "provisioning" and b.refresh_needed()
        assert b.refresh() and b.admit() is not None
    finally:
        b.close(timeout=5)


def test_without_a_host_counter_every_refusal_reads_the_store(make, upstream, tmp_path):
    """Workers of other hosts (the S3 store) cannot announce what they saw: always read."""
    provisioner = GatedProvisioner(Endpoint(upstream.url), open_gate=False)
    a = make(provisioner)
    a.want()
    wait_until(lambda: phase_of(a) == "provisioning", 5, what="provisioning")
    b = late_worker(a, Remote(SqliteStore(tmp_path / "state.db")))
    try:
        assert b.refresh_needed() and not b.refresh()
        assert b.refresh_needed()
    finally:
        b.close(timeout=5)


# -- removal under demand: an operator's `down`, the caps; warm windows -------------------------

EVERY_DAY = "00:00-24:00"


def ready_pair(make, upstream, **settings):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    a, b = make(provisioner, **settings), make(provisioner, **settings)
    a.want()
    wait_until(lambda: phase_of(a) == phase_of(b) == "ready", 10, what="ready on both")
    return provisioner, a, b


def test_down_waits_for_the_stream_then_removes_the_server_and_books_its_time(make, upstream):
    provisioner, a, b = ready_pair(make, upstream)
    ticket = a.admit()  # a stream in flight on worker a
    b.down()  # the operator asks worker b
    wait_until(lambda: phase_of(b) == "destroying", 5, what="destroying")
    assert b.admit() is None  # new requests wait
    from proxy.lifecycle.status import explain

    assert "(an operator asked for it (ollama-exoscale down))" in explain(b.snapshot(), 5)[1]
    time.sleep(1.0)
    assert provisioner.tear_downs == 0 and phase_of(a) == "destroying"
    a.finish(ticket)
    wait_until(lambda: phase_of(a) == "idle", 10, what="idle")
    assert provisioner.tear_downs == 1
    snapshot = a.snapshot()
    assert snapshot.state.instance_since == 0.0 and snapshot.state.gpu_seconds > 0
    assert sum(snapshot.state.gpu_days.values()) == snapshot.state.gpu_seconds
    time.sleep(0.5)  # the 503s of the drain do not bring it back
    assert provisioner.bring_ups == 1 and phase_of(a) == "idle"


def test_a_server_past_max_instance_hours_is_drained_then_removed(make, upstream):
    provisioner, a, b = ready_pair(make, upstream, max_instance_hours=1.5 / 3600)
    ticket = a.admit()
    wait_until(lambda: phase_of(b) == "destroying", 10, what="destroying at the cap")
    assert "PROXY_MAX_INSTANCE_HOURS" in b.snapshot().state.detail
    time.sleep(0.5)
    assert provisioner.tear_downs == 0
    a.finish(ticket)
    wait_until(lambda: phase_of(a) == "idle", 10, what="idle")
    assert provisioner.tear_downs == 1
    a.want()  # demand after the removal starts a fresh server
    wait_until(lambda: provisioner.bring_ups == 2, 10, what="a second bring-up")


def test_the_drain_timeout_bounds_how_long_a_stream_keeps_a_retired_server(make, upstream):
    provisioner, a, _ = ready_pair(make, upstream, drain_timeout=1.0)
    a.admit()  # never finished
    a.down()
    wait_until(lambda: provisioner.tear_downs == 1, 10, what="removal after the drain timeout")


def test_a_used_up_daily_budget_removes_the_server_and_refuses_new_ones(make, upstream):
    provisioner, a, b = ready_pair(make, upstream, daily_gpu_hours=1.0 / 3600)
    wait_until(lambda: phase_of(a) == "idle", 10, what="removed at the budget")
    assert provisioner.tear_downs == 1 and a.budget_used_up()
    b.want()
    time.sleep(0.5)
    assert provisioner.bring_ups == 1 and phase_of(b) == "idle"
    assert 1 <= b.retry_after() <= 60


def test_a_warm_window_starts_the_server_without_demand_and_keeps_it(make, upstream):
    from proxy.lifecycle.schedule import parse_windows

    provisioner = GatedProvisioner(Endpoint(upstream.url))
    life = make(provisioner, warm_windows=parse_windows(EVERY_DAY), idle_timeout=0.2)
    wait_until(lambda: phase_of(life) == "ready", 10, what="ready without demand")
    time.sleep(1.0)  # far past the idle timeout
    assert phase_of(life) == "ready" and provisioner.tear_downs == 0
    life.down()  # the operator's word wins for the rest of the window
    wait_until(lambda: phase_of(life) == "idle", 10, what="idle after down")
    time.sleep(0.5)
    assert provisioner.bring_ups == 1


def test_outside_its_windows_the_server_is_not_started(make, upstream):
    from proxy.lifecycle.schedule import parse_windows

    provisioner = GatedProvisioner(Endpoint(upstream.url))
    # A window an hour long, twelve hours from now (in UTC, the test config's zone).
    hour = (time.gmtime().tm_hour + 12) % 24
    life = make(provisioner, warm_windows=parse_windows(f"{hour:02d}:00-{hour + 1:02d}:00"))
    time.sleep(0.5)
    assert provisioner.bring_ups == 0 and phase_of(life) == "idle"


def test_idle_action_stop_keeps_the_server_stopped_and_demand_starts_it(make, upstream):
    provisioner = GatedProvisioner(Endpoint(upstream.url))
    life = make(provisioner, idle_action="stop", idle_timeout=0.3)
    life.want()
    wait_until(lambda: phase_of(life) == "ready", 10, what="ready")
    wait_until(lambda: phase_of(life) == "idle", 10, what="stopped when idle")
    assert (provisioner.stops, provisioner.tear_downs) == (1, 0)
    snapshot = life.snapshot()
    assert snapshot.state.instance_status == "stopped" and snapshot.state.gpu_seconds > 0
    assert snapshot.state.steps[0]["text"] == "idle: stopping the GPU server"
    life.want()
    wait_until(lambda: phase_of(life) == "ready", 10, what="ready again")
    assert provisioner.bring_ups == 2
    assert life.snapshot().state.endpoint.instance_status == "running"


def test_a_cold_start_loads_the_model_and_records_each_stage(make):
    import requests

    slow = fake_ollama.start_in_thread(models="llama3.2", tags_delay=0.6)
    try:
        provisioner = GatedProvisioner(Endpoint(slow.url))
        life = make(provisioner, idle_timeout=600)
        life.want()
        wait_until(lambda: phase_of(life) == "ready", 10, what="ready")
        # The model was loaded before `ready`, kept as long as the idle timeout.
        loaded = requests.get(slow.url + "/api/ps", timeout=5).json()["models"]
        assert [m["name"] for m in loaded] == ["llama3.2:latest"]
        expires = datetime.fromisoformat(loaded[0]["expires_at"].replace("Z", "+00:00"))
        assert 500 < (expires - datetime.now(timezone.utc)).total_seconds() <= 600
        snapshot = life.snapshot()
        assert any(s["text"] == "loading llama3.2 into GPU memory" for s in snapshot.state.steps)
        (timeline,) = snapshot.state.timelines
        assert list(timeline) == ["stack_update", "boot", "model_pull", "model_load", "mode"]
        assert timeline.pop("mode") == "create"  # the GatedProvisioner made a server
        assert timeline["model_pull"] >= 0.5  # the upstream listed the model 0.6 s late
        assert sum(timeline.values()) == pytest.approx(snapshot.state.cold_starts[-1], abs=0.3)
    finally:
        slow.close()


def test_a_failed_model_load_still_ends_ready(make, upstream, monkeypatch, caplog):
    import proxy.lifecycle.operations

    monkeypatch.setattr(proxy.lifecycle.operations, "load_model",
                        lambda *args: "loading llama3.2 failed: HTTP 500")
    life = make(GatedProvisioner(Endpoint(upstream.url)))
    life.want()
    wait_until(lambda: phase_of(life) == "ready", 10, what="ready")
    assert "loading llama3.2 failed: HTTP 500; the first request will load it" in caplog.text


def test_a_server_that_never_becomes_ready_is_removed_not_billed(make):
    """Past PROXY_START_TIMEOUT the server is torn down: an error phase with the instance still
    running would bill it until some request came."""
    silent = fake_ollama.start_in_thread(models="other-model")  # never lists llama3.2
    try:
        provisioner = GatedProvisioner(Endpoint(silent.url))
        life = make(provisioner, start_timeout=0.5)
        life.want()
        wait_until(lambda: phase_of(life) == "error", 10, what="error")
        assert provisioner.tear_downs == 1 and not provisioner.exists
        assert "did not become ready in 0.5 s" in life.snapshot().state.last_error
        assert life.snapshot().state.instance_since == 0.0  # its GPU time is booked as ended
    finally:
        silent.close()


def test_the_servers_stages_become_spans_that_may_overlap():
    from proxy.lifecycle.coldstart import server_spans

    doc = {"stages": {
        "packages": {"track": "main", "start": 100.0, "end": 130.0},
        "driver": {"track": "main", "start": 130.0, "end": 290.0},
        "pulling": {"track": "fetch", "start": 140.5, "end": 260.0},
        "running": {"track": "main", "start": 290.0, "end": None},  # not ended: left out
        "junk": {"start": "x", "end": 3},
        "backwards": {"start": 50.0, "end": 10.0},
    }}
    assert server_spans(doc) == {"packages": [0.0, 30.0], "driver": [30.0, 190.0],
                                 "pulling": [40.5, 160.0]}
    assert server_spans({"stages": "nonsense"}) == {} and server_spans({}) == {}
