"""gunicorn settings for the proxy, from the project's config (PROXY_* environment).

Run directly with `gunicorn -c proxy/gunicorn_conf.py 'proxy.wsgi:create()'`, or through
`ollama-exoscale serve`, which uses the same settings.
"""

import os
import shutil

from proxy.config import Config

_config = Config.from_env()

bind = _config.bind
workers = _config.workers
threads = _config.threads
# gthread keeps the worker's heartbeat apart from request threads: a stream that runs for
# many minutes is never killed by `timeout` (a sync worker would be). Ours reads each
# request's head before it takes a thread (slow clients cannot hold them all) and accepts only
# while a thread is free (a burst spreads over the workers instead of queueing in one).
worker_class = "proxy.worker.ThreadWorker"
timeout = int(_config.worker_timeout)
# Time for streams to finish and for a running provisioning step to end on SIGTERM.
graceful_timeout = 30
keepalive = 5
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


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server, worker):
    """Let a provisioning step finish and give the lease up before the worker goes."""
    from proxy import wsgi

    wsgi.close(timeout=graceful_timeout - 2)
