"""Support for the blocking real-socket tests (test_server_robustness,
test_attacks_sockets, test_sync_internals): servers run in background
threads on 127.0.0.1:0, a "bystander" client that must keep being served
while other peers misbehave (the ``arena`` fixture), the attack ``target``
behind a frame proxy (``make_proxy``), and polling helpers with deadlines
(never bare sleeps as synchronisation)."""

from __future__ import annotations

import logging
import queue
import re
import socket
import threading
import time
from typing import Any, Callable, Iterator, List, Optional

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from callcp._core.errors import CallcpError
from callcp.sync import Connection, Server, connect, serve
from tests.sock_proxy import FrameProxy

LOOPBACK = "127.0.0.1"
#: Every raw socket a test opens gets this timeout.
SOCK_TIMEOUT = 5.0


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


class RunningServer:
    """A callcp Server on 127.0.0.1:0 whose serve_forever runs in a thread."""

    def __init__(
        self, handler: Callable[[Connection], Any], key: Any, port: int = 0, **options: Any
    ) -> None:
        self.server: Server = serve(handler, LOOPBACK, port, key=key, **options)
        self.port: int = self.server.port  # Server.port raises once the server is shut down
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"test-serve-forever-{self.server.port}",
            daemon=True,
        )
        self.thread.start()
        # (Connecting before serve_forever runs is fine: the socket listens
        # already; shutting down first makes serve_forever return at once.)
        self._stopped = False

    @property
    def fingerprint(self) -> str:
        return self.server.fingerprint

    def connect(self, **kwargs: Any) -> Connection:
        """A client pinned to this server's key (unless told otherwise)."""
        kwargs.setdefault("timeout", SOCK_TIMEOUT)
        if not kwargs.get("insecure") and "known_hosts" not in kwargs:
            kwargs.setdefault("server_fingerprint", self.fingerprint)
        return connect(LOOPBACK, self.port, **kwargs)

    def raw(self) -> socket.socket:
        """A plain TCP socket connected to the server."""
        return socket.create_connection((LOOPBACK, self.port), timeout=SOCK_TIMEOUT)

    def stop(self, timeout: float = 2.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.server.shutdown(timeout=timeout)
        self.thread.join(5.0)
        assert not self.thread.is_alive(), "serve_forever did not return"


class Recorder:
    """An echo handler (``b"ok:" + message``) that records everything it saw.

    ``messages`` holds every message delivered to application code, ``errors``
    every callcp error the handler's connection raised (re-raised so the
    server logs it), ``calls`` counts handler invocations.
    """

    def __init__(self, prefix: bytes = b"ok:") -> None:
        self.prefix = prefix
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.errors: queue.Queue[BaseException] = queue.Queue()
        self.peers: queue.Queue[Optional[str]] = queue.Queue()
        self.called = threading.Event()
        self._lock = threading.Lock()
        self.calls = 0

    def __call__(self, conn: Connection) -> None:
        with self._lock:
            self.calls += 1
        self.peers.put(conn.peer_fingerprint)
        self.called.set()
        try:
            for message in conn:
                self.messages.put(message)
                conn.send(self.prefix + message)
        except CallcpError as exc:
            self.errors.put(exc)
            raise

    def seen(self) -> List[bytes]:
        return list(self.messages.queue)

    def error(self, timeout: float = 5.0) -> BaseException:
        return self.errors.get(timeout=timeout)


def echo(conn: Connection) -> None:
    for message in conn:
        conn.send(message)


class Bystander:
    """A well-behaved client doing request/response in a loop in a thread;
    it must never notice what other peers do to the server."""

    def __init__(self, server: RunningServer) -> None:
        self.conn = server.connect()
        self.errors: List[str] = []
        self._count = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)
        self._thread.start()
        assert self.wait_for_more(3), "the bystander never got going"

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                message = b"bystander %d " % i + bytes(i % 251)
                reply = self.conn.request(message, timeout=SOCK_TIMEOUT)
                if reply != message:
                    self.errors.append(f"request {i}: wrong reply {reply[:40]!r}")
                    return
                i += 1
                with self._cond:
                    self._count = i
                    self._cond.notify_all()
        except Exception as exc:  # recorded, asserted by the test
            self.errors.append(f"request {i}: {type(exc).__name__}: {exc}")
        finally:
            with self._cond:
                self._cond.notify_all()

    @property
    def count(self) -> int:
        with self._cond:
            return self._count

    def wait_for_more(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until ``n`` more requests than now have succeeded."""
        with self._cond:
            target = self._count + n
            return (
                self._cond.wait_for(
                    lambda: self._count >= target or bool(self.errors), timeout=timeout
                )
                and not self.errors
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(SOCK_TIMEOUT + 1)
        self.conn.close()
        assert not self._thread.is_alive()


def peer_pattern(port: int) -> re.Pattern[str]:
    """Matches the server's ``127.0.0.1:PORT`` rendering of one peer."""
    return re.compile(rf"127\.0\.0\.1:{port}(?!\d)")


def records_about(records: List[logging.LogRecord], port: int) -> List[logging.LogRecord]:
    pattern = peer_pattern(port)
    return [r for r in list(records) if pattern.search(r.getMessage())]


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until the peer closes (b"" or reset); fail if that has not
    happened within ``timeout`` seconds (a generous bound, not a speed
    check).  Returns what was read."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the server did not close the connection within {timeout} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return bytes(got)
        except socket.timeout:
            continue
        if not chunk:
            return bytes(got)
        got += chunk


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise AssertionError(f"peer closed after {len(got)} of {n} bytes")
        got += chunk
    return bytes(got)


def recv_frame(sock: socket.socket) -> bytes:
    """One whole frame (type u8 | length u32 | body) from a raw socket."""
    header = recv_exactly(sock, 5)
    length = int.from_bytes(header[1:], "big")
    return header + recv_exactly(sock, length)


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
    return port


def send_ignoring_close(sock: socket.socket, data: bytes) -> None:
    """Write what the server accepts; it may well close the connection first."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


# ------------------------------------------------------- the arena fixture

#: The arena server's handshake timeout (short: silent peers are dropped soon).
HANDSHAKE_TIMEOUT = 0.5


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
        assert wait_until(lambda: self.srv.server.active_connections == 1, 10.0), (
            f"{self.srv.server.active_connections} connections still open"
        )

    def one_line_about(self, port: int, *expected: str) -> str:
        """The single WARNING-or-worse log line about the peer at ``port``."""
        assert wait_until(lambda: records_about(self.caplog.records, port), 10.0), (
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


# ----------------------------------------- the attack target and its proxy

REQUEST = b"transfer 100 to alice"


def handshake_failure_logged(log: pytest.LogCaptureFixture) -> bool:
    return any(
        "handshake with" in r.getMessage() and "failed" in r.getMessage() for r in log.records
    )


class Target:
    """The real server, with a handler that records what reached the application."""

    def __init__(self, key: rsa.RSAPrivateKey, handler: Any = None, **options: Any) -> None:
        self.rec = Recorder()
        self.srv = RunningServer(handler or self.rec, key=key, **options)

    @property
    def address(self) -> tuple:
        return (LOOPBACK, self.srv.port)

    @property
    def fingerprint(self) -> str:
        return self.srv.fingerprint


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="callcp")
    return caplog


@pytest.fixture
def target(server_key: rsa.RSAPrivateKey, log: pytest.LogCaptureFixture) -> Iterator[Target]:
    t = Target(server_key)
    yield t
    t.srv.stop()


@pytest.fixture
def make_proxy(target: Target) -> Iterator[Callable[..., FrameProxy]]:
    proxies: List[FrameProxy] = []

    def make(**hooks: Any) -> FrameProxy:
        p = FrameProxy(target.address, **hooks)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()
        assert p.errors == [], p.errors  # no hook blew up


def via(proxy: FrameProxy, target: Target, **kwargs: Any) -> Connection:
    """A client that believes the proxy is the server (pinned to the real key)."""
    kwargs.setdefault("timeout", SOCK_TIMEOUT)
    if "known_hosts" not in kwargs:
        kwargs.setdefault("server_fingerprint", target.fingerprint)
    return connect(LOOPBACK, proxy.port, **kwargs)


def refuse_next_key_exchange(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Make the servers' key-exchange queue refuse the next hello ("full"),
    as a busy server's would; append to the returned list to refuse one more."""
    import callcp._engine

    real_submit = callcp._engine.HandshakeQueue.submit
    full = [1]

    def submit(self: Any, ticket: Any) -> Optional[str]:
        if full:
            full.pop()
            return "the handshake queue is full (test)"
        return real_submit(self, ticket)

    monkeypatch.setattr(callcp._engine.HandshakeQueue, "submit", submit)
    return full
