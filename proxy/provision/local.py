"""The provisioners the config can name, and the `local` one: a command started on demand.

`local` runs PROXY_LOCAL_COMMAND (e.g. `ollama serve` on a workstation) with OLLAMA_HOST set,
and stops it when idle so the GPU's memory and power are freed. The process runs in its own
session and is recorded in a pid file, so any worker (or a restarted proxy) can find it, adopt
it and stop it. A fleet's server number i listens on PROXY_LOCAL_ADDR's port + i, with a pid
file and a log of its own.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from proxy.config import Config, ConfigError, split_host_port
from proxy.provision.base import (
    PRIMARY,
    Endpoint,
    Progress,
    Provisioner,
    ProvisionError,
    server_index,
)
from proxy.util import procfs

log = logging.getLogger("ollama_exoscale.local")

_children: dict[int, subprocess.Popen] = {}  # started by this process: polled so none is a zombie


class LocalProvisioner:
    name = "local"
    can_bake = False
    typical_cold_start = 5.0

    def __init__(
        self,
        command: str,
        addr: str,
        state_dir: Path,
        env: Mapping[str, str],
        *,
        start_wait: float = 60.0,
        stop_grace: float = 10.0,
        server: str = PRIMARY,
    ):
        self.command = command
        self.argv = shlex.split(command)
        if not self.argv:
            raise ConfigError("PROXY_LOCAL_COMMAND is empty; use e.g. 'ollama serve'")
        # What progress, errors and logs name: the program, never its arguments (a token?).
        self.program = os.path.basename(self.argv[0])
        self.host, self.port = split_host_port(addr, "PROXY_LOCAL_ADDR")
        self.addr = addr
        self.url = f"http://{self.host}:{self.port}"
        self.state_dir = Path(state_dir)
        self.env = dict(env)
        self.start_wait = start_wait
        self.stop_grace = stop_grace
        self.server = server
        suffix = "" if server == PRIMARY else f"-{server}"  # the primary's: as before fleets
        self.pid_file = self.state_dir / f"local-upstream{suffix}.json"
        self.log_file = self.state_dir / f"local-upstream{suffix}.log"

    def _server(self, server: str) -> LocalProvisioner:
        """The provisioner of the fleet's server `server`: port + its index, its pid file and
        log (ValueError for a name that is not a server's)."""
        index = server_index(server)
        if index == 0:
            return self
        port = self.port + index
        if port > 65535:
            raise ProvisionError(f"GPU server {server} would listen on port {port}: choose a "
                                 "lower PROXY_LOCAL_ADDR port or fewer PROXY_MAX_SERVERS")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return LocalProvisioner(self.command, f"{host}:{port}", self.state_dir, self.env,
                                start_wait=self.start_wait, stop_grace=self.stop_grace,
                                server=server)

    def cold_start_mode(self, stopped: bool) -> str:
        return "local"  # a process on this host: its models are on disk already

    def observe(self) -> Endpoint | None:
        pid = self._running_pid()
        return Endpoint(self.url) if pid else None

    def observe_fleet(self) -> dict[str, Endpoint]:
        found = {}
        for path in [self.pid_file, *sorted(self.state_dir.glob("local-upstream-gpu-*.json"))]:
            name = PRIMARY if path == self.pid_file else path.stem.removeprefix("local-upstream-")
            try:
                endpoint = self._server(name).observe()
            except (ValueError, ProvisionError):
                continue  # a file that is not one of ours
            if endpoint is not None:
                found[name] = endpoint
        return found

    def bring_up(self, progress: Progress, server: str = PRIMARY) -> Endpoint:
        if server != PRIMARY:
            return self._server(server).bring_up(progress)
        if self._running_pid():
            return Endpoint(self.url)
        if accepts(self.host, self.port):
            raise ProvisionError(
                f"PROXY_LOCAL_ADDR {self.addr} is already in use by another program; stop it or "
                "choose another address"
            )
        progress(f"starting `{self.program}` on {self.addr}")
        process = self._spawn()
        deadline = time.monotonic() + self.start_wait
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                self.pid_file.unlink(missing_ok=True)
                raise ProvisionError(
                    f"`{self.program}` exited with code {code} before listening on "
                    f"{self.addr}: {self._log_tail()}"
                )
            if accepts(self.host, self.port):
                return Endpoint(self.url)
            time.sleep(0.1)
        self._stop(process.pid)
        raise ProvisionError(
            f"`{self.program}` did not listen on {self.addr} within {self.start_wait:g} s"
        )

    def tear_down(self, progress: Progress, server: str = PRIMARY) -> None:
        if server != PRIMARY:
            return self._server(server).tear_down(progress)
        pid = self._running_pid()
        if pid:
            progress(f"stopping `{self.program}` (pid {pid})")
            self._stop(pid)
        self.pid_file.unlink(missing_ok=True)

    def stop(self, progress: Progress, server: str = PRIMARY) -> None:
        """A local process keeps nothing a restart would lose (its models are on disk): end it."""
        self.tear_down(progress, server)

    def _spawn(self) -> subprocess.Popen:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "OLLAMA_HOST": self.addr}
        try:
            with open(self.log_file, "ab") as log_out:
                process = subprocess.Popen(
                    self.argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives this worker; stopped as a group
                )
        except OSError as exc:
            raise ProvisionError(
                f"cannot start `{self.program}`: {exc.strerror}; check "
                "PROXY_LOCAL_COMMAND"
            ) from None
        _children[process.pid] = process
        record = {"pid": process.pid, "started": procfs.start_time(process.pid), "addr": self.addr}
        self.pid_file.write_text(json.dumps(record))
        log.info("started local upstream pid %d on %s", process.pid, self.addr)
        return process

    def _running_pid(self) -> int | None:
        try:
            record = json.loads(self.pid_file.read_text())
        except (OSError, ValueError):
            return None
        pid = record.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return None
        if record.get("started") != procfs.start_time(pid):
            return None  # the pid was reused by another process
        return pid

    def _stop(self, pid: int) -> None:
        """SIGTERM the process group, SIGKILL after the grace period."""
        for sig, wait in ((signal.SIGTERM, self.stop_grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                return
            except PermissionError:
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not _alive(pid):
                    log.info("local upstream pid %d stopped", pid)
                    return
                time.sleep(0.05)
        log.error("local upstream pid %d did not stop", pid)

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no output)"
        return " / ".join(lines[-3:])[-400:] or "(no output)"


def accepts(host: str, port: int) -> bool:
    """Whether something answers a TCP connection on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None and child.poll() is not None:  # our own child: reap it
        _children.pop(pid, None)
        return False
    return procfs.alive(pid)


def make_provisioner(config: Config) -> Provisioner:
    """The provisioner PROXY_PROVISIONER names."""
    if config.provisioner == "local":
        return LocalProvisioner(
            config.local_command, config.local_addr, config.state_dir, config.env
        )
    try:
        from proxy.provision.exoscale import ExoscaleProvisioner
    except ImportError as exc:
        raise ConfigError(
            f"PROXY_PROVISIONER=exoscale is not available in this build ({exc}); "
            "use PROXY_PROVISIONER=local"
        ) from None
    return ExoscaleProvisioner.from_config(config)
