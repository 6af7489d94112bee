"""Helpers for tests that drive the real `pulumi.automation` against the stand-in CLI.

`standin_world(tmp_path)` gives a state dir, an environment for the runner (plugins installed in
a private PULUMI_HOME, fake Exoscale credentials) and a free port for the simulated instance,
and stops every simulated instance at the end. A simulated instance's front is the real nginx
with the rendered site (tests/doubles/standin_pulumi/server.py): `get_tags` talks to it as the proxy
does (TLS pinned to the stack's certificate, the stack's token).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.settings import Settings
from infra.workspace import required_plugins

ROOT = Path(__file__).resolve().parent  # PulumiCommand(root=ROOT) runs ROOT/bin/pulumi
API_KEY = "EXOstandinkey0123456789"
API_SECRET = "standin-secret-abcdefghijklmnop"


@dataclass
class Standin:
    state_dir: Path
    env: dict[str, str]
    port: int

    @property
    def backend(self) -> Path:
        return self.state_dir / "pulumi-backend"

    def cloud(self) -> dict:
        path = self.backend / "standin-cloud.json"
        return json.loads(path.read_text()) if path.exists() else {"instances": {}}

    def instances(self) -> dict[str, dict]:
        return self.cloud().get("instances", {})

    def locks(self) -> list[Path]:
        return sorted((self.backend / ".pulumi" / "locks").rglob("*.json"))

    def checkpoint(self, stack: str = "ollama-exoscale") -> dict:
        path = self.backend / ".pulumi" / "stacks" / "ollama-exoscale" / f"{stack}.json"
        return json.loads(path.read_text())["checkpoint"]["latest"]

    def stop_instances(self) -> None:
        for record in self.instances().values():
            stop_instance(record)


def install_plugins(pulumi_home: Path, skip: tuple[str, ...] = ()) -> None:
    """What `pulumi plugin install resource NAME VERSION` leaves in PULUMI_HOME."""
    for name, version in required_plugins().items():
        if name not in skip:
            folder = pulumi_home / "plugins" / f"resource-{name}-v{version}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"pulumi-resource-{name}").write_text("#!/bin/sh\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "pulumi-home"
    install_plugins(home)
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(tmp_path),
        "PULUMI_HOME": str(home),
        "STANDIN_PYTHON": sys.executable,
        "EXOSCALE_API_KEY": API_KEY,
        "EXOSCALE_API_SECRET": API_SECRET,
    }


@contextlib.contextmanager
def standin_world(tmp_path: Path) -> Iterator[Standin]:
    """A state dir, the runner's environment and a port; every simulated instance stopped after."""
    world = Standin(state_dir=tmp_path / "state", env=base_env(tmp_path), port=free_port())
    try:
        yield world
    finally:
        world.stop_instances()


def stop_instance(record: dict) -> None:
    """A simulated instance killed (its server's process group, nginx included), its disk gone."""
    stop_process_group(record.get("pid"))
    if record.get("disk"):
        shutil.rmtree(record["disk"], ignore_errors=True)


def stop_process_group(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def get_tags(url: str, token: str, ca_cert: str, server_name: str, timeout: float = 15.0) -> dict:
    """GET {url}/api/tags over TLS, trusting only `ca_cert` for `server_name`, with the token;
    waited for while nothing listens yet or the front answers 503 (the bring-up is not done).

    A reset counts as not listening yet: the bring-up's `nginx -t` binds and listens on the
    front's address for a moment (nginx's src/core/ngx_connection.c,
    ngx_open_listening_sockets, in test mode too), so a connection made then is reset when
    the test ends."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, head, body = _get_tags(url, token, ca_cert, server_name)
        except (ConnectionRefusedError, ConnectionResetError) as exc:
            status, head, body = 0, type(exc).__name__.encode(), b""
        if status == 200:
            return json.loads(body)
        if status not in (0, 503) or time.monotonic() > deadline:
            raise AssertionError(head.decode(errors="replace"))
        time.sleep(0.1)


def _get_tags(url: str, token: str, ca_cert: str, server_name: str) -> tuple[int, bytes, bytes]:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cadata=ca_cert)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(
                f"GET /api/tags HTTP/1.1\r\nHost: {server_name}\r\n"
                f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode()
            )
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address, trusting only `ca_cert` for `server_name` (as the proxy does)."""

    def __init__(self, url: str, ca_cert: str, server_name: str, timeout: float):
        host, port = url.removeprefix("https://").rsplit(":", 1)
        super().__init__(host, int(port), timeout=timeout,
                         context=ssl.create_default_context(cadata=ca_cert))
        self.server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.server_name)


def stream_generate(url: str, token: str, ca_cert: str, server_name: str, *, chunks: int,
                    interval: float, started: threading.Event | None = None) -> list[dict]:
    """POST {url}/api/generate, streamed: `chunks` tokens, one every `interval` seconds (the
    test Ollama's X-Fake-Interval); returns every NDJSON line, `started` set at the first."""
    connection = _PinnedHTTPS(url, ca_cert, server_name, timeout=30)
    body = json.dumps({"model": "llama3.2", "prompt": "hi", "stream": True,
                       "options": {"num_predict": chunks}})
    try:
        connection.request("POST", "/api/generate", body=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json",
            "X-Fake-Interval": str(interval)})
        answer = connection.getresponse()
        if answer.status != 200:
            raise AssertionError(f"{answer.status} {answer.read()[:200]!r}")
        lines = []
        while line := answer.readline():
            lines.append(json.loads(line))
            if started is not None:
                started.set()
        return lines
    finally:
        connection.close()


def settings_for(port: int, **overrides) -> Settings:
    """Settings for a test: the instance serves on `port`, reachable from this host only."""
    return Settings(allowed_cidrs=("127.0.0.1/32",), port=port, **overrides)


def crash_mid_up(world: Standin, timeout: float = 60.0, servers: dict | None = None) -> None:
    """Run an `up` in another process and kill it (SIGKILL, CLI included) mid-create: of the
    one server, or of the first server of `servers` the stack does not hold yet."""
    env = {**world.env, "STANDIN_UP_HANG": "1", "PYTHONPATH": str(ROOT.parents[2])}
    before = len(world.instances())
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.doubles.standin_pulumi.crash", str(world.state_dir),
         str(world.port), *([json.dumps(servers)] if servers is not None else [])],
        env=env, cwd=ROOT.parents[2], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while not (len(world.instances()) > before and _pending(world)):
            assert process.poll() is None, "the crashing up ended early"
            assert time.monotonic() < deadline, "the stand-in did not reach the hang point"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the proxy host "crashes": runner and CLI
        process.wait()


def _pending(world: Standin) -> bool:
    try:
        return bool(world.checkpoint()["pending_operations"])
    except (OSError, ValueError, KeyError):
        return False
