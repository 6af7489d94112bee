"""Bearer keys: who may use the proxy, and who may change the GPU server and its models.

Installed only when keys are configured. Keys are compared in constant time; admin routes are
matched on the canonical path (proxy/http/paths.py, which runs first), so no spelling of a path
gets around them; wrong keys are counted per address across every worker (proxy/http/lockout.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re

import falcon

from proxy.config import Config
from proxy.http.lockout import FailureLimit

# Routes that can fill the disk, change or remove models, or the GPU server: admin keys only.
# Matched on the canonical path (proxy/http/paths.py); a trailing slash is the same route upstream.
ADMIN_ROUTES = re.compile(r"^/api/(pull|push|create|copy|delete)/?$|^/api/blobs(/|$)|^/admin(/|$)")


class Auth:
    """Bearer keys on every route but GET|HEAD / and the static /ui page, in constant time
    (installed only when keys are configured).

    Management routes (pull, push, create, copy, delete, blobs, /admin/*) need an admin key.
    Only an offered wrong key counts toward the per-address limit: a request without a key (a
    /ui tab left open) gets 401 and counts nothing, and a valid key is never answered 429.
    """

    def __init__(self, config: Config):
        # Counted across every worker: a client's connections land on any of them.
        self.failures = FailureLimit(config.state_dir / "auth-failures", config.auth_failures)
        self.keys = [(key.encode(), False) for key in config.api_keys]
        self.keys += [(key.encode(), True) for key in config.admin_keys]
        self.names = dict(config.key_names)
        self.log = logging.getLogger("ollama_exoscale.auth")

    async def process_request(self, req, resp) -> None:
        if _public(req):
            return
        scheme, _, offered = (req.get_header("Authorization") or "").partition(" ")
        offered_bytes = offered.strip().encode()
        match = None
        for key, admin in self.keys:  # no early exit: timing tells nothing about which key
            if hmac.compare_digest(key, offered_bytes) and scheme.lower() == "bearer":
                match = (key.decode(), admin)
        if match is None:
            await self._refuse(req, offered_bytes)
        key, admin = match
        req.context.key_name = self.names.get(key, "key")
        if not admin and ADMIN_ROUTES.match(req.path):
            self.log.warning("403 for %s %s: key %s is not an admin key", req.method, req.path,
                             req.context.key_name)
            raise falcon.HTTPForbidden(
                description=f"{req.path} changes the server or its models: it needs an admin "
                "key (PROXY_ADMIN_KEYS)"
            )

    async def _refuse(self, req, offered: bytes) -> None:
        """401 for a missing or wrong key; 429 once an address has offered too many wrong ones."""
        if offered:
            blocked_for = self.failures.blocked_for(req.remote_addr)
            if blocked_for:
                raise falcon.HTTPTooManyRequests(
                    description="too many requests with a wrong API key from this address; "
                    f"retry in {blocked_for} s",
                    retry_after=blocked_for,
                )
            await asyncio.to_thread(self.failures.record, req.remote_addr)  # a file lock
        self.log.warning("401 for %s %s from %s: %s", req.method, req.path, req.remote_addr,
                         "unknown key" if offered else "no bearer key")
        raise falcon.HTTPUnauthorized(
            description="a valid API key is required: send Authorization: Bearer <key>",
            challenges=["Bearer"],
        )


def _public(req) -> bool:
    return req.method in ("GET", "HEAD") and req.path in ("/", "/ui")
