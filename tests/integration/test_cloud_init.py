"""The GPU server's user data, checked by the real tools that will read it.

cloud-init's own schema (`cloud-init schema`), `bash -n` and `shellcheck` for the bring-up
script, `nginx -t` for the front's config, and the front itself: a real nginx with the
rendered config, a throwaway certificate (`openssl req -x509`) and a stand-in Ollama, so the
token check, the pinned certificate, the headers and streaming are seen working.

These need Debian packages: cloud-init, shellcheck, nginx, openssl, systemd. A missing one
fails the test with its name; nothing is skipped.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest
import yaml

from infra.cloudinit import TLS_SERVER_NAME, encoded_size, fill, render_user_data, template_dir
from infra.settings import Settings
from tests.doubles.nginx_front import Front, contents, make_disk, on_disk, write_files

TOKEN = "b7Qm2Lx9" * 6
SCRIPT = "/usr/local/sbin/ollama-exoscale-setup"
TEMPLATES = template_dir()
SITE = "/etc/ollama-exoscale/nginx-site.conf"
UNIT = "/etc/systemd/system/ollama-exoscale-setup.service"
CLOUD_INIT_SCHEMA = Path("/usr/lib/python3/dist-packages/cloudinit/config/schemas")


def need(tool: str, package: str) -> str:
    """The path of `tool`, or a failure that says which Debian package to install."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin")
    if not path:
        pytest.fail(f"`{tool}` is missing: install the Debian package {package} "
                    f"(apt-get install {package})")
    return path


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> types.SimpleNamespace:
    """A throwaway self-signed certificate for the fixed server name, as the program makes."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "tls.crt", folder / "tls.key"
    made = run(
        need("openssl", "openssl"), "req", "-x509", "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={TLS_SERVER_NAME}",
        "-addext", f"subjectAltName=DNS:{TLS_SERVER_NAME}",
    )
    assert made.returncode == 0, made.stderr
    return types.SimpleNamespace(cert=cert, key=key)


def render(tls, **overrides) -> str:
    settings = Settings(**{"allowed_cidrs": ("203.0.113.7/32",), **overrides})
    return render_user_data(settings, TOKEN, tls.cert.read_text(), tls.key.read_text())


def written(user_data: str) -> dict[str, dict]:
    """path -> write_files entry, its content decoded as cloud-init decodes it."""
    return {entry["path"]: {**entry, "content": contents(entry).decode()}
            for entry in yaml.safe_load(user_data)["write_files"]}


@pytest.fixture(scope="module")
def user_data(tls) -> str:
    return render(tls, models=("llama3.2", "qwen3:8b", "hf.co/user/repo:Q4_K_M"))


# -- cloud-init --------------------------------------------------------------------------------


def test_user_data_passes_cloud_init_schema(user_data, tmp_path):
    cloud_init = need("cloud-init", "cloud-init")
    path = tmp_path / "user-data"
    path.write_text(user_data)
    checked = run(cloud_init, "schema", "--config-file", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Valid cloud-config" in checked.stdout


def test_cloud_init_schema_does_reject_a_bad_config(tmp_path):
    """The check above is worth something: the same command rejects a broken config."""
    cloud_init = need("cloud-init", "cloud-init")
    path = tmp_path / "user-data"
    path.write_text("#cloud-config\nwrite_files:\n  - content: x\nruncmd: 5\n")
    assert run(cloud_init, "schema", "--config-file", str(path)).returncode != 0


def test_user_data_uses_only_keys_cloud_init_knows(user_data):
    need("cloud-init", "cloud-init")
    schema = json.loads((CLOUD_INIT_SCHEMA / "schema-cloud-config-v1.json").read_text())
    known = {key for definition in schema["$defs"].values()
             for key in definition.get("properties", {})}
    assert set(yaml.safe_load(user_data)) <= known


def test_user_data_is_a_cloud_config_that_round_trips(user_data, tls):
    assert user_data.startswith("#cloud-config\n")
    files = written(user_data)
    assert files["/etc/ollama-exoscale/tls.crt"]["content"] == tls.cert.read_text()
    assert files["/etc/ollama-exoscale/tls.key"]["content"] == tls.key.read_text()
    assert "{{" not in user_data


def test_secrets_are_written_for_root_only(user_data):
    files = written(user_data)
    assert files["/etc/ollama-exoscale/tls.key"]["permissions"] == "0600"
    assert files[SITE]["permissions"] == "0600"
    assert files[SCRIPT]["permissions"] == "0700"
    assert all(entry["owner"] == "root:root" for entry in files.values())


def test_token_is_only_in_the_nginx_config(user_data):
    files = written(user_data)
    assert [path for path, entry in files.items() if TOKEN in entry["content"]] == [SITE]
    assert TOKEN not in json.dumps(yaml.safe_load(user_data)["runcmd"])


def test_runcmd_enables_and_starts_the_unit_that_runs_the_script(user_data):
    config = yaml.safe_load(user_data)
    unit = written(user_data)[UNIT]["content"]
    assert ["systemctl", "enable", "ollama-exoscale-setup.service"] in config["runcmd"]
    assert ["systemctl", "start", "--no-block", "ollama-exoscale-setup.service"] in config["runcmd"]
    assert f"ExecStart={SCRIPT}\n" in unit
    assert "Restart=on-failure" in unit  # runs again after a failure
    assert "WantedBy=cloud-init.target" in unit  # and at every boot


def unit_values(text: str, key: str) -> set[str]:
    return {word for line in text.splitlines() if line.startswith(f"{key}=")
            for word in line.split("=", 1)[1].split()}


def test_unit_makes_no_ordering_cycle_with_cloud_init(user_data):
    """Ordered after cloud-final, the unit must not be wanted by a target cloud-final follows
    (a target is ordered after the units it wants): checked against cloud-init's own units."""
    need("cloud-init", "cloud-init")
    unit = written(user_data)[UNIT]["content"]
    cloud_final = Path("/lib/systemd/system/cloud-final.service").read_text()
    assert "cloud-final.service" in unit_values(unit, "After")
    wanted_by = unit_values(unit, "WantedBy")
    assert wanted_by and not wanted_by & unit_values(cloud_final, "After")
    assert Path("/lib/systemd/system/cloud-init.target").is_file()


def test_unit_passes_systemd_analyze_verify(user_data, tmp_path):
    analyze = need("systemd-analyze", "systemd")
    script = tmp_path / "ollama-exoscale-setup"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    unit = tmp_path / "ollama-exoscale-setup.service"
    unit.write_text(written(user_data)[UNIT]["content"].replace(SCRIPT, str(script)))
    checked = run(analyze, "verify", "--man=no", str(unit))
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


def test_user_data_fits_what_exoscale_accepts(tls):
    many = tuple(f"model{i}:latest" for i in range(50))
    user_data = render(tls, models=many)
    assert len(base64.b64encode(user_data.encode())) == encoded_size(user_data) < 32768


def test_user_data_whose_base64_reaches_the_providers_limit_is_refused_naming_the_models(tls):
    """The provider refuses >= 32768 bytes *encoded*: what passes a raw check can fail there.
    The names are hashes, which the files' compression cannot shrink much."""
    import hashlib

    many = tuple(f"hf.co/u/{hashlib.sha256(str(i).encode()).hexdigest()}:Q4" for i in range(600))
    with pytest.raises(ValueError) as caught:
        render(tls, models=many)
    message = str(caught.value)
    assert "base64" in message and "32768" in message
    assert "OLLAMA_MODEL" in message and "600 names" in message
    fits = render(tls, models=many[:100])
    assert len(fits.encode()) < 32768 * 3 // 4 and encoded_size(fits) < 32768


def test_every_file_reaches_cloud_init_gzipped_and_decodes_to_its_template(tls):
    """gz+b64 keeps the commented scripts within the provider's limit; cloud-init decodes it
    (cloudinit/config/cc_write_files.py), and rendering twice gives the same bytes (the stack
    replaces the instance when its user data changes)."""
    entries = yaml.safe_load(render(tls))["write_files"]
    assert {entry.get("encoding") for entry in entries} == {"gz+b64"}
    assert render(tls) == render(tls)
    progress_script = written(render(tls))["/usr/local/sbin/ollama-exoscale-progress"]
    assert progress_script["content"] == (TEMPLATES / "progress.py").read_text()


def test_a_token_that_could_break_the_config_is_refused(tls):
    settings = Settings(allowed_cidrs=("203.0.113.7/32",))
    for token in ('abc"; return 200; #' * 2, "short", "with space" * 3, "dollar$var" * 3):
        with pytest.raises(ValueError) as caught:
            render_user_data(settings, token, tls.cert.read_text(), tls.key.read_text())
        assert token not in str(caught.value)


def test_unknown_placeholder_is_an_error():
    with pytest.raises(KeyError, match="nope"):
        fill("a {{ nope }} b", {})


# -- the bring-up script -----------------------------------------------------------------------


def script_of(user_data: str, tmp_path: Path) -> Path:
    path = tmp_path / "ollama-exoscale-setup"
    path.write_text(written(user_data)[SCRIPT]["content"])
    return path


def test_script_passes_bash_n(user_data, tmp_path):
    checked = run(need("bash", "bash"), "-n", str(script_of(user_data, tmp_path)))
    assert checked.returncode == 0, checked.stderr


def test_with_a_model_volume_the_script_mounts_it_before_ollama_starts(tls, tmp_path):
    script = written(render(tls, zone="de-fra-1", model_volume_gb=50))[SCRIPT]["content"]
    assert "MODEL_VOLUME=1" in script
    main = script[script.index("\nmain() {"):]
    assert main.index("mount_models") < main.index("start_ollama")
    mount = script[script.index("mount_models() {"):]
    assert mount.index("blkid") < mount.index("mkfs.ext4")  # formats only a blank volume
    shellcheck = need("shellcheck", "shellcheck")
    path = tmp_path / "setup.sh"
    path.write_text(script)
    checked = run(shellcheck, "-s", "bash", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def function_of(script: str, name: str) -> str:
    start = script.index(f"\n{name}() {{")
    return script[start:script.index("\n}\n", start) + 3]


@pytest.mark.parametrize("disks, found", [("vda disk\nvdb disk\n", "/dev/vdb"),
                                          ("sr0 rom\nvda disk\n", None)])
def test_the_model_volume_is_the_disk_that_is_not_the_root_disk(tls, tmp_path, disks, found):
    script = written(render(tls, zone="de-fra-1", model_volume_gb=50))[SCRIPT]["content"]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "findmnt").write_text("#!/bin/sh\necho /dev/vda1\n")
    (stubs / "lsblk").write_text(  # -no PKNAME DEV: the parent; -dno NAME,TYPE: the disks
        f'#!/bin/sh\nif [ "$1" = -no ]; then echo vda; else printf "{disks}"; fi\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    shown = run(need("bash", "bash"), "-c", function_of(script, "models_device") + "models_device",
                env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"})
    assert (shown.stdout.strip() or None) == found
    assert shown.returncode == (0 if found else 1)


def test_script_passes_shellcheck(user_data, tmp_path):
    shellcheck = need("shellcheck", "shellcheck")
    checked = run(shellcheck, "--shell=bash", str(script_of(user_data, tmp_path)))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_models_reach_the_script_as_they_are(tls, tmp_path):
    """Quoted for the shell: even names the settings would refuse arrive as one word each."""
    models = ("llama3.2", "it's $(reboot)", "a b;c", "qwen3:8b")
    settings = types.SimpleNamespace(models=models, port=11434, ipv6=False, model_volume_gb=0)
    user_data = render_user_data(settings, TOKEN, tls.cert.read_text(), tls.key.read_text())
    script = written(user_data)[SCRIPT]["content"]
    line = next(line for line in script.splitlines() if line.startswith("MODELS=("))
    shown = run(need("bash", "bash"), "-c", f'{line}\nprintf "%s\\n" "${{MODELS[@]}}"')
    assert shown.stdout.splitlines() == list(models)
    assert line == "MODELS=(" + " ".join(shlex.quote(m) for m in models) + ")"


def test_script_lets_ollama_through_only_once_every_model_is_pulled(user_data):
    script = written(user_data)[SCRIPT]["content"]
    main = script[script.index("\nmain() {"):]
    # The front opens early (for the progress), the ready marker comes after the pull.
    assert main.index("install_packages") < main.index("open_front") < main.index("pull_models")
    assert main.index("pull_models") < main.index("mark_ready")
    assert 'touch "$READY"' in script[script.index("mark_ready() {"):]
    assert "-p 127.0.0.1:11434:11434" in script  # Ollama itself on loopback only


def test_script_says_ready_in_the_progress_before_it_opens_the_gate(user_data, tmp_path):
    """The proxy reads the phases' times as soon as the front lets it through: by then the
    document must say `ready`, the pull's time summed in (it read the pull's phase before)."""
    script = written(user_data)[SCRIPT]["content"]
    ready = tmp_path / "ready"
    progress_stub = tmp_path / "progress"
    progress_stub.write_text('#!/bin/bash\nif [ -e "$READY" ]; then echo "gate already open"; fi\n'
                             'echo "progress $*"\n')
    progress_stub.chmod(0o755)
    stubs = (f"export READY={ready}\nPORT=1\nMODELS=(m)\nPROGRESS={progress_stub}\n"
             "log() { :; }\n")
    shown = run(need("bash", "bash"), "-c",
                stubs + function_of(script, "mark_ready") + "mark_ready")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == ["progress ready"] and ready.exists()
    assert "--gpus=all" in script and "--restart unless-stopped" in script
    assert "echo ollama" in script and '-v "$(models_volume):/root/.ollama"' in script
    assert "MODEL_VOLUME=0" in script  # no volume unless asked for
    assert "nvidia-ctk runtime configure --runtime=docker" in script


# -- the NVIDIA driver, checked by its result ---------------------------------------------------


DRIVER_FUNCTIONS = ("log", "say", "give_up", "apt_idle", "wait_for_apt", "driver_installed",
                    "install_driver")


def run_driver_install(user_data: str, tmp_path: Path, ubuntu_drivers: str, sleep: str = ":"):
    """The script's `install_driver` with stubbed commands: `ubuntu-drivers` (this shell
    body), `dpkg-query` (lists the packages named in tmp_path/installed), `sleep`, and the
    progress command (records its arguments in tmp_path/progress)."""
    script = written(user_data)[SCRIPT]["content"]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "ubuntu-drivers").write_text(
        f'#!/bin/bash\necho "$*" >>{tmp_path}/ubuntu-drivers.calls\n{ubuntu_drivers}\n')
    (stubs / "dpkg-query").write_text(  # dpkg-query -W -f='${Status} ${Package}\n' PATTERN...
        f"#!/bin/bash\n[ -f {tmp_path}/installed ] || exit 1\n"
        f"while read -r p; do echo \"install ok installed $p\"; done <{tmp_path}/installed\n")
    (stubs / "sleep").write_text(f"#!/bin/bash\n{sleep}\n")
    (stubs / "progress").write_text(f'#!/bin/bash\necho "$*" >>{tmp_path}/progress\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    lock = tmp_path / "dpkg.lock"
    lock.touch()
    preamble = (f"set -euo pipefail\nSTATE_DIR={tmp_path}\nFAILED={tmp_path}/failed\n"
                f"GAVE_UP=3\nDRIVER_ATTEMPTS=3\nAPT_WAIT=60\nDPKG_LOCK={lock}\n"
                f"PROGRESS={stubs}/progress\n")
    body = "".join(function_of(script, name) for name in DRIVER_FUNCTIONS)
    return run(need("bash", "bash"), "-c", preamble + body + "install_driver",
               env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"})


def calls(tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / name
    return path.read_text().splitlines() if path.exists() else []


def test_a_driver_install_that_exits_0_having_installed_nothing_is_retried_then_given_up(
        user_data, tmp_path):
    """noble's ubuntu-drivers prints "No drivers found" and exits 0: the package decides."""
    done = run_driver_install(user_data, tmp_path, 'echo "No drivers found for installation."')
    assert done.returncode == 3, done.stderr  # the unit's RestartPreventExitStatus
    assert calls(tmp_path, "ubuntu-drivers.calls") == ["install --gpgpu"] * 3
    reason = (tmp_path / "failed").read_text().strip()
    assert "NVIDIA driver could not be installed" in reason and "3 attempts" in reason
    assert calls(tmp_path, "progress")[-1] == f"fail {reason}"
    assert "say driver installing the NVIDIA driver (attempt 3 of 3)" in calls(tmp_path,
                                                                                  "progress")


def test_a_driver_that_installs_on_the_second_attempt_passes(user_data, tmp_path):
    second = (f'if [ "$(wc -l <{tmp_path}/ubuntu-drivers.calls)" -ge 2 ]; then '
              f"echo nvidia-headless-no-dkms-570-server >{tmp_path}/installed; fi")
    done = run_driver_install(user_data, tmp_path, second)
    assert done.returncode == 0, done.stderr
    assert len(calls(tmp_path, "ubuntu-drivers.calls")) == 2
    assert not (tmp_path / "failed").exists()
    assert not any(line.startswith("fail ") for line in calls(tmp_path, "progress"))


def test_the_driver_install_waits_for_the_apt_lock_first(user_data, tmp_path):
    """unattended-upgrades holds the dpkg lock at first boot; ubuntu-drivers' apt-get would
    fail on it at once. Here a process holds it until the script has waited once."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         "lock = open(sys.argv[1], 'a'); fcntl.lockf(lock, fcntl.LOCK_EX)\n"
         "print('held', flush=True); time.sleep(120)", str(tmp_path / "dpkg.lock")],
        stdout=subprocess.PIPE, text=True)
    (tmp_path / "dpkg.lock").touch()
    try:
        assert holder.stdout.readline() == "held\n"
        check_lock = (  # what ubuntu-drivers' apt-get would meet
            f"python3 -c 'import fcntl, sys; fcntl.lockf(open(sys.argv[1], \"a\"), "
            f"fcntl.LOCK_EX | fcntl.LOCK_NB)' {tmp_path}/dpkg.lock && echo free >>{tmp_path}/lock"
            f" || echo held >>{tmp_path}/lock\n"
            f"echo nvidia-headless-no-dkms-570-server >{tmp_path}/installed")
        done = run_driver_install(user_data, tmp_path, check_lock, sleep=f"kill {holder.pid}")
        assert done.returncode == 0, done.stderr
        assert "waiting for another apt" in done.stderr
        assert calls(tmp_path, "lock") == ["free"]
    finally:
        holder.kill()
        holder.wait()


def test_a_driver_that_does_not_load_after_a_reboot_gives_up(user_data, tmp_path):
    script = written(user_data)[SCRIPT]["content"]
    (tmp_path / "rebooted-for-driver").touch()
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in (("dpkg-query", "echo 'install ok installed nvidia-headless-no-dkms-570'"),
                       ("modprobe", "exit 1"), ("progress", f'echo "$*" >>{tmp_path}/progress')):
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    preamble = (f"set -euo pipefail\nSTATE_DIR={tmp_path}\nFAILED={tmp_path}/failed\n"
                f"GAVE_UP=3\nPROGRESS={stubs}/progress\n"
                "nvidia_loaded() { false; }\n")
    names = ("log", "say", "give_up", "driver_installed", "install_nvidia_driver")
    body = "".join(function_of(script, name) for name in names)
    done = run(need("bash", "bash"), "-c", preamble + body + "install_nvidia_driver",
               env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"})
    assert done.returncode == 3
    assert "does not load, even after a reboot" in calls(tmp_path, "progress")[-1]


def run_pull_models(user_data: str, tmp_path: Path, pull: str):
    """The script's `pull_models` with stubbed commands: `docker` (no model is there yet),
    `sleep`, and the progress command, whose `pull` runs this shell body."""
    script = written(user_data)[SCRIPT]["content"]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in (("docker", "exit 1"), ("sleep", ":"), (
            "progress", f'echo "$*" >>{tmp_path}/progress\nif [ "$1" = pull ]; then {pull}; fi')):
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    preamble = (f"set -euo pipefail\nSTATE_DIR={tmp_path}\nFAILED={tmp_path}/failed\n"
                f"GAVE_UP=3\nPULL_ATTEMPTS=3\nMODELS=(llama3.2 lama3.3)\nPROGRESS_TRACK=main\n"
                f"PROGRESS={stubs}/progress\n")
    names = ("log", "say", "give_up", "retry", "pull_model", "pull_models")
    body = "".join(function_of(script, name) for name in names)
    return run(need("bash", "bash"), "-c", preamble + body + "pull_models",
               env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"})


def test_a_model_that_never_pulls_gives_up_with_ollamas_reason(user_data, tmp_path):
    """A misspelt model fails every pull: after PULL_ATTEMPTS the bring-up gives up (exit 3,
    not restarted) saying why, instead of the unit pulling again every 30 s for ever."""
    fail_second = ('if [ "$2" = lama3.3 ]; then echo "pulling lama3.3: pull model manifest:'
                   ' file does not exist" >&2; exit 1; fi')
    done = run_pull_models(user_data, tmp_path, fail_second)
    assert done.returncode == 3, done.stderr
    pulls = [line for line in calls(tmp_path, "progress") if line.startswith("pull ")]
    assert pulls == ["pull llama3.2"] + ["pull lama3.3"] * 3
    reason = (tmp_path / "failed").read_text().strip()
    assert "pulling lama3.3 failed 3 times" in reason and "file does not exist" in reason
    assert "OLLAMA_MODEL" in reason
    assert calls(tmp_path, "progress")[-1] == f"fail {reason}"


def test_a_pull_that_fails_once_is_retried_and_goes_on(user_data, tmp_path):
    once = (f'if [ ! -e {tmp_path}/failed-once ]; then touch {tmp_path}/failed-once; '
            'echo "connection reset" >&2; exit 1; fi')
    done = run_pull_models(user_data, tmp_path, once)
    assert done.returncode == 0, done.stderr
    pulls = [line for line in calls(tmp_path, "progress") if line.startswith("pull ")]
    assert pulls == ["pull llama3.2", "pull llama3.2", "pull lama3.3"]
    assert not (tmp_path / "failed").exists()


def test_the_unit_does_not_restart_a_bring_up_that_gave_up(user_data):
    unit = written(user_data)[UNIT]["content"]
    script = written(user_data)[SCRIPT]["content"]
    assert "GAVE_UP=3" in script and "RestartPreventExitStatus=3\n" in unit
    main = script[script.index("\nmain() {"):]
    assert main.index('give_up "$(cat "$FAILED")"') < main.index("install_packages")


def test_progress_fail_writes_the_error_the_proxy_acts_on(tmp_path):
    assert progress(tmp_path, "say", "driver", "installing the NVIDIA driver").returncode == 0
    assert progress(tmp_path, "fail", "the NVIDIA driver could not be installed").returncode == 0
    doc = json.loads((tmp_path / "status.json").read_text())
    assert doc["phase"] == "failed" and doc["error"] == "the NVIDIA driver could not be installed"
    assert doc["detail"] == doc["error"] and "driver" in doc["durations"]


# -- the front: nginx --------------------------------------------------------------------------


def nginx_files(user_data: str, tls, folder: Path, upstream_port: int = 11434,
                state: Path | None = None) -> Path:
    """The rendered site in a throwaway nginx prefix; returns the main config."""
    site = written(user_data)[SITE]["content"]
    site = site.replace("/etc/ollama-exoscale/tls.crt", str(tls.cert))
    site = site.replace("/etc/ollama-exoscale/tls.key", str(tls.key))
    site = site.replace("http://127.0.0.1:11434", f"http://127.0.0.1:{upstream_port}")
    site = site.replace("/var/lib/ollama-exoscale", str(state or folder / "state"))
    (folder / "site.conf").write_text(site)
    temp = "\n".join(f"    {kind}_temp_path {folder}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = folder / "nginx.conf"
    main.write_text(
        f"daemon off;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\n"
        f"events {{}}\nhttp {{\n    access_log {folder}/access.log;\n{temp}\n"
        f"    include {folder}/site.conf;\n}}\n"
    )
    return main


def test_nginx_config_passes_nginx_t(user_data, tls, tmp_path):
    nginx = need("nginx", "nginx")
    main = nginx_files(user_data, tls, tmp_path)
    checked = run(nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                  "-c", str(main))
    assert checked.returncode == 0, checked.stderr


def test_nginx_config_with_ipv6_passes_nginx_t(tls, tmp_path):
    nginx = need("nginx", "nginx")
    user_data = render(tls, allowed_cidrs=("2001:db8::/64",))
    assert "listen [::]:11434 ssl;" in written(user_data)[SITE]["content"]
    main = nginx_files(user_data, tls, tmp_path)
    checked = run(nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                  "-c", str(main))
    assert checked.returncode == 0, checked.stderr


class StandInOllama(http.server.BaseHTTPRequestHandler):
    """Records what reaches Ollama; streams /api/chat in two parts, the second on a signal."""

    protocol_version = "HTTP/1.1"
    seen: list = []
    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.seen.append((self.command, self.path, dict(self.headers), b""))
        self._send(200, b'{"models": [{"name": "llama3.2:latest"}]}')

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        self.seen.append((self.command, self.path, dict(self.headers), body))
        if self.path != "/api/chat":
            self._send(201, json.dumps({"received": len(body)}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk(b'{"message": "first"}\n')
        self.release.wait(10)  # the client must have the first line before the rest exists
        self._chunk(b'{"done": true}\n')
        self._chunk(b"")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    return data
                data += chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def front(tls, tmp_path):
    """A real nginx with the rendered site on a free port, in front of a stand-in Ollama: the
    user data's files on a stand-in disk, started as setup.sh starts it
    (tests/doubles/nginx_front.py)."""
    need("nginx", "nginx")
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandInOllama)
    StandInOllama.seen = []
    StandInOllama.release = threading.Event()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    disk = make_disk()  # nginx's workers (www-data) must reach it: not under pytest's 0700 dirs
    write_files(render(tls, port=port), disk)
    state = on_disk(disk, "/var/lib/ollama-exoscale")
    state.mkdir(parents=True)
    state.chmod(0o755)
    server = Front(disk, upstream.server_address[1], port)
    try:
        server.start()
        (state / "ready").touch()  # the bring-up is done (tests may undo it)
        yield types.SimpleNamespace(port=port, cert=tls.cert, seen=StandInOllama.seen,
                                    release=StandInOllama.release, state=state)
    finally:
        StandInOllama.release.set()
        server.stop()
        upstream.shutdown()
        upstream.server_close()
        shutil.rmtree(disk, ignore_errors=True)


def connect(front) -> http.client.HTTPConnection:
    """HTTPS to 127.0.0.1, trusting only the pinned certificate, for the fixed server name."""
    context = ssl.create_default_context(cafile=str(front.cert))
    raw = socket.create_connection(("127.0.0.1", front.port), timeout=10)
    connection = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
    connection.sock = context.wrap_socket(raw, server_hostname=TLS_SERVER_NAME)
    return connection


def request(front, method: str, path: str, headers: dict | None = None, body=None):
    connection = connect(front)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response, response.read()


@pytest.mark.parametrize(
    "authorization",
    [None, "", f"Bearer {TOKEN[:-1]}", f"bearer {TOKEN}", f"Bearer {TOKEN}x", TOKEN,
     f"Bearer  {TOKEN}"],
)
def test_front_refuses_requests_without_the_exact_token(front, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in (("GET", "/api/tags"), ("POST", "/api/pull"), ("GET", "/"),
                         ("GET", "/v1/models"), ("GET", "/index.html")):
        response, body = request(front, method, path, headers)
        assert response.status == 401, (method, path)
        assert response.getheader("Content-Type") == "application/json"
        assert "error" in json.loads(body)
        assert response.getheader("WWW-Authenticate", "").startswith("Bearer")
    assert front.seen == []  # nothing reached Ollama


def test_front_refuses_head_without_the_token(front):
    response, _ = request(front, "HEAD", "/")
    assert response.status == 401
    assert front.seen == []


def test_front_forwards_with_the_token_as_ollama_wants(front):
    response, body = request(front, "GET", "/api/tags?x=1",
                             {"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200
    assert json.loads(body)["models"][0]["name"] == "llama3.2:latest"
    method, path, headers, _ = front.seen[0]
    assert (method, path) == ("GET", "/api/tags?x=1")
    assert headers["Host"] == "localhost:11434"
    assert "Authorization" not in headers  # the token stops at the front


def test_front_answers_400_to_two_authorization_headers(front):
    """Why the proxy must send the GPU server exactly one `Authorization` (issue 13, item 2)."""
    for second in (f"Bearer {TOKEN}", "Bearer sk-the-clients-own-key"):
        connection = connect(front)
        connection.putrequest("GET", "/api/tags")
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        connection.putheader("Authorization", second)
        connection.endheaders()
        response = connection.getresponse()
        response.read()
        assert response.status == 400
    assert front.seen == []
    response, body = request(front, "GET", "/api/tags", {"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200 and json.loads(body)["models"]  # one right token passes


def test_front_streams_responses_as_they_come(front):
    connection = connect(front)
    connection.request("POST", "/api/chat", body=b'{"model": "llama3.2"}',
                       headers={"Authorization": f"Bearer {TOKEN}"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "application/x-ndjson"
    assert json.loads(response.readline()) == {"message": "first"}  # before the rest exists
    front.release.set()
    assert json.loads(response.readline()) == {"done": True}


def test_front_takes_large_uploads(front):
    blob = b"\x00" * (3 * 1024 * 1024)  # beyond nginx's default 1 MB body limit
    response, body = request(front, "POST", "/api/blobs/sha256:00",
                             {"Authorization": f"Bearer {TOKEN}"}, blob)
    assert response.status == 201
    assert json.loads(body) == {"received": len(blob)}


def test_front_serves_only_tls(front):
    with socket.create_connection(("127.0.0.1", front.port), timeout=5) as plain:
        plain.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = plain.recv(4096)
    assert b"llama3.2" not in answer and not answer.startswith(b"HTTP/1.1 200")


def test_front_keeps_ollama_closed_until_the_bring_up_is_done(front):
    (front.state / "ready").unlink()
    response, body = request(front, "GET", "/api/tags", {"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 503 and "being set up" in json.loads(body)["error"]
    assert front.seen == []  # nothing reached Ollama before its models are in


def test_front_serves_the_progress_with_the_token_only(front):
    (front.state / "status.json").write_text(
        '{"phase": "pulling", "detail": "pulling llama3.2: 43%", "percent": 43}')
    (front.state / "status.json").chmod(0o644)
    response, body = request(front, "GET", "/ollama-exoscale/status",
                             {"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200 and json.loads(body)["percent"] == 43
    assert response.getheader("Cache-Control") == "no-store"
    refused, _ = request(front, "GET", "/ollama-exoscale/status", {"Authorization": "Bearer x"})
    assert refused.status == 401 and front.seen == []


# -- the progress document -----------------------------------------------------------------------


def progress(tmp_path, *args, ollama_url="http://127.0.0.1:9"):
    env = {**os.environ, "STATUS_FILE": str(tmp_path / "status.json"), "OLLAMA_URL": ollama_url}
    return subprocess.run([sys.executable, str(TEMPLATES / "progress.py"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_progress_sums_the_time_of_each_phase(tmp_path):
    assert progress(tmp_path, "say", "packages", "installing Docker").returncode == 0
    time.sleep(0.2)
    assert progress(tmp_path, "say", "driver", "installing the NVIDIA driver").returncode == 0
    doc = json.loads((tmp_path / "status.json").read_text())
    assert doc["phase"] == "driver" and doc["detail"] == "installing the NVIDIA driver"
    assert doc["durations"]["packages"] >= 0.2
    assert (tmp_path / "status.json").stat().st_mode & 0o777 == 0o644


def on_track(tmp_path, track, *args):
    env = {**os.environ, "STATUS_FILE": str(tmp_path / "status.json"), "PROGRESS_TRACK": track}
    done = subprocess.run([sys.executable, str(TEMPLATES / "progress.py"), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "status.json").read_text())


def test_progress_keeps_each_stages_span_with_two_tracks_side_by_side(tmp_path):
    on_track(tmp_path, "main", "say", "driver", "installing the NVIDIA driver")
    on_track(tmp_path, "fetch", "say", "image", "pulling the Ollama image")
    time.sleep(0.2)
    doc = on_track(tmp_path, "fetch", "say", "pulling", "pulling llama3.2: 10%")
    stages = doc["stages"]
    assert stages["driver"]["end"] is None and stages["pulling"]["end"] is None
    assert stages["image"]["end"] - stages["image"]["start"] >= 0.2  # ended by its track's next
    assert doc["detail"] == "installing the NVIDIA driver; pulling llama3.2: 10%"
    assert stages["driver"]["start"] < stages["image"]["end"] <= stages["pulling"]["start"]
    doc = on_track(tmp_path, "main", "say", "toolkit", "installing the toolkit")
    assert doc["stages"]["driver"]["end"] is not None and doc["stages"]["pulling"]["end"] is None
    on_track(tmp_path, "fetch", "end", "pulling")
    doc = on_track(tmp_path, "main", "ready")
    assert doc["phase"] == "ready" and doc["detail"] == "ready"
    assert all(stage["end"] is not None for stage in doc["stages"].values())
    assert set(doc["durations"]) == {"driver", "image", "pulling", "toolkit"}
    assert doc["durations"]["image"] >= 0.2


def test_progress_from_two_tracks_at_once_loses_no_stage(tmp_path):
    """The downloads' track and the main one write the one document at the same moments."""
    def write_many(track: str) -> None:
        for i in range(15):
            on_track(tmp_path, track, "say", f"{track}-{i}", f"step {i} of {track}")

    threads = [threading.Thread(target=write_many, args=(track,)) for track in ("main", "fetch")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stages = json.loads((tmp_path / "status.json").read_text())["stages"]
    assert set(stages) == {f"{track}-{i}" for track in ("main", "fetch") for i in range(15)}
    assert {name for name, stage in stages.items() if stage["end"] is None} == {
        "main-14", "fetch-14"}


def test_progress_pulls_through_ollamas_api_and_writes_the_percent(tmp_path):
    from tests.doubles import fake_ollama

    server = fake_ollama.start_in_thread(models="other", chunks=5, chunk_interval=0.2)
    env = {**os.environ, "STATUS_FILE": str(tmp_path / "status.json"), "OLLAMA_URL": server.url}
    try:
        pulling = subprocess.Popen([sys.executable, str(TEMPLATES / "progress.py"), "pull",
                                    "llama3.2"], env=env, stderr=subprocess.PIPE, text=True)
        seen = set()
        while pulling.poll() is None:
            try:
                seen.add(json.loads((tmp_path / "status.json").read_text())["detail"])
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        assert pulling.returncode == 0, pulling.stderr.read()
        between = {d for d in seen if re.fullmatch(r"pulling llama3\.2: ([1-9][0-9]?)%", d)}
        assert len(between) >= 3, seen  # the percent as it grows, not only at the end
        doc = json.loads((tmp_path / "status.json").read_text())
        assert (doc["detail"], doc["percent"]) == ("pulled llama3.2", 100)
        tags = json.loads(urllib.request.urlopen(server.url + "/api/tags").read())
        assert "llama3.2:latest" in [m["name"] for m in tags["models"]]
        failed = progress(tmp_path, "pull", "llama3.2", ollama_url="http://127.0.0.1:9")
        assert failed.returncode != 0
    finally:
        server.close()


# -- downloads beside the driver install -------------------------------------------------------


def run_main_with_stubs(user_data: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess,
                                                                  list[str]]:
    """The script's main() with every command stubbed, each recording what it was asked into
    one event log: `docker` (no image, no container at first; Ollama answers, knows the models
    it pulled), the progress command (a pull takes 0.3 s), and an NVIDIA driver install that
    takes 1.5 s. The steps that need apt, NVIDIA's repository or disks are recorded no-ops."""
    script = written(user_data)[SCRIPT]["content"]
    events = tmp_path / "events"
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "docker").write_text(f"""#!/bin/bash
echo "docker $*" >>{events}
case "$1 $2" in
  "image inspect") grep -q '^docker pull' {events} ;;
  "container inspect") grep -q "^docker run .*--name $3 " {events} ;;
  "exec "*) if [ "$4" = show ]; then grep -qx "pulled $5" {events}; fi ;;
esac
""")
    (stubs / "progress").write_text(f"""#!/bin/bash
if [ "$1" = pull ]; then sleep 0.3; echo "pulled $2" >>{events}; fi
echo "progress[$PROGRESS_TRACK] $*" >>{events}
""")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    start = script.index("\nmain() {")
    functions = script[script.index("\nlog() {"):start]
    overrides = f"""
install_packages() {{ echo "packages" >>{events}; }}
open_front() {{ echo "front" >>{events}; }}
install_container_toolkit() {{ echo "toolkit" >>{events}; }}
mount_models() {{ echo "mount" >>{events}; }}
install_nvidia_driver() {{
  echo "driver begins" >>{events}; sleep 1.5; echo "driver loaded" >>{events}
}}
"""
    preamble = (f"set -euo pipefail\nMODELS=(llama3.2 qwen3:8b)\nOLLAMA_IMAGE=ollama/ollama\n"
                f"FETCHER=ollama-fetch\nMODEL_VOLUME=0\nMODELS_DIR={tmp_path}/models\n"
                f"STATE_DIR={tmp_path}/state\nREADY={tmp_path}/state/ready\n"
                f"FAILED={tmp_path}/state/failed\nGAVE_UP=3\nPULL_ATTEMPTS=3\n"
                f"PROGRESS={stubs}/progress\nexport PROGRESS_TRACK=main\nPORT=1\n")
    done = run(need("bash", "bash"), "-c",
               preamble + functions + overrides + script[start:script.index("\n}\n", start) + 3]
               + "main", env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"})
    return done, events.read_text().splitlines()


def test_the_downloads_run_while_the_driver_installs_and_the_gpu_is_asked_for_last(
        user_data, tmp_path):
    done, events = run_main_with_stubs(user_data, tmp_path)
    assert done.returncode == 0, done.stderr
    at = {event: i for i, event in reversed(list(enumerate(events)))}  # first occurrence
    runs = [e for e in events if e.startswith("docker run")]
    fetcher, gpu = runs
    assert "--name ollama-fetch" in fetcher and "--gpus" not in fetcher
    assert "--name ollama " in gpu and "--gpus=all" in gpu
    # The image and both models came while the driver was being installed...
    assert at["driver begins"] < at["pulled llama3.2"] < at["pulled qwen3:8b"] < at[
        "driver loaded"]
    assert at["docker pull ollama/ollama"] < at["driver loaded"]
    assert at[fetcher] < at["driver loaded"]
    # ...on their own track, and the GPU was asked for only once the driver was loaded, after
    # the CPU-only container had gone; nothing was pulled twice.
    assert "progress[fetch] pull llama3.2" in events
    assert "progress[main] pull llama3.2" not in events
    removed = max(i for i, e in enumerate(events) if e == "docker rm -f ollama-fetch")
    assert at[fetcher] < removed < at[gpu] and at["driver loaded"] < at[gpu]
    assert events.count("docker pull ollama/ollama") == 1
    assert events[-1] == "progress[main] ready"
    assert at["toolkit"] < at[fetcher]  # configuring Docker's runtime restarts Docker


def test_after_a_reboot_for_the_driver_nothing_downloaded_is_fetched_again(user_data, tmp_path):
    """The second run of the unit (after the reboot) finds the image and the models there."""
    done, events = run_main_with_stubs(user_data, tmp_path)
    assert done.returncode == 0, done.stderr
    # The same Docker as after a reboot that stopped the fetcher: image and models kept.
    kept = [e for e in events if e.startswith(("docker pull", "pulled "))]
    (tmp_path / "events").write_text("\n".join(kept) + "\n")
    (tmp_path / "state" / "ready").unlink()
    (tmp_path / "bin").rename(tmp_path / "bin-1")
    again, events = run_main_with_stubs(user_data, tmp_path)
    assert again.returncode == 0, again.stderr
    new = events[len(kept):]
    assert not any(e.startswith(("docker pull", "progress[fetch] pull", "progress[main] pull"))
                   for e in new), new
