"""Doors a hostile client or a new user found open, each tried through a real gunicorn on raw
sockets where the spelling matters: admin routes in every spelling, the upstream's credential
alone, keyless requests that lock nobody out, ready on every worker, secrets kept out of
progress text, malformed bodies answered 400."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.harness import Proxy, fake_ollama_command, read_message, upstream_env, wait_until

pytestmark = pytest.mark.slow

USER = "user-key-0001"
ADMIN = "admin-key-0001"


def raw(proxy: Proxy, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client library normalises the path); the first answer."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request)
        head, body, _ = read_message(sock)
    return int(head.split()[1]), body


def request(method: str, path: str, key: str, body: bytes = b"") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    state = tmp_path_factory.mktemp("doors")
    proxy = Proxy(state, PROXY_API_KEYS=USER, PROXY_ADMIN_KEYS=ADMIN,
                  **upstream_env(state)).start()
    yield proxy
    proxy.stop()
    proxy.kill_upstream()


@pytest.mark.parametrize("path", [
    "//admin/down", "///admin/up", "/%2Fadmin/up", "/admin//down", "/%2fadmin%2fdown",
    "//admin/up/",
])
def test_admin_routes_need_an_admin_key_in_every_spelling(keyed, path):
    status, body = raw(keyed, request("POST", path, USER))
    assert status == 403, body
    assert "admin key" in json.loads(body)["error"]
    assert keyed.status({"Authorization": f"Bearer {ADMIN}"})["provisioning_status"] == "idle"


@pytest.mark.parametrize("method,path", [
    ("POST", "//api/pull"), ("POST", "/api//pull"), ("POST", "/api/pull/"),
    ("POST", "/api/%70ull"), ("POST", "/api%2Fcreate"), ("DELETE", "//api/delete"),
    ("POST", "/api//blobs/sha256:" + "a" * 64), ("POST", "/api/copy//"),
])
def test_the_upstreams_admin_routes_need_an_admin_key_in_every_spelling(keyed, method, path):
    status, body = raw(keyed, request(method, path, USER, b"{}"))
    assert status == 403, (path, body)
    # The same spelling with an admin key reaches the route (503: no GPU server yet).
    status, _ = raw(keyed, request(method, path, ADMIN, b"{}"))
    assert status == 503, path


@pytest.mark.parametrize("path", ["/api/%00chat", "/api/chat%0d%0aX:1", "/api\\pull"])
def test_a_path_that_cannot_be_normalised_is_refused(keyed, path):
    status, body = raw(keyed, request("POST", path, ADMIN, b"{}"))
    assert status == 400
    assert json.loads(body)["error"]


def test_keyless_polling_locks_nobody_out_but_wrong_keys_do(tmp_path):
    with Proxy(tmp_path, PROXY_API_KEYS=USER, PROXY_AUTH_FAILURES=3) as proxy:
        for _ in range(12):  # an open /ui tab without a key
            assert requests.get(proxy.url + "/status", timeout=5).status_code == 401
        ok = requests.get(proxy.url + "/status", headers={"Authorization": f"Bearer {USER}"},
                          timeout=5)
        assert ok.status_code == 200
        wrong = {"Authorization": "Bearer not-a-key"}
        codes = [requests.get(proxy.url + "/status", headers=wrong, timeout=5).status_code
                 for _ in range(8)]
        assert codes[-1] == 429 and codes.count(401) <= 4  # counted over both workers
        ok = requests.get(proxy.url + "/status", headers={"Authorization": f"Bearer {USER}"},
                          timeout=5)
        assert ok.status_code == 200  # a valid key is never answered 429


def test_once_status_says_ready_every_worker_serves(tmp_path):
    """A long tick makes a worker's snapshot seconds old: the one that did not see ready must
    look again before it refuses (wait-then-chat scripts failed one run in five)."""
    env = upstream_env(tmp_path, PROXY_TICK="3", PROXY_WORKERS="4")
    with Proxy(tmp_path, **env) as proxy:
        proxy.workers()
        assert requests.post(proxy.url + "/api/show", json={"model": "llama3.2"},
                             timeout=5).status_code == 503
        wait_until(lambda: proxy.status()["provisioning_status"] == "ready", 30, interval=0.02,
                   what="ready")

        def show(_):  # a fresh connection each: they spread over the four workers
            return requests.post(proxy.url + "/api/show", json={"model": "llama3.2"},
                                 headers={"Connection": "close"}, timeout=10).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(show, range(40)))
        assert codes == [200] * 40


def test_progress_names_the_program_not_its_arguments(tmp_path):
    secret = "hunter2-secret-token"
    addr_env = upstream_env(tmp_path)
    addr_env["PROXY_LOCAL_COMMAND"] = fake_ollama_command(
        "--models", "llama3.2", "--token", secret, "--startup-delay", "2")
    with Proxy(tmp_path, **addr_env) as proxy:
        seen = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            answer = requests.post(proxy.url + "/api/chat", json={}, timeout=5)
            seen.append(answer.text)
            seen.append(json.dumps(proxy.status()))
            time.sleep(0.2)
        text = "\n".join(seen)
        assert "fake_ollama" in text or "python" in text  # the program is named
        assert secret not in text
        assert secret not in proxy.logs()


@pytest.mark.parametrize("chunked", [
    b"-2\r\nab\r\n0\r\n\r\n", b"0x2\r\nab\r\n0\r\n\r\n", b"2\nab\n0\n\n",
    b"2\r\nabcdef\r\n0\r\n\r\n",
])
def test_malformed_chunked_request_bodies_get_400_and_no_traceback(tmp_path, chunked):
    with Proxy(tmp_path, **upstream_env(tmp_path)) as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
        status, body = raw(proxy, (
            b"POST /api/__echo/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + chunked
        ))
        assert status == 400, body
        assert json.loads(body)["error"]
        assert "Traceback" not in proxy.logs()
        # The worker is fine: the next request is served.
        assert requests.get(proxy.url + "/api/__echo/n", timeout=5).status_code == 200
