"""`python -m bench.run [--quick] [--profile]`: every scenario against every target, one run.

Starts the fake upstream (through the proxy), nginx, the proxy, the previous proxy (from its
own checkout, bench/previous.py) and the reference apps on 127.0.0.1, measures, writes
RESULTS.md and results.png, and stops every process it started, on an error or Ctrl-C too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from . import fleet, machine, previous, scenarios, targets
from .plot import write_plot
from .procs import REPO, Processes
from .profile import Profiler
from .report import write_markdown

BENCH = REPO / "bench"
OUT = BENCH / "out"
BEFORE = BENCH / "before.json"  # an earlier run's results.json, kept to compare against


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run (2 s wrk runs, fewer clients, 256 MiB bodies); "
                        "results go to bench/out/ unless --results says otherwise")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the proxy's workers with py-spy in extra runs")
    parser.add_argument("--results", type=Path,
                        help="where RESULTS.md and results.png go (default: bench/)")
    parser.add_argument("--previous", metavar="REF",
                        help="the previous proxy's commit (default: see bench/previous.py)")
    parser.add_argument("--only", metavar="NAMES", type=lambda text: text.split(","),
                        help=f"only these scenarios, comma-separated ({', '.join(STEPS)}); "
                        "the figures go to bench/out/results.json, no RESULTS.md")
    parser.add_argument("--before", type=Path, default=BEFORE,
                        help="an earlier run's results.json for a before/after section "
                        "(default: bench/before.json, when it exists)")
    return parser.parse_args(argv)


def _stop_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


STEPS = {"503": scenarios.fast_503, "forward": scenarios.forward,
         "streaming": scenarios.streaming, "large": scenarios.large,
         "streams_1000": scenarios.many_streams, "fleet": fleet.run}


# The figures a partial run (--only) prints, where a row has them.
SHOWN = ("target", "servers", "body", "clients", "streams", "requests_per_s", "p50_ms", "p99_ms",
         "chunk_p99_ms", "settled_p99_ms", "ttfb_p50_ms", "upstream_open_max", "errors",
         "connections_by_worker", "cpu_ms_per_chunk", "upstream_cpu_ms_per_chunk", "load1",
         "others")


def run_all(plan: scenarios.Plan, workdir: Path, profile: bool, previous_ref: str | None,
            only: list[str] | None = None) -> dict:
    tree, python, previous_label = previous.checkout(previous_ref, log)
    previous_build = targets.Build(str(python), tree)
    results: dict = {"previous": {"commit": previous_label}}
    with Processes(OUT / "logs") as procs:
        log("starting the proxy (and through it the fake upstream), nginx, naive, bare-forward")
        ours, direct = targets.start_ours(procs, workdir)
        found = {"ours": ours, "direct": direct}
        found["nginx"] = targets.start_nginx(procs, workdir, direct)
        found["naive"] = targets.start_app(procs, workdir, "naive", "bench.naive:create()",
                                           {"BENCH_UPSTREAM": direct.url}, wsgi=True)
        found["bare-forward"] = targets.start_app(procs, workdir, "bare-forward",
                                                  "bench.bare_forward:create()",
                                                  {"BENCH_UPSTREAM": direct.url})
        log(f"starting the previous proxy ({previous_label})")
        found["previous"], found["previous-direct"] = targets.start_ours(
            procs, workdir, "previous", build=previous_build)
        profiler = Profiler(OUT) if profile and Profiler.available() else None
        ctx = scenarios.Context(plan, procs, workdir, machine.CpuMeter(procs.sessions), found,
                                profiler, previous_build)
        idle_start = scenarios.idle_rss(ctx, ("ours", "previous", "naive", "nginx"))
        for name, step in STEPS.items():
            if only and name not in only:
                continue
            log(f"scenario {name} (load {machine.load_text()})")
            results[name] = step(ctx)
            scenarios.settle()
        if "503" in results:
            idle_start["bare-falcon"] = results["503"].pop("bare_idle_mib")
        results["memory"] = {"idle_start": idle_start,
                             "idle_end": scenarios.idle_rss(ctx, ("ours", "previous", "naive",
                                                                  "nginx"))}
        if profiler:
            results["profiles"] = profiler.results
    return results


def _commit() -> str:
    """The commit measured, with `+` when the worktree has changes; empty outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + ("+" if head and git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = set(args.only or ()) - set(STEPS)
    if unknown:
        raise SystemExit(f"--only: no scenario {', '.join(sorted(unknown))}")
    plan = scenarios.Plan.quick() if args.quick else scenarios.Plan()
    results_dir = args.results or (OUT if args.quick else BENCH)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop_on_signal)
    shutil.rmtree(OUT / "logs", ignore_errors=True)  # this run's logs and profiles only
    (OUT / "logs").mkdir(parents=True)
    for old in OUT.glob("profile-*.txt"):
        old.unlink()
    workdir = Path(tempfile.mkdtemp(prefix="ollama-exoscale-bench-"))
    workdir.chmod(0o755)  # nginx's workers (`nobody` when run as root) reach its prefix below
    started = time.time()
    info = machine.describe()
    try:
        results = run_all(plan, workdir, args.profile, args.previous, args.only)
    except KeyboardInterrupt:
        log("interrupted: every process the bench started is stopped")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info["load average at end"] = machine.load_text()
    results["machine"] = info
    results["plan"] = vars(plan)
    results["meta"] = {
        "command": "./dev bench" + (" --quick" if args.quick else "")
        + (" --profile" if args.profile else ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "minutes": (time.time() - started) / 60,
        "quick": args.quick,
        "commit": _commit(),
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if args.only:  # a partial run: its figures are in results.json, not a report
        for name in args.only:
            for row in results[name]["rows"]:
                log(f"{name}: " + ", ".join(f"{key}={row[key]}" for key in SHOWN if key in row))
        log(f"done in {results['meta']['minutes']:.1f} min: {OUT / 'results.json'}")
        return 0
    results_dir.mkdir(parents=True, exist_ok=True)
    before = json.loads(args.before.read_text()) if args.before.exists() else None
    write_markdown(results, results_dir / "RESULTS.md", before)
    write_plot(results, results_dir / "results.png")
    log(f"done in {results['meta']['minutes']:.1f} min: {results_dir / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
