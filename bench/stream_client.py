"""`python -m bench.stream_client HOST PORT COUNT CHUNKS TIMEOUT [INTERVAL [RAMP]]`: COUNT
streams at once, read by one event loop (uvloop) in a process of its own; their records as JSON
on stdout. INTERVAL: seconds between the fake upstream's chunks (sent as its X-Fake-Interval
header); RAMP: seconds over which the streams start, evenly (0: all together).

The client of bench/streams.py used to be one thread per stream in the bench's own process:
with 1,000 of them on this 2-core machine, threads waiting for the one GIL (5 ms switch
interval) delayed the arrivals the bench timestamps, for every target alike but more on the
paths that left the client less CPU. Here each block costs one callback on one loop, and the
blocks are parsed only once every stream has ended: parsing each as it ended, on the loop,
delayed the arrivals of the streams still running (1,000 streams end within a second or two:
both direct's and the proxy's p99 rose by 40 ms from the client alone).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from dataclasses import asdict

from .streams import StreamRecord, _End, _parse, _request


class _Reader(asyncio.Protocol):
    """One stream: every block and when it arrived; `done` resolves at the answer's end."""

    def __init__(self, done: asyncio.Future):
        self.done = done
        self.blocks: list[bytes] = []
        self.times: list[float] = []
        self.end = _End()

    def connection_made(self, transport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.times.append(time.time())
        self.blocks.append(data)
        if self.end.reached(data) and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before the end ({exc})"))


async def _one(host: str, port: int, chunks: int, timeout: float, interval: float | None,
               delay: float = 0.0) -> tuple[StreamRecord, _Reader | None]:
    """One stream, read to its end; parsed later (`_parsed`), once every stream is done: parsing
    on the loop while other streams still arrive would delay the very arrivals it stamps."""
    loop = asyncio.get_running_loop()
    record = StreamRecord()
    done = loop.create_future()
    transport = reader = None
    if delay:
        await asyncio.sleep(delay)
    try:
        async with asyncio.timeout(timeout):
            transport, reader = await loop.create_connection(lambda: _Reader(done), host, port)
            record.sent = time.time()
            transport.write(_request(host, port, chunks, interval))
            await done
    except (OSError, ValueError, TimeoutError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        reader = None
    finally:
        if transport is not None:
            transport.close()
    return record, reader


def _parsed(record: StreamRecord, reader: _Reader | None) -> StreamRecord:
    if reader is not None:
        try:
            _parse(record, b"".join(reader.blocks), reader.times, [len(b) for b in reader.blocks])
        except ValueError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
    return record


async def _all(host: str, port: int, count: int, chunks: int, timeout: float,
               interval: float | None, ramp: float = 0.0) -> list[StreamRecord]:
    read = await asyncio.gather(*(_one(host, port, chunks, timeout, interval, ramp * i / count)
                                  for i in range(count)))
    return [_parsed(record, reader) for record, reader in read]


def main(argv: list[str]) -> int:
    host, port, count, chunks, timeout, *pace = argv
    interval = float(pace[0]) if pace and pace[0] else None
    ramp = float(pace[1]) if len(pace) > 1 else 0.0
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency of the proxy
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        records = runner.run(_all(host, int(port), int(count), int(chunks), float(timeout),
                                  interval, ramp))
    json.dump([asdict(r) for r in records], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
