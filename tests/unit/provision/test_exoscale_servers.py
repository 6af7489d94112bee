"""What the `exoscale` provisioner declares for each per-server call, over a runner that keeps
the stack as plain data (each `up` leaves exactly what infra/program.py declares for its
settings: the servers' instances and model volumes); quick, no CLI. The same calls against
the stand-in CLI: tests/integration/test_exoscale_fleet.py."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from infra import repair
from infra.names import model_volume_name
from infra.outputs import ServerOutputs, StackOutputs
from infra.settings import Settings
from proxy.provision.exoscale import ExoscaleProvisioner

URN = "urn:pulumi:ollama-exoscale::ollama-exoscale::"


class DataRunner:
    """The StackRunner calls the provisioner makes, on a stack held as data."""

    def __init__(self, volume_gb: int = 0):
        self.settings = Settings(allowed_cidrs=("203.0.113.7/32",), zone="de-fra-1",
                                 model_volume_gb=volume_gb)
        self.instances: dict[str, str] = {}  # server -> state
        self.volumes: set[str] = set()  # servers with a model volume
        self.ups: list[tuple[str, dict | None]] = []
        self.kept: list[set[str]] = []  # each update's servers left as they were made
        self.destroys = 0

    def export_state(self):
        resources = [{"urn": f"{URN}{repair.INSTANCE_TYPE}::{name}", "type": repair.INSTANCE_TYPE,
                      "inputs": {"state": state}} for name, state in self.instances.items()]
        resources += [{"urn": f"{URN}{repair.VOLUME_TYPE}::{model_volume_name(name)}",
                       "type": repair.VOLUME_TYPE} for name in self.volumes]
        return SimpleNamespace(deployment={"resources": resources, "pending_operations": []})

    def up(self, progress, *, instance_state="running", refresh=None, servers=None, kept=()):
        self.ups.append((instance_state, None if servers is None else dict(servers)))
        self.kept.append(set(kept))
        declared = dataclasses.replace(self.settings, instance_state=instance_state,
                                       servers=servers)
        self.instances = declared.declared_servers
        self.volumes = set(declared.server_names) if declared.model_volume_gb else set()
        return self.outputs() if self.instances else None

    def destroy(self, progress):
        self.destroys += 1
        self.instances, self.volumes = {}, set()

    def outputs(self):
        if not self.instances:
            return None
        servers = {name: ServerOutputs(f"https://192.0.2.{i + 1}:11434", f"192.0.2.{i + 1}",
                                       f"id-{name}", state)
                   for i, (name, state) in enumerate(self.instances.items())}
        first = next(iter(servers.values()))
        return StackOutputs(first.remote_url, first.public_ip, first.instance_id, "t" * 48,
                            "PEM", "ollama-exoscale.invalid", first.instance_state, servers)


@pytest.fixture
def runner():
    return DataRunner()


def quiet(_: str) -> None:
    pass


def test_bring_up_declares_the_servers_that_exist_plus_that_one(runner):
    provisioner = ExoscaleProvisioner(runner)
    provisioner.bring_up(quiet)
    runner.instances["gpu"] = "stopped"  # as a stop left it
    endpoint = provisioner.bring_up(quiet, server="gpu-2")

    assert runner.ups == [("running", {"gpu": "running"}),
                          ("running", {"gpu": "stopped", "gpu-2": "running"})]
    assert endpoint.url == "https://192.0.2.2:11434" and endpoint.instance_status == "running"
    assert provisioner.observe().instance_status == "stopped"  # the primary's, kept as it was


def test_each_update_leaves_the_other_servers_as_they_were_made(runner):
    provisioner = ExoscaleProvisioner(runner)
    provisioner.bring_up(quiet)
    provisioner.bring_up(quiet, server="gpu-1")
    provisioner.bring_up(quiet, server="gpu-2")
    provisioner.stop(quiet, server="gpu-1")
    provisioner.bring_up(quiet, server="gpu-1")  # started again: it is the one made anew
    provisioner.tear_down(quiet, server="gpu-2")

    assert runner.kept == [set(), {"gpu"}, {"gpu", "gpu-1"}, {"gpu", "gpu-1", "gpu-2"},
                           {"gpu", "gpu-2"}, {"gpu", "gpu-1"}]


def test_stop_declares_that_one_stopped_and_no_other_change(runner):
    provisioner = ExoscaleProvisioner(runner)
    provisioner.bring_up(quiet)
    provisioner.bring_up(quiet, server="gpu-1")
    runner.ups.clear()

    provisioner.stop(quiet, server="gpu-1")
    provisioner.stop(quiet, server="gpu-3")  # none such: no update at all

    assert runner.ups == [("running", {"gpu": "running", "gpu-1": "stopped"})]
    assert {n: e.instance_status for n, e in provisioner.observe_fleet().items()} == {
        "gpu": "running", "gpu-1": "stopped"}


def test_tear_down_declares_the_others_and_the_last_is_destroyed(runner):
    provisioner = ExoscaleProvisioner(runner)
    for name in ("gpu", "gpu-1", "gpu-2"):
        provisioner.bring_up(quiet, server=name)
    runner.ups.clear()

    provisioner.tear_down(quiet, server="gpu-1")
    provisioner.tear_down(quiet, server="gpu-1")  # gone already: no update
    provisioner.tear_down(quiet)
    assert provisioner.observe() is None and list(provisioner.observe_fleet()) == ["gpu-2"]
    provisioner.tear_down(quiet, server="gpu-2")

    assert runner.ups == [("running", {"gpu": "running", "gpu-2": "running"}),
                          ("running", {"gpu-2": "running"})]
    assert runner.destroys == 1 and provisioner.observe_fleet() == {}


def test_with_a_volume_the_last_keeps_its_volume_and_none_is_made():
    runner = DataRunner(volume_gb=20)
    provisioner = ExoscaleProvisioner(runner)
    provisioner.bring_up(quiet)
    provisioner.bring_up(quiet, server="gpu-1")
    provisioner.tear_down(quiet, server="gpu-1")
    assert runner.volumes == {"gpu"}
    provisioner.tear_down(quiet)
    assert runner.ups[-1] == ("absent", {"gpu": "running"}) and runner.volumes == {"gpu"}

    provisioner.bring_up(quiet, server="gpu-1")
    provisioner.tear_down(quiet, server="gpu-1")  # the last now: it keeps its own
    assert runner.volumes == {"gpu-1"} and runner.instances == {}
    provisioner.tear_down(quiet)  # nothing of gpu's: the kept one stays, no `models` made
    assert runner.ups[-1] == ("absent", {"gpu-1": "running"}) and runner.volumes == {"gpu-1"}
    assert runner.destroys == 0
