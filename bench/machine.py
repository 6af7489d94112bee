"""What the figures were measured on, and how busy the shared machine was during each run."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .procs import cpu_ticks_of_sessions

PACKAGES = ("falcon", "gunicorn", "requests", "urllib3", "matplotlib")
TICKS = os.sysconf("SC_CLK_TCK")


def describe() -> dict[str, str]:
    """CPU, cores, memory, kernel, Python, package and tool versions, load at this moment."""
    info = {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{_mem_total_kib() / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        **{name: _version(name) for name in PACKAGES},
        "nginx": _tool_version(["nginx", "-v"]),
        "wrk": _tool_version(["wrk", "--version"]),
        "load average at start": load_text(),
    }
    return info


def load_text() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def _cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def _mem_total_kib() -> int:
    match = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


@dataclass(frozen=True)
class Busy:
    """One run's machine load: the 1-minute load average, and CPU used outside the bench."""

    load1: float
    others_cores: float  # cores busy with work that is not this bench's, averaged over the run

    def as_dict(self) -> dict[str, float]:
        return {"load1": round(self.load1, 2), "others": round(self.others_cores, 2)}


class CpuMeter:
    """Measures, over a run, CPU used by processes that are not this bench's.

    The load average counts the bench itself; busy CPU minus the bench's own processes tells
    what the other engineers' runs took from it.
    """

    def __init__(self, sessions):
        self._sessions = sessions  # callable → the bench's session ids now

    def start(self) -> tuple:
        return (_busy_ticks(), self._own_ticks(), os.times().elapsed, os.getloadavg()[0])

    def stop(self, started: tuple) -> Busy:
        busy0, own0, t0, load1 = started
        elapsed = max(1e-3, os.times().elapsed - t0)
        others = (_busy_ticks() - busy0) - (self._own_ticks() - own0)
        return Busy(load1, max(0.0, others / TICKS / elapsed))

    def _own_ticks(self) -> int:
        times = os.times()
        mine = times.user + times.system + times.children_user + times.children_system
        return cpu_ticks_of_sessions(self._sessions()) + round(mine * TICKS)


def _busy_ticks() -> int:
    """Ticks all CPUs spent not idle (idle and iowait excluded) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]
