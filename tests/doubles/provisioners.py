"""Test doubles for what cannot run here: a provisioner whose bring-up a test controls."""

from __future__ import annotations

import threading

from proxy.provision.bake import Template
from proxy.provision.base import PRIMARY, Endpoint, ProvisionError


class GatedProvisioner:
    """Brings up `endpoint` when the test opens the gate; counts every call."""

    name = "gated"
    can_bake = False
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

    def observe_fleet(self) -> dict[str, Endpoint]:
        return {PRIMARY: self.endpoint} if self.exists else {}  # one server only

    def bring_up(self, progress, server: str = PRIMARY) -> Endpoint:
        assert server == PRIMARY, "a GatedProvisioner has one server"
        with self.lock:
            self.bring_ups += 1
        for sentence in self.sentences:
            progress(sentence)
        self.gate.wait(30)
        if self.fail_with:
            raise ProvisionError(self.fail_with)
        self.exists = True
        return self.endpoint

    def tear_down(self, progress, server: str = PRIMARY) -> None:
        with self.lock:
            self.tear_downs += 1
        self.exists = False

    def stop(self, progress, server: str = PRIMARY) -> None:
        with self.lock:
            self.stops += 1
        self.exists = False


class BakingProvisioner(GatedProvisioner):
    """A GatedProvisioner that bakes templates (as ExoscaleProvisioner.bake does, stopping the
    server) once `bake_gate` opens; `resume_after_bake` starts it again."""

    can_bake = True

    def __init__(self, endpoint: Endpoint | None = None):
        super().__init__(endpoint)
        self.bake_gate = threading.Event()
        self.bakes = 0
        self.resumes = 0
        self.bake_fails_with: str | None = None

    def bake(self, progress) -> Template:
        with self.lock:
            self.bakes += 1
        progress("taking a snapshot of the instance's disk")
        self.bake_gate.wait(30)
        if self.bake_fails_with:
            raise ProvisionError(self.bake_fails_with)
        return Template("tmpl-1", f"ollama-exoscale-test-{self.bakes}", "at-vie-2", "ubuntu")

    def resume_after_bake(self, progress) -> None:
        with self.lock:
            self.resumes += 1
