"""`python -m tests.doubles.standin_pulumi.server DISK`: a simulated GPU server, booted from its
user data.

It does what a real one does after `pulumi up` (cloud-init/user-data.yaml, cloud-init/setup.sh),
GPU parts left out: cloud-init writes the user data's files, once per instance; then, at every
boot, the bring-up: the progress document (by the rendered `ollama-exoscale-progress`, run as
setup.sh runs it), the front (Debian's nginx with the rendered site: tests/doubles/nginx_front.py),
Ollama on loopback (tests/doubles/fake_ollama.py: plain HTTP and no token, the front guards it), the
missing models pulled through Ollama's API by the progress script, then the ready marker that
opens the front. The NVIDIA driver, the container toolkit and the Ollama image are not
installed, only simulated: each is a marker under DISK/standin-installed/ (standing for dpkg's
database and Docker's image store), made by the stage that "installs" it, so a disk that has it
(a snapshot's copy: an instance made from a template `ollama-exoscale bake` promoted) skips the
stage, as setup.sh's checks do. Left out: the volume's mount.

DISK/boot.json, written by the stand-in cloud, holds what the machine itself decides: the
public address (a loopback address of its own) and port, the boot delay (before anything
listens), how long a pull takes, the folder that keeps the pulled models (the root disk's, or
an attached volume's), and whether the bring-up gives up (a driver that will not install:
setup.sh's `give_up`, with that reason).
It runs until SIGTERM, in a session of its own with nginx in its process group: the cloud
stops the whole server by signalling the group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.doubles import fake_ollama
from tests.doubles.nginx_front import STATE_DIR, Front, on_disk, write_files

SCRIPT = "/usr/local/sbin/ollama-exoscale-setup"
PROGRESS = "/usr/local/sbin/ollama-exoscale-progress"
PULLED = "pulled"  # in the models folder: one model a line, what Ollama's store holds


def log(text: str) -> None:
    print(f"standin-server: {text}", file=sys.stderr, flush=True)


INSTALLED = "standin-installed"  # on the disk: what the simulated install stages left there


def cloud_init(disk: Path, instance_id: str) -> None:
    """The user data's files, written on the first boot of each instance only (cloud-init keys
    its once-per-instance work on the instance ID: a disk copied from a template runs it again)."""
    done = on_disk(disk, "/var/lib/cloud/data/instance-id")
    if done.exists() and done.read_text().strip() == instance_id:
        return
    write_files((disk / "user-data").read_text(), disk)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(instance_id + "\n")


def script_models(disk: Path) -> list[str]:
    """The models the rendered bring-up script pulls: its `MODELS=(…)`, read by bash."""
    read = subprocess.run(
        ["bash", "-c", 'eval "$(grep -m1 "^MODELS=" "$0")" && printf "%s\\n" "${MODELS[@]}"',
         str(on_disk(disk, SCRIPT))],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return [line for line in read.stdout.splitlines() if line]


class Server:
    def __init__(self, disk: Path):
        self.disk = disk
        self.boot = json.loads((disk / "boot.json").read_text())
        self.state = on_disk(disk, STATE_DIR)
        self.env = {**os.environ, "STATUS_FILE": str(self.state / "status.json")}
        self.models_dir = Path(self.boot["models_dir"])
        self.address = self.boot.get("address") or "127.0.0.1"  # its public address
        self.front: Front | None = None
        self.ollama: fake_ollama.FakeOllama | None = None

    def progress(self, *args: str) -> int:
        """The rendered progress script, as setup.sh runs it."""
        return subprocess.run([sys.executable, str(on_disk(self.disk, PROGRESS)), *args],
                              env=self.env, timeout=900).returncode

    def say(self, phase: str, detail: str) -> None:
        if self.progress("say", phase, detail) != 0:
            log("cannot write the progress")

    def bring_up(self) -> None:
        """setup.sh's main(), GPU parts left out."""
        self.state.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o755)  # the front's workers read the progress document in it
        ready = self.state / "ready"
        self.reset_if_new_instance()
        if ready.exists():
            (self.state / "status.json").unlink(missing_ok=True)  # a restart: this boot only
        self.say("packages", "starting the bring-up")
        self.install("toolkit", "installing the NVIDIA container toolkit")
        ollama_port = fake_ollama.free_port()
        self.front = Front(self.disk, ollama_port, int(self.boot["port"]), self.address).start()
        if self.boot.get("gives_up"):  # as setup.sh's give_up: the reason, then no more
            log(f"giving up: {self.boot['gives_up']}")
            self.progress("fail", self.boot["gives_up"])
            return
        # As setup.sh's fetch_downloads: the image and the models on the downloads' own track
        # (beside the driver install, which a server without a GPU leaves out).
        self.env["PROGRESS_TRACK"] = "fetch"
        self.install("image", "pulling the Ollama image")
        self.models_dir.mkdir(parents=True, exist_ok=True)
        pulled = self.models_dir / PULLED
        kept = pulled.read_text().split() if pulled.exists() else []
        self.ollama = fake_ollama.start_in_thread(
            models=kept, port=ollama_port, pull_seconds=float(self.boot["pull_seconds"]))
        self.env["OLLAMA_URL"] = self.ollama.url
        for model in script_models(self.disk):
            if self.ollama.state.find_model(model):
                continue
            log(f"pulling model {model}")
            if self.progress("pull", model) != 0:
                log(f"pulling {model} failed")
                return
            with open(pulled, "a") as file:
                file.write(model + "\n")
        self.progress("end", "pulling")
        self.env["PROGRESS_TRACK"] = "main"
        self.install("driver", "installing the NVIDIA driver (attempt 1 of 3)")
        self.say("container", "starting Ollama with the GPU")
        self.progress("ready")  # as setup.sh's mark_ready: the document, then the gate
        ready.touch()
        log(f"ready: the front answers on {self.address}:{self.boot['port']}")

    def reset_if_new_instance(self) -> None:
        """setup.sh's reset_if_new_instance: markers of the instance a template was baked from
        (ready, failed, the driver's reboot, the progress) are not this instance's."""
        instance_id = on_disk(self.disk, "/var/lib/cloud/data/instance-id").read_text().strip()
        mine = self.state / "instance-id"
        if mine.exists() and mine.read_text().strip() == instance_id:
            return
        for name in ("ready", "failed", "rebooted-for-driver", "status.json"):
            (self.state / name).unlink(missing_ok=True)
        mine.write_text(instance_id + "\n")

    def install(self, stage: str, detail: str) -> None:
        """A simulated install stage: said and marked as done, or skipped when the disk has it."""
        marker = self.disk / INSTALLED / stage
        if marker.exists():
            return
        self.say(stage, detail)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def close(self) -> None:
        if self.front is not None:
            self.front.stop()
        if self.ollama is not None:
            # The disk keeps what Ollama's store holds now (a model deleted through its API
            # is gone from a snapshot too).
            with self.ollama.state.lock:
                held = list(self.ollama.state.models)
            (self.models_dir / PULLED).write_text("".join(m + "\n" for m in held))
            self.ollama.close()


def main(argv: list[str]) -> int:
    disk = Path(argv[0])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    boot = json.loads((disk / "boot.json").read_text())
    if stop.wait(float(boot["boot_delay"])):
        return 0
    cloud_init(disk, boot.get("instance_id") or disk.name)
    server = Server(disk)
    try:
        server.bring_up()
        stop.wait()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
