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

from pathlib import Path

from proxy.util.shared_file import SharedFile

SIZE = 8


class ChangeCounter:
    def __init__(self, path: Path):
        self._file = SharedFile(path, SIZE)

    def read(self) -> int:
        return int.from_bytes(self._file.map[:SIZE], "little")

    def bump(self) -> None:
        with self._file.locked():
            self._file.map[:SIZE] = (self.read() + 1).to_bytes(SIZE, "little")

    def close(self) -> None:
        self._file.close()
