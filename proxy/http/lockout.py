"""Wrong API keys counted per client address, shared by every worker of the proxy.

Each gunicorn worker is a process, and a client's connections land on any of them: a count
kept in each worker's memory let an address try PROXY_AUTH_FAILURES keys a minute per worker.
The counts live in a small file in the state dir, mapped into every worker (a fixed table of
slots, no growth whatever an attacker sends), and are changed under a lock the kernel frees
when a worker dies (flock: a SIGKILLed worker never leaves it held).

An address gets `limit` wrong keys in a window that starts with its first one, then 429 until
the window ends.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable
from pathlib import Path

from proxy.util.shared_file import SharedFile

SLOTS = 4096  # addresses tracked at once; past that, the oldest window in a probe is reused
PROBE = 8  # slots looked at for an address (its hash, then the next ones)
_SLOT = struct.Struct("<8sdI4x")  # address digest, window start (epoch s), wrong keys in it
_EMPTY = bytes(8)


class FailureLimit:
    """`record(address)` a wrong key; `blocked_for(address)` says how long it must wait."""

    def __init__(self, path: Path, limit: int, window: float = 60.0,
                 clock: Callable[[], float] = time.time):
        self.limit = limit
        self.window = window
        self.clock = clock  # wall-clock seconds: the file outlives reboots, monotonic does not
        self._file = SharedFile(path, SLOTS * _SLOT.size)  # zeros: every slot empty
        self._table = self._file.map

    def record(self, address: str) -> None:
        digest = _digest(address)
        with self._file.locked():
            now = self.clock()  # under the lock: a window another worker began is never "later"
            offset, stored, start, count = self._find(digest, now)
            if stored != digest or not self._current(stored, start, now):
                start, count = now, 0  # a new window, in a free, expired or reused slot
            _SLOT.pack_into(self._table, offset, digest, start, count + 1)

    def blocked_for(self, address: str) -> int:
        """Seconds this address must wait; 0 when it may try."""
        digest = _digest(address)
        if not self._holds(digest):  # most clients: no wrong key, no lock taken
            return 0
        with self._file.locked():
            now = self.clock()
            _, stored, start, count = self._find(digest, now)
        if stored != digest or not self._current(stored, start, now) or count < self.limit:
            return 0
        return max(1, int(start + self.window - now) + 1)

    def close(self) -> None:
        self._file.close()

    def _find(self, digest: bytes, now: float) -> tuple[int, bytes, float, int]:
        """The slot holding `digest`, else the first free one of its probe, else the one whose
        window began first: (offset, digest, window start, count) as stored there."""
        free = oldest = None
        for offset in _probe(digest):
            slot = (offset, *_SLOT.unpack_from(self._table, offset))
            if slot[1] == digest:
                return slot
            if free is None and not self._current(slot[1], slot[2], now):
                free = slot
            if oldest is None or slot[2] < oldest[2]:
                oldest = slot
        return free or oldest

    def _holds(self, digest: bytes) -> bool:
        """Whether a slot of the probe holds `digest`, read without the lock: a slot being
        written at that instant can be missed, like a wrong key checked while another of the
        same address is counted."""
        table = self._table
        return any(table[offset : offset + 8] == digest for offset in _probe(digest))

    def _current(self, digest: bytes, start: float, now: float) -> bool:
        """Whether a slot holds a window still running (a clock stepped back ends it)."""
        return digest != _EMPTY and start <= now < start + self.window

def _probe(digest: bytes) -> list[int]:
    """The offsets of the slots an address may be in: its hash's slot, then the next ones."""
    first = int.from_bytes(digest[:4], "little")
    return [(first + step) % SLOTS * _SLOT.size for step in range(PROBE)]


def _digest(address: str) -> bytes:
    digest = hashlib.blake2b(address.encode(), digest_size=8).digest()
    return digest if digest != _EMPTY else b"\x01" + digest[1:]  # never the empty mark
