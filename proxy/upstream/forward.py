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
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import falcon
import falcon.asgi
from yarl import URL

from proxy.http.server import WATCH
from proxy.provision.base import Endpoint
from proxy.upstream.bodies import RequestBody, ResponseStream, hung_up
from proxy.upstream.errors import (
    BodyStalled,
    BodyTooLarge,
    ClientGone,
    UpstreamError,
    malformed,
    reason,
    timed_out,
    unreachable,
)
from proxy.upstream.framing import (
    BODILESS,
    UNTIL_CLOSE,
    beyond_framing,
    end_with_connection,
    response_head,
    upstream_headers,
)
from proxy.upstream.session import EXCHANGE, Exchange, Sessions

# An answer with a Content-Length up to this is read whole before its head goes out: a broken
# one becomes a clean 502 instead of a cut body.
WHOLE = 1024 * 1024
PATH_SAFE = "/:@!$&'()*+,;=-._~"

def watch_of(req: falcon.asgi.Request) -> Any:
    """The client connection's watch (proxy/http/server.py), None outside our uvicorn protocol."""
    extensions = req.scope.get("extensions")
    return extensions.get(WATCH) if extensions else None


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
            detach = end_with_connection(upstream, exchange.protocol)
            try:
                framed = response_head(upstream, resp)
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
            hung_up(req.path, "before the upstream answered")
            raise UpstreamError(499, "the client closed the connection") from None
        except BodyTooLarge:
            raise UpstreamError(413, f"the request body is larger than {limit} bytes") from None
        except BodyStalled:
            raise UpstreamError(
                408, f"the request body stalled: nothing came for {self.body_timeout:g} s "
                "(PROXY_CLIENT_TIMEOUT)"
            ) from None
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError):
            raise timed_out(self.read_timeout) from None
        except aiohttp.ClientResponseError as exc:  # llhttp refused the answer's head
            raise malformed(exc.message) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise unreachable(exc) from None
        except ValueError as exc:  # a CR or LF in a header (uvicorn lets none through)
            raise UpstreamError(400, str(exc)) from None

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
                raise malformed(f"its body broke off ({reason(exc)})") from None
            except asyncio.TimeoutError:
                raise UpstreamError(504, "the upstream's body stalled") from None
        if beyond_framing(upstream, protocol):
            raise malformed("bytes beyond the end of the answer")
        return body


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
