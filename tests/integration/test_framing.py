"""Strict framing toward a hostile upstream (tests/doubles/hostile_ollama.py), through a real
gunicorn with one worker (so a pooled connection would be reused): one test per case issue 14 found.

Each answer the upstream gets wrong reaches the client as a well-framed `502` with a JSON
`error` (or a last `{"error"}` line once an NDJSON stream has begun), on a client connection
that then carries the next request; the upstream connection is never reused (the next,
unrelated request gets its own answer, never the smuggled one); and `in_flight` comes back.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import requests

from tests.doubles.hostile_ollama import LATE
from tests.harness import Proxy, free_port, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    state = tmp_path_factory.mktemp("framing")
    proxy = Proxy(
        state, PROXY_WORKERS="1", PROXY_IDLE_TIMEOUT="600",
        PROXY_LOCAL_COMMAND=f"{sys.executable} -m tests.doubles.hostile_ollama",
        PROXY_LOCAL_ADDR=f"127.0.0.1:{free_port()}",
    ).start()
    requests.post(proxy.url + "/admin/up", timeout=10).raise_for_status()
    proxy.wait_phase("ready")
    yield proxy
    proxy.stop()
    proxy.kill_upstream()


def ask(proxy: Proxy, case: str, pause: float = 0.0
        ) -> tuple[requests.Response, requests.Response]:
    """The bad answer, then (after `pause` s) the next request's, on one kept-alive client
    connection."""
    with requests.Session() as client:
        bad = client.post(f"{proxy.url}/api/__bad/{case}", json={}, timeout=10)
        time.sleep(pause)
        good = client.post(f"{proxy.url}/api/__good/next", json={}, timeout=10)
    assert good.status_code == 200 and good.json() == {"path": "/api/__good/next"}
    wait_until(lambda: proxy.status()["in_flight"] == 0, 5, what="in_flight back to 0")
    return bad, good


def refused(answer: requests.Response) -> str:
    assert answer.status_code == 502, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    return answer.json()["error"]


def test_a_204_with_a_body_is_refused_and_its_bytes_reach_nobody(proxy):
    bad, _ = ask(proxy, "204-with-body")
    assert "not valid HTTP" in refused(bad)


def test_a_204_that_declares_a_length_is_refused(proxy):
    bad, _ = ask(proxy, "204-with-length")
    assert "declares a body" in refused(bad)


def test_bytes_that_come_while_the_connection_is_idle_never_answer_the_next_request(proxy):
    # The 204 itself is well-framed; what comes after it, once the connection sits in the pool
    # (hostile_ollama.LATE s later), closes that connection instead of answering the next one.
    bad, _ = ask(proxy, "204-then-late-bytes", pause=4 * LATE)
    assert bad.status_code == 204


def test_a_body_longer_than_its_content_length_is_refused(proxy):
    bad, _ = ask(proxy, "longer-than-length")
    assert "beyond the end" in refused(bad)


def test_bytes_after_the_last_chunk_end_the_stream_with_an_error_line(proxy):
    bad, _ = ask(proxy, "bytes-after-last-chunk")
    lines = [json.loads(line) for line in bad.text.splitlines()]
    assert bad.status_code == 200 and lines[0]["response"] == "hi"
    assert lines[-1] == {"error": "the upstream connection broke mid-stream"}


def test_a_chunk_size_of_minus_2_ends_the_stream_with_an_error_line(proxy):
    bad, _ = ask(proxy, "chunk-size-minus-2")
    lines = [json.loads(line) for line in bad.text.splitlines()]
    assert lines[0]["response"] == "hi" and "error" in lines[-1]


def test_an_unasked_101_is_refused(proxy):
    bad, _ = ask(proxy, "unasked-101")
    assert "switched protocols" in refused(bad)


def test_two_conflicting_content_lengths_are_refused(proxy):
    bad, _ = ask(proxy, "two-content-lengths")
    assert "Content-Length" in refused(bad)


def test_chunked_with_a_content_length_is_refused(proxy):
    bad, _ = ask(proxy, "chunked-and-length")
    assert "Content-Length" in refused(bad)


@pytest.mark.parametrize("case", ["length-1_0", "length-minus-1"])
def test_a_content_length_that_is_not_digits_is_refused(proxy, case):
    bad, _ = ask(proxy, case)
    assert "Content-Length" in refused(bad)


def test_a_truncated_body_is_refused_not_left_waiting(proxy):
    bad, _ = ask(proxy, "truncated-body")
    assert "broke off" in refused(bad)


def test_a_control_byte_in_a_header_is_refused_and_in_flight_comes_back(proxy):
    bad, _ = ask(proxy, "control-byte-in-header")
    assert "control byte" in refused(bad)


def test_headers_the_upstream_lists_in_connection_are_not_forwarded(proxy):
    bad, _ = ask(proxy, "connection-listed-header")
    assert bad.status_code == 200 and bad.json() == {}
    assert "X-Hop" not in bad.headers


def test_a_body_that_ends_at_the_close_arrives_whole(proxy):
    bad, _ = ask(proxy, "until-close")  # no length, not chunked: HTTP/1.1 allows it
    assert bad.status_code == 200 and bad.json() == {"until": "close"}


def test_an_interim_100_is_skipped_and_the_answer_forwarded(proxy):
    bad, _ = ask(proxy, "interim-100")
    assert bad.status_code == 200 and bad.json() == {}
