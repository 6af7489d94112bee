"""The `local` provisioner's fleet: server i on PROXY_LOCAL_ADDR's port + i, files of its own."""

from __future__ import annotations

import pytest

from proxy.provision.base import ProvisionError
from proxy.provision.local import LocalProvisioner


def local(tmp_path, addr="127.0.0.1:11435") -> LocalProvisioner:
    return LocalProvisioner("ollama serve", addr, tmp_path, {})


def test_server_i_listens_on_the_port_plus_i_with_files_of_its_own(tmp_path):
    primary = local(tmp_path)
    second = primary._server("gpu-2")
    assert (primary.url, second.url) == ("http://127.0.0.1:11435", "http://127.0.0.1:11437")
    assert primary.pid_file.name == "local-upstream.json"  # as before fleets: adopted on upgrade
    assert second.pid_file.name == "local-upstream-gpu-2.json"
    assert second.log_file.name == "local-upstream-gpu-2.log"
    assert primary._server("gpu") is primary


def test_a_port_past_65535_is_refused_with_what_to_change(tmp_path):
    with pytest.raises(ProvisionError, match="PROXY_LOCAL_ADDR"):
        local(tmp_path, "127.0.0.1:65535")._server("gpu-1")


def test_nothing_running_is_an_empty_fleet_and_stray_files_are_not_servers(tmp_path):
    (tmp_path / "local-upstream-gpu-01.json").write_text('{"pid": 1}')
    (tmp_path / "local-upstream-gpu-3.json").write_text("not json")
    assert local(tmp_path).observe_fleet() == {}
