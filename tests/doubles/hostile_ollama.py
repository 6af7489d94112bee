"""An upstream that breaks HTTP's framing on purpose, for tests/integration/test_framing.py.

Run as `python -m tests.doubles.hostile_ollama` (the `local` provisioner starts it with OLLAMA_HOST,
as it starts `ollama serve`). It answers Ollama's readiness routes as Ollama does (`/api/tags`
lists llama3.2, `/api/version`), `/api/__good/<name>` with its own JSON naming the path, and
`/api/__bad/<case>` with the exact bytes of CASES[case] on a connection it keeps open, so that
a proxy which reused it would hand what follows to the next, unrelated request. The cases are
the ones issue 14 reproduced against the proxy's former HTTP/1.1 client; what each may not do
comes from RFC 9112 (message framing) and RFC 9110 §15.3.5 (204 has no content).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

from tests.doubles.fake_ollama import parse_listen

SMUGGLED_BODY = b'{"smuggled": true}'
SMUGGLED = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (len(SMUGGLED_BODY), SMUGGLED_BODY))
NDJSON = b"Content-Type: application/x-ndjson\r\n"
LINE = b'{"model":"llama3.2","response":"hi","done":false}\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# Each case: the bytes sent at once, then (after a pause) the bytes sent late, or None.
CASES: dict[str, tuple[bytes, bytes | None]] = {
    "204-with-body": (b"HTTP/1.1 204 No Content\r\n\r\n" + SMUGGLED, None),
    "204-with-length": (b"HTTP/1.1 204 No Content\r\nContent-Length: %d\r\n\r\n%b"
                        % (len(SMUGGLED), SMUGGLED), None),
    "204-then-late-bytes": (b"HTTP/1.1 204 No Content\r\n\r\n", SMUGGLED),
    "longer-than-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}" + SMUGGLED, None),
    "bytes-after-last-chunk": (b"HTTP/1.1 200 OK\r\n" + NDJSON + b"Transfer-Encoding: chunked"
                               b"\r\n\r\n" + chunk(LINE) + b"0\r\n\r\n" + SMUGGLED, None),
    "chunk-size-minus-2": (b"HTTP/1.1 200 OK\r\n" + NDJSON + b"Transfer-Encoding: chunked"
                           b"\r\n\r\n" + chunk(LINE), b"-2\r\nhi\r\n0\r\n\r\n"),
    "unasked-101": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade"
                    b"\r\n\r\n" + SMUGGLED, None),
    "two-content-lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: %d\r\n\r\n"
                            b"{}%b" % (2 + len(SMUGGLED), SMUGGLED), None),
    "chunked-and-length": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3"
                           b"\r\n\r\n" + chunk(b"abc") + b"0\r\n\r\n", None),
    "length-1_0": (b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n0123456789", None),
    "length-minus-1": (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n0123456789", None),
    "truncated-body": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"cut\": ", b""),  # b"": then close
    "control-byte-in-header": (b"HTTP/1.1 200 OK\r\nX-Note: a\x01b\r\nContent-Length: 2\r\n\r\n{}",
                               None),
    "connection-listed-header": (b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: secret\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                                 None),
    # Well-framed, though unusual: each must be forwarded as it is.
    "until-close": (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
                    b'{"until": "close"}', b""),
    "interim-100": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", None),
}
LATE = 0.05  # seconds before the late bytes


def answer(path: str) -> bytes:
    if path == "/api/tags":
        body = json.dumps({"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}]})
    elif path == "/api/version":
        body = json.dumps({"version": "0.0.0-hostile"})
    else:
        body = json.dumps({"path": path})
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body.encode()))


def serve_connection(conn: socket.socket) -> None:
    buf = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                           if line.lower().startswith("content-length:")), 0)
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            buf = buf[length:]
            path = lines[0].split(" ")[1]
            case = path.removeprefix("/api/__bad/")
            if case in CASES:
                now, late = CASES[case]
                conn.sendall(now)
                if late is not None:
                    time.sleep(LATE)
                    if not late:
                        return  # the connection closes mid-body
                    conn.sendall(late)
            else:
                conn.sendall(answer(path))


def main() -> int:
    host, port = parse_listen(os.environ.get("OLLAMA_HOST"))
    listener = socket.create_server((host, port), reuse_port=False)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
