"""What only the asyncio API (callcp.aio) has, over real loopback sockets:
the server's shape (asyncio.start_server-like), serve_forever stopped by
close() or cancelled, the event loop under RSA work, 2,000 concurrent
connections, and the shared long-wait timer.  Everything both adapters do
is in tests/test_connection.py (and streams in tests/test_streams.py), run
over both.

pytest-asyncio is not used: each test runs ``asyncio.run`` through
``tests.aio_support.run``, which bounds the whole test with wait_for."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Optional

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
import callcp.aio
import callcp.sync
from callcp._core.errors import (
    CloseCode,
    ConnectionClosed,
    ConnectionClosedOK,
    TransportError,
)
from callcp._core.events import DecryptionRequested
from callcp._core.protocol import OAEP, ServerProtocol
from callcp.keys import KeyPair
from tests.aio_stream_peer import proc_status
from tests.aio_support import (
    LOOPBACK,
    MIB,
    PEER_SCRIPT,
    PYTHON,
    captured_logger,
    run,
    wait_for_condition,
)

pytestmark = pytest.mark.timeout(60)

Handler = Callable[[callcp.aio.Connection], Awaitable[Any]]


async def echo(conn: callcp.aio.Connection) -> None:
    async for message in conn:
        await conn.send(message)


async def serve(handler: Handler, key: Any, **options: Any) -> callcp.aio.Server:
    return await callcp.aio.serve(handler, LOOPBACK, 0, key=key, **options)


async def connect(
    server: callcp.aio.Server, port: Optional[int] = None, **kwargs: Any
) -> callcp.aio.Connection:
    """A client of ``server`` pinned to its key (``port``: once the server is
    closed, ``server.port`` is no longer available)."""
    kwargs.setdefault("timeout", 10.0)
    if not kwargs.get("insecure") and "known_hosts" not in kwargs:
        kwargs.setdefault("server_fingerprint", server.fingerprint)
    return await callcp.aio.connect(LOOPBACK, port or server.port, **kwargs)


# ============================================================ the basics


def test_server_shape(server_key: rsa.RSAPrivateKey) -> None:
    """Shaped like asyncio.start_server's: is_serving(), sockets, ``async
    with`` (the peer and address checks are in tests/test_connection.py)."""

    async def main() -> None:
        server = await serve(echo, server_key)
        async with server:
            assert server.is_serving()
            assert len(server.sockets) == 1
            host, port = server.sockets[0].getsockname()[:2]
            assert (host, port) == (LOOPBACK, server.port) and port > 0
            assert server.fingerprint == KeyPair(server_key).fingerprint

            conn = await connect(server)
            assert await conn.request(b"two") == b"two"
            await conn.close()
            assert conn.closed
        assert not server.is_serving()
        assert server.port == port  # still known after close

    run(main())


# ============================================================ shutdown


def test_serve_forever_stopped_by_close(server_key: rsa.RSAPrivateKey) -> None:
    async def main() -> None:
        server = await serve(echo, server_key)
        port = server.port
        forever = asyncio.ensure_future(server.serve_forever())
        conn = await connect(server)
        assert await conn.request(b"up") == b"up"
        server.close()
        await asyncio.wait_for(forever, 5)  # returns, does not raise
        assert forever.exception() is None
        await asyncio.wait_for(server.wait_closed(), 10)
        assert not server.is_serving()
        with pytest.raises(ConnectionClosedOK) as info:
            await conn.recv(timeout=5)
        assert info.value.code == CloseCode.GOING_AWAY
        with pytest.raises(TransportError):
            await connect(server, port, timeout=2)

    run(main())


def test_serve_forever_cancelled(server_key: rsa.RSAPrivateKey) -> None:
    async def main() -> None:
        async with await serve(echo, server_key) as server:
            forever = asyncio.ensure_future(server.serve_forever())
            conn = await connect(server)
            assert await conn.request(b"up") == b"up"
            forever.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(forever, 5)
            assert not server.is_serving()
        assert forever.cancelled()
        with pytest.raises(ConnectionClosed):
            await conn.recv(timeout=5)

    run(main())


# ================================================= RSA vs the event loop


def test_rsa_work_does_not_stall_the_event_loop(
    server_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While 50 clients (another process) handshake at once, no RSA
    decryption runs on the server's event loop thread: each one is handed
    to a worker thread, so the loop keeps turning.  Structural, not a
    benchmark: the threads are checked, not the clock.

    It also prints the longest gap between two turns of a ticker task and
    how many ClientHellos the server handled between two turns, next to the
    cost of one RSA-2048 decryption (information only: no assertion on time)."""
    ciphertext = server_key.public_key().encrypt(b"k" * 32, OAEP)
    t0 = time.perf_counter()
    for _ in range(20):
        server_key.decrypt(ciphertext, OAEP)
    rsa_cost = (time.perf_counter() - t0) / 20
    n = 50
    handled: List[int] = []
    ticks = [0]
    hello_ticks: List[int] = []
    decrypted_on: List[int] = []  # thread idents
    original_hello = ServerProtocol._on_client_hello
    original_run = DecryptionRequested.run

    def counted(self: ServerProtocol, header: bytes, body: bytes) -> Any:
        hello_ticks.append(ticks[0])
        return original_hello(self, header, body)

    def watched(self: DecryptionRequested) -> Any:
        decrypted_on.append(threading.get_ident())
        return original_run(self)

    monkeypatch.setattr(ServerProtocol, "_on_client_hello", counted)
    monkeypatch.setattr(DecryptionRequested, "run", watched)

    async def handler(conn: callcp.aio.Connection) -> None:
        handled.append(1)
        await echo(conn)

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        gaps: List[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = loop.time()
            while not stop.is_set():
                await asyncio.sleep(0.001)
                now = loop.time()
                gaps.append(now - last)
                last = now
                ticks[0] += 1

        async with await serve(handler, server_key) as server:
            tick = asyncio.ensure_future(ticker())
            proc = await asyncio.create_subprocess_exec(
                PYTHON,
                PEER_SCRIPT,
                "connect-many",
                str(server.port),
                server.fingerprint,
                str(n),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 40)
            stop.set()
            await tick
        result = json.loads(out)
        result["max_gap"] = max(gaps)
        result["ticks"] = len(gaps)
        result["stacked"] = max(collections.Counter(hello_ticks).values())
        result["loop_thread"] = threading.get_ident()
        return result

    result = run(main(), timeout=50)
    print(
        f"\n[event loop lag] {n} handshakes: max gap {result['max_gap'] * 1000:.1f} ms over "
        f"{result['ticks']} ticks; one RSA-2048 decryption {rsa_cost * 1000:.2f} ms; "
        f"up to {result['stacked']} ClientHellos ran between two turns of the ticker"
    )
    assert result["ok"] == n, result
    assert len(handled) == n == len(hello_ticks) == len(decrypted_on)
    assert result["loop_thread"] not in decrypted_on, "an RSA decryption ran on the event loop"


# ===================================================== 2,000 connections

N_CONNECTIONS = 2000
N_REQUESTS = 20
REPO = Path(__file__).resolve().parent.parent
BATCH = 200


@pytest.mark.timeout(300)
def test_two_thousand_concurrent_connections(server_key: rsa.RSAPrivateKey) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4500:
        pytest.skip(
            f"needs an RLIMIT_NOFILE hard limit >= 4500 (2 sockets per connection); it is {hard}"
        )
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    handled: List[int] = []

    async def handler(conn: callcp.aio.Connection) -> None:
        handled.append(1)
        async for message in conn:
            await conn.send(b"re:" + message)

    async def main() -> dict:
        with captured_logger() as (log, records):
            server = await serve(
                handler,
                server_key,
                logger=log,
                max_connections_per_source=0,
                max_handshakes_per_source=0,
            )
            async with server:
                before = proc_status()
                # The clients run in another process: this one is the server alone.
                clients = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "tests.aio_clients",
                    str(server.port),
                    server.fingerprint,
                    str(N_CONNECTIONS),
                    str(N_REQUESTS),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=str(REPO),
                )
                assert clients.stdin is not None and clients.stdout is not None
                line = await asyncio.wait_for(clients.stdout.readline(), 120)
                assert line == b"open\n", line
                await wait_for_condition(
                    lambda: len(handled) == N_CONNECTIONS, 30, "every handler to start"
                )
                assert server.active_connections == N_CONNECTIONS
                open_status = proc_status()
                clients.stdin.write(b"go\n")
                await clients.stdin.drain()
                out, _ = await asyncio.wait_for(clients.communicate(), 180)
                assert clients.returncode == 0, out
                timings = json.loads(out.decode().strip().splitlines()[-1])
                assert timings["ok"]
                await wait_for_condition(
                    lambda: server.active_connections == 0, 30, "every connection to close"
                )
                after = proc_status()
            problems = records.messages(logging.WARNING)
        return {
            **timings,
            "before": before,
            "open": open_status,
            "after": after,
            "problems": problems,
        }

    result = run(main(), timeout=280)
    per_conn = (result["open"]["VmRSS"] - result["before"]["VmRSS"]) / N_CONNECTIONS
    print(
        f"\n[2,000 connections] handshakes {result['connected']:.1f} s, "
        f"{N_CONNECTIONS * N_REQUESTS} requests {result['worked']:.1f} s; "
        f"server process RSS (clients run in another process): before "
        f"{result['before']['VmRSS'] / MIB:.1f} MiB, with all {N_CONNECTIONS} connections open "
        f"{result['open']['VmRSS'] / MIB:.1f} MiB ({per_conn / 1024:.1f} KiB per connection), "
        f"after {result['after']['VmRSS'] / MIB:.1f} MiB; peak (VmHWM) "
        f"{result['after']['VmHWM'] / MIB:.1f} MiB"
    )
    assert result["problems"] == []
    assert len(handled) == N_CONNECTIONS


def test_shorter_timeout_after_a_long_wait_is_honoured(server_key: rsa.RSAPrivateKey) -> None:
    """Long waits share one lazily re-armed timer per connection; a later,
    shorter timeout must still fire on time."""

    async def echo(conn: callcp.aio.Connection) -> None:
        async for message in conn:
            await conn.send(message)

    async def main() -> None:
        server = await callcp.aio.serve(echo, LOOPBACK, 0, key=server_key)
        async with server:
            conn = await callcp.aio.connect(
                LOOPBACK, server.port, server_fingerprint=server.fingerprint, timeout=120
            )
            assert await conn.request(b"arm the long timer") == b"arm the long timer"
            t0 = time.monotonic()
            # the 1.2 s timeout fires (a CallcpTimeout), not the outer guard
            # that would catch a wait for the connection's 120 s timer
            with pytest.raises(callcp.CallcpTimeout):
                await asyncio.wait_for(conn.recv(timeout=1.2), 30)
            assert time.monotonic() - t0 >= 1.0
            assert await conn.request(b"still usable") == b"still usable"
            await conn.close()

    run(main())
