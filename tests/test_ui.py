"""/ui in a real headless Chromium (Debian's): it follows the lifecycle without a reload."""

from __future__ import annotations

import shutil

import pytest
import requests
from playwright.sync_api import sync_playwright

from tests.harness import Proxy, fake_ollama_command, free_port

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = [  # no sandbox as root; no background traffic to hosts this machine cannot reach
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    assert shutil.which(CHROMIUM), "needs Debian's chromium (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


def test_the_page_goes_from_idle_through_provisioning_to_ready_without_a_reload(
    tmp_path, browser
):
    env = {
        "PROXY_LOCAL_COMMAND": fake_ollama_command("--startup-delay", "3"),
        "PROXY_LOCAL_ADDR": f"127.0.0.1:{free_port()}",
        "PROXY_ADMIN_KEYS": "admin-key-123",
        "PROXY_HOURLY_PRICE": "1.98",
    }
    with Proxy(tmp_path, **env) as proxy:
        page = browser.new_page()
        page.goto(proxy.url + "/ui")
        page.wait_for_selector("text=Enter an API key")
        page.fill("#key", "admin-key-123")
        page.dispatch_event("#key", "change")
        page.wait_for_function("document.getElementById('phase').textContent === 'idle'")
        page.click("#up")
        page.wait_for_function(
            "['provisioning', 'starting'].includes(document.getElementById('phase').textContent)",
            timeout=10_000,
        )
        page.wait_for_function(
            "document.getElementById('phase').textContent === 'ready'", timeout=30_000
        )
        assert page.text_content("#remote").startswith("http://127.0.0.1:")
        assert "of 1800 s" in page.text_content("#idle")
        assert "1 (last" in page.text_content("#cold")
        assert "this server" in page.text_content("#gpu")
        assert "EUR today" in page.text_content("#gpu")
        assert "provisioning: starting the GPU server" in page.text_content("#steps")
        page.screenshot(path=str(tmp_path / "ui-ready.png"))
        page.on("dialog", lambda dialog: dialog.accept())  # "Remove the GPU server now?"
        page.click("#down")
        page.wait_for_function(
            "document.getElementById('phase').textContent === 'idle'", timeout=30_000
        )
        status = requests.get(proxy.url + "/status", timeout=5,
                              headers={"Authorization": "Bearer admin-key-123"}).json()
        assert status["gpu"]["total_seconds"] > 0 and status["instance_status"] == "absent"
        page.close()
