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
import threading
import time
from typing import Iterator, List

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp._engine
import callcp._sockets
import callcp.sync
from callcp._core.errors import CloseCode, ConnectionClosedError
from callcp._core.protocol import ClientProtocol
from callcp._core.wire import FrameType
from tests.helpers import accept_any, split_frames
from tests.sock_support import (
    SOCK_TIMEOUT,
    Bystander,
    RunningServer,
    echo,
    read_until_closed,
    records_about,
    recv_frame,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)

HANDSHAKE_TIMEOUT = 0.5
MEGABYTE = 1 << 20


class Arena:
    """A server, a bystander being served, and the log."""

    def __init__(self, srv: RunningServer, bystander: Bystander, caplog: pytest.LogCaptureFixture):
        self.srv = srv
        self.bystander = bystander
        self.caplog = caplog

    def raw(self) -> socket.socket:
        sock = self.srv.raw()
        sock.settimeout(SOCK_TIMEOUT)
        return sock

    def settle(self) -> None:
        """Wait until only the bystander's connection is left on the server."""
        assert wait_until(lambda: self.srv.server.active_connections == 1, 5.0), (
            f"{self.srv.server.active_connections} connections still open"
        )

    def one_line_about(self, port: int, *expected: str) -> str:
        """The single WARNING-or-worse log line about the peer at ``port``."""
        assert wait_until(lambda: records_about(self.caplog.records, port), 5.0), (
            f"nothing was logged about peer port {port}"
        )
        self.settle()
        lines = records_about(self.caplog.records, port)
        messages = [r.getMessage() for r in lines]
        assert len(lines) == 1, messages
        assert lines[0].levelno == logging.WARNING, messages
        assert lines[0].exc_info is None, "a traceback was logged"
        for text in expected:
            assert text in messages[0], messages[0]
        return messages[0]

    def bystander_unharmed(self) -> None:
        assert self.bystander.wait_for_more(5), self.bystander.errors
        assert self.bystander.errors == []


@pytest.fixture
def arena(server_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture) -> Iterator[Arena]:
    caplog.set_level(logging.WARNING, logger="callcp")
    srv = RunningServer(echo, key=server_key, handshake_timeout=HANDSHAKE_TIMEOUT)
    bystander = Bystander(srv)
    try:
        yield Arena(srv, bystander, caplog)
        # nothing was ever logged about the bystander
        assert records_about(caplog.records, bystander.conn.local_address[1]) == []
        assert bystander.errors == []
    finally:
        bystander.stop()
        srv.stop()


def _send_ignoring_close(sock: socket.socket, data: bytes) -> None:
    """Write what the server accepts; it may well close the connection first."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


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
        _send_ignoring_close(sock, garbage)
        read_until_closed(sock, timeout=2.0)
    arena.one_line_about(port, "handshake with", "failed")
    arena.bystander_unharmed()


def test_frame_header_announcing_4_gib_before_handshake(arena: Arena) -> None:
    """A ClientHello header with length 0xFFFFFFFF, then 1 MB of "body": the
    server refuses at the header instead of buffering what follows."""
    with arena.raw() as sock:
        port = sock.getsockname()[1]
        hello = recv_frame(sock)
        assert hello[0] == FrameType.SERVER_HELLO
        t0 = time.monotonic()
        _send_ignoring_close(sock, struct.pack(">BI", FrameType.CLIENT_HELLO, 0xFFFFFFFF))
        _send_ignoring_close(sock, random.Random(4).randbytes(MEGABYTE))
        rest = read_until_closed(sock, timeout=2.0)
        assert time.monotonic() - t0 < 2.0
    # the server said why, in a plaintext alert (no keys exist yet)
    if rest:
        frames = split_frames(rest)
        assert frames[-1][0] == FrameType.ALERT
        assert struct.unpack(">H", frames[-1][5:7])[0] == CloseCode.PROTOCOL_ERROR
    arena.one_line_about(port, "handshake with", "4294967295")
    arena.bystander_unharmed()


def test_record_header_announcing_4_gib_after_handshake(arena: Arena) -> None:
    conn = arena.srv.connect()
    port = conn.local_address[1]
    assert conn.request(b"hello") == b"hello"
    conn._sock.sendall(struct.pack(">BI", FrameType.DATA, 0xFFFFFFFF))
    with pytest.raises(ConnectionClosedError) as info:
        conn.recv(timeout=5)
    assert info.value.code == CloseCode.PROTOCOL_ERROR
    assert "4294967295" in str(info.value)
    conn.close()
    arena.one_line_about(port, "4294967295")
    arena.bystander_unharmed()


def test_record_header_announcing_4_gib_then_a_megabyte(arena: Arena) -> None:
    """Bounded memory after the handshake: 1 MB of garbage behind a 4 GiB
    DATA header is not buffered; the server closes the connection at once."""
    conn = arena.srv.connect()
    port = conn.local_address[1]
    assert conn.request(b"hello") == b"hello"
    sock = conn._sock
    t0 = time.monotonic()
    _send_ignoring_close(sock, struct.pack(">BI", FrameType.DATA, 0xFFFFFFFF))
    _send_ignoring_close(sock, random.Random(5).randbytes(MEGABYTE))
    read_until_closed(sock, timeout=2.0)
    assert time.monotonic() - t0 < 2.0
    conn.close()
    arena.one_line_about(port, "4294967295")
    arena.bystander_unharmed()


def test_silent_peer_is_dropped_after_the_handshake_timeout(arena: Arena) -> None:
    with arena.raw() as sock:
        port = sock.getsockname()[1]
        t0 = time.monotonic()
        data = read_until_closed(sock, timeout=3.0)
        elapsed = time.monotonic() - t0
    assert HANDSHAKE_TIMEOUT * 0.8 < elapsed < HANDSHAKE_TIMEOUT + 1.0
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
        _send_ignoring_close(sock, random.Random(6).randbytes(256))
        rest = read_until_closed(sock, timeout=2.0)
    if rest:
        assert split_frames(rest)[-1][0] == FrameType.ALERT
    arena.one_line_about(port, "handshake with", "failed")
    arena.bystander_unharmed()


@pytest.mark.timeout(60)
def test_200_connections_opened_and_closed_at_once(
    arena: Arena, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of failures is logged without flooding: at most BURST lines,
    one per connection, then one summary line that counts them all."""
    monkeypatch.setattr(callcp._engine.Notices, "WINDOW", 1.0)
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
            if r.getMessage().startswith("failed handshakes:")
        ]

    assert wait_until(lambda: bool(summary()), 15.0), "no summary line"
    arena.settle()
    counted = sum(int(line.split(": ")[1].split()[0]) for line in summary())
    single = [p for p in ports if records_about(arena.caplog.records, p)]
    assert counted == 200, summary()
    assert 1 <= len(single) <= callcp._engine.Notices.BURST
    for port in single:
        lines = records_about(arena.caplog.records, port)
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert lines[0].exc_info is None
    arena.bystander_unharmed()


def test_no_thread_leaks_after_attacks(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    # Server threads are reused; idle ones retire after IDLE_SECONDS (30 s):
    # shorten that so "back to the threads we had before" is checkable.
    monkeypatch.setattr(callcp._sockets.ThreadPool, "IDLE_SECONDS", 0.5)
    before = set(threading.enumerate())
    # a mix of the attacks above, each handled by a server thread
    for seed in range(5):
        with arena.raw() as sock:
            _send_ignoring_close(sock, random.Random(seed).randbytes(4096))
            read_until_closed(sock)
    silent = [arena.raw() for _ in range(5)]
    for i in range(50):
        sock = arena.raw()
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    for sock in silent:
        read_until_closed(sock, timeout=3.0)
        sock.close()
    conn = arena.srv.connect()
    conn._sock.sendall(struct.pack(">BI", FrameType.DATA_END, 0xFFFFFFFF))
    with pytest.raises(ConnectionClosedError):
        conn.recv(timeout=5)
    conn.close()

    def leaked() -> List[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before]

    assert wait_until(lambda: not leaked(), 5.0), leaked()
    arena.settle()
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
