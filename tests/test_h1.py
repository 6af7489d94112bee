"""The forwarding client (proxy/h1.py) against a raw socket server that sends exact bytes:
every body framing, kept and dropped connections, interim answers, and broken upstreams."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest

from proxy import h1
from tests.harness import read_message


class RawServer:
    """Answers each request head it reads with what `answer(head)` returns (None: close)."""

    def __init__(self, answer: Callable[[bytes], bytes | None]):
        self.answer = answer
        self.heads: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                message = read_message(conn, buf)
                if message is None:
                    return
                head, body, buf = message
                self.heads.append(head + b"\r\n\r\n" + body)
                reply = self.answer(head)
                if reply is None:
                    return
                conn.sendall(reply)

    def pool(self, read_timeout: float = 5.0) -> h1.Pool:
        return h1.Pool("127.0.0.1", self.port, 4, 2.0, read_timeout)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve():
    servers: list[RawServer] = []

    def start(answer):
        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def body_of(response: h1.Response, size: int = 65536) -> bytes:
    return b"".join(response.read(size))


def test_a_chunked_answer_is_decoded_piece_by_piece_and_its_connection_kept(serve):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" \
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    server = serve(lambda head: chunked)
    pool = server.pool()
    for _ in range(3):
        answer = pool.request("GET", "/", [])
        assert answer.chunked and list(answer.read(3)) == [b"hel", b"lo", b" ", b"wor", b"ld"]
        answer.release()
    assert server.connections == 1


def test_content_length_bodies_end_at_their_length_and_the_next_answer_follows(serve):
    server = serve(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    pool = server.pool()
    first = pool.request("POST", "/api/show", [("Content-Type", "application/json"),
                                               ("Content-Length", "2")], b"{}")
    assert (first.status, body_of(first)) == (200, b"abc")
    first.release()
    second = pool.request("GET", "/", [])
    assert body_of(second) == b"abc"
    assert server.connections == 1
    assert server.heads[0] == (b"POST /api/show HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 2\r\n"
                               b"\r\n{}" % server.port)


def test_an_answer_without_length_reads_to_close_and_its_connection_is_not_kept():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def one() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        conn.close()

    threading.Thread(target=one, daemon=True).start()
    pool = h1.Pool("127.0.0.1", port, 4, 2.0, 5.0)
    answer = pool.request("GET", "/", [])
    assert body_of(answer) == b"until close"
    answer.release()
    assert pool._idle == []  # never reused: its end was the close
    listener.close()


def test_interim_answers_are_skipped_and_head_bodiless_answers_end_at_once(serve):
    server = serve(lambda head: b"HTTP/1.1 100 Continue\r\n\r\n"
                   b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
    pool = server.pool()
    answer = pool.request("DELETE", "/api/delete", [])
    assert answer.status == 204 and answer.finished and answer.header("x-a") == "1"
    answer.release()
    head = serve(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
    answer = head.pool().request("HEAD", "/", [])
    assert answer.finished and body_of(answer) == b""


def test_a_kept_connection_the_upstream_closed_is_replaced_and_the_request_sent_again(serve):
    answers = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", None])
    server = serve(lambda head: next(answers, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    pool = server.pool()
    first = pool.request("GET", "/", [])
    assert body_of(first) == b"ok"
    first.release()
    # The second request reaches the kept connection, whose server then closes it unanswered:
    # the pool sends it again on a new connection.
    second = pool.request("POST", "/api/embed", [("Content-Length", "2")], b"{}")
    assert body_of(second) == b"ok"
    assert server.connections == 2


def test_a_streamed_body_is_not_sent_twice(serve):
    answers = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", None])
    server = serve(lambda head: next(answers, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    pool = server.pool()
    first = pool.request("GET", "/", [])
    body_of(first)
    first.release()
    with pytest.raises(h1.NoAnswer):
        pool.request("POST", "/api/blobs/x", [], iter([b"x"] * 3), chunked=True)
    assert server.connections == 1  # no second connection: the blocks were read once
    assert [head.split(b" ")[1] for head in server.heads] == [b"/", b"/api/blobs/x"]
    assert b"\r\nTransfer-Encoding: chunked\r\n" in server.heads[1]


def test_a_body_cut_short_drops_the_connection(serve):
    server = serve(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
    pool = server.pool(read_timeout=0.3)
    answer = pool.request("GET", "/", [])
    pieces = answer.read(4)
    assert next(pieces) == b"xxxx"
    answer.release()  # not read to its end
    assert pool._idle == []
    with pytest.raises(h1.ReadTimeout):
        body_of(pool.request("GET", "/", []))


@pytest.mark.parametrize("reply", [
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
])
def test_an_answer_that_is_not_http_is_a_protocol_error(serve, reply):
    server = serve(lambda head: reply)
    with pytest.raises(h1.ProtocolError):
        body_of(server.pool().request("GET", "/", []))


def test_a_cr_or_lf_in_a_header_is_refused_before_anything_is_sent(serve):
    server = serve(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(ValueError):
        server.pool().request("GET", "/", [("X-A", "1\r\nX-Injected: 1")])
    with pytest.raises(ValueError):
        server.pool().request("GET", "/ HTTP/1.1\r\nX: y", [])
    assert server.heads == []


def test_refused_and_unresolvable_hosts_are_connect_failures():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(h1.ConnectFailed, match="refused"):
        h1.Pool("127.0.0.1", port, 1, 1.0, 1.0).request("GET", "/", [])
    with pytest.raises(h1.ConnectFailed):
        h1.Pool("no-such-host.invalid", 80, 1, 1.0, 1.0).request("GET", "/", [])


def test_a_client_hanging_up_before_the_answer_drops_the_upstream_connection():
    # The upstream takes the request and works on it (a model loading, stream: false).
    with socket.create_server(("127.0.0.1", 0)) as listener:
        pool = h1.Pool("127.0.0.1", listener.getsockname()[1], 4, 2.0, 30.0)
        client, peer = socket.socketpair()  # the proxy's end of the client's connection, and it
        raised: list[BaseException] = []

        def forward() -> None:
            try:
                pool.request("POST", "/api/chat", [], b"{}", client=client)
            except BaseException as exc:  # the test looks at what it was
                raised.append(exc)

        thread = threading.Thread(target=forward)
        thread.start()
        upstream, _ = listener.accept()
        upstream.settimeout(10)
        assert read_message(upstream) is not None
        peer.close()  # the client hangs up
        thread.join(timeout=10)
        assert raised and isinstance(raised[0], h1.ClientGone)
        assert upstream.recv(1) == b""  # the upstream's connection is closed: it stops work
        upstream.close()
        client.close()


def test_a_client_sending_more_before_the_answer_still_gets_it():
    # Bytes from the client meanwhile are a pipelined request, not a hang-up.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        pool = h1.Pool("127.0.0.1", listener.getsockname()[1], 4, 2.0, 30.0)
        client, peer = socket.socketpair()
        answers: list[h1.Response] = []
        thread = threading.Thread(
            target=lambda: answers.append(pool.request("GET", "/", [], client=client)))
        thread.start()
        upstream, _ = listener.accept()
        with upstream:
            assert read_message(upstream) is not None
            peer.sendall(b"GET /next HTTP/1.1\r\n\r\n")
            upstream.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            thread.join(timeout=10)
        assert answers and answers[0].status == 200 and body_of(answers[0]) == b"ok"
        assert client.recv(64) == b"GET /next HTTP/1.1\r\n\r\n"  # left there, not consumed
        client.close()
        peer.close()
