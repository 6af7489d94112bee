"""One worker's proxy: config → store, provisioner, lifecycle, forwarder → the ASGI app.

gunicorn calls `create()` in each worker after the fork (`proxy.asgi:create()`), so every
worker has its own threads, sessions and store connection; uvicorn's worker (proxy/http/server.py)
serves the app on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import falcon.asgi

from proxy.config import Config
from proxy.http.app import create_app
from proxy.lifecycle.demand import Lifecycle
from proxy.provision.local import make_provisioner
from proxy.store import open_store
from proxy.upstream.forward import Forwarder
from proxy.upstream.session import Sessions
from proxy.util.logs import register_secrets, setup_logging

log = logging.getLogger("ollama_exoscale")

CLOSE_TIMEOUT = 8.0  # seconds for a running provisioning step, after the streams' 20 (of 30)


class Lifespan:
    """The worker's start and end (uvicorn's lifespan). At the start, the pool of PROXY_THREADS
    threads that runs the app's blocking calls off the event loop (asyncio.to_thread: the
    snapshot refresh before a 503, the wrong-key lock, the metrics scrape). On the shutdown,
    once its connections have ended: let a provisioning step finish and give the lease up, in
    a thread (it waits)."""

    def __init__(self, life: Lifecycle, sessions: Sessions, threads: int):
        self.life = life
        self.sessions = sessions
        self.threads = threads

    async def process_startup(self, scope, event) -> None:
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(self.threads, thread_name_prefix="proxy-blocking"))

    async def process_shutdown(self, scope, event) -> None:
        await self.sessions.aclose()
        await asyncio.to_thread(self.life.close, CLOSE_TIMEOUT)


def build(config: Config) -> tuple[falcon.asgi.App, Lifecycle]:
    sessions = Sessions(pool_size=4, cert_dir=config.state_dir / "certs")
    store = open_store(config.state_url, config.state_dir)
    provisioner = make_provisioner(config)
    life = Lifecycle(config, provisioner, store, sessions)
    forwarder = Forwarder(sessions, config.connect_timeout, config.read_timeout,
                          config.client_timeout)
    app = create_app(config, life, forwarder)
    app.add_middleware(Lifespan(life, sessions, config.threads))
    return app, life


def create() -> falcon.asgi.App:
    config = Config.from_env()
    setup_logging(config.log_level, config.log_format)
    register_secrets(config.secrets)
    if not config.auth_enabled:
        log.warning("PROXY_API_KEYS is empty: anyone who can reach %s can use the GPU", config.bind)
    app, _ = build(config)
    return app
