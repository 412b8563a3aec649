"""The asyncio adapter: the same sans-I/O core behind ``asyncio.Protocol``.

Like :mod:`callcp.sync`, this module only moves bytes.  Each TCP connection
is a :class:`_Link` (an ``asyncio.Protocol``): ``data_received`` feeds the
core and queues what it reports; :class:`Connection` awaits those events.
Application events are buffered up to a bound, past which the link pauses
reading (TCP back-pressure does the rest).  The server's RSA decryption runs
inside ``data_received``: it holds the event loop for one RSA operation.

Usage::

    async def handler(conn):
        async for message in conn:
            await conn.send(message)

    async with await callcp.aio.serve(handler, "127.0.0.1", 8436) as server:
        await server.serve_forever()

    conn = await callcp.aio.connect("127.0.0.1", 8436)
    reply = await conn.request(b"hello")
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections import deque
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Deque,
    List,
    Optional,
    Set,
    Tuple,
    Union,
)

from ._common import (
    DEFAULT_PORT,
    AuthorizedSource,
    KeySource,
    PathLike,
    check_port,
    client_authorizer,
    client_protocol,
    load_server_key,
    logger_for,
)
from ._common import (
    translate_oserror as _translate,
)
from ._core.errors import (
    CallcpError,
    CallcpTimeout,
    CloseCode,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    HandshakeTimeout,
    LocalProtocolError,
    MessagePending,
    StreamPending,
)
from ._core.events import (
    NEED_DATA,
    CloseReceived,
    DecryptionRequested,
    HandshakeCompleted,
    MessageReceived,
    ServerKeyAccepted,
    StreamStarted,
)
from ._core.protocol import DEFAULT_MAX_MESSAGE_SIZE, ServerProtocol, _Protocol
from ._core.wire import alert_frame
from ._streams import (
    Destination,
    Progress,
    StreamInfo,
    StreamReception,
    iter_chunks,
    source_size,
)
from ._workers import WorkerPool, check_workers, reserve_port

__all__ = ["Connection", "Server", "connect", "serve"]

DEFAULT_TIMEOUT = 30.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_CONNECTIONS = 10000
DEFAULT_MAX_HANDSHAKES = 16
#: Received-but-unread bytes past which a link stops reading the socket.
PAUSE_READING_AT = 1 << 20
#: What a queued event costs beyond its payload (objects, queue slot), so
#: that a flood of tiny or empty messages also reaches the pause point.
EVENT_COST = 128
#: Unparsed received bytes past which a link stops reading (room for a
#: whole record and a read beyond it).
MAX_UNPARSED = 256 << 10
#: Waits at least this long (seconds) use the link's shared, lazily re-armed timer.
COARSE_TIMEOUT = 1.0
RESUME_READING_AT = 256 << 10

Address = Tuple[Any, ...]
Buffer = Union[bytes, bytearray, memoryview]
AsyncSource = Union[Any, AsyncIterable[Buffer]]


class _Default:
    __slots__ = ()


DEFAULT: Any = _Default()


class _Link(asyncio.Protocol):
    """One TCP connection: moves bytes between the transport and the core."""

    def __init__(
        self,
        core: _Protocol,
        loop: asyncio.AbstractEventLoop,
        decryptions: Optional[_Decryptions] = None,
    ) -> None:
        self.core = core
        self.loop = loop
        self._decryptions = decryptions
        self.transport: Optional[asyncio.Transport] = None
        self.events: Deque[Any] = deque()
        self.buffered = 0
        self.error: Optional[BaseException] = None
        self.error_reported = False
        self.handshake: asyncio.Future[Any] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._waiter: Optional[asyncio.Future[None]] = None
        self._drain_waiters: List[asyncio.Future[None]] = []
        self._paused_reading = False
        self._paused_writing = False
        self._decrypting = False  # a premaster decryption runs in a worker thread
        self._deadline: Optional[float] = None  # of the current long wait
        self._deadline_timer: Optional[asyncio.TimerHandle] = None
        self._lost: Optional[Tuple[Optional[Exception]]] = None  # connection_lost, deferred

    # ------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if isinstance(self.core, ServerProtocol):
            self.core.start()
            self.flush()

    def data_received(self, data: bytes) -> None:
        self.core.receive_data(data)
        self.pump()
        # Bytes the core holds unparsed (normally less than one record; more
        # while a ClientHello waits for its decryption): bounded too.
        if self.core.buffered > MAX_UNPARSED:
            self._pause()

    def eof_received(self) -> bool:
        self.core.receive_data(b"")
        self.pump()
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._decrypting:
            # The peer's whole flight (and maybe its close) may be buffered
            # behind the ClientHello: finish reading it first (_decrypted).
            self._lost = (exc,)
            return
        if self.error is None:
            if exc is not None:
                self.error = _translate(exc, "receiving") if isinstance(exc, OSError) else exc
            else:
                self.error = self.core.closed_error()
        self._fail_handshake(self.error)
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # --------------------------------------------------------------- moving

    def pump(self) -> None:
        """Drain the core's events into the queue; act on handshake and close."""
        if self._decrypting:
            return  # resumed by _decrypted()
        core = self.core
        try:
            while True:
                event = core.next_event()
                if event is NEED_DATA:
                    break
                if type(event) is MessageReceived:  # the common case first
                    self.events.append(event)
                    self.buffered += len(event.data) + EVENT_COST
                elif isinstance(event, DecryptionRequested):
                    # The RSA work runs in a worker thread (cryptography drops
                    # the GIL): the loop is never held by it, and handshakes
                    # use every core.
                    self._decrypting = True
                    assert self._decryptions is not None
                    self._decryptions.submit(self, event)
                    break
                elif isinstance(event, (ServerKeyAccepted, HandshakeCompleted)):
                    if not self.handshake.done():
                        self.handshake.set_result(event)
                elif isinstance(event, CloseReceived):
                    self.error = core.closed_error()
                    self.flush()
                    self.close_transport()
                    break
                else:
                    self.events.append(event)
                    self.buffered += _cost(event)
                if core.needs_data:
                    break  # (saves asking the core for an event it cannot have)
        except CallcpError as exc:
            self.error = exc
            self._fail_handshake(exc)
            self.flush()
            self.close_transport()
        else:
            self.flush()
            if self.buffered >= PAUSE_READING_AT:
                self._pause()
        self._wake()

    def _pause(self) -> None:
        if not self._paused_reading:
            self._paused_reading = True
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if (
            self._paused_reading
            and self.buffered <= RESUME_READING_AT
            and not self._decrypting
            and self.core.buffered <= MAX_UNPARSED
        ):
            self._paused_reading = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def decrypted(self, premaster: Optional[bytes]) -> None:
        """The premaster's decryption finished (None: it failed)."""
        self._decrypting = False
        if self.error is None:  # else it failed meanwhile (handshake timeout)
            assert isinstance(self.core, ServerProtocol)
            try:
                self.core.premaster_decrypted(premaster)
            except CallcpError as exc:
                self.error = exc
                self._fail_handshake(exc)
                self.flush()
                self.close_transport()
            else:
                self.pump()
                self._maybe_resume()
        if self._lost is not None:
            self.connection_lost(*self._lost)

    def take(self) -> Any:
        """The next queued application event (caller checked there is one)."""
        event = self.events.popleft()
        self.buffered -= _cost(event)
        self._maybe_resume()
        return event

    def untake(self, event: Any) -> None:
        """Put back an event taken by mistake (it stays first in line)."""
        self.events.appendleft(event)
        self.buffered += _cost(event)

    def flush(self) -> None:
        out = self.core.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    async def drain(self) -> None:
        if self._paused_writing and self.transport is not None:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def wait_event(self, timeout: Optional[float]) -> None:
        """Wait until an event is queued or the link failed (raises CallcpTimeout)."""
        if self.events or self.error is not None:
            return
        # One future per wait, and no task (asyncio.wait_for would wrap the
        # wait in one: several times the cost of a small message).  Long
        # timeouts (an idle timeout, typically) share one lazily re-armed
        # timer per link instead of a new timer per message.
        loop = self.loop
        deadline = None if timeout is None else loop.time() + timeout
        while not self.events and self.error is None:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiter = waiter
            timer = None
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self._waiter = None
                    raise CallcpTimeout("timed out while receiving")
                if remaining >= COARSE_TIMEOUT:
                    self._deadline = deadline
                    shared = self._deadline_timer
                    if shared is None or shared.when() > deadline:
                        if shared is not None:
                            shared.cancel()
                        self._deadline_timer = loop.call_at(deadline, self._check_deadline)
                else:
                    timer = loop.call_later(remaining, _expire, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                self._deadline = None
                if timer is not None:
                    timer.cancel()

    def _check_deadline(self) -> None:
        """The shared timer fired: expire the current wait if its deadline has
        passed, else re-arm for it."""
        self._deadline_timer = None
        deadline, waiter = self._deadline, self._waiter
        if deadline is None or waiter is None or waiter.done():
            return
        if self.loop.time() >= deadline:
            _expire(waiter)
        else:
            self._deadline_timer = self.loop.call_at(deadline, self._check_deadline)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail_handshake(self, exc: BaseException) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)


class _Decryptions:
    """Runs the servers' RSA decryptions in worker threads, at most ``limit``
    at once; the rest wait their turn in order (bounded by max_connections
    and each link's handshake timeout).  cryptography releases the GIL for
    them, so they use every core and never hold the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0
        self.waiting: Deque[Tuple[_Link, DecryptionRequested]] = deque()

    def submit(self, link: _Link, request: DecryptionRequested) -> None:
        if self.running < self.limit:
            self._start(link, request)
        else:
            self.waiting.append((link, request))

    def _start(self, link: _Link, request: DecryptionRequested) -> None:
        self.running += 1
        job = link.loop.run_in_executor(None, request.run)

        def done(job: asyncio.Future[Optional[bytes]]) -> None:
            self.running -= 1
            result = None if job.cancelled() or job.exception() else job.result()
            link.decrypted(result)
            while self.waiting and self.running < self.limit:
                nxt, req = self.waiting.popleft()
                if nxt.error is not None:  # gave up while waiting
                    nxt.decrypted(None)
                else:
                    self._start(nxt, req)

        job.add_done_callback(done)


class Connection:
    """One callcp/2 connection for asyncio; the same methods as
    :class:`callcp.sync.Connection`, awaited."""

    def __init__(self, link: _Link, *, timeout: Optional[float]) -> None:
        self._link = link
        self._core = link.core
        self._timeout = timeout
        self._send_lock = asyncio.Lock()
        self._recv_lock = asyncio.Lock()
        self._stopping = False  # the server is shutting down
        transport = link.transport
        assert transport is not None
        peer = transport.get_extra_info("peername")
        self.remote_address: Address = tuple(peer) if peer else ()
        local = transport.get_extra_info("sockname")
        self.local_address: Address = tuple(local) if local else ()

    @property
    def peer_fingerprint(self) -> Optional[str]:
        """The peer's key fingerprint (the server's on a client; the
        client's on a server with client authentication, else None)."""
        return self._core.peer_fingerprint

    @property
    def closed(self) -> bool:
        return self._link.closed.done() or self._link.error is not None

    def settimeout(self, timeout: Optional[float]) -> None:
        self._timeout = timeout

    # -------------------------------------------------------------- sending

    def _check_open(self) -> None:
        link = self._link
        if link.error is not None and not link.error_reported:
            link.error_reported = True  # the first time, the error itself
            raise link.error
        if link.error is not None or link.transport is None or link.transport.is_closing():
            raise self._closed_error()

    def _closed_error(self) -> ConnectionClosed:
        err = self._link.error
        if isinstance(err, ConnectionClosed):
            return err
        if err is None:
            return ConnectionClosedOK("the connection was closed locally", code=CloseCode.NORMAL)
        return ConnectionClosedError(
            f"the connection failed: {err}", code=getattr(err, "code", None), reason=str(err)
        )

    async def send(self, message: Buffer) -> None:
        """Send one message.

        Raises:
            ConnectionClosed: the connection is closed or failed.
            LocalProtocolError: a stream is being sent on this connection.
        """
        if not self._send_lock.locked():
            # Fast path: nothing awaits between these steps, so no other
            # sender (e.g. a stream, which holds the lock) can interleave.
            link = self._link
            self._check_open()
            self._core.send(message)
            link.flush()
            if link._paused_writing:
                await link.drain()
            return
        async with self._send_lock:
            self._check_open()
            self._core.send(message)
            self._link.flush()
            await self._link.drain()

    async def send_stream(
        self,
        source: AsyncSource,
        *,
        size: Optional[int] = None,
        name: str = "",
        progress: Optional[Progress] = None,
        checksum: bool = False,
    ) -> StreamInfo:
        """Send a payload of any size as one stream (see
        :meth:`callcp.sync.Connection.send_stream`); ``source`` may also be an
        async iterable of bytes-like chunks.  Waits for the transport to
        drain between chunks, so memory stays bounded."""
        if size is None:
            size = source_size(source)
        core, link = self._core, self._link
        async with self._send_lock:
            self._check_open()
            core.start_stream(size, name, checksum=checksum)
            link.flush()
            done = 0
            try:
                async for chunk in _achunks(source):
                    self._check_open()
                    core.send_stream_data(chunk)
                    link.flush()
                    await link.drain()
                    done += len(chunk)
                    if progress is not None:
                        progress(done, size)
            except BaseException as exc:
                # Whatever stopped us (the source, the progress callback, a
                # cancellation), the peer must not be left inside the stream.
                if core.sending_stream and core.can_send:
                    core.abort_stream(f"the sender failed ({type(exc).__name__})")
                    link.flush()
                raise
            self._check_open()
            length, digest = core.end_stream()
            link.flush()
            await link.drain()
        return StreamInfo(length, digest.hex() if digest is not None else None, name)

    # ------------------------------------------------------------ receiving

    async def _next_app_event(self, timeout: Optional[float]) -> Any:
        link = self._link
        if not link.events and self._stopping:
            await self._stop_now()
        await link.wait_event(timeout)
        if link.events:
            return link.take()
        assert link.error is not None
        if not link.error_reported:  # the first time, the error itself
            link.error_reported = True
            raise link.error
        raise self._closed_error()

    async def recv(self, timeout: Any = DEFAULT) -> bytes:
        """Receive the next whole message (``timeout`` as in the blocking API).

        Raises: as :meth:`callcp.sync.Connection.recv`.
        """
        link = self._link
        t = self._timeout if isinstance(timeout, _Default) else timeout
        if not self._recv_lock.locked() and not self._stopping:
            # Fast path, without the lock: nobody else is receiving, and only
            # the one await below happens before we take the message.
            if not link.events and link.error is None:
                await link.wait_event(t)
            if link.events and not self._recv_lock.locked():
                event = link.events[0]
                if type(event) is MessageReceived:
                    link.take()
                    return event.data
        async with self._recv_lock:
            event = await self._next_app_event(t)
            if isinstance(event, MessageReceived):
                return event.data
            self._link.untake(event)
            raise StreamPending(
                "a stream arrived, not a message: receive it with recv_stream()",
                name=event.name,
                size=event.size,
            )

    async def request(self, message: Buffer, timeout: Any = DEFAULT) -> bytes:
        """Send one message and return the next message received."""
        await self.send(message)
        return await self.recv(timeout)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosedOK:
                return

    async def recv_stream(
        self, dest: Destination, *, progress: Optional[Progress] = None
    ) -> StreamInfo:
        """Receive a stream into ``dest`` (see
        :meth:`callcp.sync.Connection.recv_stream`).  File writes are
        blocking calls, 64 KiB at a time."""
        async with self._recv_lock:
            started = await self._next_app_event(self._timeout)
            if not isinstance(started, StreamStarted):
                self._link.untake(started)
                raise MessagePending("a message arrived, not a stream: receive it with recv()")
            try:
                rx = StreamReception(started, dest, progress)
            except BaseException:
                await self.close(CloseCode.INTERNAL_ERROR, "the receiver could not open its output")
                raise
            try:
                while True:
                    info = rx.feed(await self._next_app_event(self._timeout))
                    if info is not None:
                        return info
            except BaseException as exc:
                if rx.failed(exc):
                    await self.close(
                        CloseCode.INTERNAL_ERROR, "the receiver failed in the middle of a stream"
                    )
                raise

    # -------------------------------------------------------------- closing

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send the authenticated close and close the connection; never raises."""
        link = self._link
        if link.transport is None or link.transport.is_closing():
            return
        self._core.close(code, reason)
        link.flush()
        if link.error is None:
            link.error = self._core.closed_error()
        link.close_transport()
        link._wake()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._link.closed)

    async def _stop_now(self) -> None:
        await self.close(CloseCode.GOING_AWAY, "server shutting down")
        raise ConnectionClosedOK(
            "the server is shutting down", code=CloseCode.GOING_AWAY, reason="server shutting down"
        )

    def _begin_stop(self) -> None:
        """Server shutdown: an idle reader is closed now, a busy handler after
        its current message."""
        self._stopping = True
        link = self._link
        if link._waiter is not None and not link.events:
            self._core.close(CloseCode.GOING_AWAY, "server shutting down")
            link.flush()
            link.error = ConnectionClosedOK(
                "the server is shutting down",
                code=CloseCode.GOING_AWAY,
                reason="server shutting down",
            )
            link.close_transport()
            link._wake()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<callcp.aio.Connection {self.remote_address!r} {self._core.state.value}>"


def _cost(event: Any) -> int:
    data = getattr(event, "data", None)
    return EVENT_COST + (len(data) if data is not None else 0)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(CallcpTimeout("timed out while receiving"))


async def _achunks(source: AsyncSource) -> AsyncIterator[Buffer]:
    if hasattr(source, "__aiter__"):
        async for item in source:
            for chunk in iter_chunks([item]):
                yield chunk
    else:
        for chunk in iter_chunks(source):  # type: ignore[arg-type]
            yield chunk


# ================================================================== client


async def connect(
    host: str,
    port: int = DEFAULT_PORT,
    *,
    timeout: Optional[float] = DEFAULT_TIMEOUT,
    server_fingerprint: Optional[str] = None,
    known_hosts: Optional[PathLike] = None,
    trust_on_first_use: bool = True,
    insecure: bool = False,
    client_key: Optional[KeySource] = None,
    key_password: Optional[str] = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    logger: Optional[logging.Logger] = None,
) -> Connection:
    """Open a callcp/2 connection (the options and errors of
    :func:`callcp.sync.connect`).  The known-hosts check reads a small file
    with blocking calls."""
    check_port(port, allow_zero=False)
    log = logger_for(logger)
    core = client_protocol(
        host,
        port,
        server_fingerprint=server_fingerprint,
        known_hosts=known_hosts,
        trust_on_first_use=trust_on_first_use,
        insecure=insecure,
        client_key=client_key,
        key_password=key_password,
        max_message_size=max_message_size,
        logger=log,
    )
    loop = asyncio.get_running_loop()
    link = _Link(core, loop)
    start = time.monotonic()
    try:
        await asyncio.wait_for(loop.create_connection(lambda: link, host, port), timeout)
    except asyncio.TimeoutError:
        raise CallcpTimeout(f"timed out connecting to {host}:{port}") from None
    except OSError as exc:
        raise _translate(exc, f"connecting to {host}:{port}") from exc
    remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
    try:
        await asyncio.wait_for(asyncio.shield(link.handshake), remaining)
    except asyncio.TimeoutError:
        link.close_transport()
        raise HandshakeTimeout(f"no ServerHello from {host}:{port} within {timeout} s") from None
    except BaseException:
        link.close_transport()
        raise
    return Connection(link, timeout=timeout)


# ================================================================== server

Handler = Callable[[Connection], Awaitable[Any]]


class Server:
    """An asyncio callcp/2 server, shaped like ``asyncio.start_server``'s.

    Use ``async with server:`` and ``await server.serve_forever()``;
    ``close()`` + ``await wait_closed()`` (or ``await shutdown()``) stop it.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        key: Optional[KeySource] = None,
        key_password: Optional[str] = None,
        authorized_keys: Optional[AuthorizedSource] = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        shutdown_timeout: float = 5.0,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        if max_connections < 1 or max_handshakes < 1:
            raise ValueError("max_connections and max_handshakes must be >= 1")
        self._handler = handler
        self._log = logger_for(logger)
        self.keypair = load_server_key(key, password=key_password)
        self._public_der = self.keypair.public_der
        self._authorize = client_authorizer(authorized_keys)
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_message_size = max_message_size
        self.shutdown_timeout = shutdown_timeout
        self._server: Optional[asyncio.AbstractServer] = None
        self._links: Set[_Link] = set()
        self._decryptions = _Decryptions(max_handshakes)
        self._conns: Set[Connection] = set()
        self._tasks: Set[asyncio.Task[None]] = set()
        self._closing = False
        self._pool: Optional[WorkerPool] = None  # workers > 1
        self._pool_stopped: Optional[asyncio.Future[None]] = None
        self._reserved: Optional[socket.socket] = None  # (workers > 1) holds the port

    async def _listen(
        self, host: Optional[str], port: int, *, backlog: int, reuse_port: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._make_link,
                host,
                port,
                backlog=backlog,
                reuse_address=True,
                reuse_port=reuse_port or None,
            )
        except OSError as exc:
            raise _translate(exc, f"listening on {host}:{port}") from exc
        self._port: int = self.sockets[0].getsockname()[1]
        self._log.info(
            "callcp server listening on %s (key %s)",
            ", ".join(str(s.getsockname()) for s in self.sockets),
            self.fingerprint,
        )

    # ------------------------------------------------------------ properties

    @property
    def sockets(self) -> Tuple[socket.socket, ...]:
        if self._server is None:
            return ()
        socks: Any = getattr(self._server, "sockets", ())
        return tuple(socks)

    @property
    def port(self) -> int:
        """The bound port (still known after close())."""
        return self._port

    @property
    def fingerprint(self) -> str:
        return self.keypair.fingerprint

    @property
    def active_connections(self) -> int:
        return len(self._links)

    def is_serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    # ------------------------------------------------------------ per link

    def _make_link(self) -> asyncio.Protocol:
        loop = asyncio.get_running_loop()
        if self._closing:
            return _Refuse(self._log, "server shutting down")
        if len(self._links) >= self.max_connections:
            return _Refuse(self._log, f"max_connections ({self.max_connections}) reached")
        core = ServerProtocol(
            self.keypair.private_key,
            authorize_client=self._authorize,
            max_message_size=self.max_message_size,
            server_public_der=self._public_der,
            defer_decryption=True,
        )
        link = _Link(core, loop, self._decryptions)
        self._links.add(link)
        timer = loop.call_later(self.handshake_timeout, self._handshake_timeout, link)

        def handshake_done(fut: asyncio.Future[Any]) -> None:
            timer.cancel()
            exc = fut.exception() if not fut.cancelled() else None
            peer = _fmt(link)
            if exc is not None:
                self._log.warning("handshake with %s failed: %s", peer, exc)
                return
            conn = Connection(link, timeout=self.idle_timeout)
            self._conns.add(conn)
            task = loop.create_task(self._run(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        link.handshake.add_done_callback(handshake_done)
        link.closed.add_done_callback(lambda _: self._links.discard(link))
        return link

    def _handshake_timeout(self, link: _Link) -> None:
        if link.handshake.done():
            return
        err = HandshakeTimeout(f"handshake timed out after {self.handshake_timeout} s")
        link.core.fail(err)
        link.error = err
        link.flush()
        link.close_transport()
        link.handshake.set_exception(err)

    async def _run(self, conn: Connection, peer: str) -> None:
        who = f" as {conn.peer_fingerprint}" if conn.peer_fingerprint else ""
        self._log.debug("connection from %s%s", peer, who)
        if self._closing:
            conn._begin_stop()
        try:
            await self._handler(conn)
        except ConnectionClosedOK:
            pass
        except CallcpTimeout:
            self._log.warning("closed %s: idle for more than %s s", peer, self.idle_timeout)
            await conn.close(CloseCode.TIMEOUT, "idle timeout")
        except CallcpError as exc:
            self._log.warning("connection %s ended: %s", peer, exc)
        except asyncio.CancelledError:
            await conn.close(CloseCode.GOING_AWAY, "server shutting down")
            raise
        except Exception:
            self._log.exception("handler raised on connection %s", peer)
            await conn.close(CloseCode.INTERNAL_ERROR, "internal server error")
        finally:
            await conn.close()
            self._conns.discard(conn)

    # ------------------------------------------------------------ lifecycle

    async def start_serving(self) -> None:
        if self._server is not None:
            await self._server.start_serving()

    async def _start_workers(
        self, host: Optional[str], port: int, workers: int, options: Any
    ) -> None:
        """(workers > 1) reserve the port and fork the worker processes."""
        try:
            self._reserved, address = reserve_port(host, port)
        except OSError as exc:
            raise _translate(exc, f"listening on {host}:{port}") from exc
        self._port = address[1]
        pool = WorkerPool(
            workers,
            _aio_worker,
            (self._handler, host, self._port, {**options, "key": self.keypair}),
        )
        self._pool = pool
        await asyncio.get_running_loop().run_in_executor(None, pool.start)
        self._log.info(
            "callcp server listening on %s with %d worker processes (key %s)",
            address,
            workers,
            self.fingerprint,
        )

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` (or cancellation)."""
        pool = self._pool
        if pool is not None:
            while pool.alive and not self._closing:
                await asyncio.sleep(0.2)
            return
        if self._server is None:
            raise LocalProtocolError("the server is not listening")
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            if not self._closing:
                raise

    def close(self) -> None:
        """Stop listening; close idle connections now (authenticated close,
        GOING_AWAY) and busy ones once their handler finishes the current
        message.  Await :meth:`wait_closed` for the end."""
        if self._closing:
            return
        self._closing = True
        if self._pool is not None:
            # each worker shuts down gracefully on SIGTERM
            self._pool_stopped = asyncio.get_running_loop().run_in_executor(
                None, self._pool.stop, self.shutdown_timeout + 2.0
            )
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn._begin_stop()

    async def wait_closed(self) -> None:
        """Wait for handlers to finish, up to ``shutdown_timeout`` seconds;
        then cancel what remains and close every connection."""
        if self._pool_stopped is not None:
            await self._pool_stopped
            if self._reserved is not None:
                self._reserved.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for link in list(self._links):
            link.close_transport()
        self._log.info("callcp server stopped")

    async def shutdown(self) -> None:
        """``close()`` then ``wait_closed()``."""
        self.close()
        await self.wait_closed()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


class _Refuse(asyncio.Protocol):
    """Answers a connection the server cannot take with a plaintext alert."""

    def __init__(self, log: logging.Logger, why: str) -> None:
        self._log = log
        self._why = why

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self._log.warning("refused %s: %s", _fmt_addr(peer), self._why)
        transport.write(alert_frame(CloseCode.GOING_AWAY, f"server busy: {self._why}"))
        transport.close()


def _fmt_addr(addr: Any) -> str:
    if addr and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return "unknown peer"


def _fmt(link: _Link) -> str:
    transport = link.transport
    return _fmt_addr(transport.get_extra_info("peername") if transport is not None else None)


async def serve(
    handler: Handler,
    host: Optional[str] = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    backlog: int = 1024,
    reuse_port: bool = False,
    workers: int = 1,
    **options: Any,
) -> Server:
    """Start a listening asyncio :class:`Server` (port 0 picks a free port).

    ``await handler(conn)`` runs as a task for each connection once its
    handshake (and client authorization) succeeded; the connection is closed
    when it returns.  Options as :func:`callcp.sync.serve`, with defaults
    ``max_connections=10000``, ``max_handshakes=16`` (RSA decryptions
    running at once in worker threads; more handshakes wait their turn), plus
    ``shutdown_timeout`` (5 s), and ``workers`` (N > 1: N forked processes
    accept on the port with SO_REUSEPORT, Linux; the handler runs in them and
    this process only supervises).
    """
    check_port(port, allow_zero=True)
    check_workers(workers)
    server = Server(handler, **options)
    if workers > 1:
        await server._start_workers(host, port, workers, {**options, "backlog": backlog})
    else:
        await server._listen(host, port, backlog=backlog, reuse_port=reuse_port)
    return server


def _aio_worker(
    handler: Handler,
    host: Optional[str],
    port: int,
    options: Any,
    ready: Callable[[], None],
) -> None:
    """One worker process of a ``workers=N`` server: its own event loop and
    SO_REUSEPORT socket; SIGTERM closes it gracefully."""
    # Forked from inside the parent's running loop: start from a clean slate.
    asyncio.events._set_running_loop(None)
    asyncio.set_event_loop(None)

    async def main() -> None:
        backlog = options.pop("backlog", 1024)
        server = await serve(handler, host, port, backlog=backlog, reuse_port=True, **options)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready()
        await stop.wait()
        await server.shutdown()

    asyncio.run(main())
