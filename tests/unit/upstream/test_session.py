"""Reaching the upstream: the readiness probe, the token, and the pinned TLS certificate."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from proxy.provision.base import Endpoint
from proxy.upstream.probe import load_model, probe, server_progress
from proxy.upstream.session import Sessions, normalise_model

NAME = "ollama-exoscale.invalid"  # the certificate's name; the server is reached by IP


def make_cert(tmp_path, name: str, stem: str) -> tuple[str, str]:
    key, cert = tmp_path / f"{stem}.key", tmp_path / f"{stem}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )
    return str(cert), str(key)




def test_model_names_are_normalised_like_ollama():
    assert normalise_model("llama3.2") == "llama3.2:latest"
    assert normalise_model("qwen3:8b") == "qwen3:8b"
    assert normalise_model("hf.co/org/model") == "hf.co/org/model:latest"


def test_probe_over_pinned_tls_with_the_token_is_ready(tmp_path, tls_upstream):
    server, pem = tls_upstream
    endpoint = Endpoint(server.url.replace("http://", "https://"), token="t0k3n", ca_cert=pem,
                        server_hostname=NAME)
    result = probe(Sessions(2, tmp_path), endpoint, ("llama3.2",))
    assert result.ready, result.reason


def test_probe_refuses_a_certificate_other_than_the_pinned_one(tmp_path, tls_upstream):
    server, _ = tls_upstream
    other, _ = make_cert(tmp_path, NAME, "other")
    endpoint = Endpoint(server.url.replace("http://", "https://"), token="t0k3n",
                        ca_cert=open(other).read(), server_hostname=NAME)
    result = probe(Sessions(2, tmp_path), endpoint, ("llama3.2",))
    assert not result.ready and "SSLError" in result.reason


def test_probe_without_the_token_is_not_ready(tmp_path, tls_upstream):
    server, pem = tls_upstream
    endpoint = Endpoint(server.url.replace("http://", "https://"), ca_cert=pem,
                        server_hostname=NAME)
    result = probe(Sessions(2, tmp_path), endpoint, ("llama3.2",))
    assert not result.ready and "401" in result.reason


def test_probe_names_the_model_it_waits_for(tmp_path, tls_upstream):
    server, pem = tls_upstream
    endpoint = Endpoint(server.url.replace("http://", "https://"), token="t0k3n", ca_cert=pem,
                        server_hostname=NAME)
    result = probe(Sessions(2, tmp_path), endpoint, ("llama3.2", "qwen3:8b"))
    assert not result.ready and "qwen3:8b" in result.reason


def test_a_forwarding_client_is_only_made_for_a_url_without_a_path(tmp_path):
    sessions = Sessions(2, tmp_path)

    async def make() -> None:
        assert sessions.client(Endpoint("http://127.0.0.1:9")).base == "http://127.0.0.1:9"
        with pytest.raises(ValueError, match="scheme://host:port"):
            sessions.client(Endpoint("http://127.0.0.1:9/ollama"))
        await sessions.aclose()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(make())
    finally:
        loop.close()


def test_probes_never_follow_a_redirect(tmp_path):
    """An upstream answering 302 elsewhere is an upstream that is not ready, and the place it
    names is never asked (it would be polled every second and taken for the GPU server)."""
    import http.server
    import threading

    elsewhere_hits = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            elsewhere_hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"models": [{"name": "llama3.2:latest"}], "detail": "x"}')

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    target = f"http://127.0.0.1:{other.server_address[1]}"

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    redirecting = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (other, redirecting):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = Endpoint(f"http://127.0.0.1:{redirecting.server_address[1]}")
        sessions = Sessions(2, tmp_path)
        result = probe(sessions, endpoint, ("llama3.2",))
        assert not result.ready and "302" in result.reason
        assert server_progress(sessions, endpoint) is None
        assert load_model(sessions, endpoint, "llama3.2", 60, 5) is not None
        assert elsewhere_hits == []
    finally:
        for server in (other, redirecting):
            server.shutdown()
            server.server_close()
