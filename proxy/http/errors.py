"""One error body for every answer the proxy writes itself: Ollama's flat {"error": "..."} on
/api/* (and everywhere else), OpenAI's error object on /v1/*. Falcon's error serializer and the
HTTP server's own refusals (proxy/http/server.py) both write it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import falcon


def is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def error_body(path: str, message: str, **extra: Any) -> dict[str, Any]:
    """The error document for `path`'s clients; `extra` adds fields (OpenAI's `type`, `code`)."""
    if is_openai(path):
        return {"error": {"message": message, "type": extra.pop("type", "error"), **extra}}
    return {"error": message, **extra}


def error_json(path: str, message: str, **extra: Any) -> bytes:
    return json.dumps(error_body(path, message, **extra)).encode()


def serialize_error(req, resp, exc: falcon.HTTPError) -> None:
    """Every error as JSON with an `error` field, in the shape the route's clients parse."""
    message = exc.description or exc.title
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(error_body(req.path, message))


async def handle_unexpected(req, resp, exc, params, **_: Any) -> None:
    """A bug never crashes the worker nor leaks internals: a 500 with a JSON error."""
    if isinstance(exc, falcon.HTTPError):
        raise exc
    logging.getLogger("ollama_exoscale.app").exception("unhandled error on %s", req.path)
    raise falcon.HTTPInternalServerError(description="internal error in the proxy; see its logs")
