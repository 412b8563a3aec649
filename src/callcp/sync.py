"""The blocking adapter: sockets and threads around the connection engine.

Only "how do I wait" lives here: blocking reads and writes under kernel
deadlines (SO_RCVTIMEO/SO_SNDTIMEO: no poll() per call), a thread per
connection from its key exchange on, and in the server one selector thread
that holds every connection until its whole ClientHello is in (so a peer
that trickles its hello costs a small buffer, not a thread or a handshake
slot).  Every decision is the engine's (``callcp._engine``); multi-step work
(handshake, streams) is the engine's procedures, run by :meth:`_drive`.

Threading: one thread may receive while another sends.  ``_send_lock``
owns everything written (the core seals records only when asked for its
output, under that lock); ``_recv_lock`` serialises receivers.
"""

from __future__ import annotations

import select
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Set

from . import _engine
from . import _workers as workers
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
    Arrival,
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
from ._sockets import FOREVER, Acceptor, SocketLink, ThreadPool, listen, remaining, unsent
from ._streams import (
    Destination,
    Progress,
    Source,
    StreamInfo,
    check_max_size,
    iter_chunks,
    source_size,
)
from ._workers import WorkerPool

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Connection", "Server", "connect", "serve"]


_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # (poll(): no enum arithmetic per call)


class Connection(SocketLink, ConnectionBase):
    """One encrypted, authenticated, message-oriented connection.

    Obtained from :func:`connect` (client) or given to a :func:`serve`
    handler (server).  Messages keep their boundaries; each is any size up to
    the receiver's ``max_message_size``.  One thread may send while another
    receives.
    """

    def __init__(
        self,
        sock: socket.socket,
        engine: Engine,
        *,
        timeout: Optional[float],
        decrypt: Callable[[DecryptionRequested], Optional[bytes]] = DecryptionRequested.run,
    ) -> None:
        super().__init__(sock, engine, timeout)
        self._decrypt = decrypt  # (server) the key exchange's RSA work
        self._stream_lock = threading.Lock()  # held while a stream is being sent
        self._streaming = 0  # the thread sending a stream (0: none)
        self._poller: Optional[Any] = None  # (poll(): made at its first use)

    def do_handshake(self, timeout: Any = DEFAULT, *, confirm: bool = False) -> None:
        """Run the handshake until data may flow: a client returns once its
        key exchange is sent (its first message shares that flight; the
        server's Finished is checked before any reply is returned).
        :func:`connect` calls it; calling it again does nothing, except that
        ``confirm=True`` (client) then also waits for the server's Finished:
        the server has then proved that it holds its key, and
        ``peer_fingerprint`` is set (it is None until then).

        Raises:
            HandshakeError (ServerKeyChanged, UnknownServerKey, ...): refused.
            HandshakeTimeout: it did not complete within ``timeout``.
        """
        engine = self._engine
        deadline, seconds = engine.handshake_limits(self._seconds(timeout))
        with self._recv_lock:
            self._drive(_engine.handshake(engine, deadline, seconds, self.remote_address, confirm))

    def send(self, message: Buffer) -> None:
        """Send one message.

        Raises:
            ConnectionClosed: the connection is closed or failed.
            LocalProtocolError: after our own close(), or while a stream is
                being sent.
            CallcpTimeout, TransportError: the network failed (the connection
                is then closed).
        """
        with self._send_lock:
            try:
                data = self._core.send_bytes(message)
            except LocalProtocolError:
                if not self._waited_for_stream():
                    raise
                return self.send(message)  # (another thread's stream ended meanwhile)
            if type(data) is not bytes:  # several records: gathering writes
                self._write(data)
                if self._engine.keepalive is not None:
                    self._wrote()
                return
            try:
                self._send_all(data)
            except OSError as exc:
                raise self._write_failed(exc) from exc
            if self._engine.keepalive is not None:
                self._wrote()

    def send_stream(
        self,
        source: Source,
        *,
        size: Optional[int] = None,
        name: str = "",
        progress: Optional[Progress] = None,
        checksum: bool = False,
    ) -> StreamInfo:
        """Send a payload of any size as one stream, 64 KiB at a time.

        ``source`` is a binary file, a bytes-like object or an iterable of
        bytes-like chunks; memory use does not depend on its size.  ``size``
        (found by itself for regular files) and ``name`` are hints for the
        receiver.  ``progress(sent, total_or_None)`` is called after each
        chunk.  If reading the source fails, the stream is aborted (the
        receiver discards it) and the error is raised here.  Every byte is
        authenticated, and the receiver checks the length at the end;
        ``checksum=True`` adds a SHA-256 of the payload (a hash of every byte
        on each side: slower than the encryption).

        Returns the stream's length, SHA-256 (hex; None without
        ``checksum``) and name.

        Raises:
            ConnectionClosed, CallcpTimeout, TransportError: the connection failed.
            LocalProtocolError: the connection cannot send now.
            Exception: whatever reading ``source`` raises (the stream is then aborted).
        """
        size = source_size(source) if size is None else size
        chunks = iter_chunks(source)
        with self._stream_lock:  # (another thread's send() waits for the stream's end)
            self._streaming = threading.get_ident()
            try:
                steps = _engine.send_stream(self._core, chunks, size, name, checksum, progress)
                # The send lock is held for each step, not while the source is
                # read: a reader may then write a PONG (keepalive) between chunks.
                info: StreamInfo = self._drive(steps, self._send_lock)
            finally:
                self._streaming = 0
        return info

    def _waited_for_stream(self) -> bool:
        """(send() refused) If another thread is sending a stream, wait for
        its end and say so (send() then tries again)."""
        streaming = self._streaming
        if not streaming or streaming == threading.get_ident():
            return False
        self._send_lock.release()  # (held once by send(): let the stream go on)
        try:
            with self._stream_lock:
                return True
        finally:
            self._send_lock.acquire()

    def recv(self, timeout: Any = DEFAULT) -> bytes:
        """Receive the next whole message.

        ``timeout`` overrides the connection's timeout for this call (None:
        wait forever).  A timeout leaves the connection usable.

        Raises:
            ConnectionClosedOK: the peer closed the connection cleanly.
            ConnectionClosedError: it closed with an error, or vanished without
                the authenticated close (possible truncation).
            CryptoError, RemoteProtocolError, MessageTooLarge: the peer sent bad
                bytes; the connection is closed.
            CallcpTimeout: nothing arrived in time.
            StreamPending: a stream arrived instead (it stays pending for
                :meth:`recv_stream`).
        """
        with self._recv_lock:
            engine, core = self._engine, self._core
            if (
                timeout is DEFAULT
                and engine.pending is None
                and engine.interruption is None
                and engine.keepalive is None
                and core.needs_data
            ):  # the hot path: one read, commonly one whole message
                seconds = self._timeout
                deadline = FOREVER if seconds is None else time.monotonic() + seconds
                data = self._recv(seconds)
                try:
                    message = core.receive_message(data)
                except CallcpError:
                    self._abort()
                    raise
                if message is not None:
                    return message
                event = self._next(timeout, deadline)
            else:
                event = self._next(timeout)
            if type(event) is MessageReceived:
                return event.data
            return engine.message_from(event)

    def recv_stream(
        self,
        dest: Destination,
        *,
        progress: Optional[Progress] = None,
        max_size: Optional[int] = None,
    ) -> StreamInfo:
        """Receive a stream into ``dest`` (a path, or a binary file) in bounded
        memory, whatever its size.

        A path receives the bytes in ``<path>.part`` (created anew, mode 0600,
        never over a file or link already there: ``<path>.<random>.part`` then), renamed to
        ``<path>`` only once the stream's length (and SHA-256) verified; on
        failure the ``.part`` file is deleted. A seekable file is truncated back
        to where it started on failure. ``progress(received, total_or_None)`` is
        called after each chunk. Each wait for data is bounded by the
        connection's timeout; a timeout in the middle of a stream closes the
        connection. ``max_size`` (bytes, None: any size) refuses a larger
        stream, by the size the sender announced before anything is written,
        else as soon as it sends more: the connection is closed with REFUSED and
        the reason, and nothing of the stream is kept.

        Raises:
            StreamTooLarge: the stream was larger than ``max_size``.
            StreamAbortedError: the sender abandoned the stream (the connection
                stays usable).
            ConnectionClosedError: the connection broke mid-stream (truncation).
            CryptoError, RemoteProtocolError: a chunk was tampered with, or the
                stream failed its integrity check.
            MessagePending: a message arrived instead (it stays pending for
                :meth:`recv`).
            OSError: ``dest`` could not be written.
        """
        check_max_size(max_size)
        with self._recv_lock:
            info: StreamInfo = self._drive(
                _engine.receive_stream(self._engine, dest, progress, max_size)
            )
        return info

    def request(self, message: Buffer, timeout: Any = DEFAULT) -> bytes:
        """Send one message and return the next message received."""
        self.send(message)
        return self.recv(timeout)

    def poll(self) -> bool:
        """Is this idle connection still usable?  Reads, without waiting,
        whatever has arrived: a PING is answered, the peer's CLOSE (a server
        going away) or the end of TCP is seen.  False (and the connection
        closed) if it is over, or if a message arrived that nobody asked
        for.  Not while another thread uses the connection."""
        if self._closed:
            return False
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self._sock, select.POLLIN)
        if not poller.poll(0):
            return True  # (nothing arrived: the common case, one cheap system call)
        try:
            waiting = self._sock.recv(1, _PEEK_NOW)
        except BlockingIOError:
            return True
        except OSError:
            waiting = b""
        if waiting:
            try:
                self.recv(timeout=0.0)
            except CallcpTimeout:
                return True  # (only PINGs and the like: answered)
            except CallcpError:
                pass
        self.close()
        return False

    def __iter__(self) -> Iterator[bytes]:
        """Incoming messages until the peer closes cleanly (a broken
        connection raises instead of ending the loop).  Each wait is bounded
        by the connection's timeout (the server's ``idle_timeout``)."""
        while True:
            try:
                yield self.recv()
            except ConnectionClosedOK:
                return

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send the authenticated close and close the socket; never raises."""
        if not self._closed:
            # A GOING_AWAY close counts the messages delivered: exact only if
            # no other thread is receiving one now (else "cannot say").
            counted = self._recv_lock.acquire(blocking=False)
            try:
                self._engine.close(code, reason, counted=counted)
            finally:
                if counted:
                    self._recv_lock.release()
            self._abort()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ waiting

    def _drive(self, steps: _engine.Procedure, lock: Optional[threading.RLock] = None) -> Any:
        """Run an engine procedure, doing what it asks the blocking way;
        with ``lock``, each step of the procedure holds it (its core work),
        but not the wait for a CHUNK of the source."""
        run = _engine.Run(self._engine, steps, self._abort)
        while True:
            if lock is not None:
                lock.acquire()
            try:
                op, arg = next(run)
            except StopIteration:
                break
            finally:
                if lock is not None:
                    lock.release()
            try:
                if op is _engine.WRITE:
                    with self._send_lock:
                        try:
                            self._write(self._core.data_to_send_parts())
                        except CallcpError:
                            if arg is not _engine.NOW:
                                raise
                        else:
                            if lock is not None and self._engine.keepalive is not None:
                                self._wrote()  # (a stream's chunk went out)
                elif op is _engine.EVENT:
                    run.reply = self._next(DEFAULT)
                elif op is _engine.CHUNK:
                    run.reply = next(arg, None)
                elif op is _engine.READ:
                    self._read(remaining(arg))
                elif op is _engine.DECRYPT:
                    run.reply = self._decrypt(arg)
                elif op is _engine.PAUSE:
                    time.sleep(arg)
                else:
                    self._abort()
            except BaseException as exc:
                run.thrown = exc
        return run.value

    def _next(self, timeout: Any, deadline: float = 0.0) -> Any:
        """The next application event, reading as needed (under ``_recv_lock``).
        A nonzero ``deadline``: this call has read already, under it."""
        engine, core = self._engine, self._core
        seconds: Optional[float] = self._timeout if timeout is DEFAULT else timeout
        read = deadline != 0.0  # (else: the first read gets all of ``seconds``)
        while True:
            if (
                read
                or engine.pending is not None
                or engine.interruption is not None
                or not core.needs_data
            ):  # (else: read first)
                try:
                    event = engine.next_event()
                except CallcpError:
                    self._abort()
                    raise
                if event is not NEED_DATA:
                    return event
                if core.owes:  # (a PONG)
                    self._flush_owed()
            if not deadline:
                deadline = FOREVER if seconds is None else time.monotonic() + seconds
            elif seconds is not None:
                seconds = remaining(deadline)
            if engine.keepalive is None:
                self._read(seconds)
            else:
                self._read_alive(seconds)
            read = True

    def _read_alive(self, seconds: Optional[float]) -> None:
        """:meth:`_read` with keepalive: wake up to PING a quiet peer, and
        give up on one that answers nothing (ConnectionClosedError)."""
        keepalive = self._engine.keepalive
        assert keepalive is not None
        end = FOREVER if seconds is None else time.monotonic() + seconds
        while True:
            wake = keepalive.next_wake()
            if wake >= end:
                self._read(remaining(end))
            else:
                try:
                    self._read(max(0.0, wake - time.monotonic()))
                except CallcpTimeout:
                    try:
                        ping = keepalive.woke(self._core, time.monotonic(), unsent(self._sock))
                    except CallcpError:
                        self._abort()
                        raise
                    if ping:
                        self._flush_owed()
                    continue
            keepalive.heard(time.monotonic())
            return

    def _flush_owed(self) -> None:
        """Write what the core owes the peer (a PONG, a PING) now, unless a
        sender holds the socket: it writes them as soon as its write is done."""
        if self._send_lock.acquire(blocking=False):
            try:
                self._write(self._core.data_to_send_parts())
            except CallcpError:
                pass  # the transport broke: the next read reports it
            finally:
                self._send_lock.release()

    def _wrote(self) -> None:
        """(keepalive, under the send lock) Application bytes went out: the
        network and the peer take them, a sign of life (not so for our own
        PINGs and PONGs); and what the core owes the peer meanwhile (a PONG,
        a PING) goes out now, not with the next message."""
        keepalive = self._engine.keepalive
        assert keepalive is not None
        keepalive.heard(time.monotonic())
        if self._core.owes:
            try:
                self._write(self._core.data_to_send_parts())
            except CallcpError:
                pass  # (the message went out whole: the next call reports the failure)


# ================================================================== client


def connect(host: str, port: int = DEFAULT_PORT, **options: Unpack[ClientKwargs]) -> Connection:
    """Open a callcp/2 connection and run the client side of the handshake.

    The options are :class:`callcp.ClientOptions`'s.  The server's key is
    checked against ``server_fingerprint`` if given, else against the
    known-hosts file (``known_hosts``, default ``~/.callcp/known_hosts``; an
    unknown server is trusted on first use unless
    ``trust_on_first_use=False``).  ``insecure=True`` turns checking off,
    loudly.  Returns once the client's key exchange is sent, so the first
    request shares its flight (1-RTT); the server's Finished is checked
    before any reply is returned.  With ``retry=callcp.Retry(...)`` it also
    waits for the server's Finished, and tries again (with backoff) after a
    RetryableError: nothing listening, a reset, a timeout, a busy server.

    Raises:
        ServerKeyChanged, UnknownServerKey: the server's key is not trusted.
        HandshakeError: any other handshake failure.
        CallcpTimeout, TransportError: the network failed (nothing listening,
            unreachable, timeout).
        KeyManagementError: ``client_key`` could not be loaded.
        ValueError, TypeError: an option is invalid or unknown.
    """
    return open_connection(host, port, ClientOptions(**options))


def open_connection(host: str, port: int, options: ClientOptions) -> Connection:
    """:func:`connect` with its options as one :class:`ClientOptions`."""
    if options.retry is None:
        return connect_once(host, port, options)
    attempts = Attempts(options.retry, logger_for(options.logger), f"connecting to {host}:{port}")
    while True:
        try:
            return connect_once(host, port, options, confirm=True)
        except CallcpError as exc:
            wait = attempts.again(exc)
            if wait is None:
                raise
        time.sleep(wait)


def connect_once(
    host: str, port: int, options: ClientOptions, *, confirm: bool = False
) -> Connection:
    """One try of :func:`open_connection` (``confirm``: wait for the
    server's Finished)."""
    check_port(port, allow_zero=False)
    engine = Engine(
        client_protocol(host, port, options),
        keepalive=keepalive_for(options.keepalive_interval, options.keepalive_timeout),
    )
    try:
        sock = socket.create_connection((host, port), timeout=options.timeout)
    except OSError as exc:
        raise _translate(exc, f"connecting to {host}:{port}") from exc
    except UnicodeError:  # (the IDNA codec: an empty label, one over 63 characters)
        raise TransportError(f"invalid host name {printable(str(host))!r}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(sock, engine, timeout=options.timeout)
    conn.remote_address = conn.remote_address or (host, port)
    try:
        conn.do_handshake(confirm=confirm)
    except BaseException:
        conn._close_socket()
        raise
    return conn


# ================================================================== server

Handler = Callable[[Connection], Any]


class Server(ServerBase):
    """A threaded callcp/2 server; see :func:`serve`."""

    def __init__(
        self, handler: Handler, host: Optional[str], port: int, options: ServerOptions
    ) -> None:
        check_port(port, allow_zero=True)
        self._handler = handler
        self._core = core = ServerCore(options)
        self.options = options
        self.keypair = core.keypair
        self._log = core.log
        self._lock = threading.Lock()
        self._active: Set[Connection] = set()
        self._busy = 0  # connections with a thread (key exchange or handler)
        self._idle = threading.Condition(self._lock)  # notified when _busy drops
        self._threads = ThreadPool()
        self._acceptor: Optional[Acceptor] = None
        self._stopped = threading.Event()
        self._stopped.set()
        self._shut_down = False
        self._pool: Optional[WorkerPool] = None
        self.workers = options.workers
        if options.workers == 1:
            self._sock = listen(host, port, options.backlog, options.reuse_port)
            self._address = tuple(self._sock.getsockname())
            self._acceptor = Acceptor(self._sock, core, self._start)
            return
        self._pool = workers.for_server(host, port, options, self.keypair, _worker, handler)
        self._sock, self._address = self._pool.reserved, self._pool.address  # type: ignore[assignment]
        self._pool.start_or_close()  # listening starts now, as for one process
        core.listening(self._address, options.workers)

    @property
    def server_address(self) -> Address:
        """The bound address (still known after shutdown)."""
        return self._address

    @property
    def port(self) -> int:
        """The bound port (useful with port 0; still known after shutdown)."""
        port: int = self._address[1]
        return port

    def serve_forever(self, poll_interval: float = 0.5, *, handle_signals: bool = False) -> None:
        """Accept and serve connections until :meth:`shutdown` (returns at
        once if shutdown was already requested).

        ``handle_signals=True`` (from the main thread): Ctrl-C (SIGINT) and
        SIGTERM shut the server down gracefully, as :meth:`shutdown` does,
        and ``serve_forever()`` then returns normally: no traceback.  The
        previous handlers are put back.
        """
        if handle_signals:
            with _stopping_on_signals():
                try:
                    self.serve_forever(poll_interval)
                except KeyboardInterrupt:
                    self._log.info("callcp server: shutting down (signal)")
            self.shutdown()
            return
        with self._lock:
            if self._core.stopping:
                return
            self._stopped.clear()
        try:
            if self._acceptor is not None:
                self._core.listening(self._address, 1)
                self._acceptor.run()
            else:
                assert self._pool is not None
                self._pool.wait(poll_interval, stop=lambda: self._core.stopping)
        finally:
            self._stopped.set()

    def _start(self, arrival: Arrival) -> None:
        """The arrival got its key-exchange slot: a thread serves it."""
        self._threads.submit(self._serve_one, arrival)

    def _serve_one(self, arrival: Arrival) -> None:
        core, options = self._core, self._core.options
        addr, engine = arrival.addr, arrival.engine
        conn = Connection(arrival.io, engine, timeout=options.idle_timeout, decrypt=arrival.decrypt)
        conn.remote_address = addr  # (the client's, when a trusted proxy's header named it)
        with self._lock:
            self._active.add(conn)
            self._busy += 1
        try:
            try:
                conn.do_handshake()
            except Exception as exc:
                core.handshake_failed(addr, exc)
                return
            finally:
                arrival.key_exchange_done()
            core.connected(addr, engine)
            error: Optional[BaseException] = None
            try:
                self._handler(conn)
            except Exception as exc:  # the outcome policy decides what it means
                error = exc
            core.ended(addr, engine, handler_outcome(error, options.idle_timeout), error)
        finally:
            arrival.release()  # (before the descriptor can be reused)
            conn.close()
            with self._lock:
                self._active.discard(conn)
                self._busy -= 1
                self._idle.notify_all()

    def shutdown(self, timeout: Optional[float] = None, *, grace: Optional[float] = None) -> None:
        """Graceful drain: stop accepting, close idle connections at once
        (an authenticated close, GOING_AWAY), let in-flight handler calls
        finish the message they work on for up to ``grace`` seconds (default
        ``shutdown_timeout``; ``timeout`` is its older name), then close
        every connection left."""
        if grace is not None and timeout is not None:
            raise ValueError("give grace= (or its older name timeout=), not both")
        if self._shut_down:  # (again: done already)
            return
        timeout = grace if grace is not None else timeout
        timeout = self.options.shutdown_timeout if timeout is None else timeout
        with self._lock:
            self._core.stopping = True
        if self._acceptor is not None:
            self._acceptor.wake()
        if self._pool is not None:
            self._pool.stop(timeout + 2.0)  # each worker shuts down gracefully on SIGTERM
        self._stopped.wait(timeout=2.0)
        self._sock.close()
        with self._lock:
            conns = list(self._active)
        for conn in conns:  # idle readers close now, busy handlers after their message
            conn._engine.stop()
        with self._lock:
            done = self._idle.wait_for(lambda: self._busy == 0, timeout)
            conns = [] if done else list(self._active)
        for conn in conns:  # past the deadline: close what is left, all at once
            # (from this thread, while a handler may be reading: "delivered" unknown)
            conn._engine.close(CloseCode.GOING_AWAY, _engine.SHUTTING_DOWN, counted=False)
            conn._unblock()
        for conn in conns:
            conn._abort(send_timeout=0.1)
        with self._lock:
            self._idle.wait_for(lambda: self._busy == 0, 1.0)
        if self._acceptor is not None:
            self._acceptor.close()
        self._shut_down = True
        self._core.stopped()

    close = shutdown

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def serve(
    handler: Handler,
    host: Optional[str] = "127.0.0.1",
    port: int = DEFAULT_PORT,
    **options: Unpack[ServerKwargs],
) -> Server:
    """Create a listening :class:`Server` (bound now; call ``serve_forever()``).

    ``handler(conn)`` runs in its own thread for each connection, after the
    handshake (and client authorization) succeeded; the connection is closed
    when it returns.  The options, their defaults and the limits they set
    are :class:`callcp.ServerOptions`'s (the same for :func:`callcp.aio.serve`).
    ``workers=N`` (N > 1) forks N processes that accept on the port with
    SO_REUSEPORT (Linux); the handler then runs in them.

    Raises:
        ValueError, TypeError: an option is invalid or unknown.
        KeyManagementError: the key could not be loaded or created.
        TransportError: the address could not be bound.
    """
    return Server(handler, host, port, ServerOptions(**options))


class _stopping_on_signals:  # noqa: N801 - a context manager, used like a function
    """While active, SIGTERM raises KeyboardInterrupt in the main thread, as
    Ctrl-C does (signal handlers can only be set from the main thread)."""

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("handle_signals=True needs the main thread (signal handlers)")
        self._previous = signal.signal(signal.SIGTERM, _interrupt)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _worker(
    handler: Handler,
    host: Optional[str],
    port: int,
    options: ServerOptions,
    ready: Callable[[], None],
) -> None:
    """One worker process of a ``workers=N`` server: an ordinary server on a
    SO_REUSEPORT socket, shut down gracefully on SIGTERM."""
    server = Server(handler, host, port, options)
    stopper: List[threading.Thread] = []

    def on_term(signum: int, frame: Any) -> None:
        if not stopper:  # shutdown() waits for serve_forever: not from its thread
            stopper.append(threading.Thread(target=server.shutdown, name="callcp-stop"))
            stopper[0].start()

    signal.signal(signal.SIGTERM, on_term)
    ready()
    server.serve_forever()
    for thread in stopper:
        thread.join()
