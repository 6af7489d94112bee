"""The servers a bench run measures, each started the way a user would start it.

- ours: `python -m proxy.cli serve` with the `local` provisioner, whose command is the fake
  upstream; warmed up to `ready` before any figure is taken.
- direct: that very upstream process, at PROXY_LOCAL_ADDR.
- nginx: Debian's nginx in front of the same upstream (config from bench/nginx.py).
- ours-503: a second proxy whose upstream never listens, so it answers 503 while provisioning.
- previous, previous-503: the same two for the proxy before issue 14 (its own checkout and
  venv, bench/previous.py), with an upstream of its own (the same program).
- bare-falcon, naive: the reference apps in bench/, under the proxy's gunicorn settings.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.harness import free_port, free_ports  # the tests' own: one way to pick ports

from . import nginx
from .procs import (
    PYTHON,
    REPO,
    Processes,
    StartError,
    answers,
    children,
    wait_until,
)

MODELS = "llama3.2,nomic-embed-text"
CHUNK_INTERVAL = 0.02  # seconds between the upstream's stream chunks
GUNICORN_CONF = "proxy/gunicorn_conf.py"
FAKE_OLLAMA = REPO / "tests" / "doubles" / "fake_ollama.py"
TICK = 0.25  # the proxy's default PROXY_TICK: how often a worker syncs its state


@dataclass(frozen=True)
class Build:
    """Which proxy code a target runs: a python and the checkout it runs from."""

    python: str = PYTHON
    cwd: Path | None = None  # None: this checkout

    def serve(self) -> list[str]:
        return [self.python, "-m", "proxy.cli", "serve"]

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.cwd)} if self.cwd else {}


THIS = Build()


@dataclass(frozen=True)
class Target:
    """A server under test: where it listens, and the process whose children are its workers."""

    name: str
    url: str
    master: int | None = None

    def workers(self) -> list[int]:
        return children(self.master) if self.master else []

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.url.removeprefix("http://").partition(":")
        return host, int(port)


def upstream_command(*flags: str) -> str:
    """The fake Ollama as a PROXY_LOCAL_COMMAND; it listens on OLLAMA_HOST. Run by its path
    (it imports nothing of the project): the previous proxy's checkout has the tests' old
    layout on its PYTHONPATH."""
    argv = [PYTHON, str(FAKE_OLLAMA), "--models", MODELS,
            "--chunk-interval", str(CHUNK_INTERVAL), *flags]
    return shlex.join(argv)


def _proxy_env(port: int, state_dir: Path, command: str, local_port: int) -> dict[str, str]:
    return {
        "PROXY_BIND": f"127.0.0.1:{port}",
        "PROXY_STATE_DIR": str(state_dir),
        "PROXY_PROVISIONER": "local",
        "PROXY_LOCAL_COMMAND": command,
        "PROXY_LOCAL_ADDR": f"127.0.0.1:{local_port}",
        "OLLAMA_MODEL": MODELS,
        "PROXY_IDLE_TIMEOUT": "3600",  # no idle stop in the middle of a run
    }


def _start_server(
    procs: Processes, name: str, port: int, argv: list[str], env: dict[str, str],
    build: Build = THIS,
) -> Target:
    url = f"http://127.0.0.1:{port}"
    process = procs.start(name, argv, {**env, **build.env()},
                          **({"cwd": build.cwd} if build.cwd else {}))

    def up() -> bool:
        if process.poll() is not None:
            raise StartError(f"{name} exited with {process.returncode}:\n{procs.log_tail(name)}")
        return answers(url + "/")

    wait_until(up, 30, f"{name} on {url}")
    return Target(name, url, process.pid)


def start_ours(procs: Processes, workdir: Path, name: str = "ours",
               settings: dict[str, str] | None = None, build: Build = THIS,
               upstream_flags: tuple[str, ...] = ()) -> tuple[Target, Target]:
    """The proxy, warmed up to ready, and its upstream (the `direct` target).

    `settings`: PROXY_* variables over the shipped defaults; `build`: another checkout's proxy;
    `upstream_flags`: the fake upstream's own flags.
    """
    # A fleet's server i listens on the upstream's port + i: consecutive ports, all free.
    servers = int((settings or {}).get("PROXY_MAX_SERVERS", "1"))
    port, upstream_port = free_port(), free_ports(servers)
    state = workdir / name
    command = upstream_command(*upstream_flags)
    env = {**_proxy_env(port, state, command, upstream_port), **(settings or {})}
    procs.adopt_pid_file(state / "local-upstream.json")
    ours = _start_server(procs, name, port, build.serve(), env, build)
    requests.post(ours.url + "/admin/up", timeout=10).raise_for_status()
    wait_until(lambda: phase(ours) == "ready", 60, "the proxy to be ready")
    time.sleep(4 * TICK)  # every worker syncs once a tick: let both see `ready`
    direct = Target("direct", f"http://127.0.0.1:{upstream_port}", _upstream_pid(state))
    return ours, direct


def start_ours_503(procs: Processes, workdir: Path, label: str = "", name: str = "ours",
                   build: Build = THIS) -> Target:
    """A proxy in `provisioning`: its upstream sleeps before it listens, so every demand is 503.

    The local provisioner gives up after 60 s (then `error`): start one per measurement.
    """
    port, never_port = free_port(), free_port()
    state = workdir / f"{name}-503{label}"  # a state of its own: no earlier sleeper is adopted
    command = upstream_command("--startup-delay", "100000")
    procs.adopt_pid_file(state / "local-upstream.json")
    target = _start_server(
        procs, f"{name}-503", port, build.serve(),
        _proxy_env(port, state, command, never_port), build,
    )
    requests.post(target.url + "/admin/up", timeout=10).raise_for_status()
    wait_until(lambda: phase(target) == "provisioning", 30, f"{name}-503 to be provisioning")
    time.sleep(4 * TICK)
    return Target(name, target.url, target.master)


def start_app(procs: Processes, workdir: Path, name: str, factory: str,
              env: dict[str, str] | None = None, wsgi: bool = False) -> Target:
    """A reference app from bench/ under the proxy's own gunicorn settings (a WSGI one under
    gthread's worker, 32 threads)."""
    port = free_port()
    env = {"PROXY_BIND": f"127.0.0.1:{port}", "PROXY_STATE_DIR": str(workdir / name),
           **(env or {})}
    worker = ["-k", "gthread", "--threads", "32"] if wsgi else []
    argv = [PYTHON, "-m", "gunicorn", "-c", GUNICORN_CONF, *worker, factory]
    return _start_server(procs, name, port, argv, env)


def start_nginx(procs: Processes, workdir: Path, upstream: Target) -> Target:
    port = free_port()
    prefix = workdir / "nginx"
    conf = nginx.write_config(prefix, port, upstream.host_port)
    argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    process = procs.start("nginx", argv)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise StartError(f"nginx exited:\n{(prefix / 'error.log').read_text()}")
        return answers(url + "/")

    wait_until(up, 15, f"nginx on {url}")
    return Target("nginx", url, process.pid)


def phase(target: Target) -> str:
    """A proxy's provisioning_status; empty if it does not answer."""
    try:
        return requests.get(target.url + "/status", timeout=5).json()["provisioning_status"]
    except (requests.RequestException, ValueError, KeyError):
        return ""


def _upstream_pid(state: Path) -> int | None:
    try:
        return json.loads((state / "local-upstream.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
