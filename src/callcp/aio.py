"""The asyncio adapter: the connection engine behind ``asyncio.Protocol``.

Only "how do I wait" lives here; each connection's transport side is a
``_aiolink.Link``.  The API is :mod:`callcp.sync`'s, awaited::

    async with await callcp.aio.serve(handler, "127.0.0.1", 8436) as server:
        await server.serve_forever()

    conn = await callcp.aio.connect("127.0.0.1", 8436)
    reply = await conn.request(b"hello")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
import time
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Optional,
    Set,
    Tuple,
    Union,
)

from . import _engine
from . import _workers as workers
from ._aiolink import FOREVER, Link, Turn, achunks, decrypt_here, next_chunk
from ._common import check_port, client_protocol, logger_for
from ._common import translate_oserror as _translate
from ._core.errors import (
    CallcpError,
    CallcpTimeout,
    CloseCode,
    ConnectionClosedOK,
    LocalProtocolError,
    TransportError,
)
from ._core.events import NEED_DATA, DecryptionRequested, MessageReceived
from ._core.wire import printable
from ._engine import (
    DEFAULT,
    Address,
    Buffer,
    ConnectionBase,
    Engine,
    ServerBase,
    ServerCore,
    handler_outcome,
    keepalive_for,
)
from ._options import DEFAULT_PORT, ClientKwargs, ClientOptions, ServerKwargs, ServerOptions
from ._retry import Attempts
from ._streams import Destination, Progress, StreamInfo, check_max_size, source_size
from ._workers import WorkerPool

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Connection", "Server", "connect", "serve", "Pool", "PoolStats"]

AsyncSource = Union[Any, AsyncIterable[Buffer]]


class Connection(ConnectionBase):
    """One callcp/2 connection for asyncio: the methods of
    :class:`callcp.sync.Connection`, awaited.  Tasks may share it (receivers
    take turns; a send waits for a stream being sent)."""

    def __init__(
        self,
        link: Link,
        *,
        timeout: Optional[float],
        decrypt: Callable[[DecryptionRequested], Awaitable[Optional[bytes]]] = decrypt_here,
    ) -> None:
        self._link = link
        self._engine = link.engine
        self._core = link.engine.core
        self._timeout = timeout
        self._send_lock = asyncio.Lock()
        self._turn = Turn(link.loop)
        self._decrypt = decrypt  # (server) the key exchange's RSA work, off the loop
        self._repr_name = "callcp.aio.Connection"
        link.engine.wake = link.wake
        self.remote_address: Address = link.addr
        local = link.transport.get_extra_info("sockname")
        self.local_address: Address = tuple(local) if local else ()

    @property
    def closed(self) -> bool:
        """True once the connection is closed; it then refuses further use."""
        return bool(self._link.transport.is_closing())

    def settimeout(self, timeout: Optional[float]) -> None:
        """Deadline in seconds for each later awaited operation (None: wait forever)."""
        self._timeout = timeout

    async def do_handshake(self, timeout: Any = DEFAULT, *, confirm: bool = False) -> None:
        """Run the handshake (see :meth:`callcp.sync.Connection.do_handshake`)."""
        engine = self._engine
        deadline, seconds = engine.handshake_limits(self._seconds(timeout))
        await self._turn.take()
        try:
            await self._drive(
                _engine.handshake(engine, deadline, seconds, self.remote_address, confirm)
            )
        finally:
            self._turn.give()

    async def send(self, message: Buffer) -> None:
        """Send one message (waits while a stream is being sent).

        Raises: as :meth:`callcp.sync.Connection.send`.
        """
        link = self._link
        if self._send_lock.locked():
            async with self._send_lock:
                self._send(message)
        else:
            self._send(message)
        if link.paused_writing:
            await link.drain(self._timeout)

    def _send(self, message: Buffer) -> None:
        data = self._core.send_bytes(message)  # (refused after our own close())
        transport = self._link.transport
        if transport.is_closing():  # (lost, or failing: nothing would go out)
            raise self._engine.lost_error()
        if type(data) is bytes:
            transport.write(data)
        else:
            transport.writelines(data)
        keepalive = self._engine.keepalive
        if keepalive is not None and not self._link.paused_writing:
            keepalive.heard(self._link.loop.time())  # our bytes go out: a sign of life

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
        size = source_size(source) if size is None else size
        async with self._send_lock:
            if self._link.transport.is_closing():
                raise self._engine.lost_error()
            steps = _engine.send_stream(self._core, achunks(source), size, name, checksum, progress)
            info: StreamInfo = await self._drive(steps)
        return info

    async def recv(self, timeout: Any = DEFAULT) -> bytes:
        """Receive the next whole message (``timeout`` as in the blocking API).

        Raises: as :meth:`callcp.sync.Connection.recv`.
        """
        turn = self._turn
        await turn.take()
        try:
            event = await self._next(timeout)
        finally:
            turn.give()
        if type(event) is MessageReceived:
            return event.data
        return self._engine.message_from(event)

    async def recv_stream(
        self,
        dest: Destination,
        *,
        progress: Optional[Progress] = None,
        max_size: Optional[int] = None,
    ) -> StreamInfo:
        """Receive a stream into ``dest`` (see
        :meth:`callcp.sync.Connection.recv_stream`).  File writes are
        blocking calls, 64 KiB at a time."""
        check_max_size(max_size)
        await self._turn.take()
        try:
            info: StreamInfo = await self._drive(
                _engine.receive_stream(self._engine, dest, progress, max_size)
            )
        finally:
            self._turn.give()
        return info

    async def request(self, message: Buffer, timeout: Any = DEFAULT) -> bytes:
        """Send one message and return the next message received."""
        await self.send(message)
        return await self.recv(timeout)

    async def poll(self) -> bool:
        """Is this idle connection still usable?  (See
        :meth:`callcp.sync.Connection.poll`.)  Handles, without waiting,
        what has arrived; False, and the connection closed, if it is over
        or an unasked-for message came."""
        if self.closed:
            return False
        core = self._core
        if not core.buffered and not core.owes and core.needs_data:
            return True  # (nothing arrived: the common case)
        try:
            await self.recv(timeout=0.0)
        except CallcpTimeout:
            return not self.closed  # (only PINGs and the like: answered)
        except CallcpError:
            pass
        await self.close()
        return False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosedOK:
                return

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send the authenticated close and close the connection; never raises."""
        self._engine.close(code, reason)
        self._link.abort()

    async def wait_closed(self) -> None:
        """Wait until the transport is closed."""
        await asyncio.shield(self._link.lost)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ waiting

    async def _drive(self, steps: _engine.Procedure) -> Any:
        """Run an engine procedure, doing what it asks the asyncio way."""
        link = self._link
        run = _engine.Run(self._engine, steps, link.abort)
        for op, arg in run:
            try:
                if op is _engine.WRITE:
                    if arg is not _engine.NOW and link.transport.is_closing():
                        raise self._engine.lost_error()
                    link.flush()
                    if arg is not _engine.NOW:
                        await link.drain(self._timeout)
                elif op is _engine.EVENT:
                    run.reply = await self._next(DEFAULT)
                elif op is _engine.CHUNK:
                    run.reply = await next_chunk(arg)
                elif op is _engine.READ:
                    if link.paused_reading:
                        link.resume()
                    await link.wait(link.loop.time() + arg - time.monotonic())
                elif op is _engine.DECRYPT:
                    run.reply = await self._decrypt(arg)
                elif op is _engine.PAUSE:
                    await asyncio.sleep(arg)
                else:
                    link.abort()
            except BaseException as exc:
                run.thrown = exc
        return run.value

    async def _next(self, timeout: Any) -> Any:
        """The next application event, waiting as needed (in the receive turn)."""
        engine, link, core = self._engine, self._link, self._core
        deadline = 0.0
        waited = False
        while True:
            if waited or engine.pending is not None or engine.interruption or not core.needs_data:
                try:
                    event = engine.next_event()
                except CallcpError:
                    link.abort()
                    raise
                if event is not NEED_DATA:
                    return event
                if core.owes and not link.paused_writing:  # (a PONG; a peer that
                    link.flush()  # does not read gets it once it does: no growing buffer)
            if link.paused_reading:  # whatever is buffered is not enough: read
                link.resume()
            if not deadline:
                seconds = self._timeout if timeout is DEFAULT else timeout
                deadline = FOREVER if seconds is None else link.loop.time() + seconds
            if engine.keepalive is None:
                await link.wait(deadline)
            else:
                await self._wait_alive(deadline)
            waited = True

    async def _wait_alive(self, deadline: float) -> None:
        """``link.wait`` with keepalive: wake up to PING a quiet peer, and
        give up on one that answers nothing (ConnectionClosedError)."""
        link, keepalive = self._link, self._engine.keepalive
        assert keepalive is not None
        while True:
            wake = keepalive.next_wake()
            if wake >= deadline:
                await link.wait(deadline)
                return
            try:
                await link.wait(wake)
                return
            except CallcpTimeout:
                try:
                    ping = keepalive.woke(self._core, link.loop.time(), link.unsent())
                except CallcpError:
                    link.abort()
                    raise
                if ping:
                    link.flush()


# ================================================================== client


async def connect(
    host: str, port: int = DEFAULT_PORT, **options: Unpack[ClientKwargs]
) -> Connection:
    """Open a callcp/2 connection (the options and errors of
    :func:`callcp.sync.connect`).  The known-hosts check reads a small file
    with blocking calls."""
    return await open_connection(host, port, ClientOptions(**options))


async def open_connection(host: str, port: int, options: ClientOptions) -> Connection:
    """:func:`connect` with its options as one :class:`ClientOptions`."""
    if options.retry is None:
        return await connect_once(host, port, options)
    attempts = Attempts(options.retry, logger_for(options.logger), f"connecting to {host}:{port}")
    while True:
        try:
            return await connect_once(host, port, options, confirm=True)
        except CallcpError as exc:
            wait = attempts.again(exc)
            if wait is None:
                raise
        await asyncio.sleep(wait)


async def connect_once(
    host: str, port: int, options: ClientOptions, *, confirm: bool = False
) -> Connection:
    """One try of :func:`open_connection` (``confirm``: wait for the
    server's Finished)."""
    check_port(port, allow_zero=False)
    loop = asyncio.get_running_loop()
    keepalive = keepalive_for(options.keepalive_interval, options.keepalive_timeout)
    link = Link(loop, Engine(client_protocol(host, port, options), keepalive=keepalive))
    start = loop.time()
    try:
        await asyncio.wait_for(loop.create_connection(lambda: link, host, port), options.timeout)
    except asyncio.TimeoutError:
        raise CallcpTimeout(f"timed out connecting to {host}:{port}") from None
    except OSError as exc:
        raise _translate(exc, f"connecting to {host}:{port}") from exc
    except UnicodeError:  # (the IDNA codec: an empty label, one over 63 characters)
        raise TransportError(f"invalid host name {printable(str(host))!r}") from None
    conn = Connection(link, timeout=options.timeout)
    conn.remote_address = conn.remote_address or (host, port)
    try:
        left = None if options.timeout is None else options.timeout - (loop.time() - start)
        await conn.do_handshake(left, confirm=confirm)
    except BaseException:
        link.abort()
        raise
    return conn


# ================================================================== server

Handler = Callable[[Connection], Awaitable[Any]]


class Server(ServerBase):
    """An asyncio callcp/2 server, shaped like ``asyncio.start_server``'s.

    Use ``async with server:`` and ``await server.serve_forever()``;
    ``close()`` + ``await wait_closed()`` (or ``await shutdown()``) stop it.
    """

    def __init__(self, handler: Handler, options: ServerOptions) -> None:
        self._handler = handler
        self._core = ServerCore(options)
        self.options = options
        self.keypair = self._core.keypair
        self._server: Optional[asyncio.AbstractServer] = None
        self._links: Set[Link] = set()
        self._tasks: Set[asyncio.Task[None]] = set()
        # RSA work runs here: never on the loop, never in the application's executor.
        self._rsa = concurrent.futures.ThreadPoolExecutor(
            min(options.max_handshakes, os.cpu_count() or 1), thread_name_prefix="callcp-rsa"
        )
        self._clock: Optional[asyncio.TimerHandle] = None
        self._port = 0
        self._pool: Optional[WorkerPool] = None  # workers > 1
        self._pool_stopped: Optional[asyncio.Future[None]] = None
        self._closed_down = False  # wait_closed() finished

    @property
    def sockets(self) -> Tuple[socket.socket, ...]:
        """The listening sockets."""
        return tuple(getattr(self._server, "sockets", None) or ())

    @property
    def port(self) -> int:
        """The bound port (still known after close())."""
        return self._port

    def is_serving(self) -> bool:
        """True while accepting."""
        return self._server is not None and self._server.is_serving()

    def _tick(self) -> None:
        """The server's clock, once a second: summaries of refusals; the
        signed share renewed ahead of time."""
        self._core.notices.flush()
        self._core.prepare()
        self._clock = asyncio.get_running_loop().call_later(1.0, self._tick)

    def _start(self, link: Link) -> None:
        """The connection got its key-exchange slot: its task runs."""
        task = link.loop.create_task(self._serve(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, link: Link) -> None:
        core, options, arrival = self._core, self.options, link.arrival
        assert arrival is not None
        rsa = self._rsa

        async def decrypt(request: DecryptionRequested) -> Optional[bytes]:
            try:  # the RSA work off the loop; the queue's bookkeeping on it
                if request.resumed:  # (a session ticket: no RSA work)
                    return arrival.run_key_exchange(request)
                return await link.loop.run_in_executor(rsa, arrival.run_key_exchange, request)
            finally:
                arrival.key_exchange_done()

        conn = Connection(link, timeout=options.idle_timeout, decrypt=decrypt)
        try:
            await conn.do_handshake()
        except Exception as exc:
            core.handshake_failed(link.addr, exc)
            link.abort()
            return
        finally:
            arrival.key_exchange_done()
            if link.timer is not None:
                link.timer.cancel()
        core.connected(link.addr, link.engine)
        error: Optional[BaseException] = None
        try:
            await self._handler(conn)
        except (Exception, asyncio.CancelledError) as exc:  # the outcome policy decides
            error = exc
        core.ended(link.addr, link.engine, handler_outcome(error, options.idle_timeout), error)
        await conn.close()
        if isinstance(error, asyncio.CancelledError):
            raise error

    async def _open(self, host: Optional[str], port: int) -> None:
        """Listen (or, with workers, fork the processes that listen)."""
        loop, options = asyncio.get_running_loop(), self.options
        if options.workers > 1:
            pool = workers.for_server(host, port, options, self.keypair, _worker, self._handler)
            self._pool, address = pool, pool.address
            await loop.run_in_executor(None, pool.start_or_close)
        else:
            try:
                self._server = await loop.create_server(
                    lambda: Link(loop, None, self._core, self._links, self._start),
                    host,
                    port,
                    backlog=options.backlog,
                    reuse_address=True,
                    reuse_port=options.reuse_port or None,
                )
            except OSError as exc:
                raise _translate(exc, f"listening on {host}:{port}") from exc
            address = self.sockets[0].getsockname()
            self._tick()
        self._port = address[1]
        self._core.listening(address, options.workers)

    async def serve_forever(self, *, handle_signals: bool = False) -> None:
        """Serve until :meth:`close` (or cancellation).

        ``handle_signals=True``: Ctrl-C (SIGINT) and SIGTERM close the server
        gracefully (as :meth:`shutdown` does, which this then awaits) and
        ``serve_forever()`` returns normally.  (Unix: loop signal handlers.)
        """
        if handle_signals:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self.close)
            try:
                await self.serve_forever()
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)
            await self.wait_closed()
            return
        pool = self._pool
        if pool is not None:
            while pool.alive and not self._core.stopping:
                await asyncio.sleep(0.2)
            return
        if self._server is None:
            raise LocalProtocolError("the server is not listening")
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            if not self._core.stopping:
                raise

    async def start_serving(self) -> None:
        """Start accepting (serve() already has; for asyncio.Server compatibility)."""
        if self._server is not None:
            await self._server.start_serving()

    def close(self) -> None:
        """Stop listening; close idle connections now (authenticated close,
        GOING_AWAY) and busy ones once their handler finishes the current
        message.  Await :meth:`wait_closed` for the end."""
        core = self._core
        if core.stopping:
            return
        core.stopping = True
        if self._pool is not None:  # each worker shuts down gracefully on SIGTERM
            self._pool_stopped = asyncio.get_running_loop().run_in_executor(
                None, self._pool.stop, self.options.shutdown_timeout + 2.0
            )
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            if link.arrival is None or not link.arrival.stop():
                link.engine.stop()  # its handler ends at its next wait for bytes
            else:
                link.abort()

    async def wait_closed(self, grace: Optional[float] = None) -> None:
        """Wait for handlers to finish, up to ``grace`` seconds (default
        ``shutdown_timeout``); then cancel what remains and close every
        connection."""
        grace = self.options.shutdown_timeout if grace is None else grace
        if self._closed_down:  # (again: done already)
            return
        if self._pool_stopped is not None:
            await self._pool_stopped
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for link in list(self._links):
            link.abort()
        if self._clock is not None:
            self._clock.cancel()
        self._rsa.shutdown(wait=False, cancel_futures=True)
        self._closed_down = True
        self._core.stopped()

    async def shutdown(self, *, grace: Optional[float] = None) -> None:
        """Graceful drain: ``close()`` (stop accepting, GOING_AWAY to idle
        connections at once), then ``wait_closed(grace)``."""
        self.close()
        await self.wait_closed(grace)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop."""
        return asyncio.get_running_loop()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()


async def serve(
    handler: Handler,
    host: Optional[str] = "127.0.0.1",
    port: int = DEFAULT_PORT,
    **options: Unpack[ServerKwargs],
) -> Server:
    """Start a listening asyncio :class:`Server` (port 0 picks a free port).

    ``await handler(conn)`` runs as a task for each connection once its
    handshake (and client authorization) succeeded; the connection is closed
    when it returns.  The options and defaults are :func:`callcp.serve`'s
    (:class:`callcp.ServerOptions`); RSA key exchanges run in worker threads.
    """
    return await start_server(handler, host, port, ServerOptions(**options))


async def start_server(
    handler: Handler, host: Optional[str], port: int, options: ServerOptions
) -> Server:
    """:func:`serve` with its options as one :class:`ServerOptions`."""
    check_port(port, allow_zero=True)
    server = Server(handler, options)
    await server._open(host, port)
    return server


def _worker(
    handler: Handler,
    host: Optional[str],
    port: int,
    options: ServerOptions,
    ready: Callable[[], None],
) -> None:
    """One worker process of a ``workers=N`` server: its own event loop and
    SO_REUSEPORT socket; SIGTERM closes it gracefully."""

    async def main() -> None:
        server = await start_server(handler, host, port, options)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready()
        await stop.wait()
        await server.shutdown()

    # A forked child does not see its parent's running loop (asyncio checks
    # the process id), so asyncio.run() starts afresh here.
    asyncio.run(main())


# The asyncio pool lives with the blocking one (their bookkeeping is shared).
from .pool import AsyncPool as Pool  # noqa: E402
from .pool import PoolStats  # noqa: E402
