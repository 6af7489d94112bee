"""Baking, one of the reconciler's operations: a template of the ready server while demand is
held (503) until it serves again, or, with nobody to serve, goes idle (`ollama-exoscale bake`).
"""

from __future__ import annotations

import logging
import time

import requests

from proxy.lifecycle.operations import Operations
from proxy.lifecycle.state import Phase
from proxy.provision.base import Endpoint, ProvisionError
from proxy.upstream.probe import delete_model

log = logging.getLogger("ollama_exoscale.lifecycle")


class Baking(Operations):
    """The bake operations of the Reconciler (which provides what Operations declares)."""

    def _bake(self, bake_at: float, models: bool) -> None:
        """Stop the ready server, snapshot it, promote the snapshot to a private template, then
        serve again (demand came meanwhile, or the server had served) or go idle."""
        state = self._current
        now = time.time()
        # With idle action stop the server always starts again (then stops when idle, through
        # the stack): a stop outside Pulumi would leave its state saying `running`.
        serve = self._activity_since(state.ready_since) or self.config.idle_action == "stop"
        self._commit(phase=Phase.BAKING, phase_since=now, bake_handled=bake_at,
                     bake_models=models, bake_serve=serve, bake_error=None,
                     **self._detail(Phase.BAKING, "baking a template of the GPU server", now))
        if not self._drain(now + self.config.drain_timeout):
            return
        try:
            if not self.provisioner.can_bake:
                raise ProvisionError(f"the {self.provisioner.name} provisioner cannot bake a "
                                     "template: bake needs PROXY_PROVISIONER=exoscale")
            if not models:
                self._delete_models(state.endpoint)
            template = self.provisioner.bake(self._progress)
        except ProvisionError as exc:
            log.error("the bake failed: %s", exc)
            self._commit(bake_error=str(exc))
        else:
            self._progress(f"made the private template {template.name} in {template.zone}")
            self._commit(bake_template=template.name)
        self._after_bake()

    def _bake_resumed(self) -> None:
        """A bake interrupted (a crash, the lease moved): what it made is not known here, so it
        counts as failed; the server is brought back as the bake would have."""
        self._commit(bake_error=self._current.bake_error or
                     "the bake was interrupted (the proxy restarted); run bake again")
        self._after_bake()

    def _after_bake(self) -> None:
        """Back to serving (the instance started again) or, with nobody to serve, idle."""
        state = self._current
        demand_since = max((r.wanted_at for r in self.store.reports()), default=0.0)
        serve = state.bake_serve or demand_since > state.phase_since
        try:
            if not serve and self.config.idle_action != "stop":
                self._commit(removal="destroy", removal_reason="idle after a bake")
                self._remove()
                return
            if self.provisioner.can_bake:  # it stopped the server; the stack says `running`
                self.provisioner.resume_after_bake(self._progress)
        except ProvisionError as exc:
            self._fail(f"starting the GPU server after the bake failed: {exc}", teardown=True)
            return
        self._commit(phase=Phase.STARTING, phase_since=time.time(),
                     detail="the bake is over; waiting for Ollama and the model")
        self._await_ready()

    def _delete_models(self, endpoint: Endpoint | None) -> None:
        """Without --models the template holds no model: Ollama deletes them before the
        snapshot (the next server pulls them, or its volume has them)."""
        if endpoint is None:
            return
        for model in self.config.models:
            self._progress(f"deleting {model} from the disk (bake without --models)")
            try:
                delete_model(self.sessions, endpoint, model)
            except requests.RequestException as exc:
                raise ProvisionError(f"deleting {model} before the snapshot failed "
                                     f"({type(exc).__name__})") from None
