"""The fake Ollama speaks well enough for the real `ollama` and `openai` clients, paces its
streams, and its test hooks (token, blobs, starts file, tags delay, cut streams) work."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import ollama
import openai
import pytest
import requests

from tests.doubles import fake_ollama
from tests.harness import REPO, free_port, wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server():
    fake = fake_ollama.start_in_thread(
        models="llama3.2,nomic-embed-text", chunk_interval=0.05, chunks=6
    )
    yield fake
    fake.close()


def chat_message() -> list[dict]:
    return [{"role": "user", "content": "hello there"}]


def test_ollama_client_streams_a_chat_whose_chunks_arrive_spaced(server):
    client = ollama.Client(host=server.url)
    arrivals = []
    for chunk in client.chat(model="llama3.2", messages=chat_message(), stream=True):
        arrivals.append((time.monotonic(), chunk))
    contents = [chunk.message.content for _, chunk in arrivals if not chunk.done]
    assert contents == [f"tok{i} " for i in range(6)]
    final = arrivals[-1][1]
    assert final.done and final.done_reason == "stop" and final.eval_count == 6
    times = [at for at, _ in arrivals]
    assert times == sorted(times)
    # Paced, not buffered: 6 intervals of 0.05 s separate the first chunk from the last.
    assert times[-1] - times[0] > 0.15


def test_ollama_client_non_streamed_answers_and_options(server):
    client = ollama.Client(host=server.url)
    answer = client.chat(model="llama3.2", messages=chat_message(), options={"num_predict": 3})
    assert answer.message.content == "tok0 tok1 tok2 " and answer.done
    generated = client.generate(model="llama3.2:latest", prompt="hi", options={"num_predict": 2})
    assert generated.response == "tok0 tok1 " and generated.context
    loaded = client.generate(model="llama3.2", keep_alive="10m")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert [m.model for m in client.ps().models] == ["llama3.2:latest"]
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="mistral", messages=chat_message())
    assert caught.value.status_code == 404
    assert caught.value.error == 'model "mistral" not found, try pulling it first'


def test_ollama_client_embed_show_list_and_delete(server):
    client = ollama.Client(host=server.url)
    embedded = client.embed(model="nomic-embed-text", input=["a cat", "a dog", "a cat"])
    vectors = embedded.embeddings
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert len(client.embeddings(model="nomic-embed-text", prompt="x").embedding) == 384

    shown = client.show("llama3.2")
    assert shown.details.family == "llama" and shown.modelinfo["general.architecture"] == "llama"
    assert "FROM" in shown.modelfile and shown.template and "stop" in shown.parameters
    raw = requests.post(server.url + "/api/show", json={"model": "llama3.2"}, timeout=5)
    assert 2000 < len(raw.content) < 20000

    listed = client.list().models
    assert [m.model for m in listed] == ["llama3.2:latest", "nomic-embed-text:latest"]
    assert listed[0].details.parameter_size and listed[0].size > 0
    assert client.delete("nomic-embed-text").status == "success"
    assert [m.model for m in client.list().models] == ["llama3.2:latest"]
    with pytest.raises(ollama.ResponseError) as caught:
        client.delete("nomic-embed-text")
    assert caught.value.status_code == 404


def test_ollama_client_pulls_a_model_with_progress(server):
    client = ollama.Client(host=server.url)
    statuses = list(client.pull("qwen3:0.6b", stream=True))
    assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
    assert any(s.total and s.completed == s.total for s in statuses)
    assert "qwen3:0.6b" in [m.model for m in client.list().models]


def test_openai_client_streams_a_chat_completion(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="llama3.2", messages=chat_message(), stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"tok{i} " for i in range(6))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 6

    whole = client.chat.completions.create(model="llama3.2", messages=chat_message(), max_tokens=2)
    assert whole.choices[0].message.content == "tok0 tok1 " and whole.usage.total_tokens > 2
    assert [m.id for m in client.models.list()] == ["llama3.2:latest", "nomic-embed-text:latest"]
    embedding = client.embeddings.create(model="nomic-embed-text", input="hello").data[0]
    assert len(embedding.embedding) == 384
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=chat_message())
    assert "not found" in caught.value.message


def test_token_is_required_except_on_the_root():
    with fake_ollama.start_in_thread(token="s3cret") as fake:
        assert requests.get(fake.url + "/", timeout=5).status_code == 200
        refused = requests.get(fake.url + "/api/tags", timeout=5)
        assert refused.status_code == 401 and refused.json() == {"error": "unauthorized"}
        wrong = {"Authorization": "Bearer nope"}
        assert requests.get(fake.url + "/api/tags", headers=wrong, timeout=5).status_code == 401
        client = ollama.Client(host=fake.url, headers={"Authorization": "Bearer s3cret"})
        assert [m.model for m in client.list().models] == ["llama3.2:latest"]


def chunked_body(pieces: int = 24, size: int = 50_000):
    """A generator body: httpx sends it with Transfer-Encoding: chunked."""
    for i in range(pieces):
        yield hashlib.sha256(str(i).encode()).digest() * (size // 32)


def test_blob_upload_checks_the_digest_of_a_chunked_body(server):
    digest = "sha256:" + hashlib.sha256(b"".join(chunked_body())).hexdigest()
    blob_url = f"{server.url}/api/blobs/{digest}"
    with httpx.Client(timeout=10) as client:
        echoed = client.post(server.url + "/__echo/upload", content=chunked_body()).json()
        assert echoed["headers"].get("Transfer-Encoding") == "chunked"
        assert "sha256:" + echoed["body_sha256"] == digest
        assert client.head(blob_url).status_code == 404
        assert client.post(blob_url, content=chunked_body()).status_code == 201
        assert client.head(blob_url).status_code == 200
        wrong = client.post(blob_url.replace(digest[-4:], "0000"), content=chunked_body())
        assert wrong.status_code == 400 and wrong.json() == {"error": "digest mismatch"}
        # The connection survives the refused upload: the next request on it works.
        assert client.get(server.url + "/api/version").json() == {"version": "0.12.6"}


def test_fail_after_cuts_the_stream_without_its_last_chunk(server):
    with requests.post(
        server.url + "/api/chat",
        json={"model": "llama3.2", "messages": chat_message()},
        headers={"X-Fake-Fail-After": "2", "X-Fake-Interval": "0.01"},
        stream=True,
        timeout=5,
    ) as answer:
        lines = []
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for line in answer.iter_lines():
                lines.append(json.loads(line))
    assert [line["message"]["content"] for line in lines] == ["tok0 ", "tok1 "]
    assert requests.get(server.url + "/api/version", timeout=5).status_code == 200


def test_tags_delay_lists_no_model_then_the_model():
    with fake_ollama.start_in_thread(tags_delay=0.5) as fake:
        assert requests.get(fake.url + "/api/tags", timeout=5).json() == {"models": []}
        wait_until(
            lambda: requests.get(fake.url + "/api/tags", timeout=5).json()["models"],
            5,
            what="the model to be listed",
        )
        listed = requests.get(fake.url + "/api/tags", timeout=5).json()["models"]
        assert [m["name"] for m in listed] == ["llama3.2:latest"]


def test_hooks_echo_download_stats_and_request_log(tmp_path):
    log = tmp_path / "requests.jsonl"
    with fake_ollama.start_in_thread(request_log=str(log)) as fake:
        echoed = requests.put(fake.url + "/__echo/a/b?x=1", data=b"\xff" * 2000, timeout=5).json()
        assert echoed["method"] == "PUT" and echoed["path"] == "/__echo/a/b"
        assert echoed["query"] == "x=1" and echoed["body_length"] == 2000
        assert echoed["body_head"] == "\xff" * 1024
        download = requests.get(fake.url + "/__download?size=200000", timeout=5)
        assert download.headers["Transfer-Encoding"] == "chunked"
        assert download.content == (bytes(range(256)) * 782)[:200000]
        missing = requests.get(fake.url + "/api/nothing", timeout=5)
        assert missing.status_code == 404 and missing.text == "404 page not found"
        bad = requests.post(fake.url + "/api/chat", data=b"{not json", timeout=5)
        assert bad.status_code == 400 and "error" in bad.json()
        stats = requests.get(fake.url + "/__stats", timeout=5).json()
        assert stats["pid"] == os.getpid() and stats["active_streams"] == 0
        assert stats["requests"]["GET /__download"] == 1
        assert fake.stats()["requests"]["GET /__stats"] == 1
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["path"] for r in records][:2] == ["/__echo/a/b", "/__download"]
    assert records[0]["body_sha256"] == hashlib.sha256(b"\xff" * 2000).hexdigest()


def test_close_cuts_an_open_stream():
    fake = fake_ollama.start_in_thread(chunk_interval=5, chunks=3)
    answer = requests.post(
        fake.url + "/api/generate", json={"model": "llama3.2", "prompt": "hi"}, stream=True,
        timeout=10,
    )
    lines = answer.iter_lines()
    assert json.loads(next(lines))["response"] == "tok0 "
    started = time.monotonic()
    fake.close()
    with pytest.raises(requests.exceptions.RequestException):
        list(lines)
    assert time.monotonic() - started < 3
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(fake.url + "/", timeout=2)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ("127.0.0.1", 11434)),
        ("0.0.0.0", ("0.0.0.0", 11434)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("http://localhost:9000", ("localhost", 9000)),
        ("[::1]:7000", ("::1", 7000)),
    ],
)
def test_listen_address_forms(value, expected):
    assert fake_ollama.parse_listen(value) == expected


def start_subprocess(port: int, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.doubles.fake_ollama", *flags],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )

    def answers() -> bool:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            return requests.get(f"http://127.0.0.1:{port}/", timeout=1).text == "Ollama is running"
        except requests.RequestException:
            return False

    wait_until(answers, 10, what="the fake Ollama subprocess")
    return process


def test_subprocess_listens_on_ollama_host_records_starts_and_exits_cleanly(tmp_path):
    port, starts = free_port(), tmp_path / "starts"
    flags = ("--models", "llama3.2", "--chunk-interval", "0.01", "--starts-file", str(starts))
    for sig in (signal.SIGTERM, signal.SIGINT):
        process = start_subprocess(port, *flags)
        try:
            client = ollama.Client(host=f"127.0.0.1:{port}")
            chunks = list(client.chat(model="llama3.2", messages=chat_message(), stream=True))
            assert len(chunks) == 9 and chunks[-1].done
            process.send_signal(sig)
            assert process.wait(timeout=5) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stderr.close()
    lines = starts.read_text().splitlines()
    assert len(lines) == 2 and all(len(line.split()) == 2 for line in lines)
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/", timeout=2)


def test_tls(tmp_path):
    assert shutil.which("openssl"), "needs the openssl command (Debian package openssl)"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=20,
    )
    with fake_ollama.start_in_thread(tls_cert=str(cert), tls_key=str(key)) as fake:
        assert fake.url.startswith("https://")
        answer = requests.get(fake.url + "/api/version", verify=str(cert), timeout=5)
        assert answer.json() == {"version": "0.12.6"}
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(fake.url + "/", timeout=5)  # not trusted without the certificate
