"""Property tests (hypothesis): any environment gives a Config or one line naming the variable;
whatever headers and path a client sends, the upstream request (as aiohttp writes it, read on
a raw socket) goes to the configured host without hop-by-hop headers, Connection-listed ones,
or the client's Host."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import falcon
import falcon.asgi
import falcon.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from urllib3.util import parse_url

from proxy.config import Config, ConfigError
from proxy.provision.base import Endpoint
from proxy.upstream.forward import Forwarder
from proxy.upstream.framing import HOP_BY_HOP
from proxy.upstream.session import Sessions
from tests.harness import read_message

NUMBERS = [
    "PROXY_IDLE_TIMEOUT", "EXOSCALE_IDLE_TIMEOUT", "PROXY_WORKERS", "PROXY_MAX_CONNECTIONS",
    "PROXY_MAX_HOLD", "PROXY_MAX_HELD", "PROXY_MAX_BODY_MB", "PROXY_MAX_BLOB_GB",
    "PROXY_AUTH_FAILURES", "EXOSCALE_DISK_SIZE", "PROXY_CONNECT_TIMEOUT", "PROXY_READ_TIMEOUT",
    "PROXY_WORKER_TIMEOUT", "PROXY_CLIENT_TIMEOUT", "PROXY_START_TIMEOUT", "PROXY_LEASE_TTL",
    "PROXY_TICK", "PROXY_RETRY_BASE", "PROXY_RETRY_MAX",
]
OTHERS = [
    "PROXY_PROVISIONER", "PROXY_LOCAL_COMMAND", "PROXY_LOCAL_ADDR", "PROXY_IDLE_ACTION",
    "PROXY_BIND", "PROXY_STATE_DIR", "PROXY_STATE_URL", "OLLAMA_MODEL", "EXOSCALE_ZONE",
    "EXOSCALE_INSTANCE_TYPE", "EXOSCALE_TEMPLATE", "PROXY_LOG_LEVEL", "PROXY_LOG_FORMAT",
]
NUMBER_LIKE = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1e308", "-1e308", "1e-400", "inf", "nan", "1_000", " 7 ", "0x10", "٣"]),
    st.text(max_size=12),
)
VALUES = st.one_of(st.text(max_size=40), NUMBER_LIKE, st.sampled_from([
    "local", "exoscale", "stop", "destroy", "127.0.0.1:11434", "[::1]:1", "host:0",
    "sqlite:///x.db", "s3://b/p", "redis://x", "llama3.2,qwen3:8b", " , ", "debug", "json",
]))
ENVIRONMENTS = st.dictionaries(st.sampled_from(NUMBERS + OTHERS), VALUES, max_size=6)
SHORT_KEYS = st.lists(st.text("0123456789", min_size=4, max_size=7), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None)
@given(ENVIRONMENTS)
def test_any_environment_gives_a_config_or_one_line_naming_the_variable(env):
    try:
        config = Config.from_env(env)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert any(name in message for name in env), message
        return
    assert isinstance(config, Config)
    assert config.max_body >= 0 and config.workers >= 1


@settings(max_examples=100, deadline=None)
@given(SHORT_KEYS)
def test_a_refused_api_key_is_never_in_the_error(keys):
    try:
        Config.from_env({"PROXY_API_KEYS": ",".join(keys)})
    except ConfigError as exc:
        assert all(key not in str(exc) for key in keys)
    else:
        raise AssertionError("keys shorter than 8 characters were accepted")


class _Capture:
    """A raw socket upstream that keeps each request head it gets and answers it empty."""

    def __init__(self):
        self.heads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            while (message := read_message(conn)) is not None:
                self.heads.append(message[0])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def sent(self) -> dict[str, Any]:
        """The last request as the upstream read it: target, headers (name: value), hosts."""
        request_line, *lines = self.heads[-1].decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ")
        headers = dict(line.split(": ", 1) for line in lines)
        hosts = [line for line in lines if line.lower().startswith("host:")]
        return {"method": method, "target": target, "headers": headers, "hosts": hosts}


CAPTURE = _Capture()
ENDPOINT = Endpoint(f"http://127.0.0.1:{CAPTURE.port}", token="upstream-token-123")
UPSTREAM_HOST = f"127.0.0.1:{CAPTURE.port}"
LOOP = asyncio.new_event_loop()  # one, as a worker has: the session and its pool are kept
FORWARDER = Forwarder(Sessions(), 1, 5)
FRAMING = {"content-length", "transfer-encoding"}  # the server checks these before the app
HEADER_NAMES = st.one_of(
    st.sampled_from(sorted(HOP_BY_HOP - FRAMING) + ["authorization", "x-custom", "content-type"]),
    st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z"),
).filter(lambda name: name.lower() not in FRAMING)
HEADER_VALUES = st.from_regex(r"\A[ -~]{0,40}\Z").map(str.strip)


def send(path: str, query: str, headers: dict[str, str], strip: bool) -> dict[str, Any]:
    scope = falcon.testing.create_scope(path="/", headers=headers)
    scope["path"] = path  # as uvicorn decodes it, whatever the client wrote
    scope["query_string"] = query.encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def forward() -> None:
        req = falcon.asgi.Request(scope, receive)
        resp = falcon.asgi.Response()
        await FORWARDER.forward(req, resp, ENDPOINT, lambda: None, strip_authorization=strip)

    LOOP.run_until_complete(forward())
    return CAPTURE.sent()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example({"Content-Type": "application/json"}, ["Content-Type"], False)  # WSGI keeps it apart
@given(
    # Names unique whatever their case: WSGI joins `K` and `k` into one header, as HTTP means.
    st.dictionaries(HEADER_NAMES.map(str.title), HEADER_VALUES, max_size=8),
    st.lists(HEADER_NAMES, max_size=3),
    st.booleans(),
)
def test_hop_by_hop_connection_listed_and_host_headers_are_never_forwarded(
    headers, listed, strip
):
    if listed:
        headers["Connection"] = ", ".join(listed)
    headers.setdefault("Host", "evil.example")
    # What Connection names, whoever set it (the drawn headers may hold a Connection too).
    listed = [n.strip() for n in headers.get("Connection", "").split(",") if n.strip()]
    sent = send("/api/chat", "", headers, strip)
    assert sent["headers"].pop("Authorization") == f"Bearer {ENDPOINT.token}"  # the proxy's
    assert sent["hosts"] == [f"Host: {UPSTREAM_HOST}"]  # the upstream's, never the client's
    del sent["headers"]["Host"]
    sent["headers"] = {name.lower(): value for name, value in sent["headers"].items()}
    names = set(sent["headers"])
    assert not names & HOP_BY_HOP
    assert not names & {name.lower() for name in listed}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in HOP_BY_HOP | {n.lower() for n in listed} | {"authorization"}:
            assert sent["headers"][lowered] == value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60), st.from_regex(r"\A[!-~]{0,30}\Z"))
def test_no_path_or_query_sends_the_request_to_another_host(rest, query):
    # The ASGI path: percent-decoded, any character the client could spell.
    sent = send("/api/" + rest.decode("latin-1"), query, {}, strip=False)
    target = sent["target"]
    assert target.startswith("/api/")  # a path on the pool's host, never `//host` or a URL
    assert sent["hosts"] == [f"Host: {UPSTREAM_HOST}"]
    parsed = parse_url(f"http://{UPSTREAM_HOST}" + target)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.auth) == (
        "http", "127.0.0.1", CAPTURE.port, None)
