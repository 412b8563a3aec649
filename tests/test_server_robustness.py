"""Bad input to a listening blocking server, over real loopback sockets.

Every case must end the offending connection with exactly one log line
naming the peer, cost bounded memory (the server closes rather than buffers),
and never disturb a well-behaved client being served at the same time (the
"bystander", which does request/response in a loop throughout).
"""

from __future__ import annotations

import logging
import random
import socket
import struct
import time
from typing import Any, List

import pytest

import callcp
import callcp._engine
from callcp._core.errors import CloseCode
from callcp._core.protocol import ClientProtocol
from callcp._core.wire import FrameType
from tests.adapters import Adapter, Echo
from tests.helpers import accept_any, split_frames
from tests.sock_support import (
    HANDSHAKE_TIMEOUT,
    SOCK_TIMEOUT,
    Arena,
    read_until_closed,
    records_about,
    recv_frame,
    send_ignoring_close,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)

MEGABYTE = 1 << 20


def _client_flight(server_hello: bytes) -> bytes:
    """A genuine client flight (ClientHello, Finished) answering ``server_hello``."""
    client = ClientProtocol(accept_any)
    client.receive_data(server_hello)
    client.next_event()
    return client.data_to_send()


# ----------------------------------------------------------------- attacks


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_garbage(arena: Arena, seed: int) -> None:
    garbage = random.Random(seed).randbytes(10 * 1024)
    with arena.raw() as sock:
        port = sock.getsockname()[1]
        send_ignoring_close(sock, garbage)
        read_until_closed(sock)
    arena.one_line_about(port, "handshake with", "failed")
    arena.bystander_unharmed()


def test_frame_header_announcing_4_gib_before_handshake(arena: Arena) -> None:
    """A ClientHello header with length 0xFFFFFFFF, then 1 MB of "body": the
    server refuses at the header instead of buffering what follows."""
    with arena.raw() as sock:
        port = sock.getsockname()[1]
        hello = recv_frame(sock)
        assert hello[0] == FrameType.SERVER_HELLO
        send_ignoring_close(sock, struct.pack(">BI", FrameType.CLIENT_HELLO, 0xFFFFFFFF))
        send_ignoring_close(sock, random.Random(4).randbytes(MEGABYTE))
        rest = read_until_closed(sock)
    # the server said why, in a plaintext alert (no keys exist yet)
    if rest:
        frames = split_frames(rest)
        assert frames[-1][0] == FrameType.ALERT
        assert struct.unpack(">H", frames[-1][5:7])[0] == CloseCode.PROTOCOL_ERROR
    arena.one_line_about(port, "handshake with", "4294967295")
    arena.bystander_unharmed()


def test_silent_peer_is_dropped_after_the_handshake_timeout(arena: Arena) -> None:
    with arena.raw() as sock:
        port = sock.getsockname()[1]
        t0 = time.monotonic()
        data = read_until_closed(sock)
        elapsed = time.monotonic() - t0
    assert elapsed > HANDSHAKE_TIMEOUT * 0.8  # dropped by the timeout, not at once
    frames = split_frames(data)
    assert [f[0] for f in frames] == [FrameType.SERVER_HELLO, FrameType.ALERT]
    assert struct.unpack(">H", frames[1][5:7])[0] == CloseCode.TIMEOUT
    arena.one_line_about(port, "handshake with", "timed out")
    arena.bystander_unharmed()


def test_peer_disconnecting_mid_handshake(arena: Arena) -> None:
    with arena.raw() as sock:
        port = sock.getsockname()[1]
        flight = _client_flight(recv_frame(sock))
        client_hello = split_frames(flight)[0]
        assert client_hello[0] == FrameType.CLIENT_HELLO
        sock.sendall(client_hello[: len(client_hello) // 2])
    arena.one_line_about(port, "handshake with", "closed the connection during the handshake")
    arena.bystander_unharmed()


def test_callcp1_client(arena: Arena) -> None:
    """A Callcp 1.0 client reads the "PEM key" with one recv(4096), then sends
    its RSA-encrypted AES key: 256 opaque bytes with no framing."""
    with arena.raw() as sock:
        port = sock.getsockname()[1]
        greeting = sock.recv(4096)
        assert not greeting.startswith(b"-----BEGIN")  # no silent legacy fallback
        send_ignoring_close(sock, random.Random(6).randbytes(256))
        rest = read_until_closed(sock)
    if rest:
        assert split_frames(rest)[-1][0] == FrameType.ALERT
    arena.one_line_about(port, "handshake with", "failed")
    arena.bystander_unharmed()


@pytest.mark.timeout(60)
def test_200_connections_opened_and_closed_at_once(
    arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of failures is logged without flooding: at most BURST lines
    of each kind (connections closed without a byte, at INFO; reset ones,
    failed handshakes), one per connection, then one summary line per kind
    that counts them all."""
    monkeypatch.setattr(callcp._engine.Notices, "WINDOW", 1.0)
    arena.caplog.set_level(logging.INFO, logger="callcp")  # (closed without a byte: INFO)
    ports: List[int] = []
    for i in range(200):
        sock = socket.create_connection(arena.srv.server.server_address, timeout=SOCK_TIMEOUT)
        ports.append(sock.getsockname()[1])
        if i % 2:  # half of them with a reset instead of a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def summary() -> List[str]:
        return [
            r.getMessage()
            for r in arena.caplog.records
            if r.getMessage().startswith(
                ("failed handshakes:", "connections closed without a byte:")
            )
        ]

    def counted() -> int:
        return sum(int(line.split(": ")[1].split()[0]) for line in summary())

    assert wait_until(lambda: counted() == 200, 15.0), summary()
    arena.settle()
    single = [p for p in ports if records_about(arena.caplog.records, p)]
    assert 1 <= len(single) <= 2 * callcp._engine.Notices.BURST
    for port in single:
        lines = records_about(arena.caplog.records, port)
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert lines[0].exc_info is None
    arena.bystander_unharmed()


def test_peer_supplied_reason_cannot_forge_log_lines(arena: Arena) -> None:
    forged = "bye\nCRITICAL callcp: forged line\r\x1b[2K"
    with arena.raw() as sock:
        port = sock.getsockname()[1]
        recv_frame(sock)
        body = struct.pack(">H", CloseCode.UNAUTHORIZED) + forged.encode()
        sock.sendall(struct.pack(">BI", FrameType.ALERT, len(body)) + body)
        read_until_closed(sock)
    line = arena.one_line_about(port, "handshake with")
    assert line.isprintable(), repr(line)


def test_a_bug_reached_by_a_hello_costs_that_peer_only(
    adapter: Adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception (a bug) raised while the server reads one
    peer's hello ends that connection, logged with its traceback, and the
    server goes on accepting (both adapters: the acceptor must not die)."""
    from callcp._core.protocol import ServerProtocol

    real = ServerProtocol._on_client_hello
    armed = [True]

    def buggy(self: ServerProtocol, header: bytes, body: bytes) -> Any:
        if armed:
            armed.clear()
            raise NameError("a bug")
        return real(self, header, body)

    monkeypatch.setattr(ServerProtocol, "_on_client_hello", buggy)
    srv = adapter.serve(Echo(prefix=b"ok:"))
    with pytest.raises(callcp.CallcpError), srv.connect() as conn:
        conn.request(b"first")
    with srv.connect() as conn:
        assert conn.request(b"second") == b"ok:second"
    assert srv.log is not None
    assert srv.log.about("internal error reading the hello of 127.0.0.1:")
