"""Streaming through a path: when each chunk arrives, against when the upstream wrote it.

The fake upstream stamps every NDJSON line with `created_at` (wall clock, microseconds) just
before writing it, and client and upstream share this machine's clock: arrival minus
created_at is each chunk's delay on its way, and a path that holds chunks back shows it.

The client reads raw socket blocks and only timestamps them while the stream runs; HTTP
framing and JSON are parsed afterwards. Many streams at once are read by one event loop in a
process of its own (bench/stream_client.py), not by a thread each: 1,000 threads waiting for
one GIL delayed the very arrivals they timestamp.
"""

from __future__ import annotations

import bisect
import json
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .sampling import percentile

CREATED_AT = re.compile(rb'"created_at":"([^"]+)"')
LAST_CHUNK = b"\r\n0\r\n\r\n"  # the end of a chunked body (no trailers here)
SETTLED = 5  # chunks of a stream (100 ms at 20 ms each) while the burst of others starts


@dataclass
class StreamRecord:
    sent: float = 0.0  # wall time the request went out
    arrivals: list[float] = field(default_factory=list)  # wall time each line was read
    emitted: list[float] = field(default_factory=list)  # the upstream's created_at of that line
    error: str | None = None


def one_stream(host: str, port: int, chunks: int, timeout: float = 30) -> StreamRecord:
    """POST /api/generate for `chunks` tokens and record every line's arrival."""
    record = StreamRecord()
    blocks: list[bytes] = []
    times: list[float] = []
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            record.sent = time.time()
            sock.sendall(_request(host, port, chunks))
            end = _End()
            while block := sock.recv(65536):
                times.append(time.time())
                blocks.append(block)
                if end.reached(block):
                    break
        _parse(record, b"".join(blocks), times, [len(b) for b in blocks])
    except (OSError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


def _request(host: str, port: int, chunks: int, interval: float | None = None) -> bytes:
    """`interval`: seconds between the fake upstream's chunks (its X-Fake-Interval header),
    instead of its --chunk-interval."""
    body = json.dumps({"model": "llama3.2", "prompt": "bench",
                       "options": {"num_predict": chunks}}).encode()
    pace = f"X-Fake-Interval: {interval}\r\n" if interval is not None else ""
    # Keep-alive as Ollama's clients use it (the socket is closed after the answer), since
    # `Connection: close` costs gunicorn more than the upstream and would skew TTFB.
    head = (f"POST /api/generate HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\n" + pace +
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class _End:
    """Tells, block by block, when the answer is complete (chunked, or Content-Length)."""

    def __init__(self):
        self.head = b""
        self.chunked: bool | None = None
        self.left = 0  # body bytes still due, with Content-Length
        self.tail = b""  # the last bytes seen: the final chunk may come in a block of its own

    def reached(self, block: bytes) -> bool:
        if self.chunked is None:
            return self._head(block)
        if self.chunked:
            self.tail = (self.tail + block)[-len(LAST_CHUNK):]
            return self.tail == LAST_CHUNK
        self.left -= len(block)
        return self.left <= 0

    def _head(self, block: bytes) -> bool:
        self.head += block
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = self.head[:end].lower()
        self.chunked = b"transfer-encoding: chunked" in head
        if self.chunked:
            self.tail = self.head[-len(LAST_CHUNK):]
            return self.tail == LAST_CHUNK
        length = re.search(rb"content-length:\s*(\d+)", head)
        self.left = (int(length.group(1)) if length else 0) - (len(self.head) - end - 4)
        return self.left <= 0


def _parse(record: StreamRecord, raw: bytes, times: list[float], sizes: list[int]) -> None:
    """Each NDJSON line's arrival: the time of the block holding its newline."""
    ends = []  # offset in `raw` where each block ends
    for size in sizes:
        ends.append((ends[-1] if ends else 0) + size)
    head_end = raw.find(b"\r\n\r\n")
    status = raw[: raw.find(b"\r\n")].split(b" ")
    if head_end < 0 or len(status) < 2 or status[1] != b"200":
        raise ValueError(f"not a 200 answer: {raw[:80]!r}")
    chunked = b"transfer-encoding: chunked" in raw[:head_end].lower()
    line = bytearray()
    for start, stop in _body_spans(raw, head_end + 4, chunked):
        piece = raw[start:stop]
        at = 0
        while (newline := piece.find(b"\n", at)) >= 0:
            line += piece[at:newline]
            record.arrivals.append(times[bisect.bisect_right(ends, start + newline)])
            record.emitted.append(_created_at(bytes(line)))
            line.clear()
            at = newline + 1
        line += piece[at:]


def _body_spans(raw: bytes, offset: int, chunked: bool):
    """(start, stop) offsets in `raw` of the body's bytes, without chunked framing."""
    if not chunked:
        yield offset, len(raw)
        return
    while True:
        eol = raw.index(b"\r\n", offset)
        size = int(raw[offset:eol].split(b";")[0], 16)
        if size == 0:
            return
        yield eol + 2, eol + 2 + size
        offset = eol + 2 + size + 2


def _created_at(line: bytes) -> float:
    match = CREATED_AT.search(line)
    if not match:
        raise ValueError("a line without created_at")
    return datetime.fromisoformat(match.group(1).decode().replace("Z", "+00:00")).timestamp()


def concurrent_streams(
    host: str, port: int, count: int, chunks: int, timeout: float = 30,
    interval: float | None = None, ramp: float = 0.0,
) -> list[StreamRecord]:
    """`count` streams started together (or evenly over `ramp` seconds), read by one event
    loop in a process of its own (bench/stream_client.py): the client's own scheduling stays
    out of the figures."""
    argv = [sys.executable, "-m", "bench.stream_client", host, str(port), str(count),
            str(chunks), str(timeout + ramp), "" if interval is None else str(interval),
            str(ramp)]
    done = subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                          timeout=timeout + 30, check=True)
    return [StreamRecord(**record) for record in json.loads(done.stdout)]


def summarize(records: list[StreamRecord], interval: float) -> dict:
    """TTFB, per-chunk delay, chunks held past one interval, and how spread arrivals are."""
    good = [r for r in records if r.error is None and r.arrivals]
    delays = [(a - e) * 1e3 for r in good for a, e in zip(r.arrivals, r.emitted, strict=True)]
    # Past the first SETTLED chunks of each stream: the streams run, none is being set up.
    settled = [(a - e) * 1e3 for r in good
               for a, e in zip(r.arrivals[SETTLED:], r.emitted[SETTLED:], strict=True)]
    ttfb = [(r.arrivals[0] - r.sent) * 1e3 for r in good]
    spreads = [_spread(r) for r in good if len(r.arrivals) > 1]
    return {
        "sampled": len(records),
        "errors": len(records) - len(good),
        "chunks": len(delays),
        "ttfb_p50_ms": percentile(ttfb, 50),
        "ttfb_p99_ms": percentile(ttfb, 99),
        "chunk_p50_ms": percentile(delays, 50),
        "chunk_p99_ms": percentile(delays, 99),
        "chunk_max_ms": max(delays, default=float("nan")),
        "settled_p99_ms": percentile(settled, 99),
        "held": sum(1 for d in delays if d > interval * 1e3),
        "spread": percentile(spreads, 50),
        "first_error": next((r.error for r in records if r.error), None),
    }


def _spread(record: StreamRecord) -> float:
    """Arrival span over emission span: 1.0 as written, near 0 if held back to the end."""
    emitted = record.emitted[-1] - record.emitted[0]
    return (record.arrivals[-1] - record.arrivals[0]) / emitted if emitted > 0 else float("nan")
