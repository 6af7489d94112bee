"""The whole lifecycle through a real gunicorn (uvicorn's worker class, several workers), the
`local` provisioner starting the test upstream, and the real `ollama` and `openai` clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import ollama
import openai
import pytest
import requests

from tests.harness import Proxy, starts, upstream_env, wait_until

pytestmark = pytest.mark.slow


CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}  # streamed



def test_ollama_client_sees_503_then_a_stream_whose_chunks_arrive_as_produced(tmp_path):
    env = upstream_env(tmp_path, "--chunk-interval", "0.1", "--chunks", "12")
    with Proxy(tmp_path, **env) as proxy:
        client = ollama.Client(host=proxy.url)
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 503
        assert "starting" in caught.value.error
        raw = requests.post(proxy.url + "/api/chat", json={"model": "llama3.2"}, timeout=5)
        assert raw.status_code == 503 and int(raw.headers["Retry-After"]) >= 1
        proxy.wait_phase("ready")

        arrivals = []
        stream = client.chat(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        for chunk in stream:
            arrivals.append((time.monotonic(), chunk))
        contents = [c.message.content for _, c in arrivals if not c.done]
        assert len(contents) == 12
        assert arrivals[-1][1].done
        # Streamed, not buffered: the first token arrived long before the upstream finished.
        assert arrivals[-1][0] - arrivals[0][0] > 0.8


def test_openai_client_sees_503_then_streams_server_sent_events(tmp_path):
    env = upstream_env(tmp_path, "--chunk-interval", "0.1", "--chunks", "10")
    with Proxy(tmp_path, **env) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}]
            )
        assert caught.value.status_code == 503
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert caught.value.body["code"] == "provisioning"
        proxy.wait_phase("ready")
        arrivals = []
        for event in client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            arrivals.append(time.monotonic())
            last = event
        assert len(arrivals) >= 10
        assert last.choices[0].finish_reason == "stop"
        assert arrivals[-1] - arrivals[0] > 0.7


def test_a_long_stream_outlives_gunicorns_worker_timeout(tmp_path):
    env = upstream_env(
        tmp_path, "--chunk-interval", "0.25", "--chunks", "24", PROXY_WORKER_TIMEOUT="2"
    )
    with Proxy(tmp_path, **env) as proxy:
        requests.post(proxy.url + "/api/generate", json={}, timeout=5)
        proxy.wait_phase("ready")
        started = time.monotonic()
        lines = []
        with requests.post(
            proxy.url + "/api/generate", json={"model": "llama3.2", "prompt": "x"},
            stream=True, timeout=30,
        ) as answer:
            for line in answer.iter_lines():
                lines.append(json.loads(line))
        assert time.monotonic() - started > 5  # well past the 2 s worker timeout
        assert lines[-1]["done"] is True and len(lines) == 25
        assert "WORKER TIMEOUT" not in proxy.logs()


def test_idle_removal_waits_for_the_stream_then_happens_after_the_timeout(tmp_path):
    env = upstream_env(tmp_path, "--chunk-interval", "0.2", "--chunks", "30",
                       PROXY_IDLE_TIMEOUT="2")
    with Proxy(tmp_path, **env) as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
        phases = []
        with requests.post(proxy.url + "/api/chat", json=CHAT, stream=True, timeout=30) as answer:
            for _ in answer.iter_lines():
                phases.append(proxy.status()["provisioning_status"])
        ended = time.monotonic()
        assert len(phases) == 31  # 30 chunks and the last line
        assert set(phases) == {"ready"}  # 6 s of stream, idle timeout 2 s: never removed
        idle = proxy.wait_phase("idle", timeout=15)
        assert time.monotonic() - ended >= 2
        assert idle["instance_status"] == "absent"
        assert starts(tmp_path) == 1
        assert not (tmp_path / "local-upstream.json").exists()  # stopped and forgotten


def test_many_workers_and_concurrent_cold_requests_start_one_upstream(tmp_path):
    env = upstream_env(tmp_path, "--startup-delay", "0.5", PROXY_WORKERS="4")
    with Proxy(tmp_path, **env) as proxy:
        barrier = threading.Barrier(40)

        def cold(_):
            barrier.wait()
            return requests.post(proxy.url + "/api/embed", json={"input": "x"}, timeout=10)

        with ThreadPoolExecutor(40) as pool:
            answers = list(pool.map(cold, range(40)))
        assert {a.status_code for a in answers} <= {503, 200}
        proxy.wait_phase("ready")
        after = [requests.post(proxy.url + "/api/embed", json={"model": "llama3.2",
                                                                "input": "x"}, timeout=10)
                 for _ in range(8)]
        assert {a.status_code for a in after} == {200}
        assert starts(tmp_path) == 1


def test_a_burst_of_streams_all_run_at_once(tmp_path):
    """6 streams at once on 2 workers: all 6 run, none queues behind another."""
    env = upstream_env(tmp_path, PROXY_WORKERS="2")
    with Proxy(tmp_path, **env) as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
        upstream = "http://" + env["PROXY_LOCAL_ADDR"]
        barrier = threading.Barrier(6)

        def stream(_):
            barrier.wait()
            return requests.post(
                proxy.url + "/api/generate",
                json={"model": "llama3.2", "prompt": "x", "options": {"num_predict": 40}},
                headers={"X-Fake-Interval": "0.25"}, stream=True, timeout=30,
            )

        with ThreadPoolExecutor(6) as pool:
            streams = pool.map(stream, range(6))
            wait_until(  # a stream that waited for a busy worker would start 10 s later
                lambda: requests.get(upstream + "/__stats", timeout=5).json()["active_streams"]
                == 6, 8, what="all six streams running upstream at once",
            )
            for answer in streams:
                answer.close()


def test_a_restarted_proxy_adopts_the_running_upstream(tmp_path):
    env = upstream_env(tmp_path)
    proxy = Proxy(tmp_path, **env).start()
    try:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
    finally:
        proxy.stop()
    with Proxy(tmp_path, **env) as again:
        again.wait_phase("ready")
        answer = requests.post(again.url + "/api/chat", json={"model": "llama3.2",
                                                              "stream": False}, timeout=10)
        assert answer.status_code == 200
        assert starts(tmp_path) == 1


def test_status_command_prints_a_table(tmp_path):
    env = upstream_env(tmp_path)
    with Proxy(tmp_path, **env) as proxy:
        result = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "status", "--url", proxy.url],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert "phase" in result.stdout and "idle" in result.stdout
        raw = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "status", "--url", proxy.url, "--json"],
            capture_output=True, text=True, timeout=30,
        )
        assert json.loads(raw.stdout)["provisioning_status"] == "idle"
    gone = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "status", "--url", proxy.url],
        capture_output=True, text=True, timeout=30,
    )
    assert gone.returncode == 3 and "no proxy answers" in gone.stderr


def test_a_bad_config_value_stops_serve_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve"],
        env={"PATH": "/usr/bin:/bin", "PROXY_IDLE_TIMEOUT": "soon"},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "PROXY_IDLE_TIMEOUT='soon'" in result.stderr



def test_sigterm_during_provisioning_lets_the_step_finish_and_a_restart_resumes(tmp_path):
    env = upstream_env(tmp_path, "--startup-delay", "2")
    proxy = Proxy(tmp_path, **env).start()
    try:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("provisioning")
    finally:
        started = time.monotonic()
        code = proxy.stop()
    assert code == 0
    assert time.monotonic() - started < 30
    assert starts(tmp_path) == 1  # the bring-up step ran to its end, not cut off
    with Proxy(tmp_path, **env) as again:
        again.wait_phase("ready")
        assert starts(tmp_path) == 1  # resumed and adopted, never a second server


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_metrics_sum_every_worker(tmp_path):
    env = upstream_env(tmp_path, PROXY_WORKERS="3")
    with Proxy(tmp_path, **env) as proxy:
        for _ in range(12):  # spread over the workers by the kernel
            requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
        for _ in range(5):
            requests.post(proxy.url + "/api/show", json={"model": "llama3.2"}, timeout=5)
        text = requests.get(proxy.url + "/metrics", timeout=5).text
        requested = "ollama_exoscale_requests_total"
        assert metric(text, requested, route="/api/chat", outcome="unavailable") >= 12
        assert metric(text, requested, route="/api/show", outcome="forwarded") == 5
        assert metric(text, "ollama_exoscale_phase", phase="ready") == 1
        assert metric(text, "ollama_exoscale_cold_start_seconds_count") == 1
        assert metric(text, "ollama_exoscale_gpu_seconds_total") > 0
        assert metric(text, "ollama_exoscale_gpu_seconds_today") > 0


def test_up_wait_shows_progress_until_ready_with_an_admin_key(tmp_path):
    env = upstream_env(tmp_path, "--startup-delay", "1", PROXY_API_KEYS="user-key-123",
                       PROXY_ADMIN_KEYS="admin-key-123")
    with Proxy(tmp_path, **env) as proxy:
        denied = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "up", "--url", proxy.url, "--key",
             "user-key-123"], capture_output=True, text=True, timeout=30,
        )
        assert denied.returncode == 1 and "admin key" in denied.stderr
        result = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "up", "--wait", "--url", proxy.url],
            env={**os.environ, "OLLAMA_API_KEY": "admin-key-123"},
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) >= 2 and lines[-1].endswith("ready: ready")
        assert any("s to go (no cold start measured yet)" in line for line in lines)
        assert any("provisioning" in line or "starting" in line for line in lines[:-1])
        assert "admin-key-123" not in proxy.logs() and "user-key-123" not in proxy.logs()
        waited = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "wait", "--url", proxy.url, "--key",
             "user-key-123", "--timeout", "5"], capture_output=True, text=True, timeout=30,
        )
        assert waited.returncode == 0


def test_down_lets_the_stream_end_then_removes_the_upstream(tmp_path):
    env = upstream_env(tmp_path, "--chunk-interval", "0.2", "--chunks", "15",
                       PROXY_ADMIN_KEYS="admin-key-123", PROXY_HOURLY_PRICE="2")
    admin = {"Authorization": "Bearer admin-key-123"}
    with Proxy(tmp_path, **env) as proxy:
        requests.post(proxy.url + "/api/chat", json={}, headers=admin, timeout=5)
        proxy.wait_phase("ready", headers=admin)
        lines = []
        with requests.post(proxy.url + "/api/chat", json=CHAT, headers=admin, stream=True,
                           timeout=30) as answer:
            iterator = answer.iter_lines()
            lines.append(json.loads(next(iterator)))  # the stream runs
            down = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "down", "--wait", "--url", proxy.url,
                 "--timeout", "60"],
                env={**os.environ, "OLLAMA_API_KEY": "admin-key-123"},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            lines += [json.loads(line) for line in iterator]
        out, err = down.communicate(timeout=60)
        assert down.returncode == 0, err
        assert lines[-1]["done"] is True and len(lines) == 16  # not cut
        assert "requests in flight to end" in out and out.splitlines()[-1].startswith("[")
        status = requests.get(proxy.url + "/status", headers=admin, timeout=5).json()
        assert status["provisioning_status"] == "idle" and status["instance_status"] == "absent"
        assert status["gpu"]["total_seconds"] >= 3 and status["gpu"]["total_cost"] is not None
        assert not (tmp_path / "local-upstream.json").exists()
        table = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "status", "--url", proxy.url, "--key",
             "admin-key-123"], capture_output=True, text=True, timeout=30,
        ).stdout
        assert "GPU time" in table and "in all" in table and "EUR today" in table


def test_api_keys_work_with_the_real_clients_and_stop_everyone_else(tmp_path, monkeypatch):
    key = "user-key-1234567"
    env = upstream_env(tmp_path, PROXY_API_KEYS=key)
    with Proxy(tmp_path, **env) as proxy:
        # ollama-python: headers=, or OLLAMA_API_KEY in the environment.
        listed = ollama.Client(host=proxy.url, headers={"Authorization": f"Bearer {key}"}).list()
        assert [m.model for m in listed.models] == ["llama3.2:latest"]
        monkeypatch.setenv("OLLAMA_API_KEY", key)
        assert ollama.Client(host=proxy.url).ps().models == []
        monkeypatch.delenv("OLLAMA_API_KEY")
        with pytest.raises(ollama.ResponseError) as refused:
            ollama.Client(host=proxy.url).list()
        assert refused.value.status_code == 401 and "API key" in refused.value.error
        # The OpenAI SDK: api_key=.
        good = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
        assert [m.id for m in good.models.list()] == ["llama3.2:latest"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=proxy.url + "/v1", api_key="wrong-key-12345",
                          max_retries=0).models.list()
        # Open WebUI's connection key: a Bearer header on /api/tags, then /api/ps (10 s timeout).
        for path in ("/api/tags", "/api/ps"):
            answer = requests.get(proxy.url + path, headers={"Authorization": f"Bearer {key}"},
                                  timeout=10)
            assert answer.status_code == 200 and "models" in answer.json()
        # A demand route with the key wakes the GPU; the key never reaches the upstream's log.
        with pytest.raises(ollama.ResponseError) as waking:
            ollama.Client(host=proxy.url, headers={"Authorization": f"Bearer {key}"}).chat(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        assert waking.value.status_code == 503
        proxy.wait_phase("ready", headers={"Authorization": f"Bearer {key}"})
        chat = ollama.Client(host=proxy.url, headers={"Authorization": f"Bearer {key}"}).chat(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        assert chat.done
        assert key not in proxy.logs()


def test_sigterm_lets_a_running_stream_finish_and_hands_the_lease_over(tmp_path):
    import signal

    from proxy.store.sqlite import SqliteStore

    # A lease of a minute: taken at once afterwards only if it was given up, not expired.
    env = upstream_env(tmp_path, "--chunk-interval", "0.2", "--chunks", "15",
                       PROXY_LEASE_TTL="60")
    proxy = Proxy(tmp_path, **env).start()
    try:
        requests.post(proxy.url + "/admin/up", timeout=5)
        proxy.wait_phase("ready")
        with requests.post(proxy.url + "/api/chat", json=CHAT, stream=True,
                           timeout=30) as answer:
            lines = answer.iter_lines()
            first = json.loads(next(lines))
            proxy.process.send_signal(signal.SIGTERM)  # 3 s of stream still to come
            rest = [json.loads(line) for line in lines]
        assert proxy.process.wait(timeout=40) == 0
    finally:
        proxy.stop()
        proxy.kill_upstream()
    assert first["done"] is False and rest[-1]["done"] is True and len(rest) == 15  # whole
    store = SqliteStore(tmp_path / "state.db")
    try:
        assert store.acquire("the-next-proxy", 60)  # given up on the way out
    finally:
        store.close()
    assert "WORKER TIMEOUT" not in proxy.logs()

