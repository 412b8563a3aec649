"""Tests of callcp.aio's private internals (the _Link asyncio.Protocol and
the _Decryptions queue): bounded buffering and flow control, checked on a
link fed by hand with a fake transport.  They reach below the public API on
purpose; when the adapters become one engine, port them to its buffering
(the behaviour they guard: a peer cannot make the server buffer without
bound -- tests/test_connection.py covers what the public API shows)."""

from __future__ import annotations

import asyncio
from typing import Any, List

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from callcp._core.protocol import ClientProtocol, ServerProtocol
from callcp.aio import MAX_UNPARSED, PAUSE_READING_AT, _Decryptions, _Link
from tests.helpers import Pair, accept_any, feed

pytestmark = pytest.mark.timeout(60)


class FakeTransport(asyncio.Transport):
    """Just enough of an asyncio.Transport to watch a _Link's flow control."""

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
        return ("127.0.0.1", 1)


def _open_link(server_key: rsa.RSAPrivateKey, loop: asyncio.AbstractEventLoop) -> tuple:
    """A server _Link with its handshake done, and the client core facing it."""
    pair = Pair(server_key)
    link = _Link(pair.server, loop)
    link.transport = FakeTransport()  # type: ignore[assignment]
    pair.to_client()
    link.data_received(pair.client.data_to_send())
    assert link.handshake.done()
    return link, pair.client


def test_link_pauses_on_a_flood_of_empty_messages(server_key: rsa.RSAPrivateKey) -> None:
    """Queued events cost more than their payload: empty messages that the
    application does not read pause the socket too."""
    loop = asyncio.new_event_loop()
    try:
        link, client = _open_link(server_key, loop)
        for _ in range(PAUSE_READING_AT // 128 + 10):
            client.send(b"")
        link.data_received(client.data_to_send())
        assert link.transport.paused  # type: ignore[union-attr]
        while link.events:
            link.take()
        assert not link.transport.paused  # type: ignore[union-attr]
    finally:
        loop.close()


def test_link_accounting_survives_a_pushed_back_event(server_key: rsa.RSAPrivateKey) -> None:
    loop = asyncio.new_event_loop()
    try:
        link, client = _open_link(server_key, loop)
        client.send(b"m" * 1000)
        link.data_received(client.data_to_send())
        before = link.buffered
        event = link.take()
        link.untake(event)  # as recv_stream() does when a message is pending
        assert link.buffered == before
    finally:
        loop.close()


def test_link_stops_reading_while_its_client_hello_waits(server_key: rsa.RSAPrivateKey) -> None:
    """A connection whose premaster decryption is queued cannot make the
    server buffer whatever it sends meanwhile."""
    loop = asyncio.new_event_loop()
    try:
        server = ServerProtocol(server_key, defer_decryption=True)
        queue = _Decryptions(limit=1)
        queue.running = 1  # every slot busy: this link's decryption waits
        link = _Link(server, loop, queue)
        link.connection_made(FakeTransport())  # type: ignore[arg-type]
        client = ClientProtocol(accept_any)
        feed(client, b"".join(link.transport.written))  # type: ignore[union-attr]
        client.send(b"x")
        link.data_received(client.data_to_send())
        assert link._decrypting and queue.waiting
        fed = 0
        while not link.transport.paused and fed < 10 * MAX_UNPARSED:  # type: ignore[union-attr]
            link.data_received(b"\0" * (64 * 1024))
            fed += 64 * 1024
        # reading stops as soon as the unparsed bytes pass the cap
        assert link.transport.paused  # type: ignore[union-attr]
        assert fed <= MAX_UNPARSED + 64 * 1024
    finally:
        loop.close()
