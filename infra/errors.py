"""Failed Pulumi CLI commands as named errors: what to install, set or wait for, never a secret.

`classify` reads a failed command's output (and the engine's error diagnostics) for every verb.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from pulumi.automation.errors import CommandError, ConcurrentUpdateError

from proxy.util import procfs


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
        return self.host == (hostname or socket.gethostname()) and not procfs.alive(self.pid)

    def __str__(self) -> str:
        since = self.since.isoformat(timespec="seconds") if self.since else "an unknown time"
        return f"pid {self.pid} on {self.host} since {since}"


class StackLocked(AutomationError):
    """Another update holds the stack's lock (live or left behind by a crash)."""

    def __init__(self, message: str, holders: tuple[LockHolder, ...]):
        super().__init__(message)
        self.holders = holders


def classify(exc: CommandError, doing: str, stack_name: str, diagnostics: Sequence[str],
             scrub: Callable[[str], str], plugins: Callable[[], Mapping[str, str]]
             ) -> AutomationError:
    """Our named error for a failed CLI command; every message is scrubbed. `plugins` gives
    the versions the program asks for, for a missing plugin the CLI names without one."""
    text = "\n".join([str(exc), *diagnostics])
    if isinstance(exc, ConcurrentUpdateError) or "the stack is currently locked by" in text:
        holders = _lock_holders(text)
        who = "; ".join(str(h) for h in holders) or "another process"
        return StackLocked(
            f"stack {stack_name} is locked by an update in progress ({who}); wait for "
            "it to end, or run `pulumi cancel` if that process is gone",
            holders,
        )
    plugin = _PLUGIN_MISSING.search(text)
    if plugin:
        name = plugin.group(1)
        version = _VERSION.search(plugin.group(2))
        version = version.group(1) if version else plugins().get(name, "")
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
    reason = "; ".join(diagnostics) if diagnostics else _error_lines(text)
    return UpdateFailed(scrub(f"pulumi {doing} failed: {reason}")[:800])


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
