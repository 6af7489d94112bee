"""Slow and hostile clients against a real gunicorn (uvicorn's worker, proxy/http/server.py): a head
sent a byte at a time starves nobody, one that never completes gets a 408, a body that stalls
gets a 408, a connection that sends nothing (or only the unread rest of a body) is closed, and
beyond PROXY_MAX_CONNECTIONS a worker answers 503."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from tests.harness import Proxy, read_message, upstream_env, wait_until

pytestmark = pytest.mark.slow


CLIENT_TIMEOUT = 4.0  # PROXY_CLIENT_TIMEOUT here: the slow heads below take 1.3 s


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    # 2 workers: 40 slow clients held every thread of 2 gthread workers x 4 threads.
    state = tmp_path_factory.mktemp("slow")
    env = upstream_env(state, PROXY_CLIENT_TIMEOUT=CLIENT_TIMEOUT, PROXY_IDLE_TIMEOUT=600)
    with Proxy(state, **env) as proxy:
        requests.post(proxy.url + "/admin/up", timeout=10).raise_for_status()
        proxy.wait_phase("ready")
        yield proxy


def dribble(sock: socket.socket, data: bytes, interval: float, stop: threading.Event) -> None:
    for byte in data:
        if stop.wait(interval):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_many_clients_sending_their_heads_slowly_do_not_starve_a_normal_client(proxy):
    stop = threading.Event()
    slow = []
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
        # 13 bytes, one each 0.1 s: with plain gthread every thread waited on these heads.
        thread = threading.Thread(target=dribble, args=(sock, b"X-Slow: 1\r\n\r\n", 0.1, stop))
        thread.start()
        slow.append((sock, thread))
    try:
        time.sleep(0.5)  # every slow client is in the middle of its head
        answers = [requests.get(proxy.url + "/status", timeout=5) for _ in range(20)]
        assert {a.status_code for a in answers} == {200}
        for sock, thread in slow:  # the slow clients are served too once their heads are in
            thread.join(30)
            assert read_response(sock).startswith(b"HTTP/1.1 200")
    finally:
        stop.set()
        for sock, _ in slow:
            sock.close()


def test_a_head_that_never_completes_gets_408_with_a_json_error(proxy):
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT + 30) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\n")
        thread = threading.Thread(target=dribble, args=(sock, b"X" * 1000, 1.0, stop))
        thread.start()
        try:
            answer = read_response(sock)
        finally:
            stop.set()
            thread.join()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert "did not arrive" in json.loads(body)["error"]
    assert requests.get(proxy.url + "/status", timeout=5).status_code == 200


def test_pipelined_requests_on_one_connection_are_all_answered(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /status HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = read_response(sock)
    assert answer.count(b"HTTP/1.1 200") == 3
    assert b"provisioning_status" in answer


def test_a_head_split_across_packets_on_a_kept_alive_connection_is_answered(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        parts = (b"GET /sta", b"tus HTTP/1.1\r\nHo", b"st: x\r\nConnection: close\r\n", b"\r\n")
        for part in parts:
            sock.sendall(part)
            time.sleep(0.3)
        assert b"provisioning_status" in read_response(sock)


def test_clients_that_never_close_their_connections_stall_nothing(tmp_path):
    # gthread waits up to 2 s in its main loop for each closing client to close too: 16 of
    # them stalled a worker for 32 s.
    with Proxy(tmp_path, PROXY_WORKERS=1) as proxy:
        closers = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                   for _ in range(16)]
        try:
            for sock in closers:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            time.sleep(0.5)
            assert requests.get(proxy.url + "/status", timeout=5).status_code == 200
            for sock in closers:  # each was answered, then half-closed: it sees the end
                assert b"Ollama is running" in read_response(sock)
        finally:
            for sock in closers:
                sock.close()


def test_a_slow_head_pipelined_behind_a_request_does_not_hold_a_thread(proxy):
    stop = threading.Event()
    slow = []
    for _ in range(12):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /status HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n")
        thread = threading.Thread(target=dribble, args=(sock, b"X-Slow: 1\r\n\r\n", 0.1, stop))
        thread.start()
        slow.append((sock, thread))
    try:
        time.sleep(1)
        answers = [requests.get(proxy.url + "/status", timeout=5) for _ in range(10)]
        assert {a.status_code for a in answers} == {200}
        for sock, thread in slow:
            thread.join(30)
            assert read_response(sock).count(b"HTTP/1.1 200") == 2
    finally:
        stop.set()
        for sock, _ in slow:
            sock.close()


def test_bodies_that_never_arrive_starve_nobody_and_are_let_go(proxy):
    # Issue 14's reproduction: a request whose body never completes held a thread for good;
    # 6 to 8 of them left `GET /` unanswered. This one needs no key.
    stuck = [socket.create_connection(("127.0.0.1", proxy.port), timeout=30) for _ in range(16)]
    try:
        for sock in stuck:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nab")
        assert requests.get(proxy.url + "/", timeout=5).status_code == 200
        for sock in stuck:  # answered (the route reads no body), then closed once idle
            assert read_message(sock)[0].startswith(b"HTTP/1.1 200")
            sock.sendall(b"cd")  # more of the unread body: no new request, no more time
        for sock in stuck:
            assert sock.recv(65536) == b""  # closed after the keep-alive time (5 s)
    finally:
        for sock in stuck:
            sock.close()


def test_a_forwarded_body_that_stalls_gets_408_and_in_flight_comes_back(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"model\"")
        started = time.monotonic()
        head, body, _ = read_message(sock)
        assert time.monotonic() - started < CLIENT_TIMEOUT + 10
    assert head.startswith(b"HTTP/1.1 408")
    assert "PROXY_CLIENT_TIMEOUT" in json.loads(body)["error"]
    wait_until(lambda: proxy.status()["in_flight"] == 0, 5, what="in_flight back to 0")


def test_a_chunked_body_that_stalls_midway_gets_408(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(b"POST /api/__echo/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n4\r\nabcd\r\n")
        head, body, _ = read_message(sock)
    assert head.startswith(b"HTTP/1.1 408")
    wait_until(lambda: proxy.status()["in_flight"] == 0, 5, what="in_flight back to 0")


def test_a_connection_that_sends_nothing_is_closed(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        started = time.monotonic()
        assert sock.recv(65536) == b""
        assert time.monotonic() - started < CLIENT_TIMEOUT + 10


def test_beyond_the_connection_bound_a_worker_answers_503_in_json(tmp_path):
    with Proxy(tmp_path, PROXY_WORKERS=1, PROXY_MAX_CONNECTIONS=4) as proxy:
        held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                for _ in range(4)]
        try:
            for sock in held:  # kept open: each answered, then idle within the keep-alive time
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_message(sock)[0].startswith(b"HTTP/1.1 200")
            answer = requests.get(proxy.url + "/status", timeout=5)
            assert answer.status_code == 503 and "PROXY_MAX_CONNECTIONS" in answer.json()["error"]
            assert answer.headers["Retry-After"] == "1"
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: requests.get(proxy.url + "/status", timeout=5).status_code == 200, 5,
                   what="answers again once the connections closed")
