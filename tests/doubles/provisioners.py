"""Test doubles for what cannot run here: a provisioner whose bring-up a test controls."""

from __future__ import annotations

import threading

from proxy.provision.base import Endpoint, ProvisionError


class GatedProvisioner:
    """Brings up `endpoint` when the test opens the gate; counts every call."""

    name = "gated"
    typical_cold_start = 30.0

    def __init__(self, endpoint: Endpoint | None = None, *, open_gate: bool = True):
        self.endpoint = endpoint
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()
        self.exists = False
        self.fail_with: str | None = None
        self.bring_ups = 0
        self.tear_downs = 0
        self.stops = 0
        self.sentences = ["creating the test server"]  # progress that bring-up reports
        self.lock = threading.Lock()

    def cold_start_mode(self, stopped: bool) -> str:
        return "restart" if stopped else "create"

    def observe(self) -> Endpoint | None:
        return self.endpoint if self.exists else None

    def bring_up(self, progress) -> Endpoint:
        with self.lock:
            self.bring_ups += 1
        for sentence in self.sentences:
            progress(sentence)
        self.gate.wait(30)
        if self.fail_with:
            raise ProvisionError(self.fail_with)
        self.exists = True
        return self.endpoint

    def tear_down(self, progress) -> None:
        with self.lock:
            self.tear_downs += 1
        self.exists = False

    def stop(self, progress) -> None:
        with self.lock:
            self.stops += 1
        self.exists = False
