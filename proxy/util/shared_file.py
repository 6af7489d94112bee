"""A small file every worker of a host maps: zero-filled to its size on first use, with a lock
that keeps apart the processes (flock: the kernel frees it when a worker dies) and one
process's threads (which flock does not). The wrong-key table and the change counter use it.

Its blocks are allocated when it is sized (posix_fallocate), not left as holes: a write
through a map into a hole of a file whose disk is full is a SIGBUS, which kills the worker
mid-request (tests/integration/test_faults.py). `allocate` does the same for files another
library maps (prometheus-client's, proxy/gunicorn_conf.py).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SharedFile:
    def __init__(self, path: Path, size: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                fcntl.flock(fd, fcntl.LOCK_EX)  # one worker sizes it; the others wait
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, min(size, os.fstat(fd).st_size))
                    os.posix_fallocate(fd, 0, size)  # zeros, on blocks of their own
                fcntl.flock(fd, fcntl.LOCK_UN)
            self.map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._threads = threading.Lock()

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._threads:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.map.close()
        os.close(self._fd)


def allocate(path: Path, size: int) -> None:
    """Create `path` (or grow it) to at least `size` zero bytes on blocks allocated now, so
    that whoever maps it later never writes into a hole (OSError if the disk is full now)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
