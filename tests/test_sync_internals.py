"""Tests that reach into callcp.sync's private internals, kept apart so they
are easy to port when the adapters become one engine:

* raw bytes written on an established connection's socket (``conn._sock``):
  a 4 GiB record header after the handshake, with and without a megabyte
  behind it;
* the server's thread pool (``callcp._sockets.ThreadPool``): no thread leaks;
* protocol versions forced on both sides (``callcp._engine.ServerProtocol``,
  ``callcp._common.ClientProtocol``) and read back (``conn._core.version``):
  the best common version is chosen, a downgrade through a proxy fails.

The arena (a server, a bystander, the log) and the attack target come from
tests/sock_support.py, shared with test_server_robustness and
test_attacks_sockets.
"""

from __future__ import annotations

import functools
import random
import socket
import struct
import sys
import threading
import traceback
from typing import Callable, List, Sequence

import pytest

import callcp._common
import callcp.sync
from callcp._core.errors import CloseCode, ConnectionClosedError, HandshakeError
from callcp._core.protocol import ClientProtocol, ServerProtocol
from callcp._core.wire import LEGACY_TRIPWIRE, MAGIC, FrameType
from tests.sock_proxy import FrameProxy, Relay, hook_on, make_frame
from tests.sock_support import (
    REQUEST,
    Arena,
    Target,
    handshake_failure_logged,
    read_until_closed,
    send_ignoring_close,
    via,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)

MEGABYTE = 1 << 20


# ------------------------------------------------ raw bytes on conn._sock


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
    send_ignoring_close(sock, struct.pack(">BI", FrameType.DATA, 0xFFFFFFFF))
    send_ignoring_close(sock, random.Random(5).randbytes(MEGABYTE))
    # closed long before the idle timeout (300 s), without the 4 GiB
    read_until_closed(sock)
    conn.close()
    arena.one_line_about(port, "4294967295")
    arena.bystander_unharmed()


def test_no_thread_leaks_after_attacks(arena: Arena, monkeypatch: pytest.MonkeyPatch) -> None:
    # Server threads are reused; idle ones retire after IDLE_SECONDS (30 s):
    # shorten that so "back to the threads we had before" is checkable.
    monkeypatch.setattr(callcp._sockets.ThreadPool, "IDLE_SECONDS", 0.5)
    before = set(threading.enumerate())
    # a mix of the attacks above, each handled by a server thread
    for seed in range(5):
        with arena.raw() as sock:
            send_ignoring_close(sock, random.Random(seed).randbytes(4096))
            read_until_closed(sock)
    silent = [arena.raw() for _ in range(5)]
    for i in range(50):
        sock = arena.raw()
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    for sock in silent:
        read_until_closed(sock)
        sock.close()
    conn = arena.srv.connect()
    conn._sock.sendall(struct.pack(">BI", FrameType.DATA_END, 0xFFFFFFFF))
    with pytest.raises(ConnectionClosedError):
        conn.recv(timeout=5)
    conn.close()

    def leaked() -> List[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before]

    if not wait_until(lambda: not leaked(), 10.0):
        frames = sys._current_frames()  # where each leaked thread is stuck
        raise AssertionError(
            "\n".join(
                f"{t!r}:\n" + "".join(traceback.format_stack(frames[t.ident]))
                for t in leaked()
                if t.ident in frames
            )
        )
    arena.settle()
    arena.bystander_unharmed()


# ------------------------------------------------------ protocol versions


def _with_versions(monkeypatch: pytest.MonkeyPatch, versions: tuple) -> None:
    monkeypatch.setattr(
        callcp._engine, "ServerProtocol", functools.partial(ServerProtocol, versions=versions)
    )
    monkeypatch.setattr(
        callcp._common, "ClientProtocol", functools.partial(ClientProtocol, versions=versions)
    )


def test_both_sides_agree_on_the_best_common_version(
    target: Target, make_proxy: Callable[..., FrameProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control for the downgrade tests: untouched, (4, 5) and (4, 5) pick 5."""
    _with_versions(monkeypatch, (4, 5))
    proxy = make_proxy()
    with via(proxy, target) as conn:
        assert conn.request(REQUEST) == b"ok:" + REQUEST
        assert conn._core.version == 5


def _strip_version_5(relay: Relay, index: int, frame: bytes) -> Sequence[bytes]:
    body = frame[5:]
    n = body[len(MAGIC)]
    start = len(MAGIC) + 1
    offered = struct.unpack(f">{n}H", body[start : start + 2 * n])
    assert offered == (4, 5, *LEGACY_TRIPWIRE)  # (the Callcp 1.0 tripwire: reserved values)
    kept = (4, *LEGACY_TRIPWIRE)
    forged = (
        body[: len(MAGIC)]
        + bytes([len(kept)])
        + struct.pack(f">{len(kept)}H", *kept)
        + body[start + 2 * n :]
    )
    return [make_frame(frame[0], forged)]


def _choose_version_4(relay: Relay, index: int, frame: bytes) -> Sequence[bytes]:
    body = frame[5:]
    at = len(MAGIC)
    assert struct.unpack(">H", body[at : at + 2]) == (5,)
    return [make_frame(frame[0], body[:at] + struct.pack(">H", 4) + body[at + 2 :])]


@pytest.mark.parametrize(
    "hooks",
    [
        {"s2c": hook_on(FrameType.SERVER_HELLO, _strip_version_5)},
        {"c2s": hook_on(FrameType.CLIENT_HELLO, _choose_version_4)},
    ],
    ids=["server-offer-stripped", "client-choice-rewritten"],
)
def test_version_downgrade(
    target: Target,
    make_proxy: Callable[..., FrameProxy],
    monkeypatch: pytest.MonkeyPatch,
    log: pytest.LogCaptureFixture,
    hooks: dict,
) -> None:
    _with_versions(monkeypatch, (4, 5))
    proxy = make_proxy(**hooks)
    conn = via(proxy, target)
    conn.send(REQUEST)
    with pytest.raises(HandshakeError):
        conn.recv()
    conn.close()
    assert wait_until(lambda: handshake_failure_logged(log))
    assert target.rec.calls == 0
    assert target.rec.seen() == []
