"""Load from Debian's wrk: requests/s and the latency distribution of its `--latency` output."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

SCRIPT = Path(__file__).with_name("post.lua")
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}  # → milliseconds


class WrkError(RuntimeError):
    pass


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    non_2xx: int  # wrk counts 3xx as fine and everything else here
    socket_errors: int

    def as_dict(self) -> dict:
        return asdict(self)


def run(url: str, connections: int, seconds: int, body: Path | None = None,
        header: str = "") -> WrkResult:
    """One wrk run of `seconds` (whole) with `connections` keep-alive clients on one thread;
    `header`: one more request header, "Name: value"."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
            "--timeout", "10s", "-s", str(SCRIPT), url]
    env = {**os.environ, "BENCH_BODY": str(body) if body else "", "BENCH_HEADER": header}
    # One thread: wrk's own CPU stays small on a 2-core machine shared with the servers.
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60)
    if done.returncode != 0:
        raise WrkError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse(done.stdout)


def parse(output: str) -> WrkResult:
    """The figures of wrk's text output (with --latency)."""
    percentiles = {
        int(p): _ms(value, unit)
        for p, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
    }
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if not (rate and total and {50, 75, 90, 99} <= set(percentiles)):
        raise WrkError(f"unexpected wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    return WrkResult(
        requests_per_s=float(rate.group(1)),
        p50_ms=percentiles[50],
        p75_ms=percentiles[75],
        p90_ms=percentiles[90],
        p99_ms=percentiles[99],
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(map(int, errors.groups())) if errors else 0,
    )


def _ms(value: str, unit: str) -> float:
    return float(value) * UNITS[unit]
