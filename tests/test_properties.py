"""Property tests (hypothesis): any environment gives a Config or one line naming the variable;
whatever headers and path a client sends, the upstream request goes to the configured host
without hop-by-hop headers, Connection-listed ones, or the client's Host."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from urllib3.util import parse_url

from proxy import h1
from proxy.config import Config, ConfigError
from proxy.forward import HOP_BY_HOP, Forwarder
from proxy.provisioner import Endpoint

NUMBERS = [
    "PROXY_IDLE_TIMEOUT", "EXOSCALE_IDLE_TIMEOUT", "PROXY_WORKERS", "PROXY_THREADS",
    "PROXY_MAX_HOLD", "PROXY_MAX_HELD", "PROXY_MAX_BODY_MB", "PROXY_MAX_BLOB_GB",
    "PROXY_AUTH_FAILURES", "EXOSCALE_DISK_SIZE", "PROXY_CONNECT_TIMEOUT", "PROXY_READ_TIMEOUT",
    "PROXY_WORKER_TIMEOUT", "PROXY_START_TIMEOUT", "PROXY_LEASE_TTL", "PROXY_TICK",
    "PROXY_RETRY_BASE", "PROXY_RETRY_MAX",
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


class _Captured(Exception):
    pass


class _Connection:
    """Stands in for a socket to the upstream: keeps the bytes the real pool would send."""

    used = False

    def __init__(self, sent: list[bytes]):
        self.sent = sent

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        raise _Captured()

    def close(self) -> None:
        pass


class _Pool(h1.Pool):
    """The real pool (it writes the request head), with no socket under it."""

    def __init__(self):
        super().__init__("10.1.2.3", 11435, 1, 1, 1)
        self.bytes: list[bytes] = []

    def _take(self):
        return _Connection(self.bytes)

    @property
    def sent(self) -> dict[str, Any]:
        """The request as the upstream reads it: target, headers (name: value), host lines."""
        head, _, _ = b"".join(self.bytes).partition(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ")
        headers = dict(line.split(": ", 1) for line in lines)
        hosts = [line for line in lines if line.lower().startswith("host:")]
        return {"method": method, "target": target, "headers": headers, "hosts": hosts}


class _Sessions:
    def __init__(self):
        self.session = _Pool()

    def pool(self, endpoint, timeouts):
        return self.session


ENDPOINT = Endpoint("http://10.1.2.3:11435", token="upstream-token-123")
FRAMING = {"content-length", "transfer-encoding"}  # gunicorn checks these before the app
HEADER_NAMES = st.one_of(
    st.sampled_from(sorted(HOP_BY_HOP - FRAMING) + ["authorization", "x-custom", "content-type"]),
    st.from_regex(r"\A[A-Za-z][A-Za-z0-9-]{0,15}\Z"),
).filter(lambda name: name.lower() not in FRAMING)
HEADER_VALUES = st.from_regex(r"\A[ -~]{0,40}\Z").map(str.strip)


def send(path: str, query: str, headers: dict[str, str], strip: bool) -> dict[str, Any]:
    sessions = _Sessions()
    environ = falcon.testing.create_environ(path="/", headers=headers)
    environ["PATH_INFO"] = path  # as gunicorn decodes it, whatever the client wrote
    environ["QUERY_STRING"] = query
    req = falcon.Request(environ)
    try:
        Forwarder(sessions, 1, 1).forward(
            req, falcon.Response(), ENDPOINT, lambda: None, strip_authorization=strip
        )
    except _Captured:
        pass
    return sessions.session.sent


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
    sent = send("/api/chat", "", headers, strip)
    assert sent["headers"].pop("Authorization") == f"Bearer {ENDPOINT.token}"  # the proxy's
    assert sent["hosts"] == ["Host: 10.1.2.3:11435"]  # the upstream's, never the client's
    del sent["headers"]["Host"]
    names = {name.lower() for name in sent["headers"]}
    assert not names & HOP_BY_HOP
    assert not names & {name.lower() for name in listed}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered not in HOP_BY_HOP | {n.lower() for n in listed} | {"authorization"}:
            assert sent["headers"][name.title()] == value


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=60), st.from_regex(r"\A[!-~]{0,30}\Z"))
def test_no_path_or_query_sends_the_request_to_another_host(rest, query):
    # WSGI's PATH_INFO: the percent-decoded bytes of the path, one character per byte.
    sent = send("/api/" + rest.decode("latin-1"), query, {}, strip=False)
    target = sent["target"]
    assert target.startswith("/api/")  # a path on the pool's host, never `//host` or a URL
    assert sent["hosts"] == ["Host: 10.1.2.3:11435"]
    parsed = parse_url("http://10.1.2.3:11435" + target)
    assert (parsed.scheme, parsed.host, parsed.port, parsed.auth) == (
        "http", "10.1.2.3", 11435, None)
