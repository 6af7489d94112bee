"""A client that hangs up is let go at once with its upstream, through a real gunicorn: while
the upstream works on the answer (a model loading, a whole answer generated for stream:
false), and mid-stream while the upstream is silent. Ollama stops working on a request whose
connection closed; until the proxy closes its side, the GPU works on for nobody."""

from __future__ import annotations

import json
import socket

import pytest
import requests

from tests.harness import Proxy, upstream_env, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def ready(tmp_path):
    """A ready proxy (1 worker) whose read timeout, a minute, ends nothing here."""
    env = upstream_env(tmp_path, PROXY_WORKERS="1", PROXY_READ_TIMEOUT="60")
    with Proxy(tmp_path, **env) as proxy:
        requests.post(proxy.url + "/admin/up", timeout=10).raise_for_status()
        proxy.wait_phase("ready")
        proxy.upstream = f"http://{env['PROXY_LOCAL_ADDR']}"
        yield proxy


def send_chat(proxy: Proxy, stream: bool, **headers: str) -> socket.socket:
    body = json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                       "stream": stream}).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode()
    client = socket.create_connection(("127.0.0.1", proxy.port))
    client.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n%b\r\n%b" % (len(body), extra, body))
    return client


def cancelled(proxy: Proxy) -> int:
    stats = requests.get(proxy.upstream + "/__stats", timeout=5).json()
    return stats["requests"].get("cancelled", 0)


def test_a_client_hanging_up_before_the_answer_has_the_upstream_stop(ready):
    # The upstream works 30 s on a stream: false answer; the client gives up before.
    with send_chat(ready, stream=False, **{"X-Fake-Think": "30"}):
        wait_until(lambda: ready.status()["in_flight"] == 1, 5, what="the request in flight")
    # Within 10 s, not 30: the proxy closed the upstream connection, and the upstream stopped.
    wait_until(lambda: cancelled(ready) == 1, 10, what="the upstream to see the hang-up")
    wait_until(lambda: ready.status()["in_flight"] == 0, 5, what="the request ended")
    logs = ready.logs()
    assert "the client hung up before the upstream answered" in logs and "Traceback" not in logs
    # The worker's threads are free again: another request is answered.
    answer = requests.post(ready.url + "/api/show", json={"model": "llama3.2"}, timeout=10)
    assert answer.status_code == 200


def test_a_client_hanging_up_while_the_stream_is_silent_ends_it_at_once(ready):
    # The stream's next chunk is 30 s away (X-Fake-Interval), the read timeout a minute:
    # only noticing the hang-up itself frees the stream (and its upstream) sooner.
    with send_chat(ready, stream=True, **{"X-Fake-Interval": "30"}) as client:
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        wait_until(lambda: ready.status()["in_flight"] == 1, 5, what="the stream in flight")
    # Within 20 s: before the upstream's next chunk, which is what ended it until now.
    wait_until(lambda: ready.status()["in_flight"] == 0, 20, what="the stream ended")
    assert "499 /api/chat: the client hung up mid-answer" in ready.logs()
    metrics = requests.get(ready.url + "/metrics", timeout=5).text
    assert 'ollama_exoscale_client_hangups_total{route="/api/chat"} 1.0' in metrics
