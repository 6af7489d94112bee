"""A server's resource names (infra/names.py) and reading them back from a state
(infra/repair.py `instance_states`, `volume_servers`): what the provisioner declares again."""

from __future__ import annotations

from infra import repair
from infra.names import model_volume_name, server_object_name, volume_server
from proxy.provision.base import server_name

URN = "urn:pulumi:ollama-exoscale::ollama-exoscale::"


def resource(typ: str, name: str, **inputs) -> dict:
    return {"urn": f"{URN}{typ}::{name}", "type": typ, "inputs": inputs, "outputs": {}}


def test_volume_names_go_both_ways_for_every_server():
    for server in (server_name(i) for i in range(12)):
        assert volume_server(model_volume_name(server)) == server
    assert model_volume_name("gpu") == "models"  # the one volume before fleets
    for other in ("models-gpu", "models-gpu-01", "models-x", "modelsgpu-1", "firewall"):
        assert volume_server(other) is None


def test_server_object_names():
    assert server_object_name("ollama-exoscale", "gpu") == "ollama-exoscale"
    assert server_object_name("ollama-exoscale", "gpu-2") == "ollama-exoscale-gpu-2"
    assert server_object_name("a" * 63, "gpu-11") == "a" * 56 + "-gpu-11"


def test_the_state_says_which_servers_hold_an_instance_and_a_volume():
    secret = {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270",
              "value": "stopped"}
    deployment = {"resources": [
        resource("pulumi:pulumi:Stack", "ollama-exoscale-ollama-exoscale"),
        resource(repair.INSTANCE_TYPE, "gpu", state="running"),
        resource(repair.INSTANCE_TYPE, "gpu-2", state=secret),
        {**resource(repair.INSTANCE_TYPE, "gpu-3"), "outputs": {"state": "stopped"}},
        resource(repair.VOLUME_TYPE, "models"),
        resource(repair.VOLUME_TYPE, "models-gpu-4"),
        resource("exoscale:index/securityGroup:SecurityGroup", "firewall"),
    ], "pending_operations": [
        {"type": "creating", "resource": resource(repair.INSTANCE_TYPE, "gpu-5")}]}

    assert repair.instance_states(deployment) == {
        "gpu": "running", "gpu-2": "stopped", "gpu-3": "stopped"}  # not the pending one
    assert repair.volume_servers(deployment) == ["gpu", "gpu-4"]
    assert repair.instance_states({}) == {} and repair.volume_servers({}) == []
