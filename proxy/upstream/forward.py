"""The streaming reverse proxy: a client's request to the upstream and its answer back.

Method, path, query, headers (minus hop-by-hop) and body pass unchanged; bodies stream both
ways chunk by chunk as they arrive, so a multi-GB blob never sits in memory and a token
reaches the client when the model emits it. aiohttp (llhttp) parses the upstream's answers;
what it lets through but HTTP forbids, or what the client's server (uvicorn) would refuse to
send, is refused here: the client gets a `502`, or a last `{"error"}` line once a stream has
begun, and the upstream connection is closed, never reused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import falcon
import falcon.asgi
from yarl import URL

from proxy.http.metrics import HANGUPS, route_label
from proxy.http.server import WATCH
from proxy.provision.base import Endpoint
from proxy.upstream.session import EXCHANGE, Exchange, Sessions

log = logging.getLogger("ollama_exoscale.forward")

# RFC 9110 §7.6.1, plus headers this proxy sets itself for the upstream.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect",
    }
)
HOP_BY_HOP_AND_AUTHORIZATION = HOP_BY_HOP | {"authorization"}
RESPONSE_DROP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-connection", "trailer",
     "transfer-encoding", "upgrade", "content-length"}
)
CHUNK = 64 * 1024  # the most of the upstream's answer read at once: a token goes out as it comes
# An answer with a Content-Length up to this is read whole before its head goes out: a broken
# one becomes a clean 502 instead of a cut body.
WHOLE = 1024 * 1024
PATH_SAFE = "/:@!$&'()*+,;=-._~"
BODILESS = (204, 304)
UNTIL_CLOSE = -1  # _head's length of a body that ends where its connection closes (no framing)
# What uvicorn refuses in a header (it would raise mid-answer): NUL..US but HTAB, and DEL.
_BAD_HEADER_BYTE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


class UpstreamError(Exception):
    """The request could not be completed upstream: 502, 504, 499 (client gone), 408 (its body
    stalled) or 413 (its body too large)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BodyTooLarge(Exception):
    """A chunked request body grew past the limit while it was being sent upstream."""


class BodyStalled(Exception):
    """A piece of the request body did not arrive within PROXY_CLIENT_TIMEOUT."""


class ClientGone(Exception):
    """The client closed its connection before the upstream answered."""


class Malformed(Exception):
    """The upstream's answer breaks HTTP's framing or carries what may not be forwarded."""


def watch_of(req: falcon.asgi.Request) -> Any:
    """The client connection's watch (proxy/http/server.py), None outside our uvicorn protocol."""
    extensions = req.scope.get("extensions")
    return extensions.get(WATCH) if extensions else None


if sys.version_info >= (3, 11):
    async def _within(seconds: float, awaitable):
        """`await awaitable`, TimeoutError after `seconds` (a timer, not a task per read)."""
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover - Python 3.10
    async def _within(seconds: float, awaitable):
        return await asyncio.wait_for(awaitable, seconds)


class RequestBody:
    """The request body as it arrives, each piece within `timeout`, at most `limit` bytes.

    aiohttp wraps what its body writer raises into a connection error: the failure is kept
    here too, for the client's answer (413, 408)."""

    def __init__(self, stream, limit: int, timeout: float, watch: Any = None):
        self._stream = stream
        self._pieces = None  # falcon's iterator over the pieces, once streaming began
        self._limit = limit
        self._timeout = timeout
        self._watch = watch
        self._sent = 0
        self.failure: Exception | None = None

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        if self._pieces is None:
            self._pieces = self._stream.__aiter__()
        try:
            piece = await _within(self._timeout, self._pieces.__anext__())
        except asyncio.TimeoutError:
            self.failure = BodyStalled()
            raise self.failure from None
        except StopAsyncIteration:
            # falcon ends the body when the client goes (or the server refused a malformed
            # chunk): a cut body must not reach the upstream as a complete one.
            if self._watch is not None and self._watch.gone:
                self.failure = ClientGone()
                raise self.failure from None
            raise
        self._sent += len(piece)
        if self._limit and self._sent > self._limit:
            self.failure = BodyTooLarge()
            raise self.failure
        return piece

    async def read(self) -> bytes:
        """The whole (small) body, within one `timeout`."""
        try:
            body = await _within(self._timeout, self._stream.read())
        except asyncio.TimeoutError:
            self.failure = BodyStalled()
            raise self.failure from None
        if self._watch is not None and self._watch.gone:
            self.failure = ClientGone()
            raise self.failure
        return body


class ResponseStream:
    """The upstream's body as falcon's `resp.stream`: each piece as it arrives; close() (falcon
    calls it when the answer ends, however it ends) frees the upstream and runs on_close."""

    def __init__(self, upstream: aiohttp.ClientResponse, protocol: Any,
                 on_close: Callable[[], None], on_broken: Callable[[], None] | None, watch: Any,
                 path: str, framed_length: bool, detach: Callable[[], None]):
        self.upstream = upstream
        self._protocol = protocol
        self._detach = detach
        self._on_close = on_close
        self._on_broken = on_broken
        self._watch = watch
        self._path = path
        self._framed_length = framed_length  # a Content-Length went to the client
        self._closed = False
        self._done = False
        self.ndjson = "ndjson" in upstream.headers.get("Content-Type", "")
        if watch is not None:
            watch.on_gone(self._client_gone)

    def _client_gone(self) -> None:
        self.upstream.close()  # the upstream stops at once: its connection is closed

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        failure: BaseException | None = None
        if not self._gone():
            try:
                piece = await self.upstream.content.readany()
                if piece:
                    return piece
                if _beyond_framing(self.upstream, self._protocol):
                    failure = Malformed("bytes beyond the end of the answer")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure = exc
        self._done = True
        if self._gone():  # the client hung up, or was dropped for not reading
            _hung_up(self._path, "mid-answer")
            raise StopAsyncIteration
        if failure is not None:
            return self._broke_off(failure)
        raise StopAsyncIteration

    def _gone(self) -> bool:
        return self._watch is not None and self._watch.gone

    def _broke_off(self, exc: BaseException) -> bytes:
        """The upstream's answer broke off after its head was forwarded: the last bytes for the
        client (Ollama's clients read a last {"error"} line), or a cut connection when the
        client was promised a length."""
        log.warning("upstream stream broke on %s: %s", self._path, _reason(exc))
        self.upstream.close()
        if self._on_broken is not None:
            self._on_broken()
        if self._framed_length or not self.ndjson:
            if self._watch is not None:
                self._watch.abort()  # the client sees a cut answer, never a complete-looking one
            raise StopAsyncIteration
        return json.dumps({"error": "the upstream connection broke mid-stream"}).encode() + b"\n"

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._detach()
            if self._watch is not None:
                self._watch.on_gone(None)
            if not self._done:
                self.upstream.close()  # not read to its end: dropped, the upstream stops
            else:
                self.upstream.release()
        finally:
            self._on_close()


class Forwarder:
    def __init__(self, sessions: Sessions, connect_timeout: float, read_timeout: float,
                 body_timeout: float = 15.0):
        self.sessions = sessions
        self.read_timeout = read_timeout
        self.body_timeout = body_timeout  # for each piece of a request body (a stalled client)
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )

    @staticmethod
    def body_limit(path: str, max_body: int, max_blob: int) -> int:
        """Bytes a request body to `path` may have; 0: no limit."""
        return max_blob if path.startswith("/api/blobs/") else max_body

    async def forward(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        endpoint: Endpoint,
        on_close: Callable[[], None],
        *,
        strip_authorization: bool,
        body_limit: int = 0,
        on_broken: Callable[[], None] | None = None,
    ) -> None:
        """Send `req` upstream and set `resp` to the answer; on_close runs exactly once.

        strip_authorization: the client's Authorization header is a proxy key (keys are set).

        on_broken runs when the upstream's answer breaks off after its head was sent.
        """
        watch = watch_of(req)
        exchange = Exchange()
        token = EXCHANGE.set(exchange)
        try:
            try:
                upstream = await self._send(req, endpoint, strip_authorization, body_limit, watch)
            finally:
                EXCHANGE.reset(token)
            detach = _end_with_connection(upstream, exchange.protocol)
            try:
                framed = self._head(upstream, resp)
                whole = await self._whole_body(req, upstream, framed, exchange.protocol)
            except BaseException:
                detach()
                upstream.close()  # a connection whose answer was refused is never reused
                raise
        except BaseException:
            on_close()
            raise
        if whole is not None:
            detach()
            upstream.release()
            on_close()
            if whole:
                resp.data = whole
            elif req.method == "HEAD":
                if framed is not None and framed != UNTIL_CLOSE:  # the length a GET would have
                    resp.set_header("Content-Length", str(framed))
            elif upstream.status not in BODILESS:
                resp.data = b""
            return
        if framed is not None and framed != UNTIL_CLOSE:
            resp.set_header("Content-Length", str(framed))
        # A body that ends at the close has no framing to check: its close is its end.
        protocol = None if framed == UNTIL_CLOSE else exchange.protocol
        resp.stream = ResponseStream(upstream, protocol, on_close, on_broken, watch,
                                     req.path, framed not in (None, UNTIL_CLOSE), detach)

    async def _send(self, req: falcon.asgi.Request, endpoint: Endpoint,
                    strip_authorization: bool, limit: int, watch: Any
                    ) -> aiohttp.ClientResponse:
        client = self.sessions.client(endpoint)
        target = quote(req.path, safe=PATH_SAFE)
        if req.query_string:
            target += "?" + req.query_string
        # The upstream gets its own credential, never the client's: a token-guarded front
        # answers 400 to two Authorization headers (nginx), and a proxy key is ours to keep.
        headers = upstream_headers(req.headers, strip_authorization or bool(endpoint.token))
        if endpoint.token:
            headers.append(("Authorization", f"Bearer {endpoint.token}"))
        body: Any = None
        try:
            length = req.content_length
            if length is not None:
                headers.append(("Content-Length", str(length)))
                body = RequestBody(req.stream, 0, self.body_timeout, watch)
                if length <= WHOLE:  # read whole: sent with the head in one write
                    body = await body.read() if length else None
            elif "chunked" in (req.get_header("Transfer-Encoding") or "").lower():
                body = RequestBody(req.stream, limit, self.body_timeout, watch)  # sent chunked
            request = client.session.request(
                req.method, URL(client.base + target, encoded=True), headers=headers,
                data=body, allow_redirects=False, timeout=self.timeout, ssl=client.ssl,
                server_hostname=client.server_hostname,
            )
            if watch is None or isinstance(body, RequestBody):
                try:
                    return await request  # a body still arriving: the client is there
                except aiohttp.ClientError:
                    if isinstance(body, RequestBody) and body.failure is not None:
                        raise body.failure from None
                    raise
            return await _unless_gone(request, watch)
        except ClientGone:
            _hung_up(req.path, "before the upstream answered")
            raise UpstreamError(499, "the client closed the connection") from None
        except BodyTooLarge:
            raise UpstreamError(413, f"the request body is larger than {limit} bytes") from None
        except BodyStalled:
            raise UpstreamError(
                408, f"the request body stalled: nothing came for {self.body_timeout:g} s "
                "(PROXY_CLIENT_TIMEOUT)"
            ) from None
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError):
            raise _timed_out(self.read_timeout) from None
        except aiohttp.ClientResponseError as exc:  # llhttp refused the answer's head
            raise _malformed(exc.message) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unreachable(exc) from None
        except ValueError as exc:  # a CR or LF in a header (uvicorn lets none through)
            raise UpstreamError(400, str(exc)) from None

    @staticmethod
    def _head(upstream: aiohttp.ClientResponse, resp: falcon.asgi.Response) -> int | None:
        """Copy the answer's status and headers to `resp`; the body's length if it has one.

        Raises UpstreamError(502) for what may not be forwarded: an upgrade nobody asked for,
        a body on a bodiless status, control bytes in a header (uvicorn would refuse them after
        the answer began), a Content-Length beside chunked framing.
        """
        status = upstream.status
        if status == 101:
            raise _malformed("it switched protocols unasked (101)")
        listed: set[str] = set()
        length: int | None = None
        chunked = False
        headers = []
        for name, value in upstream.raw_headers:
            if _BAD_HEADER_BYTE.search(value) or not _TOKEN.match(name):
                raise _malformed("a header holds a control byte")
            lowered = name.lower()
            if lowered == b"connection":
                listed.update(t.strip().lower() for t in value.decode("latin-1").split(","))
            elif lowered == b"content-length":
                length = int(value)  # llhttp accepted it: digits only, one value
            elif lowered == b"transfer-encoding":
                chunked = True
            headers.append((lowered.decode("latin-1"), name, value))
        if status in BODILESS and (chunked or length):
            raise _malformed(f"a {status} answer declares a body")
        if chunked and length is not None:
            raise _malformed("it has both Transfer-Encoding and Content-Length")
        if not chunked and length is None and status not in BODILESS:
            length = UNTIL_CLOSE
        resp.status = status
        drop = RESPONSE_DROP | listed if listed else RESPONSE_DROP
        for lowered, name, value in headers:
            if lowered not in drop:
                resp.append_header(name.decode("latin-1"), value.decode("latin-1"))
        return None if chunked else length

    @staticmethod
    async def _whole_body(req, upstream: aiohttp.ClientResponse, length: int | None,
                          protocol: Any) -> bytes | None:
        """The body, read whole when it is small and its length known (None: stream it)."""
        if req.method == "HEAD" or upstream.status in BODILESS:
            body = b""
        elif length is None or length == UNTIL_CLOSE or length > WHOLE:
            return None
        else:
            try:
                body = await upstream.read()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                raise _malformed(f"its body broke off ({_reason(exc)})") from None
            except asyncio.TimeoutError:
                raise UpstreamError(504, "the upstream's body stalled") from None
        if _beyond_framing(upstream, protocol):
            raise _malformed("bytes beyond the end of the answer")
        return body


def _end_with_connection(upstream: aiohttp.ClientResponse, protocol: Any
                         ) -> Callable[[], None]:
    """Have the body fail when its connection closes before the body ended: when llhttp
    refuses a piece of a body (a chunk size of -2), aiohttp 3.14 closes the connection but
    leaves the body waiting, for the read timeout (tests/integration/test_framing.py). Returns what
    undoes it once the answer is over (a kept connection carries many answers)."""
    payload = upstream.content
    if protocol is None or payload.is_eof():
        return _nothing

    def closed(future: asyncio.Future | None = None) -> None:
        if future is not None and not future.cancelled():
            future.exception()  # retrieved: a connection lost with an error is no news here
        if not payload.is_eof() and payload.exception() is None:
            payload.set_exception(aiohttp.ClientPayloadError("the connection closed mid-body"))

    future = protocol.closed
    if future is None:
        closed()  # closed already
        return _nothing
    future.add_done_callback(closed)
    return lambda: future.remove_done_callback(closed)


def _nothing() -> None:
    pass


def _beyond_framing(upstream: aiohttp.ClientResponse, protocol: Any) -> bool:
    """Whether the connection got more than the answer's framing held (a parse error, leftover
    bytes or another answer, in aiohttp's words `should_close`) though it asked to be kept."""
    if protocol is None or not protocol.should_close:
        return False
    said_close = "close" in upstream.headers.get("Connection", "").lower()
    return not said_close and upstream.version >= (1, 1)


async def _unless_gone(request, watch: Any):
    """Await the upstream's answer unless the client hangs up first (then ClientGone): the
    hang-up cancels this task's wait, and aiohttp closes the upstream connection, so the
    upstream stops working. (No second task: this is every forwarded request's path.)"""
    task = asyncio.current_task()
    watch.on_gone(task.cancel)
    try:
        return await request
    except asyncio.CancelledError:
        if not watch.gone:
            raise  # cancelled for another reason (the worker shutting down)
        if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled here
            task.uncancel()
        raise ClientGone() from None
    finally:
        watch.on_gone(None)


def _hung_up(path: str, when: str) -> None:
    HANGUPS.labels(route_label(path)).inc()
    log.info("499 %s: the client hung up %s; its upstream request was closed", path, when)


def upstream_headers(
    headers: Mapping[str, str], strip_authorization: bool
) -> list[tuple[str, str]]:
    """The client's headers (falcon's `req.headers`: names lower-cased, repeats joined) minus
    hop-by-hop ones and those its Connection header lists; names in title case, as clients
    send them (the server lower-cased them; names are case-insensitive either way)."""
    drop = HOP_BY_HOP_AND_AUTHORIZATION if strip_authorization else HOP_BY_HOP
    listed = headers.get("connection")
    if listed:
        drop = drop | {token.strip().lower() for token in listed.split(",")}
    return [(name.title(), value) for name, value in headers.items() if name not in drop]


def _timed_out(seconds: float) -> UpstreamError:
    return UpstreamError(504, f"the upstream Ollama did not answer within {seconds:g} s")


def _unreachable(exc: Exception) -> UpstreamError:
    return UpstreamError(502, f"the upstream Ollama is unreachable ({_reason(exc)})")


def _malformed(why: str) -> UpstreamError:
    first = why.splitlines()[0] if why else "malformed"
    return UpstreamError(502, f"the upstream Ollama's answer is not valid HTTP: {first}")


def _reason(exc: BaseException) -> str:
    """A short cause without URLs or headers (they may carry a token)."""
    text = str(exc).lower()
    for needle, reason in (
        ("certificate", "TLS certificate did not verify"),
        ("refused", "connection refused"),
        ("connect call failed", "connection refused"),
        ("name or service not known", "unknown host"),
        ("failed to resolve", "unknown host"),
        ("cannot connect to host", "connection failed"),
        ("reset", "connection reset"),
        ("timeout", "timed out"),
        ("timed out", "timed out"),
        ("not completed", "body cut short"),
        ("disconnected", "connection closed"),
    ):
        if needle in text:
            return reason
    return type(exc).__name__
