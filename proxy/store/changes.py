"""A counter shared by every worker of one host, in a small file mapped into each of them.

A worker bumps it before it shows a ready snapshot (proxy/lifecycle/demand.py), and notes its
value just before each read of the store. A worker about to refuse a request can then tell,
from memory alone, whether another worker may know more than it does: while the counter has
not moved since its last read, every ready snapshot any worker shows came from a read older
than its own, and its own answer stands. Only the SQLite store has one (`change_counter()`,
next to its file): every worker sharing that file shares it; the workers of other hosts (the
S3 store) cannot move it, so that store has none.

Bumps take a lock the kernel frees when a worker dies (flock), so no increment is lost (a
lost one could move the counter back to a value a worker has already noted); reads take no
lock: one aligned 8-byte word.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
from pathlib import Path

SIZE = 8


class ChangeCounter:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != SIZE:
                fcntl.flock(fd, fcntl.LOCK_EX)  # one worker sizes it; the others wait
                if os.fstat(fd).st_size != SIZE:
                    os.ftruncate(fd, SIZE)  # zero
                fcntl.flock(fd, fcntl.LOCK_UN)
            self._word = mmap.mmap(fd, SIZE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._threads = threading.Lock()  # flock does not keep apart one process's threads

    def read(self) -> int:
        return int.from_bytes(self._word[:SIZE], "little")

    def bump(self) -> None:
        with self._threads:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._word[:SIZE] = (self.read() + 1).to_bytes(SIZE, "little")
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._word.close()
        os.close(self._fd)
