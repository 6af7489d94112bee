"""Each gunicorn worker's HTTP server: uvicorn (uvloop, httptools) through uvicorn-worker's
class, configured only through its public `CONFIG_KWARGS`, with the limits a hostile client
must not get past.

uvicorn has no time limit on a request head and none on a kept-alive connection that sends
bytes without a new request; it answers what it cannot parse in plain text, and a client that
reads nothing holds its answer forever. uvicorn's documented way in is `Config(http=…)`, which
takes a protocol class as well as "httptools": `Protocol` below is uvicorn's own httptools
protocol with these limits added through its parser callbacks and transport events (nothing
of the request/response cycle is replaced):
- the request head (line and headers) must arrive within PROXY_CLIENT_TIMEOUT of its first
  byte, or of the connection's start (`408`); past MAX_URL, MAX_FIELD, MAX_HEADERS or
  MAX_HEAD: `414`/`431`;
- between requests a connection may stay idle `keepalive` seconds (gunicorn's setting), and
  bytes that are no new request (the unread rest of an answered request's body) do not extend
  that;
- a client whose answer stopped moving (uvicorn's write buffer full, so the app waits:
  backpressure) for PROXY_READ_TIMEOUT is dropped; the connection's watch tells the forwarder,
  which closes the upstream at once (proxy/upstream/forward.py), as it does when the client
  hangs up;
- beyond PROXY_MAX_CONNECTIONS open connections a worker answers `503` with a JSON error.
Each piece of a forwarded request body has the same PROXY_CLIENT_TIMEOUT, in the forwarder.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from proxy.config import Config
from proxy.http.errors import error_json

log = logging.getLogger("ollama_exoscale.server")

MAX_URL = 8190  # bytes of a request target (gunicorn's limit_request_line, as before)
MAX_HEADERS = 100  # header lines of a request (gunicorn's limit_request_fields)
MAX_FIELD = 8190  # bytes of one header line (gunicorn's limit_request_field_size)
MAX_HEAD = 64 * 1024  # bytes of all the headers together
WATCH = "ollama_exoscale.connection"  # the scope extension that carries a connection's Watch
STREAM_GRACE = 20.0  # seconds running answers get to finish on SIGTERM (gunicorn's is 30)


@functools.cache
def settings() -> Config:
    return Config.from_env()


class Watch:
    """One client connection as the app sees it: whether it is gone, and a way to cut it."""

    __slots__ = ("gone", "_on_gone", "_transport")

    def __init__(self, transport: asyncio.Transport):
        self.gone = False
        self._on_gone = None
        self._transport = transport

    def on_gone(self, callback) -> None:
        """Call `callback` once when the client goes (None: no longer)."""
        self._on_gone = callback

    def abort(self) -> None:
        """Cut the connection now: a client promised a length sees its answer was cut."""
        self._transport.abort()

    def lost(self) -> None:
        self.gone = True
        callback, self._on_gone = self._on_gone, None
        if callback is not None:
            callback()


class HeadWithBody:
    """The client's transport as uvicorn writes to it: an answer's head waits for the first
    bytes of its body, within this turn of the event loop, and leaves with them in one write.

    uvicorn writes the head and the body apart, and uvloop sends each write at once: a small
    answer (a 503, most forwarded ones) cost two sends and two segments. Writes keep their
    order; a held head leaves at the next write, on close, or at the loop's next turn."""

    __slots__ = ("_transport", "_loop", "_held", "_release", "hold_next")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._release: asyncio.Handle | None = None
        self.hold_next = False  # set when a request head is complete: its answer's head is next

    def write(self, data: bytes) -> None:
        if self.hold_next:
            self.hold_next = False
            self._held = data
            self._release = self._loop.call_soon(self._flush)
            return
        if self._held is not None:
            data = self._take() + data
        self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def _flush(self) -> None:
        if self._held is not None:
            held = self._take()
            if not self._transport.is_closing():  # the client may have gone meanwhile
                self._transport.write(held)

    def _take(self) -> bytes:
        held, self._held = self._held, None
        self._release.cancel()
        return held

    def __getattr__(self, name: str):
        return getattr(self._transport, name)  # is_closing, abort, get_extra_info, …


class Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the time and size limits above."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = settings()
        self.write_timeout = config.read_timeout
        self.head_timeout = config.client_timeout
        self.max_connections = config.max_connections
        self.limit_concurrency = None  # ours counts connections and answers in JSON
        self._deadline: asyncio.TimerHandle | None = None
        self._stalled: asyncio.TimerHandle | None = None
        self._in_head = False
        self._head_size = 0
        self._refusal: tuple[int, str] | None = None
        self.watch: Watch | None = None

    # -- connection events ---------------------------------------------------------------

    def connection_made(self, transport) -> None:
        transport = HeadWithBody(transport, self.loop)
        super().connection_made(transport)
        self.watch = Watch(transport)
        self._arm(self.head_timeout)  # a connection that never sends a request

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None
        if self.watch is not None:
            self.watch.lost()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stalled is None:
            self._stalled = self.loop.call_later(self.write_timeout, self._drop_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None

    def _drop_stalled(self) -> None:
        self._stalled = None
        log.warning("a client read nothing of its answer for %g s (PROXY_READ_TIMEOUT): dropped",
                    self.write_timeout)
        self.transport.abort()

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {WATCH: self.watch}
        self._in_head = True
        self._head_size = 0
        self._arm(self.head_timeout)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > MAX_URL:
            self._refuse(414, f"the request target is longer than {MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_size += len(name) + len(value) + 4
        if len(name) + len(value) + 2 > MAX_FIELD:
            self._refuse(431, f"a request header is longer than {MAX_FIELD} bytes")
        if len(self.headers) > MAX_HEADERS:
            self._refuse(431, f"the request has more than {MAX_HEADERS} header lines")
        if self._head_size > MAX_HEAD:
            self._refuse(431, f"the request's headers are larger than {MAX_HEAD} bytes")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        self.transport.hold_next = True  # the answer's head: it leaves with its body
        if len(self.connections) > self.max_connections:
            log.warning("more than %d connections (PROXY_MAX_CONNECTIONS): 503",
                        self.max_connections)
            app, self.app = self.app, _busy
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline and not self.transport.is_closing():
            # Until a new request begins; more bytes of an unread body do not extend it.
            self._arm(self.timeout_keep_alive)

    # -- refusals ------------------------------------------------------------------------

    def _refuse(self, status: int, message: str) -> None:
        self._refusal = (status, message)
        raise ValueError(message)  # httptools stops parsing: uvicorn calls send_400_response

    def send_400_response(self, msg: str) -> None:
        status, message = self._refusal or (400, "the request is not valid HTTP/1.1")
        self._refusal = None
        self._write_error(status, message)

    def _write_error(self, status: int, message: str) -> None:
        reasons = {400: "Bad Request", 408: "Request Timeout", 414: "URI Too Long",
                   431: "Request Header Fields Too Large"}
        body = error_json("", message)  # the request may not even have a path
        head = (f"HTTP/1.1 {status} {reasons[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()

    # -- the deadline: head, or idle between requests --------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # an answer is under way; a pipelined head waits for it
        if self._in_head:
            self._write_error(408, "the request head did not arrive within "
                              f"{self.head_timeout:g} s (PROXY_CLIENT_TIMEOUT)")
        elif not self.transport.is_closing():
            self.transport.close()


async def _busy(scope, receive, send) -> None:
    """The answer beyond PROXY_MAX_CONNECTIONS."""
    body = error_json(scope["path"], "the proxy has too many connections open; retry in a "
                      "moment (PROXY_MAX_CONNECTIONS)")
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Worker(UvicornWorker):
    """gunicorn's worker for the proxy: uvicorn with uvloop and the Protocol above."""

    CONFIG_KWARGS = {
        "loop": "uvloop",
        "http": Protocol,
        # The app's shutdown (proxy/asgi.py) runs once the connections have ended: uvicorn
        # then re-raises SIGTERM, so gunicorn's worker_exit hook would never run.
        "lifespan": "on",
        "server_header": False,  # the upstream's own Server and Date headers pass through
        "date_header": False,
        # The client's address is the socket's, as under gunicorn before: an X-Forwarded-For
        # from a local client must not choose whose wrong-key count a request adds to.
        "proxy_headers": False,
        "timeout_graceful_shutdown": STREAM_GRACE,
    }
