"""The console script's own commands (those that need no running proxy)."""

from __future__ import annotations

import os
import subprocess
import sys

from proxy.cli import format_status
from tests.standin_pulumi.harness import ROOT, base_env


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], env=env, capture_output=True, text=True,
        timeout=60,
    )


def test_doctor_says_what_is_missing_and_how_to_fix_it(tmp_path):
    result = run_cli("doctor", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                    "PROXY_STATE_DIR": str(tmp_path / "state")})
    assert result.returncode == 1
    assert "FAIL  pulumi CLI" in result.stdout and "fix: install the Pulumi CLI" in result.stdout
    assert "FAIL  Exoscale credentials" in result.stdout
    assert "EXOSCALE_ALLOWED_CIDRS" in result.stdout


def test_doctor_passes_when_everything_is_there(tmp_path):
    env = base_env(tmp_path)
    env.update(PATH=f"{ROOT / 'bin'}:{os.environ['PATH']}", PROXY_STATE_DIR=str(tmp_path / "s"),
               EXOSCALE_ALLOWED_CIDRS="203.0.113.7/32")
    result = run_cli("doctor", env=env)
    assert result.returncode == 0, result.stdout
    assert "FAIL" not in result.stdout
    assert env["EXOSCALE_API_SECRET"] not in result.stdout + result.stderr


def test_status_table_reads_for_a_person():
    table = format_status({
        "provisioning_status": "ready", "detail": "ready", "instance_status": "running",
        "remote_url": "https://203.0.113.7:11434", "provider": "exoscale",
        "instance_type": "gpua5000.small", "zone": "at-vie-2", "ollama_model": "llama3.2",
        "in_flight": 2, "idle_timeout": 1800, "idle_seconds_left": 1800,
        "cold_starts": {"count": 3, "last": 412.2, "median": 398.0},
    })
    assert "phase" in table and "ready" in table
    assert "gpua5000.small in at-vie-2" in table
    assert "3 (last 412 s, median 398 s)" in table


def test_unknown_command_prints_usage(tmp_path):
    result = run_cli(env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "serve" in result.stdout
