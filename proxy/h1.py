"""A small HTTP/1.1 client for the forwarding hot path: kept-alive connections to one upstream.

urllib3 stands on http.client, which parses every answer's headers with the email package
and validates each request header with a regular expression: at one client that was most of
what the proxy added to a request (bench/RESULTS.md). Forwarding needs far less: write one
request head, read one answer head, then the body as it comes (Content-Length, chunked, or
until close). The probes and the cloud calls keep using requests.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator

MAX_HEAD = 64 * 1024  # an answer head past this is not an Ollama's
_CRLF = b"\r\n"
_END = b"\r\n\r\n"
_BODILESS = frozenset({204, 304})
# What a chunked body expects next when it is not in the middle of a chunk's data.
_CHUNK_SIZE, _AFTER_CHUNK, _TRAILERS = 0, -1, -2


def readable(sock: socket.socket, seconds: float) -> bool:
    """Whether `sock` has bytes (or its peer's close) within `seconds`; poll(), not select():
    a worker may hold more than 1024 descriptors."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


def hung_up(sock: socket.socket) -> bool | None:
    """Whether the client at `sock` has hung up (closed or reset: True), has sent more (a
    pipelined request: False), or neither yet (None). Only peeks: nothing is consumed."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return True
    return not data


class ClientGone(Exception):
    """The client hung up while the upstream had not answered yet: the request is dropped."""


class ConnectFailed(OSError):
    """No connection could be made (refused, unknown host, TLS failed); nothing was sent."""


class ConnectTimeout(ConnectFailed):
    """The connection was not made within the connect timeout."""


class ReadTimeout(OSError):
    """The upstream stopped answering for longer than the read timeout."""


class ProtocolError(OSError):
    """The upstream's bytes are not an HTTP/1.1 answer, or it closed mid-answer."""


class NoAnswer(ProtocolError):
    """The connection broke before a byte of the answer came: a kept one the upstream closed."""


class Response:
    """An answer's head, and its body read on demand from the connection it came on."""

    def __init__(self, conn: Connection, status: int, reason: str,
                 headers: list[tuple[str, str]], method: str):
        self.status = status
        self.reason = reason
        self.headers = headers
        self._conn = conn
        self._reusable = conn.keep_alive
        self.length: int | None = None  # bytes of body left (Content-Length framing)
        self.chunked = False
        self._chunk_left = _CHUNK_SIZE  # chunked: bytes left of this chunk, or what comes next
        self._eof = False  # read-until-close framing: the upstream has closed
        self._error: OSError | None = None  # a break read_ready() reports on its next call
        self.finished = False
        coding = self.header("transfer-encoding")
        if method == "HEAD" or status in _BODILESS or status < 200:
            self.finished = True
        elif coding is not None:
            self.chunked = coding.rsplit(",", 1)[-1].strip().lower() == "chunked"
            if not self.chunked:
                self._reusable = False  # ends at close (RFC 9112 6.3)
        elif (length := self.header("content-length")) is not None:
            try:
                self.length = int(length)
            except ValueError:
                raise ProtocolError("invalid Content-Length in the answer") from None
            self.finished = self.length == 0
        else:
            self._reusable = False  # read until the upstream closes

    @property
    def sock(self) -> socket.socket:
        return self._conn.sock

    @property
    def read_timeout(self) -> float:
        return self._conn.pool.read_timeout

    def header(self, name: str) -> str | None:
        """The first value of header `name` (lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def read(self, size: int) -> Iterator[bytes]:
        """The body, decoded from its framing, in pieces of at most `size` as they arrive."""
        while (piece := self._next_piece(size)) != b"":
            if piece is None:
                self._received(self._conn.fill())
            else:
                yield piece

    def read_ready(self, size: int, most: int) -> list[bytes]:
        """What has arrived of the body, decoded, without waiting (the socket non-blocking):
        up to about `most` bytes in pieces of at most `size`; `finished` tells the end."""
        if self._error is not None:
            raise self._error
        pieces: list[bytes] = []
        taken = 0
        try:
            while taken < most and (piece := self._next_piece(size)) != b"":
                if piece is None:
                    got = self._conn.fill_nowait()
                    if got is None:
                        break  # nothing more now
                    self._received(got)
                else:
                    pieces.append(piece)
                    taken += len(piece)
        except OSError as exc:
            if not pieces:
                raise
            self._error = exc  # what came before the break is forwarded first
        return pieces

    @property
    def buffered(self) -> bool:
        """Bytes of the body are received and not read yet (no socket event will tell)."""
        sock = self._conn.sock
        return bool(self._conn._buf) or (isinstance(sock, ssl.SSLSocket) and sock.pending() > 0)

    def _received(self, got: bool) -> None:
        if not got:  # the upstream closed
            if self.chunked or self.length is not None:
                raise ProtocolError("the upstream closed before the end of the answer")
            self._eof = True

    def _next_piece(self, size: int) -> bytes | None:
        """The next piece of the body from what is received: None when more must come first,
        b"" at the end of the body."""
        if self.finished:
            return b""
        conn = self._conn
        if self.chunked:
            return self._next_chunk_piece(size)
        if self.length is not None:
            if not conn._buf:
                return None
            piece = conn.take(min(size, self.length))
            self.length -= len(piece)
            self.finished = self.length == 0
            return piece
        if conn._buf:
            return conn.take(size)
        if self._eof:
            self.finished = True
            return b""
        return None

    def _next_chunk_piece(self, size: int) -> bytes | None:
        conn = self._conn
        while True:
            if self._chunk_left > 0:
                if not conn._buf:
                    return None
                piece = conn.take(min(size, self._chunk_left))
                self._chunk_left -= len(piece)
                if not self._chunk_left:
                    self._chunk_left = _AFTER_CHUNK
                return piece
            line = conn.take_line()
            if line is None:
                return None
            if self._chunk_left == _AFTER_CHUNK:
                if line:
                    raise ProtocolError("a chunk is not followed by CRLF")
                self._chunk_left = _CHUNK_SIZE
            elif self._chunk_left == _TRAILERS:
                if not line:  # the empty line after the trailers ends the body
                    self.finished = True
                    return b""
            else:
                try:
                    left = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ProtocolError("invalid chunk size in the answer") from None
                self._chunk_left = left or _TRAILERS

    def release(self) -> None:
        """Done with the answer: its connection is kept if the body was read to its end."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.finished and self._reusable:
            if conn.sock.gettimeout() != conn.pool.read_timeout:  # a relay made it non-blocking
                conn.sock.settimeout(conn.pool.read_timeout)
            conn.pool.put(conn)
        else:
            conn.close()  # cut short: dropping the connection stops the upstream too


class Connection:
    """One socket to the upstream, with what was received and not yet read."""

    def __init__(self, pool: Pool, sock: socket.socket):
        self.pool = pool
        self.sock = sock
        self._buf = b""
        self.keep_alive = True
        self.used = False  # it has carried an answer: the upstream may have closed it since

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise ReadTimeout("the upstream did not take the request in time") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise NoAnswer(str(exc)) from None

    def take(self, size: int) -> bytes:
        """Up to `size` of the received bytes (there are some)."""
        if len(self._buf) <= size:
            block, self._buf = self._buf, b""
        else:
            block, self._buf = self._buf[:size], self._buf[size:]
        return block

    def take_line(self) -> bytes | None:
        """One received line without its CRLF; None while it is not all here."""
        end = self._buf.find(_CRLF)
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise ProtocolError("a line of the answer is too long")
            return None
        line, self._buf = self._buf[:end], self._buf[end + 2 :]
        return line

    def fill(self) -> bool:
        """Receive more, waiting up to the read timeout; False when the upstream closed."""
        data = self._recv(65536)
        self._buf += data
        return bool(data)

    def fill_nowait(self) -> bool | None:
        """Receive what has arrived (the socket is non-blocking): None when nothing has,
        False when the upstream closed."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        self._buf += data
        return bool(data)

    def read_head(self, client: socket.socket | None = None) -> bytes:
        """The next answer head (status line and headers, without the blank line); ClientGone
        if the `client` socket, watched meanwhile, hangs up first."""
        while (end := self._buf.find(_END)) < 0:
            if len(self._buf) > MAX_HEAD:
                raise ProtocolError("the answer's head is too long")
            if client is not None:
                client = self._await(client)
            try:
                data = self._recv(65536)
            except ConnectionResetError as exc:
                raise (ProtocolError if self._buf else NoAnswer)(str(exc)) from None
            if not data:
                if self._buf:
                    raise ProtocolError("the upstream closed in the middle of the answer's head")
                raise NoAnswer("the upstream closed without answering")
            self._buf += data
        if end > MAX_HEAD:
            raise ProtocolError("the answer's head is too long")
        head, self._buf = self._buf[:end], self._buf[end + 4 :]
        return head

    def _await(self, client: socket.socket) -> socket.socket | None:
        """Wait up to the read timeout for the upstream's bytes, watching the client: a model
        loading or a whole answer generated (stream: false) can take minutes, and Ollama stops
        that work once its connection closes. Returns the client while it is still watched
        (None after it sent a pipelined request, which is left for after the answer)."""
        if getattr(self.sock, "pending", None) and self.sock.pending():
            return client  # TLS bytes already decrypted
        timeout = self.sock.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(client, select.POLLIN)
        upstream = self.sock.fileno()
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
            events = poller.poll(left)
            if not events:
                raise ReadTimeout("the upstream did not answer in time")
            if any(fd == upstream for fd, _ in events):
                return client
            gone = hung_up(client)
            if gone:
                raise ClientGone("the client hung up before the upstream answered")
            if gone is False:
                poller.unregister(client)
                client = None

    def _recv(self, size: int) -> bytes:
        try:
            return self.sock.recv(size)
        except TimeoutError:
            raise ReadTimeout("the upstream did not answer in time") from None

    def dropped(self) -> bool:
        """A kept connection the upstream has closed (or sent something unasked on)."""
        return readable(self.sock, 0)

    def close(self) -> None:
        self.keep_alive = False
        try:
            self.sock.close()
        except OSError:
            pass


def parse_head(head: bytes) -> tuple[int, str, list[tuple[str, str]], bool]:
    """(status, reason, headers, keep-alive) of an answer head."""
    lines = head.split(_CRLF)
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProtocolError("the upstream's answer is not HTTP/1.x")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise ProtocolError("a header line of the answer is malformed")
        headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    connection = ",".join(v for k, v in headers if k.lower() == "connection").lower()
    keep_alive = "close" not in connection and (
        version == b"HTTP/1.1" or "keep-alive" in connection
    )
    return int(code), reason.decode("latin-1"), headers, keep_alive


def request_head(method: str, target: str, host: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The request line and headers; a CR or LF in any of them is refused (header injection)."""
    parts = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers:
        parts.append(f"{name}: {value}\r\n")
    text = "".join(parts)
    if text.count("\n") != len(parts) + 1 or text.count("\r") != len(parts) + 1:
        raise ValueError("a request header or the target holds a CR or LF")
    return text.encode("latin-1") + _CRLF


class Pool:
    """Kept-alive connections to one host (plain, or TLS checked against `tls`)."""

    def __init__(self, host: str, port: int, maxsize: int, connect_timeout: float,
                 read_timeout: float, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None):
        self.host, self.port = host, port
        name = f"[{host}]" if ":" in host else host
        # As http.client writes it: the port only when it is not the scheme's own.
        self.host_header = name if port == (443 if tls else 80) else f"{name}:{port}"
        self.maxsize = maxsize
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tls = tls
        self.server_hostname = server_hostname or host
        self._idle: list[Connection] = []
        self._lock = threading.Lock()

    def request(self, method: str, target: str, headers: list[tuple[str, str]],
                body: bytes | Iterator[bytes] | None = None, chunked: bool = False,
                client: socket.socket | None = None) -> Response:
        """Send one request and read its answer's head, watching the `client` socket (when
        given) for a hang-up meanwhile.

        A bytes body is sent with the head in one write, and the request is sent once more
        on a new connection if a kept one turns out closed before any answer; a body of
        blocks (read from the client) cannot be sent twice.
        """
        if chunked:
            headers = [*headers, ("Transfer-Encoding", "chunked")]
        head = request_head(method, target, self.host_header, headers)
        while True:
            conn = self._take()
            try:
                return self._exchange(conn, method, head, body, chunked, client)
            except NoAnswer:
                conn.close()
                if not conn.used or not (body is None or isinstance(body, bytes)):
                    raise
            except BaseException:
                conn.close()
                raise

    def _exchange(self, conn: Connection, method: str, head: bytes, body, chunked: bool,
                  client: socket.socket | None):
        if body is None or isinstance(body, bytes):
            conn.send(head + body if body else head)
        elif chunked:
            conn.send(head)
            for block in body:
                if block:
                    conn.send(b"%x\r\n%b\r\n" % (len(block), block))
            conn.send(b"0\r\n\r\n")
        else:
            conn.send(head)
            for block in body:
                conn.send(block)
        while True:
            status, reason, headers, keep_alive = parse_head(conn.read_head(client))
            if status >= 200 or status == 101:
                break  # 1xx interim answers (100 Continue, 103) are not forwarded
        conn.used = True
        conn.keep_alive = keep_alive
        return Response(conn, status, reason, headers, method)

    def _take(self) -> Connection:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return Connection(self, self._connect())
            if not conn.dropped():
                return conn
            conn.close()

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(str(exc)) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_hostname)
            sock.settimeout(self.read_timeout)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise ConnectFailed(f"certificate verify failed ({exc.verify_message})") from None
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout("the TLS handshake timed out") from None
            raise ConnectFailed(str(exc)) from None
        return sock

    def put(self, conn: Connection) -> None:
        with self._lock:
            if len(self._idle) < self.maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
