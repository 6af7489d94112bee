"""Requests the server (uvicorn's httptools protocol, proxy/http/server.py) cannot parse get their
status with the proxy's JSON `error` body (not plain text), and the worker goes on serving."""

from __future__ import annotations

import json
import socket

import pytest
import requests

from tests.harness import Proxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    with Proxy(tmp_path_factory.mktemp("rejections")) as proxy:
        yield proxy


def exchange(proxy: Proxy, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /status HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
    (b"G\x00T /status HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /status HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /status HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n", 431),
    (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
], ids=["request-line", "method", "version", "header-name", "uri-length", "header-count",
        "gzip-not-chunked", "empty-transfer-coding", "header-size"])
def test_a_request_the_server_cannot_parse_gets_a_json_error(proxy, request_bytes, status):
    got, headers, body = exchange(proxy, request_bytes)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]
    assert requests.get(proxy.url + "/", timeout=5).status_code == 200
