"""The console script against a real proxy (gunicorn, `local` provisioner, the fake Ollama):
a reader that leaves early, `wait` on an idle proxy, `wait --up`, `doctor` beside a running
upstream."""

from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest
import requests

from tests.harness import Proxy, fake_ollama_command, free_port, upstream_env, wait_until

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "proxy.cli"]
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI with stdout a real pipe whose reader has already gone (as `| head` does
    once it has its lines): every write meets EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*CLI, *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=30)
    finally:
        os.close(write_end)


def first_line(stream, timeout: float = 30) -> str:
    """The first line on `stream`, failing (not hanging) when none comes."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"nothing said in {timeout:g} s"
    return stream.readline()


def test_status_into_a_pipe_whose_reader_left_ends_quietly(tmp_path):
    with Proxy(tmp_path, **upstream_env(tmp_path)) as proxy:
        for flags in ([], ["--json"]):
            result = into_closed_pipe("status", "--url", proxy.url, *flags)
            assert result.stderr == "", result.stderr  # no BrokenPipeError traceback
            assert result.returncode == 141  # 128 + SIGPIPE, as a shell reports for CLI tools
        head = subprocess.run(["bash", "-c", f"{sys.executable} -m proxy.cli status --url "
                               f"{proxy.url} | head -3"], capture_output=True, text=True,
                              timeout=30)
        assert head.stderr == "" and len(head.stdout.splitlines()) == 3
        assert head.stdout.startswith("phase")


def test_wait_on_an_idle_proxy_says_at_once_that_nothing_will_start_it(tmp_path):
    with Proxy(tmp_path, **upstream_env(tmp_path)) as proxy:
        waiting = subprocess.Popen([*CLI, "wait", "--url", proxy.url], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            said = first_line(waiting.stderr)
            assert waiting.poll() is None  # said while still watching, before giving up
            out, err = waiting.communicate(timeout=60)  # not the 1800 s of --timeout
        finally:
            waiting.kill()
        assert "the GPU server is idle and no request asks for it" in said
        assert "ollama-exoscale wait --up" in said
        assert waiting.returncode == 5
        assert "nothing started the GPU server" in err
        assert out.startswith("[    0 s] idle")
        assert proxy.status()["provisioning_status"] == "idle"  # `wait` itself started nothing


def test_wait_follows_a_request_that_arrives_while_it_watches_an_idle_proxy(tmp_path):
    env = upstream_env(tmp_path, "--startup-delay", "1")
    with Proxy(tmp_path, **env) as proxy:
        waiting = subprocess.Popen([*CLI, "wait", "--url", proxy.url], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            assert "no request asks for it" in first_line(waiting.stderr)
            assert requests.post(proxy.url + "/api/chat", json=CHAT, timeout=10
                                 ).status_code == 503  # demand: the server starts
            out, err = waiting.communicate(timeout=60)
        finally:
            waiting.kill()
        assert waiting.returncode == 0, err
        assert out.splitlines()[-1].endswith("ready: ready")


def test_wait_up_asks_for_the_server_with_an_admin_key_then_waits(tmp_path):
    env = upstream_env(tmp_path, "--startup-delay", "1", PROXY_API_KEYS="user-key-123",
                       PROXY_ADMIN_KEYS="admin-key-123")
    with Proxy(tmp_path, **env) as proxy:
        denied = subprocess.run([*CLI, "wait", "--up", "--url", proxy.url, "--key",
                                 "user-key-123"], capture_output=True, text=True, timeout=30)
        assert denied.returncode == 1 and "admin key" in denied.stderr
        result = subprocess.run([*CLI, "wait", "--up", "--url", proxy.url, "--key",
                                 "admin-key-123"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].endswith("ready: ready")
        assert "no request asks for it" not in result.stderr


def test_doctor_for_local_accepts_the_upstream_this_proxy_started(tmp_path):
    with Proxy(tmp_path, **upstream_env(tmp_path)) as proxy:
        requests.post(proxy.url + "/api/chat", json=CHAT, timeout=10)
        proxy.wait_phase("ready")
        env = {**proxy.env, "PATH": "/usr/bin:/bin"}  # no Pulumi CLI either

        result = subprocess.run([*CLI, "doctor"], env=env, capture_output=True, text=True,
                                timeout=30)

        assert result.returncode == 0, result.stdout
        assert (f"ok    local address: {env['PROXY_LOCAL_ADDR']} is served by the upstream "
                "this proxy started") in result.stdout


def test_doctor_for_local_refuses_an_ollama_it_did_not_start(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    other = subprocess.Popen([sys.executable, "-m", "tests.doubles.fake_ollama", "--listen", addr],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(addr), 20, what=f"the fake Ollama on {addr}")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PROXY_PROVISIONER": "local",
               "PROXY_STATE_DIR": str(tmp_path / "state"), "PROXY_LOCAL_ADDR": addr,
               "PROXY_LOCAL_COMMAND": fake_ollama_command()}

        result = subprocess.run([*CLI, "doctor"], env=env, capture_output=True, text=True,
                                timeout=30)
    finally:
        other.kill()
        other.wait()
    assert result.returncode == 1
    assert f"FAIL  local address: {addr} is in use by an Ollama " in result.stdout
    assert "this proxy did not start" in result.stdout


def _answers(addr: str) -> bool:
    try:
        return requests.get(f"http://{addr}/api/version", timeout=1).ok
    except requests.RequestException:
        return False
