"""One spelling per route: the request path as the router, the key check and the upstream see it.

Falcon's router ignores repeated slashes and the server has already percent-decoded the path,
so `//admin/down` and `/%2Fadmin/down` reach the `/admin/down` resource. Every decision on the
path (admin-only routes, routing, what is forwarded) is taken on the canonical spelling, set as
`req.path` before anything else reads it.
"""

from __future__ import annotations

import re

import falcon

_SLASHES = re.compile(r"/{2,}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")  # no route has them; a backslash is a slash to some


def canonical(path: str) -> str:
    """`path` (percent-decoded) with repeated slashes collapsed.

    ValueError for what cannot be made one spelling safely: dot segments (`.` and `..`, which
    the upstream's front would resolve to another route), control characters and backslashes.
    """
    if _CONTROL.search(path):
        raise ValueError("control characters and backslashes are not allowed in the path")
    path = _SLASHES.sub("/", path) or "/"
    if "/." in path and any(part in (".", "..") for part in path.split("/")):
        raise ValueError("dot segments are not allowed in the path")
    return path


class CanonicalPath:
    """Falcon (ASGI) middleware, first to see a request: `req.path` becomes its canonical
    spelling."""

    async def process_request(self, req, resp) -> None:
        try:
            req.path = canonical(req.path)
        except ValueError as exc:
            raise falcon.HTTPBadRequest(description=str(exc)) from None
