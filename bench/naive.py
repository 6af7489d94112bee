"""naive: the forwarder a first attempt would write, as a reference for the proxy's forwarding.

Falcon and one shared requests.Session (its default pool), the request body read whole, the
answer streamed with `iter_content`. A WSGI app, run under the proxy's gunicorn settings but
gthread's worker (32 threads), with the upstream in BENCH_UPSTREAM:

    BENCH_UPSTREAM=http://127.0.0.1:11435 gunicorn -c proxy/gunicorn_conf.py -k gthread \
        --threads 32 'bench.naive:create()'
"""

from __future__ import annotations

import os

import falcon
import requests

CHUNK = 64 * 1024  # the proxy's own block size, so the difference is not the block size
DROP = frozenset({"host", "connection", "transfer-encoding", "keep-alive"})


class Forward:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.session = requests.Session()

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: object) -> None:
        url = self.upstream + req.path + (f"?{req.query_string}" if req.query_string else "")
        headers = {k: v for k, v in req.headers.items() if k.lower() not in DROP}
        upstream = self.session.request(
            req.method, url, headers=headers, data=req.bounded_stream.read(), stream=True
        )
        resp.status = upstream.status_code
        for name, value in upstream.headers.items():
            if name.lower() not in DROP:
                resp.append_header(name, value)
        resp.stream = upstream.iter_content(CHUNK)


def create() -> falcon.App:
    app = falcon.App()
    app.add_sink(Forward(os.environ["BENCH_UPSTREAM"]), r"/")
    return app
