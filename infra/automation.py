"""Runs the Pulumi program through the Automation API: a few verbs, our own errors, no secrets out.

`StackRunner` wraps `pulumi.automation` the way that module wraps the CLI: `up`, `destroy`,
`refresh`, `outputs`, `cancel`, plus the primitives a crash repair needs (`pending_creates`,
`find_instances`, `adopt`). It keeps a persistent work dir and, unless PULUMI_BACKEND_URL says
otherwise, a `file://` backend in the state dir. Engine events become sentences for a person,
passed to a `progress` callback and logged to "ollama_exoscale.pulumi". Failures raise the
named errors below; their messages say what to install or set and never carry a secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib
import logging
import os
import re
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pulumi
import pulumi.automation as auto
from pulumi.automation.errors import CommandError, ConcurrentUpdateError, InvalidVersionError
from pulumi.automation.events import EngineEvent, OpType
from semver import VersionInfo

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("ollama_exoscale.pulumi")

Progress = Callable[[str], None]

PROJECT = "ollama-exoscale"
DEFAULT_STACK = "ollama-exoscale"
# Inline `refresh` and `destroy` pass `--client`, which the CLI understands from 3.181.
MINIMUM_CLI = VersionInfo(3, 181, 0)
# The provider packages the program uses: their plugins must be installed beforehand.
PROVIDER_PACKAGES = {
    "exoscale": "pulumiverse_exoscale",
    "random": "pulumi_random",
    "tls": "pulumi_tls",
}
INSTANCE_TYPE = "exoscale:index/computeInstance:ComputeInstance"
SECRET_ENV = (
    "EXOSCALE_API_KEY", "EXOSCALE_API_SECRET", "PULUMI_CONFIG_PASSPHRASE",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PULUMI_ACCESS_TOKEN",
)
OUTPUT_NAMES = (
    "remote_url", "public_ip", "instance_id", "token", "tls_certificate", "tls_server_name",
)


class AutomationError(Exception):
    """A Pulumi operation could not run or failed; the message is a sentence, with no secrets."""


class PulumiNotInstalled(AutomationError):
    """The Pulumi CLI is not where we looked, or it does not run."""


class PulumiTooOld(PulumiNotInstalled):
    """The Pulumi CLI is older than the Automation API we use needs."""


class PluginMissing(AutomationError):
    """A provider plugin is not installed (and automatic downloads are off)."""

    def __init__(self, message: str, plugin: str, version: str):
        super().__init__(message)
        self.plugin = plugin
        self.version = version


class CredentialsMissing(AutomationError):
    """EXOSCALE_API_KEY / EXOSCALE_API_SECRET are not set."""


class UpdateFailed(AutomationError):
    """The engine ran and reported an error (a quota, a refused request, a program error)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a stack's update lock, as the CLI reports it."""

    user: str
    host: str
    pid: int
    since: datetime | None

    def is_stale(self, *, max_age: float, hostname: str | None = None) -> bool:
        """True if no live update can be behind this lock.

        A lock taken on this host by a process that no longer runs is stale; so is any lock older
        than `max_age` seconds (no update of ours runs that long), whoever holds it. A lock from
        another host that is younger than that counts as live: we cannot see its process.
        """
        if self.since is not None:
            age = (datetime.now(timezone.utc) - self.since).total_seconds()
            if age > max_age:
                return True
        return self.host == (hostname or socket.gethostname()) and not _pid_alive(self.pid)

    def __str__(self) -> str:
        since = self.since.isoformat(timespec="seconds") if self.since else "an unknown time"
        return f"pid {self.pid} on {self.host} since {since}"


class StackLocked(AutomationError):
    """Another update holds the stack's lock (live or left behind by a crash)."""

    def __init__(self, message: str, holders: tuple[LockHolder, ...]):
        super().__init__(message)
        self.holders = holders


@dataclass(frozen=True)
class StackOutputs:
    """What the program exports about the GPU server; the token is never shown."""

    remote_url: str
    public_ip: str
    instance_id: str
    token: str = field(repr=False)
    tls_certificate: str = field(repr=False)
    tls_server_name: str
    instance_state: str = "running"  # or "stopped"

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, Any]) -> StackOutputs:
        missing = [name for name in OUTPUT_NAMES if not outputs.get(name)]
        if missing:
            raise UpdateFailed(
                f"the Pulumi program did not export {', '.join(missing)}; check infra/program.py"
            )
        state = str(outputs.get("instance_state") or "running")  # stacks made before it
        return cls(**{name: str(outputs[name]) for name in OUTPUT_NAMES}, instance_state=state)


@dataclass(frozen=True)
class PendingCreate:
    """A create the engine started but never saw finish (its process died)."""

    urn: str
    type: str
    name: str  # the cloud object's name, as the program gave it
    zone: str
    labels: Mapping[str, str] = field(default_factory=dict)


def find_pulumi(env: Mapping[str, str], pulumi_root: str | os.PathLike | None = None
                ) -> auto.PulumiCommand:
    """The Pulumi CLI to use: `pulumi_root/bin/pulumi`, else `pulumi` on PATH, else ~/.pulumi."""
    root = Path(pulumi_root) if pulumi_root else _default_root(env)
    if root is None:
        raise PulumiNotInstalled(
            "the Pulumi CLI is not installed: install it with "
            "`curl -fsSL https://get.pulumi.com | sh` (or put `pulumi` on PATH)"
        )
    try:
        return auto.PulumiCommand(root=str(root), version=MINIMUM_CLI)
    except InvalidVersionError as exc:
        raise PulumiTooOld(
            f"the Pulumi CLI in {root} is too old or unreadable ({exc}); install "
            f"{MINIMUM_CLI} or newer with `curl -fsSL https://get.pulumi.com | sh`"
        ) from None
    except (OSError, ValueError) as exc:
        raise PulumiNotInstalled(
            f"the Pulumi CLI {root / 'bin' / 'pulumi'} does not run ({exc.__class__.__name__}); "
            "install it with `curl -fsSL https://get.pulumi.com | sh`"
        ) from None
    except Exception as exc:  # noqa: BLE001 a CLI that exits non-zero on `pulumi version`
        raise PulumiNotInstalled(
            f"`{root / 'bin' / 'pulumi'} version` failed ({exc.__class__.__name__}); "
            "reinstall the Pulumi CLI"
        ) from None


def _default_root(env: Mapping[str, str]) -> Path | None:
    found = shutil.which("pulumi", path=env.get("PATH", os.defpath))
    if found:
        return Path(found).parent.parent  # PulumiCommand runs <root>/bin/pulumi
    home = Path(env.get("HOME") or Path.home()) / ".pulumi"
    return home if (home / "bin" / "pulumi").exists() else None


def required_plugins() -> dict[str, str]:
    """name → version of the resource plugins the program's provider packages ask for."""
    plugins = {}
    for name, module in PROVIDER_PACKAGES.items():
        try:
            utilities = importlib.import_module(f"{module}._utilities")
        except ImportError:
            continue  # the program does not use it in this build
        plugins[name] = utilities.get_version()
    return plugins


def backend_url(env: Mapping[str, str], state_dir: Path) -> str:
    """PULUMI_BACKEND_URL if set, else a file backend in the state dir (an absolute path)."""
    url = (env.get("PULUMI_BACKEND_URL") or "").strip()
    return url or (Path(state_dir).absolute() / "pulumi-backend").as_uri()


def missing_credentials(env: Mapping[str, str]) -> list[str]:
    return [name for name in ("EXOSCALE_API_KEY", "EXOSCALE_API_SECRET") if not env.get(name)]


class Scrubber:
    """Removes known secrets (credentials, the token, URL passwords) from text we show."""

    def __init__(self, env: Mapping[str, str]):
        self.secrets = {env[name] for name in SECRET_ENV if len(env.get(name) or "") >= 4}

    def learn(self, secret: str) -> None:
        if len(secret) >= 4:
            self.secrets.add(secret)

    def __call__(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "[secret]")
        text = re.sub(r"(?i)(bearer\s+)\S+", r"\1[secret]", text)
        return re.sub(r"://[^/@\s:]+:[^/@\s]+@", "://[secret]@", text)


_SELECT_LOCK = threading.Lock()  # create/select writes workspace files: one at a time


@contextlib.contextmanager
def _selecting(work_dir: Path) -> Iterator[None]:
    """Serialise stack selection across threads and across processes sharing the work dir."""
    with _SELECT_LOCK, open(work_dir / ".select.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class StackRunner:
    """The stack that holds the GPU server, and the verbs to change it.

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
        self._instance_state = "running"  # what the next update declares
        self.work_dir = self.state_dir / "pulumi-workspace"
        self.backend_url = backend_url(self.env, self.state_dir)
        self.scrub = Scrubber(self.env)
        self._stacks: dict[str, auto.Stack] = {}
        self._lock = threading.Lock()

    def _declare(self) -> None:
        from .program import declare  # imported late: the program pulls in the provider SDKs

        declare(dataclasses.replace(self.settings, instance_state=self._instance_state))

    # -- the verbs ---------------------------------------------------------------------------

    def up(self, progress: Progress, *, instance_state: str = "running") -> StackOutputs | None:
        """Create or update the GPU server, running or stopped; returns what the program exports.

        `absent` removes the instance but keeps the rest (the model volume): returns None.
        Declaring `running` or `stopped` refreshes first (`up --refresh`): the pinned provider
        (terraform-provider-exoscale 0.66.0) stops an instance without reading its state, and
        Exoscale refuses to stop one that is stopped already; with the state read back, an
        instance that is already as declared is left alone.
        """
        self._require_credentials()
        stack = self._stack()
        narrator = _Narrator("up", progress, self.scrub, self._expected_count())
        self._instance_state = instance_state
        try:
            result = stack.up(on_event=narrator, color="never",
                              refresh=instance_state in ("running", "stopped"))
        except CommandError as exc:
            raise self._failure(exc, "up", narrator) from None
        finally:
            self._instance_state = "running"
        self._remember_count(narrator.resources)
        if instance_state == "absent":
            return None
        outputs = StackOutputs.from_outputs({k: v.value for k, v in result.outputs.items()})
        self.scrub.learn(outputs.token)
        return outputs

    def destroy(self, progress: Progress) -> None:
        """Remove everything the stack holds; nothing to remove is success."""
        self._require_credentials()
        stack = self._stack()
        narrator = _Narrator("destroy", progress, self.scrub, self._expected_count())
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
        self._require_credentials()
        stack = self._stack()
        narrator = _Narrator("preview", progress, self.scrub, self._expected_count())
        try:
            stack.preview(on_event=narrator, color="never")
        except CommandError as exc:
            raise self._failure(exc, "preview", narrator) from None
        return dict(narrator.changes)

    def refresh(self, progress: Progress, *, clear_pending_creates: bool = False) -> None:
        """Read every resource back from the cloud; optionally drop creates that never finished."""
        self._require_credentials()
        stack = self._stack()
        narrator = _Narrator("refresh", progress, self.scrub, self._expected_count())
        try:
            stack.refresh(
                on_event=narrator, color="never", clear_pending_creates=clear_pending_creates
            )
        except CommandError as exc:
            raise self._failure(exc, "refresh", narrator) from None

    def outputs(self) -> StackOutputs | None:
        """What the last update exported; None when the stack holds no instance."""
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

    def pending_creates(self) -> list[PendingCreate]:
        """Creates an interrupted update left in the state: the object may exist in the cloud."""
        try:
            deployment = self._stack().export_stack().deployment or {}
        except CommandError as exc:
            raise self._failure(exc, "stack export") from None
        found = []
        for operation in deployment.get("pending_operations") or []:
            if operation.get("type") != "creating":
                continue
            resource = operation.get("resource") or {}
            inputs = resource.get("inputs") or {}
            labels = inputs.get("labels") if isinstance(inputs.get("labels"), dict) else {}
            found.append(PendingCreate(
                urn=resource.get("urn", ""), type=resource.get("type", ""),
                name=_plain(inputs.get("name")), zone=_plain(inputs.get("zone")),
                labels={k: _plain(v) for k, v in labels.items()},
            ))
        return found

    def find_instances(self, pending: PendingCreate) -> list[str]:
        """Ids of the compute instances with the name and labels of `pending`, in its zone.

        Asks the Exoscale provider (`getComputeInstanceList`) from a program that only reads,
        in a side stack: the provider, its credentials and its plugin are the real stack's.
        """
        self._require_credentials()

        def lookup() -> None:
            import pulumiverse_exoscale as exoscale

            found = exoscale.get_compute_instance_list_output(
                zone=pending.zone, name=pending.name, labels=dict(pending.labels) or None
            )
            pulumi.export("ids", found.instances.apply(lambda xs: [x.id for x in xs or []]))

        stack = self._stack(f"{self.stack_name}-lookup", lookup)
        narrator = _Narrator("lookup", lambda _: None, self.scrub, None)  # steps are noise
        try:
            result = stack.up(on_event=narrator, color="never")
        except CommandError as exc:
            raise self._failure(exc, "up (instance lookup)", narrator) from None
        ids = result.outputs.get("ids")
        return [str(i) for i in (ids.value if ids else None) or []]

    def adopt(self, pending: PendingCreate, object_id: str) -> None:
        """Record that `pending` did create `object_id`, for the next refresh to import.

        The resource goes into the state with the provider's import ID, `<ID>@<ZONE>`
        (terraform-provider-exoscale pkg/utils/utils.go `ZonedStateContextFunc`), and no
        outputs: a refresh reads a resource with empty state as an import (pulumi-terraform-
        bridge pkg/tfbridge/provider.go `Read` runs the importer), which sets the bare ID and
        every output. With the bare ID that import fails ("expected format <ID>@<ZONE>").

        Not `refresh --import-pending-creates URN ID` (pulumi/pulumi
        pkg/cmd/pulumi/operations/refresh.go), though the low-level `pulumi.automation.
        interface` API passes it: it only turns the pending create into a pending `importing`
        operation, and the refresh that follows refreshes the state's resources alone
        (pkg/resource/deploy/deployment_executor.go) and carries only pending creates into
        the new state (pkg/backend/journal.go): the instance would be forgotten, and the next
        `up` would create a second one. The state is edited through `stack export` and
        `stack import` instead, as Pulumi's troubleshooting guide describes.
        """
        if not pending.zone:
            raise UpdateFailed(f"cannot adopt {object_id}: the interrupted create names no zone")
        stack = self._stack()
        try:
            exported = stack.export_stack()
            deployment = dict(exported.deployment or {})
            operations = deployment.get("pending_operations") or []
            match = [op for op in operations if _urn(op.get("resource")) == pending.urn]
            if not match:
                return
            deployment["pending_operations"] = [op for op in operations if op not in match]
            resources = [r for r in deployment.get("resources") or [] if _urn(r) != pending.urn]
            adopted = {**match[0]["resource"], "id": f"{object_id}@{pending.zone}"}
            adopted.pop("outputs", None)  # empty state: the refresh imports it
            resources.append(adopted)
            deployment["resources"] = resources
            stack.import_stack(auto.Deployment(version=exported.version, deployment=deployment))
        except CommandError as exc:
            raise self._failure(exc, "stack import") from None
        log.warning("adopted %s %s into stack %s", pending.type, object_id, self.stack_name)

    # -- the workspace -----------------------------------------------------------------------

    def _stack(self, name: str | None = None, program: Callable[[], None] | None = None
               ) -> auto.Stack:
        """The stack, created or selected once per runner (serialised, see `_selecting`)."""
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
            env_vars=self._cli_env(),
            secrets_provider="passphrase",
            project_settings=auto.ProjectSettings(
                name=PROJECT, runtime="python", backend=auto.ProjectBackend(self.backend_url)
            ),
            pulumi_command=command,
        )
        with _selecting(self.work_dir):
            try:
                return auto.create_or_select_stack(
                    name, project_name=PROJECT, program=program, opts=options
                )
            except CommandError as exc:
                raise self._failure(exc, "stack select") from None

    def _cli_env(self) -> dict[str, str]:
        """The CLI's environment: ours, plus the backend and the switches for unattended use."""
        env = dict(self.env)
        env["PULUMI_BACKEND_URL"] = self.backend_url
        if "PULUMI_CONFIG_PASSPHRASE" not in env and "PULUMI_CONFIG_PASSPHRASE_FILE" not in env:
            env["PULUMI_CONFIG_PASSPHRASE"] = ""  # the passphrase provider insists on one
        env.setdefault("PULUMI_SKIP_UPDATE_CHECK", "true")
        env.setdefault("PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION", "true")
        return env

    def _require_credentials(self) -> None:
        missing = missing_credentials(self.env)
        if missing:
            raise CredentialsMissing(
                f"Exoscale credentials are missing: set {' and '.join(missing)} (an API key "
                "allowed to manage compute instances and security groups)"
            )

    def _expected_count(self) -> int | None:
        try:
            return int((self.work_dir / f".{self.stack_name}.count").read_text())
        except (OSError, ValueError):
            return None

    def _remember_count(self, count: int) -> None:
        with contextlib.suppress(OSError):
            (self.work_dir / f".{self.stack_name}.count").write_text(str(count))

    # -- errors ------------------------------------------------------------------------------

    def _failure(self, exc: CommandError, doing: str, narrator: _Narrator | None = None
                 ) -> AutomationError:
        """Our named error for a failed CLI command; every message is scrubbed."""
        text = "\n".join([str(exc), *(narrator.errors if narrator else ())])
        if isinstance(exc, ConcurrentUpdateError) or "the stack is currently locked by" in text:
            holders = _lock_holders(text)
            who = "; ".join(str(h) for h in holders) or "another process"
            return StackLocked(
                f"stack {self.stack_name} is locked by an update in progress ({who}); wait for "
                "it to end, or run `pulumi cancel` if that process is gone",
                holders,
            )
        plugin = _PLUGIN_MISSING.search(text)
        if plugin:
            name = plugin.group(1)
            version = _VERSION.search(plugin.group(2))
            version = version.group(1) if version else required_plugins().get(name, "")
            return PluginMissing(
                f"the Pulumi plugin {name} {version} is not installed: run `pulumi plugin "
                f"install resource {name} {version}` (offline: add `-f <plugin tarball>`)",
                name, version,
            )
        if "PULUMI_CONFIG_PASSPHRASE" in text or "incorrect passphrase" in text:
            return UpdateFailed(
                f"pulumi {doing} cannot decrypt the stack's secrets: set "
                "PULUMI_CONFIG_PASSPHRASE to the passphrase the stack was created with"
            )
        reason = "; ".join(narrator.errors) if narrator and narrator.errors else _error_lines(text)
        return UpdateFailed(self.scrub(f"pulumi {doing} failed: {reason}")[:800])


_PLUGIN_MISSING = re.compile(r"no resource plugin 'pulumi-resource-([\w-]+)' found([^\n]*)")
_VERSION = re.compile(r"\bv?(\d+\.\d+\.\d+[\w.+-]*)")
_LOCK_LINE = re.compile(
    r"created by (?P<user>[^@\s]*)@(?P<host>\S+) \(pid (?P<pid>\d+)\) at (?P<at>\S+)"
)


def _lock_holders(text: str) -> tuple[LockHolder, ...]:
    holders = []
    for match in _LOCK_LINE.finditer(text):
        holders.append(LockHolder(
            user=match["user"], host=match["host"], pid=int(match["pid"]),
            since=_parse_time(match["at"]),
        ))
    return tuple(holders)


def _parse_time(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _error_lines(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower()]
    return " / ".join(lines[-3:]) or "the Pulumi CLI exited with an error"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] not in "ZX"  # a zombie has finished


def _urn(resource: Any) -> str:
    return resource.get("urn", "") if isinstance(resource, dict) else ""


def _plain(value: Any) -> str:
    """A state property as text (secret-wrapped values keep their plaintext)."""
    if isinstance(value, dict):
        value = value.get("plaintext", value.get("value", ""))
    return "" if value is None else str(value).strip('"')


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


class _Narrator:
    """Engine events → sentences for a person; keeps the errors the engine reports.

    The SDK calls it on a background thread and swallows its exceptions, so it logs its own.
    """

    def __init__(self, verb: str, progress: Progress, scrub: Scrubber, total: int | None):
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
