"""One behaviour suite for both adapters: every test runs over callcp.sync
and callcp.aio (``adapter``), and the cheap ones also over a client of one
flavour talking to a server of the other (``mixed``).  The façade and the
server behaviours live in tests/adapters.py; what only one adapter has
(the asyncio Server's shape, serve_forever, the event loop under RSA work,
thousands of connections) stays in tests/test_sync.py and tests/test_aio.py.

Public API only: the engine behind both adapters may change freely.
No sleeps as synchronisation, and no assertion that something was fast:
waits are on events with generous deadlines.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, List

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
from callcp import (
    CallcpTimeout,
    ClientAuthError,
    CloseCode,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    HandshakeAborted,
    HandshakeTimeout,
    KeyPair,
    LocalProtocolError,
    MessageTooLarge,
    ServerKeyChanged,
    ServerKeyRevoked,
    TransportError,
    UnknownServerKey,
    fingerprint,
)
from callcp._core.wire import FrameType, decode_alert
from tests.adapters import (
    LOOPBACK,
    SYNC,
    Adapter,
    Collect,
    Echo,
    Flood,
    Gated,
    Handlers,
    Talker,
)
from tests.helpers import split_frames
from tests.sock_proxy import FrameProxy
from tests.sock_support import free_port, read_until_closed, wait_until

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20


# ================================================================ basics


def test_request_response(mixed: Adapter) -> None:
    handler = Echo(prefix=b"ok:")
    srv = mixed.serve(handler)
    with srv.connect() as conn:
        assert conn.request(b"hello") == b"ok:hello"
        assert conn.request(b"again") == b"ok:again"
        conn.send(b"one")
        assert conn.recv() == b"ok:one"
    assert handler.seen() == [b"hello", b"again", b"one"]


def test_client_iteration_ends_on_the_servers_clean_close(mixed: Adapter) -> None:
    srv = mixed.serve(Talker(3))  # answers three times, then returns
    conn = srv.connect()
    conn.send(b"count")
    assert list(conn) == [b"count 0", b"count 1", b"count 2"]  # ends, does not raise
    with pytest.raises(ConnectionClosedOK) as info:
        conn.recv()
    assert info.value.code == CloseCode.NORMAL
    conn.close()


def test_server_iteration_ends_on_the_clients_clean_close(
    mixed: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="callcp")
    handler = Collect()
    srv = mixed.serve(handler)
    with srv.connect() as conn:
        for i in range(5):
            conn.send(b"client %d" % i)
    assert handler.got.get(timeout=10) == [b"client %d" % i for i in range(5)]
    assert wait_until(lambda: srv.active_connections == 0)
    assert srv.log is not None
    # a clean close is not worth a warning, on either side
    assert srv.log.messages(logging.WARNING) == []
    assert [r.getMessage() for r in caplog.records if r.name.startswith("callcp")] == []


def test_do_handshake_confirm_waits_for_the_server_to_prove_its_key(adapter: Adapter) -> None:
    """``do_handshake(confirm=True)``: one round trip more, and the client
    knows the server holds its key before it sends anything."""
    srv = adapter.serve(Echo())
    with srv.connect() as conn:  # (pinned: connect() returns before the proof)
        assert conn.peer_fingerprint is None
        conn.do_handshake(confirm=True)
        assert conn.peer_fingerprint == srv.fingerprint
        conn.do_handshake(confirm=True)  # (again: nothing to do)
        assert conn.request(b"after") == b"after"


def test_peer_fingerprint_and_addresses(mixed: Adapter, server_key: rsa.RSAPrivateKey) -> None:
    handler = Echo()
    srv = mixed.serve(handler)
    with srv.connect() as conn:
        # connect() returns once the key exchange is sent: the server has
        # not proved it holds its key yet, so it is not the peer's yet
        assert conn.peer_fingerprint is None
        assert srv.fingerprint == KeyPair(server_key).fingerprint
        assert conn.remote_address == (LOOPBACK, srv.port)
        assert conn.request(b"x") == b"x"
        assert conn.peer_fingerprint == srv.fingerprint == fingerprint(server_key)
        server_remote, server_local = handler.addresses.get(timeout=10)
    assert handler.peers.get(timeout=10) is None  # no client authentication
    assert server_remote == conn.local_address
    assert server_local == (LOOPBACK, srv.port)


def test_client_context_manager_closes(adapter: Adapter) -> None:
    srv = adapter.serve(Echo())
    with srv.connect() as conn:
        assert conn.request(b"ctx") == b"ctx"
        assert not conn.closed
    assert conn.closed
    try:
        with pytest.raises(LocalProtocolError, match="after close"):
            conn.send(b"after close")  # our own misuse, not the peer's doing
    finally:
        conn.close()  # idempotent, never raises


@pytest.mark.parametrize(
    "size",
    [0, 1, 65535, 65536, 65537, MIB, 16 * MIB],
    ids=["0B", "1B", "64KiB-1", "64KiB", "64KiB+1", "1MiB", "16MiB"],
)
def test_message_sizes_round_trip(mixed: Adapter, size: int) -> None:
    srv = mixed.serve(Echo(), max_message_size=16 * MIB)
    message = os.urandom(size)
    with srv.connect(max_message_size=16 * MIB, timeout=30) as conn:
        assert conn.request(message) == message
        if size > MIB:
            return  # the largest once is enough
        # the boundaries hold when several are in flight at once, whatever
        # kind of bytes-like object was sent
        conn.send(message)
        conn.send(bytearray(message))
        conn.send(memoryview(message))
        conn.send(b"next")
        assert conn.recv() == message
        assert conn.recv() == message
        assert conn.recv() == message
        assert conn.recv() == b"next"


def test_one_thread_sends_while_another_receives(adapter: Adapter) -> None:
    """The documented model: a receiver and a sender at once (for asyncio, two
    coroutines at once on the loop)."""
    srv = adapter.serve(Echo())
    n = 300
    sent = [b"%d:" % i + os.urandom(i * 31 % 70_000) for i in range(n)]
    got: List[bytes] = []
    errors: List[BaseException] = []
    with srv.connect() as conn:

        def receive() -> None:
            try:
                for _ in range(n):
                    got.append(conn.recv(timeout=20))
            except BaseException as exc:
                errors.append(exc)

        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        for message in sent:
            conn.send(message)
        reader.join(30)
        assert not reader.is_alive()
    assert errors == []
    assert got == sent


def test_many_clients_at_once(adapter: Adapter) -> None:
    srv = adapter.serve(Echo(), max_connections=64, max_handshakes=16)
    n_clients, n_requests = 20, 50
    barrier = threading.Barrier(n_clients, timeout=20)
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
        t.join(40)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert wait_until(lambda: srv.active_connections == 0)


# ================================================== server authentication


def test_known_hosts_trust_on_first_use_then_changed_key(
    adapter: Adapter,
    tmp_path: Path,
    other_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="callcp")
    known_hosts = tmp_path / "known_hosts"
    handler = Echo()
    first = adapter.serve(handler)
    port, expected = first.port, first.fingerprint
    with adapter.connect(port, known_hosts=str(known_hosts)) as conn:
        # first contact: connect() waited for the server's Finished (its proof
        # that it holds the key) and recorded the key then, so a client that
        # only sends and closes records it too
        assert known_hosts.read_text().split() == [f"{LOOPBACK}:{port}", expected]
        assert conn.peer_fingerprint == expected
        assert conn.request(b"tofu") == b"tofu"
    assert known_hosts.read_text().split() == [f"{LOOPBACK}:{port}", expected]
    assert any("permanently added" in r.getMessage() for r in caplog.records)
    # a second connection to the same server is simply "known"
    with adapter.connect(port, known_hosts=known_hosts) as conn:  # a str or a Path
        assert conn.request(b"known") == b"known"
    assert handler.calls == 2

    # the server is replaced by one with another key, on the same host:port
    first.shutdown()
    impostor = Echo()
    adapter.serve(impostor, key=other_key, port=port)
    presented = fingerprint(other_key)
    with pytest.raises(ServerKeyChanged) as info:
        adapter.connect(port, known_hosts=str(known_hosts))
    assert info.value.expected == expected
    assert info.value.presented == presented
    assert expected in str(info.value) and presented in str(info.value)
    assert f"{LOOPBACK}:{port}" in str(info.value)
    # the file is untouched, and the impostor never got a connection
    assert known_hosts.read_text().split() == [f"{LOOPBACK}:{port}", expected]
    assert impostor.calls == 0


def test_known_hosts_entry_for_another_key(
    adapter: Adapter, other_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    handler = Echo()
    srv = adapter.serve(handler)
    wrong = fingerprint(other_key)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"{LOOPBACK}:{srv.port} {wrong}\n")
    with pytest.raises(ServerKeyChanged) as info:
        srv.connect(known_hosts=known_hosts)
    assert info.value.expected == wrong
    assert info.value.presented == srv.fingerprint
    assert known_hosts.read_text() == f"{LOOPBACK}:{srv.port} {wrong}\n"
    assert handler.calls == 0


def test_pinned_fingerprint(adapter: Adapter, other_key: rsa.RSAPrivateKey) -> None:
    handler = Echo()
    srv = adapter.serve(handler)
    with adapter.connect(srv.port, server_fingerprint=srv.fingerprint) as conn:
        assert conn.request(b"pinned") == b"pinned"

    wrong = fingerprint(other_key)
    with pytest.raises(ServerKeyChanged) as info:
        adapter.connect(srv.port, server_fingerprint=wrong)
    assert info.value.expected == wrong
    assert info.value.presented == srv.fingerprint
    assert wrong in str(info.value) and srv.fingerprint in str(info.value)
    assert wait_until(lambda: handler.calls == 1 and srv.active_connections == 0)


def test_unknown_host_without_trust_on_first_use(adapter: Adapter, tmp_path: Path) -> None:
    srv = adapter.serve(Echo())
    known_hosts = tmp_path / "known_hosts"
    with pytest.raises(UnknownServerKey) as info:
        adapter.connect(srv.port, known_hosts=str(known_hosts), trust_on_first_use=False)
    assert srv.fingerprint in str(info.value)
    assert not known_hosts.exists() or known_hosts.read_text().strip() == ""


def test_insecure_connects_and_warns_loudly(
    adapter: Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="callcp")
    srv = adapter.serve(Echo())
    with adapter.connect(srv.port, insecure=True) as conn:
        assert conn.request(b"insecure") == b"insecure"
        assert conn.peer_fingerprint == srv.fingerprint
    loud = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "OFF" in r.getMessage() and "insecure" in r.getMessage()
    ]
    assert len(loud) == 1
    assert f"{LOOPBACK}:{srv.port}" in loud[0].getMessage()


# ================================================== client authentication


@pytest.fixture(params=["fingerprints", "file"])
def authorized(
    request: pytest.FixtureRequest, client_key: rsa.RSAPrivateKey, tmp_path: Path
) -> Any:
    """The server's authorized keys: a list of fingerprints, or a file."""
    client_fp = fingerprint(client_key)
    if request.param == "fingerprints":
        return [client_fp]
    listed = tmp_path / "authorized_keys"
    listed.write_text(f"# the one client\n{client_fp}\n")
    return listed


@pytest.mark.parametrize("key_form", ["rsa", "pem-file"])
def test_client_authentication_accepted(
    adapter: Adapter,
    client_key: rsa.RSAPrivateKey,
    authorized: Any,
    key_form: str,
    tmp_path: Path,
) -> None:
    handler = Echo(prefix=b"ok:")
    srv = adapter.serve(handler, authorized_keys=authorized)
    key: Any = client_key
    if key_form == "pem-file":
        key = tmp_path / "client_key.pem"
        KeyPair(client_key).save(key)
    with srv.connect(client_key=key) as conn:
        assert conn.request(b"authed") == b"ok:authed"
    assert handler.peers.get(timeout=10) == fingerprint(client_key)
    assert handler.calls == 1
    assert handler.seen() == [b"authed"]


def test_unlisted_client_never_reaches_the_handler(
    adapter: Adapter,
    client_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
    authorized: Any,
) -> None:
    handler = Echo(prefix=b"ok:")
    srv = adapter.serve(handler, authorized_keys=authorized)
    conn = srv.connect(client_key=other_key)  # 1-RTT: returns before the verdict
    refusal = None
    try:
        conn.send(b"first flight secret")
    except ClientAuthError as exc:  # (aio) the refusal arrived first: send reports it
        refusal = exc
    except ConnectionClosed:
        pass  # (sync) the server closed first; the refusal is read next
    if refusal is None:
        with pytest.raises(ClientAuthError) as info:
            conn.recv()
        refusal = info.value
    assert "not authorized" in str(refusal)
    assert fingerprint(other_key) in str(refusal)
    conn.close()
    assert wait_until(lambda: srv.active_connections == 0)
    assert handler.calls == 0 and not handler.called.is_set()
    assert handler.seen() == []
    assert srv.log is not None
    assert wait_until(lambda: bool(srv.log.about("not authorized", logging.WARNING)))


def test_client_without_key_is_told_a_key_is_needed(adapter: Adapter, authorized: Any) -> None:
    handler = Echo()
    srv = adapter.serve(handler, authorized_keys=authorized)
    with pytest.raises(ClientAuthError) as info:
        srv.connect()
    assert "client key" in str(info.value)
    assert wait_until(lambda: srv.active_connections == 0)
    assert handler.calls == 0


def test_errors_after_a_failure_keep_the_close_code(
    adapter: Adapter, client_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    srv = adapter.serve(Echo(), authorized_keys=[fingerprint(client_key)])
    bad = srv.connect(client_key=other_key)
    with pytest.raises(ClientAuthError):
        bad.recv(timeout=10)
    with pytest.raises(ConnectionClosedError) as info:
        bad.send(b"again")
    assert info.value.code == CloseCode.UNAUTHORIZED
    with pytest.raises(ConnectionClosedError) as info:
        bad.recv(timeout=10)
    assert info.value.code == CloseCode.UNAUTHORIZED


# ================================================================= limits


def test_max_message_size_refused_and_other_clients_spared(adapter: Adapter) -> None:
    handler = Echo(reply=lambda message: b"ok:%d" % len(message))
    srv = adapter.serve(handler, max_message_size=100_000)
    bystander = srv.connect()
    assert bystander.request(b"x") == b"ok:1"
    offender = srv.connect()
    assert offender.request(b"a" * 100_000) == b"ok:100000"  # the limit itself
    offender.send(b"b" * 100_001)
    with pytest.raises(ConnectionClosedError) as info:
        offender.recv(timeout=10)
    assert info.value.code == CloseCode.MESSAGE_TOO_LARGE
    offender.close()
    assert isinstance(handler.error(), MessageTooLarge)
    # the other client never noticed, and new ones are served
    for i in range(5):
        assert bystander.request(b"b" * i) == b"ok:%d" % i
    with srv.connect() as after:
        assert after.request(b"next") == b"ok:4"
    # no partial message was handed to the application
    assert [len(m) for m in handler.seen()] == [1, 100_000, 0, 1, 2, 3, 4, 4]
    assert srv.log is not None
    assert wait_until(lambda: bool(srv.log.about("max_message_size", logging.WARNING)))
    assert len(srv.log.about("max_message_size", logging.WARNING)) == 1


def test_send_after_the_peer_closed_with_an_error_keeps_its_code(adapter: Adapter) -> None:
    srv = adapter.serve(Echo(), max_message_size=1000)
    offender = srv.connect()
    offender.send(b"z" * 1001)
    with pytest.raises(ConnectionClosedError) as info:
        offender.recv(timeout=10)
    assert info.value.code == CloseCode.MESSAGE_TOO_LARGE
    with pytest.raises(ConnectionClosedError) as info:
        offender.send(b"more")
    assert info.value.code == CloseCode.MESSAGE_TOO_LARGE


def test_client_max_message_size(adapter: Adapter) -> None:
    errors: queue.Queue[BaseException] = queue.Queue()

    def sync(conn: Any) -> None:
        conn.send(b"a" * 101)
        try:
            conn.recv()
        except ConnectionClosed as exc:
            errors.put(exc)

    async def aio(conn: Any) -> None:
        await conn.send(b"a" * 101)
        try:
            await conn.recv()
        except ConnectionClosed as exc:
            errors.put(exc)

    srv = adapter.serve(Handlers(sync, aio))
    conn = srv.connect(max_message_size=100)
    with pytest.raises(MessageTooLarge):
        conn.recv(timeout=10)
    error = errors.get(timeout=10)
    assert isinstance(error, ConnectionClosedError)
    assert error.code == CloseCode.MESSAGE_TOO_LARGE


def test_max_connections_refusal(adapter: Adapter) -> None:
    srv = adapter.serve(Echo(), max_connections=2, max_handshakes=2)
    one, two = srv.connect(), srv.connect()
    assert one.request(b"1") == b"1"
    assert two.request(b"2") == b"2"
    with pytest.raises(HandshakeAborted) as info:  # (refused at accept: an ALERT)
        srv.connect()
    assert info.value.retryable
    assert "going away" in str(info.value) and "unauthenticated" in str(info.value)
    assert info.value.alert_code == CloseCode.GOING_AWAY
    text = info.value.reason
    assert "busy" in text and text not in str(info.value), text
    # today's wording differs between the adapters
    if srv.flavour == SYNC:
        assert "too many connections" in text, text
    else:
        assert "max_connections (2)" in text, text
    assert srv.log is not None
    assert len(srv.log.about("max_connections", logging.WARNING)) == 1
    # the admitted clients go on; a freed slot is reused
    assert one.request(b"1 again") == b"1 again"
    assert two.request(b"2 again") == b"2 again"
    one.close()
    assert wait_until(lambda: srv.active_connections == 1)
    with srv.connect() as three:
        assert three.request(b"3") == b"3"
    two.close()


# =============================================================== shutdown


def test_graceful_shutdown_lets_the_request_in_flight_finish(adapter: Adapter) -> None:
    handler = Gated(trigger=b"slow")
    srv = adapter.serve(handler, shutdown_timeout=20.0)
    port = srv.port
    busy = srv.connect()
    idle = srv.connect()
    assert idle.request(b"warm up") == b"done:warm up"
    busy.send(b"slow")
    assert handler.started.wait(10)
    finished = srv.start_shutdown()

    # the idle connection is closed at once, cleanly, without waiting for
    # the busy one (whose handler is still held at the gate)
    with pytest.raises(ConnectionClosedOK) as idle_info:
        idle.recv(timeout=10)
    assert idle_info.value.code == CloseCode.GOING_AWAY
    assert not handler.gate.is_set()
    # nothing is listening any more
    with pytest.raises(TransportError):
        adapter.connect(port, server_fingerprint=srv.fingerprint, timeout=5)

    # the request in flight is answered, then the connection closes cleanly
    handler.gate.set()
    assert busy.recv(timeout=10) == b"done:slow"
    with pytest.raises(ConnectionClosedOK) as info:
        busy.recv(timeout=10)
    assert info.value.code == CloseCode.GOING_AWAY
    # long before shutdown_timeout ran out (sync: serve_forever returned)
    assert finished(15)


def test_graceful_shutdown_ends_the_clients_iteration(adapter: Adapter) -> None:
    handler = Gated(trigger=b"slow")
    srv = adapter.serve(handler, shutdown_timeout=20.0)
    busy = srv.connect()
    busy.send(b"slow")
    assert handler.started.wait(10)
    finished = srv.start_shutdown()
    handler.gate.set()
    assert list(busy) == [b"done:slow"]  # ends, does not raise
    with pytest.raises(ConnectionClosedOK) as info:
        busy.recv(timeout=10)
    assert info.value.code == CloseCode.GOING_AWAY
    assert finished(15)
    busy.close()


def test_shutdown_is_not_held_up_by_a_stuck_writer(adapter: Adapter) -> None:
    """A handler blocked writing to a peer that never reads must not make the
    shutdown wait for the idle timeout (120 s here)."""
    handler = Flood()
    srv = adapter.serve(handler, idle_timeout=120.0, shutdown_timeout=1.0)
    conn = srv.connect()
    conn.send(b"go")  # completes the handshake on the server; then we never read
    assert handler.started.wait(10)
    # the socket buffers are full: one send has not returned for a while
    assert wait_until(lambda: handler.stuck_for() > 0.2, 20), handler.sent
    assert srv.start_shutdown()(30)
    conn.close()


# =============================================================== timeouts


def test_recv_timeout_leaves_the_connection_usable(adapter: Adapter) -> None:
    handler = Gated(trigger=b"wait")
    srv = adapter.serve(handler)
    with srv.connect() as conn:
        assert conn.request(b"first") == b"done:first"
        conn.send(b"wait")
        assert handler.started.wait(10)
        t0 = time.monotonic()
        with pytest.raises(CallcpTimeout):
            conn.recv(timeout=0.2)
        assert time.monotonic() - t0 >= 0.15
        handler.gate.set()
        assert conn.recv(timeout=10) == b"done:wait"
        assert conn.request(b"after") == b"done:after"


def test_recv_none_waits_past_the_connection_timeout(adapter: Adapter) -> None:
    handler = Gated(trigger=b"slow")
    srv = adapter.serve(handler)
    conn = srv.connect()
    conn.settimeout(0.2)
    got: queue.Queue[Any] = queue.Queue()

    def receive() -> None:
        try:
            got.put(conn.recv(None))
        except BaseException as exc:
            got.put(exc)

    conn.send(b"slow")
    assert handler.started.wait(10)
    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    # three times the connection's timeout: still waiting, no error
    with pytest.raises(queue.Empty):
        got.get(timeout=0.6)
    handler.gate.set()
    assert got.get(timeout=10) == b"done:slow"
    receiver.join(10)
    conn.close()


def test_connect_to_a_closed_port_fails_fast(adapter: Adapter) -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(TransportError) as info:
        adapter.connect(port, insecure=True, timeout=30)
    # refused, not timed out (a generous bound, far below the 30 s timeout)
    assert not isinstance(info.value, (ConnectionClosed, CallcpTimeout))
    assert time.monotonic() - t0 < 10
    assert f"{LOOPBACK}:{port}" in str(info.value)


def test_client_handshake_timeout_against_a_silent_server(adapter: Adapter) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    listener.settimeout(10)
    accepted: queue.Queue[socket.socket] = queue.Queue()

    def accept() -> None:
        sock, _ = listener.accept()
        accepted.put(sock)  # ...and never speak

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    try:
        t0 = time.monotonic()
        with pytest.raises(HandshakeTimeout) as info:
            adapter.connect(port, insecure=True, timeout=0.5)
        assert time.monotonic() - t0 >= 0.4
        assert str(port) in str(info.value)
    finally:
        thread.join(10)
        listener.close()
        while not accepted.empty():
            accepted.get().close()


def test_server_handshake_timeout_drops_a_silent_peer(adapter: Adapter) -> None:
    srv = adapter.serve(Echo(), handshake_timeout=0.5)
    sock = srv.raw()
    host, local_port = sock.getsockname()[:2]
    peer = f"{host}:{local_port}"
    t0 = time.monotonic()
    bystander = srv.connect()
    assert bystander.request(b"hello") == b"hello"
    data = read_until_closed(sock, timeout=20)  # until the server closes
    assert time.monotonic() - t0 >= 0.4
    frames = split_frames(data)
    assert [f[0] for f in frames] == [FrameType.SERVER_HELLO, FrameType.ALERT]
    code, _ = decode_alert(frames[1][5:])
    assert code == CloseCode.TIMEOUT
    assert srv.log is not None
    assert wait_until(lambda: bool(srv.log.about(peer)))
    # the bystander is still served
    for i in range(3):
        assert bystander.request(b"%d" % i) == b"%d" % i
    lines = srv.log.about(peer)
    assert len(lines) == 1, lines
    assert "timed out" in lines[0]
    assert all(r.levelno <= logging.WARNING for r in srv.log.snapshot())


def test_silent_connections_do_not_hold_handshake_slots(adapter: Adapter) -> None:
    """Peers that connect and say nothing cannot starve real clients: with
    more silent peers than handshake slots, a client still gets in long
    before the silent ones time out (its own handshake timeout is shorter
    than theirs)."""
    srv = adapter.serve(Echo(), max_handshakes=4, handshake_timeout=60.0)
    silent = [srv.raw() for _ in range(8)]
    assert wait_until(lambda: srv.active_connections >= 8)  # all accepted
    with srv.connect(timeout=20) as conn:
        assert conn.request(b"hi") == b"hi"
    for sock in silent:
        sock.close()


def test_server_idle_timeout_closes_a_silent_client(adapter: Adapter) -> None:
    idle_timeout = 0.3
    srv = adapter.serve(Echo(), idle_timeout=idle_timeout)
    idle = srv.connect()
    busy = srv.connect()
    assert idle.request(b"once") == b"once"
    closed: queue.Queue[BaseException] = queue.Queue()

    def wait_for_close() -> None:
        try:
            idle.recv(timeout=20)
        except BaseException as exc:
            closed.put(exc)

    t0 = time.monotonic()
    waiter = threading.Thread(target=wait_for_close, daemon=True)
    waiter.start()
    # the busy client talks throughout, for at least three idle timeouts
    n = 0
    while closed.empty() or time.monotonic() - t0 < 3 * idle_timeout:
        assert busy.request(b"%d" % n) == b"%d" % n
        n += 1
        assert time.monotonic() - t0 < 20, "the idle client was never closed"
    error = closed.get()
    assert isinstance(error, ConnectionClosedError), error
    assert error.code == CloseCode.TIMEOUT
    assert busy.request(b"still") == b"still"
    assert srv.log is not None
    assert len(srv.log.about("idle", logging.WARNING)) == 1
    waiter.join(10)


# ============================================================== keepalive


@pytest.mark.parametrize("detector", ["client", "server"])
def test_keepalive_keeps_an_idle_connection_and_finds_a_frozen_peer(
    mixed: Adapter, detector: str
) -> None:
    """Both sides ping when the other is quiet; a peer waiting in recv()
    answers, so an idle connection lives.  Once a proxy stops forwarding
    (the peer is frozen, or the network cut), the side waiting in recv()
    reports ConnectionClosedError("peer unresponsive ...") within
    keepalive_interval + keepalive_timeout (+1 s)."""
    interval, patience = 0.4, 0.8
    frozen = threading.Event()

    def hook(relay: Any, index: int, frame: bytes) -> List[bytes]:
        return [] if frozen.is_set() else [frame]

    # (keepalive on the detecting side only: the other would find the
    # freeze too, and its close would reach the detector first)
    keepalive = {"keepalive_interval": interval, "keepalive_timeout": patience}
    handler = Echo()
    srv = mixed.serve(handler, **(keepalive if detector == "server" else {}))
    with FrameProxy((LOOPBACK, srv.port), c2s=hook, s2c=hook, timeout=30) as proxy:
        conn = mixed.connect(
            proxy.port,
            server_fingerprint=srv.fingerprint,
            **(keepalive if detector == "client" else {}),
        )
        assert conn.request(b"x") == b"x"
        # idle for several intervals: PINGs answered by the side waiting in recv()
        with pytest.raises(CallcpTimeout):
            conn.recv(timeout=5 * interval)
        relay = proxy.relay(0)
        pings = [f for f in relay.c2s_frames + relay.s2c_frames if len(f) == 5 + 16]
        assert len(pings) >= 4  # (sealed PING and PONG: empty bodies, a tag each)
        assert handler.errors.empty()

        frozen.set()
        start = time.monotonic()
        if detector == "client":  # the client waits in recv(); the server is gone quiet
            with pytest.raises(ConnectionClosedError, match="peer unresponsive") as info:
                conn.recv()
            assert info.value.code == CloseCode.TIMEOUT
        else:  # the handler waits in recv(); the client is frozen (it does nothing)
            error = handler.error(timeout=10)
            assert isinstance(error, ConnectionClosedError)
            assert "peer unresponsive" in str(error)
        assert time.monotonic() - start <= interval + patience + 1.0


# ======================================================== server key rotation


def test_server_key_rotation_with_an_announced_next_key(
    adapter: Adapter,
    tmp_path: Path,
    other_key: rsa.RSAPrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A trust-on-first-use client that saw the server announce its next key
    (with proof) accepts the switch without a warning and forgets the old
    key once the new one proved itself; a client that never saw the
    announcement gets the hard CHANGED error."""
    caplog.set_level(logging.INFO, logger="callcp")
    known = tmp_path / "known_hosts"
    port = free_port()
    first = adapter.serve(Echo(), port=port)
    old_fp, new_fp = first.fingerprint, fingerprint(other_key)
    with adapter.connect(port, known_hosts=known) as conn:  # first contact: recorded
        assert conn.request(b"1") == b"1"
    never_saw_it = tmp_path / "known_hosts.copy"
    never_saw_it.write_text(known.read_text())
    first.shutdown()

    announcing = adapter.serve(Echo(), port=port, next_key=KeyPair(other_key))
    caplog.clear()
    with adapter.connect(port, known_hosts=known) as conn:
        assert conn.request(b"2") == b"2"
    lines = [line.split() for line in known.read_text().splitlines()]
    assert lines == [[f"{LOOPBACK}:{port}", old_fp], [f"{LOOPBACK}:{port}", new_fp]]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    announcing.shutdown()

    adapter.serve(Echo(), port=port, key=other_key)  # the switch
    caplog.clear()
    with adapter.connect(port, known_hosts=known) as conn:
        assert conn.request(b"3") == b"3"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert known.read_text().split() == [f"{LOOPBACK}:{port}", new_fp]  # the old key forgotten
    with adapter.connect(port, server_fingerprint=[old_fp, new_fp]) as conn:  # pins, plural
        assert conn.request(b"4") == b"4"
    with pytest.raises(ServerKeyChanged):
        adapter.connect(port, known_hosts=never_saw_it)


def test_a_revoked_key_is_refused_loudly(adapter: Adapter, tmp_path: Path) -> None:
    srv = adapter.serve(Echo())
    known = tmp_path / "known_hosts"
    known.write_text(f"{LOOPBACK}:{srv.port} {srv.fingerprint}\n@revoked * {srv.fingerprint}\n")
    with pytest.raises(ServerKeyRevoked, match="REVOKED SERVER KEY") as info:
        adapter.connect(srv.port, known_hosts=known)
    assert info.value.presented == srv.fingerprint


def test_keepalive_does_not_give_up_on_a_peer_reading_our_long_upload(adapter: Adapter) -> None:
    """One thread sends a large stream to a server that reads it slowly,
    another waits in recv() with keepalive on: our bytes going out, and our
    send queue draining, are signs of life while the PING waits behind
    them, so no false alarm.  (The timeout must still exceed the time the
    peer needs to read what the network buffers hold after our last write.)"""
    import hashlib
    import io

    payload = os.urandom(16 * 1024 * 1024)  # (more than the network buffers hold)

    def slow(done: int, total: Any) -> None:
        time.sleep(0.01)  # about 2.5 s for the whole stream

    def sync_handler(conn: Any) -> None:
        sink = io.BytesIO()
        info = conn.recv_stream(sink, progress=slow)
        conn.send(info.sha256.encode())

    async def aio_handler(conn: Any) -> None:
        sink = io.BytesIO()
        info = await conn.recv_stream(sink, progress=slow)
        await conn.send(info.sha256.encode())

    srv = adapter.serve(Handlers(sync_handler, aio_handler))
    conn = callcp.connect(
        LOOPBACK, srv.port, server_fingerprint=srv.fingerprint,
        keepalive_interval=0.3, keepalive_timeout=1.5, timeout=30,
    )  # fmt: skip
    try:
        sender = threading.Thread(
            target=conn.send_stream, args=(payload,), kwargs={"checksum": True}
        )
        sender.start()
        assert conn.recv(timeout=30) == hashlib.sha256(payload).hexdigest().encode()
        sender.join(10)
    finally:
        conn.close()


def test_a_send_waits_for_another_threads_stream(adapter: Adapter) -> None:
    """Blocking client: a send() from another thread while a stream is
    being sent waits for the stream's end, then goes out (it is neither
    refused nor slipped in between the stream's chunks)."""
    import io

    def sync_handler(conn: Any) -> None:
        info = conn.recv_stream(io.BytesIO())
        conn.send(b"%d then %s" % (info.length, conn.recv()))

    async def aio_handler(conn: Any) -> None:
        info = await conn.recv_stream(io.BytesIO())
        conn_message = await conn.recv()
        await conn.send(b"%d then %s" % (info.length, conn_message))

    srv = adapter.serve(Handlers(sync_handler, aio_handler))
    first_chunk_out, go_on = threading.Event(), threading.Event()

    def source() -> Any:
        yield b"a" * 1000
        first_chunk_out.set()
        assert go_on.wait(10)
        yield b"b" * 1000

    with callcp.connect(LOOPBACK, srv.port, server_fingerprint=srv.fingerprint) as conn:
        streamer = threading.Thread(target=conn.send_stream, args=(source(),))
        streamer.start()
        assert first_chunk_out.wait(10)
        sender = threading.Thread(target=conn.send, args=(b"after",))
        sender.start()
        sender.join(0.3)
        assert sender.is_alive()  # waiting for the stream
        go_on.set()
        streamer.join(10)
        sender.join(10)
        assert conn.recv(timeout=10) == b"2000 then after"


def test_shutdown_grace_lets_a_busy_handler_finish(adapter: Adapter) -> None:
    """shutdown(grace=...): idle connections are closed at once
    (GOING_AWAY); a handler in the middle of a message finishes it."""
    handler = Gated(trigger=b"slow")
    srv = adapter.serve(handler)
    busy, idle = srv.connect(), srv.connect()
    assert idle.request(b"hi") == b"done:hi"
    busy.send(b"slow")
    assert handler.started.wait(10)
    srv.shutdown_timeout = 10.0  # (the grace given to shutdown(grace=...) / wait_closed(grace))
    stopped = srv.start_shutdown()
    with pytest.raises(ConnectionClosedOK) as info:
        idle.recv(timeout=10)  # closed at once, while the busy one works on
    assert info.value.code == CloseCode.GOING_AWAY
    handler.gate.set()
    assert busy.recv(timeout=10) == b"done:slow"  # its message finished
    assert stopped(15)


def test_an_authorized_keys_file_is_followed_without_a_restart(
    adapter: Adapter,
    client_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Edit the server's authorized-keys file: the next handshakes follow it
    (a key added is admitted, a key removed is refused), no restart."""
    monkeypatch.setattr(callcp.AuthorizedKeys, "CHECK_EVERY", 0.0)
    listed = tmp_path / "authorized_keys"
    listed.write_text(f"{fingerprint(client_key)} the first client\n")
    srv = adapter.serve(Echo(), authorized_keys=listed)
    with srv.connect(client_key=client_key) as conn:
        assert conn.request(b"a") == b"a"
    listed.write_text(f"# rotated\n{fingerprint(other_key)} the second client\n")
    with srv.connect(client_key=other_key) as conn:
        assert conn.request(b"b") == b"b"
    refused = srv.connect(client_key=client_key)
    refusal = None
    try:
        refused.send(b"c")
    except ClientAuthError as exc:  # (aio: the refusal arrived first)
        refusal = exc
    except ConnectionClosed:
        pass  # (sync: the server closed first; the refusal is read next)
    if refusal is None:
        with pytest.raises(ClientAuthError) as info:
            refused.recv(timeout=10)
        refusal = info.value
    assert "not authorized" in str(refusal)
    refused.close()


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "a..b", ".leading"])
def test_an_invalid_host_name_is_a_transport_error(adapter: Adapter, host: str) -> None:
    """A host name the IDNA codec refuses (an empty label, one over 63
    characters) is callcp's TransportError, not a bare UnicodeError."""
    with pytest.raises(callcp.TransportError, match="invalid host name"):
        adapter.connect(1, host=host)
