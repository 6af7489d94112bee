"""Which GPU server a request goes to, as one worker sees the fleet: memory only, on the event
loop.

Each demand request goes to the ready server with the fewest requests in flight: every other
worker's and host's count as the store last said, plus this worker's own as it is now. A
server that broke a request (a 502/504, a stream cut) gets nothing from this worker for
BROKEN_FOR seconds, while the reconciler probes it; with one server there is nowhere else to
go, so it keeps getting requests as before fleets.
"""

from __future__ import annotations

import threading
import time

from proxy.lifecycle.fleet import Member, pick
from proxy.lifecycle.snapshot import Snapshot
from proxy.provision.base import PRIMARY

BROKEN_FOR = 10.0  # seconds a server that broke a request is passed over by this worker


class Router:
    """This worker's requests in flight on each server, and the servers it found broken."""

    def __init__(self):
        self._lock = threading.Lock()
        self._own: dict[str, int] = {}
        self._broken: dict[str, float] = {}  # name → monotonic time it broke a request

    def choose(self, snapshot: Snapshot, reported: dict[str, int]) -> str | None:
        """The server for the next request; None when none serves. `reported`: this worker's
        counts as its last report gave them (already in the snapshot's sums)."""
        members = snapshot.members()
        now = time.monotonic()
        with self._lock:
            if len(members) == 1:  # one server: it gets every request, as before fleets
                chosen = PRIMARY if snapshot.serving else None
                if chosen is not None:  # counted: a second server may come meanwhile
                    self._own[chosen] = self._own.get(chosen, 0) + 1
                return chosen
            broken = {name for name, at in self._broken.items() if now - at < BROKEN_FOR}
            others = {m.name: m.inflight - reported.get(m.name, 0) for m in members}
            counted = [Member(m.name, m.phase, others[m.name], m.draining or m.name in broken)
                       for m in members]
            chosen = pick(counted, self._own)
            if chosen is None and broken:  # every ready server broke lately: try them anyway
                chosen = pick([Member(m.name, m.phase, others[m.name], m.draining)
                               for m in members], self._own)
            if chosen is not None:
                self._own[chosen] = self._own.get(chosen, 0) + 1
        return chosen

    def done(self, name: str) -> None:
        with self._lock:
            left = self._own.get(name, 0) - 1
            if left > 0:
                self._own[name] = left
            else:
                self._own.pop(name, None)

    def broke(self, name: str) -> None:
        """`name` broke a request: pass it over for a while."""
        with self._lock:
            self._broken[name] = time.monotonic()

    def counts(self) -> dict[str, int]:
        """This worker's requests in flight by server, for its report."""
        with self._lock:
            return dict(self._own)
