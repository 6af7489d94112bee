"""bench/RESULTS.md and bench/results.png from one run's results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

GOAL_MB = 50  # issue 8's memory goal: growth under 50 MB for a 1 GiB body
GOAL_KIB_PER_STREAM = 64  # issue 14's: worker memory growth under 64 KiB a stream


def fmt(value: Any, digits: int = 2) -> str:
    """A number for a table cell; a dash for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def find(rows: list[dict], **match: Any) -> dict:
    """The row whose fields equal `match`; an empty dict if none."""
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), {})


# -- goals -------------------------------------------------------------------------------------


def goals(results: dict) -> list[list[Any]]:
    """(goal, figure, verdict) rows: reported, never asserted. Issue 14's first, then 8's,
    then 17's."""
    return goals_14(results) + goals_8(results) + goals_17(results)


def goals_17(results: dict) -> list[list[Any]]:
    """More GPU servers: requests/s against one server's, the proxy's added latency."""
    section = results.get("fleet")
    if not section:
        return []
    rows, clients, out = section["rows"], section["clients"], []
    one = find(rows, target="ours", servers=1, clients=clients).get("requests_per_s")
    for size, goal in ((2, 1.8), (3, 2.6)):
        r = ratio(find(rows, target="ours", servers=size, clients=clients).get("requests_per_s"),
                  one)
        out.append([f"{size} GPU servers: requests/s ≥ {goal}× one server's", _x(r),
                    _verdict(r, goal)])
    direct = find(rows, target="direct").get("p50_ms")
    added = [find(rows, target="ours", servers=n, clients=1).get("p50_ms") for n in (1, 2, 3)]
    if direct is not None and None not in added:
        spread = max(added) - min(added)
        out.append(["1, 2, 3 GPU servers: added p50 at 1 client unchanged (within 1 ms)",
                    " / ".join(_ms(a - direct) for a in added), _verdict(spread, 1.0, below=True)])
    return out


def goals_14(results: dict) -> list[list[Any]]:
    """The async core against the previous proxy, both in this run."""
    out = []
    fwd = results["forward"]["rows"]
    r = ratio(find(fwd, body="embed", target="ours", clients=64).get("requests_per_s"),
              find(fwd, body="embed", target="previous", clients=64).get("requests_per_s"))
    out.append(["forward /api/embed at 64 clients ≥ 1.5× the previous proxy", _x(r),
                _verdict(r, 1.5)])
    fast = results["503"]["rows"]
    r = ratio(find(fast, target="ours", clients=64).get("requests_per_s"),
              find(fast, target="previous", clients=64).get("requests_per_s"))
    out.append(["503 path at 64 clients ≥ 2× the previous proxy", _x(r), _verdict(r, 2.0)])
    for body in ("embed", "show"):
        added = _added(fwd, "p50_ms", body=body, clients=1)
        out.append([f"forward /api/{body}: added p50 ≤ 0.4 ms at 1 client", _ms(added),
                    _verdict(added, 0.4, below=True)])
        floor = _added(fwd, "p50_ms", body=body, clients=1, target="bare-forward")
        if floor is not None:  # the stack's own floor, for scale: not a goal
            out.append([f"(for scale) bare-forward, the stack with no logic: added p50 at 1 "
                        f"client, /api/{body}", _ms(floor), "–"])
    many = results.get("streams_1000")
    if many:
        rows = many["rows"]
        ours = find(rows, target="ours")
        count = ours.get("streams")
        done = (ours.get("sampled", 0) - ours.get("errors", 0)) if ours else None
        out.append([f"{count} concurrent streams: all complete", f"{fmt(done)}/{fmt(count)}",
                    "met" if ours and ours.get("errors") == 0 else "**not met**"])
        added = _added(rows, "chunk_p99_ms")
        out.append([f"{count} concurrent streams: added per-chunk delay p99 < 20 ms",
                    _ms(added), _verdict(added, 20.0, below=True, strict=True)])
        per = ours.get("growth_kib_per_stream")
        out.append([f"{count} concurrent streams: worker memory growth < "
                    f"{GOAL_KIB_PER_STREAM} KiB a stream", f"{fmt(per, 1)} KiB",
                    _verdict(per, GOAL_KIB_PER_STREAM, below=True, strict=True)])
    return out


def goals_8(results: dict) -> list[list[Any]]:
    out = []
    fast = results["503"]["rows"]
    r = ratio(find(fast, target="ours", clients=64).get("requests_per_s"),
              find(fast, target="bare-falcon", clients=64).get("requests_per_s"))
    out.append(["503 fast path ≥ 0.9× bare-falcon req/s at 64 clients", _x(r), _verdict(r, 0.9)])
    fwd = results["forward"]["rows"]
    for body in ("embed", "show"):
        r = ratio(find(fwd, body=body, target="ours", clients=64).get("requests_per_s"),
                  find(fwd, body=body, target="naive", clients=64).get("requests_per_s"))
        out.append([f"forward /api/{body} ≥ 2× naive req/s at 64 clients", _x(r),
                    _verdict(r, 2.0)])
        added = _added(fwd, "p50_ms", body=body, clients=1)
        out.append([f"forward /api/{body} added p50 ≤ 0.5 ms at 1 client", _ms(added),
                    _verdict(added, 0.5, below=True)])
    rows = results["streaming"]["rows"]
    for count in sorted({r["streams"] for r in rows}):
        added = _added(rows, "chunk_p99_ms", streams=count)
        out.append([f"streaming, {count} stream(s): added per-chunk delay p99 < 2 ms",
                    _ms(added), _verdict(added, 2.0, below=True, strict=True)])
        added = _added(rows, "ttfb_p50_ms", streams=count)
        out.append([f"streaming, {count} stream(s): TTFB p50 within 2 ms of direct",
                    _ms(added), _verdict(added, 2.0, below=True)])
    limit_mib = GOAL_MB * 1e6 / 2**20
    for direction in ("upload", "download"):
        growth = find(results["large"]["rows"], direction=direction, target="ours").get(
            "growth_mib")
        size = results["large"]["bytes"] / 2**30
        out.append([f"{size:g} GiB {direction}: proxy memory growth < {GOAL_MB} MB",
                    f"{fmt(growth, 1)} MiB", _verdict(growth, limit_mib, below=True,
                                                      strict=True)])
    return out


def _added(rows: list[dict], field: str, target: str = "ours", **match: Any) -> float | None:
    path, direct = find(rows, target=target, **match), find(rows, target="direct", **match)
    if field not in path or field not in direct:
        return None
    return path[field] - direct[field]


def _x(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "–"


def _ms(value: float | None) -> str:
    return f"{value:+.2f} ms" if value is not None else "–"


def _verdict(value: float | None, bound: float, below: bool = False, strict: bool = False) -> str:
    if value is None or math.isnan(value):
        return "no figure"
    if below:
        met = value < bound if strict else value <= bound
    else:
        met = value >= bound
    return "met" if met else "**not met**"


# -- scenario tables ---------------------------------------------------------------------------


def table_503(section: dict) -> str:
    rows = []
    for r in section["rows"]:
        bare = find(section["rows"], target="bare-falcon", clients=r["clients"])
        previous = find(section["rows"], target="previous", clients=r["clients"])
        proxy = r["target"] in ("ours", "previous")
        x = ratio(r["requests_per_s"], bare.get("requests_per_s")) if proxy else None
        p = ratio(r["requests_per_s"], previous.get("requests_per_s")) \
            if r["target"] == "ours" else None
        rows.append([r["clients"], r["target"], r["requests_per_s"], _rounds(r), r["p50_ms"],
                     r["p99_ms"], _x(x) if x else "", _x(p) if p else "",
                     f"{r['non_2xx']}/{r['requests']}", r["socket_errors"], r["load1"],
                     r["others"]])
    header = ["clients", "target", "req/s", "req/s by round", "p50 ms", "p99 ms",
              "×bare-falcon", "ours/previous", "503s/requests", "socket errors", "load1",
              "others (cores)"]
    return table(header, rows)


def table_forward(section: dict) -> str:
    rows = []
    for r in section["rows"]:
        base = {k: r[k] for k in ("body", "clients")}
        direct, nginx = find(section["rows"], target="direct", **base), find(
            section["rows"], target="nginx", **base)
        naive = find(section["rows"], target="naive", **base)
        previous = find(section["rows"], target="previous", **base)
        is_direct = r["target"] == "direct"
        rows.append([
            r["body"], r["clients"], r["target"], r["requests_per_s"], _rounds(r), r["p50_ms"],
            r["p99_ms"],
            "" if is_direct else r["p50_ms"] - direct["p50_ms"],
            "" if is_direct else r["p99_ms"] - direct["p99_ms"],
            "" if is_direct else _x(ratio(r["requests_per_s"], direct["requests_per_s"])),
            _x(ratio(r["requests_per_s"], nginx["requests_per_s"]))
            if r["target"] in ("ours", "previous", "naive") else "",
            _x(ratio(r["requests_per_s"], naive["requests_per_s"])) if r["target"] == "ours"
            else "",
            _x(ratio(r["requests_per_s"], previous.get("requests_per_s")))
            if r["target"] == "ours" else "",
            r["non_2xx"] + r["socket_errors"], r["load1"], r["others"],
        ])
    header = ["body", "clients", "target", "req/s", "req/s by round", "p50 ms", "p99 ms",
              "added p50 ms",
              "added p99 ms", "×direct", "×nginx", "ours/naive", "ours/previous", "errors",
              "load1", "others (cores)"]
    return table(header, rows)


def table_streaming(section: dict) -> str:
    rows = []
    for r in section["rows"]:
        direct = find(section["rows"], target="direct", streams=r["streams"])
        is_direct = r["target"] == "direct"
        rows.append([
            r["streams"], r["target"], r["ttfb_p50_ms"], r["ttfb_p99_ms"],
            "" if is_direct else r["ttfb_p50_ms"] - direct["ttfb_p50_ms"],
            r["chunk_p50_ms"], r["chunk_p99_ms"], r["chunk_max_ms"],
            "" if is_direct else r["chunk_p99_ms"] - direct["chunk_p99_ms"],
            r.get("settled_p99_ms", ""),
            "" if is_direct or "settled_p99_ms" not in r
            else r["settled_p99_ms"] - direct["settled_p99_ms"],
            f"{r['held']}/{r['chunks']}", r["spread"], r.get("upstream_open_max") or "",
            _by_worker(r), r["errors"], r["load1"], r["others"],
        ])
    header = ["streams", "path", "TTFB p50 ms", "TTFB p99 ms", "added TTFB p50 ms",
              "chunk delay p50 ms", "p99 ms", "max ms", "added p99 ms",
              "p99 past chunk 5 ms", "added p99 past chunk 5 ms", "chunks > 20 ms late",
              "spread", "upstream streams open (max)", "client connections by worker",
              "errors", "load1", "others (cores)"]
    return table(header, rows)


def table_large(section: dict) -> str:
    rows = []
    for r in section["rows"]:
        direct = find(section["rows"], target="direct", direction=r["direction"])
        nginx = find(section["rows"], target="nginx", direction=r["direction"])
        proxied = r["target"] != "direct"
        rows.append([
            r["direction"], r["target"], r["seconds"], r["mib_per_s"],
            _x(ratio(r["mib_per_s"], direct["mib_per_s"])) if proxied else "",
            _x(ratio(r["mib_per_s"], nginx["mib_per_s"]))
            if r["target"] in ("ours", "previous", "naive") else "",
            r["status"], _mib_list(r["baseline_mib"]), _mib_list(r["peak_mib"]),
            r["growth_mib"] if proxied else "", r["load1"], r["others"],
        ])
    header = ["direction", "path", "seconds", "MiB/s", "×direct", "×nginx", "status",
              "RSS before (MiB/worker)", "RSS peak", "growth MiB", "load1", "others (cores)"]
    return table(header, rows)


def table_memory(results: dict) -> str:
    memory = results["memory"]
    streams = {r["target"]: r for r in results["streaming"]["rows"] if r["streams"] > 1}
    rows = []
    for name in ("ours", "previous", "naive", "nginx", "bare-falcon"):
        if name not in memory["idle_start"]:
            continue  # a run from before the target existed
        idle = memory["idle_start"].get(name)
        with_streams = streams.get(name, {})
        peak, before = with_streams.get("peak_mib"), with_streams.get("baseline_mib")
        growth = max(p - b for p, b in zip(peak, before, strict=True)) if peak else ""
        rows.append([
            name, len(idle) if idle else "–", _mib_list(idle), _mib_list(peak), growth,
            with_streams.get("upstream_open_max") or "", _by_worker(with_streams),
            _mib_list(memory["idle_end"].get(name)),
        ])
    header = ["target", "workers", "idle RSS at start (MiB/worker)",
              "with 100 streams (peak MiB/worker)", "growth MiB", "upstream streams open (max)",
              "client connections by worker", "idle after the run"]
    return table(header, rows)


def table_fleet(section: dict) -> str:
    rows = section["rows"]
    one = find(rows, target="ours", servers=1, clients=section["clients"]).get("requests_per_s")
    direct = find(rows, target="direct").get("p50_ms")
    out = []
    for r in rows:
        is_direct = r["target"] == "direct"
        out.append([
            r["target"], r["servers"], r["clients"], r["requests_per_s"],
            "" if is_direct or r["clients"] == 1 else _x(ratio(r["requests_per_s"], one)),
            r["p50_ms"], r["p99_ms"],
            "" if is_direct or r["clients"] != 1 or direct is None else r["p50_ms"] - direct,
            r["non_2xx"], r["socket_errors"], r["load1"], r["others"],
        ])
    header = ["target", "servers", "clients", "req/s", "×1 server", "p50 ms", "p99 ms",
              "added p50 ms", "non-2xx", "socket errors", "load1", "others (cores)"]
    return table(header, out)


def table_many(section: dict) -> str:
    rows = []
    for r in section["rows"]:
        direct = find(section["rows"], target="direct")
        is_direct = r["target"] == "direct"
        rows.append([
            r["target"], f"{r['sampled'] - r['errors']}/{r['sampled']}", r["ttfb_p50_ms"],
            r["ttfb_p99_ms"], r["chunk_p50_ms"], r["chunk_p99_ms"], r["chunk_max_ms"],
            "" if is_direct else r["chunk_p99_ms"] - direct["chunk_p99_ms"],
            r.get("upstream_open_max") or "", _by_worker(r), _mib_list(r["baseline_mib"]),
            _mib_list(r["peak_mib"]), r["growth_kib_per_stream"],
            _us(r.get("cpu_ms_per_chunk")), r.get("first_error") or "", r["load1"], r["others"],
        ])
    header = ["path", "complete", "TTFB p50 ms", "TTFB p99 ms", "chunk delay p50 ms",
              "p99 ms", "max ms", "added p99 ms", "upstream streams open (max)",
              "client connections by worker", "RSS before (MiB/worker)", "RSS peak",
              "growth KiB a stream", "CPU µs a chunk", "first error", "load1",
              "others (cores)"]
    return table(header, rows)


def _us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1e3


def _by_worker(row: dict) -> str:
    """Client connections each worker held at the fullest moment, e.g. `88 + 12`."""
    counts = row.get("connections_by_worker")
    return " + ".join(map(str, counts)) if counts else ""


def _rounds(row: dict) -> str:
    return " / ".join(str(v) for v in row.get("rounds_rps", []))


def _mib_list(values: list[float] | None) -> str:
    return " / ".join(f"{v:.1f}" for v in values) if values else "–"


def profiles(results: dict) -> str:
    parts = []
    for p in results.get("profiles", []):
        libs = ", ".join(f"{name} {share}%" for name, share in p["by_library"])
        top = "\n".join(f"| {name} | {share}% |" for name, share in p["self"][:8])
        inclusive = "\n".join(f"| {name} | {share}% |" for name, share in p["inclusive"][:12])
        parts.append(
            f"#### {p['label']} ({p['samples']} samples holding the GIL, both workers)\n\n"
            f"By library (the deepest frame of proxy, prometheus_client, requests, urllib3, "
            f"falcon, gunicorn; stdlib below it included): {libs}\n\n"
            f"| self (leaf function) | share |\n|---|---|\n{top}\n\n"
            f"| inclusive (threads' and gunicorn's worker loop left out) | share |\n"
            f"|---|---|\n{inclusive}\n"
        )
    return "\n".join(parts)


def _method(plan: dict) -> str:
    return (f"wrk with one thread and keep-alive connections: a {plan['warmup_seconds']:g} s "
            f"warm-up per target, then {plan['rounds']} round(s) of {plan['wrk_seconds']:g} s "
            "taking the targets in turn; each figure is the median of its rounds (all rounds "
            "shown).")


# -- before / after ----------------------------------------------------------------------------


def before_after(before: dict, after: dict) -> str:
    """The goals and the figures behind them in an earlier run (`before`) and this one."""
    meta = before["meta"]
    parts = [
        f"Before: `{meta['command']}` on {meta['date']}"
        f"{' at ' + meta['commit'] if meta.get('commit') else ''} (`bench/before.json`); after: "
        "this run. Each run's ratios are taken within that run (same machine state), so they "
        "compare better across runs than absolute figures. The test upstream changed between "
        "the two in one way: it now keeps its encoded `/api/embed` answers, whose JSON "
        "encoding had bounded every embed figure (direct about 1,100–1,400 req/s), so the "
        "embed rows before and after measure different upstreams; show, streaming and large "
        "bodies use the same one.\n",
        table(["goal", "before", "after", "verdict after"],
              [[b[0], b[1], a[1], a[2]]
               for b, a in zip(goals(before), goals(after), strict=False) if b[0] == a[0]])
        + "\n",
    ]
    rows = []
    for a in after["forward"]["rows"]:
        if a["target"] != "ours":
            continue
        key = {"body": a["body"], "clients": a["clients"]}
        b = find(before["forward"]["rows"], target="ours", **key)
        if not b:
            continue
        cells = [a["body"], a["clients"]]
        for field in ("requests_per_s", "direct", "nginx", "naive", "added_p50"):
            was, now = _forward_figure(before, b, field), _forward_figure(after, a, field)
            cells.append(f"{was} → {now}")
        rows.append(cells)
    parts.append(table(["body", "clients", "ours req/s", "ours ×direct", "ours ×nginx",
                        "ours ×naive", "added p50 ms"], rows) + "\n")
    rows = []
    for a in after["streaming"]["rows"]:
        b = find(before["streaming"]["rows"], target=a["target"], streams=a["streams"])
        if a["target"] != "ours" or a["streams"] == 1:
            continue
        rows.append([
            a["target"], a["streams"],
            f"{_stream_added(before, b, 'ttfb_p50_ms')} → {_stream_added(after, a, 'ttfb_p50_ms')}",
            f"{_stream_added(before, b, 'chunk_p99_ms')} → "
            f"{_stream_added(after, a, 'chunk_p99_ms')}",
            f"{fmt(b.get('upstream_open_max'))} → {fmt(a.get('upstream_open_max'))}",
            f"{_by_worker(b) or '–'} → {_by_worker(a) or '–'}",
        ])
    parts.append(table(["path", "streams", "added TTFB p50 ms", "added chunk p99 ms",
                        "upstream streams open (max)", "client connections by worker"], rows)
                 + "\n")
    return "\n".join(parts)


def _forward_figure(results: dict, row: dict, field: str) -> str:
    if field == "requests_per_s":
        return fmt(row["requests_per_s"], 0)
    rows = results["forward"]["rows"]
    other = find(rows, target="direct" if field == "added_p50" else field, body=row["body"],
                 clients=row["clients"])
    if field == "added_p50":
        return fmt(row["p50_ms"] - other["p50_ms"]) if other else "–"
    return _x(ratio(row["requests_per_s"], other.get("requests_per_s")))


def _stream_added(results: dict, row: dict, field: str) -> str:
    if not row:
        return "–"
    direct = find(results["streaming"]["rows"], target="direct", streams=row["streams"])
    return fmt(row[field] - direct[field]) if field in direct else "–"


# -- the document ------------------------------------------------------------------------------


def markdown(results: dict, before: dict | None = None) -> str:
    meta, plan = results["meta"], results["plan"]
    machine = "\n".join(f"| {k} | {v} |" for k, v in results["machine"].items())
    fast, fwd, large = results["503"], results["forward"], results["large"]
    sizes = fwd["sizes"]
    sections = [
        "# Benchmarks (issues 8 and 14)\n",
        f"`{meta['command']}` on {meta['date']}, {meta['minutes']:.1f} minutes"
        f"{' (quick run)' if meta['quick'] else ''}. Figures, not assertions: the machine is "
        "shared with other engineers' test runs, so each run carries `load1` (the 1-minute "
        "load average as it started, this bench included) and `others` (cores busy with "
        "processes that are not this bench's, averaged over the run). Ratios between rows are "
        "steadier than absolute figures. Raw figures: `bench/out/results.json`. `previous`: "
        f"the proxy before issue 14 (gthread workers, its own HTTP/1.1 client), commit "
        f"`{results.get('previous', {}).get('commit', '?')}`, run from its own checkout and "
        "venv with an upstream of its own (the same program), in this same run.\n",
        "## Machine\n", "| | |\n|---|---|\n" + machine + "\n",
        "## Goals\n", table(["goal", "figure", "verdict"], goals(results)) + "\n",
        "An added figure is the path's percentile minus direct's in the same run; when direct's "
        "own tail is long (the machine busy while it ran), an added p99 can come out near zero "
        "or negative: read it as within the noise, and see `p99 past chunk 5` in section 3.\n",
        *(["## Before / after\n", before_after(before, results)] if before else []),
        "![results](results.png)\n",
        "## 1. 503 fast path while provisioning\n",
        "`POST /api/chat` to a proxy still provisioning (its upstream command sleeps before "
        "listening; a fresh proxy for each number of clients, as the local provisioner gives "
        f"up after 60 s; phases before → after: {', '.join(fast['phases'])}), answered "
        f"{fast['status']} with "
        f"Retry-After {fast['retry_after']} and a {fast['body_bytes']}-byte JSON body; "
        f"bare-falcon sends the same body. {_method(plan)}\n",
        table_503(fast) + "\n",
        "## 2. Non-streaming forward\n",
        f"`POST /api/embed` ({sizes['embed']['request']} B request, "
        f"{sizes['embed']['response']} B answer) and `POST /api/show` "
        f"({sizes['show']['request']} B, {sizes['show']['response']} B). {_method(plan)} "
        "Added latency: the path's percentile minus direct's at the same clients; at many "
        "clients direct's own tail (a Python server, one thread per connection, sharing 2 "
        "cores with wrk) dominates p99, so added p99 there says little.\n",
        table_forward(fwd) + "\n",
        "## 3. Streaming\n",
        f"`POST /api/generate`, {results['streaming']['chunks']} NDJSON chunks, one every "
        f"{results['streaming']['interval_ms']:g} ms. 1 stream: {plan['sequential_streams']} "
        f"streams one after another; {plan['concurrent_streams']}: all at once (one client "
        "process reads them all on one event loop, bench/stream_client.py). Chunk delay: "
        "arrival minus the upstream's `created_at` for that chunk "
        "(same clock); `p99 past chunk 5`: the same without each stream's first five chunks, "
        "the 100 ms in which the other streams of the burst are still being set up (in a "
        "Python proxy each set-up costs CPU that delays the streams already running). "
        "Spread: (last − first arrival) / (last − first emission), 1.0 when "
        "chunks arrive as they are written and near 0 if held back to the end. The previous "
        "proxy's added figures are against the first upstream's direct row.\n",
        table_streaming(results["streaming"]) + "\n",
        "## 4. Large bodies\n",
        f"{large['bytes'] / 2**30:g} GiB: a blob upload (`POST /api/blobs/sha256:…`, "
        "Content-Length, the upstream hashes it) and a download (`GET /api/__download`, "
        "chunked, 64 KiB chunks). RSS sampled every 20 ms from /proc; growth is the largest "
        "of any one worker over its own RSS before the transfer.\n",
        table_large(large) + "\n",
        "## 5. Memory\n",
        "VmRSS per worker: idle after warm-up, the peak with "
        f"{plan['concurrent_streams']} streams open (scenario 3), idle after the run. Ours: 2 "
        "workers, one event loop each, a stream holds a connection; previous: 2 workers × 32 "
        "threads, streams moved by its worker's poller after their head. Client connections "
        "by worker: the established "
        "connections to the server's port each worker held (from /proc/net/tcp and its fds, "
        "every 100 ms) at the fullest moment of the 100-stream run; gunicorn's workers each "
        "accept from the shared socket.\n",
        table_memory(results) + "\n",
    ]
    if results.get("streams_1000"):
        many = results["streams_1000"]
        count = find(many["rows"], target="ours").get("streams")
        sections += [
            f"## 6. {count} streams at once (issue 14)\n",
            f"{count} `POST /api/generate` streams of {many['chunks']} NDJSON chunks, one every "
            f"{many.get('interval_ms', 20):g} ms, started evenly over "
            f"{many.get('ramp_s', 0):g} s (read by one event loop in a client process of its "
            "own), so that all are open at once (`upstream streams open`), through the "
            "shipped 2 workers; direct for reference. At the 20 ms of section 3, 1,000 streams "
            "would be 50,000 chunks a second, more than the fake upstream alone can make on "
            "2 cores (see `CPU µs a chunk`); 1,000 set-ups in the same millisecond hold each "
            "worker's loop for about a second (section 3 measures a burst started together). "
            "Chunk delay as in section 3; memory: the "
            "workers' summed RSS growth over their RSS before, divided by the streams. CPU a "
            "chunk: the user and system CPU the path's processes used during the run (the "
            "workers; for direct, the upstream itself) over the chunks relayed, a figure the "
            "machine's load moves less than the delays (on 2 cores the upstream's thousand "
            "threads, the workers and the client take turns).\n",
            table_many(many) + "\n",
        ]
    if results.get("fleet"):
        fleet = results["fleet"]
        sections += [
            "## 7. One, two and three GPU servers (issue 17)\n",
            f"`POST /api/generate` (`stream: false`) to a proxy with `PROXY_MIN_SERVERS` = "
            f"`PROXY_MAX_SERVERS` = 1, 2, 3 (a proxy of its own each, every server up before the "
            f"run): each server the fake Ollama generating at most {fleet['parallel']} answers at "
            f"once (`OLLAMA_NUM_PARALLEL`, the rest queued) of {fleet['think_s'] * 1e3:g} ms "
            f"each (`X-Fake-Think`), so one server serves about "
            f"{fleet['parallel'] / fleet['think_s']:g} a second. wrk at 1 and "
            f"{fleet['clients']} clients; direct: one such server without the proxy.\n",
            table_fleet(fleet) + "\n",
        ]
    if results.get("profiles"):
        sections += ["## Profiles (extra runs, py-spy --gil)\n", profiles(results)]
    return "\n".join(sections)


def write_markdown(results: dict, path: Path, before: dict | None = None) -> None:
    path.write_text(markdown(results, before))
