"""Large bodies: a blob upload and a download, each `size` bytes, through one path.

The client never holds the body: it sends and reads 1 MiB blocks of a fixed pattern.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import time
from dataclasses import dataclass

BLOCK = 1 << 20
PATTERN = bytes(range(256)) * (BLOCK // 256)


@dataclass(frozen=True)
class Transfer:
    seconds: float
    size: int
    status: int

    @property
    def mib_per_s(self) -> float:
        return self.size / 2**20 / self.seconds


@functools.lru_cache(maxsize=4)
def blob_digest(size: int) -> str:
    """sha256 of the upload body, as the blob route wants it in the path."""
    digest = hashlib.sha256()
    for block in _blocks(size):
        digest.update(block)
    return digest.hexdigest()


def _blocks(size: int):
    view = memoryview(PATTERN)
    while size > 0:
        yield view[: min(size, BLOCK)]
        size -= BLOCK


def upload(host: str, port: int, size: int, timeout: float = 600) -> Transfer:
    """POST /api/blobs/sha256:<digest> with Content-Length; timed until the answer's status."""
    path = f"/api/blobs/sha256:{blob_digest(size)}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        started = time.perf_counter()
        conn.putrequest("POST", path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        for block in _blocks(size):
            conn.send(block)
        response = conn.getresponse()
        response.read()
        return Transfer(time.perf_counter() - started, size, response.status)
    finally:
        conn.close()


def download(host: str, port: int, size: int, timeout: float = 600) -> Transfer:
    """GET the upstream's /api/__download?size=N and read it to the end in 1 MiB blocks."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    buffer = bytearray(BLOCK)
    received = 0
    try:
        started = time.perf_counter()
        conn.request("GET", f"/api/__download?size={size}")
        response = conn.getresponse()
        while count := response.readinto(buffer):
            received += count
        seconds = time.perf_counter() - started
    finally:
        conn.close()
    status = response.status if received == size else 0  # 0: the body came up short
    return Transfer(seconds, received, status)
