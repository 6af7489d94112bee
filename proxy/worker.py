"""gunicorn's gthread worker, made fair to slow clients and to bursts.

It reads a request's head before it takes a thread:

gthread hands a connection to a pool thread as soon as its first byte arrives, and that
thread then blocks until the request line and headers are complete. A client that sends its
head a byte at a time (slowloris) holds a thread for as long as it likes, and a few dozen
such clients hold every thread of every worker. Here a thread only takes what the socket
already has, without blocking, and gives the connection back to the worker's poller until
the head is complete; a head still incomplete after HEAD_TIMEOUT gets `408`.

gthread also closes a connection gracefully in its main loop: it half-closes and waits up to
2 s for the client to close too. A client that never does stalls every other connection of
the worker for those 2 s. Here the poller waits for it (`Linger`), holding neither the main
loop nor a thread: a client that sends `Connection: close` and never closes costs one entry.

gunicorn answers requests it cannot parse (400, 414, 431, 501) itself, with an HTML page;
here they get the JSON `error` body every other answer of the proxy has.

gthread's workers each accept from the shared socket and queue what they accept for their own
threads. Under a burst (100 streams at once on 2 workers × 32 threads) one worker queued 77
connections behind its 32 threads while the other had threads to spare (bench/RESULTS.md).
Here a worker accepts only while a thread is free, leaving the rest in the listen backlog for
whichever worker frees a thread first. Kept-alive connections wait in the poller, holding no
thread, and are not counted.

gthread hands every kept-alive connection back to its main loop after each answer: a thread
hand-off, a pipe write and two epoll calls before the next request is read. A client that
sends its next request at once (a script, a load test, an SDK in a loop) is served on the
same thread instead, for as long as no other connection waits for a thread.

A streamed answer (a chunked body) holds no thread either: once its head is written, the
worker's poller moves its body (proxy/relay.py), so the number of streams is bounded by
worker_connections, not by threads.

gthread tells the arbiter it is alive (a file's mtime, a syscall) at every turn of its loop,
several times per request; here once a second is enough for a timeout of many seconds.
"""

from __future__ import annotations

import io
import json
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures

from gunicorn import util
from gunicorn.workers import gthread

from .h1 import readable
from .relay import Relay

FIRST_HEAD_GRACE = 0.1  # seconds a new connection's thread waits for its head to arrive
NOTIFY_EVERY = 1.0  # seconds between heartbeats to the arbiter
NEXT_REQUEST_GRACE = 0.001  # seconds a thread waits for a kept-alive client's next request
HEAD_TIMEOUT = 15.0  # seconds a client may take to send a request line and its headers
MAX_HEAD = 64 * 1024  # past this gunicorn's own limits (431, 400) judge the head
_END = b"\r\n\r\n"
_RELAYED = object()  # handle()'s result for a connection whose answer a relay now moves
_LINGER = object()  # handle()'s result for a connection to close once its client has closed
LINGER_TIMEOUT = 2.0  # seconds a closing connection waits for its client to close too


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's util.write_error, with a JSON body instead of an HTML page."""
    body = json.dumps({"error": mesg or reason})
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, (head + body).encode("latin-1", "replace"))


util.write_error = write_json_error  # gunicorn looks it up on its util module at each error


class ThreadWorker(gthread.ThreadWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.busy = 0  # connections handed to the threads and not finished; main loop only
        self._notified = 0.0
        self._handoff = threading.local()  # a request thread's relay, from the app to handle()
        self.relays: set[Relay] = set()  # main loop only
        self.lingering: set[Linger] = set()  # main loop only
        self._expired_at = 0.0

    def load_wsgi(self) -> None:
        super().load_wsgi()
        if not self.cfg.is_ssl:  # the relay writes to the plain socket
            self.wsgi = _Relaying(self.wsgi, self._handoff)

    def notify(self) -> None:
        now = time.monotonic()
        if now - self._notified >= min(NOTIFY_EVERY, self.timeout / 4):
            self._notified = now
            super().notify()

    def enqueue_req(self, conn) -> None:
        self.busy += 1
        if self.busy >= self.cfg.threads:
            self.set_accept_enabled(False)
        super().enqueue_req(conn)

    def finish_request(self, conn, fs) -> None:
        self.busy -= 1  # before: finishing may hand the connection's next request back
        result = None if fs.cancelled() else fs.result()
        relay = getattr(conn, "relay", None)
        if relay is not None and result is _RELAYED:
            self.relays.add(relay)
            relay.start(self.poller, lambda keep_alive: self._relayed(conn, keep_alive))
            return
        if result is _LINGER:
            self._linger(conn)
            return
        super().finish_request(conn, fs)

    def _linger(self, conn) -> None:
        """Close once the client has closed too (RFC 9112 9.6), waiting in the poller."""
        linger = Linger(conn, self.poller, self._lingered)
        self.lingering.add(linger)
        linger.start()

    def _lingered(self, linger: Linger) -> None:
        self.lingering.discard(linger)
        self.nr_conns -= 1  # as gthread's own close counts it
        linger.conn.close()

    def _relayed(self, conn, keep_alive: bool) -> None:
        """A relay has ended: the connection is kept alive (or closed) as gthread would."""
        self.relays.discard(conn.relay)
        conn.relay = None
        if not keep_alive:
            self._linger(conn)
            return
        done: futures.Future = futures.Future()
        done.set_result(keep_alive)
        super().finish_request(conn, done)

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        now = time.monotonic()
        if now - self._expired_at >= 1.0:  # the loop turns at least once a second
            self._expired_at = now
            for relay in list(self.relays):
                relay.expire(now)
            for linger in list(self.lingering):
                linger.expire(now)

    def set_accept_enabled(self, enabled: bool) -> None:
        # gthread's loop re-enables accepting below worker_connections; not while all are busy.
        super().set_accept_enabled(enabled and self.busy < self.cfg.threads)

    def handle(self, conn):
        while True:
            result = self._handle(conn)
            relay = getattr(self._handoff, "relay", None)
            if relay is not None:
                self._handoff.relay = None
                conn.relay = relay
                return _RELAYED
            if result is False:  # a TLS socket too: after shutdown() it reads as a plain one
                return _LINGER
            if result is not True or not self._next_request_here(conn):
                return result

    def _next_request_here(self, conn) -> bool:
        """Whether the kept-alive client's next request is here within NEXT_REQUEST_GRACE,
        and this thread may serve it (no other connection waits for a thread)."""
        if not self.alive or self.cfg.is_ssl or self.tpool._work_queue.qsize():
            return False
        return readable(conn.sock, NEXT_REQUEST_GRACE)

    def _handle(self, conn):
        if self.cfg.is_ssl:
            return super().handle(conn)
        waiting = getattr(conn, "head", None)
        grace = 0.0
        if waiting is None:
            waiting = conn.head = _Head(_take_read_ahead(conn))
            # A client's head follows its connect at once: wait for it briefly, so that the
            # thread (and so the accept limit above) counts the request; slow heads go back.
            grace = FIRST_HEAD_GRACE
        if not waiting.receive(conn.sock, grace):
            return False  # the client went away
        if waiting.complete:
            conn.head = None
            conn.init()
            conn.parser.unreader.unread(bytes(waiting.data))
            conn.data_ready = True
            return super().handle(conn)
        if waiting.expired:
            _send_timeout(conn.sock)
            return False
        conn.data_ready = False
        return gthread._DEFER  # back to the poller until more bytes arrive


class _Relaying:
    """The WSGI app, with a streamed answer handed to a relay once its head is written."""

    def __init__(self, app, handoff: threading.local):
        self.app = app
        self.handoff = handoff

    def __call__(self, environ, start_response):
        result = self.app(environ, start_response)
        if not getattr(result, "relayable", False):
            return result
        response = getattr(start_response, "__self__", None)  # gunicorn's http.wsgi.Response
        if response is None or not response.chunked:  # HTTP/1.0 client: read until close
            return result
        try:
            keep_alive = not response.should_close()
            response.send_headers()
        except BaseException:
            result.close()
            raise
        response.chunked = False  # the relay writes the chunks and the last one, not gunicorn
        relay = self.handoff.relay = Relay(result, response.sock, keep_alive)
        relay.prime()
        return []


class _Head:
    """The bytes of one request head received so far, and when the first of them came."""

    def __init__(self, data: bytes = b""):
        self.data = bytearray(data)
        self.started = time.monotonic()

    def receive(self, sock: socket.socket, grace: float = 0.0) -> bool:
        """Take what the socket has now, waiting at most `grace` s for more; False when the
        client closed."""
        deadline = time.monotonic() + grace
        while len(self.data) < MAX_HEAD and _END not in self.data:
            try:
                block = sock.recv(MAX_HEAD, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                readable(sock, left)
                continue
            except OSError:
                return False
            if not block:
                return False
            self.data += block
        return True

    @property
    def complete(self) -> bool:
        return _END in self.data or len(self.data) >= MAX_HEAD

    @property
    def expired(self) -> bool:
        return time.monotonic() - self.started > HEAD_TIMEOUT


def _take_read_ahead(conn) -> bytes:
    """Bytes of the next request gunicorn already read (pipelined), taken out of its buffer."""
    parser = getattr(conn, "parser", None)
    if parser is None:
        return b""
    data = parser.unreader.buf.getvalue()
    if data:
        parser.unreader.buf = io.BytesIO()
    return data


class Linger:
    """A connection half-closed after its last answer, read until its client closes too (RFC
    9112 9.6: closing at once could reset the answer before the client has read it), or for
    LINGER_TIMEOUT; then `done(self)`. Moved by the worker's poller."""

    def __init__(self, conn, poller: selectors.BaseSelector, done: Callable[[Linger], None]):
        self.conn = conn
        self.poller = poller
        self.deadline = time.monotonic() + LINGER_TIMEOUT
        self._done: Callable[[Linger], None] | None = done

    def start(self) -> None:
        sock = self.conn.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, self._on_read)
        except (OSError, ValueError):  # the client is gone already
            self._done, done = None, self._done
            done(self)

    def expire(self, now: float) -> None:
        if now >= self.deadline:
            self._end()

    def _on_read(self, sock: socket.socket) -> None:
        try:
            while sock.recv(65536):  # what the client still sends is read and dropped
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._end()  # it closed (or reset)

    def _end(self) -> None:
        if self._done is None:
            return
        done, self._done = self._done, None
        try:
            self.poller.unregister(self.conn.sock)
        except (KeyError, ValueError):
            pass
        done(self)


def _send_timeout(sock: socket.socket) -> None:
    body = json.dumps({"error": f"the request head did not arrive within {HEAD_TIMEOUT:g} s"})
    head = (
        "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    try:
        sock.settimeout(1.0)
        sock.sendall((head + body).encode())
    except OSError:
        pass
