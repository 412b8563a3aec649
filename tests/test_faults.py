"""Fault injection: what an application sees when the network or the peer
fails under a live connection.

Real sockets on 127.0.0.1, the public API only, both adapters (``adapter``:
a client and a server of the same flavour, sync or aio) wherever the case is
about the connection.  The network faults come from tests/fault_proxy.py
(partition, RST now or after n bytes, latency and jitter, a bandwidth cap);
the dead peer is a real server process killed with SIGKILL.

Every case says in its docstring what the application sees, and asserts
it.  Waits are on events, queues or polled conditions with generous
deadlines.  Time is measured only where a bound is the point (keepalive
detection, send timeouts: upper bounds with 2 s of slack) or to show that
an injected delay was real (lower bounds, which a slow machine only makes
safer).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
import callcp.aio
from callcp import (
    CallcpError,
    CallcpTimeout,
    ConnectionClosedError,
    KeyPair,
    TransportError,
)
from tests.adapters import LOOPBACK, Adapter, Behaviour, Echo, Hold, wait_event
from tests.fault_proxy import C2S, S2C, FaultProxy, ProxyStats
from tests.sock_support import free_port, wait_until

pytestmark = pytest.mark.timeout(60)

KIB = 1 << 10
MIB = 1 << 20

#: Keepalive settings of case (a), and the slack allowed on top of their sum.
INTERVAL, KA_TIMEOUT, SLACK = 0.5, 1.0, 2.0
DETECTION_BOUND = INTERVAL + KA_TIMEOUT + SLACK


@pytest.fixture
def proxy_to() -> Iterator[Callable[..., FaultProxy]]:
    """``proxy_to(server, **options)``: a FaultProxy in front of a server
    handle (closed, with an RST to whatever is still open, at teardown)."""
    made: List[FaultProxy] = []

    def make(server: Any, **options: Any) -> FaultProxy:
        proxy = FaultProxy((LOOPBACK, server.port), **options)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
    """Run ``fn`` in a daemon thread; its outcome in a Future."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # (handed to the test)
            future.set_exception(exc)

    threading.Thread(target=run, name=f"test-{fn.__name__}", daemon=True).start()
    return future


def outcome(future: concurrent.futures.Future, timeout: float = 30.0) -> Optional[BaseException]:
    """The exception a background call ended with (None: it returned);
    fails the test if it has not ended within ``timeout`` (a hang)."""
    try:
        return future.exception(timeout)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"the call did not end within {timeout} s (a hang)") from None


def chunks(total: int, size: int = 64 * KIB) -> Iterator[bytes]:
    """``total`` bytes of a stream source, one random block repeated."""
    block = os.urandom(size)
    for _ in range(total // size):
        yield block


# ============================================================ the tool


def _recv_until_reset(sock: socket.socket) -> Tuple[bytes, Optional[OSError]]:
    """Everything ``sock`` receives, and the error that ended it (None: EOF)."""
    got = b""
    while True:
        try:
            data = sock.recv(65536)
        except OSError as exc:
            return got, exc
        if not data:
            return got, None
        got += data


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        data = sock.recv(n - len(got))
        assert data, f"EOF after {got!r}"
        got += data
    return got


def test_the_fault_proxy_itself() -> None:
    """The tool on plain sockets: a partition holds bytes (nothing arrives,
    no FIN, no RST) and heal() delivers them in order; a new target is used
    by later connections; reset_after(n) delivers at most n bytes, then
    both sides get an RST; reset_all() resets both sides of every
    connection; stats() counts what was forwarded."""
    listeners = []
    for _ in range(2):
        listener = socket.create_server((LOOPBACK, 0))
        listener.settimeout(10)
        listeners.append(listener)
    first, second = listeners
    with FaultProxy(first.getsockname()[:2]) as proxy:
        client1 = socket.create_connection(proxy.address, timeout=10)
        server1, _ = first.accept()
        server1.settimeout(10)
        client1.sendall(b"one")
        assert _recv_exactly(server1, 3) == b"one"

        proxy.partition()
        client1.sendall(b"two")
        server1.sendall(b"back")
        server1.settimeout(0.3)
        with pytest.raises(socket.timeout):  # (held: no data, no FIN, no RST)
            server1.recv(10)
        server1.settimeout(10)
        proxy.heal()
        assert _recv_exactly(server1, 3) == b"two"
        assert _recv_exactly(client1, 4) == b"back"

        proxy.target = second.getsockname()[:2]
        client2 = socket.create_connection(proxy.address, timeout=10)
        server2, _ = second.accept()
        server2.settimeout(10)
        assert proxy.wait_connections(2)
        proxy.reset_after(5, C2S)
        client2.sendall(b"0123456789")
        got, error = _recv_until_reset(server2)
        assert b"01234".startswith(got) and isinstance(error, ConnectionResetError), (got, error)
        assert isinstance(_recv_until_reset(client2)[1], ConnectionResetError)

        proxy.reset_all()
        assert isinstance(_recv_until_reset(server1)[1], ConnectionResetError)
        assert isinstance(_recv_until_reset(client1)[1], ConnectionResetError)
        assert proxy.wait_closed()
        assert proxy.stats() == ProxyStats(c2s=3 + 3 + 5, s2c=4, connections=2, active=0, resets=2)
    for sock in (client1, server1, client2, server2, *listeners):
        sock.close()


# ====================================================== (a) partition


@pytest.mark.parametrize("op", ["recv", "request"])
def test_partition_is_detected_by_the_clients_keepalive(
    adapter: Adapter, proxy_to: Callable[..., FaultProxy], op: str
) -> None:
    """(a, client side) The network silently stops delivering anything
    (no FIN, no RST) under an idle connection whose client has
    keepalive_interval=0.5, keepalive_timeout=1.0.  The client's next
    ``recv()`` (or ``request()``) PINGs the server, hears nothing, and
    raises ``ConnectionClosedError`` ("peer unresponsive ...") after the
    keepalive timeout and within interval + timeout + 2 s; the connection
    is then closed."""
    srv = adapter.serve(Echo())
    proxy = proxy_to(srv)
    conn = adapter.connect(
        proxy.port,
        server_fingerprint=srv.fingerprint,
        keepalive_interval=INTERVAL,
        keepalive_timeout=KA_TIMEOUT,
        timeout=10.0,
    )
    assert conn.request(b"before") == b"before"
    proxy.partition()
    start = time.monotonic()
    with pytest.raises(callcp.PeerUnresponsive, match="unresponsive"):
        if op == "recv":
            conn.recv()
        else:
            conn.request(b"into the void")
    elapsed = time.monotonic() - start
    assert KA_TIMEOUT <= elapsed <= DETECTION_BOUND, elapsed
    assert conn.closed


def test_partition_is_detected_by_the_servers_keepalive(
    adapter: Adapter, proxy_to: Callable[..., FaultProxy]
) -> None:
    """(a, server side) A server with keepalive_interval=0.5,
    keepalive_timeout=1.0 and a client waiting in ``recv()`` (so it answers
    PINGs).  While the network works, PINGs and PONGs cross the proxy and
    nothing fails; once it is partitioned, the handler's ``recv()`` raises
    ``ConnectionClosedError`` ("peer unresponsive ...") within
    interval + timeout + 2 s."""
    handler = Echo()
    srv = adapter.serve(handler, keepalive_interval=INTERVAL, keepalive_timeout=KA_TIMEOUT)
    proxy = proxy_to(srv)
    conn = adapter.connect(proxy.port, server_fingerprint=srv.fingerprint, timeout=30.0)
    assert conn.request(b"before") == b"before"
    waiting = in_thread(conn.recv)  # the client waits for a message, answering PINGs
    base = proxy.stats()
    # a PING went to the client and its PONG came back through the proxy
    assert wait_until(lambda: proxy.stats().s2c > base.s2c and proxy.stats().c2s > base.c2s)
    assert handler.errors.empty()
    proxy.partition()
    start = time.monotonic()
    err = handler.errors.get(timeout=DETECTION_BOUND + 10)
    elapsed = time.monotonic() - start
    assert isinstance(err, callcp.PeerUnresponsive), repr(err)
    assert "unresponsive" in str(err)
    assert 0.5 <= elapsed <= DETECTION_BOUND, elapsed
    assert handler.seen() == [b"before"]
    proxy.reset_all()  # (the client, cut off, learns it from the RST)
    assert isinstance(outcome(waiting), TransportError)


# ================================================ (b) RST mid-message


def test_reset_in_the_middle_of_a_message(
    adapter: Adapter, proxy_to: Callable[..., FaultProxy]
) -> None:
    """(b) The connection is reset (RST both ways) after ~300 KiB of a
    1 MiB message from the client.  The client's ``request()`` raises a
    callcp ``TransportError`` (a ``ConnectionClosedError``: reset), never a
    bare OSError; the server's ``recv()`` raises ``ConnectionClosedError``
    and never hands over a partial message."""
    handler = Echo()
    srv = adapter.serve(handler)
    proxy = proxy_to(srv)
    conn = adapter.connect(proxy.port, server_fingerprint=srv.fingerprint)
    assert conn.request(b"before") == b"before"
    proxy.reset_after(300 * KIB, C2S)
    with pytest.raises(TransportError) as info:
        conn.request(os.urandom(MIB))
    assert isinstance(info.value, callcp.ConnectionLost), repr(info.value)
    assert conn.closed
    err = handler.error(timeout=10)
    assert isinstance(err, ConnectionClosedError), repr(err)
    assert handler.seen() == [b"before"]  # nothing of the cut message
    stats = proxy.stats()
    assert stats.resets == 1 and stats.c2s < MIB  # (it was cut in the middle)


# ================================================= (c) RST mid-stream


@pytest.mark.parametrize("direction", [C2S, S2C], ids=["client-sends", "server-sends"])
def test_reset_in_the_middle_of_a_stream(
    adapter: Adapter, proxy_to: Callable[..., FaultProxy], tmp_path: Path, direction: str
) -> None:
    """(c) A 64 MiB ``send_stream`` is reset (RST both ways) after ~1 MiB.
    The sender's ``send_stream`` raises a callcp ``TransportError``; the
    receiver's ``recv_stream(path)`` raises ``ConnectionClosedError``,
    never reports the stream complete, and leaves neither ``path`` nor
    ``path.part`` behind."""
    srv = adapter.serve(Hold())
    proxy = proxy_to(srv)
    client, server_side = srv.pair(proxy.port)
    sender, receiver = (client, server_side) if direction == C2S else (server_side, client)
    # a round trip first, so the cut counts stream bytes only
    sender.send(b"ready")
    assert receiver.recv() == b"ready"
    proxy.reset_after(MIB, direction)
    dest = tmp_path / "incoming.bin"
    sending = in_thread(sender.send_stream, chunks(64 * MIB), name="big")
    with pytest.raises(ConnectionClosedError):
        receiver.recv_stream(dest)
    err = outcome(sending)
    assert isinstance(err, TransportError), repr(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no file, no .part
    stats = proxy.stats()
    assert stats.resets == 1
    assert (stats.c2s if direction == C2S else stats.s2c) < 8 * MIB


# ============================================ (d) latency and bandwidth


def test_latency_jitter_and_a_bandwidth_cap(
    adapter: Adapter, proxy_to: Callable[..., FaultProxy]
) -> None:
    """(d) 50 ms ± 20 ms of latency per chunk and 2 MB/s each way: the
    handshake, requests and pipelined messages all succeed, every message
    arrives intact (the server's SHA-256 of what it got matches) and in
    order; the delays are real (a round trip takes >= 60 ms, 1 MiB each way
    takes >= 0.5 s)."""

    def digest_and_echo(message: bytes) -> bytes:
        return hashlib.sha256(message).digest() + message

    srv = adapter.serve(Echo(reply=digest_and_echo))
    proxy = proxy_to(srv)
    proxy.set_latency(0.050, 0.020)
    proxy.set_bandwidth(2_000_000)
    conn = adapter.connect(proxy.port, server_fingerprint=srv.fingerprint, timeout=20.0)

    start = time.monotonic()
    assert conn.request(b"ping") == digest_and_echo(b"ping")
    assert time.monotonic() - start >= 0.060  # >= 30 ms each way

    # pipelined: a thread sends ~1 MiB in 64 messages, the test reads the replies
    rng = random.Random(1234)
    messages = [rng.randbytes(rng.randrange(0, 32 * KIB)) for _ in range(64)]
    sending = in_thread(lambda: [conn.send(m) for m in messages])
    replies = [conn.recv() for _ in messages]
    assert outcome(sending) is None
    assert len(replies) == len(messages)
    for i, (message, reply) in enumerate(zip(messages, replies)):
        assert reply[:32] == hashlib.sha256(message).digest(), f"message {i} corrupted or late"
        assert reply[32:] == message

    big = os.urandom(MIB)
    start = time.monotonic()
    assert conn.request(big) == digest_and_echo(big)
    assert time.monotonic() - start >= 0.5  # (2 MB/s: ~0.5 s each way at least)
    stats = proxy.stats()
    assert stats.c2s > 2 * MIB and stats.s2c > 2 * MIB and stats.resets == 0


# ========================================== (e) server killed, restarted

SERVER_SCRIPT = """
import os, sys, threading
import callcp

key, port = sys.argv[1], int(sys.argv[2])
pid = os.getpid()

def handler(conn):
    for message in conn:
        if message == b"hang":
            print("hang", flush=True)
            threading.Event().wait()
        conn.send(b"%d:%s" % (pid, message))

server = callcp.serve(handler, "127.0.0.1", port, key=key)
print("ready", server.port, server.fingerprint, flush=True)
server.serve_forever()
"""


class ServerProcess:
    """``SERVER_SCRIPT`` in a subprocess: an echo that prefixes its pid, and
    answers b"hang" never (printing "hang" when it gets it)."""

    def __init__(self, tmp_path: Path, key: Path, port: int) -> None:
        script = tmp_path / "server.py"
        script.write_text(textwrap.dedent(SERVER_SCRIPT))
        self.stderr_path = tmp_path / f"server-{time.monotonic_ns()}.log"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in kill()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(key), str(port)],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="test-server-stdout", daemon=True)
        self._reader.start()
        words = self.expect("ready").split()
        assert int(words[1]) == port
        self.fingerprint = words[2]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.decode("utf-8", "replace"))

    def expect(self, word: str, timeout: float = 30.0) -> str:
        """The server's next line, which must start with ``word``."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the server did not say {word!r}: {self.log()}") from None
        assert line.startswith(word), (line, self.log())
        return line

    def log(self) -> str:
        return self.stderr_path.read_text("utf-8", "replace")

    def kill(self) -> None:
        """SIGKILL, and wait until the process (and its sockets) are gone."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(10)  # (it ends at the end of the pipe)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._stderr.close()


class OnePort:
    """Server processes started one after another on one fixed port, with
    one key file (``start()``); all killed at teardown."""

    def __init__(self, tmp_path: Path, server_key: rsa.RSAPrivateKey) -> None:
        self.tmp_path = tmp_path
        self.key = tmp_path / "server_key.pem"
        KeyPair(server_key).save(self.key)
        self.port = free_port()  # (bound to 0 then released: free now)
        self.started: List[ServerProcess] = []

    def start(self) -> ServerProcess:
        self.started.append(ServerProcess(self.tmp_path, self.key, self.port))
        return self.started[-1]

    def kill_all(self) -> None:
        for proc in self.started:
            proc.kill()


@pytest.fixture
def one_port(tmp_path: Path, server_key: rsa.RSAPrivateKey) -> Iterator[OnePort]:
    servers = OnePort(tmp_path, server_key)
    yield servers
    servers.kill_all()


def _assert_refused(exc: BaseException) -> None:
    assert isinstance(exc, callcp.ConnectionRefused), repr(exc)
    assert isinstance(exc.__cause__, ConnectionRefusedError), repr(exc.__cause__)


def test_server_killed_and_restarted_sync(one_port: OnePort, tmp_path: Path) -> None:
    """(e, blocking) The server process is SIGKILLed, then restarted on the
    same port with the same key file.  A request in flight and the next
    request on an idle connection raise ``TransportError``
    (``ConnectionClosedError``); connecting while it is down raises
    ``TransportError`` caused by ``ConnectionRefusedError`` (also through
    the pool); after the restart ``callcp.Pool`` serves requests again,
    from the new process, with the key trusted through the known-hosts
    file, and without being told anything."""
    port = one_port.port
    options: Any = {"known_hosts": str(tmp_path / "known_hosts"), "timeout": 10.0}
    first = one_port.start()
    with callcp.Pool(LOOPBACK, port, size=2, **options) as pool:
        assert pool.request(b"a") == b"%d:a" % first.pid  # (first contact: key recorded)
        idle = callcp.connect(LOOPBACK, port, **options)
        busy = callcp.connect(LOOPBACK, port, **options)
        assert idle.request(b"x") == b"%d:x" % first.pid
        busy.send(b"hang")
        first.expect("hang")  # the server is working on it

        first.kill()
        with pytest.raises(TransportError) as in_flight:
            busy.recv()
        with pytest.raises(TransportError) as next_request:
            idle.request(b"y")
        assert isinstance(in_flight.value, callcp.ConnectionLost), repr(in_flight.value)
        assert isinstance(next_request.value, callcp.ConnectionLost), repr(next_request.value)
        with pytest.raises(TransportError) as down:
            callcp.connect(LOOPBACK, port, **options)
        _assert_refused(down.value)
        with pytest.raises(TransportError) as pool_down:
            pool.request(b"while down")
        _assert_refused(pool_down.value)

        second = one_port.start()
        assert second.fingerprint == first.fingerprint
        assert pool.request(b"b") == b"%d:b" % second.pid
        assert pool.request(b"c") == b"%d:c" % second.pid
        assert pool.stats().in_use == 0


def test_server_killed_and_restarted_aio(one_port: OnePort, tmp_path: Path) -> None:
    """(e, asyncio) The same with ``callcp.aio.connect`` and
    ``callcp.aio.Pool``: the request in flight and the next request raise
    ``TransportError`` (``ConnectionClosedError``), connecting while the
    server is down raises ``TransportError`` caused by
    ``ConnectionRefusedError``, and the pool recovers after the restart."""
    port = one_port.port
    options: Any = {"known_hosts": str(tmp_path / "known_hosts"), "timeout": 10.0}

    async def main() -> None:
        first = await asyncio.to_thread(one_port.start)
        pool = callcp.aio.Pool(LOOPBACK, port, size=2, **options)
        try:
            assert await pool.request(b"a") == b"%d:a" % first.pid
            idle = await callcp.aio.connect(LOOPBACK, port, **options)
            busy = await callcp.aio.connect(LOOPBACK, port, **options)
            assert await idle.request(b"x") == b"%d:x" % first.pid
            await busy.send(b"hang")
            await asyncio.to_thread(first.expect, "hang")

            await asyncio.to_thread(first.kill)
            with pytest.raises(TransportError) as in_flight:
                await busy.recv()
            with pytest.raises(TransportError) as next_request:
                await idle.request(b"y")
            assert isinstance(in_flight.value, callcp.ConnectionLost), repr(in_flight.value)
            assert isinstance(next_request.value, callcp.ConnectionLost), repr(next_request.value)
            with pytest.raises(TransportError) as down:
                await callcp.aio.connect(LOOPBACK, port, **options)
            _assert_refused(down.value)
            with pytest.raises(TransportError) as pool_down:
                await pool.request(b"while down")
            _assert_refused(pool_down.value)

            second = await asyncio.to_thread(one_port.start)
            assert second.fingerprint == first.fingerprint
            assert await pool.request(b"b") == b"%d:b" % second.pid
            assert await pool.request(b"c") == b"%d:c" % second.pid
            await idle.close()
            await busy.close()
        finally:
            await pool.close()

    asyncio.run(main())


# ========================================== (f) a server that stops reading


class StopsReading(Behaviour):
    """The first connection's handler never reads (it waits for ``gate``);
    every later connection is an echo."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.gate = threading.Event()
        self._lock = threading.Lock()
        self._first = True

    def _is_first(self) -> bool:
        with self._lock:
            first, self._first = self._first, False
            return first

    def sync(self, conn: callcp.sync.Connection) -> None:
        if self._is_first():
            self.started.set()
            self.gate.wait(60)
            return
        for message in conn:
            conn.send(message)

    async def aio(self, conn: callcp.aio.Connection) -> None:
        if self._is_first():
            self.started.set()
            await wait_event(self.gate, 60)
            return
        async for message in conn:
            await conn.send(message)

    def release(self) -> None:
        self.gate.set()


def test_a_server_that_stops_reading(adapter: Adapter) -> None:
    """(f) The server's handler never reads while the client (timeout=1)
    sends 1 MiB messages.  Once the buffers between them are full the
    client's ``send()`` blocks, then raises ``CallcpTimeout`` once its 1 s
    timeout has passed (within timeout + 2 s): no hang (64 MiB is far more
    than the buffers hold).  The connection is then closed, and the same
    server still serves a second client."""
    handler = StopsReading()
    srv = adapter.serve(handler)
    conn = srv.connect(timeout=1.0)
    block = os.urandom(MIB)

    def flood() -> Tuple[int, float]:
        for sent in range(64):
            began = time.monotonic()
            try:
                conn.send(block)
            except CallcpTimeout:
                return sent, time.monotonic() - began
        raise AssertionError("64 MiB went out to a server that never reads")

    assert handler.started.wait(10)
    flooding = in_thread(flood)
    try:
        sent, stuck = flooding.result(timeout=30)
    except concurrent.futures.TimeoutError:
        raise AssertionError("send() hung past its 1 s timeout") from None
    assert sent < 64
    assert 0.9 <= stuck <= 1.0 + SLACK, stuck  # (the last send waited for its timeout)
    with pytest.raises(CallcpError):  # the connection is closed after the timeout
        conn.send(b"more")

    with srv.connect() as other:
        assert other.request(b"still served") == b"still served"


def test_a_send_starved_by_a_slow_network_times_out(
    adapter: Adapter, proxy_to: Callable[..., FaultProxy]
) -> None:
    """(f, a trickle instead of a stop) The network takes only 300 kB/s
    from the client; the client (timeout=1) sends a 14 MiB message, far
    more than the buffers on the way hold.  ``send()`` raises
    ``CallcpTimeout`` within timeout + 2 s, as it does when the peer stops
    reading altogether, and as ``recv()`` does for a message that trickles
    in: the timeout bounds the whole blocking operation, rather than each
    wait for buffer space (the send would then block for tens of seconds)."""
    srv = adapter.serve(Echo())
    # (a small proxy: it holds at most a few KiB itself)
    proxy = proxy_to(srv, chunk_size=1024, queue_chunks=4)
    conn = adapter.connect(proxy.port, server_fingerprint=srv.fingerprint, timeout=1.0)
    assert conn.request(b"before") == b"before"
    proxy.set_bandwidth(300_000, C2S)
    message = os.urandom(14 * MIB)
    start = time.monotonic()
    sending = in_thread(conn.send, message)
    concurrent.futures.wait([sending], timeout=1.0 + SLACK)
    if not sending.done():
        pytest.fail(
            f"send() with timeout=1 still blocked after {time.monotonic() - start:.1f} s "
            f"({proxy.stats().c2s} bytes forwarded so far)"
        )
    err = sending.exception()
    assert isinstance(err, CallcpTimeout), repr(err)
    assert time.monotonic() - start >= 0.9
