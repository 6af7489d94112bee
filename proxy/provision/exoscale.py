"""The `exoscale` provisioner: the GPU server is the stack the Pulumi program declares.

`bring_up` runs `pulumi up`, `stop` runs `pulumi up` with the instance's state `stopped`,
`tear_down` runs `pulumi destroy` (or, with a kept model volume, `pulumi up` without the
instance), `observe` reads the stack's outputs, so a restarted proxy
finds the server that exists, running or stopped. The endpoint (URL, token, pinned
certificate) comes only from the stack's outputs.

A crash mid-update leaves two things behind: the stack's lock, and a "pending create" for an
object the cloud may have made while nobody was waiting. A lock is cleared (`pulumi cancel`)
only when it is stale: taken on this host by a process that is gone, or older than any update
of ours can run. Pending creates are repaired before any update, so a GPU server is never
orphaned nor created twice: an instance the cloud did create is found by name and adopted into
the state, the rest are dropped, and the stack is refreshed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from infra.errors import AutomationError, StackLocked, UpdateFailed
from infra.repair import INSTANCE_TYPE
from infra.runner import StackOutputs, StackRunner
from proxy.config import Config, ConfigError
from proxy.provision.bake import Template, TemplateBaker, template_name
from proxy.provision.base import Endpoint, Progress, ProvisionError

log = logging.getLogger("ollama_exoscale.exoscale")

T = TypeVar("T")
# A lock older than this is stale even if its holder cannot be checked (another host): an `up`
# of ours takes minutes; cloud-init and the model pull happen after Pulumi is done.
STALE_LOCK_AFTER = 3 * 3600.0


class ExoscaleProvisioner:
    name = "exoscale"
    can_bake = True
    typical_cold_start = 420.0  # create and boot (~2 min), drivers and Docker, the model pull

    def __init__(self, runner: StackRunner, *, stale_lock_after: float = STALE_LOCK_AFTER):
        self.runner = runner
        self.stale_lock_after = stale_lock_after

    @classmethod
    def from_config(cls, config: Config) -> ExoscaleProvisioner:
        """The provisioner for the proxy's configuration (Pulumi CLI from PATH or ~/.pulumi)."""
        from infra.settings import Settings, SettingsError

        try:
            settings = Settings.from_env(config.env)
        except SettingsError as exc:
            raise ConfigError(str(exc)) from None
        return cls(StackRunner(settings, config.state_dir, config.env))

    def cold_start_mode(self, stopped: bool) -> str:
        if stopped:
            return "stop"  # the same instance and disk: drivers, image and models are there
        volume = self.runner.settings is not None and self.runner.settings.model_volume_gb
        return "destroy + volume" if volume else "destroy"

    def observe(self) -> Endpoint | None:
        try:
            outputs = self.runner.outputs()
        except AutomationError as exc:
            raise ProvisionError(str(exc)) from None
        return _endpoint(outputs) if outputs else None

    def bring_up(self, progress: Progress) -> Endpoint:
        """Create the server, or start the stopped one (a declarative `state` change)."""
        return _endpoint(self._run(lambda: self._up(progress, "running"), progress))

    def stop(self, progress: Progress) -> None:
        """Keep the server and its disk, stopped: `pulumi up` with the instance's state stopped."""
        self._run(lambda: self._up(progress, "stopped"), progress)

    def tear_down(self, progress: Progress) -> None:
        self._run(lambda: self._destroy(progress), progress)

    def bake(self, progress: Progress) -> Template:
        """A private template of the server (proxy/provision/bake.py): it is left stopped."""
        baker, instance_id = self._baker()
        return baker.bake(instance_id, template_name(), progress)

    def resume_after_bake(self, progress: Progress) -> None:
        """Start the server a bake stopped (outside Pulumi, whose state still says running)."""
        baker, instance_id = self._baker()
        baker.start_if_stopped(instance_id, progress)

    def _baker(self) -> tuple[TemplateBaker, str]:
        outputs = self.observe_outputs()
        if outputs is None:
            raise ProvisionError("there is no GPU server to bake a template from")
        zone = self.runner.settings.zone if self.runner.settings else "at-vie-2"
        return TemplateBaker.from_env(self.runner.env, zone), outputs.instance_id

    def observe_outputs(self) -> StackOutputs | None:
        try:
            return self.runner.outputs()
        except AutomationError as exc:
            raise ProvisionError(str(exc)) from None

    def _up(self, progress: Progress, state: str) -> StackOutputs:
        self._repair_if_interrupted(progress)
        outputs = self.runner.up(progress, instance_state=state)
        if outputs is None:
            raise UpdateFailed("the Pulumi program declared no instance; check infra/program.py")
        return outputs

    def _destroy(self, progress: Progress) -> None:
        self._repair_if_interrupted(progress)  # else destroy would not know a pending instance
        if self.runner.settings is not None and self.runner.settings.model_volume_gb:
            # Only the instance goes: the models' volume (and token, firewall) wait for the next.
            self.runner.up(progress, instance_state="absent")
        else:
            self.runner.destroy(progress)

    def _run(self, operation: Callable[[], T], progress: Progress) -> T:
        """Run `operation`; if a stale lock stops it, clear the lock, repair, and run it again."""
        try:
            try:
                return operation()
            except StackLocked as locked:
                self._clear_stale_lock(locked, progress)
                self._repair(progress)
            return operation()
        except AutomationError as exc:
            raise ProvisionError(str(exc)) from None

    def _clear_stale_lock(self, locked: StackLocked, progress: Progress) -> None:
        holders = locked.holders
        if not holders or not all(h.is_stale(max_age=self.stale_lock_after) for h in holders):
            raise ProvisionError(str(locked))
        who = "; ".join(str(h) for h in holders)
        progress(f"clearing the stack lock left by an update that is gone ({who})")
        log.warning("clearing a stale Pulumi lock: %s", who)
        self.runner.cancel()

    def _repair_if_interrupted(self, progress: Progress) -> None:
        if self.runner.pending_creates():
            self._repair(progress)

    def _repair(self, progress: Progress) -> None:
        """Adopt the instances interrupted creates did make, drop the other creates, refresh."""
        for pending in self.runner.pending_creates():
            if pending.type != INSTANCE_TYPE or not pending.name:
                continue
            progress(f"an update was interrupted while creating instance {pending.name}; "
                     "looking for it in the cloud")
            found = self.runner.find_instances(pending)
            if not found:
                continue
            progress(f"adopting instance {found[0]} into the stack")
            self.runner.adopt(pending, found[0])
            if len(found) > 1:
                others = ", ".join(found[1:])
                log.error("more instances named %s exist (%s); delete them by hand", pending.name,
                          others)
                progress(f"more instances named {pending.name} exist ({others}); "
                         "delete them by hand")
        progress("refreshing the stack after an interrupted update")
        self.runner.refresh(progress, clear_pending_creates=True)


def _endpoint(outputs: StackOutputs) -> Endpoint:
    return Endpoint(
        url=outputs.remote_url,
        token=outputs.token,
        ca_cert=outputs.tls_certificate,
        server_hostname=outputs.tls_server_name,
        instance_status=outputs.instance_state,
    )
