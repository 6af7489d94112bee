"""The bodies that cross the proxy: the client's request body as it arrives (each piece within
a time limit, at most so many bytes), and the upstream's answer as falcon's response stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.http.metrics import HANGUPS, route_label
from proxy.upstream.errors import BodyStalled, BodyTooLarge, ClientGone, Malformed, reason
from proxy.upstream.framing import beyond_framing

log = logging.getLogger("ollama_exoscale.forward")


if sys.version_info >= (3, 11):
    async def within(seconds: float, awaitable):
        """`await awaitable`, TimeoutError after `seconds` (a timer, not a task per read)."""
        async with asyncio.timeout(seconds):
            return await awaitable
else:  # pragma: no cover - Python 3.10
    async def within(seconds: float, awaitable):
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
            piece = await within(self._timeout, self._pieces.__anext__())
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
            body = await within(self._timeout, self._stream.read())
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
                if beyond_framing(self.upstream, self._protocol):
                    failure = Malformed("bytes beyond the end of the answer")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure = exc
        self._done = True
        if self._gone():  # the client hung up, or was dropped for not reading
            hung_up(self._path, "mid-answer")
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
        log.warning("upstream stream broke on %s: %s", self._path, reason(exc))
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


def hung_up(path: str, when: str) -> None:
    HANGUPS.labels(route_label(path)).inc()
    log.info("499 %s: the client hung up %s; its upstream request was closed", path, when)
