"""The connection engine's policies over real sockets, on both adapters:
what the security review of the engine found, each as a test that fails
without its fix."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterator, List

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
import callcp._sockets
from callcp._core.wire import MAX_FRAGMENT, FrameType
from tests.sock_support import refuse_next_key_exchange, wait_until

ADAPTERS = ["sync", "aio"]


class Served:
    """A server of either flavour in the background; ``behaviour(conn)`` is
    written once, blocking-style, and run in a thread for the aio server."""

    def __init__(self, adapter: str, key: rsa.RSAPrivateKey, handler: Any, **options: Any):
        self.adapter = adapter
        if adapter == "sync":
            self.server: Any = callcp.serve(handler, "127.0.0.1", 0, key=key, **options)
            self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
            self.thread.start()
            self.port = self.server.port
            return
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> Any:
            return await callcp.aio.serve(handler, "127.0.0.1", 0, key=key, **options)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.port = self.server.port

    @property
    def fingerprint(self) -> str:
        return str(self.server.fingerprint)

    def active(self) -> int:
        if self.adapter == "sync":
            return int(self.server.active_connections)

        async def count() -> int:
            return int(self.server.active_connections)

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)

    def shutdown(self) -> None:
        if self.adapter == "sync":
            self.server.shutdown()
            return
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def connect(self, **options: Any) -> callcp.Connection:
        return callcp.connect(
            "127.0.0.1", self.port, server_fingerprint=self.fingerprint, **options
        )


def handler_for(adapter: str, body: Callable[[Any], Any]) -> Any:
    """``body(conn)`` for a sync server; for aio an async handler that runs
    the same steps through ``Blocking`` (awaiting each call)."""
    if adapter == "sync":
        return body

    async def handler(conn: callcp.aio.Connection) -> None:
        await body(conn)

    return handler


@contextlib.contextmanager
def served(adapter: str, key: rsa.RSAPrivateKey, handler: Any, **options: Any) -> Iterator[Served]:
    server = Served(adapter, key, handler, **options)
    try:
        yield server
    finally:
        server.shutdown()


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_client_that_sends_and_closes_at_once_is_served(
    adapter: str, server_key: rsa.RSAPrivateKey
) -> None:
    """Fire and forget: the whole flight and the CLOSE arrive before the
    server gets to the key exchange; every message is still delivered."""
    got: List[bytes] = []
    done = threading.Event()

    if adapter == "sync":

        def handler(conn: Any) -> None:
            got.extend(conn)
            done.set()

    else:

        async def handler(conn: Any) -> None:
            async for message in conn:
                got.append(message)
            done.set()

    with served(adapter, server_key, handler) as srv:
        for round_ in range(5):
            done.clear()
            got.clear()
            conn = srv.connect()
            for i in range(3):
                conn.send(b"m%d" % i)
            conn.close()
            assert done.wait(10), f"round {round_}: the handler never saw the close"
            assert got == [b"m0", b"m1", b"m2"], round_


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_peer_that_never_reads_does_not_hold_its_place(
    adapter: str, server_key: rsa.RSAPrivateKey
) -> None:
    """A handler sending to a peer that never reads is stopped by the
    connection's timeout, and the connection's place is given back."""
    big = b"x" * MAX_FRAGMENT
    sending = threading.Event()

    if adapter == "sync":

        def handler(conn: Any) -> None:
            sending.set()
            while True:
                conn.send(big)

    else:

        async def handler(conn: Any) -> None:
            sending.set()
            while True:
                await conn.send(big)

    with served(adapter, server_key, handler, idle_timeout=1.0, max_connections=3) as srv:
        hogs = [srv.connect() for _ in range(3)]  # never read
        for hog in hogs:
            hog.send(b"start")
        assert sending.wait(10)
        assert wait_until(lambda: srv.active() == 0, 15.0), "the places were never given back"
        with srv.connect() as legit:
            legit.send(b"hello")  # served: the handler answers (and blocks on us)
            assert len(legit.recv(timeout=10)) == MAX_FRAGMENT
        for hog in hogs:
            hog.close()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_graceful_shutdown_lets_an_upload_in_flight_finish(
    adapter: str, server_key: rsa.RSAPrivateKey
) -> None:
    """shutdown() waits for a message that is still arriving (its records
    are spread over time) instead of cutting it off as a 'clean' close."""

    if adapter == "sync":

        def handler(conn: Any) -> None:
            for message in conn:
                conn.send(b"got %d" % len(message))

    else:

        async def handler(conn: Any) -> None:
            async for message in conn:
                await conn.send(b"got %d" % len(message))

    records = 20
    result: List[Any] = []
    halfway = threading.Event()

    def upload(conn: callcp.Connection) -> None:
        try:
            core = conn._core
            for i in range(records):
                kind = FrameType.DATA if i < records - 1 else FrameType.DATA_END
                core._seal(kind, b"u" * MAX_FRAGMENT)
                with conn._send_lock:
                    conn._write(core.data_to_send_parts())
                if i == records // 2:
                    halfway.set()
                time.sleep(0.02)
            result.append(conn.recv(timeout=10))
        except Exception as exc:
            result.append(exc)

    srv = Served(adapter, server_key, handler, shutdown_timeout=10)
    conn = srv.connect()
    thread = threading.Thread(target=upload, args=(conn,))
    thread.start()
    assert halfway.wait(10)
    srv.shutdown()
    thread.join(10)
    assert result == [b"got %d" % (records * MAX_FRAGMENT)], result
    conn.close()


def test_no_thread_for_a_connection_is_busy_not_a_dead_server(
    server_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(blocking server) When a thread cannot be started (a task limit), that
    client is refused as busy; the server keeps accepting and counts right."""
    real_submit = callcp._sockets.ThreadPool.submit
    failures = [1]

    def submit(self: Any, fn: Any, *args: Any) -> None:
        if failures:
            failures.pop()
            raise RuntimeError("can't start new thread")
        real_submit(self, fn, *args)

    monkeypatch.setattr(callcp._sockets.ThreadPool, "submit", submit)

    def echo(conn: Any) -> None:
        for message in conn:
            conn.send(message)

    with served("sync", server_key, echo) as srv:
        with pytest.raises(callcp.ServerBusy, match="busy"):
            srv.connect().request(b"x")
        with srv.connect() as conn:
            assert conn.request(b"y") == b"y"
        core = srv.server._core
        assert wait_until(lambda: core.admission.open == 0)
        assert core.handshakes.running == 0


def test_a_failed_send_never_hands_the_reader_half_a_message(
    server_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(blocking) A send that fails while another thread assembles a message
    leaves the receiving half of the core to that thread: it gets the whole
    message, never the part after a clear.  (The reader's decryption of the
    message's last record is slowed, to hold the window open as a preempted
    thread would.)"""
    from callcp._core import records

    real_open = records.RecordReceiver.open

    def slow_open(self: Any, header: bytes, body: Any) -> bytes:
        if threading.current_thread().name == "reader" and header[0] == FrameType.DATA_END:
            time.sleep(0.4)
        return real_open(self, header, body)

    monkeypatch.setattr(records.RecordReceiver, "open", slow_open)
    message = b"A" * MAX_FRAGMENT + b"B" * MAX_FRAGMENT + b"C" * 100  # DATA, DATA, DATA_END

    def handler(conn: Any) -> None:
        conn.recv()
        conn.send(message)
        time.sleep(0.15)
        conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn._sock.close()  # a reset for the client's next send

    with served("sync", server_key, handler) as srv:
        conn = srv.connect()
        conn.send(b"go")
        got: List[Any] = []

        def reader() -> None:
            try:
                got.append(conn.recv(timeout=10))
            except callcp.CallcpError as exc:
                got.append(exc)

        thread = threading.Thread(target=reader, name="reader")
        thread.start()
        time.sleep(0.3)  # the reader is inside the last record's decryption
        with pytest.raises(callcp.CallcpError):
            conn.send(b"x" * 100_000)  # fails: the peer reset
        thread.join(10)
        assert got == [message]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_full_handshake_queue_is_a_proved_busy_refusal(
    adapter: str, server_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server whose key-exchange queue is full declines with a REFUSAL
    (§4.10): the client, whose first request went out with its flight, gets
    ServerBusy (retryable), the request never reaches the handler, and the
    next client is served."""
    refuse_next_key_exchange(monkeypatch)
    got: List[bytes] = []

    async def body(conn: Any) -> None:
        async for message in conn:
            got.append(message)
            await conn.send(message)

    def sync_body(conn: Any) -> None:
        for message in conn:
            got.append(message)
            conn.send(message)

    handler = sync_body if adapter == "sync" else body
    with served(adapter, server_key, handler, ticket_lifetime=0) as srv:
        conn = srv.connect()
        conn.send(b"first flight")  # (sealed before the server's Finished)
        with pytest.raises(callcp.ServerBusy, match="handshake queue is full") as info:
            conn.recv(timeout=10)
        assert isinstance(info.value, callcp.RetryableError)
        with srv.connect() as conn:
            assert conn.request(b"next") == b"next"
    assert got == [b"next"]
