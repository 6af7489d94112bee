"""The worker's uvicorn protocol (proxy/http/server.py), driven in-process over a recording
transport: what it writes to the client, write by write."""

from __future__ import annotations

import asyncio

import falcon.asgi
from uvicorn.config import Config
from uvicorn.server import ServerState

from proxy.http.server import Protocol


class Recording(asyncio.Transport):
    """A client connection that keeps every write."""

    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Small:
    async def on_get(self, req, resp) -> None:
        resp.text = '{"error": "not ready"}'


class Streamed:
    async def on_get(self, req, resp) -> None:
        async def pieces():
            await asyncio.sleep(0.01)  # the first piece comes a turn later, as upstream ones do
            yield b"one\n"
            yield b"two\n"

        resp.stream = pieces()


def exchange(request: bytes) -> list[bytes]:
    """What the protocol writes for `request`, on a loop of its own (asyncio.run would unset
    the thread's loop for good, and the Pulumi mocks of later tests want one)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_exchange(request))
    finally:
        loop.close()


async def _exchange(request: bytes) -> list[bytes]:
    app = falcon.asgi.App()
    app.add_route("/small", Small())
    app.add_route("/streamed", Streamed())
    config = Config(app=app, http=Protocol, lifespan="off")
    config.load()
    protocol = Protocol(config=config, server_state=ServerState(), app_state={})
    transport = Recording()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if protocol.cycle is not None and protocol.cycle.response_complete:
            break
    await asyncio.sleep(0)  # a held head's turn
    protocol.connection_lost(None)
    return transport.writes


def test_a_small_answer_leaves_in_one_write():
    writes = exchange(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(writes) == 1
    head, _, body = writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b'{"error": "not ready"}'


def test_a_streamed_answer_sends_its_head_before_the_first_piece_arrives():
    writes = exchange(b"GET /streamed HTTP/1.1\r\nHost: x\r\n\r\n")
    assert writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(b"\r\n\r\n")
    assert b"".join(writes[1:]) == b"4\r\none\n\r\n4\r\ntwo\n\r\n0\r\n\r\n"
