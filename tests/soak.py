"""A bounded soak: mixed traffic for a fixed time against a real proxy with 2 workers.

The proxy runs as a user starts it (`ollama-exoscale serve`: gunicorn with uvicorn's worker
class, the `local` provisioner starting the test upstream). Traffic comes in cycles: a busy
spell of streams (Ollama NDJSON and OpenAI SSE), back-to-back non-streamed requests and polls of
the passive routes, then a quiet spell longer than the idle timeout, so the upstream is removed
and the next busy spell starts cold with a storm of 503s. Every request must get a definite
answer: a complete stream, a 200, or a 503 in the contract's shape. Each worker's threads, file
descriptors and memory are read from /proc after a warm-up and again at the end.

    python -m tests.soak --minutes 10          # what ./dev soak runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from tests.harness import Proxy, fake_ollama_command, free_port, wait_until
from tests.procfs import Figures, children, figures

# The PROXY_THREADS pool proxy/asgi.py gives asyncio (to_thread: the metrics scrape, the
# wrong-key lock, the snapshot refresh, the shutdown) and libuv's pool grow to this many
# threads, no further.
# uvloop's getaddrinfo runs on libuv's own pool of 4 threads (UV_THREADPOOL_SIZE).
POOL = int(os.environ.get("PROXY_THREADS", "32")) + 4
# What the soak allows per worker: threads at any time beyond that pool (the event loop, the
# sync loop, one lifecycle operation), and growth from the warm-up to the end of fds (16: the
# upstream connections kept) and memory.
BOUNDS = {"threads_beyond_pool": 3, "fds": 16, "rss_mib": 16.0}
LOST_KEPT = 20  # examples of lost requests kept for the report


@dataclass
class Tally:
    """Requests tried and how each ended, shared by the client threads."""

    tried: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    lost_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str, outcome: str, lost: str | None = None) -> None:
        with self.lock:
            self.tried[kind] += 1
            self.outcomes[f"{kind} {outcome}"] += 1
            if lost is not None:
                self.lost_count += 1
                if len(self.lost) < LOST_KEPT:
                    self.lost.append(f"{kind}: {lost}")


@dataclass
class Report:
    seconds: float
    tried: int
    answered: int
    lost: int
    lost_examples: list[str]
    outcomes: dict[str, int]
    cold_starts: int
    before: dict[int, Figures]
    after: dict[int, Figures]
    peak: dict[int, Figures]
    workers_replaced: bool

    def growth(self) -> dict[int, dict[str, float]]:
        return {
            pid: {
                "threads": self.after[pid].threads - self.before[pid].threads,
                "fds": self.after[pid].fds - self.before[pid].fds,
                "rss_mib": round((self.after[pid].rss_kib - self.before[pid].rss_kib) / 1024, 1),
            }
            for pid in self.before if pid in self.after
        }

    def within_bounds(self) -> bool:
        threads = max(f.threads for f in self.peak.values()) - POOL
        return not self.workers_replaced and threads <= BOUNDS["threads_beyond_pool"] and all(
            grown[name] <= BOUNDS[name] for grown in self.growth().values()
            for name in ("fds", "rss_mib")
        )

    def text(self) -> str:
        lines = [
            f"soak: {self.seconds:.0f} s, {self.tried} requests tried, {self.answered} answered, "
            f"{self.lost} lost, {self.cold_starts} cold starts",
            "outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
        ]
        for pid, grown in self.growth().items():
            b, a, p = self.before[pid], self.after[pid], self.peak[pid]
            lines.append(
                f"worker {pid}: threads {b.threads}→{a.threads} (peak {p.threads}), "
                f"fds {b.fds}→{a.fds} (peak {p.fds}), RSS {b.rss_kib / 1024:.1f}→"
                f"{a.rss_kib / 1024:.1f} MiB (peak {p.rss_kib / 1024:.1f}), growth {grown}"
            )
        lines.append(f"bounds per worker {BOUNDS}: {'met' if self.within_bounds() else 'NOT met'}"
                     + ("; a worker was replaced" if self.workers_replaced else ""))
        lines += [f"lost: {example}" for example in self.lost_examples]
        return "\n".join(lines)


class Traffic:
    """Client threads; demand only while `busy` is set, passive polls all the time."""

    STREAMS, OPENAI_STREAMS, STORMERS, POLLERS = 4, 2, 4, 2

    def __init__(self, url: str, tally: Tally):
        self.url = url
        self.tally = tally
        self.busy = threading.Event()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        plan = ([self._stream] * self.STREAMS + [self._openai_stream] * self.OPENAI_STREAMS
                + [self._storm] * self.STORMERS + [self._poll] * self.POLLERS)
        for number, target in enumerate(plan):
            thread = threading.Thread(target=self._run, args=(target,), daemon=True,
                                      name=f"soak-client-{number}")
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        self.busy.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self, target) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                target(session)

    def _demand(self, session: requests.Session, kind: str, send, check) -> None:
        """One demand request: a definite answer is a 503 in the contract's shape or `check`."""
        self.busy.wait()
        if self.stop.is_set():
            return
        try:
            answer = send(session)
            with answer:
                if answer.status_code == 503:
                    problem = unavailable_problem(answer, openai=kind == "openai")
                    self.tally.add(kind, "503", problem)
                    self.stop.wait(0.05)
                elif answer.status_code == 200:
                    problem = check(answer)
                    self.tally.add(kind, "200" if problem is None else "broken", problem)
                else:
                    self.tally.add(kind, str(answer.status_code),
                                   f"HTTP {answer.status_code}: {answer.text[:200]}")
        except requests.RequestException as exc:
            self.tally.add(kind, "exception", f"{type(exc).__name__}: {exc}"[:300])

    def _stream(self, session: requests.Session) -> None:
        self._demand(
            session, "stream",
            lambda s: s.post(self.url + "/api/chat", json={
                "model": "llama3.2", "messages": [{"role": "user", "content": "hi"}],
                "options": {"num_predict": 20}}, headers={"X-Fake-Interval": "0.02"},
                stream=True, timeout=30),
            ndjson_problem,
        )

    def _openai_stream(self, session: requests.Session) -> None:
        self._demand(
            session, "openai",
            lambda s: s.post(self.url + "/v1/chat/completions", json={
                "model": "llama3.2", "stream": True, "max_tokens": 20,
                "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Fake-Interval": "0.02"}, stream=True, timeout=30),
            sse_problem,
        )

    def _storm(self, session: requests.Session) -> None:
        self._demand(
            session, "storm",
            lambda s: s.post(self.url + "/api/generate", json={
                "model": "llama3.2", "prompt": "x", "stream": False,
                "options": {"num_predict": 4}}, timeout=30),
            lambda answer: None if answer.json().get("done") else f"not done: {answer.text[:200]}",
        )

    def _poll(self, session: requests.Session) -> None:
        for path in ("/api/tags", "/status", "/metrics", "/api/version"):
            if self.stop.is_set():
                return
            try:
                answer = session.get(self.url + path, timeout=30)
                lost = None if answer.status_code == 200 else f"{path}: HTTP {answer.status_code}"
                self.tally.add("poll", str(answer.status_code), lost)
            except requests.RequestException as exc:
                self.tally.add("poll", "exception", f"{path}: {type(exc).__name__}: {exc}"[:300])
            self.stop.wait(0.1)


def unavailable_problem(answer: requests.Response, openai: bool) -> str | None:
    """What is wrong with a 503, or None when it is the contract's."""
    try:
        retry_after = int(answer.headers.get("Retry-After", ""))
        body = answer.json()
    except ValueError:
        return f"503 without Retry-After or JSON: {answer.text[:200]}"
    if retry_after < 1:
        return f"Retry-After {retry_after}"
    if openai:
        ok = body.get("error", {}).get("type") == "service_unavailable"
    else:
        ok = "provisioning" in body and body.get("retry_after") == retry_after
    return None if ok else f"503 body not in the contract's shape: {body}"


def ndjson_problem(answer: requests.Response) -> str | None:
    lines = [json.loads(line) for line in answer.iter_lines() if line]
    if not lines or not lines[-1].get("done") or any("error" in line for line in lines):
        return f"stream ended without done: {lines[-1:]}"
    return None


def sse_problem(answer: requests.Response) -> str | None:
    events = [line for line in answer.iter_lines() if line]
    return None if events and events[-1] == b"data: [DONE]" else f"SSE ended with {events[-1:]}"


def highest(a: Figures, b: Figures) -> Figures:
    return Figures(max(a.threads, b.threads), max(a.fds, b.fds), max(a.rss_kib, b.rss_kib))


def sample(pids: list[int]) -> dict[int, Figures]:
    found = {}
    for pid in pids:
        try:
            found[pid] = figures(pid)
        except OSError:
            pass
    return found


def run(duration: float, workdir: Path, *, busy: float = 12.0, quiet: float = 6.0,
        idle_timeout: float = 2.0, warmup: float = 8.0, log=print) -> Report:
    """Soak a fresh proxy in `workdir` for `duration` seconds; the report says what happened."""
    addr = f"127.0.0.1:{free_port()}"
    starts = workdir / "upstream-starts"  # one line per start (/status keeps the last 20)
    proxy = Proxy(
        workdir,
        PROXY_LOCAL_COMMAND=fake_ollama_command("--models", "llama3.2", "--starts-file",
                                                str(starts)),
        PROXY_LOCAL_ADDR=addr, PROXY_IDLE_TIMEOUT=idle_timeout, PROXY_WORKERS=2,
        PROXY_LOG_LEVEL="warning",
    )
    with proxy:
        workers = proxy.workers()
        tally = Tally()
        traffic = Traffic(proxy.url, tally)
        traffic.busy.set()
        traffic.start()
        wait_until(lambda: proxy.status()["provisioning_status"] == "ready", 60, interval=0.2,
                   what="ready after the first cold start")
        time.sleep(warmup)  # every pool thread and connection the mix needs exists now
        before = sample(workers)
        peak = dict(before)
        log(f"soak: warmed up, running {duration:.0f} s against workers {workers}")
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < duration:
            in_cycle = elapsed % (busy + quiet)
            traffic.busy.set() if in_cycle < busy else traffic.busy.clear()
            time.sleep(min(0.5, duration - elapsed))
            now = sample(workers)
            for pid, seen in now.items():
                peak[pid] = highest(peak[pid], seen)
        traffic.finish()
        wait_until(lambda: proxy.status()["in_flight"] == 0, 30, interval=0.2,
                   what="no request in flight")
        time.sleep(2)  # closed client connections are closed on the workers' side too
        after = sample(workers)
        cold_starts = len(starts.read_text().splitlines())
        replaced = children(proxy.process.pid) != workers
    answered = sum(tally.tried.values()) - tally.lost_count
    return Report(
        seconds=duration, tried=sum(tally.tried.values()), answered=answered,
        lost=tally.lost_count, lost_examples=tally.lost, outcomes=dict(tally.outcomes),
        cold_starts=cold_starts, before=before, after=after, peak=peak,
        workers_replaced=replaced,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the traffic runs")
    parser.add_argument("--json", help="also write the report here as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        report = run(args.minutes * 60, Path(workdir))
    print(report.text())
    if args.json:
        document = asdict(report) | {"growth": report.growth(), "bounds": BOUNDS}
        Path(args.json).write_text(json.dumps(document, indent=2, default=str))
    return 0 if report.lost == 0 and report.within_bounds() else 1


if __name__ == "__main__":
    sys.exit(main())
