"""The `exoscale` provisioner over the runner and the stand-in Pulumi CLI: bring up, observe,
tear down, adoption after a restart, and repair after a crash mid-update."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime

import pytest
from pulumi.automation.errors import CommandError
from pulumi.automation.interface import API

from infra.errors import UpdateFailed
from infra.runner import StackRunner
from infra.workspace import cli_env, find_pulumi
from proxy.config import Config, ConfigError
from proxy.provision.base import ProvisionError
from proxy.provision.exoscale import ExoscaleProvisioner
from tests.doubles.standin_pulumi.harness import (
    ROOT,
    base_env,
    crash_mid_up,
    get_tags,
    settings_for,
    standin_world,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def standin(tmp_path):
    with standin_world(tmp_path) as world:
        yield world


def provisioner_for(world) -> ExoscaleProvisioner:
    """A fresh provisioner, as a restarted proxy makes one: same state dir, new objects."""
    runner = StackRunner(settings_for(world.port), world.state_dir, world.env, pulumi_root=ROOT)
    return ExoscaleProvisioner(runner)


@pytest.mark.slow
def test_bring_up_observe_and_tear_down(standin):
    provisioner = provisioner_for(standin)
    said: list[str] = []
    assert provisioner.observe() is None

    endpoint = provisioner.bring_up(said.append)

    assert endpoint.url == f"https://127.0.0.1:{standin.port}"
    assert endpoint.server_hostname and endpoint.token and "BEGIN CERTIFICATE" in endpoint.ca_cert
    assert endpoint.instance_status == "running"
    tags = get_tags(endpoint.url, endpoint.token, endpoint.ca_cert, endpoint.server_hostname)
    assert tags["models"][0]["name"] == "llama3.2:latest"
    assert provisioner.observe() == endpoint
    assert any("creating exoscale:ComputeInstance gpu" in s for s in said)

    provisioner.tear_down(said.append)

    assert provisioner.observe() is None
    assert standin.instances() == {}
    provisioner.tear_down(said.append)  # nothing to remove is success


@pytest.mark.slow
def test_a_restarted_proxy_adopts_the_instance_that_exists(standin):
    endpoint = provisioner_for(standin).bring_up(lambda _: None)
    (instance_id,) = standin.instances()

    restarted = provisioner_for(standin)

    assert restarted.observe() == endpoint
    assert restarted.bring_up(lambda _: None) == endpoint  # adopts, creates nothing
    assert list(standin.instances()) == [instance_id]


@pytest.mark.slow
def test_a_crash_mid_up_is_repaired_without_a_second_instance(standin):
    crash_mid_up(standin)  # leaves a lock, a pending create, and the instance in the cloud
    (orphan,) = standin.instances()
    assert standin.locks() and standin.checkpoint()["pending_operations"]
    said: list[str] = []

    endpoint = provisioner_for(standin).bring_up(said.append)

    assert list(standin.instances()) == [orphan]  # adopted, not created twice
    assert standin.locks() == []
    assert standin.checkpoint()["pending_operations"] == []
    assert any(s.startswith("clearing the stack lock left by an update that is gone") for s in said)
    assert f"adopting instance {orphan} into the stack" in said
    tags = get_tags(endpoint.url, endpoint.token, endpoint.ca_cert, endpoint.server_hostname)
    assert tags["models"]

    provisioner_for(standin).tear_down(lambda _: None)
    assert standin.instances() == {}


@pytest.mark.slow
def test_after_a_crash_the_stack_export_is_shaped_as_the_real_one(standin):
    crash_mid_up(standin)
    runner = StackRunner(settings_for(standin.port), standin.state_dir, standin.env,
                         pulumi_root=ROOT)
    runner.cancel()
    exported = runner.export_state()

    assert exported.version == 3
    (operation,) = exported.deployment["pending_operations"]
    assert operation["type"] == "creating"
    resource = operation["resource"]
    assert resource["type"] == "exoscale:index/computeInstance:ComputeInstance"
    assert resource["urn"].endswith("::gpu") and not resource.get("id")
    assert resource["inputs"]["zone"] == "at-vie-2" and not resource.get("outputs")
    (pending,) = runner.pending_creates()
    assert (pending.zone, pending.name) == ("at-vie-2", resource["inputs"]["name"])


@pytest.mark.slow
def test_an_adopted_instance_with_its_bare_id_fails_the_refresh_as_the_provider_does(standin):
    """What the adoption avoids: the bridge imports a resource with no outputs, and the
    Exoscale importer wants `<ID>@<ZONE>`."""
    crash_mid_up(standin)
    (orphan,) = standin.instances()
    runner = StackRunner(settings_for(standin.port), standin.state_dir, standin.env,
                         pulumi_root=ROOT)
    runner.cancel()
    (pending,) = runner.pending_creates()
    runner.adopt(pending, orphan)
    resource = next(r for r in runner.export_state().deployment["resources"]
                    if r["urn"] == pending.urn)
    assert resource["id"] == f"{orphan}@at-vie-2" and not resource.get("outputs")

    bare = runner.export_state()
    for resource in bare.deployment["resources"]:
        if resource["urn"] == pending.urn:
            resource["id"] = orphan
    runner.import_state(bare)
    with pytest.raises(UpdateFailed, match=r'invalid ID "[0-9a-f-]+", expected format'):
        runner.refresh(lambda _: None)


@pytest.mark.slow
def test_import_pending_creates_alone_would_forget_the_instance(standin):
    """Why the repair does not use `refresh --import-pending-creates`: the CLI marks the
    create as an import, and the refresh that follows drops it (see StackRunner.adopt)."""
    crash_mid_up(standin)
    (orphan,) = standin.instances()
    runner = StackRunner(settings_for(standin.port), standin.state_dir, standin.env,
                         pulumi_root=ROOT)
    runner.cancel()
    (pending,) = runner.pending_creates()
    cli = API(find_pulumi(standin.env, ROOT))
    env = cli_env(standin.env, runner.backend_url)

    with pytest.raises(CommandError, match="odd number of entries"):
        cli.refresh(stack=runner.stack_name, cwd=str(runner.work_dir), additional_env=env,
                    import_pending_creates=[pending.urn])
    cli.refresh(stack=runner.stack_name, cwd=str(runner.work_dir), additional_env=env,
                import_pending_creates=[pending.urn, f"{orphan}@at-vie-2"])

    deployment = runner.export_state().deployment
    assert deployment["pending_operations"] == []
    assert pending.urn not in [r["urn"] for r in deployment["resources"]]
    assert list(standin.instances()) == [orphan]  # still in the cloud, unknown to the stack


def test_a_live_lock_is_left_alone(standin):
    provisioner = provisioner_for(standin)
    provisioner.observe()  # creates the stack
    lock_dir = standin.backend / ".pulumi/locks/organization/ollama-exoscale/ollama-exoscale"
    lock_dir.mkdir(parents=True)
    (lock_dir / "live.json").write_text(json.dumps({
        "pid": os.getpid(), "username": "ops", "hostname": socket.gethostname(),
        "timestamp": datetime.now().astimezone().isoformat(),
    }))

    with pytest.raises(ProvisionError, match=r"locked by an update in progress \(pid"):
        provisioner.bring_up(lambda _: None)

    assert standin.locks() == [lock_dir / "live.json"]
    assert standin.instances() == {}


def test_a_name_that_is_no_server_name_fails_before_any_update(standin):
    provisioner = provisioner_for(standin)
    for call in (provisioner.bring_up, provisioner.stop, provisioner.tear_down):
        with pytest.raises(ProvisionError, match=r"not a server name: 'worker' \(expected gpu"):
            call(lambda _: None, server="worker")
    assert standin.instances() == {} and not standin.backend.exists()


def test_a_failed_up_is_a_provision_error_with_the_reason(standin):
    standin.env["STANDIN_FAIL_UP"] = "quota exceeded for gpua5000"

    with pytest.raises(ProvisionError, match="quota exceeded for gpua5000"):
        provisioner_for(standin).bring_up(lambda _: None)


def test_a_missing_cli_is_a_provision_error_saying_what_to_install(tmp_path):
    env = {**base_env(tmp_path), "PATH": str(tmp_path / "empty")}
    provisioner = ExoscaleProvisioner(StackRunner(settings_for(11434), tmp_path, env))

    with pytest.raises(ProvisionError, match=r"Pulumi CLI is not installed: install it"):
        provisioner.observe()
    with pytest.raises(ProvisionError, match=r"get\.pulumi\.com"):
        provisioner.bring_up(lambda _: None)


def test_from_config_builds_the_runner_from_the_proxy_environment(tmp_path):
    env = {"PROXY_STATE_DIR": str(tmp_path / "state"), "EXOSCALE_ALLOWED_CIDRS": "203.0.113.7",
           "EXOSCALE_ZONE": "ch-gva-2", "EXOSCALE_API_KEY": "k", "EXOSCALE_API_SECRET": "s"}

    runner = ExoscaleProvisioner.from_config(Config.from_env(env)).runner

    assert runner.settings.zone == "ch-gva-2"
    assert runner.settings.allowed_cidrs == ("203.0.113.7/32",)
    assert runner.backend_url == (tmp_path / "state" / "pulumi-backend").as_uri()
    assert runner.env["EXOSCALE_API_SECRET"] == "s"


def test_from_config_refuses_settings_the_program_cannot_use(tmp_path):
    env = {"PROXY_STATE_DIR": str(tmp_path), "EXOSCALE_ALLOWED_CIDRS": "not-a-network"}

    with pytest.raises(ConfigError, match="EXOSCALE_ALLOWED_CIDRS='not-a-network'"):
        ExoscaleProvisioner.from_config(Config.from_env(env))


def test_typical_cold_start_is_about_seven_minutes():
    assert ExoscaleProvisioner.name == "exoscale"
    assert 300 <= ExoscaleProvisioner.typical_cold_start <= 600
