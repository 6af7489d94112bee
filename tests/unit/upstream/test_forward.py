"""The forwarder in-process, through Falcon's ASGI test conductor (one event loop, as a worker
has), against the fake upstream: kept connections, exactly the client's headers, and the
pinned TLS upstream with its token."""

from __future__ import annotations

import asyncio

import falcon
import falcon.asgi
import falcon.testing
import pytest
import requests

from proxy.provision.base import Endpoint
from proxy.upstream.errors import UpstreamError
from proxy.upstream.forward import Forwarder
from proxy.upstream.session import Sessions
from tests.doubles import fake_ollama
from tests.unit.upstream.test_session import NAME, make_cert


def app_for(sessions: Sessions, endpoint: Endpoint, closed: list, *, keys: bool = True
            ) -> falcon.asgi.App:
    """An app whose every route is forwarded to `endpoint`, as the proxy's Demand routes are;
    `keys`: the proxy has API keys (the client's Authorization is one of them)."""
    forwarder = Forwarder(sessions, connect_timeout=2, read_timeout=10)

    async def sink(req, resp, **_: object) -> None:
        try:
            await forwarder.forward(req, resp, endpoint, lambda: closed.append(req.path),
                                    strip_authorization=keys)
        except UpstreamError as exc:
            raise falcon.HTTPError(falcon.code_to_http_status(exc.status),
                                   description=str(exc)) from None

    app = falcon.asgi.App()
    app.add_sink(sink, r"/")
    return app


def run(app: falcon.asgi.App, sessions: Sessions, *calls: tuple) -> list:
    """Each (method, path, kwargs) through one conductor, on one event loop; the answers."""

    async def main() -> list:
        async with falcon.testing.ASGIConductor(app) as conductor:
            answers = [await conductor.simulate_request(method, path, **kwargs)
                       for method, path, kwargs in calls]
        await sessions.aclose()
        return answers

    loop = asyncio.new_event_loop()  # not asyncio.run: it leaves no current loop behind
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.fixture
def upstream():
    server = fake_ollama.start_in_thread(models="llama3.2")
    yield server
    server.close()


def stats(server) -> dict:
    return requests.get(server.url + "/__stats", timeout=5).json()


def test_answers_read_to_the_end_reuse_one_upstream_connection(tmp_path, upstream):
    closed: list[str] = []
    sessions = Sessions(4, tmp_path)
    app = app_for(sessions, Endpoint(upstream.url), closed)
    seen: list[int] = []

    async def count(req, resp) -> None:  # the upstream's open connections, mid-run
        seen.append(await asyncio.to_thread(lambda: stats(upstream)["active_connections"]))

    app.add_route("/count", type("Count", (), {"on_get": staticmethod(count)})())
    show = ("POST", "/api/show", {"json": {"model": "llama3.2"}})
    *answers, streamed, _ = run(app, sessions, *[show] * 5, (
        "POST", "/api/generate", {"json": {"model": "llama3.2", "prompt": "x"}}),
        ("GET", "/count", {}))
    assert all(a.status_code == 200 and a.json["details"] for a in answers)
    assert streamed.text.count("\n") > 2
    assert closed == ["/api/show"] * 5 + ["/api/generate"]
    assert seen == [1 + 1]  # the pool's one, and the stats call


def test_the_upstream_sees_the_clients_headers_and_no_defaults_of_its_own(tmp_path, upstream):
    sessions = Sessions(4, tmp_path)
    answer, = run(app_for(sessions, Endpoint(upstream.url), []), sessions, (
        "POST", "/api/__echo/h", {"body": b"{}", "headers": {
            "User-Agent": "ollama-python/0.4", "Content-Type": "application/json",
            "Authorization": "Bearer a-proxy-key", "X-Custom": "kept"}}))
    headers = {name.lower(): value for name, value in answer.json["headers"].items()}
    assert headers["user-agent"] == "ollama-python/0.4"
    assert headers["content-type"] == "application/json" and headers["x-custom"] == "kept"
    assert "accept-encoding" not in headers  # the client sent none; aiohttp would add one
    assert "accept" not in headers
    assert "authorization" not in headers  # the proxy's own key stays here




def test_forwarding_to_the_pinned_tls_upstream_sends_its_token(tmp_path, tls_upstream):
    server, pem = tls_upstream
    endpoint = Endpoint(server.url.replace("http://", "https://"), token="t0k3n", ca_cert=pem,
                        server_hostname=NAME)
    sessions = Sessions(4, tmp_path)
    answer, = run(app_for(sessions, endpoint, []), sessions, (
        "POST", "/api/show", {"json": {"model": "llama3.2"},
                              "headers": {"Authorization": "Bearer a-proxy-key"}}))
    assert answer.status_code == 200, answer.text


def test_a_certificate_other_than_the_pinned_one_gets_502_without_the_token(tmp_path,
                                                                            tls_upstream):
    server, _ = tls_upstream
    other, _ = make_cert(tmp_path, NAME, "other")
    endpoint = Endpoint(server.url.replace("http://", "https://"), token="t0k3n",
                        ca_cert=open(other).read(), server_hostname=NAME)
    closed: list[str] = []
    sessions = Sessions(4, tmp_path)
    answer, = run(app_for(sessions, endpoint, closed), sessions, (
        "POST", "/api/show", {"json": {"model": "llama3.2"}}))
    assert answer.status_code == 502
    assert "TLS certificate did not verify" in answer.json["description"]
    assert "t0k3n" not in answer.text
    assert closed == ["/api/show"]


def test_a_token_guarded_upstream_gets_its_token_alone_even_without_proxy_keys(tmp_path):
    """Every OpenAI SDK sends `Authorization: Bearer <api_key>`; beside the GPU server's own
    token that would be two Authorization headers, which its nginx front answers with 400."""
    server = fake_ollama.start_in_thread(models="llama3.2", token="gpu-token")
    try:
        sessions = Sessions(4, tmp_path)
        answer, = run(app_for(sessions, Endpoint(server.url, token="gpu-token"), [], keys=False),
                      sessions, ("GET", "/api/__echo/a",
                                 {"headers": {"Authorization": "Bearer sk-openai-client"}}))
        assert answer.status_code == 200
        lines = [value for name, value in answer.json["header_lines"]
                 if name.lower() == "authorization"]
        assert lines == ["Bearer gpu-token"]
    finally:
        server.close()


def test_an_unguarded_upstream_gets_the_clients_own_authorization(upstream, tmp_path):
    sessions = Sessions(4, tmp_path)
    answer, = run(app_for(sessions, Endpoint(upstream.url), [], keys=False), sessions,
                  ("GET", "/api/__echo/a", {"headers": {"Authorization": "Bearer own-key"}}))
    headers = {name.lower(): value for name, value in answer.json["headers"].items()}
    assert headers["authorization"] == "Bearer own-key"
