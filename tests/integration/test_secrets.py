"""Every secret the proxy knows, scanned for in everything it says: each response (status,
headers, body) across the routes and their failures, and every line of its logs."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import requests

from tests.harness import Proxy, fake_ollama_command, free_port, wait_until

pytestmark = pytest.mark.slow

SECRETS = {
    "PROXY_API_KEYS": "user-key-5ecret-9f3a1c",
    "PROXY_ADMIN_KEYS": "admin-key-5ecret-77b20e",
    "EXOSCALE_API_KEY": "EXO5ecretapikey0123456789",
    "EXOSCALE_API_SECRET": "exo-api-5ecret-abcdefabcdef",
    "PULUMI_CONFIG_PASSPHRASE": "pulumi-pass-5ecret-42",
    "AWS_SECRET_ACCESS_KEY": "aws-5ecret-access-key-xyz",
}
USER, ADMIN = SECRETS["PROXY_API_KEYS"], SECRETS["PROXY_ADMIN_KEYS"]


def said(answer: requests.Response) -> str:
    head = "\n".join(f"{k}: {v}" for k, v in answer.headers.items())
    return f"{answer.status_code}\n{head}\n{answer.text}"


def test_no_secret_appears_in_any_response_or_log_line(tmp_path):
    env = {**SECRETS, "PROXY_LOG_LEVEL": "debug", "PROXY_AUTH_FAILURES": 7,
           "PROXY_LOCAL_COMMAND": fake_ollama_command("--verbose"),
           "PROXY_LOCAL_ADDR": f"127.0.0.1:{free_port()}"}
    seen: list[str] = []
    user, admin = {"Authorization": f"Bearer {USER}"}, {"Authorization": f"Bearer {ADMIN}"}
    with Proxy(tmp_path, **env) as proxy:
        url = proxy.url

        def call(method: str, path: str, **kwargs) -> requests.Response:
            answer = requests.request(method, url + path, timeout=10, **kwargs)
            seen.append(said(answer))
            return answer

        for path in ("/", "/ui", "/status"):
            call("GET", path)  # 401 on /status: the first of 5 failures, fewer than the limit
        for path in ("/", "/ui", "/status", "/metrics", "/api/tags", "/v1/models"):
            call("GET", path, headers=user)
        call("POST", "/api/pull", headers=user, json={"model": "x"})  # 403: not an admin key
        for guess in (USER[:-1], ADMIN.upper(), "Basic " + ADMIN):
            call("GET", "/status", headers={"Authorization": f"Bearer {guess}"})
        call("POST", "/api/chat", headers={"Authorization": USER})  # no scheme
        call("POST", "/api/chat", headers=user, json={})  # 503, starts provisioning
        call("POST", "/v1/chat/completions", headers=user, json={})
        wait_until(lambda: call("GET", "/status", headers=user).json()["provisioning_status"]
                   == "ready", 30, interval=0.2, what="ready")
        time.sleep(1)  # every worker has synced and seen it
        echo = call("POST", "/api/__echo/keys", headers={**user, "X-Api-Key": "visible"})
        assert echo.json()["headers"].get("X-Api-Key") == "visible"  # the echo does show headers
        call("POST", "/api/chat", headers={**user, "X-Fake-Fail-After": "2"},
             json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]})
        call("POST", "/admin/up", headers=admin)
        os.killpg(json.loads((tmp_path / "local-upstream.json").read_text())["pid"],
                  signal.SIGKILL)
        call("POST", "/api/show", headers=user, json={"model": "llama3.2"})  # 502
        for _ in range(30):  # brute force from this address: 401s, then 429
            call("GET", "/status", headers={"Authorization": "Bearer wrong-wrong-wrong"})
        assert seen[-1].startswith("429")
    logs = proxy.logs() + (tmp_path / "local-upstream.log").read_text(errors="replace")
    assert "401 for GET /status" in logs and "upstream stream broke" in logs  # logs were kept
    for name, secret in SECRETS.items():
        for text in seen + logs.splitlines():
            assert secret not in text, f"{name} in: {text[:300]}"
