"""The blocking API (callcp.sync) over real loopback sockets."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from callcp._core.errors import (
    CallcpTimeout,
    ClientAuthError,
    CloseCode,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    HandshakeError,
    HandshakeTimeout,
    LocalProtocolError,
    MessageTooLarge,
    ServerKeyChanged,
    TransportError,
    UnknownServerKey,
)
from callcp._core.keys import fingerprint
from callcp.sync import Connection, connect, serve
from tests.sock_support import (
    LOOPBACK,
    SOCK_TIMEOUT,
    Recorder,
    RunningServer,
    echo,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def start(server_key: rsa.RSAPrivateKey) -> Iterator[Callable[..., RunningServer]]:
    """``start(handler, **options)``: a running server, stopped after the test."""
    running: List[RunningServer] = []

    def make(handler: Callable[[Connection], Any] = echo, **options: Any) -> RunningServer:
        options.setdefault("key", server_key)
        srv = RunningServer(handler, **options)
        running.append(srv)
        return srv

    yield make
    for srv in running:
        srv.stop()


# ---------------------------------------------------------------- basics


def test_request_response(start: Callable[..., RunningServer]) -> None:
    srv = start(Recorder())
    with srv.connect() as conn:
        assert conn.request(b"hello") == b"ok:hello"
        assert conn.request(b"again") == b"ok:again"


def test_send_recv_and_client_iteration_ends_on_clean_close(
    start: Callable[..., RunningServer],
) -> None:
    def handler(conn: Connection) -> None:
        first = conn.recv()
        for i in range(3):
            conn.send(first + b" %d" % i)
        # returning closes the connection with the authenticated close

    srv = start(handler)
    conn = srv.connect()
    conn.send(b"count")
    assert list(conn) == [b"count 0", b"count 1", b"count 2"]
    with pytest.raises(ConnectionClosedOK) as info:
        conn.recv()
    assert info.value.code == CloseCode.NORMAL
    conn.close()


def test_server_iteration_ends_on_clean_client_close(
    start: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="callcp")
    got: queue.Queue[List[bytes]] = queue.Queue()

    def handler(conn: Connection) -> None:
        got.put(list(conn))

    srv = start(handler)
    with srv.connect() as conn:
        for m in (b"a", b"b", b"c"):
            conn.send(m)
    assert got.get(timeout=5) == [b"a", b"b", b"c"]
    assert wait_until(lambda: srv.server.active_connections == 0)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("callcp")] == []


def test_peer_fingerprint_and_addresses(
    start: Callable[..., RunningServer], server_key: rsa.RSAPrivateKey
) -> None:
    seen: queue.Queue[tuple] = queue.Queue()

    def handler(conn: Connection) -> None:
        seen.put((conn.peer_fingerprint, conn.remote_address, conn.local_address))
        echo(conn)

    srv = start(handler)
    with srv.connect() as conn:
        assert conn.peer_fingerprint == srv.fingerprint == fingerprint(server_key)
        assert conn.remote_address == (LOOPBACK, srv.port)
        assert conn.request(b"x") == b"x"
        server_peer_fp, server_remote, server_local = seen.get(timeout=5)
    assert server_peer_fp is None  # no client authentication
    assert server_remote == conn.local_address
    assert server_local == (LOOPBACK, srv.port)
    assert srv.server.server_address == (LOOPBACK, srv.port)


def test_context_managers(server_key: rsa.RSAPrivateKey) -> None:
    with serve(echo, LOOPBACK, 0, key=server_key) as server:
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        with connect(
            LOOPBACK, server.port, server_fingerprint=server.fingerprint, timeout=SOCK_TIMEOUT
        ) as conn:
            assert conn.request(b"ctx") == b"ctx"
        assert conn.closed
        with pytest.raises(LocalProtocolError, match="after close"):
            conn.send(b"after close")  # our own misuse, not the peer's doing
        conn.close()  # idempotent, never raises
    thread.join(5)
    assert not thread.is_alive()
    # the listening socket is gone
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, server.port), timeout=1).close()


@pytest.mark.parametrize(
    "size",
    [0, 1, 65535, 65536, 65537, 1 << 20],
    ids=["0B", "1B", "64KiB-1", "64KiB", "64KiB+1", "1MiB"],
)
def test_message_sizes_round_trip(start: Callable[..., RunningServer], size: int) -> None:
    srv = start(echo)
    message = os.urandom(size)
    with srv.connect() as conn:
        assert conn.request(message) == message
        # and the boundaries hold when several are in flight at once
        conn.send(message)
        conn.send(b"next")
        assert conn.recv() == message
        assert conn.recv() == b"next"


def test_one_thread_sends_while_another_receives(start: Callable[..., RunningServer]) -> None:
    """The documented threading model: a receiver and a sender at once."""
    srv = start(echo)
    n = 300
    sent = [b"%d:" % i + os.urandom(i * 31 % 70_000) for i in range(n)]
    got: List[bytes] = []
    errors: List[BaseException] = []
    with srv.connect() as conn:

        def receive() -> None:
            try:
                for _ in range(n):
                    got.append(conn.recv(timeout=10))
            except BaseException as exc:
                errors.append(exc)

        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        for message in sent:
            conn.send(message)
        reader.join(20)
        assert not reader.is_alive()
    assert errors == []
    assert got == sent


@pytest.mark.timeout(60)
def test_many_clients_at_once(start: Callable[..., RunningServer]) -> None:
    srv = start(echo)
    n_clients, n_requests = 20, 50
    barrier = threading.Barrier(n_clients, timeout=10)
    failures: List[str] = []

    def client(k: int) -> None:
        try:
            with srv.connect() as conn:
                barrier.wait()  # all connected at the same time
                for i in range(n_requests):
                    message = b"client %d request %d " % (k, i) + os.urandom(k * 37)
                    reply = conn.request(message)
                    if reply != message:
                        failures.append(f"client {k} request {i}: bad reply")
                        return
        except Exception as exc:
            failures.append(f"client {k}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert wait_until(lambda: srv.server.active_connections == 0)


# ------------------------------------------------------- server authentication


def test_known_hosts_trust_on_first_use_then_changed_key(
    start: Callable[..., RunningServer],
    tmp_path: Path,
    other_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="callcp")
    known_hosts = tmp_path / "known_hosts"
    first = start(echo)
    port, expected = first.port, first.fingerprint
    with connect(LOOPBACK, port, known_hosts=str(known_hosts), timeout=SOCK_TIMEOUT) as conn:
        assert conn.request(b"tofu") == b"tofu"
    assert known_hosts.read_text().split() == [f"{LOOPBACK}:{port}", expected]
    assert any("permanently added" in r.getMessage() for r in caplog.records)
    # a second connection to the same server is simply "known"
    with connect(LOOPBACK, port, known_hosts=str(known_hosts), timeout=SOCK_TIMEOUT) as conn:
        assert conn.request(b"known") == b"known"

    # the server is replaced by one with another key, on the same host:port
    first.stop()
    impostor_handler = Recorder()
    start(impostor_handler, key=other_key, port=port)
    presented = fingerprint(other_key)
    with pytest.raises(ServerKeyChanged) as info:
        connect(LOOPBACK, port, known_hosts=str(known_hosts), timeout=SOCK_TIMEOUT)
    assert info.value.expected == expected
    assert info.value.presented == presented
    assert expected in str(info.value) and presented in str(info.value)
    assert f"{LOOPBACK}:{port}" in str(info.value)
    # the file is untouched, and the impostor never got a connection
    assert known_hosts.read_text().split() == [f"{LOOPBACK}:{port}", expected]
    assert impostor_handler.calls == 0


def test_pinned_fingerprint(
    start: Callable[..., RunningServer], other_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    srv = start(echo)
    with connect(
        LOOPBACK, srv.port, server_fingerprint=srv.fingerprint, timeout=SOCK_TIMEOUT
    ) as conn:
        assert conn.request(b"pinned") == b"pinned"

    wrong = fingerprint(other_key)
    with pytest.raises(ServerKeyChanged) as info:
        connect(LOOPBACK, srv.port, server_fingerprint=wrong, timeout=SOCK_TIMEOUT)
    assert info.value.expected == wrong
    assert info.value.presented == srv.fingerprint
    assert wrong in str(info.value) and srv.fingerprint in str(info.value)


def test_unknown_host_without_trust_on_first_use(
    start: Callable[..., RunningServer], tmp_path: Path
) -> None:
    srv = start(echo)
    known_hosts = tmp_path / "known_hosts"
    with pytest.raises(UnknownServerKey) as info:
        connect(
            LOOPBACK,
            srv.port,
            known_hosts=str(known_hosts),
            trust_on_first_use=False,
            timeout=SOCK_TIMEOUT,
        )
    assert srv.fingerprint in str(info.value)
    assert not known_hosts.exists() or known_hosts.read_text().strip() == ""


def test_insecure_connects_and_warns_loudly(
    start: Callable[..., RunningServer], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING, logger="callcp")
    srv = start(echo)
    with connect(LOOPBACK, srv.port, insecure=True, timeout=SOCK_TIMEOUT) as conn:
        assert conn.request(b"insecure") == b"insecure"
        assert conn.peer_fingerprint == srv.fingerprint
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "OFF" in r.getMessage() and "insecure" in r.getMessage()
    ]
    assert len(loud) == 1
    assert f"{LOOPBACK}:{srv.port}" in loud[0].getMessage()


# ------------------------------------------------------- client authentication


def test_client_authentication_accepted(
    start: Callable[..., RunningServer], client_key: rsa.RSAPrivateKey
) -> None:
    handler = Recorder()
    srv = start(handler, authorized_keys=[fingerprint(client_key)])
    with srv.connect(client_key=client_key) as conn:
        assert conn.request(b"authed") == b"ok:authed"
    assert handler.peers.get(timeout=5) == fingerprint(client_key)


def test_unlisted_client_never_reaches_the_handler(
    start: Callable[..., RunningServer],
    client_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="callcp")
    handler = Recorder()
    srv = start(handler, authorized_keys=[fingerprint(client_key)])
    conn = srv.connect(client_key=other_key)  # 1-RTT: returns before the verdict
    conn.send(b"let me in")
    with pytest.raises(ClientAuthError) as info:
        conn.recv()
    assert "not authorized" in str(info.value)
    assert fingerprint(other_key) in str(info.value)
    conn.close()
    assert wait_until(lambda: srv.server.active_connections == 0)
    assert handler.calls == 0 and not handler.called.is_set()
    assert handler.seen() == []
    assert any("not authorized" in r.getMessage() for r in caplog.records)


def test_client_without_key_is_told_a_key_is_needed(
    start: Callable[..., RunningServer], client_key: rsa.RSAPrivateKey
) -> None:
    handler = Recorder()
    srv = start(handler, authorized_keys=[fingerprint(client_key)])
    with pytest.raises(ClientAuthError) as info:
        srv.connect()
    assert "client key" in str(info.value)
    assert wait_until(lambda: srv.server.active_connections == 0)
    assert handler.calls == 0


# ------------------------------------------------------------------ limits


def test_max_message_size(start: Callable[..., RunningServer]) -> None:
    handler = Recorder()
    srv = start(handler, max_message_size=100_000)
    with srv.connect() as ok:
        assert ok.request(b"a" * 100_000) == b"ok:" + b"a" * 100_000  # the limit itself
    conn = srv.connect()
    conn.send(b"b" * 100_001)
    with pytest.raises(ConnectionClosedError) as info:
        conn.recv()
    assert info.value.code == CloseCode.MESSAGE_TOO_LARGE
    conn.close()
    assert isinstance(handler.error(), MessageTooLarge)
    # no partial message was handed to the application
    assert [len(m) for m in handler.seen()] == [100_000]
    # and the server is fine
    with srv.connect() as after:
        assert after.request(b"next") == b"ok:next"


def test_max_connections(start: Callable[..., RunningServer]) -> None:
    srv = start(echo, max_connections=2)
    one, two = srv.connect(), srv.connect()
    assert one.request(b"1") == b"1"
    assert two.request(b"2") == b"2"
    with pytest.raises(HandshakeError) as info:
        srv.connect()
    message = str(info.value)
    assert "going away" in message and "too many connections" in message
    assert one.request(b"1 again") == b"1 again"
    assert two.request(b"2 again") == b"2 again"
    one.close()
    # a slot frees up once a connection ends
    assert wait_until(lambda: srv.server.active_connections == 1)
    with srv.connect() as three:
        assert three.request(b"3") == b"3"
    two.close()


# ---------------------------------------------------------------- shutdown


def _slow_handler(started: threading.Event) -> Callable[[Connection], None]:
    def handler(conn: Connection) -> None:
        for message in conn:
            started.set()
            time.sleep(0.5)  # the work; deliberately slower than shutdown()'s start
            conn.send(b"done:" + message)

    return handler


def _shutdown_in_thread(srv: RunningServer) -> threading.Thread:
    t = threading.Thread(target=srv.stop, kwargs={"timeout": 5.0}, daemon=True)
    t.start()
    return t


def test_graceful_shutdown_lets_in_flight_request_finish(
    start: Callable[..., RunningServer],
) -> None:
    started = threading.Event()
    srv = start(_slow_handler(started))
    busy = srv.connect()
    idle = srv.connect()
    assert idle.request(b"warm up", timeout=5) == b"done:warm up"
    started.clear()
    busy.send(b"in flight")
    assert started.wait(5)
    t0 = time.monotonic()
    stopper = _shutdown_in_thread(srv)

    # the idle connection is closed promptly, without waiting for the busy one
    with pytest.raises(ConnectionClosed) as idle_info:
        idle.recv(timeout=5)
    assert time.monotonic() - t0 < 0.45
    assert idle_info.value.code == CloseCode.GOING_AWAY

    assert busy.recv(timeout=5) == b"done:in flight"
    with pytest.raises(ConnectionClosed) as info:
        busy.recv(timeout=5)
    assert info.value.code == CloseCode.GOING_AWAY
    stopper.join(5)
    assert not stopper.is_alive() and not srv.thread.is_alive()  # serve_forever returned
    # nothing is listening any more
    with pytest.raises(TransportError):
        connect(LOOPBACK, srv.port, server_fingerprint=srv.fingerprint, timeout=1)


def test_graceful_shutdown_is_a_clean_close_for_the_client(
    start: Callable[..., RunningServer],
) -> None:
    started = threading.Event()
    srv = start(_slow_handler(started))
    conn = srv.connect()
    conn.send(b"in flight")
    assert started.wait(5)
    stopper = _shutdown_in_thread(srv)
    assert conn.recv(timeout=5) == b"done:in flight"
    try:
        with pytest.raises(ConnectionClosedOK) as info:
            conn.recv(timeout=5)
        assert info.value.code == CloseCode.GOING_AWAY
    finally:
        stopper.join(5)
        conn.close()


def test_serve_forever_after_shutdown_returns(server_key: rsa.RSAPrivateKey) -> None:
    server = serve(echo, LOOPBACK, 0, key=server_key)
    server.shutdown(timeout=1)
    server.serve_forever(poll_interval=0.05)  # must return at once, not raise


# ---------------------------------------------------------------- timeouts


def test_recv_timeout_leaves_connection_usable(start: Callable[..., RunningServer]) -> None:
    gate = threading.Event()

    def handler(conn: Connection) -> None:
        for message in conn:
            if message == b"wait":
                gate.wait(5)  # silent until the client has timed out
            conn.send(b"reply:" + message)

    srv = start(handler)
    with srv.connect() as conn:
        assert conn.request(b"first") == b"reply:first"
        conn.send(b"wait")
        t0 = time.monotonic()
        with pytest.raises(CallcpTimeout):
            conn.recv(timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 1.0
        gate.set()
        assert conn.recv(timeout=5) == b"reply:wait"
        assert conn.request(b"after") == b"reply:after"


def test_recv_none_waits_past_the_connection_timeout(
    start: Callable[..., RunningServer],
) -> None:
    def handler(conn: Connection) -> None:
        for message in conn:
            time.sleep(0.6)
            conn.send(message)

    srv = start(handler)
    with srv.connect(timeout=0.2) as conn:
        conn.send(b"slow")
        assert conn.recv(None) == b"slow"


def test_connect_to_closed_port_fails_fast() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(TransportError) as info:
        connect(LOOPBACK, port, insecure=True, timeout=5)
    assert time.monotonic() - t0 < 1.0
    assert f"{LOOPBACK}:{port}" in str(info.value)
    assert not isinstance(info.value, ConnectionClosed)


def test_client_handshake_timeout_against_a_silent_server() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    listener.settimeout(5)
    accepted: queue.Queue[socket.socket] = queue.Queue()

    def accept() -> None:
        sock, _ = listener.accept()
        accepted.put(sock)  # ...and never speak

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(HandshakeTimeout) as info:
            connect(LOOPBACK, listener.getsockname()[1], insecure=True, timeout=0.5)
        elapsed = time.monotonic() - t0
        assert 0.4 < elapsed < 1.2
        assert str(listener.getsockname()[1]) in str(info.value)
    finally:
        thread.join(5)
        listener.close()
        while not accepted.empty():
            accepted.get().close()


def test_server_idle_timeout_closes_silent_client(start: Callable[..., RunningServer]) -> None:
    srv = start(echo, idle_timeout=0.3)
    with srv.connect() as conn:
        assert conn.request(b"hi") == b"hi"
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            conn.recv(timeout=5)
        assert time.monotonic() - t0 < 2.0
        assert info.value.code == CloseCode.TIMEOUT
