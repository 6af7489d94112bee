"""Forwarding through a real gunicorn to the test upstream: what passes unchanged, what is
dropped, and how streams, large bodies, errors and disconnects behave."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import pytest
import requests

from tests.harness import Proxy, fake_ollama_command, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ready(tmp_path_factory):
    """A proxy whose upstream is up; yields (proxy, upstream_url)."""
    state = tmp_path_factory.mktemp("forward")
    addr = f"127.0.0.1:{free_port()}"
    proxy = Proxy(
        state,
        PROXY_LOCAL_COMMAND=fake_ollama_command("--models", "llama3.2,qwen3:8b"),
        PROXY_LOCAL_ADDR=addr,
    ).start()
    requests.post(proxy.url + "/api/chat", json={}, timeout=5)
    proxy.wait_phase("ready")
    yield proxy, f"http://{addr}"
    proxy.stop()
    proxy.kill_upstream()


def test_method_path_query_headers_and_body_pass_unchanged(ready):
    proxy, upstream = ready
    body = b'{"model": "llama3.2", "x": "\xc3\xa9"}'
    answer = requests.put(
        proxy.url + "/api/__echo/a/b:c",
        params={"q": "1 2", "r": "x"},
        data=body,
        headers={"Content-Type": "application/json", "X-Custom": "kept",
                 "Authorization": "Bearer client-token"},
        timeout=10,
    )
    assert answer.status_code == 200
    echo = answer.json()
    assert echo["method"] == "PUT"
    assert echo["path"] == "/api/__echo/a/b:c"
    assert echo["query"] == "q=1+2&r=x"
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    headers = {k.lower(): v for k, v in echo["headers"].items()}
    assert headers["x-custom"] == "kept"
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] == "Bearer client-token"  # no proxy keys: passed through
    assert headers["host"] == upstream.removeprefix("http://")


def test_hop_by_hop_and_connection_listed_headers_are_dropped(ready):
    proxy, _ = ready
    answer = requests.get(
        proxy.url + "/api/__echo/h",
        headers={"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1",
                 "Keep-Alive": "timeout=5", "Proxy-Authorization": "Basic eA==",
                 "TE": "trailers", "X-Stays": "yes"},
        timeout=10,
    )
    headers = {k.lower() for k in answer.json()["headers"]}
    assert "x-stays" in headers
    assert not headers & {"x-secret-hop", "keep-alive", "proxy-authorization", "te"}


def test_delete_with_a_body_reaches_the_upstream(ready):
    proxy, _ = ready
    answer = requests.delete(proxy.url + "/api/delete", json={"model": "qwen3:8b"}, timeout=10)
    assert answer.status_code == 200
    again = requests.delete(proxy.url + "/api/delete", json={"model": "qwen3:8b"}, timeout=10)
    assert again.status_code == 404
    assert "not found" in again.json()["error"]


def test_upstream_errors_keep_status_and_error_body(ready):
    proxy, _ = ready
    answer = requests.post(proxy.url + "/api/chat", json={"model": "nope"}, timeout=10)
    assert answer.status_code == 404
    assert answer.json() == {"error": 'model "nope" not found, try pulling it first'}


def test_a_blob_upload_streams_through_without_a_length(ready):
    proxy, _ = ready
    block = os.urandom(1 << 20)
    digest = hashlib.sha256(block * 64).hexdigest()

    def body():
        for _ in range(64):  # 64 MiB, sent chunked
            yield block

    path = f"/api/blobs/sha256:{digest}"
    assert requests.head(proxy.url + path, timeout=10).status_code == 404
    answer = requests.post(proxy.url + path, data=body(), timeout=60)
    assert answer.status_code == 201, answer.text
    assert requests.head(proxy.url + path, timeout=10).status_code == 200
    wrong = requests.post(proxy.url + "/api/blobs/sha256:" + "0" * 64, data=block, timeout=60)
    assert wrong.status_code == 400


def test_a_large_download_arrives_intact(ready):
    proxy, _ = ready
    size = 200 * (1 << 20)
    digest = hashlib.sha256()
    with requests.get(proxy.url + f"/api/__download?size={size}", stream=True,
                      timeout=60) as answer:
        assert answer.status_code == 200
        for chunk in answer.iter_content(1 << 20):
            digest.update(chunk)
    with requests.get(f"{ready[1]}/__download?size={size}", stream=True, timeout=60) as direct:
        expected = hashlib.sha256()
        for chunk in direct.iter_content(1 << 20):
            expected.update(chunk)
    assert digest.hexdigest() == expected.hexdigest()


def test_a_client_that_goes_away_mid_stream_closes_the_upstream_stream(ready):
    proxy, upstream = ready
    answer = requests.post(
        proxy.url + "/api/generate",
        json={"model": "llama3.2", "prompt": "x", "options": {"num_predict": 200}},
        headers={"X-Fake-Interval": "0.1"}, stream=True, timeout=10,
    )
    lines = answer.iter_lines()
    next(lines), next(lines)
    assert requests.get(upstream + "/__stats", timeout=5).json()["active_streams"] >= 1
    answer.close()
    wait_until(
        lambda: requests.get(upstream + "/__stats", timeout=5).json()["active_streams"] == 0,
        10, what="the upstream stream to end",
    )
    wait_until(lambda: proxy.status()["in_flight"] == 0, 5, what="in_flight back to 0")


def test_an_upstream_that_breaks_mid_stream_ends_with_an_error_line(ready):
    proxy, _ = ready
    started = time.monotonic()
    answer = requests.post(
        proxy.url + "/api/chat",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Fake-Fail-After": "2"}, stream=True, timeout=10,
    )
    lines = [json.loads(line) for line in answer.iter_lines()]
    assert time.monotonic() - started < 10
    assert len(lines) == 3
    assert "error" in lines[-1]


def test_openai_stream_is_forwarded_as_server_sent_events(ready):
    proxy, _ = ready
    answer = requests.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
              "stream": True}, stream=True, timeout=10,
    )
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [line for line in answer.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"


def test_an_unreachable_upstream_gets_a_502_json_error(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    with Proxy(tmp_path, PROXY_LOCAL_COMMAND=fake_ollama_command(), PROXY_LOCAL_ADDR=addr,
               PROXY_IDLE_TIMEOUT=600) as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
        pid = json.loads((tmp_path / "local-upstream.json").read_text())["pid"]
        os.killpg(pid, signal.SIGKILL)
        answer = requests.post(proxy.url + "/api/chat", json={"model": "llama3.2"}, timeout=10)
        assert answer.status_code == 502
        assert "unreachable" in answer.json()["error"]
        v1 = requests.post(proxy.url + "/v1/chat/completions", json={}, timeout=10)
        assert v1.status_code == 502 and "unreachable" in v1.json()["error"]["message"]


def test_response_headers_are_the_upstreams_once_each(ready):
    proxy, _ = ready
    import http.client

    connection = http.client.HTTPConnection(proxy.url.removeprefix("http://"), timeout=10)
    connection.request("POST", "/api/show", body=b'{"model": "llama3.2"}',
                       headers={"Content-Type": "application/json"})
    answer = connection.getresponse()
    names = [name.lower() for name, _ in answer.getheaders()]
    answer.read()
    connection.close()
    assert answer.status == 200
    assert names.count("date") == 1 and names.count("server") == 1
    assert names.count("content-type") == 1 and names.count("content-length") == 1


def test_a_chunked_body_over_the_limit_is_cut_with_413(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    with Proxy(tmp_path, PROXY_LOCAL_COMMAND=fake_ollama_command(), PROXY_LOCAL_ADDR=addr,
               PROXY_MAX_BODY_MB="1") as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")

        def body():
            for _ in range(4):
                yield b"x" * (512 * 1024)

        answer = requests.post(proxy.url + "/api/__echo/big", data=body(), timeout=30)
        assert answer.status_code == 413, answer.text
        assert "larger than" in answer.json()["error"]
        small = requests.post(proxy.url + "/api/__echo/small", data=iter([b"ok"]), timeout=30)
        assert small.status_code == 200 and small.json()["body_length"] == 2
