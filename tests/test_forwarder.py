"""The forwarder in-process, through Falcon's test client, against the fake upstream: kept
connections, exactly the client's headers, and the pinned TLS upstream with its token."""

from __future__ import annotations

import falcon
import falcon.testing
import pytest
import requests

from proxy.forward import Forwarder, UpstreamError
from proxy.provisioner import Endpoint
from proxy.upstream import Sessions
from tests import fake_ollama
from tests.test_upstream import NAME, make_cert


def client_for(sessions: Sessions, endpoint: Endpoint, closed: list, *, keys: bool = True
               ) -> falcon.testing.TestClient:
    """An app whose every route is forwarded to `endpoint`, as the proxy's Demand routes are;
    `keys`: the proxy has API keys (the client's Authorization is one of them)."""
    forwarder = Forwarder(sessions, connect_timeout=2, read_timeout=10)

    def sink(req: falcon.Request, resp: falcon.Response, **_: object) -> None:
        try:
            forwarder.forward(req, resp, endpoint, lambda: closed.append(req.path),
                              strip_authorization=keys)
        except UpstreamError as exc:
            raise falcon.HTTPError(falcon.code_to_http_status(exc.status),
                                   description=str(exc)) from None

    app = falcon.App()
    app.add_sink(sink, r"/")
    return falcon.testing.TestClient(app)


@pytest.fixture
def upstream():
    server = fake_ollama.start_in_thread(models="llama3.2")
    yield server
    server.close()


def stats(server) -> dict:
    return requests.get(server.url + "/__stats", timeout=5).json()


def test_answers_read_to_the_end_reuse_one_upstream_connection(tmp_path, upstream):
    closed: list[str] = []
    client = client_for(Sessions(4, tmp_path), Endpoint(upstream.url), closed)
    for _ in range(5):
        answer = client.simulate_post("/api/show", json={"model": "llama3.2"})
        assert answer.status_code == 200 and answer.json["details"]
    streamed = client.simulate_post("/api/generate", json={"model": "llama3.2", "prompt": "x"})
    assert streamed.text.count("\n") > 2
    assert closed == ["/api/show"] * 5 + ["/api/generate"]
    assert stats(upstream)["active_connections"] == 1 + 1  # the pool's one, and this stats call


def test_the_upstream_sees_the_clients_headers_and_no_defaults_of_its_own(tmp_path, upstream):
    client = client_for(Sessions(4, tmp_path), Endpoint(upstream.url), [])
    answer = client.simulate_post(
        "/api/__echo/h", body=b"{}",
        headers={"User-Agent": "ollama-python/0.4", "Content-Type": "application/json",
                 "Authorization": "Bearer a-proxy-key", "X-Custom": "kept"},
    )
    headers = answer.json["headers"]
    assert headers["User-Agent"] == "ollama-python/0.4"
    assert headers["Content-Type"] == "application/json" and headers["X-Custom"] == "kept"
    assert "Accept-Encoding" not in headers  # the client sent none; http.client would add one
    assert "Authorization" not in headers  # the proxy's own key stays here




def test_forwarding_to_the_pinned_tls_upstream_sends_its_token(tmp_path, tls_upstream):
    server, pem = tls_upstream
    endpoint = Endpoint(server.url.replace("http://", "https://"), token="t0k3n", ca_cert=pem,
                        server_hostname=NAME)
    client = client_for(Sessions(4, tmp_path), endpoint, [])
    answer = client.simulate_post("/api/show", json={"model": "llama3.2"},
                                  headers={"Authorization": "Bearer a-proxy-key"})
    assert answer.status_code == 200, answer.text


def test_a_certificate_other_than_the_pinned_one_gets_502_without_the_token(tmp_path,
                                                                            tls_upstream):
    server, _ = tls_upstream
    other, _ = make_cert(tmp_path, NAME, "other")
    endpoint = Endpoint(server.url.replace("http://", "https://"), token="t0k3n",
                        ca_cert=open(other).read(), server_hostname=NAME)
    closed: list[str] = []
    client = client_for(Sessions(4, tmp_path), endpoint, closed)
    answer = client.simulate_post("/api/show", json={"model": "llama3.2"})
    assert answer.status_code == 502
    assert "TLS certificate did not verify" in answer.json["description"]
    assert "t0k3n" not in answer.text
    assert closed == ["/api/show"]


def test_a_token_guarded_upstream_gets_its_token_alone_even_without_proxy_keys(tmp_path):
    """Every OpenAI SDK sends `Authorization: Bearer <api_key>`; beside the GPU server's own
    token that would be two Authorization headers, which its nginx front answers with 400."""
    server = fake_ollama.start_in_thread(models="llama3.2", token="gpu-token")
    try:
        client = client_for(Sessions(4, tmp_path), Endpoint(server.url, token="gpu-token"), [],
                            keys=False)
        answer = client.simulate_get("/api/__echo/a",
                                     headers={"Authorization": "Bearer sk-openai-client"})
        assert answer.status_code == 200
        lines = [value for name, value in answer.json["header_lines"]
                 if name.lower() == "authorization"]
        assert lines == ["Bearer gpu-token"]
    finally:
        server.close()


def test_an_unguarded_upstream_gets_the_clients_own_authorization(upstream, tmp_path):
    client = client_for(Sessions(4, tmp_path), Endpoint(upstream.url), [], keys=False)
    answer = client.simulate_get("/api/__echo/a", headers={"Authorization": "Bearer own-key"})
    assert answer.json["headers"]["Authorization"] == "Bearer own-key"
