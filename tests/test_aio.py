"""The asyncio API (callcp.aio) over real loopback sockets: the server's
shape (asyncio.start_server-like), messages of every size, limits and
timeouts, authentication, graceful shutdown, interoperability with the
blocking API (messages and streams, both ways), event-loop lag under RSA
work, and 2,000 concurrent connections.

pytest-asyncio is not used: each test runs ``asyncio.run`` through
``tests.aio_support.run``, which bounds the whole test with wait_for."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
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
    ClientAuthError,
    CloseCode,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    HandshakeError,
    MessageTooLarge,
    ServerKeyChanged,
    TransportError,
)
from callcp._core.keys import fingerprint
from callcp._core.protocol import OAEP, ServerProtocol
from callcp._core.wire import FrameType, decode_alert
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
from tests.helpers import split_frames

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


def test_server_shape_and_request_response(server_key: rsa.RSAPrivateKey) -> None:
    seen: asyncio.Queue[Any]

    async def handler(conn: callcp.aio.Connection) -> None:
        await seen.put((conn.peer_fingerprint, conn.remote_address, conn.local_address))
        await echo(conn)

    async def main() -> None:
        nonlocal seen
        seen = asyncio.Queue()
        server = await serve(handler, server_key)
        async with server:
            assert server.is_serving()
            assert len(server.sockets) == 1
            host, port = server.sockets[0].getsockname()[:2]
            assert (host, port) == (LOOPBACK, server.port) and port > 0
            assert server.fingerprint == KeyPair(server_key).fingerprint

            conn = await connect(server)
            assert conn.peer_fingerprint == server.fingerprint
            assert conn.remote_address == (LOOPBACK, server.port)
            await conn.send(b"one")
            assert await conn.recv() == b"one"
            assert await conn.request(b"two") == b"two"
            peer_fp, remote, local = await asyncio.wait_for(seen.get(), 5)
            assert peer_fp is None  # no client authentication
            assert remote == conn.local_address
            assert local == (LOOPBACK, server.port)
            await conn.close()
            assert conn.closed
        assert not server.is_serving()

    run(main())


def test_async_iteration_both_ways(server_key: rsa.RSAPrivateKey) -> None:
    got: List[bytes] = []

    async def handler(conn: callcp.aio.Connection) -> None:
        async for message in conn:  # ends on the client's clean close
            got.append(message)
        # unreachable for sending, but the loop ended without an exception

    async def talker(conn: callcp.aio.Connection) -> None:
        for i in range(3):
            await conn.send(b"server %d" % i)
        # returning closes the connection with the authenticated close

    async def main() -> None:
        async with await serve(handler, server_key) as server:
            conn = await connect(server)
            for i in range(5):
                await conn.send(b"client %d" % i)
            await conn.close()
            await wait_for_condition(lambda: len(got) == 5, what="the handler's messages")
        assert got == [b"client %d" % i for i in range(5)]

        async with await serve(talker, server_key) as server:
            conn = await connect(server)
            received = [m async for m in conn]
            assert received == [b"server 0", b"server 1", b"server 2"]

    run(main())


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, MIB])
def test_message_sizes(size: int, server_key: rsa.RSAPrivateKey) -> None:
    message = hashlib.sha256(b"%d" % size).digest() * (size // 32 + 1)
    message = message[:size]

    async def main() -> None:
        async with await serve(echo, server_key) as server:
            conn = await connect(server)
            assert await conn.request(message) == message
            await conn.send(bytearray(message))
            await conn.send(memoryview(message))
            assert await conn.recv() == message
            assert await conn.recv() == message
            await conn.close()

    run(main())


# ================================================================ limits


def test_max_message_size_refusal_spares_other_clients(server_key: rsa.RSAPrivateKey) -> None:
    delivered: List[bytes] = []

    async def handler(conn: callcp.aio.Connection) -> None:
        async for message in conn:
            delivered.append(message)
            await conn.send(b"ok:%d" % len(message))

    async def main() -> None:
        with captured_logger() as (log, records):
            async with await serve(handler, server_key, max_message_size=1000, logger=log) as s:
                bystander = await connect(s)
                offender = await connect(s)
                assert await bystander.request(b"x") == b"ok:1"
                assert await offender.request(b"y" * 1000) == b"ok:1000"  # at the limit
                await offender.send(b"z" * 1001)
                with pytest.raises(ConnectionClosedError) as info:
                    await offender.recv(timeout=5)
                assert info.value.code == CloseCode.MESSAGE_TOO_LARGE
                with pytest.raises(ConnectionClosed):
                    await offender.send(b"more")
                # the other client never noticed
                for i in range(5):
                    assert await bystander.request(b"b" * i) == b"ok:%d" % i
                await wait_for_condition(
                    lambda: bool(records.about("max_message_size", logging.WARNING)),
                    what="the server's log line",
                )
                assert len(records.about("max_message_size", logging.WARNING)) == 1
        assert all(len(m) <= 1000 for m in delivered)  # never a partial message

    run(main())


def test_client_max_message_size(server_key: rsa.RSAPrivateKey) -> None:
    errors: List[BaseException] = []

    async def handler(conn: callcp.aio.Connection) -> None:
        await conn.send(b"a" * 101)
        try:
            await conn.recv()
        except ConnectionClosed as exc:
            errors.append(exc)

    async def main() -> None:
        async with await serve(handler, server_key) as server:
            conn = await connect(server, max_message_size=100)
            with pytest.raises(MessageTooLarge):
                await conn.recv(timeout=5)
            await wait_for_condition(lambda: bool(errors), what="the handler's error")
        assert isinstance(errors[0], ConnectionClosedError)
        assert errors[0].code == CloseCode.MESSAGE_TOO_LARGE

    run(main())


def test_max_connections_refusal(server_key: rsa.RSAPrivateKey) -> None:
    async def main() -> None:
        with captured_logger() as (log, records):
            async with await serve(echo, server_key, max_connections=2, logger=log) as server:
                a = await connect(server)
                b = await connect(server)
                assert await a.request(b"a") == b"a"
                assert await b.request(b"b") == b"b"
                with pytest.raises(HandshakeError) as info:
                    await connect(server)
                text = str(info.value)
                assert "busy" in text and "max_connections (2)" in text, text
                assert "going away" in text
                assert len(records.about("max_connections", logging.WARNING)) == 1
                # the admitted clients go on; a freed slot is reused
                assert await a.request(b"a2") == b"a2"
                await b.close()
                await wait_for_condition(lambda: server.active_connections < 2)
                c = await connect(server)
                assert await c.request(b"c") == b"c"

    run(main())


# ===================================================== timeouts


def test_handshake_timeout_drops_a_silent_peer(server_key: rsa.RSAPrivateKey) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with captured_logger() as (log, records):
            async with await serve(echo, server_key, handshake_timeout=0.5, logger=log) as server:
                reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
                host, port = writer.get_extra_info("sockname")[:2]
                peer = f"{host}:{port}"
                t0 = loop.time()
                bystander = await connect(server)
                assert await bystander.request(b"hello") == b"hello"
                data = await asyncio.wait_for(reader.read(), 5)  # until the server closes
                elapsed = loop.time() - t0
                writer.close()
                assert 0.4 <= elapsed < 3.0, elapsed
                frames = split_frames(data)
                assert [f[0] for f in frames] == [FrameType.SERVER_HELLO, FrameType.ALERT]
                code, _ = decode_alert(frames[1][5:])
                assert code == CloseCode.TIMEOUT
                await wait_for_condition(lambda: bool(records.about(peer)), what="a log line")
                # the bystander is still served (and the loop turned a few times)
                for i in range(3):
                    assert await bystander.request(b"%d" % i) == b"%d" % i
                lines = records.about(peer)
                assert len(lines) == 1, lines
                assert "timed out" in lines[0]
                assert records.records[-1].levelno <= logging.WARNING

    run(main())


def test_idle_timeout(server_key: rsa.RSAPrivateKey) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with captured_logger() as (log, records):
            async with await serve(echo, server_key, idle_timeout=0.3, logger=log) as server:
                idle = await connect(server)
                busy = await connect(server)
                assert await idle.request(b"once") == b"once"
                t0 = loop.time()
                n = 0
                while loop.time() - t0 < 1.0:  # busy talks for > 3 idle timeouts
                    assert await busy.request(b"%d" % n) == b"%d" % n
                    n += 1
                with pytest.raises(ConnectionClosedError) as info:
                    await idle.recv(timeout=5)
                assert info.value.code == CloseCode.TIMEOUT
                assert await busy.request(b"still") == b"still"
                assert len(records.about("idle", logging.WARNING)) == 1

    run(main())


# ============================================================ trust


def test_client_authentication(
    server_key: rsa.RSAPrivateKey,
    client_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    calls: List[Optional[str]] = []
    messages: List[bytes] = []

    async def handler(conn: callcp.aio.Connection) -> None:
        calls.append(conn.peer_fingerprint)
        async for message in conn:
            messages.append(message)
            await conn.send(message)

    client_fp = fingerprint(client_key)
    listed = tmp_path / "authorized_keys"
    listed.write_text(f"# the one client\n{client_fp}\n")
    key_file = tmp_path / "client_key.pem"
    KeyPair(client_key).save(key_file)

    async def main() -> None:
        for authorized in ([client_fp], listed):
            calls.clear()
            messages.clear()
            async with await serve(handler, server_key, authorized_keys=authorized) as server:
                # an unlisted client: refused before its first message reaches the handler
                bad = await connect(server, client_key=other_key)
                try:
                    await bad.send(b"first flight secret")
                except ConnectionClosed:
                    pass  # the refusal may have arrived already
                with pytest.raises(ClientAuthError) as info:
                    await bad.recv(timeout=5)
                assert "not authorized" in str(info.value)
                # no key at all: the client sees at once that one is needed
                with pytest.raises(ClientAuthError):
                    await connect(server)
                good = await connect(server, client_key=key_file)
                assert await good.request(b"hello") == b"hello"
                await good.close()
            assert calls == [client_fp]
            assert messages == [b"hello"]

    run(main())


def test_aio_errors_after_a_failure_keep_the_close_code(
    server_key: rsa.RSAPrivateKey, client_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    async def main() -> None:
        authorized = [fingerprint(client_key)]
        async with await serve(echo, server_key, authorized_keys=authorized) as server:
            bad = await connect(server, client_key=other_key)
            with pytest.raises(ClientAuthError):
                await bad.recv(timeout=5)
            with pytest.raises(ConnectionClosedError) as info:
                await bad.send(b"again")
            assert info.value.code == CloseCode.UNAUTHORIZED
            with pytest.raises(ConnectionClosedError) as info:
                await bad.recv(timeout=5)
            assert info.value.code == CloseCode.UNAUTHORIZED

    run(main())


def test_pinned_or_known_key_mismatch(
    server_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    calls: List[int] = []

    async def handler(conn: callcp.aio.Connection) -> None:
        calls.append(1)
        await echo(conn)

    async def main() -> None:
        async with await serve(handler, server_key) as server:
            wrong = fingerprint(other_key)
            with pytest.raises(ServerKeyChanged) as info:
                await connect(server, server_fingerprint=wrong)
            assert info.value.expected == wrong
            assert info.value.presented == server.fingerprint

            known_hosts = tmp_path / "known_hosts"
            known_hosts.write_text(f"{LOOPBACK}:{server.port} {wrong}\n")
            with pytest.raises(ServerKeyChanged):
                await connect(server, known_hosts=known_hosts)
            assert known_hosts.read_text() == f"{LOOPBACK}:{server.port} {wrong}\n"

            # trust on first use, then known
            fresh = tmp_path / "fresh_known_hosts"
            for _ in range(2):
                conn = await connect(server, known_hosts=fresh)
                assert await conn.request(b"hi") == b"hi"
                await conn.close()
            assert server.fingerprint in fresh.read_text()
        assert calls == [1, 1]

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


def _slow_server(server_key: rsa.RSAPrivateKey) -> Any:
    """(handler, started, go): the handler answers b"slow" only after ``go``."""
    state: dict = {}

    async def handler(conn: callcp.aio.Connection) -> None:
        async for message in conn:
            if message == b"slow":
                state["started"].set()
                await state["go"].wait()
            await conn.send(b"done:" + message)

    return handler, state


def test_graceful_close_lets_the_request_in_flight_finish(
    server_key: rsa.RSAPrivateKey,
) -> None:
    handler, state = _slow_server(server_key)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        state["started"], state["go"] = asyncio.Event(), asyncio.Event()
        server = await serve(handler, server_key)
        port = server.port
        busy = await connect(server)
        idle = await connect(server)
        assert await idle.request(b"warm up") == b"done:warm up"
        await busy.send(b"slow")
        await asyncio.wait_for(state["started"].wait(), 5)
        t0 = loop.time()
        server.close()
        closing = asyncio.ensure_future(server.wait_closed())
        # the idle connection is closed at once, cleanly, with GOING_AWAY
        with pytest.raises(ConnectionClosedOK) as idle_info:
            await idle.recv(timeout=5)
        assert idle_info.value.code == CloseCode.GOING_AWAY
        assert loop.time() - t0 < 1.0
        assert not server.is_serving()
        with pytest.raises(TransportError):
            await connect(server, port, timeout=2)
        # the request in flight is answered, then the connection closes cleanly
        state["go"].set()
        assert await busy.recv(timeout=5) == b"done:slow"
        with pytest.raises(ConnectionClosedOK) as info:
            await busy.recv(timeout=5)
        assert info.value.code == CloseCode.GOING_AWAY
        await asyncio.wait_for(closing, 4)  # long before shutdown_timeout ran out

    run(main())


def test_graceful_close_ends_the_clients_async_for(server_key: rsa.RSAPrivateKey) -> None:
    handler, state = _slow_server(server_key)

    async def main() -> List[bytes]:
        state["started"], state["go"] = asyncio.Event(), asyncio.Event()
        server = await serve(handler, server_key)
        busy = await connect(server)
        await busy.send(b"slow")
        await asyncio.wait_for(state["started"].wait(), 5)
        server.close()
        state["go"].set()
        received = [message async for message in busy]  # ends, does not raise
        await asyncio.wait_for(server.wait_closed(), 4)
        return received

    assert run(main()) == [b"done:slow"]


# ================================================== blocking <-> asyncio

STREAM = hashlib.sha512(b"stream").digest() * 20_000  # 1.28 MB


async def aio_interop_handler(conn: callcp.aio.Connection) -> None:
    async for message in conn:
        if message == b"take-stream":
            buf = io.BytesIO()
            info = await conn.recv_stream(buf)
            ok = buf.getvalue() == STREAM and info.sha256 == hashlib.sha256(STREAM).hexdigest()
            verdict = b"ok" if ok else b"BAD"
            await conn.send(b"got %d %s %s" % (info.length, info.name.encode(), verdict))
        elif message == b"give-stream":
            await conn.send_stream(io.BytesIO(STREAM), name="from-server", checksum=True)
        else:
            await conn.send(b"echo:" + message)


def sync_interop_handler(conn: callcp.sync.Connection) -> None:
    for message in conn:
        if message == b"take-stream":
            buf = io.BytesIO()
            info = conn.recv_stream(buf)
            ok = buf.getvalue() == STREAM and info.sha256 == hashlib.sha256(STREAM).hexdigest()
            verdict = b"ok" if ok else b"BAD"
            conn.send(b"got %d %s %s" % (info.length, info.name.encode(), verdict))
        elif message == b"give-stream":
            conn.send_stream(io.BytesIO(STREAM), name="from-server", checksum=True)
        else:
            conn.send(b"echo:" + message)


EXPECTED_ACK = b"got %d from-client ok" % len(STREAM)


def test_blocking_client_with_asyncio_server(server_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    dest = tmp_path / "down.bin"

    def blocking_client(port: int, fp: str) -> callcp.StreamInfo:
        with callcp.sync.connect(LOOPBACK, port, server_fingerprint=fp, timeout=10) as conn:
            assert conn.request(b"hello") == b"echo:hello"
            assert conn.request(b"x" * 200_000) == b"echo:" + b"x" * 200_000
            conn.send(b"take-stream")
            conn.send_stream(STREAM, name="from-client", checksum=True)
            assert conn.recv() == EXPECTED_ACK
            conn.send(b"give-stream")
            info = conn.recv_stream(dest)
            assert conn.request(b"bye") == b"echo:bye"
            return info

    async def main() -> callcp.StreamInfo:
        loop = asyncio.get_running_loop()
        async with await serve(aio_interop_handler, server_key) as server:
            return await loop.run_in_executor(
                None, blocking_client, server.port, server.fingerprint
            )

    info = run(main())
    assert info == callcp.StreamInfo(len(STREAM), hashlib.sha256(STREAM).hexdigest(), "from-server")
    assert dest.read_bytes() == STREAM


def test_asyncio_client_with_blocking_server(server_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    dest = tmp_path / "down.bin"
    server = callcp.sync.serve(sync_interop_handler, LOOPBACK, 0, key=server_key)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()

    async def main() -> callcp.StreamInfo:
        conn = await callcp.aio.connect(
            LOOPBACK, server.port, server_fingerprint=server.fingerprint, timeout=10
        )
        async with conn:
            assert await conn.request(b"hello") == b"echo:hello"
            assert await conn.request(b"x" * 200_000) == b"echo:" + b"x" * 200_000
            await conn.send(b"take-stream")
            await conn.send_stream(io.BytesIO(STREAM), name="from-client", checksum=True)
            assert await conn.recv() == EXPECTED_ACK
            await conn.send(b"give-stream")
            info = await conn.recv_stream(dest)
            assert await conn.request(b"bye") == b"echo:bye"
            return info

    try:
        info = run(main())
    finally:
        server.shutdown(timeout=2)
        thread.join(5)
    assert info == callcp.StreamInfo(len(STREAM), hashlib.sha256(STREAM).hexdigest(), "from-server")
    assert dest.read_bytes() == STREAM


# ================================================= RSA vs the event loop


def test_rsa_work_does_not_stall_the_event_loop(
    server_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While 50 clients (another process) handshake at once, the server's
    event loop never goes longer without turning than a bound well below
    what stacking many RSA operations per callback would cost.  Structural,
    not a benchmark: the bound is 20 RSA-2048 decryptions (at least 100 ms).

    It also counts (and prints) how many ClientHellos -- one RSA decryption
    each -- the server handled between two turns of the ticker task."""
    ciphertext = server_key.public_key().encrypt(b"k" * 32, OAEP)
    t0 = time.perf_counter()
    for _ in range(20):
        server_key.decrypt(ciphertext, OAEP)
    rsa_cost = (time.perf_counter() - t0) / 20
    bound = max(20 * rsa_cost, 0.1)
    n = 50
    handled: List[int] = []
    ticks = [0]
    hello_ticks: List[int] = []
    original = ServerProtocol._on_client_hello

    def counted(self: ServerProtocol, header: bytes, body: bytes) -> Any:
        hello_ticks.append(ticks[0])
        return original(self, header, body)

    monkeypatch.setattr(ServerProtocol, "_on_client_hello", counted)

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
        return result

    result = run(main(), timeout=50)
    print(
        f"\n[event loop lag] {n} handshakes: max gap {result['max_gap'] * 1000:.1f} ms over "
        f"{result['ticks']} ticks; one RSA-2048 decryption {rsa_cost * 1000:.2f} ms; "
        f"bound {bound * 1000:.0f} ms; up to {result['stacked']} ClientHellos (RSA "
        "decryptions) ran between two turns of the ticker"
    )
    assert result["ok"] == n, result
    assert len(handled) == n == len(hello_ticks)
    assert result["max_gap"] < bound, result


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
                LOOPBACK, server.port, server_fingerprint=server.fingerprint, timeout=30
            )
            assert await conn.request(b"arm the 30 s timer") == b"arm the 30 s timer"
            t0 = time.monotonic()
            with pytest.raises(callcp.CallcpTimeout):
                await conn.recv(timeout=1.2)
            assert 1.0 < time.monotonic() - t0 < 3.0
            assert await conn.request(b"still usable") == b"still usable"
            await conn.close()

    run(main())
