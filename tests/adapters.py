"""One blocking façade over both callcp adapters, so that a behaviour suite
is written once and runs over ``callcp.sync`` and ``callcp.aio`` (and mixed:
a client of one flavour talking to a server of the other).

Only the public API is used: ``connect``/``serve`` of each flavour, the
Connection's methods and properties, the Server's methods.

* :class:`Adapter` makes servers and clients of a given server flavour and
  client flavour.  A blocking server runs ``serve_forever`` in a thread; an
  asyncio server and asyncio clients live on an event loop that runs in a
  background thread (:class:`LoopThread`), and every call on them is
  forwarded with ``asyncio.run_coroutine_threadsafe(...).result()``.
* A server's handler is a :class:`Behaviour`: a small object with a
  ``sync(conn)`` and an ``aio(conn)`` form of the same few lines (echo,
  record, talk, collect, hold until released, answer after a gate opens,
  flood).  Their state is thread-safe (queues, ``threading.Event``) so the
  test reads it the same way for both flavours.
* :class:`AioConn` wraps an asyncio Connection in the blocking shape of a
  ``callcp.sync.Connection`` (send/recv/request/close, iteration, context
  manager, streams, peer_fingerprint, addresses); a blocking Connection is
  used as it is.

The two adapters' default limits differ today (max_connections,
max_handshakes), so :meth:`Adapter.serve` always passes explicit values
(``SERVER_DEFAULTS``), the same for both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import socket
import threading
import time
import uuid
from typing import Any, Awaitable, Callable, Coroutine, Dict, Iterator, List, Optional, TypeVar

import callcp.aio
import callcp.sync
from callcp import CallcpError

LOOPBACK = "127.0.0.1"
SYNC, AIO = "sync", "aio"
FLAVOURS = [SYNC, AIO]
#: (client flavour, server flavour) pairs and their test ids.
PAIRS = {
    "sync": (SYNC, SYNC),
    "aio": (AIO, AIO),
    "sync-client-aio-server": (SYNC, AIO),
    "aio-client-sync-server": (AIO, SYNC),
}
#: Generous bound on any single forwarded call (pytest-timeout is the real guard).
CALL_TIMEOUT = 60.0
#: Explicit server options for both flavours (their defaults differ).
SERVER_DEFAULTS: Dict[str, Any] = {
    "max_connections": 64,
    "max_handshakes": 16,
    "handshake_timeout": 10.0,
    "idle_timeout": 120.0,
}
#: A client's default timeout for every blocking operation.
CLIENT_TIMEOUT = 10.0
#: How long a behaviour waits for a gate the test holds (a generous bound).
GATE_TIMEOUT = 30.0

T = TypeVar("T")


async def wait_event(event: threading.Event, timeout: float = GATE_TIMEOUT) -> bool:
    """Wait on a ``threading.Event`` from a coroutine without blocking the
    loop (polled: a thread blocked in ``Event.wait`` could not be cancelled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not event.is_set():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.005)
    return True


# ------------------------------------------------------------------ logging


class ListHandler(logging.Handler):
    """Keeps every record (thread-safe)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []
        self._records_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._records_lock:
            self.records.append(record)

    def snapshot(self, min_level: int = logging.DEBUG) -> List[logging.LogRecord]:
        with self._records_lock:
            return [r for r in self.records if r.levelno >= min_level]

    def messages(self, min_level: int = logging.DEBUG) -> List[str]:
        return [r.getMessage() for r in self.snapshot(min_level)]

    def about(self, needle: str, min_level: int = logging.DEBUG) -> List[str]:
        return [m for m in self.messages(min_level) if needle in m]


def fresh_logger() -> tuple:
    """(logger, handler): a new child of ``callcp`` that records everything."""
    logger = logging.getLogger(f"callcp.test.{uuid.uuid4().hex[:12]}")
    logger.setLevel(logging.DEBUG)
    handler = ListHandler()
    logger.addHandler(handler)
    return logger, handler


# ------------------------------------------------------------ the event loop


class LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="test-aio-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: Optional[float] = CALL_TIMEOUT) -> T:
        """Run ``coro`` on the loop and wait for its result (its exception
        is re-raised as it is)."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():  # the coroutine's own TimeoutError (e.g. CallcpTimeout)
                raise
            future.cancel()
            raise AssertionError(f"{coro!r} did not finish within {timeout} s") from None
        except BaseException:
            future.cancel()
            raise

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call a plain function on the loop's thread."""

        async def call() -> T:
            return fn(*args)

        return self.call(call())

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        if self._thread.is_alive():
            try:
                self.call(cancel_the_rest(), timeout=10)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


# ---------------------------------------------------------------- behaviours


class Behaviour:
    """A server handler written once, in both forms."""

    def sync(self, conn: callcp.sync.Connection) -> None:
        raise NotImplementedError

    async def aio(self, conn: callcp.aio.Connection) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Let every handler still running return (called at teardown)."""


class Handlers(Behaviour):
    """Both forms given by the test, for behaviours that really differ."""

    def __init__(
        self,
        sync: Callable[[callcp.sync.Connection], Any],
        aio: Callable[[callcp.aio.Connection], Awaitable[Any]],
    ) -> None:
        self._sync, self._aio = sync, aio

    def sync(self, conn: callcp.sync.Connection) -> None:
        self._sync(conn)

    async def aio(self, conn: callcp.aio.Connection) -> None:
        await self._aio(conn)


class Echo(Behaviour):
    """Answers every message with ``reply(message)`` (default: ``prefix +
    message``) and records what it saw: ``calls``, ``peers`` (the client's
    fingerprint), ``addresses`` ((remote, local) as the server sees them),
    ``messages`` delivered to the handler, callcp ``errors`` (re-raised, so
    the server logs them)."""

    def __init__(
        self, prefix: bytes = b"", reply: Optional[Callable[[bytes], bytes]] = None
    ) -> None:
        self.reply = reply or (lambda message: prefix + message)
        self.messages: queue.Queue[bytes] = queue.Queue()
        self.errors: queue.Queue[BaseException] = queue.Queue()
        self.peers: queue.Queue[Optional[str]] = queue.Queue()
        self.addresses: queue.Queue[tuple] = queue.Queue()
        self.called = threading.Event()
        self._lock = threading.Lock()
        self.calls = 0

    def _start(self, conn: Any) -> None:
        with self._lock:
            self.calls += 1
        self.peers.put(conn.peer_fingerprint)
        self.addresses.put((conn.remote_address, conn.local_address))
        self.called.set()

    def sync(self, conn: callcp.sync.Connection) -> None:
        self._start(conn)
        try:
            for message in conn:
                self.messages.put(message)
                conn.send(self.reply(message))
        except CallcpError as exc:
            self.errors.put(exc)
            raise

    async def aio(self, conn: callcp.aio.Connection) -> None:
        self._start(conn)
        try:
            async for message in conn:
                self.messages.put(message)
                await conn.send(self.reply(message))
        except CallcpError as exc:
            self.errors.put(exc)
            raise

    def seen(self) -> List[bytes]:
        return list(self.messages.queue)

    def error(self, timeout: float = 10.0) -> BaseException:
        return self.errors.get(timeout=timeout)


class Talker(Behaviour):
    """Receives one message, answers it ``n`` times (``message + b" %d"``),
    then returns: the server closes the connection cleanly."""

    def __init__(self, n: int = 3) -> None:
        self.n = n

    def sync(self, conn: callcp.sync.Connection) -> None:
        first = conn.recv()
        for i in range(self.n):
            conn.send(first + b" %d" % i)

    async def aio(self, conn: callcp.aio.Connection) -> None:
        first = await conn.recv()
        for i in range(self.n):
            await conn.send(first + b" %d" % i)


class Resumed(Echo):
    """An echo that records, per connection, whether it was resumed (the
    client's session ticket spared the RSA key exchange)."""

    def __init__(self) -> None:
        super().__init__(reply=lambda message: message)
        self.resumed: List[bool] = []

    def _start(self, conn: Any) -> None:
        super()._start(conn)
        self.resumed.append(conn.resumed)


class Collect(Behaviour):
    """Iterates until the client closes, then hands over the list."""

    def __init__(self) -> None:
        self.got: queue.Queue[List[bytes]] = queue.Queue()

    def sync(self, conn: callcp.sync.Connection) -> None:
        self.got.put(list(conn))

    async def aio(self, conn: callcp.aio.Connection) -> None:
        self.got.put([message async for message in conn])


class Gated(Behaviour):
    """Answers ``b"done:" + message``; a message equal to ``trigger`` is
    answered only once the test opens ``gate`` (``started`` is set when
    such a message arrives): "work in progress" without sleeping."""

    def __init__(self, trigger: bytes = b"slow") -> None:
        self.trigger = trigger
        self.started = threading.Event()
        self.gate = threading.Event()

    def sync(self, conn: callcp.sync.Connection) -> None:
        for message in conn:
            if message == self.trigger:
                self.started.set()
                self.gate.wait(GATE_TIMEOUT)
            conn.send(b"done:" + message)

    async def aio(self, conn: callcp.aio.Connection) -> None:
        async for message in conn:
            if message == self.trigger:
                self.started.set()
                await wait_event(self.gate)
            await conn.send(b"done:" + message)

    def release(self) -> None:
        self.gate.set()


class Hold(Behaviour):
    """Hands each server-side connection to the test (:meth:`accept`, in the
    blocking shape) and keeps it open until released."""

    def __init__(self) -> None:
        self.conns: queue.Queue[Any] = queue.Queue()
        self.released = threading.Event()
        self.loop: Optional[LoopThread] = None  # set by the adapter

    def sync(self, conn: callcp.sync.Connection) -> None:
        self.conns.put(conn)
        self.released.wait(120)

    async def aio(self, conn: callcp.aio.Connection) -> None:
        assert self.loop is not None
        self.conns.put(AioConn(conn, self.loop))
        await wait_event(self.released, 120)

    def accept(self, timeout: float = 10.0) -> Any:
        return self.conns.get(timeout=timeout)

    def release(self) -> None:
        self.released.set()


class Flood(Behaviour):
    """Sends 64 KiB messages forever to a client that never reads; records
    when the send in progress started (``None`` between sends), so the test
    can tell when the handler is stuck in a send."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.sent = 0
        self.send_began: Optional[float] = None

    def stuck_for(self) -> float:
        began = self.send_began
        return 0.0 if began is None else time.monotonic() - began

    def sync(self, conn: callcp.sync.Connection) -> None:
        self.started.set()
        block = b"z" * 65536
        while True:
            self.send_began = time.monotonic()
            conn.send(block)
            self.send_began = None
            self.sent += len(block)

    async def aio(self, conn: callcp.aio.Connection) -> None:
        self.started.set()
        block = b"z" * 65536
        while True:
            self.send_began = time.monotonic()
            await conn.send(block)
            self.send_began = None
            self.sent += len(block)


# ------------------------------------------------------------- connections


class AioConn:
    """An asyncio Connection in the blocking shape of ``callcp.sync.Connection``."""

    flavour = AIO

    def __init__(self, conn: callcp.aio.Connection, loop: LoopThread) -> None:
        self.raw = conn
        self._loop = loop

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.call(coro)

    # properties
    @property
    def peer_fingerprint(self) -> Optional[str]:
        return self.raw.peer_fingerprint

    @property
    def remote_address(self) -> tuple:
        return self.raw.remote_address

    @property
    def local_address(self) -> tuple:
        return self.raw.local_address

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def settimeout(self, timeout: Optional[float]) -> None:
        self._loop.run(self.raw.settimeout, timeout)

    def do_handshake(self, *args: Any, **kwargs: Any) -> None:
        self._call(self.raw.do_handshake(*args, **kwargs))

    # messages
    def send(self, message: Any) -> None:
        self._call(self.raw.send(message))

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        return self._call(self.raw.recv(*args, **kwargs))

    def request(self, *args: Any, **kwargs: Any) -> bytes:
        return self._call(self.raw.request(*args, **kwargs))

    def __iter__(self) -> Iterator[bytes]:
        """Drives ``async for`` (not a loop of recv() calls)."""
        iterator = self.raw.__aiter__()
        while True:
            try:
                yield self._call(iterator.__anext__())
            except StopAsyncIteration:
                return

    # streams
    def send_stream(self, source: Any, **kwargs: Any) -> Any:
        return self._call(self.raw.send_stream(source, **kwargs))

    def recv_stream(self, dest: Any, **kwargs: Any) -> Any:
        return self._call(self.raw.recv_stream(dest, **kwargs))

    # closing
    def close(self, *args: Any, **kwargs: Any) -> None:
        self._call(self.raw.close(*args, **kwargs))

    def __enter__(self) -> AioConn:
        self._call(self.raw.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self.raw.__aexit__(*exc))

    def __repr__(self) -> str:
        return f"<AioConn {self.raw!r}>"


# ----------------------------------------------------------------- servers


class ServerHandle:
    """A running server of either flavour, driven from the test's thread."""

    def __init__(
        self,
        adapter: Adapter,
        flavour: str,
        behaviour: Behaviour,
        *,
        port: int,
        shutdown_timeout: float,
        options: Dict[str, Any],
    ) -> None:
        self.adapter = adapter
        self.flavour = flavour
        self.behaviour = behaviour
        self.shutdown_timeout = shutdown_timeout
        if "logger" in options:
            self.log: Optional[ListHandler] = None
        else:
            self._logger, self.log = fresh_logger()
            options["logger"] = self._logger
        self._stopping: Optional[Callable[[float], bool]] = None
        if flavour == SYNC:
            self.server: Any = callcp.sync.serve(behaviour.sync, LOOPBACK, port, **options)
            self._thread = threading.Thread(
                target=self.server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"test-serve-forever-{self.server.port}",
                daemon=True,
            )
            self._thread.start()
        else:
            loop = adapter.loop
            if isinstance(behaviour, Hold):
                behaviour.loop = loop
            self.server = loop.call(
                callcp.aio.serve(
                    behaviour.aio,
                    LOOPBACK,
                    port,
                    shutdown_timeout=shutdown_timeout,
                    **options,
                )
            )
        self.port: int = self.server.port
        self.fingerprint: str = self.server.fingerprint

    @property
    def active_connections(self) -> int:
        return int(self.server.active_connections)

    def connect(self, **options: Any) -> Any:
        """A client (of the adapter's client flavour) pinned to this server's
        key unless ``known_hosts``/``insecure``/``server_fingerprint`` is given."""
        if not options.get("insecure") and "known_hosts" not in options:
            options.setdefault("server_fingerprint", self.fingerprint)
        return self.adapter.connect(self.port, **options)

    def pair(self, port: Optional[int] = None, **options: Any) -> tuple:
        """(client, server side) of a new connection to a :class:`Hold` server
        (``port``: through a proxy in front of it)."""
        assert isinstance(self.behaviour, Hold)
        options.setdefault("server_fingerprint", self.fingerprint)
        client = self.adapter.connect(port or self.port, **options)
        return client, self.behaviour.accept()

    def raw(self) -> socket.socket:
        """A plain TCP socket connected to the server."""
        sock = socket.create_connection((LOOPBACK, self.port), timeout=10)
        self.adapter._sockets.append(sock)
        return sock

    def start_shutdown(self) -> Callable[[float], bool]:
        """Begin a graceful shutdown in the background (sync: ``shutdown()``
        in a thread; aio: ``close()`` now, ``wait_closed()`` as a task).
        Returns ``wait(timeout) -> bool``: True once the shutdown is over
        (and, for sync, ``serve_forever`` returned)."""
        if self._stopping is not None:
            return self._stopping
        if self.flavour == SYNC:

            def stop() -> None:
                self.server.shutdown(grace=self.shutdown_timeout)

            stopper = threading.Thread(target=stop, name="test-shutdown", daemon=True)
            stopper.start()

            def wait_sync(timeout: float) -> bool:
                deadline = time.monotonic() + timeout
                stopper.join(timeout)
                self._thread.join(max(0.0, deadline - time.monotonic()))
                return not stopper.is_alive() and not self._thread.is_alive()

            self._stopping = wait_sync
        else:
            loop = self.adapter.loop
            loop.run(self.server.close)
            closing = loop.submit(self.server.wait_closed(self.shutdown_timeout))

            def wait_aio(timeout: float) -> bool:
                try:
                    closing.result(timeout)
                except concurrent.futures.TimeoutError:
                    if not closing.done():
                        return False
                    raise
                return True

            self._stopping = wait_aio
        return self._stopping

    def shutdown(self, timeout: float = 20.0) -> None:
        """Graceful shutdown, waited for (idempotent)."""
        assert self.start_shutdown()(timeout), f"the {self.flavour} server did not stop"

    def close(self) -> None:
        self.behaviour.release()
        try:
            self.shutdown()
        finally:
            if self.log is not None:
                self._logger.removeHandler(self.log)


# ----------------------------------------------------------------- adapter


class Adapter:
    """Makes servers of ``server`` flavour and clients of ``client`` flavour;
    closes everything it made at :meth:`close`."""

    def __init__(self, client: str, server: str, key: Any) -> None:
        assert client in FLAVOURS and server in FLAVOURS
        self.client_flavour = client
        self.server_flavour = server
        self.key = key
        self._loop: Optional[LoopThread] = None
        self._servers: List[ServerHandle] = []
        self._clients: List[Any] = []
        self._sockets: List[socket.socket] = []

    @property
    def flavour(self) -> str:
        """ "sync" or "aio" when both sides are of that flavour, else "mixed"."""
        return self.client_flavour if self.client_flavour == self.server_flavour else "mixed"

    @property
    def loop(self) -> LoopThread:
        if self._loop is None:
            self._loop = LoopThread()
        return self._loop

    def serve(
        self,
        behaviour: Behaviour,
        *,
        port: int = 0,
        shutdown_timeout: float = 5.0,
        **options: Any,
    ) -> ServerHandle:
        """A running server on 127.0.0.1 (``port`` 0: a free one) with this
        adapter's key unless ``key`` is given; limits and timeouts default to
        ``SERVER_DEFAULTS``.  Its log lines go to ``handle.log`` unless a
        ``logger`` is given."""
        options.setdefault("key", self.key)
        for name, value in SERVER_DEFAULTS.items():
            options.setdefault(name, value)
        handle = ServerHandle(
            self,
            self.server_flavour,
            behaviour,
            port=port,
            shutdown_timeout=shutdown_timeout,
            options=options,
        )
        self._servers.append(handle)
        return handle

    def hold(self, **options: Any) -> ServerHandle:
        """A server that hands each connection to the test (``.pair()``)."""
        return self.serve(Hold(), **options)

    def connect(self, port: int, host: str = LOOPBACK, **options: Any) -> Any:
        """A client of this adapter's client flavour (blocking shape)."""
        options.setdefault("timeout", CLIENT_TIMEOUT)
        if self.client_flavour == SYNC:
            conn: Any = callcp.sync.connect(host, port, **options)
        else:
            conn = AioConn(self.loop.call(callcp.aio.connect(host, port, **options)), self.loop)
        self._clients.append(conn)
        return conn

    def close(self) -> None:
        errors: List[str] = []
        for server in self._servers:
            server.behaviour.release()
        for conn in self._clients:
            try:
                conn.close()
            except Exception as exc:  # close never raises; say so if it does
                errors.append(f"{conn!r}.close() raised {exc!r}")
        for sock in self._sockets:
            sock.close()
        for server in self._servers:
            try:
                server.close()
            except Exception as exc:
                errors.append(f"stopping the {server.flavour} server: {exc!r}")
        if self._loop is not None:
            self._loop.close()
        assert not errors, errors
