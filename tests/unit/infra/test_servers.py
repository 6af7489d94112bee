"""Stack config `servers`: the GPU servers the program declares, checked, and what each gets
(its instance and model volume; the firewall, token and certificate shared), with Pulumi's
mocks as in test_program.py."""

from __future__ import annotations

import runpy

import pulumi
import pytest

from infra.settings import Settings, SettingsError
from proxy.provision.base import server_name
from tests.unit.infra import test_program as base

INSTANCE, VOLUME, CERT = base.INSTANCE, base.VOLUME, base.CERT
SECURITY_GROUP, PASSWORD, PRIVATE_KEY = base.SECURITY_GROUP, base.PASSWORD, base.PRIVATE_KEY
run_program = base.run_program  # the fixture
stack_config = base.stack_config  # the fixture
settings = base.settings


def by_name(run, typ: str) -> dict[str, dict]:
    return {r.name: r.inputs for r in run.mocks.of_type(typ)}


# -- the setting ------------------------------------------------------------------------------


def test_without_servers_the_one_server_is_the_primary():
    s = settings()
    assert s.servers is None
    assert s.declared_servers == {"gpu": "running"}
    assert settings(instance_state="stopped").declared_servers == {"gpu": "stopped"}
    assert settings(instance_state="absent").declared_servers == {}


def test_a_list_takes_the_instance_state_and_an_object_gives_each_its_own():
    assert settings(servers=["gpu-1", "gpu"]).servers == {"gpu": "running", "gpu-1": "running"}
    assert settings(servers=("gpu", "gpu-2"), instance_state="stopped").servers == {
        "gpu": "stopped", "gpu-2": "stopped"}
    mixed = settings(servers={"gpu-10": "running", "gpu-2": "stopped"})
    assert list(mixed.servers) == ["gpu-2", "gpu-10"]  # by index, not by text
    assert mixed.declared_servers == {"gpu-2": "stopped", "gpu-10": "running"}
    absent = settings(servers={"gpu-1": "running"}, instance_state="absent")
    assert absent.declared_servers == {} and absent.server_names == ("gpu-1",)


@pytest.mark.parametrize(("servers", "shown", "accepted"), [
    (["gpu", "gpu-01"], "'gpu-01'", "expected server names gpu, gpu-1, gpu-2, ..."),
    (["GPU"], "'GPU'", "expected server names gpu, gpu-1"),
    (["gpu-1", "worker"], "'worker'", "expected server names gpu, gpu-1"),
    (["gpu-0"], "'gpu-0'", "expected server names"),
    (["gpu", "gpu"], "'gpu,gpu'", "gpu is named twice: name each server once"),
    ([], "''", "expected at least one server name, like gpu; to remove every server run "
               "`pulumi destroy`, or set instanceState to absent"),
    ({"gpu": "paused"}, "'gpu=paused'", "expected a state of running or stopped"),
    ({"gpu": "absent"}, "'gpu=absent'", "expected a state of running or stopped"),
])
def test_bad_servers_are_refused_naming_the_value_and_the_fix(servers, shown, accepted):
    with pytest.raises(SettingsError) as caught:
        settings(servers=servers)
    assert caught.value.setting == "servers"
    assert str(caught.value).startswith(f"servers={shown} is not valid: {accepted}")


def test_names_are_the_ones_the_proxy_gives():
    names = [server_name(i) for i in range(12)]
    assert list(settings(servers=names).servers) == names


def test_servers_come_from_the_stack_config_never_from_the_environment(stack_config):
    env = {"EXOSCALE_ALLOWED_CIDRS": "203.0.113.7", "SERVERS": "gpu-1", "EXOSCALE_SERVERS": "x"}
    assert Settings.from_env(env).servers is None
    for raw, expected in [
        ('["gpu", "gpu-1"]', {"gpu": "running", "gpu-1": "running"}),  # --path servers[0] …
        ("gpu, gpu-2", {"gpu": "running", "gpu-2": "running"}),
        ('{"gpu": "stopped", "gpu-1": "running"}', {"gpu": "stopped", "gpu-1": "running"}),
    ]:
        stack_config(allowedCidrs="203.0.113.7/32", servers=raw)
        assert Settings.from_pulumi_config().servers == expected


@pytest.mark.parametrize(("raw", "message"), [
    ('["gpu", "gpu-x"]', "ollama-exoscale:servers='gpu-x' is not valid: expected server names"),
    ('{"gpu": 1}', "ollama-exoscale:servers='gpu=1' is not valid: expected a state of running"),
    ("[]", "ollama-exoscale:servers='' is not valid: expected at least one server name"),
    ('{"gpu": ', "ollama-exoscale:servers='{\"gpu\":' is not valid: expected a JSON object"),
])
def test_bad_stack_config_names_the_key(stack_config, raw, message):
    stack_config(allowedCidrs="203.0.113.7/32", servers=raw)
    with pytest.raises(SettingsError) as caught:
        Settings.from_pulumi_config()
    assert str(caught.value).startswith(message)


# -- the program ------------------------------------------------------------------------------


def test_the_list_with_only_gpu_declares_exactly_what_no_list_declares(run_program):
    """The proxy always passes a map: for the primary alone it must be today's stack."""
    today = run_program(settings(zone="de-fra-1", model_volume_gb=20), stack="one")
    listed = run_program(settings(zone="de-fra-1", model_volume_gb=20, servers=["gpu"]),
                         stack="one")
    def declared(run):
        return sorted((r.typ, r.name, repr(r.inputs)) for r in run.mocks.resources)

    assert declared(listed) == declared(today)
    assert listed.exports == today.exports


def test_each_server_is_an_instance_sharing_firewall_token_and_certificate(run_program):
    run = run_program(settings(servers={"gpu": "running", "gpu-1": "stopped", "gpu-2": "running"}))
    instances = by_name(run, INSTANCE)
    assert list(instances) == ["gpu", "gpu-1", "gpu-2"]
    assert {n: i["name"] for n, i in instances.items()} == {
        "gpu": "ollama-exoscale", "gpu-1": "ollama-exoscale-gpu-1",
        "gpu-2": "ollama-exoscale-gpu-2"}
    assert {n: i["state"] for n, i in instances.items()} == {
        "gpu": "running", "gpu-1": "stopped", "gpu-2": "running"}
    for typ in (SECURITY_GROUP, PASSWORD, PRIVATE_KEY, CERT):
        run.mocks.one(typ)  # one each, whatever the count of servers
    assert {tuple(i["securityGroupIds"]) for i in instances.values()} == {("firewall-id",)}
    assert len({base.plain(i["userData"]) for i in instances.values()}) == 1  # one token
    for name in instances:  # each goes before its replacement: one GPU of the quota each
        assert run.mocks.delete_before_replace[name] is True
        assert run.mocks.replace_on_changes[name] == ["userData"]
    assert run.mocks.of_type(VOLUME) == []


def test_a_server_without_the_primary_is_named_after_itself(run_program):
    run = run_program(settings(servers=["gpu-3"]), stack="dev")
    (instance,) = run.mocks.of_type(INSTANCE)
    assert (instance.name, instance.inputs["name"]) == ("gpu-3", "ollama-exoscale-dev-gpu-3")
    assert instance.inputs["labels"] == {"managed-by": "ollama-exoscale", "stack": "dev"}


def test_long_object_names_keep_the_servers_suffix_within_a_hostname(run_program):
    run = run_program(settings(name="a" * 40, servers=["gpu", "gpu-12"]), stack="s" * 40)
    names = {n: i["name"] for n, i in by_name(run, INSTANCE).items()}
    assert len(names["gpu"]) == 63 and names["gpu"].startswith("a" * 40)
    assert len(names["gpu-12"]) <= 63 and names["gpu-12"].endswith("-gpu-12")
    assert names["gpu"] != names["gpu-12"]


def test_each_server_has_its_own_model_volume(run_program):
    run = run_program(settings(zone="de-fra-1", model_volume_gb=30, servers=["gpu", "gpu-1"]))
    volumes = by_name(run, VOLUME)
    assert {n: v["name"] for n, v in volumes.items()} == {
        "models": "ollama-exoscale-models", "models-gpu-1": "ollama-exoscale-gpu-1-models"}
    assert {v["size"] for v in volumes.values()} == {30}
    instances = by_name(run, INSTANCE)
    assert instances["gpu"]["blockStorageVolumeIds"] == ["models-id"]
    assert instances["gpu-1"]["blockStorageVolumeIds"] == ["models-gpu-1-id"]
    assert run.exports["model_volume_id"][0] == "models-id"


def test_absent_keeps_the_volumes_of_the_servers_named(run_program):
    run = run_program(settings(zone="de-fra-1", model_volume_gb=30, servers=["gpu-1"],
                               instance_state="absent"))
    assert run.mocks.of_type(INSTANCE) == []
    assert list(by_name(run, VOLUME)) == ["models-gpu-1"]
    assert {k: v for k, (v, _) in run.exports.items()} == {"model_volume_id": "models-gpu-1-id"}


def test_outputs_describe_the_primary_and_map_every_server(run_program):
    run = run_program(settings(port=8443, servers={"gpu-1": "stopped", "gpu": "running"}))
    values = {name: value for name, (value, _) in run.exports.items()}
    assert set(values) == base.OUTPUT_NAMES
    assert (values["instance_id"], values["instance_state"]) == ("gpu-id", "running")
    assert values["servers"] == {
        name: {"remote_url": f"https://{base.PUBLIC_IP}:8443", "public_ip": base.PUBLIC_IP,
               "instance_id": f"{name}-id", "instance_state": state}
        for name, state in (("gpu", "running"), ("gpu-1", "stopped"))}
    secret = {name for name, (_, is_secret) in run.exports.items() if is_secret}
    assert secret == {"token"}  # the map holds no secret


def test_without_the_primary_outputs_describe_the_first_server(run_program):
    run = run_program(settings(servers=["gpu-4", "gpu-2"]))
    values = {name: value for name, (value, _) in run.exports.items()}
    assert values["instance_id"] == "gpu-2-id"
    assert list(values["servers"]) == ["gpu-2", "gpu-4"]


def test_pulumi_up_by_hand_declares_the_servers_of_the_stack_config(stack_config):
    mocks = base.CloudMocks()
    pulumi.runtime.set_mocks(mocks, project="ollama-exoscale", stack="dev", preview=False)
    stack_config(allowedCidrs="203.0.113.7/32", servers='["gpu", "gpu-1"]')

    @pulumi.runtime.test
    def run_main():
        runpy.run_path(str(base.MAIN), run_name="__main__")

    run_main()
    assert sorted(r.name for r in mocks.of_type(INSTANCE)) == ["gpu", "gpu-1"]
