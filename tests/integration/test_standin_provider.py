"""The stand-in applies the pinned Exoscale provider's own rules (terraform-provider-exoscale
0.66.0), and the runner keeps within them: the user data's encoded size, `family.size` types,
the provider's zones, and a stop that Exoscale refuses on a stopped instance."""

from __future__ import annotations

import os
import signal

import pulumi
import pulumiverse_exoscale as exoscale
import pytest

from infra.errors import UpdateFailed
from infra.runner import StackRunner
from tests.doubles.standin_pulumi.cloud import Cloud
from tests.doubles.standin_pulumi.harness import ROOT, settings_for, standin_world

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def standin(tmp_path):
    with standin_world(tmp_path) as world:
        yield world


def instance_program(**inputs):
    """A program with one compute instance of these inputs (the stand-in boots none that
    fails the provider's checks)."""

    def program() -> None:
        group = exoscale.SecurityGroup("firewall", name="t")
        exoscale.SecurityGroupRule("port", security_group_id=group.id, type="INGRESS",
                                   protocol="TCP", start_port=8443, end_port=8443,
                                   cidr="127.0.0.1/32")
        exoscale.ComputeInstance("gpu", **{
            "name": "t", "zone": "at-vie-2", "type": "gpua5000.small", "template_id": "tpl",
            "disk_size": 50, "security_group_ids": [group.id], "user_data": "#cloud-config\n",
            **inputs,
        }, opts=pulumi.ResourceOptions())

    return program


@pytest.mark.parametrize("inputs, refused", [
    ({"type": "gpua5000"}, 'invalid value "gpua5000", expected format "FAMILY.SIZE"'),
    ({"zone": "ch-dk-9"}, 'expected zone to be one of ["ch-gva-2", "ch-dk-2"'),
    ({"disk_size": 5}, "expected disk_size to be at least (10), got 5"),
    # 26 KB of cloud-config: below 32 KiB raw, above the limit once base64-encoded.
    ({"user_data": "#cloud-config\n" + "# x\n" * 6600},
     "user-data maximum allowed length is 32768 bytes"),
])
def test_the_stand_in_refuses_what_the_provider_refuses(standin, inputs, refused):
    runner = StackRunner(None, standin.state_dir, standin.env, pulumi_root=ROOT,
                         program=instance_program(**inputs))
    with pytest.raises(UpdateFailed) as caught:
        runner.up(lambda _: None)
    assert refused in str(caught.value)
    assert standin.instances() == {}


def stop_behind_the_stacks_back(world) -> None:
    """The instance stopped in the cloud (the console, `exo`, a stop that timed out) while
    the stack still says running."""
    with Cloud(world.backend, {}).objects() as data:
        (record,) = data["instances"].values()
        pid, record["state"], record["pid"] = record["pid"], "stopped", None
    os.killpg(pid, signal.SIGKILL)


def test_declaring_stopped_an_instance_that_is_stopped_already_changes_nothing(standin):
    runner = StackRunner(settings_for(standin.port), standin.state_dir, standin.env,
                         pulumi_root=ROOT)
    runner.up(lambda _: None)
    stop_behind_the_stacks_back(standin)

    # Without reading the state back first, the provider stops it again and Exoscale refuses.
    with pytest.raises(UpdateFailed, match="Only running instances can be stopped"):
        runner.up(lambda _: None, instance_state="stopped", refresh=False)

    said: list[str] = []
    outputs = runner.up(said.append, instance_state="stopped")  # refreshes first

    assert outputs.instance_state == "stopped"
    assert not any("updating exoscale:ComputeInstance" in s for s in said), said
    (record,) = standin.instances().values()
    assert record["state"] == "stopped" and not record["pid"]

    runner.up(lambda _: None)  # and it starts again as declared
    (record,) = standin.instances().values()
    assert record["state"] == "running" and record["pid"]
