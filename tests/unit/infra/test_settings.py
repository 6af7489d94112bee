"""Zones, instance types and block storage as Exoscale has them, and one owner per variable:
the proxy's `Config` and the program's `Settings` read OLLAMA_MODEL and EXOSCALE_* alike."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infra.checks import BLOCK_STORAGE_ZONES, INSTANCE_FAMILIES, INSTANCE_SIZES, ZONES
from infra.settings import Settings, SettingsError
from proxy.config import Config, ConfigError
from tests.doubles.standin_pulumi.harness import ROOT, base_env

CIDRS = ("203.0.113.7/32",)


@pytest.mark.parametrize("zone, instance_type", [
    ("ch-dk-2", "gpurtx6000pro.small"), ("hr-zag-1", "gpurtx6000pro.large"),
    ("de-fra-1", "gpu3.small"), ("at-vie-2", "gpua5000.small"),
    ("bg-sof-1", "standard.extra-large"),
    ("de-muc-1", "gpub300.titan48c"),
])
def test_exoscales_zones_and_instance_types_are_accepted(zone, instance_type):
    settings = Settings(zone=zone, instance_type=instance_type, allowed_cidrs=CIDRS)
    assert (settings.zone, settings.instance_type) == (zone, instance_type)


@pytest.mark.parametrize("field, value, listed", [
    ("zone", "ch-dk-9", ZONES), ("zone", "AT-VIE-2", ZONES),
    ("instance_type", "gpua5000.xlarge", INSTANCE_SIZES),
    ("instance_type", "a5000.small", INSTANCE_FAMILIES),
    ("instance_type", "gpua5000", INSTANCE_FAMILIES),
])
def test_other_zones_and_types_are_refused_with_the_list(field, value, listed):
    with pytest.raises(SettingsError) as caught:
        Settings(allowed_cidrs=CIDRS, **{field: value})
    message = str(caught.value)
    assert message.startswith(f"{field}={value!r} is not valid:")
    assert ", ".join(listed) in message and "\n" not in message


def test_a_model_volume_where_exoscale_has_no_block_storage_is_refused_naming_the_zones():
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"EXOSCALE_ALLOWED_CIDRS": "203.0.113.7", "PROXY_MODEL_VOLUME_GB": "50"})
    message = str(caught.value)
    assert message.startswith("PROXY_MODEL_VOLUME_GB=50 is not valid:")
    assert ", ".join(BLOCK_STORAGE_ZONES) in message and "at-vie-2" in message
    for zone in BLOCK_STORAGE_ZONES:
        assert Settings(zone=zone, model_volume_gb=50, allowed_cidrs=CIDRS).model_volume_gb == 50


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def volume_env(tmp_path) -> dict[str, str]:
    env = base_env(tmp_path)
    env.update(PATH=f"{ROOT / 'bin'}:{os.environ['PATH']}", PROXY_STATE_DIR=str(tmp_path / "s"),
               EXOSCALE_ALLOWED_CIDRS="203.0.113.7/32", PROXY_MODEL_VOLUME_GB="50",
               PROXY_BIND="127.0.0.1:9")
    return env


def test_serve_refuses_a_model_volume_in_the_default_zone_in_one_line(tmp_path):
    result = run_cli("serve", env=volume_env(tmp_path))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert "PROXY_MODEL_VOLUME_GB=50" in line and ", ".join(BLOCK_STORAGE_ZONES) in line


def test_doctor_refuses_a_model_volume_in_the_default_zone_in_one_line(tmp_path):
    result = run_cli("doctor", env=volume_env(tmp_path))
    assert result.returncode == 1
    (line,) = [line for line in result.stdout.splitlines() if "PROXY_MODEL_VOLUME_GB" in line]
    assert line.startswith("FAIL") and ", ".join(BLOCK_STORAGE_ZONES) in line


@pytest.mark.parametrize("variable, value", [
    ("EXOSCALE_DISK_SIZE", "20"),  # the proxy took >= 10, the program >= 50
    ("OLLAMA_MODEL", "llama3.2;reboot"),  # the proxy took any name without spaces
    ("OLLAMA_MODEL", "llama 3"),
    ("EXOSCALE_ZONE", "ch-dk-9"),
    ("EXOSCALE_INSTANCE_TYPE", "gpua5000"),
])
def test_the_proxy_refuses_a_shared_variable_with_the_programs_own_message(variable, value):
    with pytest.raises(SettingsError) as by_program:
        Settings.from_env({"EXOSCALE_ALLOWED_CIDRS": "203.0.113.7", variable: value})
    with pytest.raises(ConfigError) as by_proxy:
        Config.from_env({variable: value})
    assert str(by_proxy.value) == str(by_program.value)


def test_the_proxy_reads_shared_variables_as_the_program_does():
    env = {"OLLAMA_MODEL": "llama3.2, qwen3:8b", "EXOSCALE_ZONE": "ch-dk-2",
           "EXOSCALE_INSTANCE_TYPE": "gpurtx6000pro.small", "EXOSCALE_DISK_SIZE": "200",
           "EXOSCALE_TEMPLATE": " Linux Ubuntu 24.04 LTS 64-bit "}
    config = Config.from_env(env)
    settings = Settings.from_env({**env, "EXOSCALE_ALLOWED_CIDRS": "203.0.113.7"})
    for field in ("models", "zone", "instance_type", "disk_size", "template"):
        assert getattr(config, field) == getattr(settings, field), field
    assert Config.from_env({}).models == Settings.models == ("llama3.2",)


def test_template_visibility_is_public_by_default_and_private_when_set():
    assert Settings(allowed_cidrs=CIDRS).template_visibility == "public"
    settings = Settings.from_env({"EXOSCALE_ALLOWED_CIDRS": "203.0.113.7",
                                  "EXOSCALE_TEMPLATE": "ollama-exoscale-20260101-1200",
                                  "EXOSCALE_TEMPLATE_VISIBILITY": "private"})
    assert (settings.template, settings.template_visibility) == (
        "ollama-exoscale-20260101-1200", "private")


def test_another_template_visibility_is_refused_naming_the_variable_and_the_choices():
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"EXOSCALE_ALLOWED_CIDRS": "203.0.113.7",
                           "EXOSCALE_TEMPLATE_VISIBILITY": "Private"})
    message = str(caught.value)
    assert message.startswith("EXOSCALE_TEMPLATE_VISIBILITY='Private' is not valid:")
    assert "public" in message and "private" in message and "\n" not in message
