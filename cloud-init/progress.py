#!/usr/bin/env python3
"""ollama-exoscale: the bring-up's progress, as a small JSON document the TLS front serves.

Run by the bring-up script on the GPU server (Python 3 ships with Ubuntu):
  ollama-exoscale-progress say PHASE DETAIL   the bring-up entered PHASE ("installing Docker")
  ollama-exoscale-progress pull MODEL         pull MODEL through Ollama's API, saying its percent
  ollama-exoscale-progress fail REASON        the bring-up gave up: phase "failed", `error` REASON

The proxy reads the document (GET /ollama-exoscale/status, with the bearer token) while it
waits, so its /status says "pulling llama3.2: 43%" instead of "starting". The document holds
no secret: {"phase", "detail", "percent", "since", "durations": {phase: seconds}}, and `error`
when the bring-up gave up (the proxy then removes the server).
"""

import json
import os
import sys
import time
import urllib.request

OLLAMA = os.environ.get("OLLAMA_URL", "http://127.0.0.1:11434")
STATUS = os.environ.get("STATUS_FILE", "/var/lib/ollama-exoscale/status.json")


def read() -> dict:
    try:
        with open(STATUS) as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def say(phase: str, detail: str, percent=None, error=None) -> None:
    """Write the document at once (atomically); the time spent in each phase is summed."""
    doc, now = read(), time.time()
    durations = doc.get("durations") or {}
    if doc.get("phase") and doc.get("phase") != phase:
        spent = now - doc.get("since", now)
        durations[doc["phase"]] = round(durations.get(doc["phase"], 0) + spent, 1)
    since = doc.get("since", now) if doc.get("phase") == phase else now
    doc = {"phase": phase, "detail": detail, "percent": percent, "since": since,
           "durations": durations}
    if error:
        doc["error"] = error
    os.makedirs(os.path.dirname(STATUS), exist_ok=True)
    scratch = STATUS + ".tmp"
    with open(scratch, "w") as file:
        json.dump(doc, file)
    os.chmod(scratch, 0o644)  # the front's workers read it; it holds no secret
    os.replace(scratch, STATUS)


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
    if len(argv) == 2 and argv[0] == "pull":
        return pull(argv[1])
    if len(argv) == 2 and argv[0] == "fail":
        say("failed", argv[1], error=argv[1])
        return 0
    print("usage: ollama-exoscale-progress say PHASE DETAIL | pull MODEL | fail REASON",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
