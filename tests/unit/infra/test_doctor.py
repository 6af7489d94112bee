"""`doctor`'s checks pass with the stand-in CLI and fail, each with a fix, when the CLI, a plugin,
the credentials or a writable state dir is missing; secrets are never shown."""

from __future__ import annotations

import os

import pytest

from infra.doctor import Check, run_checks
from tests.doubles.standin_pulumi.harness import (
    API_KEY,
    API_SECRET,
    ROOT,
    base_env,
    install_plugins,
)

NAMES = [
    "pulumi CLI", "plugin exoscale", "plugin random", "plugin tls", "Exoscale credentials",
    "state dir", "state backend",
]


@pytest.fixture
def env(tmp_path):
    """The stand-in found on PATH, as `doctor` finds a real CLI."""
    env = base_env(tmp_path)
    env["PATH"] = f"{ROOT / 'bin'}{os.pathsep}{env['PATH']}"
    return env


def by_name(checks: list[Check]) -> dict[str, Check]:
    assert [c.name for c in checks] == NAMES
    return {c.name: c for c in checks}


def test_every_check_passes_with_the_stand_in(env, tmp_path):
    checks = by_name(run_checks(env, tmp_path / "state"))

    assert all(c.ok for c in checks.values()), [c for c in checks.values() if not c.ok]
    assert "pulumi 3.272.0" in checks["pulumi CLI"].detail
    assert checks["plugin exoscale"].detail == "resource plugin exoscale 0.66.1 is installed"
    assert checks["state backend"].detail.startswith("file://")
    shown = repr(checks)
    assert API_KEY not in shown and API_SECRET not in shown


def test_a_missing_cli_fails_with_how_to_install_it(env, tmp_path):
    env["PATH"] = str(tmp_path / "empty")

    checks = by_name(run_checks(env, tmp_path / "state"))

    assert not checks["pulumi CLI"].ok
    assert "get.pulumi.com" in checks["pulumi CLI"].fix
    assert not checks["plugin exoscale"].ok
    assert checks["plugin exoscale"].fix == "install the Pulumi CLI first"
    assert checks["state dir"].ok and checks["state backend"].ok  # file backend: no CLI needed


def test_an_old_cli_fails_with_how_to_upgrade(env, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_PULUMI_VERSION", "3.150.0")

    check = by_name(run_checks(env, tmp_path / "state"))["pulumi CLI"]

    assert not check.ok and "3.150.0" in check.detail
    assert "upgrade to 3.181.0 or newer" in check.fix


def test_a_missing_plugin_fails_with_the_install_command(env, tmp_path):
    home = tmp_path / "other-home"
    install_plugins(home, skip=("exoscale",))
    env["PULUMI_HOME"] = str(home)

    checks = by_name(run_checks(env, tmp_path / "state"))

    exoscale = checks["plugin exoscale"]
    assert not exoscale.ok and exoscale.detail == "resource plugin exoscale 0.66.1 is missing"
    assert exoscale.fix.startswith("`pulumi plugin install resource exoscale 0.66.1 --server ")
    assert "-f pulumi-resource-exoscale-v0.66.1-linux-amd64.tar.gz" in exoscale.fix
    assert checks["plugin random"].ok and checks["plugin tls"].ok


def test_missing_credentials_fail_naming_the_variable(env, tmp_path):
    del env["EXOSCALE_API_SECRET"]

    check = by_name(run_checks(env, tmp_path / "state"))["Exoscale credentials"]

    assert not check.ok and check.detail == "EXOSCALE_API_SECRET not set"
    assert "EXOSCALE_API_KEY and EXOSCALE_API_SECRET" in check.fix
    assert API_KEY not in check.detail + check.fix


def test_an_unwritable_state_dir_fails_with_the_variable_to_set(env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file, even by root

    checks = by_name(run_checks(env, blocker / "state"))

    assert not checks["state dir"].ok and "PROXY_STATE_DIR" in checks["state dir"].fix
    assert not checks["state backend"].ok
    assert "PULUMI_BACKEND_URL" in checks["state backend"].fix


def test_an_unreachable_backend_fails_without_showing_its_password(env, tmp_path):
    env["PULUMI_BACKEND_URL"] = "s3://user:hunter22@bucket?endpoint=sos-at-vie-2.exo.io"

    check = by_name(run_checks(env, tmp_path / "state"))["state backend"]

    assert not check.ok and "hunter22" not in check.detail
    assert "s3ForcePathStyle=true" in check.fix
