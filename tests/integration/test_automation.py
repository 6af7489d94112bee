"""The Automation API runner, driven through the real `pulumi.automation` and the real program
(infra/program.py, real pulumiverse_exoscale classes) against the stand-in Pulumi CLI."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from datetime import datetime, timedelta, timezone

import pulumi.automation as auto
import pytest

from infra.errors import (
    CredentialsMissing,
    LockHolder,
    PluginMissing,
    PulumiNotInstalled,
    PulumiTooOld,
    StackLocked,
    UpdateFailed,
)
from infra.runner import StackOutputs, StackRunner
from infra.workspace import scrubber
from tests.doubles.standin_pulumi.harness import (
    API_KEY,
    API_SECRET,
    ROOT,
    base_env,
    get_tags,
    install_plugins,
    settings_for,
    standin_world,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def standin(tmp_path):
    with standin_world(tmp_path) as world:
        yield world


def runner_for(world, **kwargs) -> StackRunner:
    return StackRunner(settings_for(world.port), world.state_dir, world.env, pulumi_root=ROOT,
                       **kwargs)


@pytest.mark.slow
def test_up_serves_the_pinned_tls_endpoint_and_destroy_removes_everything(standin, caplog):
    caplog.set_level(logging.INFO, logger="ollama_exoscale.pulumi")
    runner = runner_for(standin)
    said: list[str] = []
    assert runner.outputs() is None  # a new stack holds no instance

    outputs = runner.up(said.append)

    assert outputs.remote_url == f"https://127.0.0.1:{standin.port}"
    assert outputs.public_ip == "127.0.0.1"
    assert outputs.instance_id in standin.instances()
    tags = get_tags(outputs.remote_url, outputs.token, outputs.tls_certificate,
                    outputs.tls_server_name)
    assert [m["name"] for m in tags["models"]] == ["llama3.2:latest"]
    assert runner.outputs() == outputs
    assert outputs.token not in repr(outputs)

    assert "creating exoscale:ComputeInstance gpu (6, " in "\n".join(said)
    assert said[-1].startswith("pulumi up finished in ") and "6 created" in said[-1]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "creating exoscale:SecurityGroup firewall" in logged
    assert outputs.token not in logged and API_SECRET not in logged

    pid = next(iter(standin.instances().values()))["pid"]
    said.clear()
    runner.destroy(said.append)

    assert "deleting exoscale:ComputeInstance gpu (1/6, " in said[0]  # the count of the last up
    assert runner.outputs() is None
    assert standin.checkpoint()["resources"] == []
    assert standin.instances() == {}
    assert not _alive(pid)
    assert standin.locks() == []


@pytest.mark.slow
def test_second_up_changes_nothing_and_keeps_the_instance(standin):
    runner = runner_for(standin)
    first = runner.up(lambda _: None)
    said: list[str] = []

    second = StackRunner(settings_for(standin.port), standin.state_dir, standin.env,
                         pulumi_root=ROOT).up(said.append)

    assert second == first
    assert len(said) == 1 and said[0].endswith(": 6 unchanged")  # no step to narrate
    assert len(standin.instances()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("cli_version", ["3.272.0", "3.200.0"])  # gRPC stream / event log file
def test_on_event_gets_step_events_with_metadata_and_masked_secrets(standin, monkeypatch,
                                                                    cli_version):
    monkeypatch.setenv("STANDIN_PULUMI_VERSION", cli_version)
    runner = runner_for(standin)
    workspace = auto.LocalWorkspaceOptions(
        work_dir=str(standin.state_dir / "pulumi-workspace"),
        env_vars={**standin.env, "PULUMI_CONFIG_PASSPHRASE": ""},
        pulumi_command=auto.PulumiCommand(root=str(ROOT)), secrets_provider="passphrase",
        project_settings=auto.ProjectSettings(
            name="ollama-exoscale", runtime="python",
            backend=auto.ProjectBackend(runner.backend_url),
        ),
    )
    (standin.state_dir / "pulumi-workspace").mkdir(parents=True)
    stack = auto.create_or_select_stack(
        "ollama-exoscale", project_name="ollama-exoscale", program=runner.program, opts=workspace
    )
    events: list[auto.EngineEvent] = []

    result = stack.up(on_event=events.append)

    assert result.summary.result == "succeeded"
    pre = {e.resource_pre_event.metadata.urn: e.resource_pre_event.metadata
           for e in events if e.resource_pre_event}
    done = {e.res_outputs_event.metadata.urn: e.res_outputs_event.metadata
            for e in events if e.res_outputs_event}
    instance = next(u for u in done if u.endswith("ComputeInstance::gpu"))
    assert pre[instance].op == auto.OpType.CREATE
    assert pre[instance].type == "exoscale:index/computeInstance:ComputeInstance"
    assert done[instance].new.id in standin.instances()
    assert done[instance].new.outputs["publicIpAddress"] == "127.0.0.1"
    assert done[instance].new.inputs["userData"] == "[secret]"  # secrets masked, like the CLI
    token = next(m for u, m in done.items() if u.endswith("RandomPassword::token"))
    assert token.new.outputs["result"] == "[secret]"
    assert set(pre) == set(done)
    assert events[-1].cancel_event is not None
    assert any(e.summary_event for e in events)
    runner.destroy(lambda _: None)


@pytest.mark.slow
def test_new_settings_replace_the_instance_without_leaving_the_old_one(standin):
    first = runner_for(standin).up(lambda _: None)
    said: list[str] = []
    changed = settings_for(standin.port, models=("llama3.2", "qwen3:8b"))  # new user data

    second = StackRunner(changed, standin.state_dir, standin.env, pulumi_root=ROOT).up(said.append)

    assert second.instance_id != first.instance_id
    assert list(standin.instances()) == [second.instance_id]
    assert any(s.startswith("replacing exoscale:ComputeInstance gpu (6/6, ") for s in said)
    assert (second.token, second.tls_certificate) == (first.token, first.tls_certificate)
    assert get_tags(second.remote_url, second.token, second.tls_certificate,
                    second.tls_server_name)["models"]


def test_missing_cli_raises_pulumi_not_installed_saying_how_to_install(tmp_path):
    env = {**base_env(tmp_path), "PATH": str(tmp_path / "empty")}
    runner = StackRunner(settings_for(11434), tmp_path / "state", env)

    with pytest.raises(PulumiNotInstalled, match=r"install it with .*get\.pulumi\.com"):
        runner.up(lambda _: None)

    with pytest.raises(PulumiNotInstalled, match="does not run"):
        StackRunner(settings_for(11434), tmp_path / "state", env,
                    pulumi_root=tmp_path / "nowhere").outputs()


def test_old_cli_raises_pulumi_too_old(tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_PULUMI_VERSION", "3.150.0")  # `pulumi version` sees os.environ
    runner = StackRunner(settings_for(11434), tmp_path / "state", base_env(tmp_path),
                         pulumi_root=ROOT)

    with pytest.raises(PulumiTooOld, match=r"3\.181\.0 or newer"):
        runner.outputs()


def test_missing_credentials_are_named_before_any_cli_call(tmp_path):
    env = base_env(tmp_path)
    del env["EXOSCALE_API_SECRET"]
    runner = StackRunner(settings_for(11434), tmp_path / "state", env, pulumi_root=ROOT)

    with pytest.raises(CredentialsMissing, match="set EXOSCALE_API_SECRET") as caught:
        runner.up(lambda _: None)
    assert API_KEY not in str(caught.value)


def test_missing_plugin_says_which_to_install(standin, tmp_path):
    home = tmp_path / "bare-home"
    install_plugins(home, skip=("exoscale",))
    standin.env["PULUMI_HOME"] = str(home)

    with pytest.raises(PluginMissing) as caught:
        runner_for(standin).up(lambda _: None)

    assert caught.value.plugin == "exoscale" and caught.value.version == "0.66.1"
    assert "pulumi plugin install resource exoscale 0.66.1" in str(caught.value)
    assert standin.instances() == {} and standin.locks() == []


@pytest.mark.slow
def test_failed_up_raises_update_failed_with_the_reason_and_no_secret(standin):
    # The provider's error repeats a credential: it must not reach the message.
    standin.env["STANDIN_FAIL_UP"] = f"quota exceeded for gpua5000 (key {API_KEY}:{API_SECRET})"
    runner = runner_for(standin)
    said: list[str] = []

    with pytest.raises(UpdateFailed) as caught:
        runner.up(said.append)

    message = str(caught.value)
    assert "quota exceeded for gpua5000" in message
    assert "exoscale:ComputeInstance gpu" in message
    assert API_KEY not in message and API_SECRET not in message
    assert any(s.startswith("error: exoscale:ComputeInstance gpu") for s in said)
    assert not any(API_SECRET in s for s in said)
    assert standin.instances() == {} and standin.locks() == []

    del standin.env["STANDIN_FAIL_UP"]
    runner_for(standin).destroy(lambda _: None)  # what the failed update created is removable
    assert standin.checkpoint()["resources"] == []


def test_a_held_lock_raises_stack_locked_naming_the_holder(standin):
    runner = runner_for(standin)
    runner.outputs()  # creates the stack
    lock_dir = standin.backend / ".pulumi" / "locks" / "organization" / "ollama-exoscale"
    (lock_dir / "ollama-exoscale").mkdir(parents=True)
    since = datetime.now().astimezone()
    (lock_dir / "ollama-exoscale" / "other.json").write_text(json.dumps({
        "pid": os.getpid(), "username": "ops", "hostname": socket.gethostname(),
        "timestamp": since.isoformat(),
    }))

    with pytest.raises(StackLocked) as caught:
        runner.up(lambda _: None)

    (holder,) = caught.value.holders
    assert (holder.user, holder.pid, holder.host) == ("ops", os.getpid(), socket.gethostname())
    assert abs((holder.since - since).total_seconds()) < 2
    assert not holder.is_stale(max_age=3600)  # this process is alive
    assert "pulumi cancel" in str(caught.value)

    runner.cancel()
    assert standin.locks() == []


def test_lock_holder_is_stale_when_its_process_is_gone_or_it_is_too_old():
    here, now = socket.gethostname(), datetime.now(timezone.utc)
    gone = _dead_pid()
    assert LockHolder("u", here, gone, now).is_stale(max_age=3600)
    assert not LockHolder("u", "elsewhere", gone, now).is_stale(max_age=3600)
    old = now - timedelta(hours=5)
    assert LockHolder("u", "elsewhere", os.getpid(), old).is_stale(max_age=3600)
    assert not LockHolder("u", here, os.getpid(), now).is_stale(max_age=3600)


def test_scrubber_removes_credentials_tokens_and_url_passwords():
    scrub = scrubber({"EXOSCALE_API_KEY": API_KEY, "EXOSCALE_API_SECRET": API_SECRET})
    scrub.learn("the-token-value")
    text = (f"key {API_KEY} secret {API_SECRET} token the-token-value "
            "Authorization: Bearer abc.def s3://user:pw@host/bucket")

    cleaned = scrub(text)

    for secret in (API_KEY, API_SECRET, "the-token-value", "abc.def", "pw@"):
        assert secret not in cleaned


def test_stack_outputs_require_every_export():
    with pytest.raises(UpdateFailed, match="did not export token"):
        StackOutputs.from_outputs({"remote_url": "https://x:1", "public_ip": "x",
                                   "instance_id": "i", "tls_certificate": "c",
                                   "tls_server_name": "n"})


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    return True


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid
