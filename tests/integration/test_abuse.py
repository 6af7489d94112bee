"""Requests shaped to abuse a proxy, sent on raw sockets to a real gunicorn: none reaches
anything but the intended route of the one configured upstream."""

from __future__ import annotations

import json
import socket

import pytest
import requests

from tests.harness import Proxy, fake_ollama_command, free_port, read_message

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ready(tmp_path_factory):
    state = tmp_path_factory.mktemp("abuse")
    addr = f"127.0.0.1:{free_port()}"
    proxy = Proxy(state, PROXY_LOCAL_COMMAND=fake_ollama_command(), PROXY_LOCAL_ADDR=addr).start()
    requests.post(proxy.url + "/api/chat", json={}, timeout=5)
    proxy.wait_phase("ready")
    yield proxy, addr
    proxy.stop()
    proxy.kill_upstream()


def raw(proxy: Proxy, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are; return the status and body of the first response."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request)
        head, body, _ = read_message(sock)
    return int(head.split()[1]), body


def test_an_absolute_uri_never_makes_the_proxy_forward_to_the_host_it_names(ready):
    proxy, upstream = ready
    status, body = raw(proxy, (
        b"GET http://169.254.169.254/api/__echo/meta HTTP/1.1\r\n"
        b"Host: 169.254.169.254\r\nConnection: close\r\n\r\n"
    ))
    assert status == 200
    echo = json.loads(body)
    assert echo["path"] == "/api/__echo/meta"
    assert echo["headers"]["Host"] == upstream  # the configured upstream, not the named host


def test_a_host_header_never_chooses_the_upstream(ready):
    proxy, upstream = ready
    answer = requests.get(proxy.url + "/api/__echo/h", headers={"Host": "evil.example"},
                          timeout=10)
    assert answer.json()["headers"]["Host"] == upstream


@pytest.mark.parametrize("path", [
    b"/api/../status", b"/api/%2e%2e/status", b"/api/__echo/a/%2E%2E/%2E%2E/status",
    b"/v1/./models",
])
def test_dot_segments_in_any_spelling_are_refused(ready, path):
    proxy, _ = ready
    status, body = raw(proxy, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 400
    assert "error" in json.loads(body)


def test_conflicting_content_length_and_transfer_encoding_is_rejected(ready):
    proxy, _ = ready
    status, _ = raw(proxy, (
        b"POST /api/__echo/s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"0\r\n\r\nGET /status HTTP/1.1\r\n\r\n"
    ))
    assert status == 400


def test_two_content_lengths_are_rejected(ready):
    proxy, _ = ready
    status, _ = raw(proxy, (
        b"POST /api/__echo/s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 5\r\n"
        b"Connection: close\r\n\r\nhello"
    ))
    assert status == 400


def test_an_oversized_header_is_refused_without_crashing_the_worker(ready):
    proxy, _ = ready
    status, _ = raw(proxy, (
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n"
        b"Connection: close\r\n\r\n"
    ))
    assert status in (400, 431)
    assert requests.get(proxy.url + "/api/tags", timeout=5).status_code == 200
