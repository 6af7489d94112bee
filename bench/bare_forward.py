"""bare-forward: the floor for our stack on the forwarding path.

A Falcon ASGI app with no logic that forwards every /api and /v1 request to BENCH_UPSTREAM
through one aiohttp session and answers with the upstream's status, content type and body, run
under the proxy's own gunicorn settings (uvicorn's worker):

    BENCH_UPSTREAM=http://127.0.0.1:11434 gunicorn -c proxy/gunicorn_conf.py \
        'bench.bare_forward:create()'

No streaming, no limits, no framing checks: what the proxy adds over it is the price of those
(and of auth, metrics and the lifecycle).
"""

from __future__ import annotations

import os

import aiohttp
import falcon
import falcon.asgi

from bench.bare_falcon import Root


class Forward:
    def __init__(self, upstream: str):
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, req, resp, **_: object) -> None:
        if self.session is None:  # made on the worker's own event loop
            self.session = aiohttp.ClientSession(auto_decompress=False)
        body = await req.stream.read()
        async with self.session.request(req.method, self.upstream + req.path,
                                        data=body or None) as answer:
            resp.status = answer.status
            resp.content_type = answer.content_type
            resp.data = await answer.read()


def create() -> falcon.asgi.App:
    app = falcon.asgi.App()
    app.add_route("/", Root())
    app.add_sink(Forward(os.environ["BENCH_UPSTREAM"]), r"^/(api|v1)(/|$)")
    return app
