"""/ui in a real headless Chromium (Debian's): it follows the lifecycle without a reload."""

from __future__ import annotations

import re
import shutil
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import requests
from playwright.sync_api import sync_playwright

from tests.harness import Proxy, fake_ollama_command, free_port, free_ports, upstream_env

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


KEYS = {"PROXY_API_KEYS": "user-key-123", "PROXY_ADMIN_KEYS": "admin-key-123",
        "PROXY_AUTH_FAILURES": "1000"}  # a page polling with a wrong key is not locked out here


def use_key(page, key: str) -> None:
    page.fill("#key", key)
    page.dispatch_event("#key", "change")


def next_refresh(page) -> None:
    """Until the page has shown /status once more (`updated` has seconds, refreshes are 2 s)."""
    before = page.text_content("#updated")
    page.wait_for_function(f"document.getElementById('updated').textContent !== {before!r}",
                           timeout=10_000)


def test_a_user_keys_403_on_warm_up_and_shut_down_outlives_the_refreshes(tmp_path, browser):
    with Proxy(tmp_path, **upstream_env(tmp_path), **KEYS) as proxy:
        page = browser.new_page()
        page.goto(proxy.url + "/ui")
        use_key(page, "user-key-123")
        page.wait_for_function("document.getElementById('phase').textContent === 'idle'")
        page.click("#up")
        page.wait_for_selector("text=PROXY_ADMIN_KEYS")  # the 403's reason: an admin key
        next_refresh(page)
        next_refresh(page)
        said = page.inner_text("body")
        assert "Warm up: /admin/up" in said and "needs an admin key (PROXY_ADMIN_KEYS)" in said
        page.on("dialog", lambda dialog: dialog.accept())  # "Remove the GPU server now?"
        page.click("#down")  # acting again: its own answer replaces the first
        page.wait_for_selector("text=Shut down: /admin/down")
        next_refresh(page)
        assert "Warm up:" not in page.inner_text("body")
        assert "Shut down: /admin/down" in page.inner_text("body")
        page.wait_for_function(  # some seconds later it goes
            "!document.body.innerText.includes('PROXY_ADMIN_KEYS')", timeout=30_000)
        assert page.text_content("#phase") == "idle"
        assert proxy.status({"Authorization": "Bearer admin-key-123"})[
            "provisioning_status"] == "idle"
        page.close()


def test_a_wrong_key_clears_the_previous_keys_data_and_says_why(tmp_path, browser):
    with Proxy(tmp_path, **upstream_env(tmp_path), **KEYS) as proxy:
        page = browser.new_page()
        page.goto(proxy.url + "/ui")
        use_key(page, "admin-key-123")
        page.wait_for_function("document.getElementById('phase').textContent === 'idle'")
        assert page.text_content("#model") == "llama3.2"
        use_key(page, "wrong-key")
        page.wait_for_selector("text=This API key is not accepted")
        assert page.text_content("#updated") == "never"
        assert page.text_content("#phase") == "…"
        for field in ("model", "provider", "instance", "gpu", "cold", "since"):
            assert page.text_content(f"#{field}") == "-", field
        assert "a valid API key is required" in page.text_content("#message")
        page.close()


def test_while_starting_the_page_shows_the_expected_wait(tmp_path, browser):
    with Proxy(tmp_path, **upstream_env(tmp_path, "--startup-delay", "4")) as proxy:
        page = browser.new_page()
        page.goto(proxy.url + "/ui")
        page.wait_for_function("document.getElementById('phase').textContent === 'idle'")
        assert page.text_content("#wait") == "-"
        page.click("#up")
        shown = page.wait_for_function(
            """() => {
              const phase = document.getElementById('phase').textContent;
              const wait = document.getElementById('wait');
              return ['provisioning', 'starting'].includes(phase) && wait
                && wait.textContent.startsWith('about') && wait.textContent;
            }""", timeout=10_000,
        ).json_value()
        assert re.fullmatch(r"about \d+ s more \(no cold start measured yet\)", shown), shown
        page.wait_for_function(
            "document.getElementById('phase').textContent === 'ready'", timeout=30_000
        )
        assert page.text_content("#wait") == "-"
        page.close()


def test_every_time_on_the_page_is_in_the_proxys_time_zone(tmp_path, browser):
    vienna = ZoneInfo("Europe/Vienna")
    later = (datetime.now(vienna).hour + 6) % 24  # a window that is not now: nothing starts
    env = {**upstream_env(tmp_path), "PROXY_TIMEZONE": "Europe/Vienna",
           "PROXY_WARM_WINDOWS": f"{later:02d}:00-{later + 1:02d}:00"}
    with Proxy(tmp_path, **env) as proxy:
        context = browser.new_context(timezone_id="Asia/Tokyo")  # not the proxy's zone
        page = context.new_page()
        page.goto(proxy.url + "/ui")
        page.click("#up")  # a phase with a start time
        page.wait_for_function(
            "document.getElementById('phase').textContent === 'ready'", timeout=30_000
        )
        status = proxy.status()

        def local(iso: str, shape: str) -> str:
            return datetime.fromisoformat(iso).astimezone(vienna).strftime(shape)

        assert page.text_content("#since") == local(status["phase_since"], "%Y-%m-%d %H:%M:%S")
        next_start = local(status["warm_windows"]["next_start"], "%Y-%m-%d %H:%M")
        assert page.text_content("#warm") == (
            f"{status['warm_windows']['windows'][0]}, next {next_start}")
        shown = datetime.strptime(page.text_content("#updated"), "%H:%M:%S")
        now = datetime.now(vienna)
        apart = abs((now.hour * 3600 + now.minute * 60 + now.second)
                    - (shown.hour * 3600 + shown.minute * 60 + shown.second))
        assert min(apart, 86400 - apart) < 120  # Vienna's clock, not Tokyo's (8 or 7 h away)
        assert page.text_content("#zone") == "Europe/Vienna"  # and the page says so
        context.close()


def test_the_last_cold_start_is_drawn_as_bars_with_the_servers_stages_side_by_side(
        tmp_path, browser):
    from proxy.store.sqlite import SqliteStore

    timeline = {"stack_update": 40.0, "boot": 60.0, "model_pull": 150.0, "model_load": 5.0,
                "on_server": {"packages": 20.0, "driver": 100.0, "pulling": 115.0},
                "on_server_spans": {"packages": [0.0, 20.0], "driver": [20.0, 120.0],
                                    "pulling": [25.0, 140.0], "container": [140.0, 150.0]}}
    store = SqliteStore(tmp_path / "state.db")
    assert store.acquire("seed", 5)
    store.save({"phase": "idle", "cold_starts": [255.0], "timelines": [timeline]}, "seed")
    store.release("seed")
    store.close()
    with Proxy(tmp_path, **upstream_env(tmp_path)) as proxy:
        page = browser.new_page()
        page.goto(proxy.url + "/ui")
        page.wait_for_selector("#timeline .bar[data-stage='driver (server)']")
        box = {name: page.locator(f"#timeline .bar[data-stage='{name}']").bounding_box()
               for name in ("stack_update", "model_pull", "driver (server)",
                            "pulling (server)", "container (server)")}
        page.screenshot(path=str(tmp_path / "timeline.png"), full_page=True)
        driver, pulling = box["driver (server)"], box["pulling (server)"]
        # The downloads ran while the driver installed: their bars overlap on the time axis.
        assert pulling["x"] < driver["x"] + driver["width"]
        assert driver["x"] < pulling["x"]
        # The server's stages begin once the stack update has made it; the proxy's follow on.
        assert abs(driver["x"] - (box["stack_update"]["x"] + box["stack_update"]["width"])
                   - driver["width"] * 20 / 100) < 3
        assert box["model_pull"]["x"] > box["stack_update"]["x"]
        assert "driver (server)100 s" in page.text_content("#timeline")
        page.close()


def test_a_fleet_shows_a_row_per_server_with_its_load(tmp_path, browser):
    env = upstream_env(tmp_path, PROXY_LOCAL_ADDR=f"127.0.0.1:{free_ports(2)}",
                       PROXY_MAX_SERVERS="2", PROXY_MIN_SERVERS="2")
    with Proxy(tmp_path, **env) as proxy:
        page = browser.new_page()
        page.goto(proxy.url + "/ui")
        page.wait_for_function(
            "document.querySelectorAll('#servers .server').length === 2"
            " && [...document.querySelectorAll('#servers .server')]"
            ".every((row) => row.textContent.includes(': ready, 0 in flight'))",
            timeout=60_000,
        )
        rows = page.locator("#servers .server").all_text_contents()
        assert [row.split(":")[0] for row in rows] == ["gpu", "gpu-1"]
        page.screenshot(path=str(tmp_path / "ui-fleet.png"))
        page.close()
