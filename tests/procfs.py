"""What /proc says about a process: its children, threads, open file descriptors, memory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Figures:
    threads: int
    fds: int
    rss_kib: int


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (a gunicorn master's workers)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(name))
    return sorted(found)


def figures(pid: int) -> Figures:
    """Threads, file descriptors and resident memory of `pid` now (OSError once it is gone)."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return Figures(
        threads=len(os.listdir(f"/proc/{pid}/task")),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        rss_kib=rss,
    )
