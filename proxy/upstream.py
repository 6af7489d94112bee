"""Talking to the upstream Ollama: pooled connections (with the upstream's certificate pinned)
and the readiness probe.

Forwarding goes through a pool of this project's small HTTP/1.1 client per endpoint
(proxy/h1.py): requests' per-call work, and then http.client's header parsing under urllib3,
cost more than the forwarding itself (bench/RESULTS.md). The probes, a few calls a second at
most, use a requests.Session.
"""

from __future__ import annotations

import hashlib
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.certs import where as default_ca_bundle

from . import h1
from .logs import register_secrets
from .provisioner import Endpoint


class _PinnedAdapter(HTTPAdapter):
    """Verifies the upstream's certificate against the name it was issued to, not the IP."""

    def __init__(self, server_hostname: str | None, **kwargs):
        self._server_hostname = server_hostname
        super().__init__(**kwargs)

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        if self._server_hostname:
            pool_kwargs["server_hostname"] = self._server_hostname
            pool_kwargs["assert_hostname"] = self._server_hostname
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)


class _NoRedirects(requests.Session):
    """A probe asks the one upstream it was given: a 3xx is that upstream's answer, never a
    reason to fetch another URL (an upstream answering `302 Location: http://elsewhere/`
    would otherwise have the proxy poll elsewhere every second and take it for the GPU)."""

    def request(self, *args, **kwargs) -> requests.Response:
        kwargs["allow_redirects"] = False
        return super().request(*args, **kwargs)


class Sessions:
    """Per endpoint, made on first use and kept: a requests.Session for the probes and a
    connection pool for forwarding (proxy/h1.py), both with the upstream's certificate pinned."""

    def __init__(self, pool_size: int, cert_dir: Path | None = None):
        self.pool_size = pool_size
        self._cert_dir = Path(cert_dir or tempfile.gettempdir())
        self._sessions: dict[tuple, requests.Session] = {}
        self._pools: dict[tuple, h1.Pool] = {}
        self._lock = threading.Lock()

    def get(self, endpoint: Endpoint) -> requests.Session:
        return self._kept(self._sessions, endpoint, self._make)

    def pool(self, endpoint: Endpoint, timeouts: tuple[float, float]) -> h1.Pool:
        """Connections to the endpoint's host, `pool_size` kept alive (one per request thread);
        timeouts: (connect, read) seconds."""
        return self._kept(self._pools, endpoint, lambda e: self._make_pool(e, timeouts), timeouts)

    def _kept(self, made: dict, endpoint: Endpoint, make, *extra):
        key = (endpoint.url, endpoint.ca_cert, endpoint.server_hostname, *extra)
        found = made.get(key)
        if found is None:
            with self._lock:
                found = made.get(key) or make(endpoint)
                made[key] = found
        return found

    def _make_pool(self, endpoint: Endpoint, timeouts: tuple[float, float]) -> h1.Pool:
        register_secrets([endpoint.token])
        url = urllib3.util.parse_url(endpoint.url)
        if url.path not in (None, "", "/"):  # the pool is sent the client's path as it is
            raise ValueError(f"an upstream URL is scheme://host:port, not {endpoint.url}")
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"an upstream URL is http(s)://host:port, not {endpoint.url}")
        tls = None
        if url.scheme == "https":
            tls = ssl.create_default_context(
                cafile=None if endpoint.ca_cert else default_ca_bundle(),  # as the probes
                cadata=endpoint.ca_cert or None,
            )
        return h1.Pool(url.host.strip("[]"), url.port or (443 if tls else 80), self.pool_size,
                       *timeouts,
                       tls=tls, server_hostname=endpoint.server_hostname)

    def _make(self, endpoint: Endpoint) -> requests.Session:
        register_secrets([endpoint.token])
        session = _NoRedirects()
        session.headers.clear()  # forward the client's headers, not requests' defaults
        session.trust_env = False  # never route upstream traffic through an env proxy
        adapter = _PinnedAdapter(
            endpoint.server_hostname, pool_connections=4, pool_maxsize=self.pool_size
        )
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

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.close()
            for pool in self._pools.values():
                pool.close()  # the idle connections; those in use close when released
            self._sessions.clear()
            self._pools.clear()


def auth_headers(endpoint: Endpoint) -> dict[str, str]:
    return {"Authorization": f"Bearer {endpoint.token}"} if endpoint.token else {}


def normalise_model(name: str) -> str:
    """Ollama lists `llama3.2` as `llama3.2:latest`."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclass(frozen=True)
class Probe:
    ready: bool
    reason: str  # for a person: why it is not ready yet
    version: str | None = None
    answered: bool = True  # False: nothing answered at all (not booted, or gone)


def probe(sessions: Sessions, endpoint: Endpoint, models: tuple[str, ...]) -> Probe:
    """Ready means the upstream answers and `/api/tags` lists every configured model."""
    session = sessions.get(endpoint)
    try:
        answer = session.get(
            endpoint.url + "/api/tags", headers=auth_headers(endpoint), timeout=(3, 10)
        )
    except requests.RequestException as exc:
        return Probe(False, f"the upstream does not answer yet ({type(exc).__name__})",
                     answered=False)
    if answer.status_code != 200:
        return Probe(False, f"the upstream answers /api/tags with HTTP {answer.status_code}")
    try:
        listed = {normalise_model(m.get("name", "")) for m in answer.json().get("models", [])}
    except (ValueError, AttributeError):
        return Probe(False, "the upstream's /api/tags is not Ollama's JSON")
    missing = [m for m in models if normalise_model(m) not in listed]
    if missing:
        return Probe(False, f"waiting for the upstream to list {', '.join(missing)}")
    version = None
    try:
        version = session.get(
            endpoint.url + "/api/version", headers=auth_headers(endpoint), timeout=(3, 10)
        ).json().get("version")
    except (requests.RequestException, ValueError, AttributeError):
        pass
    return Probe(True, "ready", version)


def load_model(
    sessions: Sessions, endpoint: Endpoint, model: str, keep_alive: float, timeout: float
) -> str | None:
    """Load `model` into GPU memory (Ollama's empty generate); None when done, else why not."""
    try:
        answer = sessions.get(endpoint).post(
            endpoint.url + "/api/generate",
            json={"model": model, "keep_alive": int(keep_alive), "stream": False},
            headers=auth_headers(endpoint),
            timeout=(3, timeout),
        )
    except requests.RequestException as exc:
        return f"loading {model} failed ({type(exc).__name__})"
    if answer.status_code != 200:
        return f"loading {model} failed: HTTP {answer.status_code}"
    return None


PROGRESS_PATH = "/ollama-exoscale/status"  # served by the GPU server's front (cloud-init)


def server_progress(sessions: Sessions, endpoint: Endpoint) -> dict | None:
    """The GPU server's own bring-up progress, if its front serves it (None otherwise)."""
    try:
        answer = sessions.get(endpoint).get(
            endpoint.url + PROGRESS_PATH, headers=auth_headers(endpoint), timeout=(3, 5)
        )
        doc = answer.json() if answer.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("detail"), str) else None
