"""Retries: callcp.Retry's policy, connect(retry=...), and the pools' rule
that a request is sent again only when the server cannot have received it,
or when the caller says it is idempotent (src/callcp/_retry.py)."""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import threading
from typing import Any, List

import pytest

import callcp
import callcp.aio
from callcp import (
    ConnectionLost,
    ConnectionRefused,
    Retry,
    RetryableError,
    ServerBusy,
    ServerKeyChanged,
)
from tests.adapters import Adapter, Behaviour, Echo
from tests.sock_support import free_port, refuse_next_key_exchange

LOOPBACK = "127.0.0.1"


class Retries(logging.Handler):
    """Counts the "trying again" lines; ``first`` is set at the first."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: List[str] = []
        self.first = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "trying again" in text:
            self.lines.append(text)
            self.first.set()


@pytest.fixture
def retries() -> Any:
    log = logging.getLogger("callcp.test_retry")
    log.setLevel(logging.INFO)
    handler = Retries()
    log.addHandler(handler)
    yield log, handler
    log.removeHandler(handler)


# ------------------------------------------------------------------ the policy


def test_retry_validates_its_options_once() -> None:
    for bad in [
        {"attempts": 0},
        {"attempts": 1.5},
        {"attempts": True},
        {"backoff": -1},
        {"backoff": float("nan")},
        {"max_backoff": float("inf")},
        {"backoff": 2.0, "max_backoff": 1.0},
        {"jitter": "yes"},
    ]:
        with pytest.raises(ValueError):
            Retry(**bad)
    with pytest.raises(ValueError, match="retry must be a callcp.Retry"):
        callcp.ClientOptions(retry=5)  # type: ignore[arg-type]


def test_backoff_doubles_is_capped_and_jittered_within_bounds() -> None:
    plain = Retry(attempts=10, backoff=0.1, max_backoff=1.0, jitter=False)
    assert [plain.wait(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    jittered = Retry(attempts=10, backoff=0.1, max_backoff=1.0)
    for n in range(1, 7):
        waits = {jittered.wait(n) for _ in range(50)}
        top = plain.wait(n)
        assert all(top / 2 <= w <= top for w in waits) and len(waits) > 1
    assert plain.wait(10_000) == 1.0  # (no overflow)


# ------------------------------------------------------------------ connect


def test_connect_without_retry_fails_at_once_with_a_retryable_error() -> None:
    port = free_port()
    with pytest.raises(ConnectionRefused, match="connection refused") as info:
        callcp.connect(LOOPBACK, port, timeout=5)
    assert isinstance(info.value, RetryableError) and info.value.retryable


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_connect_retries_until_the_server_is_up(
    flavour: str, server_key: Any, retries: Any
) -> None:
    """Nothing listens at first; the server starts after the first failed
    try; connect() with a Retry gets through."""
    log, seen = retries
    port = free_port()
    adapter = Adapter(client=flavour, server=flavour, key=server_key)
    try:
        starter = threading.Thread(
            target=lambda: seen.first.wait(10) and adapter.serve(Echo(), port=port)
        )
        starter.start()
        options = dict(
            timeout=5.0, retry=Retry(attempts=50, backoff=0.05, max_backoff=0.2),
            logger=log, server_fingerprint=callcp.fingerprint(server_key),
        )  # fmt: skip
        if flavour == "sync":
            with callcp.connect(LOOPBACK, port, **options) as conn:  # type: ignore[arg-type]
                assert conn.peer_fingerprint is not None  # (it waited for the proof)
                assert conn.request(b"up") == b"up"
        else:

            async def main() -> None:
                conn = await callcp.aio.connect(LOOPBACK, port, **options)  # type: ignore[arg-type]
                assert conn.peer_fingerprint is not None
                assert await conn.request(b"up") == b"up"
                await conn.close()

            asyncio.run(main())
        starter.join(10)
        assert seen.lines and "ConnectionRefused" in seen.lines[0]
    finally:
        adapter.close()


def test_connect_gives_up_after_its_attempts_and_never_retries_a_trust_failure(
    server_key: Any, other_key: Any, adapter: Adapter, retries: Any
) -> None:
    log, seen = retries
    port = free_port()
    with pytest.raises(ConnectionRefused):
        callcp.connect(LOOPBACK, port, retry=Retry(attempts=3, backoff=0.01), logger=log)
    assert len(seen.lines) == 2 and "try 3 of 3" in seen.lines[-1]
    seen.lines.clear()
    srv = adapter.serve(Echo())
    with pytest.raises(ServerKeyChanged):  # (not retryable: tried once)
        callcp.connect(
            LOOPBACK, srv.port, server_fingerprint=callcp.fingerprint(other_key),
            retry=Retry(attempts=5, backoff=0.01), logger=log,
        )  # fmt: skip
    assert seen.lines == []


# ------------------------------------------------------------------ pools


class ActThenVanish(Behaviour):
    """Acts on every message (counts it), and on the first ``drops`` of
    them cuts the connection instead of replying, as a server that crashed
    after doing the work would."""

    def __init__(self, drops: int = 1) -> None:
        self.acted: List[bytes] = []
        self.drops = drops
        self._lock = threading.Lock()

    def _act(self, message: bytes) -> bool:
        with self._lock:
            self.acted.append(message)
            if self.drops > 0:
                self.drops -= 1
                return False
            return True

    def sync(self, conn: callcp.sync.Connection) -> None:
        for message in conn:
            if not self._act(message):
                conn._sock.shutdown(socket.SHUT_RDWR)  # (no CLOSE: the reply is lost)
                return
            conn.send(message)

    async def aio(self, conn: callcp.aio.Connection) -> None:
        async for message in conn:
            if not self._act(message):
                conn._link.abort()
                return
            await conn.send(message)


def _pools(srv: Any, flavour: str, **options: Any) -> Any:
    options.setdefault("server_fingerprint", srv.fingerprint)
    options.setdefault("timeout", 10.0)
    return options


def _request(flavour: str, port: int, messages: List[Any], **options: Any) -> List[Any]:
    """Each (message, idempotent) through one pool of that flavour: the
    replies, or the exceptions raised."""
    out: List[Any] = []
    if flavour == "sync":
        with callcp.Pool(LOOPBACK, port, **options) as pool:
            for message, idempotent in messages:
                try:
                    out.append(pool.request(message, idempotent=idempotent))
                except callcp.CallcpError as exc:
                    out.append(exc)
            out.append(pool.stats())
        return out

    async def main() -> None:
        async with callcp.aio.Pool(LOOPBACK, port, **options) as pool:
            for message, idempotent in messages:
                try:
                    out.append(await pool.request(message, idempotent=idempotent))
                except callcp.CallcpError as exc:
                    out.append(exc)
            out.append(pool.stats())

    asyncio.run(main())
    return out


def test_a_request_that_may_have_been_acted_on_is_never_sent_twice(
    adapter: Adapter,
) -> None:
    """The server acts, then the connection dies before the reply: a
    non-idempotent request raises a RetryableError (ConnectionLost) and was
    acted on once; an idempotent one is sent again and succeeds."""
    flavour = adapter.client_flavour
    behaviour = ActThenVanish(drops=1)
    srv = adapter.serve(behaviour)
    retry = Retry(attempts=4, backoff=0.01)
    options = _pools(srv, flavour, retry=retry)
    first, stats = _request(flavour, srv.port, [(b"pay 10", False)], **options)
    assert isinstance(first, ConnectionLost) and first.retryable
    assert behaviour.acted == [b"pay 10"] and stats.retried == 0
    behaviour.drops = 1
    second, stats = _request(flavour, srv.port, [(b"read x", True)], **options)
    assert second == b"read x"
    assert behaviour.acted == [b"pay 10", b"read x", b"read x"] and stats.retried == 1


def test_a_busy_refusal_is_retried_even_for_a_request_that_left(
    adapter: Adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request shares the new connection's flight; the server's
    proved refusal (ServerBusy) says it read nothing, so the pool sends it
    again, and it is acted on once."""
    full = refuse_next_key_exchange(monkeypatch)
    flavour = adapter.client_flavour
    echo = Echo()
    srv = adapter.serve(echo, ticket_lifetime=0)
    got = _request(
        flavour, srv.port, [(b"once", False)], retry=Retry(attempts=3, backoff=0.01),
        **_pools(srv, flavour),
    )  # fmt: skip
    assert got[0] == b"once" and echo.seen() == [b"once"] and got[1].retried == 1
    full.append(1)
    got = _request(flavour, srv.port, [(b"no retry", False)], **_pools(srv, flavour))
    assert isinstance(got[0], ServerBusy) and echo.seen() == [b"once"]


def test_pools_ride_out_a_server_restart(adapter: Adapter) -> None:
    """A pooled connection whose server shut down (GOING_AWAY while it sat
    idle) is found dead before the request leaves; the pool moves on, and
    with a Retry waits (ConnectionRefused) for the server to come back."""
    flavour = adapter.client_flavour
    port = free_port()
    srv = adapter.serve(Echo(), port=port)
    options = _pools(srv, flavour, retry=Retry(attempts=40, backoff=0.05, max_backoff=0.2))
    results: List[Any] = []

    def restart_in_the_middle() -> None:
        srv.shutdown()
        threading.Timer(0.3, lambda: adapter.serve(Echo(), port=port)).start()

    class Script(list):  # (the restart happens between the two requests)
        def __iter__(self) -> Any:
            yield (b"before", False)
            restart_in_the_middle()
            yield (b"after", False)

    results = _request(flavour, port, Script(), **options)
    assert results[:2] == [b"before", b"after"], results
    assert results[2].created == 2


class ReadThenGoAway(Behaviour):
    """Answers ``warm...`` messages; acts on the next one, then closes with
    GOING_AWAY without replying: its close counts that one as delivered."""

    def __init__(self) -> None:
        self.acted: List[bytes] = []

    def sync(self, conn: callcp.sync.Connection) -> None:
        while True:
            message = conn.recv()
            self.acted.append(message)
            if not message.startswith(b"warm"):
                conn.close(callcp.CloseCode.GOING_AWAY, "maintenance")
                return
            conn.send(message)

    async def aio(self, conn: callcp.aio.Connection) -> None:
        while True:
            message = await conn.recv()
            self.acted.append(message)
            if not message.startswith(b"warm"):
                await conn.close(callcp.CloseCode.GOING_AWAY, "maintenance")
                return
            await conn.send(message)


def test_a_going_away_that_counts_the_request_is_not_a_reason_to_resend(
    adapter: Adapter,
) -> None:
    """The server read the request (on a reused connection), then went
    away: ServerGoingAway with unread 0; a non-idempotent request is not
    sent again."""
    behaviour = ReadThenGoAway()
    srv = adapter.serve(behaviour)
    warm, got, stats = _request(
        adapter.client_flavour, srv.port, [(b"warm", False), (b"pay 20", False)],
        retry=Retry(attempts=5, backoff=0.01), **_pools(srv, adapter.client_flavour),
    )  # fmt: skip
    assert warm == b"warm"
    assert isinstance(got, callcp.ServerGoingAway) and got.unread == 0, got
    assert behaviour.acted == [b"warm", b"pay 20"] and stats.retried == 0


@pytest.mark.parametrize("reading", [False, True], ids=["idle", "another-thread-reading"])
@pytest.mark.parametrize("adapter", ["sync"], indirect=True)  # (asyncio is one thread)
def test_a_close_from_another_thread_counts_only_what_it_can_vouch_for(
    adapter: Adapter, reading: bool
) -> None:
    """(blocking) conn.close(GOING_AWAY) from a thread other than the
    reader's: while a reader holds the connection, the count is "cannot
    say" (unread 0: nothing may be sent again); otherwise it is exact."""
    srv = adapter.hold()
    client, server_side = srv.pair()
    client.send(b"on its way")  # (the server's application never reads it)
    assert select.select([server_side._sock], [], [], 10)[0]  # (it arrived)
    lock = server_side._recv_lock
    if reading:
        lock.acquire()  # (as a reader in recv() would hold it)
    try:
        server_side.close(callcp.CloseCode.GOING_AWAY, "maintenance")
    finally:
        if reading:
            lock.release()
    with pytest.raises(callcp.ServerGoingAway) as info:
        client.recv(timeout=10)
    assert info.value.unread == (0 if reading else 1)
