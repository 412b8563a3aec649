"""Tests of callcp's asyncio link (``callcp._aiolink.Link``) fed by hand with
a fake transport: bounded buffering and flow control.  They reach below the
public API on purpose (the behaviour they guard: a peer cannot make the
server buffer without bound; tests/test_hostile_load.py shows it over real
sockets)."""

from __future__ import annotations

import asyncio
from typing import Any, List

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from callcp import ServerOptions
from callcp._aiolink import PAUSE_READING_AT, WAITING_BUFFER, Link
from callcp._core.protocol import ClientProtocol
from callcp._engine import Engine, HandshakeTicket, ServerCore
from callcp.aio import Connection
from tests.helpers import Pair, accept_any, feed

pytestmark = pytest.mark.timeout(60)


class FakeTransport(asyncio.Transport):
    """Just enough of an asyncio.Transport to watch a Link's flow control."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.written: List[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name in ("peername", "sockname") else default


def test_a_flood_of_small_messages_pauses_reading_until_the_reader_needs_more(
    server_key: rsa.RSAPrivateKey,
) -> None:
    """Messages nobody reads wait as raw bytes in one buffer: past
    PAUSE_READING_AT the socket stops being read; reading resumes only when
    the reader has used them up and waits for more."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pair = Pair(server_key)
        pair.handshake()
        link = Link(loop, Engine(pair.server))
        link.connection_made(FakeTransport())
        conn = Connection(link, timeout=5)
        count = PAUSE_READING_AT // 21 + 10  # an empty message is a 21-byte record
        for _ in range(count):
            pair.client.send(b"")
        link.data_received(pair.client.data_to_send())
        assert link.transport.paused
        assert pair.server.buffered > PAUSE_READING_AT
        for _ in range(count):
            assert await conn.recv() == b""
            assert link.transport.paused  # still enough buffered: no read needed
        waiting = asyncio.ensure_future(conn.recv())
        await asyncio.sleep(0)
        assert not link.transport.paused  # the reader needs bytes: read again
        pair.client.send(b"next")
        link.data_received(pair.client.data_to_send())
        assert await waiting == b"next"

    asyncio.run(main())


def test_a_hello_waiting_for_a_key_exchange_slot_buffers_little(
    server_key: rsa.RSAPrivateKey,
) -> None:
    """While its ClientHello waits for a slot, a connection may send its
    Finished and first request, and little more: past WAITING_BUFFER the
    socket stops being read."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        core = ServerCore(ServerOptions(key=server_key, max_handshakes=1))
        busy = HandshakeTicket("other", lambda: None, lambda: True)
        assert core.handshakes.submit(busy) is None  # the only slot is taken
        links: set = set()
        started: List[Link] = []
        link = Link(loop, None, core, links, started.append)
        link.connection_made(FakeTransport())
        client = ClientProtocol(accept_any)
        feed(client, b"".join(link.transport.written))
        client.send(b"x")
        link.data_received(client.data_to_send())
        assert link.arrival is not None and link.arrival.state == "waiting"
        assert not link.transport.paused
        fed = 0
        while not link.transport.paused and fed < 10 * WAITING_BUFFER:
            link.data_received(b"\0" * 4096)
            fed += 4096
        assert link.transport.paused
        assert fed <= WAITING_BUFFER + 4096
        core.handshakes.done(busy)
        assert started == [link]  # its turn came

    asyncio.run(main())
