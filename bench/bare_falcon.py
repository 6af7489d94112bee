"""bare-falcon: the floor for our stack on the 503 path.

A Falcon ASGI app with no logic that answers every /api and /v1 request with the proxy's 503
JSON body and Retry-After, run under the proxy's own gunicorn settings (uvicorn's worker):

    gunicorn -c proxy/gunicorn_conf.py 'bench.bare_falcon:create()'
"""

from __future__ import annotations

import os

import falcon
import falcon.asgi

# The bench sets BENCH_503_BODY to the proxy's own 503 body, so both send the same bytes.
FALLBACK_BODY = (
    '{"error": "The GPU server is starting. Retry in 5 s.", "provisioning": true, '
    '"status": "provisioning", "retry_after": 5}'
)


class Unavailable:
    def __init__(self, body: str, retry_after: str):
        self.body = body
        self.retry_after = retry_after

    async def __call__(self, req, resp, **_: object) -> None:
        resp.status = falcon.HTTP_503
        resp.set_header("Retry-After", self.retry_after)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self.body


class Root:
    async def on_get(self, req, resp) -> None:
        resp.content_type = falcon.MEDIA_TEXT
        resp.text = "Ollama is running"


def create() -> falcon.asgi.App:
    app = falcon.asgi.App()
    app.add_route("/", Root())
    unavailable = Unavailable(
        os.environ.get("BENCH_503_BODY", FALLBACK_BODY), os.environ.get("BENCH_RETRY_AFTER", "5")
    )
    app.add_sink(unavailable, r"^/(api|v1)(/|$)")
    return app
