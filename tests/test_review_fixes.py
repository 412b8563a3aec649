"""Regression tests for the findings of the security review: bounded
buffering in the asyncio adapter, shutdown with a stuck writer, no local
details in alerts, private .part files, silent peers not holding handshake
slots."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, List

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
import callcp.aio
from callcp._core.errors import KeyManagementError
from callcp._core.protocol import ClientProtocol, ServerProtocol
from callcp._core.wire import FrameType, decode_alert
from callcp._streams import Sink
from callcp.aio import MAX_UNPARSED, PAUSE_READING_AT, _Decryptions, _Link
from tests.helpers import Pair, accept_any, feed, split_frames

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


def test_alerts_carry_no_local_details() -> None:
    """An error of our own (here: an unreadable known-hosts file) is reported
    to the peer by its code name only, never with its message."""

    def verify(fingerprint: str, der: bytes) -> None:
        raise KeyManagementError("cannot read known hosts file /home/alice/secret/known_hosts")

    client = ClientProtocol(verify)
    server = ServerProtocol(rsa.generate_private_key(65537, 2048))
    server.start()
    with pytest.raises(KeyManagementError):
        feed(client, server.data_to_send())
    (alert,) = split_frames(client.data_to_send())
    assert alert[0] == FrameType.ALERT
    code, reason = decode_alert(alert[5:])
    assert "alice" not in reason and "/" not in reason
    assert reason == "internal error"


def test_part_file_is_private_and_never_follows_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    dest = tmp_path / "out.bin"
    os.symlink(victim, tmp_path / "out.bin.part")
    with pytest.raises(OSError):
        Sink(dest)
    assert victim.read_bytes() == b"precious"
    os.unlink(tmp_path / "out.bin.part")
    sink = Sink(dest)
    sink.write(b"data")
    assert (os.stat(tmp_path / "out.bin.part").st_mode & 0o777) == 0o600
    sink.commit()
    assert dest.read_bytes() == b"data"


def test_shutdown_is_not_held_up_by_a_stuck_writer(server_key: rsa.RSAPrivateKey) -> None:
    """A handler blocked writing to a peer that never reads must not make
    shutdown(timeout) wait for the idle timeout."""
    started = threading.Event()

    def flood(conn: callcp.Connection) -> None:
        started.set()
        while True:
            conn.send(b"z" * 65536)

    logging.getLogger("callcp").setLevel(logging.CRITICAL)
    server = callcp.serve(flood, "127.0.0.1", 0, key=server_key, idle_timeout=30)
    runner = threading.Thread(target=server.serve_forever, daemon=True)
    runner.start()
    conn = callcp.connect("127.0.0.1", server.port, server_fingerprint=server.fingerprint)
    conn.send(b"go")  # completes the handshake on the server; then we never read
    assert started.wait(10)
    time.sleep(0.3)  # let the socket buffers fill
    t0 = time.monotonic()
    server.shutdown(timeout=1.0)
    assert time.monotonic() - t0 < 5.0
    conn.close()
    logging.getLogger("callcp").setLevel(logging.NOTSET)


def test_silent_connections_do_not_hold_handshake_slots(server_key: rsa.RSAPrivateKey) -> None:
    server = callcp.serve(
        lambda c: [c.send(m) for m in c],
        "127.0.0.1",
        0,
        key=server_key,
        max_handshakes=4,
        handshake_timeout=5,
    )
    runner = threading.Thread(target=server.serve_forever, daemon=True)
    runner.start()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        with callcp.connect(
            "127.0.0.1", server.port, server_fingerprint=server.fingerprint, timeout=10
        ) as conn:
            assert conn.request(b"hi") == b"hi"
        assert time.monotonic() - t0 < 2.0  # not after the silent ones time out
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()


def test_back_to_back_key_updates_are_refused(server_key: rsa.RSAPrivateKey) -> None:
    """A KEY_UPDATE must follow at least one other record under its key, so a
    peer cannot make the receiver derive keys over and over for free."""
    from callcp._core.errors import RemoteProtocolError

    pair = Pair(server_key)
    pair.handshake()
    sender = pair.client._sender
    assert sender is not None
    out: List[bytes] = []
    sender.seal(FrameType.KEY_UPDATE, b"", out)  # fine: FINISHED used this key
    sender.update()
    sender.seal(FrameType.KEY_UPDATE, b"", out)  # nothing under the new key yet
    with pytest.raises(RemoteProtocolError, match="KEY_UPDATE"):
        feed(pair.server, b"".join(out))


def test_a_failing_key_verifier_refuses_the_key(server_key: rsa.RSAPrivateKey) -> None:
    """A verifier that fails with an ordinary exception (a bug, an odd host
    name) refuses the server like a mismatch, instead of escaping the core."""
    from callcp._core.errors import ServerKeyError

    def broken(fingerprint: str, der: bytes) -> None:
        raise ValueError("not a host name")

    client = ClientProtocol(broken)
    server = ServerProtocol(server_key)
    server.start()
    with pytest.raises(ServerKeyError, match="ValueError"):
        feed(client, server.data_to_send())
    (alert,) = split_frames(client.data_to_send())
    assert alert[0] == FrameType.ALERT
