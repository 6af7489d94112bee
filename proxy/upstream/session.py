"""The clients to the upstream Ollama: a pooled aiohttp client per endpoint for forwarding, and
requests sessions for the probes (proxy/upstream/probe.py), both with the upstream's
certificate pinned (proxy/upstream/tls.py).

Forwarding runs on each worker's event loop, through one `aiohttp.ClientSession` per endpoint
(llhttp parses the answers; a connection is pooled only when its answer ended where its
framing said). The probes run in the lifecycle's background thread, a few calls a second at
most, through a requests.Session.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import requests

from proxy.provision.base import Endpoint
from proxy.upstream.tls import PinnedAdapter
from proxy.upstream.tls import context as tls_context
from proxy.util.logs import register_secrets


class _NoRedirects(requests.Session):
    """A probe asks the one upstream it was given: a 3xx is that upstream's answer, never a
    reason to fetch another URL (an upstream answering `302 Location: http://elsewhere/`
    would otherwise have the proxy poll elsewhere every second and take it for the GPU)."""

    def request(self, *args, **kwargs) -> requests.Response:
        kwargs["allow_redirects"] = False
        return super().request(*args, **kwargs)


class Exchange:
    """One forwarded request's upstream connection (its protocol), for the verdict on its
    framing once the answer has ended (proxy/upstream/forward.py): set by
    StrictConnector.connect."""

    __slots__ = ("protocol",)

    def __init__(self):
        self.protocol = None


EXCHANGE: contextvars.ContextVar[Exchange | None] = contextvars.ContextVar("exchange",
                                                                          default=None)


class StrictConnector(aiohttp.TCPConnector):
    """aiohttp's connector, but a kept connection that received bytes while it sat idle (an
    upstream that sent more than its last answer's framing, later than that answer) is closed,
    never handed to the next request: aiohttp 3.14 parses such bytes as that request's answer
    (test_framing.py). `should_close` is the protocol's own verdict (queued messages, a
    parse error, leftover bytes); `_get` is where aiohttp picks a kept connection. The
    connection each request got is noted in its Exchange: an answer read whole (or one with
    no body) has released its connection before the forwarder sees it."""

    async def _get(self, key, traces):
        while (conn := await super()._get(key, traces)) is not None:
            if conn.protocol is not None and not conn.protocol.should_close:
                return conn
            conn.close()
        return None

    async def connect(self, req, traces, timeout):
        conn = await super().connect(req, traces, timeout)
        exchange = EXCHANGE.get()
        if exchange is not None:
            exchange.protocol = conn.protocol
        return conn


@dataclass
class Client:
    """One endpoint's aiohttp session, with what each request to it needs."""

    session: aiohttp.ClientSession
    base: str  # scheme://host:port
    ssl: ssl.SSLContext | bool
    server_hostname: str | None


class Sessions:
    """Per endpoint, made on first use and kept: a requests.Session for the probes (threads) and
    an aiohttp client for forwarding (one per event loop), both with the certificate pinned."""

    def __init__(self, pool_size: int = 0, cert_dir: Path | None = None):
        self.pool_size = pool_size  # kept connections per endpoint for the probes
        self._cert_dir = Path(cert_dir or tempfile.gettempdir())
        self._sessions: dict[tuple, requests.Session] = {}
        self._clients: dict[tuple, Client] = {}
        self._last: tuple | None = None  # (endpoint, loop, client) of the last call
        self._lock = threading.Lock()

    @staticmethod
    def _key(endpoint: Endpoint) -> tuple:
        return (endpoint.url, endpoint.ca_cert, endpoint.server_hostname)

    def get(self, endpoint: Endpoint) -> requests.Session:
        key = self._key(endpoint)
        found = self._sessions.get(key)
        if found is None:
            with self._lock:
                found = self._sessions.get(key) or self._make(endpoint)
                self._sessions[key] = found
        return found

    def client(self, endpoint: Endpoint) -> Client:
        """The endpoint's aiohttp client on the running event loop (made on first use)."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is endpoint and last[1] is loop and \
                not last[2].session.closed:
            return last[2]  # the same endpoint object as the last request: most requests
        key = (*self._key(endpoint), id(loop))
        found = self._clients.get(key)
        if found is None or found.session.closed:
            found = self._clients[key] = self._make_client(endpoint)
        self._last = (endpoint, loop, found)
        return found

    def _make_client(self, endpoint: Endpoint) -> Client:
        register_secrets([endpoint.token])
        url = urlsplit(endpoint.url)
        if url.path not in ("", "/") or url.query:  # the client's path is sent as it is
            raise ValueError(f"an upstream URL is scheme://host:port, not {endpoint.url}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"an upstream URL is http(s)://host:port, not {endpoint.url}")
        tls: ssl.SSLContext | bool = tls_context(endpoint) if url.scheme == "https" else False
        # aiohttp sends a request again on a new connection only when a kept one turned out
        # closed, and only for idempotent methods with a body it still holds (never a POST,
        # never a streamed body): what Ollama is asked to generate is asked once.
        session = aiohttp.ClientSession(
            connector=StrictConnector(limit=0, ssl=tls),  # bounded by the client connections
            auto_decompress=False,  # bodies pass through untouched, encoded or not
            trust_env=False,  # never route upstream traffic through an env proxy
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),  # one client for every user: keep nothing
            read_bufsize=64 * 1024,
        )
        base = f"{url.scheme}://{url.netloc}"
        return Client(session, base, tls, endpoint.server_hostname)

    def _make(self, endpoint: Endpoint) -> requests.Session:
        register_secrets([endpoint.token])
        session = _NoRedirects()
        session.headers.clear()  # forward the client's headers, not requests' defaults
        session.trust_env = False  # never route upstream traffic through an env proxy
        adapter = PinnedAdapter(endpoint, pool_connections=4,
                                pool_maxsize=max(1, self.pool_size))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        if endpoint.ca_cert:
            session.verify = str(self._write_cert(endpoint.ca_cert))
        return session

    def _write_cert(self, pem: str) -> Path:
        digest = hashlib.sha256(pem.encode()).hexdigest()[:16]
        path = self._cert_dir / f"upstream-{digest}.pem"
        if not path.exists():
            self._cert_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(pem)
        return path

    async def aclose(self) -> None:
        """Close this event loop's aiohttp clients (their idle connections)."""
        loop_id = id(asyncio.get_running_loop())
        self._last = None
        for key, client in list(self._clients.items()):
            if key[-1] == loop_id:
                del self._clients[key]
                await client.session.close()

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()


def auth_headers(endpoint: Endpoint) -> dict[str, str]:
    return {"Authorization": f"Bearer {endpoint.token}"} if endpoint.token else {}


def normalise_model(name: str) -> str:
    """Ollama lists `llama3.2` as `llama3.2:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
