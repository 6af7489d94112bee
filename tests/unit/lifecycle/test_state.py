"""The shared document as a type: stores written by the previous version load, and what this
version writes reads back the same.

tests/data/lifecycle-0.1.0.json holds two documents the previous version (commit 545b2bd,
before State) saved: one ready after a cold start, one after an idle stop. They were made by
running that commit's Lifecycle against the fake Ollama with a GatedProvisioner (instance
token replaced by a dummy of the same length)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.lifecycle.snapshot import Snapshot
from proxy.lifecycle.state import Phase, State
from proxy.provision.base import Endpoint
from proxy.store.base import StoreError

SAVED = json.loads((Path(__file__).parents[2] / "data" / "lifecycle-0.1.0.json").read_text())


@pytest.mark.parametrize("name", sorted(SAVED))
def test_a_document_saved_by_the_previous_version_loads_and_writes_back_the_same(name):
    old = SAVED[name]
    state = State.from_doc(old)
    written = state.to_doc()
    for key, value in old.items():
        assert written[key] == value, key
    assert State.from_doc(json.loads(json.dumps(written))) == state


def test_the_ready_document_reads_as_typed_values():
    state = State.from_doc(SAVED["ready"])
    assert state.phase is Phase.READY
    assert isinstance(state.endpoint, Endpoint) and state.endpoint.instance_status == "running"
    assert state.cold_starts and set(state.marks) >= {"requested", "server", "listed"}
    snapshot = Snapshot.build(state, [], state.ready_since)
    assert snapshot.state.phase == "ready" and snapshot.state.endpoint == state.endpoint


def test_the_stopped_document_keeps_its_gpu_time_and_instance():
    state = State.from_doc(SAVED["stopped"])
    assert state.phase is Phase.IDLE and state.endpoint is None
    assert state.instance_status == "stopped" and state.removal == "stop"
    assert state.gpu_seconds > 0 and sum(state.gpu_days.values()) == pytest.approx(
        state.gpu_seconds)


def test_keys_of_a_newer_version_are_kept():
    doc = {**SAVED["ready"], "regions": {"at-vie-2": {"phase": "ready"}}}
    assert State.from_doc(doc).to_doc()["regions"] == {"at-vie-2": {"phase": "ready"}}


def test_a_document_of_one_server_reads_as_a_fleet_of_one():
    state = State.from_doc(SAVED["ready"])
    assert state.servers == {}
    assert State.from_doc(state.to_doc()) == state


def test_the_fleets_other_servers_round_trip_in_name_order():
    doc = {**SAVED["ready"], "servers": {
        "gpu-10": {"phase": "provisioning", "instance_since": 5.0},
        "gpu-2": {"phase": "ready", "endpoint": {"url": "http://127.0.0.1:9"},
                  "instance_since": 4.0, "later": "kept out"},
    }}
    state = State.from_doc(doc)
    assert list(state.servers) == ["gpu-2", "gpu-10"]
    assert state.servers["gpu-2"].serving and not state.servers["gpu-10"].serving
    assert State.from_doc(state.to_doc()) == state
    assert state.gpu_record["fleet_since"] == [4.0, 5.0]  # the budget counts every server


@pytest.mark.parametrize("servers", [
    {"gpu": {"phase": "ready"}},  # the primary is the document itself
    {"gpu-01": {"phase": "ready"}},
    {"web": {"phase": "ready"}},
    {"gpu-1": {"phase": "flying"}},
    ["gpu-1"],
])
def test_a_fleet_this_version_cannot_read_is_a_store_error(servers):
    with pytest.raises(StoreError):
        State.from_doc({**SAVED["ready"], "servers": servers})


def test_nulls_read_as_the_defaults():
    state = State.from_doc({"phase": "idle", "instance_status": None, "gpu_days": None,
                            "endpoint": None, "last_error": None})
    assert state == State()


@pytest.mark.parametrize("doc", [{"phase": "hibernating"}, {"endpoint": {"host": "x"}}])
def test_a_document_this_version_cannot_read_is_a_store_error(doc):
    with pytest.raises(StoreError, match="not one this version reads"):
        State.from_doc(doc)
