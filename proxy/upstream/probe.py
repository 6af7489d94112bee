"""What the lifecycle asks the upstream Ollama from its background thread: is it ready (it
answers and lists every model), load a model, delete one (before a bake without models),
and the GPU server's own bring-up progress.
Through the requests sessions of proxy/upstream/session.py: no redirects followed.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from proxy.provision.base import Endpoint
from proxy.upstream.session import Sessions, auth_headers, normalise_model


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


def delete_model(sessions: Sessions, endpoint: Endpoint, model: str) -> None:
    """Ollama's DELETE /api/delete for one model; a model it does not have is no error."""
    answer = sessions.get(endpoint).delete(endpoint.url + "/api/delete", json={"model": model},
                                           headers=auth_headers(endpoint), timeout=(3, 60))
    if answer.status_code not in (200, 404):
        raise requests.HTTPError(f"HTTP {answer.status_code}")
