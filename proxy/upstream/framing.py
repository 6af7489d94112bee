"""HTTP framing between the client and the upstream: which headers pass each way, and the
upstream answers that may not be forwarded (refused with a 502, their connection never reused).

aiohttp (llhttp) parses the answers; what it lets through but HTTP forbids, or what uvicorn
would refuse to send to the client after the answer began, is caught here.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import falcon.asgi

from proxy.upstream.errors import malformed

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
BODILESS = (204, 304)
UNTIL_CLOSE = -1  # the length of a body that ends where its connection closes (no framing)
# What uvicorn refuses in a header (it would raise mid-answer): NUL..US but HTAB, and DEL.
BAD_HEADER_BYTE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")



def response_head(upstream: aiohttp.ClientResponse, resp: falcon.asgi.Response) -> int | None:
    """Copy the answer's status and headers to `resp`; the body's length if it has one.

    Raises UpstreamError(502) for what may not be forwarded: an upgrade nobody asked for,
    a body on a bodiless status, control bytes in a header (uvicorn would refuse them after
    the answer began), a Content-Length beside chunked framing.
    """
    status = upstream.status
    if status == 101:
        raise malformed("it switched protocols unasked (101)")
    listed: set[str] = set()
    length: int | None = None
    chunked = False
    headers = []
    for name, value in upstream.raw_headers:
        if BAD_HEADER_BYTE.search(value) or not TOKEN.match(name):
            raise malformed("a header holds a control byte")
        lowered = name.lower()
        if lowered == b"connection":
            listed.update(t.strip().lower() for t in value.decode("latin-1").split(","))
        elif lowered == b"content-length":
            length = int(value)  # llhttp accepted it: digits only, one value
        elif lowered == b"transfer-encoding":
            chunked = True
        headers.append((lowered.decode("latin-1"), name, value))
    if status in BODILESS and (chunked or length):
        raise malformed(f"a {status} answer declares a body")
    if chunked and length is not None:
        raise malformed("it has both Transfer-Encoding and Content-Length")
    if not chunked and length is None and status not in BODILESS:
        length = UNTIL_CLOSE
    resp.status = status
    drop = RESPONSE_DROP | listed if listed else RESPONSE_DROP
    for lowered, name, value in headers:
        if lowered not in drop:
            resp.append_header(name.decode("latin-1"), value.decode("latin-1"))
    return None if chunked else length


def end_with_connection(upstream: aiohttp.ClientResponse, protocol: Any
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


def beyond_framing(upstream: aiohttp.ClientResponse, protocol: Any) -> bool:
    """Whether the connection got more than the answer's framing held (a parse error, leftover
    bytes or another answer, in aiohttp's words `should_close`) though it asked to be kept."""
    if protocol is None or not protocol.should_close:
        return False
    said_close = "close" in upstream.headers.get("Connection", "").lower()
    return not said_close and upstream.version >= (1, 1)


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
