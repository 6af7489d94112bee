"""1 GiB bodies both ways through a real gunicorn (one worker): the upload with a
Content-Length and chunked, the download, each intact, and the worker's memory does not grow
with them (aiohttp's and uvicorn's buffers are bounded; nothing is read whole)."""

from __future__ import annotations

import hashlib
import threading

import pytest
import requests

from tests.harness import Proxy, upstream_env
from tests.procfs import figures

pytestmark = pytest.mark.slow

GIB = 1 << 30
BLOCK = bytes(range(256)) * 4096  # 1 MiB
GROWTH_KIB = 64 * 1024  # what the worker may grow by, whatever the body's size


class Body:
    """1 GiB of BLOCKs, read as a file (requests sends its length) or iterated (chunked)."""

    def __init__(self):
        self.left = GIB

    def __len__(self) -> int:
        return GIB

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        self.left -= len(BLOCK)
        return BLOCK

    def __iter__(self):
        while block := self.read():
            yield block


class Peak:
    """The worker's highest resident memory while the block runs."""

    def __init__(self, pid: int):
        self.pid = pid
        self.before = figures(pid).rss_kib
        self.peak = self.before
        self._stop = threading.Event()

    def __enter__(self) -> Peak:
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, figures(self.pid).rss_kib)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def ready(tmp_path_factory):
    state = tmp_path_factory.mktemp("large")
    with Proxy(state, **upstream_env(state, PROXY_WORKERS=1, PROXY_MAX_BODY_MB=2048)) as proxy:
        requests.post(proxy.url + "/admin/up", timeout=10).raise_for_status()
        proxy.wait_phase("ready")
        requests.get(proxy.url + "/api/__download?size=1048576", timeout=10)  # warm
        yield proxy


def expected_upload_digest() -> str:
    digest = hashlib.sha256()
    for _ in range(GIB // len(BLOCK)):
        digest.update(BLOCK)
    return digest.hexdigest()


@pytest.mark.parametrize("shape", ["content-length", "chunked"])
def test_a_1_gib_upload_arrives_intact_and_the_worker_does_not_grow(ready, shape):
    worker, = ready.workers()
    body = Body() if shape == "content-length" else iter(Body())
    with Peak(worker) as peak:
        answer = requests.post(ready.url + "/api/__echo/upload", data=body, timeout=300)
    assert answer.status_code == 200, answer.text
    echo = answer.json()
    assert echo["body_length"] == GIB
    assert echo["body_sha256"] == expected_upload_digest()
    assert peak.peak - peak.before < GROWTH_KIB


def test_a_1_gib_download_arrives_whole_and_the_worker_does_not_grow(ready):
    worker, = ready.workers()
    received = 0
    with Peak(worker) as peak, requests.get(ready.url + f"/api/__download?size={GIB}",
                                            stream=True, timeout=300) as answer:
        assert answer.status_code == 200
        for chunk in answer.iter_content(1 << 20):
            received += len(chunk)
    assert received == GIB
    assert peak.peak - peak.before < GROWTH_KIB
