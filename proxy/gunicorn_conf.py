"""gunicorn settings for the proxy, from the project's config (PROXY_* environment).

Run directly with `gunicorn -c proxy/gunicorn_conf.py 'proxy.asgi:create()'`, or through
`ollama-exoscale serve`, which uses the same settings.
"""

import gc
import os
import resource
import shutil

from proxy.config import Config
from proxy.util.shared_file import allocate

_config = Config.from_env()

bind = _config.bind
workers = _config.workers
# Each worker is one event loop (uvicorn, proxy/http/server.py): a stream holds a connection, not
# a thread, and the worker's heartbeat to gunicorn comes from that loop, so nothing blocking
# runs on it (the store, the reconciler and Pulumi keep their background threads).
worker_class = "proxy.http.server.Worker"
timeout = int(_config.worker_timeout)
# On SIGTERM: time for streams to finish (proxy.http.server.STREAM_GRACE), then for a running
# provisioning step to end and the lease to be handed over (proxy.asgi.Lifespan).
graceful_timeout = 30
keepalive = 5  # seconds a kept-alive connection may stay idle between requests
# Each worker builds its own app after the fork: threads and sockets are never shared.
preload_app = False
# gunicorn 27's control socket would be shared by every proxy on the host; not needed here.
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = _config.log_level


# Workers' metrics are summed through files here (prometheus-client's multiprocess mode).
_metrics_dir = _config.state_dir / "metrics"
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)


def on_starting(server):
    """A fresh metrics dir: counts of a previous run's workers would be summed in otherwise."""
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    # Each connection is a descriptor, and each forwarded one a second (its upstream).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * _config.max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


# prometheus-client's value files of a worker (its values.MultiProcessValue names them
# `<type>_<pid>.db`; mmap_dict.MmapedDict reads a zeroed one as empty) and their sizes: made
# with their blocks allocated before the worker imports the metrics. The library makes them
# sparse (ftruncate) and writes through a map, so a new label set written once the disk is
# full was a SIGBUS that killed the worker mid-request (tests/integration/test_faults.py).
METRICS_FILES = {"counter": 256 * 1024, "gauge_livesum": 64 * 1024}


def post_fork(server, worker):
    for kind, size in METRICS_FILES.items():
        try:
            allocate(_metrics_dir / f"{kind}_{worker.pid}.db", size)
        except OSError as exc:  # the library makes it sparse, as it would have anyway
            server.log.error("cannot allocate the worker's metrics file: %s", exc.strerror)


def post_worker_init(worker):
    """The worker's app is built: what start-up made and keeps (modules, the app, its config) is
    moved out of the collector's reach, so each collection walks only what requests made.
    Measured in bench/RESULTS.md ("The collector"): collections had cost ~21 µs a request at 64
    clients (~9 µs frozen), and the full ones set the tail (p99 47 → 21 ms on /api/embed)."""
    gc.collect()  # start-up's garbage goes first: a frozen object is never freed
    gc.freeze()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)

