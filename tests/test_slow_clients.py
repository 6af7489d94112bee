"""Slow clients against a real gunicorn (proxy/worker.py): a head sent a byte at a time holds
no thread, so it starves nobody, and one that never completes gets a 408."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from proxy.worker import HEAD_TIMEOUT
from tests.harness import Proxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    # 2 workers x 4 threads: 8 threads that 40 slow clients would hold with plain gthread.
    with Proxy(tmp_path_factory.mktemp("slow"), PROXY_THREADS=4) as proxy:
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
        # 13 bytes, one each 0.5 s: with plain gthread every thread waits on these heads.
        thread = threading.Thread(target=dribble, args=(sock, b"X-Slow: 1\r\n\r\n", 0.5, stop))
        thread.start()
        slow.append((sock, thread))
    try:
        time.sleep(1)  # every slow client is in the middle of its head
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
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=HEAD_TIMEOUT + 30) as sock:
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


def test_clients_that_never_close_their_connections_hold_no_thread(tmp_path):
    # gthread waits up to 2 s in its main loop for each closing client to close too: 16 of
    # them stalled a worker for 32 s; waited in its one thread, 16 s. The poller waits here.
    with Proxy(tmp_path, PROXY_WORKERS=1, PROXY_THREADS=1) as proxy:
        closers = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
                   for _ in range(16)]
        try:
            for sock in closers:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            time.sleep(0.5)
            # Waited for one after another in the worker's one thread, the 16 would hold it
            # for 32 s; in the poller, the thread is free for this request meanwhile.
            assert requests.get(proxy.url + "/status", timeout=5).status_code == 200
            for sock in closers:  # each was answered, then half-closed: it sees the end
                assert b"Ollama is running" in read_response(sock)
        finally:
            for sock in closers:
                sock.close()


def test_a_slow_head_pipelined_behind_a_request_does_not_hold_a_thread(proxy):
    stop = threading.Event()
    slow = []
    for _ in range(12):  # more than the 8 threads
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /status HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n")
        thread = threading.Thread(target=dribble, args=(sock, b"X-Slow: 1\r\n\r\n", 0.5, stop))
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
