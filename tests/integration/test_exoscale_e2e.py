"""The `exoscale` provisioner end to end through a real gunicorn: the real Automation API and
Pulumi program, driven by the stand-in CLI on PATH, whose simulated instance runs the test
Ollama behind TLS and the stack's token."""

from __future__ import annotations

import os
import time

import ollama
import pytest
import requests

from tests.doubles.standin_pulumi.harness import API_KEY, API_SECRET, ROOT, base_env, free_port
from tests.harness import Proxy, wait_until

pytestmark = pytest.mark.slow


class World:
    def __init__(self, tmp_path, **env):
        self.tmp_path = tmp_path
        self.state = tmp_path / "state"
        pulumi_env = base_env(tmp_path)
        self.env = {
            "PROXY_PROVISIONER": "exoscale",
            "PATH": f"{ROOT / 'bin'}:{os.environ.get('PATH', os.defpath)}",
            "HOME": pulumi_env["HOME"],
            "PULUMI_HOME": pulumi_env["PULUMI_HOME"],
            "STANDIN_PYTHON": pulumi_env["STANDIN_PYTHON"],
            "EXOSCALE_API_KEY": API_KEY,
            "EXOSCALE_API_SECRET": API_SECRET,
            "EXOSCALE_ALLOWED_CIDRS": "127.0.0.1/32",
            "EXOSCALE_PORT": str(free_port()),
            "STANDIN_BOOT_DELAY": "1",
            "PROXY_TICK": "0.1",
            **env,
        }

    def proxy(self) -> Proxy:
        return Proxy(self.state, **self.env)

    def instances(self) -> dict:
        import json

        path = self.state / "pulumi-backend" / "standin-cloud.json"
        return json.loads(path.read_text()).get("instances", {}) if path.exists() else {}

    def volumes(self) -> dict:
        import json

        path = self.state / "pulumi-backend" / "standin-cloud.json"
        return json.loads(path.read_text()).get("volumes", {}) if path.exists() else {}

    def stop_instances(self) -> None:
        from tests.doubles.standin_pulumi.harness import stop_instance

        for record in self.instances().values():
            stop_instance(record)


def stored_token(state) -> str:
    """The upstream token, as the lease holder keeps it in the private coordination store."""
    import json
    import sqlite3

    with sqlite3.connect(state / "state.db") as db:
        return json.loads(db.execute("SELECT doc FROM lifecycle").fetchone()[0])["endpoint"][
            "token"
        ]


@pytest.fixture
def world(tmp_path):
    made = []

    def make(**env) -> World:
        made.append(World(tmp_path, **env))
        return made[-1]

    yield make
    for w in made:
        w.stop_instances()


def test_cold_request_to_ready_to_stream_to_idle_destroy(world):
    w = world(PROXY_IDLE_TIMEOUT="3", STANDIN_PULL_SECONDS="2")
    with w.proxy() as proxy:
        first = requests.post(proxy.url + "/api/chat", json={"model": "llama3.2"}, timeout=5)
        assert first.status_code == 503 and first.json()["provisioning"] is True
        status = proxy.wait_phase("ready", timeout=90)
        # Pulumi's engine events reach /status as progress steps, none lost.
        steps = [step["text"] for step in status["steps"] if step["phase"] == "provisioning"]
        assert "creating exoscale:ComputeInstance gpu" in " ".join(steps), steps
        assert any(s.startswith("pulumi up finished") for s in steps), steps
        # Each stage of the cold start measured: the boot delay of the simulated instance too.
        # The server's own progress, read from its front: the pull's percent, one step.
        # The stages running side by side, in one sentence ("starting the bring-up; pulling…").
        pulls = [s for s in status["steps"] if s["text"].startswith("on the server: ")
                 and "; pulling llama3.2: " in s["text"] and s["text"].endswith("%")]
        assert len(pulls) == 1 and pulls[0]["phase"] == "starting"
        timeline = status["cold_start_timeline"]["last"]
        assert list(timeline) == ["stack_update", "boot", "model_pull", "model_load", "on_server",
                                  "on_server_spans", "mode"]
        assert timeline["mode"] == "destroy"
        assert status["cold_start_estimate"]["mode"] == "destroy"
        assert timeline["boot"] >= 0.9 and timeline["model_pull"] >= 1.5
        # The phases cloud-init/progress.py timed on the server, as its front served them.
        assert set(timeline["on_server"]) == {"packages", "toolkit", "image", "pulling",
                                              "driver", "container"}
        assert timeline["on_server"]["pulling"] >= 1.5
        assert status["cold_start_timeline"]["median"] == {
            k: v for k, v in timeline.items() if not k.startswith("on_server") and k != "mode"}
        spans = timeline["on_server_spans"]  # each stage's [start, end], in the order they began
        assert list(spans) == ["packages", "toolkit", "image", "pulling", "driver", "container"]
        assert spans["pulling"][1] - spans["pulling"][0] >= 1.5
        assert status["remote_url"].startswith("https://127.0.0.1:")
        token = stored_token(w.state)
        assert len(token) >= 40
        assert token not in requests.get(proxy.url + "/status", timeout=5).text
        assert len(w.instances()) == 1

        chunks = list(ollama.Client(host=proxy.url).chat(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
        ))
        assert chunks[-1].done and len(chunks) > 2

        proxy.wait_phase("idle", timeout=90)
        assert w.instances() == {}
        logs = proxy.logs()
        assert API_SECRET not in logs and API_KEY not in logs and token not in logs


def test_a_failed_up_shows_the_reason_then_recovers(world, tmp_path):
    switch = tmp_path / "fail-up"
    switch.write_text("quota exceeded for gpua5000 in at-vie-2")
    w = world(STANDIN_FAIL_UP_FILE=str(switch), PROXY_RETRY_BASE="1")
    with w.proxy() as proxy:
        requests.post(proxy.url + "/api/generate", json={}, timeout=5)
        status = proxy.wait_phase("error", timeout=90)
        assert "quota exceeded" in status["last_error"]
        answer = requests.post(proxy.url + "/api/generate", json={}, timeout=5)
        assert answer.status_code == 503 and answer.json()["status"] in ("error", "provisioning")
        switch.unlink()
        time.sleep(1.1)
        requests.post(proxy.url + "/api/generate", json={}, timeout=5)
        proxy.wait_phase("ready", timeout=90)
        assert len(w.instances()) == 1


def test_a_bring_up_that_gives_up_is_the_error_shown_and_its_server_is_removed(world):
    """cloud-init/setup.sh gives up (a driver that will not install): the server's progress
    says why; the proxy shows it as last_error and removes the server instead of billing it."""
    w = world(STANDIN_GIVES_UP="the NVIDIA driver could not be installed after 3 attempts")
    with w.proxy() as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        status = proxy.wait_phase("error", timeout=90)
        assert status["last_error"] == ("the GPU server's bring-up failed: the NVIDIA driver "
                                        "could not be installed after 3 attempts")
        assert w.instances() == {}
        assert any("deleting exoscale:ComputeInstance gpu" in s["text"] for s in status["steps"])


def test_idle_action_stop_stops_the_instance_and_demand_starts_the_same_one(world):
    w = world(PROXY_IDLE_TIMEOUT="2", PROXY_IDLE_ACTION="stop")
    with w.proxy() as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready", timeout=90)
        (instance_id, record), = w.instances().items()
        pid = record["pid"]
        stopped = proxy.wait_phase("idle", timeout=60)
        assert stopped["instance_status"] == "stopped" and stopped["remote_url"] is None
        (same_id, record), = w.instances().items()
        assert same_id == instance_id and record["state"] == "stopped" and not record["pid"]
        assert any("updating exoscale:ComputeInstance gpu" in step["text"]
                   for step in stopped["steps"]), stopped["steps"]  # an update, not a delete
        wait_until(lambda: not _alive(pid), 10, what="the stopped instance's Ollama to end")
    (w.state / "state.db").unlink()
    with w.proxy() as restarted:  # found in the stack as stopped: not waited for, not remade
        wait_until(lambda: restarted.status()["instance_status"] == "stopped", 30,
                   what="the stopped instance found")
        assert restarted.status()["provisioning_status"] == "idle"
        requests.post(restarted.url + "/api/chat", json={}, timeout=5)
        again = restarted.wait_phase("ready", timeout=90)
        (same_id, record), = w.instances().items()
        assert same_id == instance_id and record["state"] == "running" and record["pid"]
        assert again["instance_status"] == "running"
        chunks = list(ollama.Client(host=restarted.url).chat(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
        ))
        assert chunks[-1].done


def test_a_kept_model_volume_outlives_the_instance_and_spares_the_next_pull(world):
    w = world(PROXY_IDLE_TIMEOUT="2", PROXY_MODEL_VOLUME_GB="50", EXOSCALE_ZONE="de-fra-1",
              STANDIN_PULL_SECONDS="2")
    with w.proxy() as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        first = proxy.wait_phase("ready", timeout=90)
        (first_id, record), = w.instances().items()
        (volume_id, volume), = w.volumes().items()
        assert record["blockStorageVolumeIds"] == [volume_id] and volume["size"] == 50
        assert not record["models_on_volume"]  # a new volume: the models were pulled
        assert any(s["text"].startswith("on the server: ") and "pulling llama3.2: " in s["text"]
                   for s in first["steps"])

        idle = proxy.wait_phase("idle", timeout=60)
        assert w.instances() == {} and list(w.volumes()) == [volume_id]  # the volume stays
        assert idle["instance_status"] == "absent"
        assert any("deleting exoscale:ComputeInstance gpu" in s["text"] for s in idle["steps"])

        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        second = proxy.wait_phase("ready", timeout=90)
        (second_id, record), = w.instances().items()
        assert second_id != first_id and record["blockStorageVolumeIds"] == [volume_id]
        assert record["models_on_volume"]  # the new instance found the models on the volume
        assert not any("pulling llama3.2: " in s["text"] for s in second["steps"])
        assert second["cold_starts"]["count"] == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _stat(pid)[0] not in ("Z", "X")


def test_a_restarted_proxy_adopts_the_instance_in_the_stack(world):
    w = world()
    with w.proxy() as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        proxy.wait_phase("ready", timeout=90)
    (w.state / "state.db").unlink()  # even with the coordination store gone
    with w.proxy() as again:
        again.wait_phase("ready", timeout=90)
        assert len(w.instances()) == 1


def test_a_missing_pulumi_cli_is_an_error_that_says_what_to_install(world):
    w = world(PATH="/usr/bin:/bin")
    with w.proxy() as proxy:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        status = proxy.wait_phase("error", timeout=30)
        assert "Pulumi CLI" in status["last_error"] and "install" in status["last_error"]


def _stat(pid: int) -> list[str]:
    text = open(f"/proc/{pid}/stat").read()
    return text[text.rindex(")") + 2 :].split()


def crash(root: int) -> None:
    """SIGKILL a process and its descendants in its session: the proxy host "crashes".

    Each one is stopped (SIGSTOP) as it is found, until no new one appears, and only then are
    all killed: killing one by one let gunicorn's arbiter fork a fresh worker between two kills,
    which lived on and cleared the stack's lock the test looks for. The simulated instance runs
    in a session of its own, as a cloud server outlives its proxy.
    """
    import signal

    session = _stat(root)[3]
    family, grew = [root], True
    os.kill(root, signal.SIGSTOP)
    while grew:
        grew = False
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in family:
                try:
                    fields = _stat(int(entry))
                except OSError:
                    continue
                if int(fields[1]) in family and fields[3] == session:
                    family.append(int(entry))
                    try:
                        os.kill(int(entry), signal.SIGSTOP)
                    except ProcessLookupError:
                        pass
                    grew = True
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_proxy_killed_mid_up_restarts_without_a_second_instance(world):
    w = world(STANDIN_UP_HANG="1")
    proxy = w.proxy().start()
    try:
        requests.post(proxy.url + "/api/chat", json={}, timeout=5)
        lock_dir = w.state / "pulumi-backend" / ".pulumi" / "locks"
        wait_until(lambda: len(w.instances()) == 1 and list(lock_dir.rglob("*.json")), 60,
                   what="the instance mid-up, under the stack's lock")
        crash(proxy.process.pid)
        proxy.process.wait(timeout=10)
    finally:
        proxy.stop()
    locks = list(lock_dir.rglob("*.json"))
    assert locks, f"the crash should leave the stack locked; logs:\n{proxy.logs()}"
    del w.env["STANDIN_UP_HANG"]
    with w.proxy() as again:
        requests.post(again.url + "/api/chat", json={}, timeout=5)
        again.wait_phase("ready", timeout=120)
        assert len(w.instances()) == 1
        assert not list((w.state / "pulumi-backend" / ".pulumi" / "locks").rglob("*.json"))


def test_the_openai_sdk_without_proxy_keys_passes_the_real_front(world):
    """Every OpenAI SDK sends `Authorization: Bearer <api_key>`. With no proxy keys the GPU
    server must still get its own token alone: its nginx front answers 400 to two."""
    import openai

    w = world(STANDIN_PULL_SECONDS="0.5")
    with w.proxy() as proxy:
        requests.post(proxy.url + "/v1/chat/completions", json={}, timeout=5)
        proxy.wait_phase("ready", timeout=90)
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-any-client-key",
                               max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        answer = client.chat.completions.create(model="llama3.2", messages=messages)
        assert answer.choices[0].message.content
        chunks = list(client.chat.completions.create(model="llama3.2", messages=messages,
                                                     stream=True))
        assert len(chunks) > 2
        assert [m.id for m in client.models.list()] == ["llama3.2:latest"]
        assert "sk-any-client-key" not in proxy.logs()


@pytest.mark.parametrize("models", [False, True])
def test_bake_then_serve_from_the_template_skips_the_install_stages(world, models, capsys):
    from proxy.cli import main
    from tests.doubles.exoscale_api import ExoscaleApi

    w = world(PROXY_IDLE_TIMEOUT="600")
    w.state.mkdir(parents=True, exist_ok=True)
    with ExoscaleApi(w.state / "pulumi-backend", API_KEY, API_SECRET) as api:
        w.env["EXOSCALE_API_URL"] = api.url
        with w.proxy() as proxy:
            args = ["bake", "--url", proxy.url, "--timeout", "180"] + (["--models"] * models)
            assert main(args) == 0
            printed = capsys.readouterr().out.splitlines()
            template = next(line for line in printed if line.startswith("EXOSCALE_TEMPLATE="))
            assert "EXOSCALE_TEMPLATE_VISIBILITY=private" in printed
            assert "create-snapshot" in api.calls and "promote-snapshot-to-template" in api.calls
            assert main(["down", "--url", proxy.url, "--wait", "--timeout", "120"]) == 0
        assert w.instances() == {}  # down removed the server
        cloud = __import__("json").loads(
            (w.state / "pulumi-backend" / "standin-cloud.json").read_text())
        assert [t["name"] for t in cloud["templates"].values()] == [template.split("=", 1)[1]]
        w.env.update(EXOSCALE_TEMPLATE=template.split("=", 1)[1],
                     EXOSCALE_TEMPLATE_VISIBILITY="private")
        with w.proxy() as proxy:
            requests.post(proxy.url + "/admin/up", timeout=5)
            status = proxy.wait_phase("ready", timeout=120)
            stages = set(status["cold_start_timeline"]["last"]["on_server"])
            assert not stages & {"driver", "toolkit", "image"}, stages
            assert ("pulling" in stages) is (not models), stages
