"""Streams through a real gunicorn (one worker, its event loop): many at once, a kept-alive
connection after a stream, a client that stops reading (backpressure, then dropped after
PROXY_READ_TIMEOUT with its upstream), and an upstream that falls silent mid-stream."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import requests

from tests.harness import Proxy, chunked_length, read_message, upstream_env, wait_until
from tests.procfs import figures

pytestmark = pytest.mark.slow


def chat(stream: bool = True, **options) -> dict:
    return {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
            "stream": stream, **options}


@pytest.fixture
def ready(tmp_path):
    """A ready proxy with one worker; streams of 30 chunks, 0.1 s apart."""
    env = upstream_env(tmp_path, "--chunk-interval", "0.1", "--chunks", "30",
                       PROXY_WORKERS="1", PROXY_READ_TIMEOUT="2")
    with Proxy(tmp_path, **env) as proxy:
        requests.post(proxy.url + "/admin/up", timeout=10).raise_for_status()
        proxy.wait_phase("ready")
        yield proxy


def test_many_streams_on_one_worker_all_stream_at_once(ready):
    streams = 40
    firsts: list[float] = []
    lasts: list[float] = []
    lines: list[int] = []

    def one() -> None:
        with requests.post(ready.url + "/api/chat", json=chat(), stream=True, timeout=30) as r:
            count = 0
            for _ in r.iter_lines():
                count += 1
                if count == 1:
                    firsts.append(time.monotonic())
            lasts.append(time.monotonic())
            lines.append(count)

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    # With every stream open, the worker answers a request that is not a stream.
    shown = requests.post(ready.url + "/api/show", json={"model": "llama3.2"}, timeout=5)
    assert shown.status_code == 200
    for thread in threads:
        thread.join(timeout=60)
    assert lines == [31] * streams  # 30 tokens and the done line, for every stream
    # Every stream had begun before the first one ended: none waited for another.
    assert max(firsts) < min(lasts)


def test_the_connection_is_kept_alive_after_a_stream(ready):
    conn = http.client.HTTPConnection("127.0.0.1", ready.port, timeout=10)
    conn.request("POST", "/api/chat", body=json.dumps(chat(options={"num_predict": 3})),
                 headers={"Content-Type": "application/json"})
    first = conn.getresponse()
    assert first.getheader("Transfer-Encoding") == "chunked"
    assert [json.loads(line) for line in first.read().splitlines()][-1]["done"] is True
    sock = conn.sock
    assert sock is not None  # http.client drops a connection the server said it would close
    conn.request("POST", "/api/show", body=json.dumps({"model": "llama3.2"}),
                 headers={"Content-Type": "application/json"})
    second = conn.getresponse()
    assert second.status == 200 and json.loads(second.read())["details"]
    assert conn.sock is sock


def test_a_client_that_stops_reading_holds_no_more_than_a_buffer(ready):
    size = 256 << 20
    worker, = ready.workers()
    before = figures(worker).rss_kib
    with socket.create_connection(("127.0.0.1", ready.port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.sendall(f"GET /api/__download?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += client.recv(65536)
        head, _, buf = buf.partition(b"\r\n\r\n")  # buf: whatever of the body came with it
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        time.sleep(1.0)  # not reading (less than the read timeout): the proxy stops reading too
        paused = figures(worker).rss_kib
        received, ended = chunked_length(client, buf)
    assert (paused - before) < 50 * 1024  # KiB: a 256 MiB body is not buffered
    assert (received, ended) == (size, True)  # every byte came once the client read, and the end


def test_a_client_that_takes_nothing_for_the_read_timeout_is_dropped(ready):
    size = 256 << 20
    with socket.create_connection(("127.0.0.1", ready.port)) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.sendall(f"GET /api/__download?size={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        wait_until(lambda: ready.status()["in_flight"] == 1, 5, what="the download in flight")
        # PROXY_READ_TIMEOUT is 2 s: the stalled client is let go, and its upstream with it.
        wait_until(lambda: ready.status()["in_flight"] == 0, 10, what="the stalled client dropped")
        client.settimeout(10)
        received = 0
        while data := client.recv(1 << 20):
            received += len(data)
    assert received < size  # cut off: the connection was closed without the whole body


def test_an_upstream_silent_mid_stream_ends_it_with_an_error_line(ready):
    # X-Fake-Interval paces this stream at 5 s a chunk, past PROXY_READ_TIMEOUT (2 s).
    started = time.monotonic()
    answer = requests.post(ready.url + "/api/chat", json=chat(), stream=True, timeout=30,
                           headers={"X-Fake-Interval": "5"})
    lines = [json.loads(line) for line in answer.iter_lines()]
    assert lines[-1] == {"error": "the upstream connection broke mid-stream"}
    assert time.monotonic() - started < 10
    # The stream has ended for the lifecycle too (the shared count follows within a tick).
    wait_until(lambda: ready.status()["in_flight"] == 0, 5, what="no request in flight")


def test_a_request_sent_mid_stream_waits_for_the_stream_and_does_not_cut_it(ready):
    # The next request sits on the socket while the stream runs: data there is a pipelined
    # request, answered once the stream has ended, not a hang-up.
    body = json.dumps(chat(options={"num_predict": 5})).encode()
    show = json.dumps({"model": "llama3.2"}).encode()
    with socket.create_connection(("127.0.0.1", ready.port)) as client:
        client.settimeout(10)
        client.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        buf = b""
        while b'"done":false' not in buf:  # the stream has begun
            buf += client.recv(65536)
        assert buf.startswith(b"HTTP/1.1 200")
        client.sendall(b"POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%b" % (len(show), show))
        while b"0\r\n\r\n" not in buf:
            buf += client.recv(65536)
        stream, _, rest = buf.partition(b"0\r\n\r\n")
        assert b'"done":true' in stream  # the whole stream, up to its last line
        answer = read_message(client, rest)
    assert answer is not None and answer[0].startswith(b"HTTP/1.1 200")
    assert json.loads(answer[1])["details"]


def test_streams_whose_clients_never_close_do_not_stall_the_worker(ready):
    # A stream asked with `Connection: close` ends with the server closing its side; clients
    # that never close theirs must not stall the worker (gthread waited 2 s for each in its
    # main loop, while no other connection of the worker moved).
    body = json.dumps(chat(options={"num_predict": 2})).encode()
    clients = [socket.create_connection(("127.0.0.1", ready.port), timeout=10) for _ in range(8)]
    try:
        for client in clients:
            client.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                           % (len(body), body))
        for client in clients:  # each stream whole, then the server's end of the connection
            data = b""
            while chunk := client.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"0\r\n\r\n")
        # None of the 8 has closed: waited for one after another in the main loop, 16 s.
        assert requests.get(ready.url + "/status", timeout=5).status_code == 200
    finally:
        for client in clients:
            client.close()
