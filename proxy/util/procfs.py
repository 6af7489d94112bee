"""A process's liveness and identity from /proc: the one check behind the local provisioner's
pid file and a Pulumi stack lock's staleness (Linux; without /proc a live pid counts as alive).
"""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether `pid` runs: it exists and is not a zombie (finished, merely not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return _state(pid) not in ("Z", "X")


def start_time(pid: int) -> str:
    """When `pid` started (clock ticks since boot, field 22 of /proc/pid/stat); "" if unknown.
    With the pid it names one process: a pid reused later has another start time."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _state(pid: int) -> str:
    fields = _stat(pid)
    return fields[0] if fields else ""


def _stat(pid: int) -> list[str]:
    """The fields of /proc/pid/stat after the command name (which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text[text.rindex(")") + 2:].split()
