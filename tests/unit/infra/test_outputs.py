"""The stack's outputs read back (infra/outputs.py): today's fields and the `servers` map, from
stacks updated before and after fleets."""

from __future__ import annotations

import pytest

from infra.errors import UpdateFailed
from infra.outputs import ServerOutputs, StackOutputs

SHARED = {"token": "t" * 48, "tls_certificate": "PEM", "tls_server_name": "ollama-exoscale.invalid"}


def server(ip: str, instance_id: str, state: str = "running") -> dict:
    return {"remote_url": f"https://{ip}:11434", "public_ip": ip, "instance_id": instance_id,
            "instance_state": state}


def test_a_stack_updated_before_fleets_has_its_one_server_as_the_primary():
    outputs = StackOutputs.from_outputs({**SHARED, **server("192.0.2.1", "i-1", "stopped")})
    assert outputs.servers == {"gpu": ServerOutputs("https://192.0.2.1:11434", "192.0.2.1",
                                                    "i-1", "stopped")}
    assert outputs.server("gpu") == outputs.servers["gpu"] and outputs.server("gpu-1") is None


def test_servers_are_in_index_order_whatever_order_the_cli_prints():
    servers = {"gpu-10": server("192.0.2.11", "i-10"), "gpu": server("192.0.2.1", "i-0"),
               "gpu-2": server("192.0.2.3", "i-2", "stopped")}
    outputs = StackOutputs.from_outputs({**SHARED, **servers["gpu"], "servers": servers})
    assert list(outputs.servers) == ["gpu", "gpu-2", "gpu-10"]
    assert outputs.servers["gpu-2"].instance_state == "stopped"
    assert outputs.token not in repr(outputs)


@pytest.mark.parametrize(("servers", "message"), [
    ({"gpu": {"public_ip": "192.0.2.1"}}, "did not export remote_url, instance_id of server gpu"),
    ({"gpu": "https://192.0.2.1"}, "`servers` output for gpu is not a map"),
    (["gpu"], "`servers` output is not a map"),
])
def test_a_servers_map_missing_what_a_server_needs_is_refused(servers, message):
    with pytest.raises(UpdateFailed, match=message):
        StackOutputs.from_outputs({**SHARED, **server("192.0.2.1", "i-1"), "servers": servers})
