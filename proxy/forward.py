"""The streaming reverse proxy: a client's request to the upstream and its answer back.

Method, path, query, headers (minus hop-by-hop) and body pass unchanged; bodies stream both
ways chunk by chunk as they arrive, so a multi-GB blob never sits in memory and a token
reaches the client when the model emits it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from urllib.parse import quote

import falcon
import requests
import urllib3

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
RESPONSE_DROP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "trailer", "transfer-encoding", "upgrade"}
)
CHUNK = 64 * 1024
BODILESS = frozenset({204, 304})
PATH_SAFE = "/:@!$&'()*+,;=-._~"


class UpstreamError(Exception):
    """The request could not be completed upstream: 502, 504, or 413 for a body too large."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BodyTooLarge(Exception):
    """A chunked request body grew past the limit while it was being sent upstream."""


class RequestBody:
    """The client's body as requests wants a stream: read() in blocks, with a known length."""

    def __init__(self, stream, length: int):
        self._stream = stream
        self._length = length

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = CHUNK) -> bytes:
        return self._stream.read(size)

    def __iter__(self) -> Iterator[bytes]:
        while block := self._stream.read(CHUNK):
            yield block


def _chunks(stream, limit: int) -> Iterator[bytes]:
    """A body sent with Transfer-Encoding: chunked (length unknown), block by block."""
    sent = 0
    while block := stream.read(CHUNK):
        sent += len(block)
        if limit and sent > limit:
            raise BodyTooLarge()
        yield block


class ResponseStream:
    """The upstream's body as a WSGI iterable: each chunk as it arrives; close() frees it.

    The WSGI server calls close() when the response ends or the client goes away; an upstream
    body not read to its end is then dropped with its connection, so the upstream stops too.
    """

    def __init__(
        self,
        upstream: requests.Response,
        on_close: Callable[[], None],
        on_broken: Callable[[], None] | None = None,
    ):
        self._upstream = upstream
        self._raw: urllib3.HTTPResponse = upstream.raw
        self._on_close = on_close
        self._on_broken = on_broken
        self._finished = False
        self._closed = False
        self._ndjson = "ndjson" in upstream.headers.get("content-type", "")

    def __iter__(self) -> Iterator[bytes]:
        raw = self._raw
        try:
            if raw.chunked and raw.supports_chunked_reads():
                yield from raw.read_chunked(CHUNK, decode_content=False)
            else:
                while block := raw.read1(CHUNK, decode_content=False):
                    yield block
            self._finished = True
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            # Headers are sent already: Ollama's clients read a last {"error"} line.
            log.warning("upstream stream broke: %s", type(exc).__name__)
            if self._on_broken is not None:
                self._on_broken()
            if self._ndjson:
                line = {"error": "the upstream connection broke mid-stream"}
                yield json.dumps(line).encode() + b"\n"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._finished:
                self._upstream.close()  # read to the end: the connection goes back to the pool
            else:
                self._raw.close()  # cut short: drop the connection so the upstream stops
                self._upstream.close()
        finally:
            self._on_close()


class Forwarder:
    def __init__(self, sessions: Sessions, connect_timeout: float, read_timeout: float):
        self.sessions = sessions
        self.timeout = (connect_timeout, read_timeout)

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

        on_broken runs when the upstream's answer breaks off after its headers were sent.
        """
        try:
            upstream = self._send(req, endpoint, strip_authorization, body_limit)
        except BaseException:
            on_close()
            raise
        resp.status = upstream.status_code
        for name, value in upstream.headers.items():
            if name.lower() not in RESPONSE_DROP:
                resp.append_header(name, value)
        if req.method == "HEAD" or upstream.status_code in BODILESS:
            upstream.close()  # Falcon sends no body for these and would never close a stream
            on_close()
            return
        resp.stream = ResponseStream(upstream, on_close, on_broken)

    def _send(
        self, req: falcon.Request, endpoint: Endpoint, strip_authorization: bool, limit: int
    ) -> requests.Response:
        url = endpoint.url + quote(req.path, safe=PATH_SAFE)
        if req.query_string:
            url += "?" + req.query_string
        headers = upstream_headers(req.headers, strip_authorization)
        if endpoint.token:
            headers["Authorization"] = f"Bearer {endpoint.token}"
        body = self._body(req, limit)
        try:
            return self.sessions.get(endpoint).request(
                req.method,
                url,
                headers=headers,
                data=body,
                stream=True,
                allow_redirects=False,
                timeout=self.timeout,
            )
        except BodyTooLarge:
            raise UpstreamError(413, f"the request body is larger than {limit} bytes") from None
        except requests.Timeout:
            raise UpstreamError(
                504, f"the upstream Ollama did not answer within {self.timeout[1]:g} s"
            ) from None
        except requests.RequestException as exc:
            reason = _reason(exc)
            raise UpstreamError(502, f"the upstream Ollama is unreachable ({reason})") from None

    @staticmethod
    def _body(req: falcon.Request, limit: int):
        length = req.content_length
        if length is not None:
            return RequestBody(req.bounded_stream, length) if length else b""
        if "chunked" in (req.get_header("Transfer-Encoding") or "").lower():
            # Falcon's bounded_stream reads nothing without a length; gunicorn's wsgi.input
            # de-chunks the body and ends it itself.
            return _chunks(req.stream, limit)
        return None


def upstream_headers(incoming: dict[str, str], strip_authorization: bool) -> dict[str, str]:
    """The client's headers minus hop-by-hop ones and those its Connection header lists."""
    listed = {
        token.strip().lower()
        for token in incoming.get("CONNECTION", "").split(",")
        if token.strip()
    }
    drop = HOP_BY_HOP | listed
    if strip_authorization:
        drop = drop | {"authorization"}
    # WSGI upper-cases header names; title case reads as clients send them (names are
    # case-insensitive either way).
    return {name.title(): value for name, value in incoming.items() if name.lower() not in drop}


def _reason(exc: requests.RequestException) -> str:
    """A short cause without URLs or headers (they may carry a token)."""
    text = str(exc).lower()
    for needle, reason in (
        ("refused", "connection refused"),
        ("name or service not known", "unknown host"),
        ("certificate", "TLS certificate did not verify"),
        ("reset", "connection reset"),
        ("timed out", "timed out"),
    ):
        if needle in text:
            return reason
    return type(exc).__name__
