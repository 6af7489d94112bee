"""moto's S3 server for tests, with S3's guarantee that a conditional write is atomic.

moto 5.2.5 implements If-Match and If-None-Match on PutObject, but checks the condition and
then writes in two steps without a lock, on a threaded server; S3 (and Exoscale SOS) decide and
write atomically. Serialising writes restores that guarantee; reads stay concurrent.

    python -m tests.doubles.moto_s3 PORT
"""

from __future__ import annotations

import sys
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple

READS = ("GET", "HEAD", "OPTIONS")


def atomic_writes(app):
    lock = threading.Lock()

    def serve(environ, start_response):
        if environ["REQUEST_METHOD"] in READS:
            return app(environ, start_response)
        with lock:
            return list(app(environ, start_response))

    return serve


def main(port: int) -> None:
    app = DomainDispatcherApplication(create_backend_app)
    run_simple("127.0.0.1", port, atomic_writes(app), threaded=True,
               request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main(int(sys.argv[1]))
