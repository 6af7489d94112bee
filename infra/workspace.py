"""Where the Pulumi CLI, its plugins, the backend and the credentials come from.

What a `StackRunner` needs before a stack exists: the CLI (a minimum version), the resource
plugins the program's provider packages ask for, the backend (a `file://` backend in the state
dir unless PULUMI_BACKEND_URL says otherwise), the CLI's environment and the secrets to scrub.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pulumi.automation as auto
from pulumi.automation.errors import InvalidVersionError
from semver import VersionInfo

from infra.errors import CredentialsMissing, PulumiNotInstalled, PulumiTooOld
from infra.settings import PROJECT
from proxy.util.secrets import Scrubber

DEFAULT_STACK = PROJECT
# Inline `refresh` and `destroy` pass `--client`, which the CLI understands from 3.181.
MINIMUM_CLI = VersionInfo(3, 181, 0)
# The provider packages the program uses: their plugins must be installed beforehand.
PROVIDER_PACKAGES = {
    "exoscale": "pulumiverse_exoscale",
    "random": "pulumi_random",
    "tls": "pulumi_tls",
}
SECRET_ENV = (
    "EXOSCALE_API_KEY", "EXOSCALE_API_SECRET", "PULUMI_CONFIG_PASSPHRASE",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PULUMI_ACCESS_TOKEN",
)

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


def require_credentials(env: Mapping[str, str]) -> None:
    missing = missing_credentials(env)
    if missing:
        raise CredentialsMissing(
            f"Exoscale credentials are missing: set {' and '.join(missing)} (an API key "
            "allowed to manage compute instances and security groups)"
        )


def scrubber(env: Mapping[str, str]) -> Scrubber:
    """A scrubber that knows the secrets of `env` (credentials, passphrase, tokens)."""
    return Scrubber(env.get(name) for name in SECRET_ENV)


def cli_env(env: Mapping[str, str], backend: str) -> dict[str, str]:
    """The CLI's environment: `env`, plus the backend and the switches for unattended use."""
    env = dict(env)
    env["PULUMI_BACKEND_URL"] = backend
    if "PULUMI_CONFIG_PASSPHRASE" not in env and "PULUMI_CONFIG_PASSPHRASE_FILE" not in env:
        env["PULUMI_CONFIG_PASSPHRASE"] = ""  # the passphrase provider insists on one
    env.setdefault("PULUMI_SKIP_UPDATE_CHECK", "true")
    env.setdefault("PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION", "true")
    return env


_SELECT_LOCK = threading.Lock()  # create/select writes workspace files: one at a time


@contextlib.contextmanager
def selecting(work_dir: Path) -> Iterator[None]:
    """Serialise stack selection across threads and across processes sharing the work dir."""
    with _SELECT_LOCK, open(work_dir / ".select.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
