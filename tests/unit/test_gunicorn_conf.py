"""proxy/gunicorn_conf.py's worker hooks, run in a fresh interpreter as gunicorn runs them: the
master's on_starting, the app built (`proxy.asgi:create()`), then post_worker_init."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.harness import REPO

WORKER = """
import gc, json, os, weakref
import proxy.gunicorn_conf as conf
conf.on_starting(None)  # as gunicorn's master does: the metrics directory
from proxy.asgi import create  # noqa: E402 (its metrics are made at import)

app = create()
frozen_before = gc.get_freeze_count()
conf.post_worker_init(None)


class Node:
    pass


a, b = Node(), Node()
a.peer, b.peer = b, a  # a cycle made after start-up: only the collector can free it
freed = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps({
    "frozen_before": frozen_before,
    "frozen": gc.get_freeze_count(),
    "app_frozen": all(obj is not app for obj in gc.get_objects()),
    "later_cycle_freed": freed() is None,
}), flush=True)
os._exit(0)  # the lifecycle's threads are not this test's
"""


def test_a_worker_freezes_what_start_up_made_and_still_collects_what_comes_after(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PROXY_STATE_DIR": str(tmp_path),
           "PROXY_PROVISIONER": "local", "PROXY_LOCAL_COMMAND": "true",
           "PROXY_API_KEYS": "k" * 32}
    done = subprocess.run([sys.executable, "-c", WORKER], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["frozen_before"] == 0
    assert seen["frozen"] > 10_000  # the modules, the app and its config: out of every walk
    assert seen["app_frozen"]
    assert seen["later_cycle_freed"]
