"""The processes a bench run starts, and what can be read about them from /proc.

Every process is started in its own session so that stopping it stops its children too; the
local upstream (started by the proxy itself, in a session of its own) is found by its pid file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
OWN_SETTINGS = ("PROXY_", "OLLAMA_", "EXOSCALE_", "PROMETHEUS_", "BENCH_")


class StartError(RuntimeError):
    """A process did not come up; the message carries the tail of its log."""


class Processes:
    """Starts processes and stops every one of them on stop_all(), on error or Ctrl-C too."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._started: dict[str, subprocess.Popen] = {}
        self._pid_files: list[Path] = []

    def start(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
    ) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        try:
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                env={**_inherited_env(), "PYTHONPATH": str(REPO), **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopping it stops its children
            )
        finally:
            log.close()
        self._started[name] = process
        return process

    def adopt_pid_file(self, path: Path) -> None:
        """A process someone else started (the proxy's local upstream), stopped at the end."""
        self._pid_files.append(Path(path))

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def sessions(self) -> set[int]:
        """Session ids of everything started (each leader's pid is its session id)."""
        sids = {p.pid for p in self._started.values() if p.poll() is None}
        return sids | {pid for pid in map(_pid_from_file, self._pid_files) if pid}

    def stop(self, name: str) -> None:
        process = self._started.pop(name, None)
        if process is not None:
            _stop_group(process.pid, lambda: process.poll() is not None)

    def stop_adopted(self, path: Path) -> None:
        """Stop the process a pid file names now (one adopted, or left by a proxy)."""
        pid = _pid_from_file(Path(path))
        if pid:
            _stop_group(pid, lambda: not _alive(pid))

    def stop_all(self) -> None:
        """Stop in reverse order of start, then the adopted ones; Ctrl-C cannot cut this short."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for name in reversed(list(self._started)):
                self.stop(name)
            for path in self._pid_files:
                pid = _pid_from_file(path)
                if pid:
                    _stop_group(pid, lambda pid=pid: not _alive(pid))
        finally:
            signal.signal(signal.SIGINT, previous)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _inherited_env() -> dict[str, str]:
    """The caller's environment without settings that would change what is measured."""
    return {k: v for k, v in os.environ.items() if not k.startswith(OWN_SETTINGS)}


def _stop_group(pid: int, gone: Callable[[], bool], grace: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not gone():
            time.sleep(0.05)
        if gone():
            try:
                os.killpg(pid, signal.SIGKILL)  # children that outlived their leader
            except ProcessLookupError:
                pass
            return


def _pid_from_file(path: Path) -> int | None:
    try:
        pid = json.loads(path.read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if isinstance(pid, int) and _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        state = _stat_fields(pid)[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise StartError(f"timed out after {timeout:g} s waiting for {what}")


def answers(url: str) -> bool:
    """The server answers HTTP at `url`, whatever the status."""
    try:
        requests.get(url, timeout=1)
    except requests.RequestException:
        return False
    return True


# -- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on; the command name may hold spaces."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def all_pids() -> Iterable[int]:
    return (int(name) for name in os.listdir("/proc") if name.isdigit())


def children(pid: int) -> list[int]:
    found = []
    for child in all_pids():
        try:
            if int(_stat_fields(child)[1]) == pid:
                found.append(child)
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


def rss_kib(pid: int) -> int | None:
    """VmRSS of a live process in KiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_ticks_of_sessions(sids: set[int]) -> int:
    """utime+stime (clock ticks) of every live process in these sessions."""
    total = 0
    for pid in all_pids():
        try:
            fields = _stat_fields(pid)
            if int(fields[3]) in sids:
                total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime+stime (seconds) these processes have used so far; 0 for one that is gone."""
    total = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def established_by_worker(workers: list[int], port: int) -> list[int]:
    """Client connections to `port` each worker holds open now (from /proc/net/tcp*)."""
    inodes = _established_inodes(port)
    counts = []
    for pid in workers:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            links = []
        counts.append(sum(1 for link in links if link[8:-1] in inodes))  # "socket:[INODE]"
    return counts


def _established_inodes(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address is HEXIP:HEXPORT; state 01 is ESTABLISHED
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                found.add(fields[9])
    return found
