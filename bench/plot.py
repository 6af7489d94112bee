"""bench/results.png: one panel per scenario, from one run's results."""

from __future__ import annotations

from pathlib import Path

COLOURS = {"direct": "#7f7f7f", "nginx": "#2ca02c", "ours": "#1f77b4", "naive": "#d62728",
           "bare-falcon": "#9467bd", "previous": "#ff7f0e"}


def _bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str):
    """Grouped bars: one group per x label, one bar per series."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        colour = COLOURS.get(name, COLOURS.get(name.split(" ")[0]))
        ax.bar(xs, values, width, label=name, color=colour)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def _values(rows: list[dict], field: str, key: str, keys: list, **match) -> list[float]:
    out = []
    for k in keys:
        row = next((r for r in rows if r.get(key) == k
                    and all(r.get(m) == v for m, v in match.items())), {})
        out.append(row.get(field) or 0.0)
    return out


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    fast = results["503"]["rows"]
    clients = sorted({r["clients"] for r in fast})
    _bars(axes[0][0], [str(c) for c in clients],
          {t: _values(fast, "requests_per_s", "clients", clients, target=t)
           for t in ("ours", "previous", "bare-falcon")}, "requests/s",
          "1. 503 fast path, by clients")

    fwd = results["forward"]["rows"]
    paths = [p for p in ("direct", "nginx", "ours", "previous", "naive")
             if any(r["target"] == p for r in fwd)]
    clients = sorted({r["clients"] for r in fwd})
    for column, body in ((1, "embed"), (2, "show")):
        _bars(axes[0][column], [str(c) for c in clients],
              {p: _values(fwd, "requests_per_s", "clients", clients, target=p, body=body)
               for p in paths}, "requests/s", f"2. forward /api/{body}, by clients")
    _bars(axes[0][3], ["embed", "show"],
          {p: _values(fwd, "p50_ms", "body", ["embed", "show"], target=p, clients=clients[0])
           for p in paths}, "p50 latency, ms", f"2. forward p50 at {clients[0]} client")

    st = results["streaming"]["rows"]
    counts = sorted({r["streams"] for r in st})
    stream_paths = paths + sorted({r["target"] for r in st} - set(paths))  # variants last
    _bars(axes[1][0], [f"{c} stream(s)" for c in counts],
          {p: _values(st, "chunk_p99_ms", "streams", counts, target=p) for p in stream_paths},
          "per-chunk delay p99, ms", "3. streaming: chunk delay p99")
    _bars(axes[1][1], [f"{c} stream(s)" for c in counts],
          {p: _values(st, "ttfb_p50_ms", "streams", counts, target=p) for p in stream_paths},
          "time to first chunk p50, ms", "3. streaming: TTFB p50 (log scale)")
    axes[1][1].set_yscale("log")

    large = results["large"]["rows"]
    _bars(axes[1][2], ["upload", "download"],
          {p: _values(large, "mib_per_s", "direction", ["upload", "download"], target=p)
           for p in paths}, "MiB/s", f"4. {results['large']['bytes'] / 2**30:g} GiB bodies")

    _bars(axes[1][3], ["upload", "download"],
          {p: _values(large, "growth_mib", "direction", ["upload", "download"], target=p)
           for p in ("nginx", "ours", "previous", "naive")},
          "worker RSS growth, MiB", "4./5. proxy memory growth during the transfer")
    axes[1][3].set_yscale("symlog")

    meta = results["meta"]
    fig.suptitle(f"ollama-exoscale bench, {meta['date']} — shared 2-core machine, "
                 "see RESULTS.md for load", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
