"""Where the proxy's workers spend their CPU during a run: py-spy, summarised.

py-spy samples only the thread that holds the GIL (`--gil`), without pausing the workers
(`--nonblocking`), so the summary is Python CPU time. Profiled runs are extra runs: their
figures are not the measured ones.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .targets import Target

# The deepest frame from one of these is charged with the sample (stdlib below it included).
LIBRARIES = ("proxy", "prometheus_client", "requests", "urllib3", "falcon", "gunicorn")
# The bench extra installs py-spy beside this interpreter, which may not be on PATH.
PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
# Frames every sample has (threads, gunicorn's worker loop): left out of the inclusive list.
PLUMBING = ("threading.py", "concurrent/", "<frozen runpy>", "gunicorn/arbiter.py",
            "gunicorn/app/", "gunicorn/workers/", "proxy/cli.py")
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^:()]+)(?::\d+)?\)$")


class Profiler:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.results: list[dict] = []

    @staticmethod
    def available() -> bool:
        return PY_SPY is not None

    def record(self, label: str, target: Target, run: Callable[[], object]) -> None:
        """Profile every worker of `target` while run() runs."""
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        pids = target.workers()
        outputs = [self.out_dir / f"profile-{slug}-{pid}.txt" for pid in pids]
        spies = [
            subprocess.Popen(
                [PY_SPY, "record", "--pid", str(pid), "--rate", "250", "--gil",
                 "--nonblocking", "--format", "raw", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for pid, out in zip(pids, outputs, strict=True)
        ]
        try:
            run()
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            for spy in spies:
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
        self.results.append({"label": label, **summarise(outputs)})


def summarise(paths: list[Path], top: int = 12) -> dict:
    """Shares of samples by library, by leaf function (self) and by function (inclusive)."""
    by_library, by_self, by_inclusive = Counter(), Counter(), Counter()
    total = 0
    for path in paths:
        for line in path.read_text().splitlines() if path.exists() else ():
            stack, _, count = line.rpartition(" ")
            frames = [_frame(f) for f in stack.split(";")]
            total += int(count)
            by_library[_library(frames)] += int(count)
            by_self[_name(frames[-1])] += int(count)
            for name in {_name(f) for f in frames if not f[1].startswith(PLUMBING)}:
                by_inclusive[name] += int(count)

    def shares(counter: Counter) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return {"samples": total, "by_library": shares(by_library) if total else [],
            "self": shares(by_self) if total else [],
            "inclusive": shares(by_inclusive) if total else []}


def _frame(text: str) -> tuple[str, str]:
    match = FRAME.match(text.strip())
    return (match["function"], match["file"]) if match else (text.strip(), "")


def _name(frame: tuple[str, str]) -> str:
    return f"{frame[0]} ({frame[1]})"


def _library(frames: list[tuple[str, str]]) -> str:
    for _function, file in reversed(frames):
        top = file.split("/", 1)[0]
        if top in LIBRARIES:
            return top
    return "other"
