"""The HTTP face of the proxy: create_app(config, lifecycle, forwarder), middleware and routes.

An ASGI app (falcon.asgi) on each worker's event loop: responders only read the lifecycle's
in-memory snapshot and count demand in memory; what may block (the shared wrong-key table's
lock, a store read) goes to a thread, and a held request (`Prefer: wait`) is a coroutine.
"""

from __future__ import annotations

import falcon.asgi

from proxy.config import Config
from proxy.http.auth import Auth
from proxy.http.errors import handle_unexpected, serialize_error
from proxy.http.forwarding import Demand
from proxy.http.metrics import Counting, MetricsResource
from proxy.http.paths import CanonicalPath
from proxy.http.resources import (
    BakeTemplate,
    Page,
    Passive,
    Root,
    ShutDown,
    Status,
    WarmUp,
    local_openai_models,
    local_ps,
    local_tags,
    local_version,
)
from proxy.lifecycle.demand import Lifecycle
from proxy.upstream.forward import Forwarder


def create_app(config: Config, lifecycle: Lifecycle, forwarder: Forwarder) -> falcon.asgi.App:
    # Without keys there is nothing to check: no middleware on the hot path for it.
    middleware = [Counting(), CanonicalPath()] + ([Auth(config)] if config.auth_enabled else [])
    app = falcon.asgi.App(middleware=middleware)
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.req_options.strip_url_path_trailing_slash = False
    app.add_route("/", Root())
    app.add_route("/status", Status(config, lifecycle))
    app.add_route("/metrics", MetricsResource(lifecycle, config.idle_timeout))
    app.add_route("/ui", Page())
    app.add_route("/admin/up", WarmUp(config, lifecycle))
    app.add_route("/admin/down", ShutDown(config, lifecycle))
    app.add_route("/admin/bake", BakeTemplate(config, lifecycle))
    for path, local in (
        ("/api/version", local_version),
        ("/api/tags", local_tags),
        ("/api/ps", local_ps),
        ("/v1/models", local_openai_models),
    ):
        app.add_route(path, Passive(config, lifecycle, forwarder, local))
    demand = Demand(config, lifecycle, forwarder)
    app.add_sink(demand, r"^/api(/|$)")
    app.add_sink(demand, r"^/v1(/|$)")
    return app
