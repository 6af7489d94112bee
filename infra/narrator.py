"""Pulumi engine events as sentences for a person, with the errors the engine reports.

A verb's `Narrator` is its `on_event` callback: each step ("creating exoscale:ComputeInstance
gpu (3/7, 41 s)"), warning and error goes to the `progress` callback and to the log
"ollama_exoscale.pulumi", scrubbed; the counts and errors are kept for the verb's result.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from pulumi.automation.events import EngineEvent, OpType

from proxy.provision.base import Progress

log = logging.getLogger("ollama_exoscale.pulumi")


_VERBS = {
    OpType.CREATE: "creating", OpType.UPDATE: "updating", OpType.DELETE: "deleting",
    OpType.REPLACE: "replacing", OpType.CREATE_REPLACEMENT: "creating a replacement for",
    OpType.DELETE_REPLACED: "deleting the replaced", OpType.READ: "reading",
    OpType.REFRESH: "refreshing", OpType.IMPORT: "importing",
}
_DONE = {
    "create": "created", "update": "updated", "delete": "deleted", "replace": "replaced",
    "same": "unchanged", "refresh": "refreshed", "read": "read", "import": "imported",
}


class Narrator:
    """Engine events → sentences for a person; keeps the errors the engine reports.

    The SDK calls it on a background thread and swallows its exceptions, so it logs its own.
    """

    def __init__(self, verb: str, progress: Progress, scrub: Callable[[str], str],
                 total: int | None):
        self.verb = verb
        self.progress = progress
        self.scrub = scrub
        self.total = total
        self.started = time.monotonic()
        self.resources = 0
        self.changes: Counter[str] = Counter()
        self.errors: list[str] = []

    def __call__(self, event: EngineEvent) -> None:
        try:
            self._handle(event)
        except Exception:  # noqa: BLE001 never let a progress callback break an update
            log.exception("could not report a Pulumi engine event")

    def _handle(self, event: EngineEvent) -> None:
        if event.resource_pre_event:
            self._step(event.resource_pre_event.metadata)
        elif event.diagnostic_event:
            self._diagnostic(event.diagnostic_event)
        elif event.summary_event:
            self._summary()

    def _step(self, metadata: Any) -> None:
        if metadata.type == "pulumi:pulumi:Stack" or metadata.type.startswith("pulumi:providers:"):
            return
        if metadata.op == OpType.REFRESH and self.verb != "refresh":
            return  # an update's own refresh: the steps that follow are the news
        self.resources += 1
        self.changes[metadata.op.value] += 1
        if metadata.op == OpType.SAME:
            return
        if self.verb == "preview":
            self._say(f"would {metadata.op.value} {_short_type(metadata.type)} "
                      f"{_name(metadata.urn)}")
            return
        count = f"{self.resources}/{self.total}" if self.total else f"{self.resources}"
        elapsed = int(time.monotonic() - self.started)
        verb = _VERBS.get(metadata.op, str(metadata.op.value))
        self._say(f"{verb} {_short_type(metadata.type)} {_name(metadata.urn)} "
                  f"({count}, {elapsed} s)")

    def _diagnostic(self, diagnostic: Any) -> None:
        message = " ".join(self.scrub(diagnostic.message or "").split())
        if not message or diagnostic.severity not in ("error", "warning"):
            return
        where = f"{_short_type(_urn_type(diagnostic.urn))} {_name(diagnostic.urn)}: " \
            if diagnostic.urn else ""
        if diagnostic.severity == "error":
            self.errors.append(f"{where}{message}")
            self._say(f"error: {where}{message}", logging.ERROR)
        else:
            self._say(f"warning: {where}{message}", logging.WARNING)

    def _summary(self) -> None:
        elapsed = int(time.monotonic() - self.started)
        parts = [f"{n} {self._counted(op)}" for op, n in sorted(self.changes.items())]
        done = ", ".join(parts) or "nothing to do"
        self._say(f"pulumi {self.verb} finished in {elapsed} s: {done}")

    def _counted(self, op: str) -> str:
        """'created', or 'to create' for a preview, whose counts are plans."""
        if self.verb == "preview" and op != "same":
            return f"to {op}"
        return _DONE.get(op, op)

    def _say(self, sentence: str, level: int = logging.INFO) -> None:
        sentence = self.scrub(sentence)
        log.log(level, "%s", sentence)
        try:
            self.progress(sentence)
        except Exception:  # noqa: BLE001 the caller's callback must not break the update
            log.exception("progress callback failed")


def _short_type(token: str) -> str:
    """'exoscale:index/computeInstance:ComputeInstance' → 'exoscale:ComputeInstance'."""
    parts = token.split(":")
    return f"{parts[0]}:{parts[-1]}" if len(parts) >= 3 else token


def _urn_type(urn: str) -> str:
    parts = urn.split("::")
    return parts[2].split("$")[-1] if len(parts) >= 4 else ""


def _name(urn: str) -> str:
    return urn.split("::")[-1] if urn else ""
