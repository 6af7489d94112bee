"""The proxy's own routes: /, /status, /ui, /admin/up, /admin/down, /admin/bake, and the model lists
clients poll (answered here until the GPU server is ready, forwarded after).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import falcon

from proxy.config import Config
from proxy.http.forwarding import forward
from proxy.lifecycle.demand import Lifecycle
from proxy.lifecycle.snapshot import Snapshot
from proxy.lifecycle.status import status_document
from proxy.upstream.forward import Forwarder
from proxy.upstream.session import normalise_model

LOCAL_VERSION = "0.12.6"  # answered by /api/version before any upstream told us its own


class Root:
    async def on_get(self, req, resp) -> None:
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "Ollama is running"

    on_head = on_get


class Status:
    def __init__(self, config: Config, lifecycle: Lifecycle):
        self.config = config
        self.lifecycle = lifecycle

    async def on_get(self, req, resp) -> None:
        resp.media = status_document(self.config, self.lifecycle)


class Page:
    """/ui: one self-contained page; it holds no data, it fetches /status with the key."""

    def __init__(self):
        self.html = (Path(__file__).with_name("ui.html")).read_bytes()

    async def on_get(self, req, resp) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.cache_control = ["no-cache"]
        resp.data = self.html


class WarmUp:
    """POST /admin/up: start the GPU server now, as a request would; with one ready and
    PROXY_MAX_SERVERS above 1, one more (admin key)."""

    def __init__(self, config: Config, lifecycle: Lifecycle):
        self.config = config
        self.lifecycle = lifecycle

    async def on_post(self, req, resp) -> None:
        serving = self.lifecycle.snapshot().serving
        if not serving and self.lifecycle.refresh_needed():
            # Another worker may have shown `ready` already: this `up` then asks for one more.
            serving = await asyncio.to_thread(self.lifecycle.refresh)
        if not serving:
            self.lifecycle.want()
        elif self.config.max_servers > 1:
            self.lifecycle.one_more()
        resp.status = falcon.HTTP_202
        resp.media = status_document(self.config, self.lifecycle)


class ShutDown:
    """POST /admin/down: remove the GPU server now, once its streams end (admin key)."""

    def __init__(self, config: Config, lifecycle: Lifecycle):
        self.config = config
        self.lifecycle = lifecycle

    async def on_post(self, req, resp) -> None:
        self.lifecycle.down()
        resp.status = falcon.HTTP_202
        resp.media = status_document(self.config, self.lifecycle)


class BakeTemplate:
    """POST /admin/bake[?models=1]: make a private template of the GPU server (admin key).

    The lease holder reads the request from this worker's report on its next tick: it brings
    a server up if none is ready, then bakes while demand waits."""

    def __init__(self, config: Config, lifecycle: Lifecycle):
        self.config = config
        self.lifecycle = lifecycle

    async def on_post(self, req, resp) -> None:
        models = req.get_param("models") or "0"
        if models not in ("0", "1", "true", "false"):
            raise falcon.HTTPBadRequest(
                description=f"models={models!r} is not valid: expected 1 (keep the models in "
                "the template) or 0")
        if not self.lifecycle.can_bake:
            raise falcon.HTTPConflict(
                description=f"the {self.lifecycle.provisioner.name} provisioner cannot bake a "
                "template: bake needs PROXY_PROVISIONER=exoscale")
        snapshot = self.lifecycle.snapshot()
        if snapshot.state.phase == "baking":
            raise falcon.HTTPConflict(description="a bake is under way; follow it in /status")
        at = self.lifecycle.bake(models=models in ("1", "true"))
        resp.status = falcon.HTTP_202
        resp.media = {**status_document(self.config, self.lifecycle), "bake_requested_at": at}


class Passive:
    """Routes clients poll to list models: answered here until the upstream is ready."""

    def __init__(self, config: Config, lifecycle: Lifecycle, forwarder: Forwarder, local):
        self.config = config
        self.lifecycle = lifecycle
        self.forwarder = forwarder
        self.local = local

    async def on_get(self, req, resp) -> None:
        ticket = self.lifecycle.admit(demand=False)
        if ticket is None:
            resp.media = self.local(self.config, self.lifecycle.snapshot())
            return
        await forward(self.forwarder, self.lifecycle, self.config, req, resp, ticket)


def local_version(config: Config, snapshot: Snapshot) -> dict[str, Any]:
    return {"version": snapshot.state.upstream_version or LOCAL_VERSION}


def local_tags(config: Config, snapshot: Snapshot) -> dict[str, Any]:
    models = []
    for model in config.models:
        name = normalise_model(model)
        family = name.split("/")[-1].split(":")[0]
        models.append({
            "name": name, "model": name, "modified_at": "1970-01-01T00:00:00Z", "size": 0,
            "digest": "", "details": {"format": "gguf", "family": family, "families": [family],
                                      "parameter_size": "", "quantization_level": ""},
        })
    return {"models": models}


def local_ps(config: Config, snapshot: Snapshot) -> dict[str, Any]:
    return {"models": []}


def local_openai_models(config: Config, snapshot: Snapshot) -> dict[str, Any]:
    data = [
        {"id": normalise_model(m), "object": "model", "created": 0, "owned_by": "library"}
        for m in config.models
    ]
    return {"object": "list", "data": data}
