"""The S3 store's own parts: its URL, its signature, its start-up errors, its layout in the
bucket, compare-and-swap on the document, and what a slow store does (and does not) delay."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from datetime import datetime, timezone

import boto3
import pytest

from proxy.config import Config, ConfigError
from proxy.lifecycle.demand import Lifecycle
from proxy.provision.base import Endpoint
from proxy.store import open_store, s3client
from proxy.store.base import StoreError, WorkerReport
from proxy.store.s3 import S3Store
from proxy.store.s3client import S3Client, S3Location, Signer
from proxy.upstream.session import Sessions
from tests.doubles import fake_ollama
from tests.doubles.provisioners import GatedProvisioner
from tests.harness import MotoS3, free_port, wait_until

SOS = "https://sos-at-vie-2.exo.io"


@pytest.fixture
def bucket(moto):
    return moto.bucket()


def s3(moto):
    return boto3.client(
        "s3", endpoint_url=moto.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


def test_url_names_bucket_prefix_endpoint_and_the_zone_as_region():
    where = S3Location.parse(f"s3://gpu-state/proxy/prod?endpoint={SOS}/&s3ForcePathStyle=true")
    assert where == S3Location("gpu-state", "proxy/prod", SOS, "at-vie-2")
    assert where.key("lease.json") == "proxy/prod/lease.json"
    other = S3Location.parse("s3://gpu-state?endpoint=http://127.0.0.1:9000&region=eu-west-1")
    assert (other.prefix, other.region, other.key("lease.json")) == ("", "eu-west-1", "lease.json")


@pytest.mark.parametrize(
    "url, says",
    [
        ("s3://Bad_Bucket/p?endpoint=" + SOS, "does not name a bucket"),
        ("s3://gpu-state/p", "needs ?endpoint="),
        ("s3://gpu-state/p?endpoint=sos-at-vie-2.exo.io", "needs ?endpoint="),
        ("s3://gpu-state/p?endpoint=" + SOS + "&zone=x", "unknown parameter 'zone'"),
        ("redis://gpu-state", "is not a store URL"),
    ],
)
def test_a_bad_url_stops_start_up_with_one_line_naming_the_variable(url, says, tmp_path):
    with pytest.raises(ConfigError) as caught:
        open_store(url, tmp_path, MotoS3.CREDENTIALS)
    message = str(caught.value)
    assert message.startswith("PROXY_STATE_URL=") and says in message and "\n" not in message


def test_missing_credentials_are_named_and_no_secret_is_shown(moto, bucket, tmp_path):
    with pytest.raises(ConfigError, match="needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        open_store(moto.url(bucket), tmp_path, {"AWS_ACCESS_KEY_ID": "AKIDONLY"})


def test_a_missing_or_unreachable_bucket_stops_start_up(moto, tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}
    with pytest.raises(ConfigError) as missing:
        open_store(moto.url("no-such-bucket"), tmp_path, env)
    assert "bucket 'no-such-bucket' does not exist" in str(missing.value)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(ConfigError) as unreachable:
        open_store(f"s3://state/p?endpoint=http://127.0.0.1:{port}", tmp_path, env)
    assert f"cannot reach http://127.0.0.1:{port}" in str(unreachable.value)
    for caught in (missing, unreachable):
        assert "s3cr3t-value" not in str(caught.value) and "\n" not in str(caught.value)


def test_requests_are_signed_as_aws_signs_them():
    from unittest import mock

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    cases = [
        ("PUT", f"{SOS}/gpu-state/p/workers/host%3A12%3Aab.json", b'{"inflight":1}', ""),
        ("GET", "http://127.0.0.1:9000/s?list-type=2&prefix=p%2Fworkers%2F", b"", "session"),
    ]
    for method, url, body, token in cases:
        ours = Signer("AKID", "se/cret", "at-vie-2", token).sign(method, url, body, now)
        theirs = AWSRequest(method=method, url=url, data=body, headers={
            "host": ours["host"], "X-Amz-Content-SHA256": ours["x-amz-content-sha256"]})
        with mock.patch("botocore.auth.get_current_datetime", return_value=now):
            S3SigV4Auth(Credentials("AKID", "se/cret", token or None), "s3",
                        "at-vie-2").add_auth(theirs)
        assert ours["authorization"] == theirs.headers["Authorization"]


def test_objects_in_the_bucket_one_document_one_lease_one_report_per_worker(
    moto, bucket, tmp_path
):
    store = open_store(moto.url(bucket, "gpu/prod"), tmp_path, MotoS3.CREDENTIALS)
    assert store.acquire("host:7:ab", ttl=30)
    assert store.save({"phase": "ready"}, "host:7:ab")
    store.report(WorkerReport("host:7:ab", inflight=1, heartbeat=5.0))
    store.report(WorkerReport("other:8:cd", heartbeat=6.0))
    listed = s3(moto).list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == [
        "gpu/prod/lease.json", "gpu/prod/lifecycle.json",
        "gpu/prod/workers/host:7:ab.json", "gpu/prod/workers/other:8:cd.json",
    ]
    lease = json.loads(s3(moto).get_object(Bucket=bucket, Key="gpu/prod/lease.json")["Body"]
                       .read())
    assert lease["holder"] == "host:7:ab" and lease["epoch"] == 1
    store.close()


def test_a_document_changed_behind_the_holders_back_is_not_overwritten(moto, bucket, tmp_path):
    store = open_store(moto.url(bucket), tmp_path, MotoS3.CREDENTIALS)
    assert store.acquire("a", ttl=30)
    assert store.save({"phase": "provisioning"}, "a")
    # A holder deposed while paused writes once more (its PUT was already on the wire).
    s3(moto).put_object(Bucket=bucket, Key="proxy/lifecycle.json", Body=b'{"phase":"ready"}')
    assert not store.save({"phase": "error"}, "a")  # the ETag moved: someone wrote first
    assert store.load() == {"phase": "ready"}
    assert store.save({"phase": "idle"}, "a")  # after reading it again
    store.close()


def test_two_takers_of_a_lapsed_lease_never_both_win(moto, bucket, tmp_path):
    stores = [open_store(moto.url(bucket), tmp_path, MotoS3.CREDENTIALS) for _ in range(8)]
    assert stores[0].acquire("first", ttl=60)
    stores[0].release("first")
    barrier = threading.Barrier(len(stores) - 1)
    won = []

    def take(n: int) -> None:
        barrier.wait()
        if stores[n].acquire(f"taker-{n}", ttl=60):
            won.append(n)

    threads = [threading.Thread(target=take, args=(n,)) for n in range(1, len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and stores[0].lease()[0] == f"taker-{won[0]}"


class BlackHole:
    """A TCP server that accepts connections and never answers: a store that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        self.sock.close()


def test_a_hanging_store_delays_no_request_and_starts_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(s3client, "TIMEOUT", (0.3, 0.3))
    hole = BlackHole()
    where = S3Location("state", "p", hole.url, "us-east-1")
    store = S3Store(S3Client(where, Signer("AKID", "secret", "us-east-1")))
    provisioner = GatedProvisioner(Endpoint("http://127.0.0.1:9"))
    config = Config(state_dir=tmp_path, tick=0.05, lease_ttl=1.0)
    life = Lifecycle(config, provisioner, store, Sessions(2))
    try:
        started = time.monotonic()
        for _ in range(50):
            assert life.admit() is None  # a 503, answered from memory
        assert time.monotonic() - started < 0.1
        wait_until(lambda: life.store_error, 5, what="the store error")
        assert "cannot reach" in life.store_error
        time.sleep(0.5)
        assert provisioner.bring_ups == 0 and life.snapshot().state.phase == "idle"
    finally:
        life.close(timeout=2)
        hole.close()
    with pytest.raises(StoreError):
        store.load()


@pytest.fixture
def upstream():
    server = fake_ollama.start_in_thread(models="llama3.2")
    yield server
    server.close()


def test_two_workers_on_s3_bring_up_one_server_and_agree_on_the_reconciler(
    moto, bucket, upstream, tmp_path
):
    config = Config(state_dir=tmp_path, tick=0.05, lease_ttl=2.0, models=("llama3.2",),
                    state_url=moto.url(bucket))
    provisioner = GatedProvisioner(Endpoint(upstream.url), open_gate=False)
    lives = [
        Lifecycle(dataclasses.replace(config), provisioner,
                  open_store(config.state_url, tmp_path, MotoS3.CREDENTIALS), Sessions(2))
        for _ in range(2)
    ]
    try:
        for life in lives:
            assert life.admit() is None
        wait_until(lambda: all(x.snapshot().state.phase == "provisioning" for x in lives), 10,
                   what="provisioning on both")
        provisioner.gate.set()
        wait_until(lambda: all(x.snapshot().state.phase == "ready" for x in lives), 10,
                   what="ready on both")
        assert provisioner.bring_ups == 1
        holders = {life.snapshot().reconciler for life in lives}
        assert len(holders) == 1 and holders <= {life.worker for life in lives}
    finally:
        for life in lives:
            life.close(timeout=5)


def test_serve_stops_with_one_line_when_the_bucket_is_missing(moto, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, **MotoS3.CREDENTIALS, "PROXY_PROVISIONER": "local",
           "PROXY_STATE_DIR": str(tmp_path), "PROXY_STATE_URL": moto.url("no-such-bucket"),
           "PROXY_BIND": f"127.0.0.1:{free_port()}"}
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "serve"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "PROXY_STATE_URL=" in result.stderr and "does not exist" in result.stderr
