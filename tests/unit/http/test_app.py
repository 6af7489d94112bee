"""The HTTP contract while the GPU server is not ready, in-process through Falcon's test client."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import falcon.testing
import pytest

from proxy.config import Config
from proxy.http.app import create_app
from proxy.lifecycle.demand import Lifecycle
from proxy.provision.base import Endpoint
from proxy.store.sqlite import SqliteStore
from proxy.upstream.forward import Forwarder
from proxy.upstream.session import Sessions
from tests.doubles.provisioners import GatedProvisioner
from tests.harness import wait_until


@pytest.fixture
def proxy(tmp_path):
    """A proxy whose provisioning never finishes (the gate stays shut)."""
    made = []

    def make(**settings):
        config = Config(state_dir=tmp_path, tick=0.02, lease_ttl=1.0,
                        models=("llama3.2", "qwen3:8b"))
        config = dataclasses.replace(config, **settings)
        provisioner = GatedProvisioner(Endpoint("http://127.0.0.1:9"), open_gate=False)
        sessions = Sessions(4)
        life = Lifecycle(config, provisioner, SqliteStore(tmp_path / "state.db"), sessions)
        made.append((life, provisioner))
        app = create_app(config, life, Forwarder(sessions, 1, 5))
        return falcon.testing.TestClient(app), life, provisioner

    yield make
    for life, provisioner in made:
        provisioner.gate.set()
        life.close(timeout=5)


def test_root_says_ollama_is_running_without_provisioning(proxy):
    client, life, provisioner = proxy()
    for method in ("GET", "HEAD"):
        answer = client.simulate_request(method, "/")
        assert answer.status_code == 200
    assert client.simulate_get("/").text == "Ollama is running"
    time.sleep(0.2)
    assert provisioner.bring_ups == 0 and life.snapshot().state.phase == "idle"


def test_model_listing_routes_answer_without_waking_the_gpu(proxy):
    client, life, provisioner = proxy()
    tags = client.simulate_get("/api/tags").json
    assert [m["name"] for m in tags["models"]] == ["llama3.2:latest", "qwen3:8b"]
    assert client.simulate_get("/api/ps").json == {"models": []}
    assert "version" in client.simulate_get("/api/version").json
    models = client.simulate_get("/v1/models").json
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["llama3.2:latest", "qwen3:8b"]
    time.sleep(0.2)
    assert provisioner.bring_ups == 0 and life.snapshot().state.phase == "idle"


def test_demand_gets_503_with_retry_after_and_starts_provisioning(proxy):
    client, life, provisioner = proxy()
    started = time.monotonic()
    answer = client.simulate_post("/api/chat", json={"model": "llama3.2", "messages": []})
    assert time.monotonic() - started < 0.5
    assert answer.status_code == 503
    retry_after = int(answer.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert answer.json == {
        "error": answer.json["error"],
        "provisioning": True,
        "status": "provisioning",
        "retry_after": retry_after,
    }
    assert "starting" in answer.json["error"] and isinstance(answer.json["error"], str)
    wait_until(lambda: provisioner.bring_ups == 1, 5, what="a bring-up")


def test_a_burst_of_503s_reads_the_store_in_no_request(proxy, monkeypatch):
    """No worker shows ready: nothing another worker knows could turn a 503 into an answer."""
    client, life, provisioner = proxy()
    client.simulate_post("/api/chat", json={"model": "llama3.2", "messages": []})
    wait_until(lambda: life.snapshot().state.phase == "provisioning", 5, what="provisioning")
    reads, load = [], life.store.load

    def counted():
        if threading.current_thread().name != "lifecycle-sync":  # not the tick's own read
            reads.append(threading.current_thread().name)
        return load()

    monkeypatch.setattr(life.store, "load", counted)
    for _ in range(20):
        answer = client.simulate_post("/api/chat", json={"model": "llama3.2", "messages": []})
        assert answer.status_code == 503
    assert reads == []


def test_openai_routes_get_openai_shaped_503(proxy):
    client, life, provisioner = proxy()
    answer = client.simulate_post("/v1/chat/completions", json={"model": "llama3.2"})
    assert answer.status_code == 503
    error = answer.json["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "provisioning"
    assert "Retry in" in error["message"]
    assert int(answer.headers["Retry-After"]) >= 1


def test_error_phase_says_why_and_that_it_is_not_provisioning(proxy):
    client, life, provisioner = proxy(retry_base=30)
    provisioner.fail_with = "quota exceeded for gpua5000 in at-vie-2"
    provisioner.gate.set()
    client.simulate_post("/api/generate", json={})
    wait_until(lambda: life.snapshot().state.phase == "error", 5, what="error")
    answer = client.simulate_post("/api/generate", json={})
    assert answer.status_code == 503
    assert answer.json["provisioning"] is False
    assert answer.json["status"] == "error"
    assert "quota exceeded" in answer.json["error"]
    assert 25 <= int(answer.headers["Retry-After"]) <= 30


def test_status_has_the_contract_fields_and_does_not_provision(proxy):
    client, life, provisioner = proxy()
    status = client.simulate_get("/status").json
    for field in (
        "service", "provisioning_status", "instance_status", "remote_url", "zone",
        "instance_type", "ollama_model", "idle_timeout", "provider", "phase_since",
        "last_activity", "in_flight", "idle_seconds_left", "last_error", "cold_starts",
    ):
        assert field in status
    assert status["provisioning_status"] == "idle"
    assert set(status["cold_starts"]) == {"count", "last", "median"}
    time.sleep(0.2)
    assert provisioner.bring_ups == 0


def test_api_keys_guard_every_route_but_root(proxy):
    client, life, provisioner = proxy(api_keys=("k1", "k2"))
    assert client.simulate_get("/").status_code == 200
    for path in ("/status", "/api/tags", "/api/chat", "/v1/models"):
        answer = client.simulate_get(path)
        assert answer.status_code == 401, path
        assert isinstance(answer.json["error"], (str, dict))
    wrong = client.simulate_get("/api/tags", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    right = client.simulate_get("/api/tags", headers={"Authorization": "Bearer k2"})
    assert right.status_code == 200
    assert provisioner.bring_ups == 0


def test_unauthorised_body_names_no_key(proxy):
    client, life, provisioner = proxy(api_keys=("secret-key-1",))
    answer = client.simulate_post("/api/chat", headers={"Authorization": "Bearer secret-key-2"})
    assert answer.status_code == 401
    assert "secret-key" not in answer.text


def test_dot_segments_are_refused(proxy):
    client, life, provisioner = proxy()
    answer = client.simulate_get("/api/../status")
    assert answer.status_code == 400
    assert "error" in answer.json


def test_unknown_routes_get_a_json_404(proxy):
    client, life, provisioner = proxy()
    answer = client.simulate_get("/nothing")
    assert answer.status_code == 404
    assert json.loads(answer.text)["error"]


def test_prefer_wait_holds_up_to_max_hold_then_503(proxy):
    client, life, provisioner = proxy(max_hold=0.5)
    started = time.monotonic()
    answer = client.simulate_post("/api/chat", json={}, headers={"Prefer": "wait=30"})
    held = time.monotonic() - started
    assert answer.status_code == 503
    assert 0.5 <= held < 3
    assert answer.headers.get("Preference-Applied") == "wait=0.5"


def test_hold_cap_answers_503_at_once(proxy):
    client, life, provisioner = proxy(max_hold=5, max_held=0)
    started = time.monotonic()
    answer = client.simulate_post("/api/chat", json={}, headers={"Prefer": "wait=5"})
    assert answer.status_code == 503
    assert time.monotonic() - started < 0.5


def test_management_routes_need_an_admin_key(proxy):
    client, life, provisioner = proxy(api_keys=("user-key-1",), admin_keys=("admin-key-1",))
    user = {"Authorization": "Bearer user-key-1"}
    admin = {"Authorization": "Bearer admin-key-1"}
    for method, path in (("POST", "/api/pull"), ("POST", "/api/create"), ("POST", "/api/copy"),
                         ("DELETE", "/api/delete"), ("POST", "/api/push"),
                         ("POST", "/api/blobs/sha256:" + "a" * 64)):
        answer = client.simulate_request(method, path, headers=user)
        assert answer.status_code == 403, path
        assert "admin key" in answer.json["error"]
        assert client.simulate_request(method, path, headers=admin).status_code == 503
    assert client.simulate_post("/api/chat", headers=user).status_code == 503
    assert client.simulate_get("/api/tags", headers=admin).status_code == 200


def test_the_ui_page_is_public_but_shows_nothing_without_a_key(proxy):
    client, life, provisioner = proxy(api_keys=("user-key-1",))
    assert client.simulate_get("/status").status_code == 401
    assert client.simulate_get("/ui").status_code in (200, 404)  # page itself holds no data


def test_a_body_over_the_limit_gets_413_and_does_not_wake_the_gpu(proxy):
    client, life, provisioner = proxy(max_body=1024)
    answer = client.simulate_post("/api/chat", body=b"x" * 2048)
    assert answer.status_code == 413
    assert "PROXY_MAX_BODY_MB" in answer.json["error"]
    blob = client.simulate_post("/api/blobs/sha256:" + "a" * 64, body=b"x" * 2048)
    assert blob.status_code == 503  # blobs have their own limit (none by default)
    time.sleep(0.2)
    assert provisioner.bring_ups == 1  # only the blob upload was demand


def test_repeated_wrong_keys_from_one_address_get_429_but_a_right_key_passes(proxy):
    client, life, provisioner = proxy(api_keys=("right-key-1",), auth_failures=3)
    wrong = {"Authorization": "Bearer wrong-key"}
    codes = [client.simulate_get("/api/tags", headers=wrong).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]
    assert 1 <= int(client.simulate_get("/api/tags", headers=wrong).headers["Retry-After"]) <= 61
    right = client.simulate_get("/api/tags", headers={"Authorization": "Bearer right-key-1"})
    assert right.status_code == 200  # the same address, but this client has the key
    # Another address is not blocked at all.
    other = client.simulate_get("/api/tags", headers=wrong, remote_addr="10.1.2.3")
    assert other.status_code == 401


def test_requests_without_a_key_never_lock_an_address_out(proxy):
    """A /ui tab left open without a key polls /status every 2 s: 401 each, nothing counted."""
    client, life, provisioner = proxy(api_keys=("right-key-1",), admin_keys=("admin-key-1",),
                                      auth_failures=3)
    codes = {client.simulate_get("/status").status_code for _ in range(10)}
    assert codes == {401}
    for key in ("right-key-1", "admin-key-1"):
        answer = client.simulate_get("/status", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200
    wrong = {"Authorization": "Bearer wrong-key"}
    # The ten keyless requests counted nothing: the limit is still three wrong keys away.
    codes = [client.simulate_get("/status", headers=wrong).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]


def seed(tmp_path, doc):
    """A lifecycle document as an earlier run left it."""
    store = SqliteStore(tmp_path / "state.db")
    assert store.acquire("seed", 5)
    store.save(doc, "seed")
    store.release("seed")
    store.close()


def test_a_used_up_daily_budget_gets_a_503_that_says_so_and_starts_nothing(proxy, tmp_path):
    today = time.strftime("%Y-%m-%d", time.gmtime())
    seed(tmp_path, {"phase": "idle", "gpu_days": {today: 7300.0}, "gpu_seconds": 7300.0})
    client, life, provisioner = proxy(daily_gpu_hours=2.0, hourly_price=1.5, max_hold=30)
    answer = client.simulate_post("/api/chat", json={"model": "llama3.2"})
    assert answer.status_code == 503
    assert answer.json["provisioning"] is False and answer.json["status"] == "idle"
    assert "daily GPU budget of 2 h is used up" in answer.json["error"]
    assert 1 <= int(answer.headers["Retry-After"]) <= 60
    held = client.simulate_post("/api/chat", json={}, headers={"Prefer": "wait=30"})
    assert held.status_code == 503 and "Preference-Applied" not in held.headers  # not held
    openai_answer = client.simulate_post("/v1/chat/completions", json={})
    assert openai_answer.json["error"]["code"] == "budget_exhausted"
    time.sleep(0.3)
    assert provisioner.bring_ups == 0
    gpu = client.simulate_get("/status").json["gpu"]
    assert gpu["budget_used_up"] is True and gpu["today_seconds"] == 7300
    assert gpu["total_cost"] == round(7300 / 3600 * 1.5, 2) and gpu["currency"] == "EUR"


def test_status_shows_gpu_time_and_warm_windows(proxy):
    from proxy.lifecycle.schedule import parse_windows

    client, life, provisioner = proxy(warm_windows=parse_windows("sat-sun 10:00-12:00"))
    status = client.simulate_get("/status").json
    assert status["gpu"]["instance_seconds"] == 0 and status["gpu"]["today_cost"] is None
    assert status["warm_windows"]["windows"] == ["sat,sun 10:00-12:00"]
    assert status["warm_windows"]["timezone"] == "UTC"
    assert status["warm_windows"]["next_start"].endswith("T10:00+00:00")


def test_admin_down_needs_an_admin_key_and_answers_202(proxy):
    client, life, provisioner = proxy(api_keys=("user-key-1",), admin_keys=("admin-key-1",))
    user = client.simulate_post("/admin/down", headers={"Authorization": "Bearer user-key-1"})
    assert user.status_code == 403
    admin = client.simulate_post("/admin/down", headers={"Authorization": "Bearer admin-key-1"})
    assert admin.status_code == 202 and admin.json["provisioning_status"] == "idle"


def test_the_expected_wait_comes_from_the_measured_cold_starts(proxy, tmp_path):
    seed(tmp_path, {"phase": "idle", "cold_starts": [300.0, 420.0, 500.0]})
    client, life, provisioner = proxy()
    status = client.simulate_get("/status").json
    assert status["cold_starts"]["median"] == 420.0
    assert status["expected_wait"] == 420  # for a person: the median cold start
    assert status["retry_after"] == 60  # for clients: capped where the OpenAI SDKs stop
    answer = client.simulate_post("/api/chat", json={})
    assert answer.headers["Retry-After"] == "60"


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # Falcon's WSGI validator
@pytest.mark.parametrize("method", ["TRACE", "CONNECT", "PROPFIND", "BREW"])
def test_a_method_ollama_does_not_use_gets_405_and_does_not_wake_the_gpu(proxy, method):
    client, life, provisioner = proxy()
    answer = client.simulate_request(method, "/api/chat")
    assert answer.status_code == 405
    assert "OPTIONS" in answer.headers["Allow"] and method in answer.json["error"]
    v1 = client.simulate_request(method, "/v1/chat/completions")
    assert v1.status_code == 405 and v1.json["error"]["message"]
    time.sleep(0.2)
    assert provisioner.bring_ups == 0 and life.snapshot().state.phase == "idle"


def test_retry_after_stays_at_least_10_s_once_a_cold_start_is_overdue(proxy, tmp_path):
    """Counting down to 1 would let the OpenAI SDKs spend both their retries in a second."""
    seed(tmp_path, {"phase": "idle", "cold_starts": [0.5]})
    client, life, provisioner = proxy()
    first = client.simulate_post("/api/chat", json={})
    assert first.status_code == 503
    wait_until(lambda: life.snapshot().state.phase == "provisioning", 5, what="provisioning")
    time.sleep(1)  # the typical cold start (0.5 s) has passed: the bring-up is overdue
    for _ in range(3):
        answer = client.simulate_post("/api/chat", json={})
        assert answer.status_code == 503
        assert 10 <= int(answer.headers["Retry-After"]) <= 60
    assert 10 <= client.simulate_get("/status").json["retry_after"] <= 60


@pytest.mark.parametrize("prefer", ["wait=" + "9" * 5000, "wait=99999999999999999999",
                                    "wait=" + "1" * 4301 + ", respond-async"])
def test_a_huge_prefer_wait_is_read_as_the_longest_hold_allowed(proxy, prefer):
    client, life, provisioner = proxy(max_hold=0.3)
    answer = client.simulate_post("/api/chat", json={}, headers={"Prefer": prefer})
    assert answer.status_code == 503
    assert answer.headers.get("Preference-Applied") == "wait=0.3"


def test_the_cold_start_estimate_comes_from_cold_starts_of_the_same_mode(proxy, tmp_path):
    """A stopped server starts again (`restart` here); a new one is made otherwise (`create`):
    each is estimated from its own kind, stage by stage."""
    created = {"stack_update": 60.0, "boot": 90.0, "model_pull": 200.0, "model_load": 8.0,
               "mode": "create"}
    restarted = {"stack_update": 20.0, "boot": 40.0, "model_pull": 1.0, "model_load": 8.0,
                 "mode": "restart"}
    seed(tmp_path, {"phase": "idle", "instance_status": "stopped",
                    "timelines": [created, restarted, {**restarted, "boot": 50.0}]})
    client, life, provisioner = proxy()
    estimate = client.simulate_get("/status").json["cold_start_estimate"]
    assert estimate == {"mode": "restart", "from_cold_starts": 2, "total": 74.0, "stages": {
        "stack_update": 20.0, "boot": 45.0, "model_pull": 1.0, "model_load": 8.0}}


def test_without_a_cold_start_of_its_mode_there_is_no_estimate(proxy, tmp_path):
    seed(tmp_path, {"phase": "idle", "timelines": [{"boot": 40.0, "mode": "restart"}]})
    client, life, provisioner = proxy()
    estimate = client.simulate_get("/status").json["cold_start_estimate"]
    assert estimate == {"mode": "create", "from_cold_starts": 0, "stages": None, "total": None}
