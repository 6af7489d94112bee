"""An Ollama-compatible HTTP server for tests and benchmarks (standard library only).

It stands in for Ollama where Ollama cannot run: as a command
(`python -m tests.doubles.fake_ollama`, listening on OLLAMA_HOST like `ollama serve`), or
in-process via `start_in_thread()`. It answers
Ollama's native routes and its OpenAI-compatible `/v1` routes with the JSON shapes the real
`ollama` and `openai` Python clients parse, streams tokens at a fixed pace, and has hooks for
tests: per-request pacing and failure headers, `/__echo/…`, `/__download`, `/__stats`.

    python -m tests.doubles.fake_ollama --models llama3.2,nomic-embed-text --chunk-interval 0.05
    server = start_in_thread(models="llama3.2", tags_delay=1.5); server.url; server.close()

Per request: `X-Fake-Interval: S` paces the stream, `options.num_predict` (or OpenAI's
`max_tokens`) sets its token count, `X-Fake-Fail-After: K` cuts a streamed response (TCP reset,
no terminating chunk) after K chunks, `X-Fake-Think: S` works S seconds before a chat or
generate answers (a model loading, or a whole answer generated for stream: false), and stops,
as Ollama does, when the client hangs up meanwhile (counted as "cancelled" in /__stats).

`OLLAMA_NUM_PARALLEL` (or `--num-parallel`) generates at most that many answers at once and
queues the rest, as Ollama does (docs/faq.md, "How does Ollama handle concurrent requests?",
in ollama/ollama: requests beyond the parallel limit wait in a queue); /__stats says how many
generate now (`generating`) and the most at once (`generating_max`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import hmac
import itertools
import json
import math
import os
import re
import select
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 11434
VERSION = "0.12.6"
EMBEDDING_DIMENSIONS = 384
MAX_JSON_BODY = 64 << 20  # JSON bodies are read whole; larger ones are refused
DRAIN_LIMIT = 64 << 20  # an unread body up to this size is drained so the connection stays usable
READ_SIZE = 1 << 20
DOWNLOAD_CHUNK = 64 << 10
DOWNLOAD_PATTERN = bytes(range(256)) * (DOWNLOAD_CHUNK // 256)

TEMPLATE = """<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023

{{ if .System }}{{ .System }}
{{- end }}
{{- if .Tools }}When you receive a tool call response, use the output to format an answer to the \
original user question.

You are a helpful assistant with tool calling capabilities.
{{- end }}<|eot_id|>
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>
{{- if and $.Tools $last }}

Given the following functions, please respond with a JSON for a function call with its proper \
arguments that best answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument name and its \
value}. Do not use variables.

{{ range $.Tools }}
{{- . }}
{{ end }}
{{ .Content }}<|eot_id|>
{{- else }}

{{ .Content }}<|eot_id|>
{{- end }}{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>
{{- if .ToolCalls }}
{{ range .ToolCalls }}
{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}
{{- else }}

{{ .Content }}
{{- end }}{{ if not $last }}<|eot_id|>{{ end }}
{{- else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>

{{ .Content }}<|eot_id|>{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
{{- end }}"""

PARAMETERS = "\n".join(
    f'stop                           "{stop}"'
    for stop in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
)

LICENSE = (
    "FAKE MODEL LICENSE AGREEMENT\n\n"
    "This model does not exist: it is served by tests/doubles/fake_ollama.py, a test double that "
    "answers with numbered tokens. No weights were downloaded, no GPU was used, and nothing it "
    "says means anything. You may use, copy and modify this text without restriction.\n"
)

MODEL_INFO = {
    "general.architecture": "llama",
    "general.basename": "Llama-3.2",
    "general.file_type": 15,
    "general.finetune": "Instruct",
    "general.languages": ["en", "de", "fr", "it", "pt", "hi", "es", "th"],
    "general.parameter_count": 3212749888,
    "general.quantization_version": 2,
    "general.size_label": "3B",
    "general.type": "model",
    "llama.attention.head_count": 24,
    "llama.attention.head_count_kv": 8,
    "llama.attention.key_length": 128,
    "llama.attention.layer_norm_rms_epsilon": 1e-05,
    "llama.attention.value_length": 128,
    "llama.block_count": 28,
    "llama.context_length": 131072,
    "llama.embedding_length": 3072,
    "llama.feed_forward_length": 8192,
    "llama.rope.dimension_count": 128,
    "llama.rope.freq_base": 500000,
    "llama.vocab_size": 128256,
    "tokenizer.ggml.bos_token_id": 128000,
    "tokenizer.ggml.eos_token_id": 128009,
    "tokenizer.ggml.merges": None,
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "llama-bpe",
    "tokenizer.ggml.token_type": None,
    "tokenizer.ggml.tokens": None,
}

OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                      404: "not_found_error"}


@dataclass
class Options:
    """Everything the CLI flags set; `start_in_thread(**options)` takes the same names."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    models: str | Iterable[str] = "llama3.2"
    chunk_interval: float = 0.02
    chunks: int = 8
    token: str | None = None
    startup_delay: float = 0.0
    tags_delay: float = 0.0
    starts_file: str | os.PathLike | None = None
    request_log: str | os.PathLike | None = None
    tls_cert: str | os.PathLike | None = None
    tls_key: str | os.PathLike | None = None
    pull_seconds: float = 0.0  # a streamed pull's progress lines spread over this long
    num_parallel: int = 0  # answers generated at once, the rest queued (0: no limit)
    verbose: bool = False

    def model_names(self) -> list[str]:
        names = self.models.split(",") if isinstance(self.models, str) else list(self.models)
        return [normalise_model(name) for name in names if name.strip()]


# ---------------------------------------------------------------------------------------------
# Small pure helpers


def normalise_model(name: str) -> str:
    """Ollama's display name: `llama3.2` is `llama3.2:latest`; the default registry is implied."""
    name = name.strip()
    for prefix in ("registry.ollama.ai/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def parse_listen(value: str | None) -> tuple[str, int]:
    """`host:port`, `http://host:port`, `[::1]:port` or a bare `host` (port 11434)."""
    value = (value or "").strip()
    if not value:
        return "127.0.0.1", DEFAULT_PORT
    value = value.split("://", 1)[-1].split("/", 1)[0]
    match = re.fullmatch(r"\[([^\]]*)\](?::(\d+))?|([^:]*):(\d+)|([^:]*)", value)
    if not match:  # a bare IPv6 address
        return value, DEFAULT_PORT
    v6_host, v6_port, host, port, bare = match.groups()
    if v6_host is not None:
        return v6_host, int(v6_port or DEFAULT_PORT)
    if host is not None:
        return host or "0.0.0.0", int(port)
    return bare or "127.0.0.1", DEFAULT_PORT


def iso_now(offset: float = 0.0) -> str:
    moment = datetime.now(timezone.utc) + timedelta(seconds=offset)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def model_digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def model_details(name: str) -> dict:
    embedding = "embed" in name
    family = "nomic-bert" if embedding else "llama"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": "137M" if embedding else "3.2B",
        "quantization_level": "F16" if embedding else "Q4_K_M",
    }


def model_size(name: str) -> int:
    return 274302450 if "embed" in name else 2019393189


def count_words(text: Any) -> int:
    return max(1, len(str(text).split()))


def keep_alive_seconds(value: Any) -> float:
    """Ollama's keep_alive: seconds, or a Go duration such as `5m`; negative means forever."""
    if value is None or isinstance(value, bool):
        return 300.0
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)(ms|s|m|h)?\s*", str(value))
        if not match:
            return 300.0
        unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
        seconds = float(match.group(1)) * unit
    return 10 * 365 * 86400.0 if seconds < 0 else seconds


@functools.lru_cache(maxsize=4096)
@functools.lru_cache(maxsize=4096)  # the bench sends one text again and again: no CPU for it
def embedding_for(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> tuple[float, ...]:
    """A deterministic unit vector derived from the text (equal texts, equal vectors)."""
    raw = hashlib.shake_256(text.encode()).digest(dimensions)
    values = [(byte - 127.5) / 127.5 for byte in raw]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return tuple(round(v / norm, 6) for v in values)


@functools.lru_cache(maxsize=256)  # the bench repeats one request: its answer is not re-encoded
def embed_answer(model: str, inputs: tuple[str, ...], dimensions: int) -> bytes:
    """/api/embed's answer, encoded."""
    return json_bytes({
        "model": model,
        "embeddings": [embedding_for(text, dimensions) for text in inputs],
        "total_duration": 1_000_000,
        "load_duration": 100_000,
        "prompt_eval_count": sum(count_words(text) for text in inputs),
    })


def embedding_dimensions(request: dict) -> int:
    """The request's `dimensions` (vectors are truncated to it), else 384."""
    wanted = request.get("dimensions")
    if isinstance(wanted, int) and not isinstance(wanted, bool) and 0 < wanted <= 4096:
        return wanted
    return EMBEDDING_DIMENSIONS


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def tokens(count: int) -> list[str]:
    return [f"tok{i} " for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Shared state


class State:
    """What every request thread shares: the model list, uploaded blobs, counters."""

    def __init__(self, options: Options, stop: threading.Event):
        self.options = options
        self.stop = stop
        self.lock = threading.Lock()
        self.models: list[str] = options.model_names()
        self.blobs: set[str] = set()
        self.loaded: dict[str, float] = {}  # model -> expiry (unix time), for /api/ps
        self.requests: Counter[str] = Counter()
        self.active_streams = 0
        self.active_connections = 0
        self.generating = 0
        self.generating_max = 0
        self.parallel = (threading.BoundedSemaphore(options.num_parallel)
                         if options.num_parallel > 0 else None)
        self.modified_at = iso_now()
        self.tags_ready_at = math.inf  # set when listening
        self.ids = itertools.count(1)
        self._log_fd: int | None = None
        if options.request_log:
            self._log_fd = os.open(
                options.request_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
            )

    def listening(self) -> None:
        """Called once the socket listens: starts the tags delay, records the start."""
        self.tags_ready_at = time.monotonic() + self.options.tags_delay
        if self.options.starts_file:
            with open(self.options.starts_file, "a") as starts:
                starts.write(f"{os.getpid()} {time.time()}\n")

    def find_model(self, name: str) -> str | None:
        wanted = normalise_model(name).lower()
        with self.lock:
            return next((m for m in self.models if m.lower() == wanted), None)

    def add_model(self, name: str) -> None:
        name = normalise_model(name)
        if not self.find_model(name):
            with self.lock:
                self.models.append(name)

    def remove_model(self, name: str) -> bool:
        found = self.find_model(name)
        if found:
            with self.lock:
                self.models.remove(found)
                self.loaded.pop(found, None)
        return found is not None

    def listed_models(self) -> list[str]:
        if time.monotonic() < self.tags_ready_at:
            return []  # a model pull is still "in progress"
        with self.lock:
            return list(self.models)

    def touch(self, model: str, keep_alive: Any) -> None:
        """Mark a model loaded (or unloaded, with keep_alive 0) for /api/ps."""
        seconds = keep_alive_seconds(keep_alive)
        with self.lock:
            if seconds <= 0:
                self.loaded.pop(model, None)
            else:
                self.loaded[model] = time.time() + seconds

    def running_models(self) -> dict[str, float]:
        now = time.time()
        with self.lock:
            return {m: exp for m, exp in self.loaded.items() if exp > now and m in self.models}

    def count(self, key: str) -> None:
        with self.lock:
            self.requests[key] += 1

    def add_streams(self, delta: int) -> None:
        with self.lock:
            self.active_streams += delta

    def add_connections(self, delta: int) -> None:
        with self.lock:
            self.active_connections += delta

    def stats(self) -> dict:
        with self.lock:
            return {
                "pid": os.getpid(),
                "requests": dict(self.requests),
                "active_streams": self.active_streams,
                "active_connections": self.active_connections,
                "generating": self.generating,
                "generating_max": self.generating_max,
            }

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """One answer generated: queued while OLLAMA_NUM_PARALLEL others are."""
        if self.parallel is not None:
            while not self.parallel.acquire(timeout=0.1):
                if self.stop.is_set():
                    raise Abort("the server stops")
        with self.lock:
            self.generating += 1
            self.generating_max = max(self.generating_max, self.generating)
        try:
            yield
        finally:
            with self.lock:
                self.generating -= 1
            if self.parallel is not None:
                self.parallel.release()

    def log_request(self, record: dict) -> None:
        if self._log_fd is not None:
            os.write(self._log_fd, json_bytes(record) + b"\n")  # O_APPEND: one line, one write

    def close(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None


# ---------------------------------------------------------------------------------------------
# Request bodies and streamed responses


class BadRequest(Exception):
    pass


class Abort(Exception):
    """Drop the connection now, mid-response (a test asked for it, or the server is closing)."""


class Body:
    """The request body, read incrementally (Content-Length or chunked), hashed as it goes."""

    def __init__(self, rfile, headers):
        self.rfile = rfile
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        try:
            self.remaining = 0 if self.chunked else int(headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
        self.done = not self.chunked and self.remaining <= 0
        self.chunk_left = 0
        self.length = 0
        self.sha256 = hashlib.sha256()

    def read(self, size: int = READ_SIZE) -> bytes:
        """Up to `size` bytes; b"" at the end of the body."""
        if self.done:
            return b""
        data = self._read_chunked(size) if self.chunked else self._read_exact(size)
        self.length += len(data)
        self.sha256.update(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        while data := self.read():
            yield data

    def read_all(self, limit: int) -> bytes:
        parts, size = [], 0
        for data in self:
            size += len(data)
            if size > limit:
                raise BadRequest("request body too large")
            parts.append(data)
        return b"".join(parts)

    def drain(self, limit: int) -> bool:
        """Read and discard up to `limit` bytes; True if the body is now fully read."""
        start = self.length
        while not self.done and self.length - start <= limit:
            self.read()
        return self.done

    def _read_exact(self, size: int) -> bytes:
        want = min(size, self.remaining)
        data = self.rfile.read(want)
        if len(data) < want:
            raise ConnectionError("the client closed the connection mid-body")
        self.remaining -= want
        self.done = self.remaining == 0
        return data

    def _read_chunked(self, size: int) -> bytes:
        if self.chunk_left == 0:
            self.chunk_left = self._chunk_size()
            if self.chunk_left == 0:
                self._skip_trailers()
                self.done = True
                return b""
        want = min(size, self.chunk_left)
        data = self.rfile.read(want)
        if len(data) < want:
            raise ConnectionError("the client closed the connection mid-chunk")
        self.chunk_left -= want
        if self.chunk_left == 0 and self.rfile.readline(3).strip():
            raise BadRequest("malformed chunked body")
        return data

    def _chunk_size(self) -> int:
        line = self.rfile.readline(1024)
        if not line:
            raise ConnectionError("the client closed the connection mid-body")
        try:
            return int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest("malformed chunked body") from None

    def _skip_trailers(self) -> None:
        while self.rfile.readline(65537).strip():
            pass


class Stream:
    """A streamed response body: one HTTP chunk per write, paced, optionally cut short."""

    def __init__(self, wfile, *, chunked: bool, interval: float, fail_after: int | None,
                 stop: threading.Event):
        self.wfile = wfile
        self.chunked = chunked
        self.interval = interval
        self.fail_after = fail_after
        self.stop = stop
        self.sent = 0
        self.started = 0.0

    def write(self, data: bytes | Callable[[], bytes]) -> None:
        """Send one chunk; a callable is called once it is the chunk's turn (fresh timestamps)."""
        self._check_cut()
        if self.sent == 0:
            self.started = time.monotonic()
        else:
            self._pace()
        if callable(data):
            data = data()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        self.sent += 1

    def line(self, make: Callable[[], Any]) -> None:
        """One NDJSON line built by `make` when it is sent."""
        self.write(lambda: json_bytes(make()) + b"\n")

    def event(self, obj: Any) -> None:
        """One Server-Sent Event: `data: <json>` (or raw bytes such as [DONE])."""
        self.write(b"data: " + (obj if isinstance(obj, bytes) else json_bytes(obj)) + b"\n\n")

    def end(self) -> None:
        self._check_cut()
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _check_cut(self) -> None:
        if self.stop.is_set() or (self.fail_after is not None and self.sent >= self.fail_after):
            raise Abort

    def _pace(self) -> None:
        """Chunk i goes out at start + i * interval (no drift), unless the server stops."""
        if self.interval <= 0:
            return
        delay = self.started + self.sent * self.interval - time.monotonic()
        if delay > 0 and self.stop.wait(delay):
            raise Abort


# ---------------------------------------------------------------------------------------------
# The request handler

ROUTES = {
    ("GET", "/"): "root",
    ("HEAD", "/"): "root",
    ("GET", "/api/version"): "version",
    ("HEAD", "/api/version"): "version",
    ("GET", "/api/tags"): "tags",
    ("HEAD", "/api/tags"): "tags",
    ("GET", "/api/ps"): "ps",
    ("POST", "/api/chat"): "chat",
    ("POST", "/api/generate"): "generate",
    ("POST", "/api/embed"): "embed",
    ("POST", "/api/embeddings"): "embeddings",
    ("POST", "/api/show"): "show",
    ("POST", "/api/pull"): "pull",
    ("POST", "/api/copy"): "copy",
    ("DELETE", "/api/delete"): "delete",
    ("GET", "/v1/models"): "openai_models",
    ("POST", "/v1/chat/completions"): "openai_chat",
    ("POST", "/v1/embeddings"): "openai_embeddings",
    ("GET", "/__download"): "download",
    ("GET", "/__stats"): "stats",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-ollama/" + VERSION
    sys_version = ""
    disable_nagle_algorithm = True  # TCP_NODELAY: each stream chunk leaves at once
    server: Server

    # -- plumbing -------------------------------------------------------------------------

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(30)  # the TLS handshake runs here, not in the accept loop
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.state.options.verbose:
            sys.stderr.write(f"fake-ollama {self.address_string()} {format % args}\n")

    def handle_any(self) -> None:
        state = self.server.state
        self.status = 0
        self.streaming = False
        split = urlsplit(self.path)
        self.route_path, self.query = unquote(split.path), split.query
        state.count(f"{self.command} {split.path}")
        self.body: Body | None = None
        try:
            self.body = Body(self.rfile, self.headers)
            self._run_route()
            self._settle_body()
        except Abort:
            self._drop_connection()
        except BadRequest as exc:
            self._respond_after_failure(400, str(exc))
        except OSError:
            self.close_connection = True  # the client went away
        except Exception as exc:  # a bug here: answer 500 rather than hang the client
            self.log_error("internal error: %r", exc)
            self._respond_after_failure(500, f"fake-ollama internal error: {exc!r}")
        finally:
            if self.streaming:
                state.add_streams(-1)
            self._log_request()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = handle_any

    def _run_route(self) -> None:
        if not self._authorized():
            self.respond_json(401, {"error": "unauthorized"})
            return
        route = self._find_route()
        if route is None:
            self.respond(404, b"404 page not found", "text/plain")
        else:
            route()

    def _find_route(self) -> Callable[[], None] | None:
        method, path = self.command, self.route_path
        name = ROUTES.get((method, path))
        if name:
            return getattr(self, name)
        # Test hooks also answer under /api and /v1, the only prefixes a proxy forwards.
        hook = path.removeprefix("/api").removeprefix("/v1")
        if hook == "/__echo" or hook.startswith("/__echo/"):
            return self.echo
        if method == "GET" and hook == "/__download":
            return self.download
        if path.startswith("/api/blobs/") and method in ("HEAD", "POST"):
            return self.blob_exists if method == "HEAD" else self.blob_upload
        if path.startswith("/v1/models/") and method == "GET":
            return self.openai_model
        return None

    def _authorized(self) -> bool:
        token = self.server.state.options.token
        if not token or (self.route_path == "/" and self.command in ("GET", "HEAD")):
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def _settle_body(self) -> None:
        """Leave the connection at the next request: drain a small unread body, else close."""
        if self.body is not None and not self.body.done:
            if not self.body.drain(DRAIN_LIMIT):
                self.close_connection = True

    def _respond_after_failure(self, status: int, message: str) -> None:
        self.close_connection = True
        if self.body is not None:
            self.body.done = True  # the connection closes: no point reading the rest
        if self.status:  # headers are out already: all we can do is cut the response
            self._drop_connection()
        else:
            try:
                self.error(status, message)
            except OSError:
                pass

    def _drop_connection(self) -> None:
        """Close abruptly (RST, no terminating chunk): what a crashed upstream looks like."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.rfile.close()  # drops makefile's reference so close() really closes the socket
        self.connection.close()

    def _log_request(self) -> None:
        state = self.server.state
        if state.options.request_log is None:
            return
        body = self.body
        state.log_request({
            "time": time.time(),
            "method": self.command,
            "path": urlsplit(self.path).path,
            "query": self.query,
            "headers": dict(self.headers.items()),
            "header_lines": [list(item) for item in self.headers.items()],  # repeats included
            "body_length": body.length if body else 0,
            "body_sha256": (body.sha256 if body else hashlib.sha256()).hexdigest(),
            "status": self.status,
        })

    # -- responses ------------------------------------------------------------------------

    def respond(self, status: int, body: bytes, content_type: str,
                headers: dict[str, str] | None = None) -> None:
        """A whole response in one write (headers and body), with Content-Length."""
        self._settle_body()
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        self.flush_headers()

    def respond_json(self, status: int, obj: Any) -> None:
        self.respond(status, json_bytes(obj), "application/json; charset=utf-8")

    def respond_empty(self, status: int) -> None:
        self.respond(status, b"", "text/plain; charset=utf-8")

    def error(self, status: int, message: str) -> None:
        """Ollama's `{"error": ...}`, or OpenAI's error object on /v1 routes."""
        if self.route_path.startswith("/v1/"):
            kind = OPENAI_ERROR_TYPES.get(status, "api_error")
            body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
            self.respond_json(status, body)
        else:
            self.respond_json(status, {"error": message})

    def start_stream(self, content_type: str, *, interval: float | None = None) -> Stream:
        self._settle_body()
        chunked = self.request_version != "HTTP/1.0"
        if not chunked:
            self.close_connection = True
        self.status = 200
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.streaming = True
        self.server.state.add_streams(1)
        return Stream(
            self.wfile,
            chunked=chunked,
            interval=self.interval() if interval is None else interval,
            fail_after=self._header_number("X-Fake-Fail-After", int),
            stop=self.server.state.stop,
        )

    # -- request helpers ------------------------------------------------------------------

    def _header_number(self, name: str, kind: type) -> Any:
        value = self.headers.get(name)
        try:
            return None if value is None else kind(value)
        except ValueError:
            return None

    def interval(self) -> float:
        value = self._header_number("X-Fake-Interval", float)
        return self.server.state.options.chunk_interval if value is None else max(0.0, value)

    def read_json(self) -> dict | None:
        """The JSON object body, or None after answering 400."""
        data = self.body.read_all(MAX_JSON_BODY)
        if not data.strip():
            self.error(400, "missing request body")
            return None
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            self.error(400, f"invalid JSON: {exc}")
            return None
        if not isinstance(obj, dict):
            self.error(400, "the request body must be a JSON object")
            return None
        return obj

    def read_model_request(self) -> tuple[dict, str] | None:
        """The JSON body and the listed model it names, or None after answering an error."""
        request = self.read_json()
        if request is None:
            return None
        model = self.require_model(request)
        return None if model is None else (request, model)

    def require_model(self, request: dict) -> str | None:
        """The listed model the request names, or None after answering 400/404."""
        name = request.get("model") or request.get("name")
        if not name or not isinstance(name, str):
            self.error(400, "model is required")
            return None
        found = self.server.state.find_model(name)
        if found is None:
            self.error(404, f'model "{name}" not found, try pulling it first')
        return found

    def token_count(self, *limits: Any) -> int:
        """Tokens to produce: the first non-negative integer limit, else --chunks."""
        for limit in limits:
            if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
                return limit
        return self.server.state.options.chunks

    # -- Ollama's native API --------------------------------------------------------------

    def root(self) -> None:
        self.respond(200, b"Ollama is running", "text/plain; charset=utf-8")

    def version(self) -> None:
        self.respond_json(200, {"version": VERSION})

    def tags(self) -> None:
        state = self.server.state
        models = [self._model_entry(name) for name in state.listed_models()]
        self.respond_json(200, {"models": models})

    def _model_entry(self, name: str) -> dict:
        return {
            "name": name,
            "model": name,
            "modified_at": self.server.state.modified_at,
            "size": model_size(name),
            "digest": model_digest(name),
            "details": model_details(name),
        }

    def ps(self) -> None:
        running = []
        for name, expiry in self.server.state.running_models().items():
            entry = self._model_entry(name)
            del entry["modified_at"]
            entry["expires_at"] = iso_now(expiry - time.time())
            entry["size_vram"] = entry["size"]
            entry["context_length"] = 4096
            running.append(entry)
        self.respond_json(200, {"models": running})

    def chat(self) -> None:
        found = self.read_model_request()
        if found is None:
            return
        request, model = found
        self.server.state.touch(model, request.get("keep_alive"))
        if not request.get("messages"):
            self._load_answer(model, request, {"message": {"role": "assistant", "content": ""}})
            return
        self._generate(model, request, lambda text: {
            "message": {"role": "assistant", "content": text}
        })

    def generate(self) -> None:
        found = self.read_model_request()
        if found is None:
            return
        request, model = found
        self.server.state.touch(model, request.get("keep_alive"))
        if not request.get("prompt"):
            self._load_answer(model, request, {"response": ""})
            return
        self._generate(model, request, lambda text: {"response": text}, {"context": [1, 2, 3]})

    def _think(self) -> None:
        """X-Fake-Think: S seconds of work before the answer's head, given up (Abort) when
        the client hangs up meanwhile, as Ollama cancels a request whose connection closed."""
        seconds = self._header_number("X-Fake-Think", float) or 0.0
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.connection, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0 and not self.server.state.stop.is_set():
            if not poller.poll(min(left, 0.1) * 1000):
                continue
            try:
                gone = not self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                self.server.state.count("cancelled")
                raise Abort("the client hung up")
            poller.unregister(self.connection)  # bytes of a next request: keep working

    def _load_answer(self, model: str, request: dict, content: dict) -> None:
        """An empty chat/generate only loads (keep_alive 0: unloads) the model, like Ollama."""
        unload = keep_alive_seconds(request.get("keep_alive")) <= 0
        self.respond_json(200, {
            "model": model, "created_at": iso_now(), **content,
            "done": True, "done_reason": "unload" if unload else "load",
        })

    def _generate(self, model: str, request: dict, content: Callable[[str], dict],
                  final_extra: dict | None = None) -> None:
        with self.server.state.generation():
            self._generate_now(model, request, content, final_extra)

    def _generate_now(self, model: str, request: dict, content: Callable[[str], dict],
                      final_extra: dict | None = None) -> None:
        self._think()
        options = request.get("options") or {}
        pieces = tokens(self.token_count(options.get("num_predict")))
        prompt_count = count_words(request.get("messages") or request.get("prompt"))
        started = time.monotonic_ns()

        def final(text: str) -> dict:
            elapsed = max(1, time.monotonic_ns() - started)
            return {
                "model": model, "created_at": iso_now(), **content(text),
                "done": True, "done_reason": "stop", **(final_extra or {}),
                "total_duration": elapsed, "load_duration": 1_000_000,
                "prompt_eval_count": prompt_count, "prompt_eval_duration": 2_000_000,
                "eval_count": len(pieces), "eval_duration": elapsed,
            }

        if request.get("stream") is False:
            self.respond_json(200, final("".join(pieces)))
            return
        stream = self.start_stream("application/x-ndjson")
        for piece in pieces:
            stream.line(lambda piece=piece: {
                "model": model, "created_at": iso_now(), **content(piece), "done": False
            })
        stream.line(lambda: final(""))
        stream.end()

    def embed(self) -> None:
        found = self.read_model_request()
        if found is None:
            return
        request, model = found
        self.server.state.touch(model, request.get("keep_alive"))
        given = request.get("input")
        inputs = [given] if isinstance(given, str) else list(given or [])
        answer = embed_answer(model, tuple(map(str, inputs)), embedding_dimensions(request))
        self.respond(200, answer, "application/json; charset=utf-8")

    def embeddings(self) -> None:
        found = self.read_model_request()
        if found is None:
            return
        request, model = found
        prompt = request.get("prompt")
        self.respond_json(200, {"embedding": embedding_for(prompt) if prompt else []})

    def show(self) -> None:
        request = self.read_json()
        if request is None:
            return
        name = request.get("model") or request.get("name") or ""
        model = self.server.state.find_model(str(name)) if name else None
        if model is None:
            self.error(404, f"model '{name}' not found")
            return
        digest = model_digest(model)
        self.respond_json(200, {
            "license": LICENSE,
            "modelfile": (
                '# Modelfile generated by "ollama show"\n'
                "# To build a new Modelfile based on this, replace FROM with:\n"
                f"# FROM {model}\n\n"
                f"FROM /root/.ollama/models/blobs/sha256-{digest}\n"
                f'TEMPLATE """{TEMPLATE}"""\n'
                + "".join(f"PARAMETER {line}\n" for line in PARAMETERS.splitlines())
                + f'LICENSE """{LICENSE}"""\n'
            ),
            "parameters": PARAMETERS,
            "template": TEMPLATE,
            "details": model_details(model),
            "model_info": MODEL_INFO,
            "tensors": [],
            "capabilities": ["embedding"] if "embed" in model else ["completion", "tools"],
            "modified_at": self.server.state.modified_at,
        })

    def pull(self) -> None:
        request = self.read_json()
        if request is None:
            return
        name = request.get("model") or request.get("name")
        if not name or not isinstance(name, str):
            self.error(400, "model is required")
            return
        if request.get("stream") is False:
            self.server.state.add_model(name)
            self.respond_json(200, {"status": "success"})
            return
        steps = max(1, self.server.state.options.chunks) + 5  # the lines _pull_progress yields
        pace = self.server.state.options.pull_seconds / steps or None  # None: X-Fake-Interval
        stream = self.start_stream("application/x-ndjson", interval=pace)
        for status in self._pull_progress(normalise_model(name)):
            if status["status"] == "success":
                self.server.state.add_model(name)
            stream.line(lambda status=status: status)
        stream.end()

    def _pull_progress(self, name: str) -> Iterator[dict]:
        digest, total = model_digest(name), model_size(name)
        steps = max(1, self.server.state.options.chunks)
        yield {"status": "pulling manifest"}
        for step in range(steps + 1):
            yield {
                "status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
                "total": total, "completed": total * step // steps,
            }
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}

    def copy(self) -> None:
        request = self.read_json()
        if request is None:
            return
        source, destination = request.get("source"), request.get("destination")
        if not source or not destination:
            self.error(400, "source and destination are required")
        elif not self.server.state.find_model(str(source)):
            self.error(404, f"model '{source}' not found")
        else:
            self.server.state.add_model(str(destination))
            self.respond_empty(200)

    def delete(self) -> None:
        request = self.read_json()
        if request is None:
            return
        name = request.get("model") or request.get("name") or ""
        if name and self.server.state.remove_model(str(name)):
            self.respond_empty(200)
        else:
            self.error(404, f"model '{name}' not found")

    def _blob_digest(self) -> str | None:
        digest = self.route_path[len("/api/blobs/"):]
        if re.fullmatch(r"sha256[:-][0-9a-f]{64}", digest):
            return "sha256:" + digest[7:]
        self.error(400, "invalid digest format")
        return None

    def blob_exists(self) -> None:
        digest = self._blob_digest()
        if digest:
            self.respond_empty(200 if digest in self.server.state.blobs else 404)

    def blob_upload(self) -> None:
        """Hash the upload as it arrives: multi-GB bodies never sit in memory."""
        digest = self._blob_digest()
        if not digest:
            return
        for _ in self.body:
            pass
        if "sha256:" + self.body.sha256.hexdigest() != digest:
            self.error(400, "digest mismatch")
            return
        with self.server.state.lock:
            self.server.state.blobs.add(digest)
        self.respond_empty(201)

    # -- OpenAI-compatible API ------------------------------------------------------------

    def _openai_model_entry(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "library"}

    def openai_models(self) -> None:
        models = self.server.state.listed_models()
        self.respond_json(200, {
            "object": "list", "data": [self._openai_model_entry(name) for name in models],
        })

    def openai_model(self) -> None:
        name = self.route_path[len("/v1/models/"):]
        model = self.server.state.find_model(name)
        if model is None:
            self.error(404, f"model '{name}' not found")
        else:
            self.respond_json(200, self._openai_model_entry(model))

    def openai_chat(self) -> None:
        found = self.read_model_request()
        if found is None:
            return
        request, model = found
        self.server.state.touch(model, None)
        limit = request.get("max_completion_tokens", request.get("max_tokens"))
        pieces = tokens(self.token_count(limit))
        prompt_count = count_words(request.get("messages"))
        usage = {"prompt_tokens": prompt_count, "completion_tokens": len(pieces),
                 "total_tokens": prompt_count + len(pieces)}
        head = {"id": f"chatcmpl-{next(self.server.state.ids)}", "created": int(time.time()),
                "model": request.get("model"), "system_fingerprint": "fp_ollama"}
        if not request.get("stream"):
            message = {"role": "assistant", "content": "".join(pieces)}
            self.respond_json(200, {
                **head, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            })
            return
        self._openai_chat_stream(head, pieces, usage, request.get("stream_options") or {})

    def _openai_chat_stream(self, head: dict, pieces: list[str], usage: dict,
                            stream_options: dict) -> None:
        head = {**head, "object": "chat.completion.chunk"}

        def chunk(content: str, finish: str | None) -> dict:
            delta = {"role": "assistant", "content": content}
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        stream = self.start_stream("text/event-stream")
        for piece in pieces:
            stream.event(chunk(piece, None))
        stream.event(chunk("", "stop"))
        if stream_options.get("include_usage"):
            stream.event({**head, "choices": [], "usage": usage})
        stream.event(b"[DONE]")
        stream.end()

    def openai_embeddings(self) -> None:
        found = self.read_model_request()
        if found is None:
            return
        request, model = found
        texts = self._openai_inputs(request.get("input"))
        if not texts:
            self.error(400, "invalid input")
            return
        dimensions = embedding_dimensions(request)
        as_base64 = request.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector: Any = embedding_for(text, dimensions)
            if as_base64:
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": vector, "index": index})
        count = sum(count_words(text) for text in texts)
        self.respond_json(200, {
            "object": "list", "data": data, "model": request.get("model"),
            "usage": {"prompt_tokens": count, "total_tokens": count},
        })

    @staticmethod
    def _openai_inputs(given: Any) -> list[str]:
        """OpenAI's input: a string, strings, a token list or token lists."""
        if isinstance(given, str):
            return [given]
        if not isinstance(given, list) or not given:
            return []
        if all(isinstance(item, int) for item in given):
            return [json.dumps(given)]
        return [item if isinstance(item, str) else json.dumps(item) for item in given]

    # -- test hooks -----------------------------------------------------------------------

    def echo(self) -> None:
        head = bytearray()
        for data in self.body:
            if len(head) < 1024:
                head += data[: 1024 - len(head)]
        self.respond_json(200, {
            "method": self.command,
            "path": urlsplit(self.path).path,
            "query": self.query,
            "headers": dict(self.headers.items()),
            "header_lines": [list(item) for item in self.headers.items()],  # repeats included
            "body_length": self.body.length,
            "body_sha256": self.body.sha256.hexdigest(),
            "body_head": bytes(head).decode("latin-1"),
        })

    def download(self) -> None:
        """N bytes of a fixed pattern in 64 KiB chunks, unpaced unless X-Fake-Interval says."""
        try:
            size = int(parse_qs(self.query).get("size", ["0"])[0])
            if size < 0:
                raise ValueError
        except ValueError:
            self.error(400, "size must be a non-negative integer")
            return
        interval = self._header_number("X-Fake-Interval", float) or 0.0
        stream = self.start_stream("application/octet-stream", interval=interval)
        while size > 0:
            piece = DOWNLOAD_PATTERN[: min(size, DOWNLOAD_CHUNK)]
            stream.write(piece)
            size -= len(piece)
        stream.end()

    def stats(self) -> None:
        self.respond_json(200, self.server.state.stats())


# ---------------------------------------------------------------------------------------------
# The server


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: State,
                 ssl_context: ssl.SSLContext | None = None):
        self.state = state
        self.ssl_context = ssl_context
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        if self.ssl_context is not None:  # the handshake happens in the handler's thread
            sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        self.state.add_connections(1)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self.connections_lock:
            known = request in self.connections
            self.connections.discard(request)
        if known:
            self.state.add_connections(-1)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, (OSError, ValueError)):  # disconnects are routine
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Cut every open connection (idle keep-alive ones too), so no client hangs on us."""
        with self.connections_lock:
            open_sockets = list(self.connections)
        for sock in open_sockets:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # not SSLSocket's: no TLS I/O
            except OSError:
                pass

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}"


def make_ssl_context(options: Options) -> ssl.SSLContext | None:
    if not options.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(options.tls_cert, options.tls_key or None)
    return context


def bind(options: Options, state: State) -> Server:
    """Listen now (the starts file and the tags delay count from here)."""
    server = Server((options.host, options.port), state, make_ssl_context(options))
    state.listening()
    return server


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class FakeOllama:
    """A fake Ollama serving in a background thread of this process."""

    def __init__(self, options: Options):
        self.options = options
        self.stop_event = threading.Event()
        self.state = State(options, self.stop_event)
        self.server: Server | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.host = options.host
        self.port = options.port

    def start(self) -> FakeOllama:
        if self.options.startup_delay > 0:
            if self.port == 0:  # the port must be known before the delayed bind
                self.port = free_port(self.host)
                self.options.port = self.port
        else:
            self.server = bind(self.options, self.state)
            self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self._serve, name="fake-ollama", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        if self.server is None:
            if self.stop_event.wait(self.options.startup_delay):
                return
            with self._lock:
                if self.stop_event.is_set():
                    return
                self.server = bind(self.options, self.state)
        self.server.serve_forever(poll_interval=0.1)

    @property
    def url(self) -> str:
        scheme = "https" if self.options.tls_cert else "http"
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}"

    def stats(self) -> dict:
        return self.state.stats()

    def close(self) -> None:
        """Stop listening, cut open connections and streams, wait for the serving thread."""
        with self._lock:
            already = self.stop_event.is_set()
            self.stop_event.set()
            server = self.server
        if already:
            return
        if server is not None:
            server.shutdown()
            server.server_close()
            server.close_connections()
        if self._thread is not None:
            self._thread.join(5)
        self.state.close()

    def __enter__(self) -> FakeOllama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_in_thread(**options: Any) -> FakeOllama:
    """Start a fake Ollama in this process; by default on 127.0.0.1 and a free port.

    Takes the `Options` field names (models, chunk_interval, chunks, token, startup_delay,
    tags_delay, starts_file, request_log, tls_cert, tls_key, host, port) and `listen`.
    """
    if "listen" in options:
        options["host"], options["port"] = parse_listen(options.pop("listen"))
    options.setdefault("port", 0)
    known = {field.name for field in fields(Options)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown fake_ollama options: {', '.join(sorted(unknown))}")
    return FakeOllama(Options(**options)).start()


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m tests.doubles.fake_ollama", description="An Ollama-compatible test server."
    )
    parser.add_argument("--listen", help="HOST:PORT (default: $OLLAMA_HOST, else 127.0.0.1:11434)")
    parser.add_argument("--models", default="llama3.2", help="comma-separated model names")
    parser.add_argument("--chunk-interval", type=float, default=0.02, help="seconds per chunk")
    parser.add_argument("--chunks", type=int, default=8, help="tokens per streamed answer")
    parser.add_argument("--token", default=os.environ.get("FAKE_OLLAMA_TOKEN") or None,
                        help="require `Authorization: Bearer TOKEN` ($FAKE_OLLAMA_TOKEN)")
    parser.add_argument("--startup-delay", type=float, default=0.0, help="sleep before listening")
    parser.add_argument("--tags-delay", type=float, default=0.0,
                        help="list no models for this long after listening")
    parser.add_argument("--starts-file", help="append `<pid> <time>` here on each start")
    parser.add_argument("--request-log", help="append one JSON line per request here")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument("--pull-seconds", type=float, default=0.0,
                        help="spread a streamed pull's progress over this many seconds")
    parser.add_argument("--num-parallel", type=int,
                        default=int(os.environ.get("OLLAMA_NUM_PARALLEL") or 0),
                        help="answers generated at once, the rest queued ($OLLAMA_NUM_PARALLEL)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    host, port = parse_listen(args.listen or os.environ.get("OLLAMA_HOST"))
    return Options(
        host=host, port=port, models=args.models, chunk_interval=args.chunk_interval,
        chunks=args.chunks, token=args.token, startup_delay=args.startup_delay,
        tags_delay=args.tags_delay, starts_file=args.starts_file, request_log=args.request_log,
        tls_cert=args.tls_cert, tls_key=args.tls_key, pull_seconds=args.pull_seconds,
        num_parallel=args.num_parallel, verbose=args.verbose,
    )


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then close the socket and exit 0."""
    options = parse_args(argv)
    stop = threading.Event()
    holder: list[Server] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        if holder:  # shutdown() waits for serve_forever, which runs in this (main) thread
            threading.Thread(target=holder[0].shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if options.startup_delay > 0 and stop.wait(options.startup_delay):
        return 0
    state = State(options, stop)
    server = bind(options, state)
    holder.append(server)
    print(f"fake-ollama {VERSION}: listening on {server.url} (pid {os.getpid()}), models: "
          f"{', '.join(state.models) or 'none'}", file=sys.stderr, flush=True)
    if not stop.is_set():
        server.serve_forever(poll_interval=0.1)
    server.server_close()
    server.close_connections()
    state.close()
    print("fake-ollama: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
