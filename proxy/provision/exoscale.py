"""The `exoscale` provisioner: the GPU servers are the stack the Pulumi program declares.

Each call names a server (gpu, gpu-1, ...). `bring_up` runs `pulumi up` declaring the servers
the stack holds plus that one running, `stop` the same with it `stopped`, `tear_down` without
it; the last one goes as before fleets: `pulumi destroy` (or, with a kept model volume,
`pulumi up` without the instance). `observe_fleet` reads the stack's outputs, so a restarted
proxy finds every server that exists, running or stopped; `observe` the primary. The
endpoints (URL, token, pinned certificate) come only from the stack's outputs. Calls may come
from several threads: one lock runs the stack's updates one at a time, and each computes the
servers to declare under it, so that no update forgets a server another has just added.

A crash mid-update leaves two things behind: the stack's lock, and a "pending create" for an
object the cloud may have made while nobody was waiting. A lock is cleared (`pulumi cancel`)
only when it is stale: taken on this host by a process that is gone, or older than any update
of ours can run. Pending creates are repaired before any update, so a GPU server is never
orphaned nor created twice: an instance the cloud did create (any server's) is found by name
and adopted into the state, the rest are dropped, and the stack is refreshed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from infra import repair
from infra.errors import AutomationError, StackLocked, UpdateFailed
from infra.repair import INSTANCE_TYPE
from infra.runner import ServerOutputs, StackOutputs, StackRunner
from proxy.config import Config, ConfigError
from proxy.provision.bake import Template, TemplateBaker, template_name
from proxy.provision.base import PRIMARY, Endpoint, Progress, ProvisionError, server_index

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
        self._updates = threading.Lock()  # held for each update of the stack, and its repair

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
        """The primary, as the stack's outputs say (None: it does not exist)."""
        outputs = self.observe_outputs()
        primary = outputs.server(PRIMARY) if outputs else None
        return _endpoint(outputs, primary) if outputs and primary else None

    def observe_fleet(self) -> dict[str, Endpoint]:
        outputs = self.observe_outputs()
        if outputs is None:
            return {}
        return {name: _endpoint(outputs, server) for name, server in outputs.servers.items()}

    def bring_up(self, progress: Progress, server: str = PRIMARY) -> Endpoint:
        """Create the server, or start it if stopped (a declarative `state` change); the
        stack's other servers are declared as they are."""
        outputs = self._run(server, lambda: self._declare(progress, server, "running"),
                            progress)
        found = outputs.server(server) if outputs else None
        if outputs is None or found is None:
            raise ProvisionError(f"the Pulumi program exported no server {server}; "
                                 "check infra/program.py")
        return _endpoint(outputs, found)

    def stop(self, progress: Progress, server: str = PRIMARY) -> None:
        """Keep the server and its disk, stopped: `pulumi up` with its state stopped."""
        self._run(server, lambda: self._declare(progress, server, "stopped"), progress)

    def tear_down(self, progress: Progress, server: str = PRIMARY) -> None:
        """Remove the server: `pulumi up` without it; the last one goes as before fleets."""
        self._run(server, lambda: self._remove(progress, server), progress)

    def bake(self, progress: Progress) -> Template:
        """A private template of the primary (proxy/provision/bake.py): it is left stopped.
        No update runs meanwhile: its refresh would read the primary stopped outside Pulumi,
        and the update would start it again under the snapshot."""
        with self._updates:
            baker, instance_id = self._baker()
            return baker.bake(instance_id, template_name(), progress)

    def resume_after_bake(self, progress: Progress) -> None:
        """Start the server a bake stopped (outside Pulumi, whose state still says running)."""
        baker, instance_id = self._baker()
        baker.start_if_stopped(instance_id, progress)

    def _baker(self) -> tuple[TemplateBaker, str]:
        outputs = self.observe_outputs()
        primary = outputs.server(PRIMARY) if outputs else None
        if primary is None:
            raise ProvisionError("there is no GPU server to bake a template from")
        zone = self.runner.settings.zone if self.runner.settings else "at-vie-2"
        return TemplateBaker.from_env(self.runner.env, zone), primary.instance_id

    def observe_outputs(self) -> StackOutputs | None:
        try:
            return self.runner.outputs()
        except AutomationError as exc:
            raise ProvisionError(str(exc)) from None

    def _declare(self, progress: Progress, server: str, state: str) -> StackOutputs | None:
        """`pulumi up` with the servers the stack holds, `server` in `state`."""
        existing = repair.instance_states(self._state_after_repair(progress))
        if state == "stopped" and server not in existing:
            progress(f"GPU server {server} does not exist: nothing to stop")
            return None
        # The others may be serving: new user data reaches each when it is itself made (a
        # server being stopped is only stopped: it is made anew when it starts again).
        kept = set(existing) - {server} if state == "running" else set(existing)
        outputs = self.runner.up(progress, servers={**existing, server: state}, kept=kept)
        if outputs is None:
            raise UpdateFailed("the Pulumi program declared no instance; check infra/program.py")
        return outputs

    def _remove(self, progress: Progress, server: str) -> None:
        deployment = self._state_after_repair(progress)
        existing = repair.instance_states(deployment)
        others = {name: state for name, state in existing.items() if name != server}
        if others:
            if server in existing:
                # It goes, with its model volume; the others stay as they were made.
                self.runner.up(progress, servers=others, kept=others)
            return
        if self.runner.settings is not None and self.runner.settings.model_volume_gb:
            # Only the instance goes: its models' volume (and token, firewall) wait for the next;
            # so does a volume kept before (none of a server that never was is made).
            kept = set(repair.volume_servers(deployment)) | ({server} & set(existing))
            self.runner.up(progress, instance_state="absent",
                           servers=dict.fromkeys(kept, "running") if kept else None)
        else:
            self.runner.destroy(progress)

    def _run(self, server: str, operation: Callable[[], T], progress: Progress) -> T:
        """Run `operation` about `server` alone (one stack: its updates one at a time,
        whichever thread asks); if a stale lock stops it, clear the lock, repair, and run it
        again."""
        try:
            server_index(server)
        except ValueError as exc:
            raise ProvisionError(str(exc)) from None
        with self._updates:
            return self._run_alone(operation, progress)

    def _run_alone(self, operation: Callable[[], T], progress: Progress) -> T:
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

    def _state_after_repair(self, progress: Progress) -> dict:
        """The stack's state (its deployment), once an interrupted update's pending creates are
        repaired: else an update would not know a pending instance."""
        deployment = self.runner.export_state().deployment or {}
        if repair.pending_creates(deployment):
            self._repair(progress)
            deployment = self.runner.export_state().deployment or {}
        return deployment

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


def _endpoint(outputs: StackOutputs, server: ServerOutputs) -> Endpoint:
    """One server's endpoint: its address and state, the stack's token and certificate."""
    return Endpoint(
        url=server.remote_url,
        token=outputs.token,
        ca_cert=outputs.tls_certificate,
        server_hostname=outputs.tls_server_name,
        instance_status=server.instance_state,
    )
