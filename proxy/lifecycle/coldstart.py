"""Cold starts: each stage's seconds, where the GPU server's own stages ran side by side,
and what the next cold start of a mode should take.

A cold start's stages end at marks the reconciler sets: the stack update (`server`), the boot
until Ollama answers (`answers`), the model pull until /api/tags lists every model (`listed`),
the model load into GPU memory (`loaded`).
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

from proxy.lifecycle.state import State

log = logging.getLogger("ollama_exoscale.lifecycle")

COLD_STARTS_KEPT = 20
STAGES = (("stack_update", "server"), ("boot", "answers"), ("model_pull", "listed"),
          ("model_load", "loaded"))


def recorded(state: State, now: float) -> dict[str, Any]:
    """The document's cold-start records with the one ending now added (none if this ready
    followed no cold start of ours: an adopted server)."""
    started = state.provisioning_started_at
    if not started:
        return {}
    timeline: dict[str, Any] = cold_start_timeline(state.marks, started)
    log.info("ready after a cold start of %.1f s (%s)", now - started,
             ", ".join(f"{k} {v:.1f} s" for k, v in timeline.items()))
    if state.server_stages:
        timeline["on_server"] = state.server_stages  # the server's own phases
    if state.server_spans:
        timeline["on_server_spans"] = state.server_spans  # [start, end] s, overlapping
    if state.cold_mode:
        timeline["mode"] = state.cold_mode
    return {"cold_starts": (*state.cold_starts, round(now - started, 3))[-COLD_STARTS_KEPT:],
            "timelines": (*state.timelines, timeline)[-COLD_STARTS_KEPT:]}


def cold_start_timeline(marks: dict[str, float], started: float) -> dict[str, float]:
    """Seconds each stage of a cold start took; a stage whose end went unseen is left out."""
    timeline, since = {}, started
    for stage, mark in STAGES:
        if mark in marks:
            timeline[stage] = round(max(0.0, marks[mark] - since), 3)
            since = marks[mark]
    return timeline


def server_spans(progress: dict[str, Any]) -> dict[str, list[float]]:
    """Each stage of the server's progress document (cloud-init/progress.py) as [start, end]
    seconds from the first stage's start: stages on two tracks overlap. Malformed ones are
    left out (the document comes from the server)."""
    stages = progress.get("stages")
    if not isinstance(stages, dict):
        return {}
    spans = {str(name): (stage.get("start"), stage.get("end")) for name, stage in stages.items()
             if isinstance(stage, dict)}
    spans = {name: (start, end) for name, (start, end) in spans.items()
             if isinstance(start, (int, float)) and isinstance(end, (int, float)) and end >= start}
    first = min((start for start, _ in spans.values()), default=0.0)
    return {name: [round(start - first, 1), round(end - first, 1)]
            for name, (start, end) in sorted(spans.items(), key=lambda item: item[1])}


def cold_start_estimate(timelines: tuple[dict[str, Any], ...], mode: str) -> dict[str, Any]:
    """What the next cold start (of `mode`) should take, stage by stage: the median of each
    proxy stage over the recorded cold starts of that mode (none recorded: no figures)."""
    same = [t for t in timelines if t.get("mode") == mode]
    stages = [stage for stage, _ in STAGES if any(stage in t for t in same)]
    medians = {stage: round(statistics.median(t[stage] for t in same if stage in t), 1)
               for stage in stages}
    return {"mode": mode, "from_cold_starts": len(same), "stages": medians or None,
            "total": round(sum(medians.values()), 1) if medians else None}


def median_timeline(timelines: tuple[dict[str, Any], ...]) -> dict[str, float] | None:
    """Each stage's median over the recent cold starts that saw it (the proxy's stages)."""
    stages = [stage for timeline in timelines for stage, seconds in timeline.items()
              if isinstance(seconds, (int, float))]
    return {
        stage: round(statistics.median(t[stage] for t in timelines if stage in t), 3)
        for stage in dict.fromkeys(stages)
    } or None
