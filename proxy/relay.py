"""A stream moved by the worker's poller instead of a thread.

Under gthread a streamed answer holds a request thread from its first token to its last: with
the shipped 2 workers × 32 threads a 65th concurrent stream waited for one to end
(bench/RESULTS.md). Once an upstream answer's head is forwarded, a chunked body needs no
thread: the worker's main loop reads what the upstream sent, frames it as chunks for the
client and writes what the client takes, the way nginx moves a body. A client slower than the
upstream stops the reading (at HIGH_WATER) instead of growing a buffer. A client that hangs up
is noticed while the upstream is silent (a model loading, a long think), not at the next
token, so its upstream (and GPU work) is cut off at once, as nginx does.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable

from .forward import CHUNK, ResponseStream
from .h1 import hung_up

HIGH_WATER = 256 * 1024  # bytes waiting for the client before the upstream is read no more
_LAST_CHUNK = b"0\r\n\r\n"


class Relay:
    """One answer's body from the upstream to the client; `done(keep_alive)` when it ends."""

    def __init__(self, stream: ResponseStream, client: socket.socket, keep_alive: bool):
        self.stream = stream
        self.upstream = stream.upstream
        self.client = client
        self.keep_alive = keep_alive
        self.timeout = stream.read_timeout
        self.deadline = time.monotonic() + self.timeout
        self._out = bytearray()  # chunk-framed bytes the client has not taken yet
        self._ended = False  # the last chunk is in _out
        self._reading = False  # the upstream socket is registered for reading
        self._writing = False  # the client socket should be watched for room to write
        self._watching = True  # ... and for hanging up (until a pipelined request is seen)
        self._client_events = 0  # what the client socket is registered for now
        self._poller: selectors.BaseSelector | None = None
        self._done: Callable[[bool], None] | None = None

    def prime(self) -> None:
        """In the request's thread, before the hand-off: what came with the head goes out at
        once, not after a turn of the main loop."""
        self.upstream.sock.setblocking(False)
        self.client.setblocking(False)
        try:
            self._frame(self.upstream.read_ready(CHUNK, HIGH_WATER))
            if self._out:
                self._write_some()
        except OSError:
            pass  # the main loop meets the break (or the client's absence) again

    def start(self, poller: selectors.BaseSelector, done: Callable[[bool], None]) -> None:
        """From the worker's main loop: move the body from now on."""
        self._poller, self._done = poller, done
        if self._write():
            self._pump()

    def expire(self, now: float) -> None:
        """Called about once a second: an upstream silent, or a client not reading, for the
        read timeout ends the stream."""
        if now < self.deadline or self._done is None:
            return
        if self._ended or self._out:  # the client has taken nothing for that long: it is gone
            self._finish(False)
        else:
            self._broken(f"no bytes for {self.timeout:g} s")

    def _on_upstream(self, _sock) -> None:
        self._pump()

    def _on_client(self, _sock) -> None:
        if self._watching and self._client_gone():
            self._finish(False)  # the upstream is cut off with it
        elif self._out and self._write():
            self._pump()

    def _client_gone(self) -> bool:
        gone = hung_up(self.client)
        if gone is False:  # a pipelined next request: gunicorn reads it after the stream
            self._watching = False
            self._want()
        return bool(gone)

    def _pump(self) -> None:
        """Read what the upstream sent, frame it and write it, while the client takes it."""
        while not self._ended and len(self._out) < HIGH_WATER:
            try:
                self._frame(self.upstream.read_ready(CHUNK, HIGH_WATER - len(self._out)))
            except OSError as exc:  # h1's errors and resets: the upstream broke mid-stream
                self._broken(type(exc).__name__)
                return
            if not self._write():
                return
            if self._out or not self.upstream.buffered:
                break  # the client is slower, or nothing more has come: wait for an event
        self._settle()

    def _frame(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._out += _chunk(piece)
        if pieces:
            self.deadline = time.monotonic() + self.timeout
        if self.upstream.finished and not self._ended:
            self._out += _LAST_CHUNK
            self._ended = True

    def _write(self) -> bool:
        """Write what the client takes now; False when it is gone (the relay has ended)."""
        try:
            self._write_some()
        except OSError:
            self._finish(False)  # the client went away: the upstream is cut off with it
            return False
        return True

    def _write_some(self) -> None:
        while self._out:
            try:
                sent = self.client.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            del self._out[:sent]
            self.deadline = time.monotonic() + self.timeout

    def _settle(self) -> None:
        """End when all is written; else wait for the events that can move the stream on."""
        if self._done is None:
            return
        if self._ended and not self._out:
            self._finish(self.keep_alive)
            return
        self._want(reading=not self._ended and len(self._out) < HIGH_WATER,
                   writing=bool(self._out))

    def _broken(self, why: str) -> None:
        if last := self.stream.broke_off(why):
            self._out += _chunk(last)
        self._out += _LAST_CHUNK
        self._ended = True
        if self._write():
            self._settle()

    def _want(self, reading: bool | None = None, writing: bool | None = None) -> None:
        """Register for the events the relay waits on, and only those."""
        poller = self._poller
        if poller is None or self._done is None:
            return
        if reading is not None and reading != self._reading:
            if reading:
                poller.register(self.upstream.sock, selectors.EVENT_READ, self._on_upstream)
            else:
                poller.unregister(self.upstream.sock)
            self._reading = reading
        if writing is not None:
            self._writing = writing
        events = ((selectors.EVENT_READ if self._watching else 0)
                  | (selectors.EVENT_WRITE if self._writing else 0))
        if events != self._client_events:
            if not self._client_events:
                poller.register(self.client, events, self._on_client)
            elif not events:
                poller.unregister(self.client)
            else:
                poller.modify(self.client, events, self._on_client)
            self._client_events = events

    def _finish(self, keep_alive: bool) -> None:
        if self._done is None:
            return
        self._watching = False
        self._want(reading=False, writing=False)
        done, self._done = self._done, None
        try:
            self.stream.close()  # the upstream connection kept or dropped; in-flight count ends
        finally:
            done(keep_alive)


def _chunk(piece: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(piece), piece)
