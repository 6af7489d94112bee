"""Several GPU servers in one stack: the runner's `servers`, and the `exoscale` provisioner's
per-server calls (bring up, stop, tear down, crash repair), over the real `pulumi.automation`
and the real program against the stand-in Pulumi CLI, whose instances each serve on a
loopback address of their own behind the real nginx front."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from infra.runner import StackRunner
from proxy.provision.exoscale import ExoscaleProvisioner
from tests.doubles.standin_pulumi.harness import (
    ROOT,
    crash_mid_up,
    get_tags,
    settings_for,
    standin_world,
    stream_generate,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
CHUNKS = 120  # a 30 s stream at 0.25 s a token: longer than the stack update beside it


@pytest.fixture
def standin(tmp_path):
    with standin_world(tmp_path) as world:
        yield world


def provisioner_for(world, **settings) -> ExoscaleProvisioner:
    """A fresh provisioner, as a restarted proxy makes one: same state dir, new objects."""
    runner = StackRunner(settings_for(world.port, **settings), world.state_dir, world.env,
                         pulumi_root=ROOT)
    return ExoscaleProvisioner(runner)


def serves(endpoint) -> bool:
    tags = get_tags(endpoint.url, endpoint.token, endpoint.ca_cert, endpoint.server_hostname)
    return [m["name"] for m in tags["models"]] == ["llama3.2:latest"]


def instance_ids(world) -> dict[str, str]:
    """The cloud's instances by name (the stack's object name, `-gpu-N` for the others)."""
    return {record["name"]: object_id for object_id, record in world.instances().items()}


def test_the_runner_declares_each_server_and_outputs_the_map(standin):
    runner = StackRunner(settings_for(standin.port), standin.state_dir, standin.env,
                         pulumi_root=ROOT)
    said: list[str] = []

    outputs = runner.up(said.append, servers={"gpu": "running", "gpu-1": "running"})

    assert set(outputs.servers) == {"gpu", "gpu-1"}
    gpu, other = outputs.servers["gpu"], outputs.servers["gpu-1"]
    assert (outputs.instance_id, outputs.remote_url) == (gpu.instance_id, gpu.remote_url)
    assert gpu.public_ip != other.public_ip  # an address each, the same port behind one rule
    assert other.remote_url == f"https://{other.public_ip}:{standin.port}"
    assert instance_ids(standin) == {"ollama-exoscale": gpu.instance_id,
                                     "ollama-exoscale-gpu-1": other.instance_id}
    for server in (gpu, other):
        assert get_tags(server.remote_url, outputs.token, outputs.tls_certificate,
                        outputs.tls_server_name)["models"]
    assert runner.outputs() == outputs
    assert outputs.token not in repr(outputs)
    assert any("creating exoscale:ComputeInstance gpu-1" in s for s in said)


def test_a_second_server_comes_and_goes_while_the_first_stays(standin):
    provisioner = provisioner_for(standin)
    first = provisioner.bring_up(lambda _: None)
    (gpu_id,) = standin.instances()
    gpu_pid = standin.instances()[gpu_id]["pid"]
    said: list[str] = []

    second = provisioner.bring_up(said.append, server="gpu-1")

    assert second.url != first.url and second.token == first.token
    assert serves(first) and serves(second)
    assert instance_ids(standin)["ollama-exoscale"] == gpu_id
    assert standin.instances()[gpu_id]["pid"] == gpu_pid  # not restarted either
    assert not any(s.startswith(("replacing", "updating")) for s in said), said
    restarted = provisioner_for(standin)  # a restarted proxy finds both
    assert restarted.observe_fleet() == {"gpu": first, "gpu-1": second}
    assert restarted.observe() == first  # observe() is still the primary

    restarted.tear_down(said.append, server="gpu-1")

    assert list(standin.instances()) == [gpu_id]
    assert restarted.observe_fleet() == {"gpu": first}
    assert serves(first)
    restarted.tear_down(lambda _: None, server="gpu-1")  # nothing to remove is success
    restarted.tear_down(lambda _: None)  # the last one: `pulumi destroy`, as before fleets
    assert standin.instances() == {} and standin.checkpoint()["resources"] == []


def test_the_primary_can_go_first_and_a_server_stop_and_start_again(standin):
    provisioner = provisioner_for(standin)
    provisioner.bring_up(lambda _: None)
    other = provisioner.bring_up(lambda _: None, server="gpu-1")
    other_id = instance_ids(standin)["ollama-exoscale-gpu-1"]

    provisioner.stop(lambda _: None, server="gpu-1")
    provisioner.tear_down(lambda _: None)  # the primary, while gpu-1 is kept stopped

    assert provisioner.observe() is None
    (stopped,) = provisioner.observe_fleet().values()
    assert stopped.instance_status == "stopped" and stopped.url == other.url
    assert list(standin.instances()) == [other_id]
    assert standin.instances()[other_id]["state"] == "stopped"

    again = provisioner.bring_up(lambda _: None, server="gpu-1")

    assert list(standin.instances()) == [other_id]  # started again, not made again
    assert again.instance_status == "running" and serves(again)
    provisioner.stop(lambda _: None, server="gpu-7")  # none such: nothing to stop
    assert list(provisioner.observe_fleet()) == ["gpu-1"]


def user_data(world, object_id: str) -> str:
    """The user data the cloud booted an instance with (the stand-in keeps it on its disk)."""
    return (Path(world.instances()[object_id]["disk"]) / "user-data").read_text()


def test_new_settings_reach_each_server_when_it_is_made_and_change_no_other_serving(standin):
    provisioner_for(standin).bring_up(lambda _: None)
    (gpu_id,) = standin.instances()
    gpu_pid, made_with = standin.instances()[gpu_id]["pid"], user_data(standin, gpu_id)
    # A restarted proxy whose servers differ: other user data (another model list; a new
    # release's setup) and another type and disk.
    upgraded = provisioner_for(standin, models=("llama3.2", "qwen2.5"),
                               instance_type="gpua5000.medium", disk_size=200)
    said: list[str] = []

    upgraded.bring_up(said.append, server="gpu-1")

    ids = instance_ids(standin)
    assert ids["ollama-exoscale"] == gpu_id and standin.instances()[gpu_id]["pid"] == gpu_pid
    assert not any(s.startswith(("replacing", "updating")) for s in said), said
    assert user_data(standin, gpu_id) == made_with  # serving on, as it was made
    made = standin.instances()[gpu_id]
    assert (made["type"], made["diskSize"]) == ("gpua5000.small", 100), made
    new_data = user_data(standin, ids["ollama-exoscale-gpu-1"])
    assert standin.instances()[ids["ollama-exoscale-gpu-1"]]["type"] == "gpua5000.medium"
    assert new_data != made_with

    upgraded.tear_down(lambda _: None, server="gpu-1")  # scaling in replaces no other either
    assert list(standin.instances()) == [gpu_id]
    assert standin.instances()[gpu_id]["pid"] == gpu_pid

    upgraded.stop(lambda _: None)  # only stopped, as it was made
    assert list(standin.instances()) == [gpu_id] and user_data(standin, gpu_id) == made_with
    upgraded.bring_up(lambda _: None)  # started again, it is made anew: with the new data
    (remade,) = standin.instances()
    assert remade != gpu_id and user_data(standin, remade) == new_data


def test_bring_ups_from_two_threads_keep_both_servers(standin):
    """One lock runs the stack's updates one at a time, each declaring what the others added."""
    provisioner = provisioner_for(standin)
    provisioner.bring_up(lambda _: None)
    failures: list[BaseException] = []

    def bring_up(name: str) -> None:
        try:
            provisioner.bring_up(lambda _: None, server=name)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            failures.append(exc)

    threads = [threading.Thread(target=bring_up, args=(n,)) for n in ("gpu-1", "gpu-2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)

    assert failures == []
    fleet = provisioner.observe_fleet()
    assert list(fleet) == ["gpu", "gpu-1", "gpu-2"]
    assert len(standin.instances()) == 3
    assert all(serves(endpoint) for endpoint in fleet.values())


def test_a_crash_creating_one_server_is_repaired_by_the_next_update_of_another(standin):
    provisioner = provisioner_for(standin)
    provisioner.bring_up(lambda _: None)
    crash_mid_up(standin, servers={"gpu": "running", "gpu-1": "running"})
    orphan = instance_ids(standin)["ollama-exoscale-gpu-1"]
    said: list[str] = []

    provisioner_for(standin).bring_up(said.append, server="gpu-2")

    assert f"adopting instance {orphan} into the stack" in said
    names = instance_ids(standin)
    assert len(names) == 3 and names["ollama-exoscale-gpu-1"] == orphan  # not made twice
    fleet = provisioner.observe_fleet()
    assert list(fleet) == ["gpu", "gpu-1", "gpu-2"]
    assert standin.checkpoint()["pending_operations"] == [] and standin.locks() == []


def volumes(world) -> dict[str, str]:
    return {record["name"]: object_id for object_id, record in world.cloud()["volumes"].items()}


def attached(world) -> dict[str, list[str]]:
    return {r["name"]: r.get("blockStorageVolumeIds") for r in world.instances().values()}


def test_each_server_has_its_volume_and_the_last_keeps_it(standin):
    provisioner = provisioner_for(standin, zone="de-fra-1", model_volume_gb=10)
    provisioner.bring_up(lambda _: None)
    provisioner.bring_up(lambda _: None, server="gpu-1")
    kept = volumes(standin)
    assert set(kept) == {"ollama-exoscale-models", "ollama-exoscale-gpu-1-models"}
    assert attached(standin) == {"ollama-exoscale": [kept["ollama-exoscale-models"]],
                                 "ollama-exoscale-gpu-1": [kept["ollama-exoscale-gpu-1-models"]]}

    provisioner.tear_down(lambda _: None, server="gpu-1")  # goes with its volume
    provisioner.tear_down(lambda _: None)  # the last: its instance only, as before fleets

    assert standin.instances() == {} and provisioner.observe_fleet() == {}
    assert volumes(standin) == {"ollama-exoscale-models": kept["ollama-exoscale-models"]}
    provisioner.bring_up(lambda _: None)
    assert attached(standin) == {"ollama-exoscale": [kept["ollama-exoscale-models"]]}


def test_a_last_server_other_than_the_primary_keeps_its_own_volume(standin):
    provisioner = provisioner_for(standin, zone="de-fra-1", model_volume_gb=10)
    provisioner.bring_up(lambda _: None)
    provisioner.bring_up(lambda _: None, server="gpu-1")
    kept = volumes(standin)["ollama-exoscale-gpu-1-models"]

    provisioner.tear_down(lambda _: None)  # the primary first: with its volume
    provisioner.tear_down(lambda _: None, server="gpu-1")  # the last keeps its volume
    provisioner.tear_down(lambda _: None)  # again: nothing to remove, no volume made

    assert standin.instances() == {}
    assert volumes(standin) == {"ollama-exoscale-gpu-1-models": kept}
    provisioner.bring_up(lambda _: None, server="gpu-1")
    assert attached(standin) == {"ollama-exoscale-gpu-1": [kept]}


def test_one_server_removed_while_the_other_keeps_streaming(standin):
    """End to end: a stream through one server's TLS front runs on, whole, while the stack's
    update removes the other."""
    provisioner = provisioner_for(standin)
    keeps = provisioner.bring_up(lambda _: None)
    assert serves(keeps) and serves(provisioner.bring_up(lambda _: None, server="gpu-1"))
    kept_id = instance_ids(standin)["ollama-exoscale"]
    started, lines, failures = threading.Event(), [], []

    def stream() -> None:
        try:
            lines.extend(stream_generate(keeps.url, keeps.token, keeps.ca_cert,
                                         keeps.server_hostname, chunks=CHUNKS, interval=0.25,
                                         started=started))
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            failures.append(exc)

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert started.wait(30), failures
    provisioner.tear_down(lambda _: None, server="gpu-1")
    # The test's premise, not a timing: the stream must outlast the update (else lengthen it).
    assert streaming.is_alive(), "the stream ended before the removal did"
    streaming.join(90)

    assert failures == []
    assert lines[-1]["done"] is True and len(lines) == CHUNKS + 1  # whole: no chunk lost
    assert instance_ids(standin) == {"ollama-exoscale": kept_id}
    assert serves(keeps)
