"""`ollama-exoscale doctor --preview`: a `pulumi preview` of the real program (the stand-in CLI
here) that creates nothing, says what `pulumi up` would do, or the provider's error in a line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infra.errors import UpdateFailed
from infra.runner import StackRunner
from tests.doubles.standin_pulumi.harness import ROOT, base_env, settings_for, standin_world

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def standin(tmp_path):
    with standin_world(tmp_path) as world:
        yield world


def runner_for(world, **settings) -> StackRunner:
    return StackRunner(settings_for(world.port, **settings), world.state_dir, world.env,
                       pulumi_root=ROOT)


def test_a_preview_says_what_up_would_create_and_creates_nothing(standin):
    said: list[str] = []
    changes = runner_for(standin).preview(said.append)

    assert changes == {"create": 6}  # token, key, certificate, firewall, its rule, instance
    assert "would create exoscale:ComputeInstance gpu" in said
    assert "would create random:RandomPassword token" in said
    assert said[-1].startswith("pulumi preview finished in ") and "to create" in said[-1]
    assert standin.instances() == {} and standin.cloud().get("groups", {}) == {}
    assert standin.checkpoint()["resources"] == [] and standin.locks() == []


def test_a_preview_after_up_plans_nothing(standin):
    runner = runner_for(standin)
    runner.up(lambda _: None)
    said: list[str] = []
    changes = runner.preview(said.append)
    assert set(changes) == {"same"}
    assert not any(s.startswith("would ") for s in said)


def test_a_template_missing_in_the_zone_is_the_providers_error_in_one_line(standin):
    with pytest.raises(UpdateFailed) as caught:
        runner_for(standin, template="Linux Ubuntu 26.04 LTS 64-bit").preview(lambda _: None)
    message = str(caught.value)
    assert message.startswith("pulumi preview failed:") and "resource not found" in message
    assert "\n" not in message


def doctor_preview(tmp_path, **env) -> subprocess.CompletedProcess:
    full = base_env(tmp_path)
    full.update(PATH=f"{ROOT / 'bin'}:{os.environ['PATH']}", PROXY_STATE_DIR=str(tmp_path / "s"),
                EXOSCALE_ALLOWED_CIDRS="203.0.113.7/32", **env)
    return subprocess.run([sys.executable, "-m", "proxy.cli", "doctor", "--preview"], env=full,
                          capture_output=True, text=True, timeout=120)


def test_doctor_preview_prints_what_up_would_create(tmp_path):
    result = doctor_preview(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if "preview:" in line)
    assert line == "ok    preview: `pulumi up` would create 6"
    assert "      would create exoscale:ComputeInstance gpu" in result.stdout.splitlines()
    assert base_env(tmp_path)["EXOSCALE_API_SECRET"] not in result.stdout + result.stderr


def test_doctor_preview_shows_the_providers_error_and_fails(tmp_path):
    result = doctor_preview(tmp_path, EXOSCALE_TEMPLATE="Linux Ubuntu 26.04 LTS 64-bit")
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert line.startswith("FAIL  preview: pulumi preview failed:")
    assert "resource not found" in line
