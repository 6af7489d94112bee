"""Figures taken in the background while load runs: workers' memory, and gauges polled."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from .procs import established_by_worker, rss_kib


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0-100), linearly interpolated; nan for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rss_mib(pids: Iterable[int]) -> list[float]:
    """VmRSS of each process now, in MiB (0 for one that is gone)."""
    return [round((rss_kib(pid) or 0) / 1024, 1) for pid in pids]


class RssSampler:
    """VmRSS of some processes every `interval` seconds while in the `with` block.

    `baseline` is read on entry, `peak` is the highest seen, both per pid in KiB.
    """

    def __init__(self, pids: Iterable[int], interval: float = 0.02):
        self.pids = list(pids)
        self.interval = interval
        self.baseline: dict[int, int] = {}
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self.baseline = {pid: rss_kib(pid) or 0 for pid in self.pids}
        self.peak = dict(self.baseline)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], rss_kib(pid) or 0)

    def growth_mib(self) -> float:
        """The largest growth of any one process over its baseline, in MiB."""
        return max((self.peak[p] - self.baseline[p] for p in self.pids), default=0) / 1024

    def summary(self) -> dict[str, list[float]]:
        return {
            "baseline_mib": [round(self.baseline[p] / 1024, 1) for p in self.pids],
            "peak_mib": [round(self.peak[p] / 1024, 1) for p in self.pids],
        }


class MaxPoller:
    """The highest value a gauge (`read`, which may return None) shows during the block."""

    def __init__(self, read: Callable[[], float | None], interval: float = 0.05):
        self.read = read
        self.interval = interval
        self.highest: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="max-poller", daemon=True)

    def __enter__(self) -> MaxPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = self.read()
            if value is not None and (self.highest is None or value > self.highest):
                self.highest = value


class ConnectionSampler:
    """How a server's workers share the client connections during the block.

    gunicorn's workers each accept from the shared socket and keep what they accepted, so
    one worker may hold most keep-alive connections while the other idles.
    """

    def __init__(self, workers: list[int], port: int, interval: float = 0.1):
        self.workers = workers
        self.port = port
        self.interval = interval
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conn-sampler", daemon=True)

    def __enter__(self) -> ConnectionSampler:
        if self.workers:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            counts = established_by_worker(self.workers, self.port)
            if sum(counts) >= sum(self.counts):  # the fullest moment of the run
                self.counts = counts
