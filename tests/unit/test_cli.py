"""The console script's own commands (those that need no running proxy)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

from proxy.console import format_status, nothing_coming
from tests.doubles.standin_pulumi.harness import ROOT, base_env
from tests.harness import fake_ollama_command, free_port


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


def test_status_table_has_a_line_per_server_of_a_fleet():
    base = {"provisioning_status": "ready", "instance_status": "running", "provider": "local",
            "ollama_model": "llama3.2", "in_flight": 5, "idle_timeout": 60}
    fleet = format_status({**base, "fleet": {"max_servers": 3}, "servers": [
        {"name": "gpu", "phase": "ready", "in_flight": 3, "since": "2026-12-02T06:00:00+00:00",
         "gpu_seconds": 840, "upstream": "http://127.0.0.1:11435"},
        {"name": "gpu-1", "phase": "starting", "in_flight": 0, "since": None,
         "gpu_seconds": 30, "upstream": "http://127.0.0.1:11436"},
    ]})
    lines = fleet.splitlines()
    assert any(line.startswith("server gpu ") and "ready, 3 in flight" in line
               and "14 min GPU time (http://127.0.0.1:11435)" in line for line in lines), fleet
    assert any(line.startswith("server gpu-1") and "starting, 0 in flight" in line
               for line in lines), fleet
    one = format_status({**base, "servers": [{"name": "gpu", "phase": "ready"}]})
    assert "server gpu" not in one  # one server: the table of before fleets


def test_unknown_command_prints_usage(tmp_path):
    result = run_cli(env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "serve" in result.stdout


def local_env(tmp_path, **env: str) -> dict[str, str]:
    """`local` with no Pulumi CLI, plugins or Exoscale credentials anywhere."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PROXY_PROVISIONER": "local",
            "PROXY_STATE_DIR": str(tmp_path / "state"),
            "PROXY_LOCAL_ADDR": f"127.0.0.1:{free_port()}", **env}


def test_doctor_for_local_checks_only_what_local_needs_and_passes(tmp_path):
    env = local_env(tmp_path, PROXY_LOCAL_COMMAND=fake_ollama_command("--token", "hunter2"))

    result = run_cli("doctor", env=env)

    assert result.returncode == 0, result.stdout
    assert f"ok    local command: {sys.executable} is " in result.stdout
    assert f"ok    local address: {env['PROXY_LOCAL_ADDR']} is free" in result.stdout
    assert "ok    state dir" in result.stdout
    assert "pulumi" not in result.stdout.lower() and "Exoscale" not in result.stdout
    assert "hunter2" not in result.stdout + result.stderr  # the program, never its arguments


def test_doctor_for_local_names_a_missing_program_and_how_to_get_one(tmp_path):
    env = local_env(tmp_path, PROXY_LOCAL_COMMAND="no-such-ollama serve --token hunter2")

    result = run_cli("doctor", env=env)

    assert result.returncode == 1
    assert "FAIL  local command: no-such-ollama is not found on PATH" in result.stdout
    assert "fix: install Ollama (https://ollama.com/download)" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr


def test_doctor_for_local_refuses_a_program_that_is_not_executable(tmp_path):
    program = tmp_path / "ollama"
    program.write_text("#!/bin/sh\n")  # no x bit

    result = run_cli("doctor", env=local_env(tmp_path, PROXY_LOCAL_COMMAND=f"{program} serve"))

    assert result.returncode == 1
    assert f"FAIL  local command: {program} is not an executable file" in result.stdout
    assert f"fix: `chmod +x {program}`" in result.stdout


def test_doctor_for_local_refuses_an_address_another_program_listens_on(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as other:
        addr = f"127.0.0.1:{other.getsockname()[1]}"
        env = local_env(tmp_path, PROXY_LOCAL_COMMAND=fake_ollama_command(),
                        PROXY_LOCAL_ADDR=addr)

        result = run_cli("doctor", env=env)

    assert result.returncode == 1
    assert f"FAIL  local address: {addr} is in use by another program" in result.stdout
    assert "set PROXY_LOCAL_ADDR to a free address" in result.stdout


def test_doctor_for_local_refuses_an_address_not_of_this_host(tmp_path):
    env = local_env(tmp_path, PROXY_LOCAL_COMMAND=fake_ollama_command(),
                    PROXY_LOCAL_ADDR="192.0.2.1:11435")  # TEST-NET-1: on no host

    result = run_cli("doctor", env=env)

    assert result.returncode == 1
    assert "FAIL  local address: cannot listen on 192.0.2.1:11435" in result.stdout


def idle_status(**extra) -> dict:
    return {"provisioning_status": "idle", "warm_windows": {"timezone": "Europe/Vienna",
                                                            "next_start": None}, **extra}


def test_wait_waits_for_a_warm_window_that_starts_before_its_timeout():
    soon = datetime.fromtimestamp(time.time() + 600, timezone.utc).isoformat(timespec="minutes")
    status = idle_status(warm_windows={"timezone": "UTC", "next_start": soon})

    assert nothing_coming(status, left=1800, asked=False) == ""
    assert "wait --up" in nothing_coming(status, left=60, asked=False)  # too late for us


def test_wait_says_an_idle_proxy_gets_no_server_from_wait_itself_and_offers_up():
    why = nothing_coming(idle_status(), left=1800, asked=False)

    assert why.startswith("the GPU server is idle and no request asks for it")
    assert "`ollama-exoscale wait --up` (admin key)" in why
    assert nothing_coming(idle_status(), left=1800, asked=True) == ""  # `--up`: we asked
    assert nothing_coming({"provisioning_status": "starting"}, 1800, asked=False) == ""


def test_wait_says_a_used_up_budget_starts_nothing_even_when_asked():
    status = idle_status(gpu={"budget_used_up": True})

    why = nothing_coming(status, left=1800, asked=True)

    assert "daily GPU budget is used up" in why and "midnight (Europe/Vienna)" in why
