#!/usr/bin/env python3
"""ollama-exoscale: the bring-up's progress, as a small JSON document the TLS front serves.

Run by the bring-up script on the GPU server (Python 3 ships with Ubuntu):
  ollama-exoscale-progress say STAGE DETAIL   STAGE begins (or goes on) on this track
  ollama-exoscale-progress end STAGE          STAGE has ended (the last one of a track)
  ollama-exoscale-progress pull MODEL         pull MODEL through Ollama's API, saying its percent
  ollama-exoscale-progress ready              the bring-up is done: every stage ends
  ollama-exoscale-progress fail REASON        the bring-up gave up: phase "failed", `error` REASON

Stages run on tracks ($PROGRESS_TRACK, default "main"), one at a time on each: a `say` ends the
track's previous stage. The downloads (the Ollama image, the models) run on their own track
while the driver installs on the main one, so two stages can run side by side; each keeps its
own start and end. The proxy reads the document (GET /ollama-exoscale/status, with the bearer
token) while it waits, so its /status says "installing the NVIDIA driver; pulling llama3.2: 43%"
instead of "starting". The document holds no secret:
  {"phase", "detail", "percent", "since", "durations": {stage: seconds},
   "stages": {stage: {"track", "start", "end", "detail"}}, "error" (when the bring-up gave up)}
Two processes write it at once (the tracks): each change is made under a lock.
"""

import fcntl
import json
import os
import sys
import time
import urllib.request

OLLAMA = os.environ.get("OLLAMA_URL", "http://127.0.0.1:11434")
STATUS = os.environ.get("STATUS_FILE", "/var/lib/ollama-exoscale/status.json")
TRACK = os.environ.get("PROGRESS_TRACK", "main")


def read() -> dict:
    try:
        with open(STATUS) as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def write(doc: dict) -> None:
    """Atomically: the front may read it at any moment."""
    scratch = STATUS + ".tmp"
    with open(scratch, "w") as file:
        json.dump(doc, file)
    os.chmod(scratch, 0o644)  # the front's workers read it; it holds no secret
    os.replace(scratch, STATUS)


def change(edit) -> None:
    """Read, edit and write the document under an exclusive lock (the tracks write at once)."""
    os.makedirs(os.path.dirname(STATUS), exist_ok=True)
    with open(STATUS + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = read()
        edit(doc, time.time())
        write(doc)


def _end(stages: dict, name: str, now: float) -> None:
    stage = stages.get(name)
    if stage and stage.get("end") is None:
        stage["end"] = round(now, 3)


def _end_all(stages: dict, now: float) -> None:
    """The bring-up is over (ready, or given up): no stage runs on."""
    for name in stages:
        _end(stages, name, now)


def _summarise(doc: dict, now: float) -> None:
    """The fields read before stages had spans: the latest stage, the running stages' details
    joined, and the seconds of each stage."""
    stages = doc.get("stages") or {}
    running = [s for s in stages.values() if s.get("end") is None]
    latest = max(stages, key=lambda name: stages[name]["start"], default=None)
    doc["phase"] = doc.get("phase") if doc.get("error") else latest
    doc["detail"] = "; ".join(s["detail"] for s in sorted(running, key=lambda s: s["start"])) \
        or (stages[latest]["detail"] if latest else "")
    doc["since"] = stages[latest]["start"] if latest else now
    doc["durations"] = {name: round((s["end"] if s.get("end") is not None else now) - s["start"],
                                    1) for name, s in stages.items()}


def say(stage: str, detail: str, percent=None) -> None:
    """STAGE begins on this track (ending the track's previous stage), or goes on."""
    def edit(doc: dict, now: float) -> None:
        stages = doc.setdefault("stages", {})
        for name, other in stages.items():
            if name != stage and other.get("track") == TRACK:
                _end(stages, name, now)
        current = stages.get(stage)
        if current is None or current.get("end") is not None:  # new, or begun again
            earlier = (current["end"] - current["start"]) if current else 0.0
            current = stages[stage] = {"track": TRACK, "start": round(now - earlier, 3),
                                       "end": None}
        current["detail"] = detail
        if percent is not None or stage == doc.get("phase"):
            doc["percent"] = percent
        _summarise(doc, now)

    change(edit)


def end(stage: str) -> None:
    def edit(doc: dict, now: float) -> None:
        _end(doc.setdefault("stages", {}), stage, now)
        _summarise(doc, now)

    change(edit)


def fail(reason: str) -> None:
    def edit(doc: dict, now: float) -> None:
        _end_all(doc.setdefault("stages", {}), now)
        doc["error"] = reason
        doc["phase"] = "failed"
        _summarise(doc, now)
        doc["detail"] = reason

    change(edit)


def ready() -> None:
    """The bring-up is done: every stage ends, the phase is `ready`."""
    def edit(doc: dict, now: float) -> None:
        _end_all(doc.setdefault("stages", {}), now)
        _summarise(doc, now)
        doc.update(phase="ready", detail="ready", since=now, percent=None)

    change(edit)


def pull(model: str) -> int:
    """Ollama's streamed pull; its percent into the document whenever it changes."""
    request = urllib.request.Request(
        OLLAMA + "/api/pull", data=json.dumps({"model": model}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    shown = None
    with urllib.request.urlopen(request, timeout=600) as answer:  # 600 s between two lines
        for line in answer:
            event = json.loads(line)
            if "error" in event:
                print(f"pulling {model}: {event['error']}", file=sys.stderr)
                return 1
            total, completed = event.get("total"), event.get("completed")
            if total and completed is not None:
                percent = int(100 * completed / total)
                detail = f"pulling {model}: {percent}%"
            else:
                percent, detail = None, f"pulling {model}: {event.get('status', '')}"
            if detail != shown:
                say("pulling", detail, percent)
                shown = detail
    say("pulling", f"pulled {model}", 100)
    return 0


def main(argv: list) -> int:
    if len(argv) == 3 and argv[0] == "say":
        say(argv[1], argv[2])
        return 0
    if len(argv) == 2 and argv[0] == "end":
        end(argv[1])
        return 0
    if len(argv) == 2 and argv[0] == "pull":
        return pull(argv[1])
    if argv == ["ready"]:
        ready()
        return 0
    if len(argv) == 2 and argv[0] == "fail":
        fail(argv[1])
        return 0
    print("usage: ollama-exoscale-progress say STAGE DETAIL | end STAGE | pull MODEL | "
          "ready | fail REASON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
