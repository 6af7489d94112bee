"""A plain (non-editable) install works outside the repository: the wheel holds every module,
the page and the cloud-init templates, and the console script, `gunicorn -c …` and the
program's user data run from it.

The wheel goes into a fresh virtual environment whose only other path is the test venv's
site-packages (for the dependencies), added by a .pth line: that adds the directory alone, so
the test venv's editable install of this repository is not seen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import requests

from tests.harness import REPO, free_port, upstream_env, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the project's wheel installed (no editable link to the checkout)."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(wheels), str(REPO)], check=True, cwd=root)
    (wheel,) = wheels.glob("*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], check=True, capture_output=True, text=True)
    Path(site.stdout.strip(), "test-dependencies.pth").write_text(
        sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    return venv


def run(venv: Path, *argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          cwd=venv.parent, env=_env(venv), **kwargs)


def _env(venv: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "PYTHONPATH"))}
    return {**env, "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}", **extra}


def test_the_wheel_holds_every_module_the_page_and_the_cloud_init_templates(installed):
    (wheel,) = (installed.parent / "wheels").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO)) for folder in ("proxy", "infra")
               for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert modules - names == set()
    assert "proxy/http/ui.html" in names
    data = {n.split("/data/", 1)[1] for n in names if ".data/data/" in n}
    templates = {f"share/ollama-exoscale/cloud-init/{p.name}"
                 for p in (REPO / "cloud-init").iterdir() if p.is_file()}
    assert templates - data == set()


def test_the_installed_packages_are_the_wheels_not_the_checkout(installed):
    python = str(installed / "bin" / "python")
    found = run(installed, python, "-c", "import proxy.asgi, infra.runner, sys; "
                "print(proxy.asgi.__file__); print(infra.runner.__file__)")
    assert found.returncode == 0, found.stderr
    for path in found.stdout.split():
        assert Path(path).is_relative_to(installed) and not Path(path).is_relative_to(REPO)


def test_the_console_script_runs(installed):
    shown = run(installed, str(installed / "bin" / "ollama-exoscale"), "--help")
    assert shown.returncode == 0, shown.stderr
    assert "serve" in shown.stdout and "doctor" in shown.stdout


def test_the_program_renders_its_user_data_from_the_installed_templates(installed):
    python = str(installed / "bin" / "python")
    code = ("from infra.cloudinit import template_dir; from pathlib import Path; import sys; "
            "d = template_dir(); print(d); assert Path(sys.prefix) in d.parents")
    found = run(installed, python, "-c", code)
    assert found.returncode == 0, found.stderr
    assert "share/ollama-exoscale/cloud-init" in found.stdout


@pytest.mark.parametrize("how", ["serve", "gunicorn"])
def test_the_installed_proxy_serves_its_routes_and_its_page(installed, tmp_path, how):
    port = free_port()
    upstream = upstream_env(tmp_path)
    # The fake upstream is a test double (tests.doubles), found through the checkout; the
    # proxy's own environment has no path to the checkout.
    upstream["PROXY_LOCAL_COMMAND"] = f"env PYTHONPATH={REPO} {upstream['PROXY_LOCAL_COMMAND']}"
    env = _env(installed, PROXY_PROVISIONER="local", PROXY_BIND=f"127.0.0.1:{port}",
               PROXY_WORKERS="1", PROXY_STATE_DIR=str(tmp_path / "state"), **upstream)
    python = str(installed / "bin" / "python")
    conf = run(installed, python, "-c", "import proxy, pathlib; "
               "print(pathlib.Path(proxy.__file__).with_name('gunicorn_conf.py'))").stdout.strip()
    argv = ([str(installed / "bin" / "ollama-exoscale"), "serve"] if how == "serve" else
            [python, "-m", "gunicorn", "-c", conf, "proxy.asgi:create()"])
    server = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 30, what="the installed proxy")
        assert requests.get(url + "/", timeout=5).text == "Ollama is running"
        page = requests.get(url + "/ui", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
        asked = requests.post(url + "/api/chat", json={"model": "llama3.2"}, timeout=5)
        assert asked.status_code == 503 and asked.headers["Retry-After"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        output = server.communicate(timeout=40)[0].decode(errors="replace")
        _stop_upstream(tmp_path / "state")
    assert "Traceback" not in output, output


def _stop_upstream(state: Path) -> None:
    """The upstream the 503 started outlives the proxy, as it is meant to: stop it here."""
    try:
        os.killpg(json.loads((state / "local-upstream.json").read_text())["pid"], signal.SIGKILL)
    except (OSError, ValueError, KeyError):
        pass


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/", timeout=1).status_code == 200
    except requests.RequestException:
        return False
