"""Runs the Pulumi program through the Automation API: a few verbs, our own errors, no secrets out.

`StackRunner` wraps `pulumi.automation` the way that module wraps the CLI: `up`, `destroy`,
`preview`, `refresh`, `outputs`, `cancel`, plus the primitives a crash repair needs
(`pending_creates`, `find_instances`, `adopt`; the state edits themselves are infra/repair.py).
It keeps a persistent work dir and a backend (infra/workspace.py). Engine events become
sentences for a person (infra/narrator.py); failures raise the named errors of infra/errors.py,
whose messages say what to install or set and never carry a secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pulumi.automation as auto
from pulumi.automation.errors import CommandError

from infra import repair
from infra.errors import AutomationError, UpdateFailed, classify
from infra.narrator import Narrator, Progress
from infra.outputs import OUTPUT_NAMES, ServerOutputs, StackOutputs
from infra.repair import PendingCreate
from infra.settings import PROJECT
from infra.workspace import (
    DEFAULT_STACK,
    backend_url,
    cli_env,
    find_pulumi,
    require_credentials,
    required_plugins,
    scrubber,
    selecting,
)

if TYPE_CHECKING:
    from infra.settings import Settings

log = logging.getLogger("ollama_exoscale.pulumi")
__all__ = ["OUTPUT_NAMES", "ServerOutputs", "StackOutputs", "StackRunner"]

class StackRunner:
    """The stack that holds the GPU servers, and the verbs to change it.

    Call it from one thread at a time (the lifecycle's operation thread): each verb runs the
    Pulumi CLI and blocks until it ends.
    """

    def __init__(
        self,
        settings: Settings | None,
        state_dir: str | os.PathLike,
        env: Mapping[str, str],
        *,
        stack_name: str = DEFAULT_STACK,
        pulumi_root: str | os.PathLike | None = None,
        program: Callable[[], None] | None = None,
    ):
        if program is None and settings is None:
            raise ValueError("StackRunner needs the settings (or a program)")
        self.settings = settings
        self.state_dir = Path(state_dir).absolute()
        self.env = dict(env)
        self.stack_name = stack_name
        self.pulumi_root = pulumi_root
        self.program = program or self._declare
        self._declared: Settings | None = None  # what the next update declares (None: settings)
        self.work_dir = self.state_dir / "pulumi-workspace"
        self.backend_url = backend_url(self.env, self.state_dir)
        self.scrub = scrubber(self.env)
        self._stacks: dict[str, auto.Stack] = {}
        self._lock = threading.Lock()

    def _declare(self) -> None:
        from infra.program import declare  # imported late: the program pulls in the provider SDKs

        declare(self._declared or self.settings)

    # -- the verbs ---------------------------------------------------------------------------

    def up(self, progress: Progress, *, instance_state: str = "running",
           refresh: bool | None = None, servers: Mapping[str, str] | None = None,
           kept: Iterable[str] = ()) -> StackOutputs | None:
        """Create or update the GPU servers, running or stopped; returns what the program exports.

        `servers` (name -> running | stopped) declares those servers and no other; None
        declares today's one server, `gpu`, in `instance_state`. `absent` removes the
        instances but keeps the rest (the model volumes of `servers`): returns None.
        `kept`: servers this update leaves as they were made (Pulumi's ignore_changes on
        infra/program.py's KEPT_AS_MADE), so new settings neither replace nor resize them
        while the update is about another server.
        Declaring `running` or `stopped` refreshes first (`up --refresh`): the pinned provider
        (terraform-provider-exoscale 0.66.0) stops an instance without reading its state, and
        Exoscale refuses to stop one that is stopped already; with the state read back, an
        instance that is already as declared is left alone. `refresh` says otherwise.
        """
        require_credentials(self.env)
        stack = self._stack()
        narrator = Narrator("up", progress, self.scrub, self._expected_count())
        if self.settings is not None:  # checked here: a bad map stops before the CLI runs
            self._declared = dataclasses.replace(
                self.settings, instance_state=instance_state,
                servers=dict(servers) if servers is not None else None, kept=kept)
        try:
            result = stack.up(on_event=narrator, color="never",
                              refresh=instance_state in ("running", "stopped")
                              if refresh is None else refresh)
        except CommandError as exc:
            raise self._failure(exc, "up", narrator) from None
        finally:
            self._declared = None
        self._remember_count(narrator.resources)
        if instance_state == "absent":
            return None
        outputs = StackOutputs.from_outputs({k: v.value for k, v in result.outputs.items()})
        self.scrub.learn(outputs.token)
        return outputs

    def destroy(self, progress: Progress) -> None:
        """Remove everything the stack holds; nothing to remove is success."""
        require_credentials(self.env)
        stack = self._stack()
        narrator = Narrator("destroy", progress, self.scrub, self._expected_count())
        try:
            stack.destroy(on_event=narrator, color="never")
        except CommandError as exc:
            raise self._failure(exc, "destroy", narrator) from None

    def preview(self, progress: Progress) -> dict[str, int]:
        """What `up` would do now, done by nothing: a `pulumi preview` of the program against
        the real provider. The template is looked up in the zone with these credentials and
        the provider checks every input (the instance type's `family.size` form among them);
        each planned step reaches `progress` ("would create exoscale:ComputeInstance gpu").
        Returns the count of each planned operation on the program's resources (the stack and
        its providers left out); a provider error raises UpdateFailed."""
        require_credentials(self.env)
        stack = self._stack()
        narrator = Narrator("preview", progress, self.scrub, self._expected_count())
        try:
            stack.preview(on_event=narrator, color="never")
        except CommandError as exc:
            raise self._failure(exc, "preview", narrator) from None
        return dict(narrator.changes)

    def refresh(self, progress: Progress, *, clear_pending_creates: bool = False) -> None:
        """Read every resource back from the cloud; optionally drop creates that never finished."""
        require_credentials(self.env)
        stack = self._stack()
        narrator = Narrator("refresh", progress, self.scrub, self._expected_count())
        try:
            stack.refresh(
                on_event=narrator, color="never", clear_pending_creates=clear_pending_creates
            )
        except CommandError as exc:
            raise self._failure(exc, "refresh", narrator) from None

    def outputs(self) -> StackOutputs | None:
        """What the last update exported (`servers` too); None when the stack holds no
        instance."""
        try:
            values = {k: v.value for k, v in self._stack().outputs().items()}
        except CommandError as exc:
            raise self._failure(exc, "stack output") from None
        if not values.get("instance_id") or not values.get("remote_url"):
            return None
        outputs = StackOutputs.from_outputs(values)
        self.scrub.learn(outputs.token)
        return outputs

    def cancel(self) -> None:
        """Delete the stack's lock files (`pulumi cancel`); a running update is not stopped."""
        try:
            self._stack().cancel()
        except CommandError as exc:
            raise self._failure(exc, "cancel") from None
        log.warning("removed the update lock of stack %s", self.stack_name)

    # -- crash repair ------------------------------------------------------------------------

    def export_state(self) -> auto.Deployment:
        """The stack's state as `pulumi stack export` gives it (resources, pending operations)."""
        try:
            return self._stack().export_stack()
        except CommandError as exc:
            raise self._failure(exc, "stack export") from None

    def import_state(self, state: auto.Deployment) -> None:
        """Replace the stack's state (`pulumi stack import`): the crash repair's one edit."""
        try:
            self._stack().import_stack(state)
        except CommandError as exc:
            raise self._failure(exc, "stack import") from None

    def instance_states(self) -> dict[str, str]:
        """Each server whose instance the stack's state holds, with its declared state: what
        an update must declare again to keep it (pending creates not included)."""
        return repair.instance_states(self.export_state().deployment or {})

    def pending_creates(self) -> list[PendingCreate]:
        """Creates an interrupted update left in the state: the object may exist in the cloud."""
        return repair.pending_creates(self.export_state().deployment or {})

    def find_instances(self, pending: PendingCreate) -> list[str]:
        """Ids of the compute instances with the name and labels of `pending`, in its zone.

        Runs a program that only reads (infra/repair.py `instance_lookup`) in a side stack:
        the provider, its credentials and its plugin are the real stack's.
        """
        require_credentials(self.env)
        stack = self._stack(f"{self.stack_name}-lookup", lambda: repair.instance_lookup(pending))
        narrator = Narrator("lookup", lambda _: None, self.scrub, None)  # steps are noise
        try:
            result = stack.up(on_event=narrator, color="never")
        except CommandError as exc:
            raise self._failure(exc, "up (instance lookup)", narrator) from None
        ids = result.outputs.get("ids")
        return [str(i) for i in (ids.value if ids else None) or []]

    def adopt(self, pending: PendingCreate, object_id: str) -> None:
        """Record that `pending` did create `object_id`, for the next refresh to import: the
        state goes out through `stack export`, is edited (infra/repair.py `adopted`, which says
        why not `refresh --import-pending-creates`) and comes back through `stack import`."""
        if not pending.zone:
            raise UpdateFailed(f"cannot adopt {object_id}: the interrupted create names no zone")
        exported = self.export_state()
        deployment = repair.adopted(exported.deployment or {}, pending, object_id)
        if deployment is None:
            return
        self.import_state(auto.Deployment(version=exported.version, deployment=deployment))
        log.warning("adopted %s %s into stack %s", pending.type, object_id, self.stack_name)

    # -- the workspace -----------------------------------------------------------------------

    def _stack(self, name: str | None = None, program: Callable[[], None] | None = None
               ) -> auto.Stack:
        """The stack, created or selected once per runner (serialised, see `selecting`)."""
        name = name or self.stack_name
        with self._lock:
            if name not in self._stacks:
                self._stacks[name] = self._select(name, program or self.program)
            return self._stacks[name]

    def _select(self, name: str, program: Callable[[], None]) -> auto.Stack:
        command = find_pulumi(self.env, self.pulumi_root)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.backend_url.startswith("file://"):
            Path(self.backend_url[len("file://"):]).mkdir(parents=True, exist_ok=True)
        options = auto.LocalWorkspaceOptions(
            work_dir=str(self.work_dir),
            env_vars=cli_env(self.env, self.backend_url),
            secrets_provider="passphrase",
            project_settings=auto.ProjectSettings(
                name=PROJECT, runtime="python", backend=auto.ProjectBackend(self.backend_url)
            ),
            pulumi_command=command,
        )
        with selecting(self.work_dir):
            try:
                return auto.create_or_select_stack(
                    name, project_name=PROJECT, program=program, opts=options
                )
            except CommandError as exc:
                raise self._failure(exc, "stack select") from None

    def _expected_count(self) -> int | None:
        try:
            return int((self.work_dir / f".{self.stack_name}.count").read_text())
        except (OSError, ValueError):
            return None

    def _remember_count(self, count: int) -> None:
        with contextlib.suppress(OSError):
            (self.work_dir / f".{self.stack_name}.count").write_text(str(count))

    def _failure(self, exc: CommandError, doing: str, narrator: Narrator | None = None
                 ) -> AutomationError:
        return classify(exc, doing, self.stack_name, narrator.errors if narrator else (),
                        self.scrub, required_plugins)
