"""The stand-in's GPU server runs the real front: after `pulumi up` (the real program, the
stand-in CLI), the instance answers through Debian's nginx with the site cloud-init rendered
from the stack's certificate and token, in front of the test Ollama."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from pathlib import Path

import pytest

from infra.runner import StackRunner
from tests.doubles.standin_pulumi.harness import ROOT, get_tags, settings_for, standin_world

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def gpu_server(tmp_path):
    """`pulumi up` of the real program against the stand-in; yields (world, stack outputs)."""
    with standin_world(tmp_path) as world:
        runner = StackRunner(settings_for(world.port), world.state_dir, world.env,
                             pulumi_root=ROOT)
        outputs = runner.up(lambda sentence: None)
        get_tags(outputs.remote_url, outputs.token, outputs.tls_certificate,
                 outputs.tls_server_name)  # waited for: the bring-up is done
        yield world, outputs


def get(outputs, path: str, *authorizations: str) -> tuple[http.client.HTTPResponse, bytes]:
    """GET over TLS pinned to the stack's certificate, with these Authorization headers."""
    host, port = outputs.remote_url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cadata=outputs.tls_certificate)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    raw = socket.create_connection((host, int(port)), timeout=10)
    connection.sock = context.wrap_socket(raw, server_hostname=outputs.tls_server_name)
    connection.putrequest("GET", path)
    for value in authorizations:
        connection.putheader("Authorization", value)
    connection.endheaders()
    response = connection.getresponse()
    return response, response.read()


def test_the_instance_answers_through_nginx_with_the_stacks_token(gpu_server):
    world, outputs = gpu_server
    response, body = get(outputs, "/api/tags", f"Bearer {outputs.token}")
    assert response.status == 200 and response.getheader("Server").startswith("nginx")
    assert [m["name"] for m in json.loads(body)["models"]] == ["llama3.2:latest"]
    refused, body = get(outputs, "/api/tags", "Bearer not-the-token")
    assert refused.status == 401 and "bearer token" in json.loads(body)["error"]
    # The progress route of the rendered site, written by cloud-init/progress.py.
    response, body = get(outputs, "/ollama-exoscale/status", f"Bearer {outputs.token}")
    assert response.status == 200 and json.loads(body)["phase"] == "ready"


def test_the_instance_answers_400_to_two_authorization_headers(gpu_server):
    world, outputs = gpu_server
    for second in (f"Bearer {outputs.token}", "Bearer sk-a-clients-own-key"):
        response, _ = get(outputs, "/api/tags", f"Bearer {outputs.token}", second)
        assert response.status == 400 and response.getheader("Server").startswith("nginx")
    response, _ = get(outputs, "/api/tags", f"Bearer {outputs.token}")
    assert response.status == 200  # exactly one, the right one, passes


def test_the_instance_runs_the_files_cloud_init_wrote_and_its_disk_goes_with_it(gpu_server):
    world, outputs = gpu_server
    (record,) = world.instances().values()
    disk = Path(record["disk"])
    site = disk / "etc/ollama-exoscale/nginx-site.conf"
    assert f'"Bearer {outputs.token}"' in site.read_text()  # the rendered site, as written
    assert (site.stat().st_mode & 0o777) == 0o600
    assert (disk / "etc/ollama-exoscale/tls.crt").read_text() == outputs.tls_certificate
    assert (disk / "var/lib/ollama-exoscale/ready").exists()
    StackRunner(settings_for(world.port), world.state_dir, world.env,
                pulumi_root=ROOT).destroy(lambda sentence: None)
    assert not disk.exists() and world.instances() == {}
