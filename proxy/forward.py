"""The streaming reverse proxy: a client's request to the upstream and its answer back.

Method, path, query, headers (minus hop-by-hop) and body pass unchanged; bodies stream both
ways chunk by chunk as they arrive, so a multi-GB blob never sits in memory and a token
reaches the client when the model emits it.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import falcon
from gunicorn.http.errors import ParseException

from . import h1
from .provisioner import Endpoint
from .upstream import Sessions

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
    {"connection", "keep-alive", "proxy-authenticate", "trailer", "transfer-encoding", "upgrade"}
)
CHUNK = 64 * 1024  # the most of the upstream's answer read at once: a token goes out as it comes
# Request bodies are read 1 MiB at a time: gunicorn's body reader receives up to 1 MiB at once
# and copies what a smaller read leaves over on every read (most of an upload's CPU).
BODY_BLOCK = 1024 * 1024
PATH_SAFE = "/:@!$&'()*+,;=-._~"


class UpstreamError(Exception):
    """The request could not be completed upstream: 502, 504, or 413 for a body too large."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BodyTooLarge(Exception):
    """A chunked request body grew past the limit while it was being sent upstream."""


def _blocks(stream) -> Iterator[bytes]:
    """A body of known length (the caller sends its Content-Length), block by block."""
    while block := stream.read(BODY_BLOCK):
        yield block


class MalformedBody(Exception):
    """The client's chunked request body broke its framing (gunicorn de-chunks it as it goes)."""


def _chunks(stream, limit: int) -> Iterator[bytes]:
    """A body sent with Transfer-Encoding: chunked (length unknown), block by block."""
    sent = 0
    while True:
        try:
            block = stream.read(BODY_BLOCK)
        except ParseException as exc:  # a size of -2 or 0x2, a bare LF, a chunk past its size
            raise MalformedBody(type(exc).__name__) from None
        if not block:
            return
        sent += len(block)
        if limit and sent > limit:
            raise BodyTooLarge()
        yield block


class ResponseStream:
    """The upstream's body as a WSGI iterable: each chunk as it arrives; close() frees it.

    The WSGI server calls close() when the response ends or the client goes away; an upstream
    body not read to its end is then dropped with its connection, so the upstream stops too.
    A chunked body (a stream) is `relayable`: the worker may move it without a thread
    (proxy/relay.py), with the same close() and the same last line when the upstream breaks.
    """

    def __init__(
        self,
        upstream: h1.Response,
        on_close: Callable[[], None],
        on_broken: Callable[[], None] | None = None,
    ):
        self.upstream = upstream
        self.read_timeout = upstream.read_timeout
        self._on_close = on_close
        self._on_broken = on_broken
        self._closed = False
        self.ndjson = "ndjson" in (upstream.header("content-type") or "")

    @property
    def relayable(self) -> bool:
        return self.upstream.chunked

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.upstream.read(CHUNK)
        except OSError as exc:  # h1's errors, timeouts and resets are all OSErrors
            if last := self.broke_off(type(exc).__name__):
                yield last

    def broke_off(self, why: str) -> bytes:
        """The upstream's answer broke off after its head was forwarded: the last bytes for
        the client (headers are sent already: Ollama's clients read a last {"error"} line)."""
        log.warning("upstream stream broke: %s", why)
        if self._on_broken is not None:
            self._on_broken()
        if not self.ndjson:
            return b""
        return json.dumps({"error": "the upstream connection broke mid-stream"}).encode() + b"\n"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.upstream.release()  # kept if read to its end, else dropped
        finally:
            self._on_close()


class Forwarder:
    def __init__(self, sessions: Sessions, connect_timeout: float, read_timeout: float):
        self.sessions = sessions
        self.read_timeout = read_timeout
        self.timeouts = (connect_timeout, read_timeout)

    @staticmethod
    def body_limit(path: str, max_body: int, max_blob: int) -> int:
        """Bytes a request body to `path` may have; 0: no limit."""
        return max_blob if path.startswith("/api/blobs/") else max_body

    def forward(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        endpoint: Endpoint,
        on_close: Callable[[], None],
        *,
        strip_authorization: bool,
        body_limit: int = 0,
        on_broken: Callable[[], None] | None = None,
    ) -> None:
        """Send `req` upstream and set `resp` to stream the answer; on_close runs exactly once.

        strip_authorization: the client's Authorization header is a proxy key (keys are set).

        on_broken runs when the upstream's answer breaks off after its headers were sent.
        """
        try:
            upstream = self._send(req, endpoint, strip_authorization, body_limit)
        except BaseException:
            on_close()
            raise
        resp.status = upstream.status
        for name, value in upstream.headers:
            if name.lower() not in RESPONSE_DROP:
                resp.append_header(name, value)
        if upstream.finished:  # no body (HEAD, 204, 304, or empty): Falcon sends none
            upstream.release()
            on_close()
            return
        resp.stream = ResponseStream(upstream, on_close, on_broken)

    def _send(
        self, req: falcon.Request, endpoint: Endpoint, strip_authorization: bool, limit: int
    ) -> h1.Response:
        target = quote(req.path, safe=PATH_SAFE)
        if req.query_string:
            target += "?" + req.query_string
        # The upstream gets its own credential, never the client's: a token-guarded front
        # answers 400 to two Authorization headers (nginx), and a proxy key is ours to keep.
        headers = upstream_headers(req.env, strip_authorization or bool(endpoint.token))
        if endpoint.token:
            headers.append(("Authorization", f"Bearer {endpoint.token}"))
        body, chunked = self._body(req, headers, limit)
        try:
            return self.sessions.pool(endpoint, self.timeouts).request(
                req.method, target, headers, body, chunked, client=_client_socket(req.env)
            )
        except h1.ClientGone:
            log.info("%s %s: the client hung up before the upstream answered; dropped",
                     req.method, req.path)
            raise UpstreamError(499, "the client closed the connection") from None
        except MalformedBody as exc:
            raise UpstreamError(400, f"the chunked request body is malformed ({exc})") from None
        except BodyTooLarge:
            raise UpstreamError(413, f"the request body is larger than {limit} bytes") from None
        except (h1.ReadTimeout, h1.ConnectTimeout):
            raise _timed_out(self.read_timeout) from None
        except ValueError as exc:  # a CR or LF in a header (gunicorn lets none through)
            raise UpstreamError(400, str(exc)) from None
        except OSError as exc:
            raise _unreachable(exc) from None

    @staticmethod
    def _body(req: falcon.Request, headers: list[tuple[str, str]], limit: int):
        """(body, chunked) for the upstream, with the Content-Length header when it is known.

        A body up to BODY_BLOCK is read whole: sent with the head in one write, and again if a
        kept connection turns out closed; a larger one streams block by block.
        """
        length = req.content_length
        if length is not None:
            headers.append(("Content-Length", str(length)))
            if length <= BODY_BLOCK:
                return (req.bounded_stream.read() if length else None), False
            return _blocks(req.bounded_stream), False
        if "chunked" in req.env.get("HTTP_TRANSFER_ENCODING", "").lower():
            # Falcon's bounded_stream reads nothing without a length; gunicorn's wsgi.input
            # de-chunks the body and ends it itself.
            return _chunks(req.stream, limit), True
        return None, False


def upstream_headers(
    environ: Mapping[str, str], strip_authorization: bool
) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones and those its Connection header lists.

    Read from the WSGI environ in one pass (Falcon's `req.headers` would build a dict first);
    WSGI upper-cases names, title case reads as clients send them (names are case-insensitive
    either way).
    """
    drop = HOP_BY_HOP_AND_AUTHORIZATION if strip_authorization else HOP_BY_HOP
    listed = environ.get("HTTP_CONNECTION")
    if listed:
        drop = drop | {token.strip().lower() for token in listed.split(",")}
    headers = []
    if "CONTENT_TYPE" in environ and "content-type" not in drop:  # WSGI keeps it apart
        headers.append(("Content-Type", environ["CONTENT_TYPE"]))
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            name = key[5:].replace("_", "-").title()
            if name.lower() not in drop:
                headers.append((name, value))
    return headers


def _client_socket(environ: Mapping[str, Any]) -> socket.socket | None:
    """The client's plain socket under gunicorn, watched for a hang-up while the upstream
    works (a TLS one cannot be peeked at; the falcon test client has none)."""
    sock = environ.get("gunicorn.socket")
    return None if isinstance(sock, ssl.SSLSocket) else sock


def _timed_out(seconds: float) -> UpstreamError:
    return UpstreamError(504, f"the upstream Ollama did not answer within {seconds:g} s")


def _unreachable(exc: Exception) -> UpstreamError:
    return UpstreamError(502, f"the upstream Ollama is unreachable ({_reason(exc)})")


def _reason(exc: Exception) -> str:
    """A short cause without URLs or headers (they may carry a token)."""
    text = str(exc).lower()
    for needle, reason in (
        ("refused", "connection refused"),
        ("name or service not known", "unknown host"),
        ("failed to resolve", "unknown host"),
        ("certificate", "TLS certificate did not verify"),
        ("reset", "connection reset"),
        ("timed out", "timed out"),
    ):
        if needle in text:
            return reason
    return type(exc).__name__
