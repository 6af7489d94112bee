"""The stand-in's workspace and `file://` backend: stacks, config, checkpoints, history, locks.

The layout follows the real DIY backend, so a test (or `pulumi cancel`) finds things where the
real CLI puts them:
  DIR/.pulumi/stacks/<project>/<stack>.json                      the latest deployment
  DIR/.pulumi/history/<project>/<stack>/<stack>-<ns>.history.json one file per operation
  DIR/.pulumi/locks/organization/<project>/<stack>/<uuid>.json   who holds the update lock
Stack config lives in the work dir's `Pulumi.<stack>.yaml`, as with the real CLI.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import shutil
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

ORG = "organization"  # what DIY backends call the organisation in fully qualified names
SECRET_SIG = "4dabf18193072939515e22adb298388d"  # Pulumi's marker for a secret property value
SECRET_VALUE = "1b47061264138c4ac30d75fd1eb44270"


class CliError(Exception):
    """Printed as `error: <message>` on stderr; the process exits 255 like the real CLI."""


def now_text() -> str:
    """A timestamp as the CLI writes it in JSON output (fractional seconds, UTC)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def is_secret(value: object) -> bool:
    return isinstance(value, dict) and value.get(SECRET_SIG) == SECRET_VALUE


def reveal(value: object) -> object:
    """The plain value of a property, secrets unwrapped (recursively)."""
    if is_secret(value):
        return reveal(value.get("value"))
    if isinstance(value, dict):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reveal(v) for v in value]
    return value


def mask(value: object) -> object:
    """The value as the CLI shows it without --show-secrets: secrets become "[secret]"."""
    if is_secret(value):
        return "[secret]"
    if isinstance(value, dict):
        return {k: mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask(v) for v in value]
    return value


def secret(value: object) -> dict:
    return {SECRET_SIG: SECRET_VALUE, "value": value}


class Workspace:
    """The project in the current directory and the backend it names."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd = cwd
        self.env = env
        project_file = cwd / "Pulumi.yaml"
        if not project_file.exists():
            raise CliError(f"no Pulumi.yaml project file found (searching upwards from {cwd})")
        self.settings = yaml.safe_load(project_file.read_text()) or {}
        self.project = self.settings["name"]
        url = env.get("PULUMI_BACKEND_URL") or (self.settings.get("backend") or {}).get("url")
        if not url:
            raise CliError("no backend: set PULUMI_BACKEND_URL (the stand-in knows only file://)")
        self.backend = Backend(url, self.project)

    def config_file(self, stack: str) -> Path:
        return self.cwd / f"Pulumi.{stack}.yaml"

    def read_config(self, stack: str) -> dict:
        path = self.config_file(stack)
        data = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
        return data

    def write_config(self, stack: str, data: dict) -> None:
        self.config_file(stack).write_text(yaml.safe_dump(data, sort_keys=True))

    def full_key(self, key: str) -> str:
        return key if ":" in key else f"{self.project}:{key}"

    def set_config(self, stack: str, key: str, value: str, is_secret_value: bool) -> None:
        data = self.read_config(stack)
        config = data.setdefault("config", {})
        stored = {"secure": "v1:" + base64.b64encode(value.encode()).decode()}
        config[self.full_key(key)] = stored if is_secret_value else value
        self.write_config(stack, data)

    def config_values(self, stack: str) -> dict[str, tuple[str, bool]]:
        """key → (plain value, secret?)"""
        values = {}
        for key, stored in (self.read_config(stack).get("config") or {}).items():
            if isinstance(stored, dict) and "secure" in stored:
                plain = base64.b64decode(stored["secure"][3:]).decode()
                values[key] = (plain, True)
            else:
                values[key] = (str(stored), False)
        return values

    def require_passphrase(self) -> None:
        if "PULUMI_CONFIG_PASSPHRASE" in self.env or "PULUMI_CONFIG_PASSPHRASE_FILE" in self.env:
            return
        raise CliError(
            "constructing secrets manager of type \"passphrase\": unable to find either "
            "`PULUMI_CONFIG_PASSPHRASE` or `PULUMI_CONFIG_PASSPHRASE_FILE` when loading source "
            "stack"
        )


class Backend:
    """A `file://` backend directory for one project."""

    def __init__(self, url: str, project: str):
        parts = urlsplit(url)
        if parts.scheme != "file":
            raise CliError(f"the stand-in pulumi supports only file:// backends, not {url!r}")
        self.url = url
        self.root = Path(unquote(parts.netloc + parts.path)).expanduser()
        self.project = project
        self.meta = self.root / ".pulumi"

    def fqn(self, stack: str) -> str:
        return f"{ORG}/{self.project}/{stack}"

    def stack_file(self, stack: str) -> Path:
        return self.meta / "stacks" / self.project / f"{stack}.json"

    def history_dir(self, stack: str) -> Path:
        return self.meta / "history" / self.project / stack

    def lock_dir(self, stack: str) -> Path:
        return self.meta / "locks" / ORG / self.project / stack

    def exists(self, stack: str) -> bool:
        return self.stack_file(stack).exists()

    def require(self, stack: str) -> None:
        if not self.exists(stack):
            raise CliError(f"no stack named '{stack}' found")

    def stacks(self) -> list[str]:
        folder = self.meta / "stacks" / self.project
        return sorted(p.stem for p in folder.glob("*.json")) if folder.exists() else []

    def init(self, stack: str) -> None:
        if self.exists(stack):
            raise CliError(f"stack '{self.fqn(stack)}' already exists")
        self.meta.mkdir(parents=True, exist_ok=True)
        (self.meta / "meta.yaml").write_text("version: 1\n")
        self.save(stack, {"resources": [], "pending_operations": []})

    def remove(self, stack: str) -> None:
        self.require(stack)
        if self.load(stack)["resources"]:
            raise CliError(
                f"'{stack}' still has resources; removal rejected. Possible actions:\n"
                "- Make sure that 'pulumi destroy' has been run on the stack\n"
                "- Use 'pulumi stack rm --force' to remove the stack anyway"
            )
        self.stack_file(stack).unlink()

    def load(self, stack: str) -> dict:
        self.require(stack)
        checkpoint = json.loads(self.stack_file(stack).read_text())
        latest = checkpoint["checkpoint"].get("latest") or {}
        latest.setdefault("resources", [])
        latest.setdefault("pending_operations", [])
        return latest

    def save(self, stack: str, deployment: dict) -> None:
        """Write the latest deployment atomically (a crash leaves the old or the new one)."""
        deployment = {
            "manifest": {"time": now_text(), "magic": "", "version": "standin"},
            "secrets_providers": {"type": "passphrase", "state": {"salt": "v1:standin"}},
            **{k: v for k, v in deployment.items() if k not in ("manifest", "secrets_providers")},
        }
        checkpoint = {"version": 3, "checkpoint": {"stack": self.fqn(stack), "latest": deployment}}
        path = self.stack_file(stack)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(checkpoint, indent=2))
        scratch.replace(path)

    def outputs(self, stack: str) -> dict:
        for resource in self.load(stack)["resources"]:
            if resource["type"] == "pulumi:pulumi:Stack":
                return resource.get("outputs") or {}
        return {}

    def record(self, stack: str, entry: dict) -> None:
        folder = self.history_dir(stack)
        folder.mkdir(parents=True, exist_ok=True)
        entry["version"] = len(list(folder.glob("*.history.json"))) + 1
        (folder / f"{stack}-{time.time_ns()}.history.json").write_text(json.dumps(entry))

    def history(self, stack: str) -> list[dict]:
        """Newest first, like `pulumi stack history`."""
        folder = self.history_dir(stack)
        files = sorted(folder.glob("*.history.json"), reverse=True) if folder.exists() else []
        return [json.loads(f.read_text()) for f in files]

    def lock(self, stack: str) -> Path:
        """Take the update lock, failing with the real CLI's message if another holds it."""
        self.check_lock(stack)
        folder = self.lock_dir(stack)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4()}.json"
        content = {
            "pid": os.getpid(),
            "username": getpass.getuser(),
            "hostname": socket.gethostname(),
            "timestamp": datetime.now().astimezone().isoformat(),
        }
        path.write_text(json.dumps(content))
        try:
            self.check_lock(stack, mine=path)
        except CliError:
            path.unlink(missing_ok=True)
            raise
        return path

    def check_lock(self, stack: str, mine: Path | None = None) -> None:
        folder = self.lock_dir(stack)
        others = [p for p in sorted(folder.glob("*.json")) if p != mine] if folder.exists() else []
        if not others:
            return
        lines = [
            f"the stack is currently locked by {len(others)} lock(s). Either wait for the other "
            "process(es) to end or delete the lock file with `pulumi cancel`."
        ]
        for path in others:
            held = json.loads(path.read_text())
            since = datetime.fromisoformat(held["timestamp"]).isoformat(timespec="seconds")
            since = since.replace("+00:00", "Z")
            relative = path.relative_to(self.root).as_posix()
            lines.append(
                f"  {self.url.rstrip('/')}/{relative}: created by {held['username']}@"
                f"{held['hostname']} (pid {held['pid']}) at {since}"
            )
        raise CliError("\n".join(lines))

    def cancel(self, stack: str) -> None:
        """`pulumi cancel` on a DIY backend: delete every lock file of the stack."""
        folder = self.lock_dir(stack)
        for path in folder.glob("*.json") if folder.exists() else ():
            path.unlink(missing_ok=True)


# -- plugins (under $PULUMI_HOME/plugins, as the real CLI keeps them) ---------------------------


def plugins(env: dict[str, str]) -> list[dict]:
    """`pulumi plugin ls --json`: what is installed under $PULUMI_HOME/plugins."""
    folder = Path(env.get("PULUMI_HOME") or Path.home() / ".pulumi") / "plugins"
    found = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        kind, _, rest = path.name.partition("-")
        name, _, version = rest.rpartition("-v")
        if not path.is_dir() or not name or path.name.endswith(".partial"):
            continue
        stamp = now_text()
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        found.append({
            "name": name, "kind": kind, "version": version, "size": size,
            "installTime": stamp, "lastUsedTime": stamp,
        })
    return found


def install_plugin(kind: str, name: str, version: str, file: str | None, env: dict) -> None:
    """`pulumi plugin install KIND NAME VERSION [-f FILE]`: no downloads, a file or a stub."""
    home = Path(env.get("PULUMI_HOME") or Path.home() / ".pulumi")
    target = home / "plugins" / f"{kind}-{name}-v{version.lstrip('v')}"
    target.mkdir(parents=True, exist_ok=True)
    binary = target / f"pulumi-{kind}-{name}"
    if file:
        shutil.copyfile(file, binary)
    else:
        binary.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(binary, 0o755)
