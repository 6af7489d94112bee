"""Faults with real processes: an upstream that dies or hangs, a worker SIGKILLed mid-stream,
a state dir whose disk is full. The proxy keeps answering, loses no count, and recovers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.harness import Proxy, free_port, starts, upstream_env, wait_until
from tests.procfs import children

pytestmark = pytest.mark.slow



def upstream_pid(state_dir) -> int:
    return json.loads((state_dir / "local-upstream.json").read_text())["pid"]


def long_stream(proxy: Proxy, tokens: int = 200) -> requests.Response:
    return requests.post(
        proxy.url + "/api/chat",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
              "options": {"num_predict": tokens}},
        headers={"X-Fake-Interval": "0.1"}, stream=True, timeout=10,
    )


def test_an_upstream_killed_mid_stream_ends_it_with_an_error_line_and_is_brought_back(tmp_path):
    with Proxy(tmp_path, **upstream_env(tmp_path, PROXY_IDLE_TIMEOUT=600)) as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
        answer = long_stream(proxy)
        lines = answer.iter_lines()
        first = [json.loads(next(lines)) for _ in range(2)]
        os.killpg(upstream_pid(tmp_path), signal.SIGKILL)
        rest = [json.loads(line) for line in lines]  # ends: a hang would raise ReadTimeout
        assert not first[-1]["done"]
        assert "error" in rest[-1] and len(rest) < 200
        # No client asks again: the broken stream alone has the upstream probed, found gone
        # and started anew (the 15 s health check alone needed 45 s, then waited for demand).
        wait_until(lambda: starts(tmp_path) == 2, 30, interval=0.2, what="a second start")
        proxy.wait_phase("ready", timeout=30)
        again = requests.post(proxy.url + "/api/chat", json={
            "model": "llama3.2", "stream": False,
            "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert again.status_code == 200 and again.json()["done"]


def test_a_hanging_upstream_gets_a_504_is_noticed_and_kept_when_it_answers_again(tmp_path):
    with Proxy(tmp_path, **upstream_env(tmp_path, PROXY_READ_TIMEOUT=2,
                                        PROXY_IDLE_TIMEOUT=600)) as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
        os.killpg(upstream_pid(tmp_path), signal.SIGSTOP)  # alive, listening, silent
        try:
            answer = requests.post(proxy.url + "/api/show", json={"model": "llama3.2"},
                                   timeout=30)
            assert answer.status_code == 504
            assert "did not answer within 2 s" in answer.json()["error"]
            # The 504 has the reconciler probe at once; a stopped upstream fails its probes
            # (10 s each) and is re-examined: it exists, so it is `starting` until it answers.
            wait_until(lambda: proxy.status()["provisioning_status"] != "ready", 60,
                       interval=0.2, what="the hung upstream to be noticed")
        finally:
            os.killpg(upstream_pid(tmp_path), signal.SIGCONT)
        proxy.wait_phase("ready", timeout=30)
        assert starts(tmp_path) == 1  # it answers again: adopted, not started twice


def serving_worker(proxy: Proxy, client: socket.socket) -> int:
    """The worker process holding the server side of `client`'s connection."""
    client_port = client.getsockname()[1]
    inode = None
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        if local_port == proxy.port and remote_port == client_port:
            inode = fields[9]
    assert inode is not None, "no server side for the client's connection"
    for pid in children(proxy.process.pid):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


def test_a_worker_killed_mid_stream_stops_counting_and_the_idle_server_is_removed(tmp_path):
    env = upstream_env(tmp_path, PROXY_IDLE_TIMEOUT=2)
    with Proxy(tmp_path, **env) as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
            body = json.dumps({"model": "llama3.2", "options": {"num_predict": 100000},
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            client.sendall(
                b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"X-Fake-Interval: 0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            assert client.recv(65536).startswith(b"HTTP/1.1 200")
            wait_until(lambda: proxy.status()["in_flight"] == 1, 10, what="the stream counted")
            worker = serving_worker(proxy, client)
            os.kill(worker, signal.SIGKILL)
            # The dead worker's count expires with its heartbeat (10 s); then idle time runs.
            wait_until(lambda: proxy.status()["in_flight"] == 0, 30, interval=0.2,
                       what="the dead worker's stream to stop counting")
            idle = proxy.wait_phase("idle", timeout=30)
        assert idle["instance_status"] == "absent"
        assert wait_until(lambda: len(children(proxy.process.pid)) == 2, 30,
                          what="gunicorn to replace the worker")
        assert requests.get(proxy.url + "/status", timeout=5).status_code == 200


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs filled up: a real ENOSPC for whoever writes there (root only)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory) -> None:
    # Unbuffered: a buffered file keeps what the last write could not place, and its close
    # then raised ENOSPC again (a CI failure) when the disk filled in the middle of a block.
    with open(directory / "filler", "wb", buffering=0) as filler:
        try:
            while filler.write(b"\0" * 65536):
                pass
        except OSError:
            pass


def test_a_full_disk_in_the_state_dir_breaks_no_worker_and_starts_nothing_twice(
    tmp_path, full_disk
):
    env = upstream_env(tmp_path, PROXY_IDLE_TIMEOUT=600)
    with Proxy(full_disk, **env) as proxy:
        workers = proxy.workers()
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
        fill(full_disk)
        answers = [requests.post(proxy.url + "/api/show", json={"model": "llama3.2"},
                                 timeout=10) for _ in range(50)]
        answers += [requests.get(proxy.url + path, timeout=10)
                    for path in ("/status", "/metrics", "/api/tags") for _ in range(10)]
        assert {a.status_code for a in answers} == {200}
        # /status says why; sync rounds keep writing reports and metrics on the full disk.
        wait_until(lambda: "full" in (proxy.status()["store_error"] or ""), 10,
                   what="the store error in /status")
        time.sleep(3)
        assert children(proxy.process.pid) == workers  # no worker died (SIGBUS, a crash)
        assert requests.post(proxy.url + "/api/show", json={"model": "llama3.2"},
                             timeout=10).status_code == 200
        (full_disk / "filler").unlink()
        wait_until(lambda: proxy.status()["store_error"] is None, 10, what="the store back")
        assert starts(tmp_path) == 1


def test_provisioning_that_keeps_failing_backs_off_explains_and_makes_few_attempts(tmp_path):
    attempts = tmp_path / "attempts"
    command = f"sh -c 'echo try >> {attempts}; echo quota exceeded >&2; exit 3'"
    with Proxy(tmp_path, PROXY_LOCAL_COMMAND=command, PROXY_RETRY_BASE=1,
               PROXY_LOCAL_ADDR=f"127.0.0.1:{free_port()}") as proxy:
        answers = []
        deadline = time.monotonic() + 8
        with requests.Session() as session:
            while time.monotonic() < deadline:  # a client retrying as fast as it can
                answers.append(session.post(proxy.url + "/api/chat", json={}, timeout=5))
        status = proxy.status()
        tried = len(attempts.read_text().splitlines())
    assert {a.status_code for a in answers} == {503} and len(answers) > 100
    assert 2 <= tried <= 4  # 1 s, 2 s, 4 s between attempts: not one per request
    # Every attempt counted, but one that began as the status was read (its command has run,
    # its failure is a commit away).
    assert status["provisioning_status"] == "error" and status["failures"] in (tried - 1, tried)
    assert "exited with code 3" in status["last_error"] and status["retry_at"]
    failed = answers[-1].json()
    assert failed["provisioning"] is False and "quota exceeded" in failed["error"]


def test_a_locked_state_store_leaves_requests_answered_and_starts_nothing(tmp_path):
    import sqlite3

    with Proxy(tmp_path, **upstream_env(tmp_path, PROXY_IDLE_TIMEOUT=600)) as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready")
        blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another program holds the file: every write waits
        try:
            wait_until(lambda: "locked" in (proxy.status()["store_error"] or ""), 40,
                       interval=0.5, what="the store error in /status")
            answers = [requests.post(proxy.url + "/api/show", json={"model": "llama3.2"},
                                     timeout=5) for _ in range(20)]
            assert {a.status_code for a in answers} == {200}  # from what the workers know
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        wait_until(lambda: proxy.status()["store_error"] is None, 40, interval=0.5,
                   what="the store back")
        assert proxy.status()["provisioning_status"] == "ready"
        assert starts(tmp_path) == 1


LABEL_SETS = """
import os, sys
from types import SimpleNamespace
import proxy.gunicorn_conf as conf  # PROXY_STATE_DIR: the small disk
conf.on_starting(None)
if sys.argv[1] == "allocated":
    conf.post_fork(SimpleNamespace(log=None), SimpleNamespace(pid=os.getpid()))
from tests.integration.test_faults import fill
from pathlib import Path
fill(Path(os.environ["PROXY_STATE_DIR"]))
from proxy.http.metrics import KNOWN_ROUTES, REQUESTS
for route in sorted(KNOWN_ROUTES):
    for outcome in ("forwarded", "unavailable", "local"):
        REQUESTS.labels(route, outcome).inc()
"""


def test_a_worker_counts_new_label_sets_on_a_full_disk_without_dying(full_disk):
    """prometheus-client maps its value files sparse: a new label set written into a hole once
    the disk is full is a SIGBUS. post_fork allocates a worker's files before it counts."""
    env = {**os.environ, "PROXY_STATE_DIR": str(full_disk), "PYTHONPATH": os.getcwd()}
    sparse = subprocess.run([sys.executable, "-c", LABEL_SETS, "sparse"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert sparse.returncode == -signal.SIGBUS, sparse.stderr  # the hazard is real here
    for leftover in full_disk.iterdir():
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    allocated = subprocess.run([sys.executable, "-c", LABEL_SETS, "allocated"], env=env,
                               capture_output=True, text=True, timeout=60)
    assert allocated.returncode == 0, allocated.stderr


SHARED_TABLE = """
import os
from pathlib import Path
from proxy.http.lockout import SLOTS, _SLOT
from proxy.util.shared_file import SharedFile
from tests.integration.test_faults import fill
disk = Path(os.environ["PROXY_STATE_DIR"])
table = SharedFile(disk / "wrong-keys", SLOTS * _SLOT.size)  # sized before the disk fills
fill(disk)
with table.locked():
    for offset in range(0, SLOTS * _SLOT.size, 4096):  # a wrong key on every page
        table.map[offset] = 1
"""


def test_the_shared_maps_take_writes_on_every_page_once_the_disk_is_full(full_disk):
    """The wrong-key table (and the change counter) map a file made before the disk filled:
    a wrong key from a new address lands on a page never written before."""
    env = {**os.environ, "PROXY_STATE_DIR": str(full_disk), "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", SHARED_TABLE], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr)
