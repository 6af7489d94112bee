"""`ollama-exoscale doctor`: is this host ready to provision? Each check says what to fix.

Checks the Pulumi CLI (present, new enough), the provider plugins the program needs (installed,
since automatic downloads are off), the Exoscale credentials (present; never shown), the state
dir (writable) and the Pulumi state backend (reachable; writable when it is a directory).
`run_preview` (`doctor --preview`) goes on to the cloud: a `pulumi preview` of the program.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import pulumi.automation as auto
from pulumi.automation.errors import CommandError

from infra.errors import AutomationError, PulumiTooOld
from infra.settings import PROJECT
from infra.workspace import (
    MINIMUM_CLI,
    backend_url,
    find_pulumi,
    missing_credentials,
    required_plugins,
    scrubber,
)

if TYPE_CHECKING:
    from .settings import Settings

INSTALL_CLI = (
    "install the Pulumi CLI: `curl -fsSL https://get.pulumi.com | sh` (offline: unpack a "
    "release tarball from https://github.com/pulumi/pulumi/releases into ~/.pulumi) and put "
    "~/.pulumi/bin on PATH"
)
PLUGIN_SERVERS = {"exoscale": "github://api.github.com/pulumiverse/pulumi-exoscale"}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what to do when not ok: a command or a variable to set


def run_checks(
    env: Mapping[str, str],
    state_dir: str | os.PathLike,
    *,
    pulumi_root: str | os.PathLike | None = None,
) -> list[Check]:
    """Every check, in the order a person would fix them. Never raises, never shows a secret."""
    state_dir = Path(state_dir).absolute()
    cli_check, command = _check_cli(env, pulumi_root)
    return [
        cli_check,
        *_check_plugins(command, env),
        _check_credentials(env),
        check_state_dir(state_dir),
        _check_backend(command, env, state_dir),
    ]


def run_preview(
    settings: Settings,
    env: Mapping[str, str],
    state_dir: str | os.PathLike,
    *,
    pulumi_root: str | os.PathLike | None = None,
) -> tuple[Check, list[str]]:
    """`doctor --preview`: a `pulumi preview` of the real program with these credentials
    (nothing is created): the check, and the steps `pulumi up` would take."""
    from infra.runner import StackRunner  # the runner brings the Automation API's workspace

    steps: list[str] = []
    runner = StackRunner(settings, state_dir, env, pulumi_root=pulumi_root)
    try:
        changes = runner.preview(steps.append)
    except AutomationError as exc:
        return Check("preview", False, str(exc),
                     "fix what the provider says, then run `ollama-exoscale doctor --preview`"), []
    planned = [s for s in steps if s.startswith("would ")]
    ops = [f"{op} {n}" for op, n in sorted(changes.items()) if op != "same"]
    detail = "`pulumi up` would " + (", ".join(ops) or "change nothing")
    if changes.get("same"):
        detail += f" ({changes['same']} unchanged)"
    return Check("preview", True, detail), planned


def _check_cli(env: Mapping[str, str], pulumi_root: str | os.PathLike | None
               ) -> tuple[Check, auto.PulumiCommand | None]:
    try:
        command = find_pulumi(env, pulumi_root)
    except PulumiTooOld as exc:
        fix = f"upgrade to {MINIMUM_CLI} or newer: `curl -fsSL https://get.pulumi.com | sh`"
        return Check("pulumi CLI", False, str(exc), fix), None
    except AutomationError as exc:
        return Check("pulumi CLI", False, str(exc), INSTALL_CLI), None
    detail = f"pulumi {command.version} at {command.command} (needs {MINIMUM_CLI} or newer)"
    return Check("pulumi CLI", True, detail), command


def _check_plugins(command: auto.PulumiCommand | None, env: Mapping[str, str]) -> list[Check]:
    wanted = required_plugins()
    if command is None:
        return [
            Check(f"plugin {name}", False, "cannot list plugins without the Pulumi CLI",
                  "install the Pulumi CLI first")
            for name in wanted
        ]
    try:
        listed = json.loads(_run(command, ["plugin", "ls", "--json"], env).stdout or "[]")
    except (CommandError, ValueError) as exc:
        detail = f"`pulumi plugin ls` failed: {_first_error(exc, env)}"
        return [Check(f"plugin {n}", False, detail, "fix the Pulumi CLI first") for n in wanted]
    installed = {
        (p.get("name"), str(p.get("version") or "").lstrip("v"))
        for p in listed if p.get("kind") == "resource"
    }
    return [_plugin_check(name, version, installed, env) for name, version in wanted.items()]


def _plugin_check(name: str, version: str, installed: set, env: Mapping[str, str]) -> Check:
    if (name, version) in installed:
        return Check(f"plugin {name}", True, f"resource plugin {name} {version} is installed")
    on_path = shutil.which(f"pulumi-resource-{name}", path=env.get("PATH", os.defpath))
    if on_path:
        return Check(f"plugin {name}", True, f"resource plugin {name} on PATH at {on_path}")
    others = sorted(v for n, v in installed if n == name)
    seen = f" (installed: {', '.join(others)})" if others else ""
    server = f" --server {PLUGIN_SERVERS[name]}" if name in PLUGIN_SERVERS else ""
    fix = (
        f"`pulumi plugin install resource {name} {version}{server}` (offline: add "
        f"`-f pulumi-resource-{name}-v{version}-linux-amd64.tar.gz`)"
    )
    return Check(f"plugin {name}", False, f"resource plugin {name} {version} is missing{seen}",
                 fix)


def _check_credentials(env: Mapping[str, str]) -> Check:
    missing = missing_credentials(env)
    if missing:
        return Check(
            "Exoscale credentials", False, f"{' and '.join(missing)} not set",
            "export EXOSCALE_API_KEY and EXOSCALE_API_SECRET (an IAM API key of your Exoscale "
            "organisation allowed to manage compute instances and security groups)",
        )
    return Check("Exoscale credentials", True, "EXOSCALE_API_KEY and EXOSCALE_API_SECRET are set")


def check_state_dir(state_dir: Path) -> Check:  # also `local`'s (proxy/provision/local_checks.py)
    problem = _writable(state_dir)
    if problem:
        return Check("state dir", False, f"{state_dir} is not writable: {problem}",
                     "set PROXY_STATE_DIR to a directory this user can write")
    return Check("state dir", True, f"{state_dir} is writable")


def _check_backend(command: auto.PulumiCommand | None, env: Mapping[str, str],
                   state_dir: Path) -> Check:
    url = backend_url(env, state_dir)
    shown = scrubber(env)(url)
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(unquote(parts.netloc + parts.path))
        problem = _writable(path)
        if problem:
            return Check("state backend", False, f"{shown} is not writable: {problem}",
                         "set PULUMI_BACKEND_URL to a writable file:// directory or a bucket")
        return Check("state backend", True, f"{shown} is writable")
    if command is None:
        return Check("state backend", False, f"cannot reach {shown} without the Pulumi CLI",
                     "install the Pulumi CLI first")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            # `stack ls` wants a project: a throwaway one that names the backend
            (Path(scratch) / "Pulumi.yaml").write_text(
                f"name: {PROJECT}\nruntime: python\nbackend:\n  url: {url}\n"
            )
            _run(command, ["stack", "ls", "--json"], {**env, "PULUMI_BACKEND_URL": url}, scratch)
    except CommandError as exc:
        return Check(
            "state backend", False, f"{shown} is not reachable: {_first_error(exc, env)}",
            "check PULUMI_BACKEND_URL and the bucket's keys (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY); on Exoscale SOS use s3://BUCKET?endpoint="
            "sos-ZONE.exo.io&region=ZONE&s3ForcePathStyle=true",
        )
    return Check("state backend", True, f"{shown} is reachable (writes are proven by an update)")


def _run(command: auto.PulumiCommand, args: list[str], env: Mapping[str, str],
         cwd: str | None = None) -> auto.CommandResult:
    quiet = {**env, "PULUMI_SKIP_UPDATE_CHECK": "true"}
    if "PULUMI_CONFIG_PASSPHRASE" not in quiet and "PULUMI_CONFIG_PASSPHRASE_FILE" not in quiet:
        quiet["PULUMI_CONFIG_PASSPHRASE"] = ""
    return command.run(args, cwd or tempfile.gettempdir(), quiet)


def _writable(folder: Path) -> str:
    """Empty if we can create `folder` and write in it, else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".doctor-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__
    return ""


def _first_error(exc: Exception, env: Mapping[str, str]) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "error" in line.lower()]
    first = lines[0].removeprefix("stderr:").strip() if lines else exc.__class__.__name__
    return scrubber(env)(first.removeprefix("error:").strip())[:300]
