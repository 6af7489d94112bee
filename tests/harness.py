"""Running the real proxy for tests: gunicorn in a subprocess on a free port, logs captured."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.procfs import children

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports free to listen on, for a fleet (server i on port
    + i). Chosen below the kernel's ephemeral range: a port inside it may be taken meanwhile by
    any outgoing connection, and Linux gives connect() the even ports there while bind(0) gets
    the odd ones, so free_port() + 1 often is (a CI run's "Address already in use")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        base = random.randrange(10000, low - count)
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports below {low}")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def fake_ollama_command(*flags: str) -> str:
    """PROXY_LOCAL_COMMAND that runs the test upstream with this interpreter."""
    return " ".join([sys.executable, "-m", "tests.doubles.fake_ollama", *flags])


def upstream_env(tmp_path, *flags: str, **env) -> dict:
    """The environment of a proxy whose `local` provisioner starts the fake Ollama on demand;
    each start is appended to tmp_path/starts (see `starts`)."""
    return {
        "PROXY_LOCAL_COMMAND": fake_ollama_command(
            "--models", "llama3.2", "--starts-file", str(tmp_path / "starts"), *flags
        ),
        "PROXY_LOCAL_ADDR": f"127.0.0.1:{free_port()}",
        **env,
    }


def starts(tmp_path) -> int:
    """How many times the fake upstream of `upstream_env` was started."""
    path = tmp_path / "starts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def read_message(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes, bytes] | None:
    """One HTTP message from `sock`, after the bytes `buf` already read from it: (head, body
    by its Content-Length, what follows); None when the peer closed before a whole head. A
    body cut short by a close comes as far as it came."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(buf) < length:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
    return head, buf[:length], buf[length:]


def chunked_length(sock: socket.socket, buf: bytes = b"") -> tuple[int, bool]:
    """Read a chunked body from `sock` (after the bytes `buf`, which begin at its first chunk
    line) without keeping it: (the data bytes it carried, whether its last chunk came)."""
    total = 0
    while True:
        while b"\r\n" not in buf:
            data = sock.recv(1 << 20)
            if not data:
                return total, False
            buf += data
        line, _, buf = buf.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return total, True
        while len(buf) < size + 2:  # the data and its CRLF
            data = sock.recv(1 << 20)
            if not data:
                return total + min(len(buf), size), False
            buf += data
        assert buf[size:size + 2] == b"\r\n", "a chunk's data is not followed by CRLF"
        total += size
        buf = buf[size + 2:]


def wait_until(check, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Proxy:
    """`ollama-exoscale serve` with the `local` provisioner, as a user would start it."""

    def __init__(self, state_dir: Path, **env: str | int | float):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.state_dir / f"proxy-{self.port}.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PROXY_BIND": f"127.0.0.1:{self.port}",
            "PROXY_STATE_DIR": str(self.state_dir),
            "PROXY_PROVISIONER": "local",
            "PROXY_WORKERS": "2",
            "PROXY_MAX_CONNECTIONS": "1000",
            **{key: str(value) for key, value in env.items()},
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> Proxy:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve"],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so kill() takes every worker
        )
        wait_until(self._answers, 20, what=f"the proxy on {self.url}\n{self.logs()}")
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the proxy exited with {self.process.returncode}:\n{self.logs()}")
        try:
            return requests.get(self.url + "/", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def status(self, headers: dict | None = None) -> dict:
        return requests.get(self.url + "/status", headers=headers, timeout=5).json()

    def workers(self, timeout: float = 20) -> list[int]:
        """The worker pids, once gunicorn has forked all PROXY_WORKERS of them (the proxy
        answers as soon as the first one is up)."""
        wanted = int(self.env["PROXY_WORKERS"])

        def forked() -> list[int] | None:
            pids = children(self.process.pid)
            return pids if len(pids) == wanted else None

        return wait_until(forked, timeout, what=f"{wanted} workers")

    def wait_phase(self, phase: str, timeout: float = 20, headers: dict | None = None) -> dict:
        """Wait until /status shows `phase`, then until every worker has seen it too."""
        status = wait_until(
            lambda: (s := self.status(headers))["provisioning_status"] == phase and s,
            timeout,
            interval=0.1,
            what=f"phase {phase} (logs:\n{self.logs()})",
        )
        time.sleep(3 * float(self.env.get("PROXY_TICK", 0.25)))  # workers sync once a tick
        return status

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode if self.process else None

    def kill(self) -> None:
        """SIGKILL the master and every worker at once, as when the host dies."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def owns(self, pid: int) -> bool:
        """Whether `pid` is this proxy's master or one of its workers."""
        try:
            return self.process is not None and os.getpgid(pid) == self.process.pid
        except ProcessLookupError:
            return False

    def kill_upstream(self) -> None:
        """Stop the local upstreams the proxy left running (they outlive the proxy on purpose):
        the primary's and each fleet server's."""
        for record in sorted(self.state_dir.glob("local-upstream*.json")):
            try:
                os.killpg(json.loads(record.read_text())["pid"], signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.kill_upstream()


class MotoS3:
    """moto's S3 server (tests/doubles/moto_s3.py) on a free port, with a fresh bucket per call."""

    CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.doubles.moto_s3", str(self.port)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, 30, interval=0.1, what="moto's S3 server")
        self._buckets = 0

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"moto's server exited with {self.process.returncode}")
        try:
            return requests.get(self.endpoint + "/moto-api/", timeout=1).status_code < 500
        except requests.RequestException:
            return False

    def bucket(self) -> str:
        """A new empty bucket's name."""
        self._buckets += 1
        name = f"state-{self._buckets}-{os.getpid()}"
        answer = requests.put(f"{self.endpoint}/{name}", timeout=5)
        assert answer.status_code == 200, answer.text
        return name

    def url(self, bucket: str, prefix: str = "proxy") -> str:
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}"

    def env(self, bucket: str) -> dict[str, str]:
        """What a proxy needs to use a bucket as its store."""
        return {"PROXY_STATE_URL": self.url(bucket), **self.CREDENTIALS}

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()
