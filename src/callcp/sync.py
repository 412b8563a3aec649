"""The blocking adapter: sockets and threads around the sans-I/O core.

This module only moves bytes: every protocol decision is made by
``callcp._core.protocol``.  OSError is translated into callcp errors in one
place, ``_common.translate_oserror``.

Threading: a Connection may be used by one thread receiving while another
sends.  ``_proto_lock`` guards the core object; ``_send_lock`` keeps queued
bytes in order on the socket; ``_recv_lock`` serialises receivers.
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterator, List, Optional, Set, Tuple, Union

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
    ConnectionClosedOK,
    HandshakeTimeout,
    MessagePending,
    StreamPending,
)
from ._core.events import (
    NEED_DATA,
    CloseReceived,
    HandshakeCompleted,
    MessageReceived,
    ServerKeyAccepted,
    StreamStarted,
)
from ._core.protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ServerProtocol,
    State,
    _Protocol,
)
from ._core.wire import alert_frame
from ._streams import (
    Destination,
    Progress,
    Source,
    StreamInfo,
    StreamReception,
    iter_chunks,
    source_size,
)
from ._workers import WorkerPool, check_workers, reserve_port

__all__ = ["Connection", "Server", "connect", "serve"]

#: Bytes asked of the socket per read.
READ_SIZE = 256 * 1024
FIRST_READ_SIZE = 16 * 1024
#: Below this many bytes, pieces are joined and written with one send().
GATHER_MIN = 16 * 1024
IOV_MAX = 512
DEFAULT_TIMEOUT = 30.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_MAX_HANDSHAKES = 64

Address = Tuple[Any, ...]


class _Default:
    """Sentinel type: "use the connection's timeout"."""

    __slots__ = ()


DEFAULT = _Default()
Buffer = Union[bytes, bytearray, memoryview]


class Connection:
    """One encrypted, authenticated, message-oriented connection.

    Obtained from :func:`connect` (client) or given to a :func:`serve`
    handler (server).  Messages keep their boundaries; each is any size up to
    the receiver's ``max_message_size``.
    """

    def __init__(
        self,
        sock: socket.socket,
        proto: _Protocol,
        *,
        timeout: Optional[float],
        logger: logging.Logger,
    ) -> None:
        self._sock = sock
        # Small reads go through one reusable buffer (allocating a 256 KiB
        # object per read costs more than a small message); once a read fills
        # it, bulk transfer is likely and reads become large ones.
        self._rbuf = bytearray(FIRST_READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._bulk = False
        self._proto = proto
        self._timeout = timeout
        self._log = logger
        self._proto_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._reading = False
        self._pending: Any = None  # an event recv()/recv_stream() handed back
        self._stopping = False  # the server is shutting down
        self._stoppable = False  # set on a server's connections
        self._woken_to_stop = False  # a shutdown cut our blocked read short
        self._closed = False
        self._rcv_timeout: Optional[float] = None
        # Deadlines are kept by the kernel (SO_RCVTIMEO/SO_SNDTIMEO) on a
        # blocking socket: a Python-level timeout would cost a poll() before
        # every read and write, and an ioctl each time it changes.
        sock.settimeout(None)
        self._set_send_timeout(timeout)
        try:
            self.remote_address: Address = tuple(sock.getpeername())
        except OSError:
            self.remote_address = ()
        self.local_address: Address = tuple(sock.getsockname())

    # ------------------------------------------------------------ properties

    @property
    def peer_fingerprint(self) -> Optional[str]:
        """The peer's key fingerprint (``SHA256:...``): the server's on a
        client; the client's on a server with client authentication, else None."""
        return self._proto.peer_fingerprint

    @property
    def closed(self) -> bool:
        return self._closed

    def settimeout(self, timeout: Optional[float]) -> None:
        """Deadline in seconds for each later blocking operation (None: wait forever)."""
        self._timeout = timeout
        self._set_send_timeout(timeout)

    def _set_send_timeout(self, timeout: Optional[float]) -> None:
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))

    def _set_recv_timeout(self, timeout: Optional[float]) -> None:
        """Set SO_RCVTIMEO unless the current value is close enough (within 5
        ms below): one syscall saved per read on the common path."""
        current = self._rcv_timeout
        if timeout is None:
            if current is None:
                return
        elif current is not None and timeout - 0.005 <= current <= timeout:
            return
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
        self._rcv_timeout = timeout

    # -------------------------------------------------------------- sending

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
            with self._proto_lock:
                self._proto.send(message)
                out = self._proto.data_to_send_parts()
            self._write(out)

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
        receiver discards it) and the error is raised here.

        Every byte is authenticated by the record layer, and the receiver
        checks the length at the end.  ``checksum=True`` adds a SHA-256 of
        the payload, checked by the receiver and returned by both sides
        (useful to show or store; it costs a hash of every byte on each side,
        which is slower than the encryption).

        Returns the stream's length, SHA-256 (hex; None without
        ``checksum``) and name.

        Raises:
            ConnectionClosed, CallcpTimeout, TransportError: the connection failed.
            LocalProtocolError: the connection cannot send now.
            Whatever reading ``source`` raises (the stream is then aborted).
        """
        if size is None:
            size = source_size(source)
        with self._send_lock:
            with self._proto_lock:
                self._proto.start_stream(size, name, checksum=checksum)
                out = self._proto.data_to_send()
            self._write(out)
            done = 0
            try:
                for chunk in iter_chunks(source):
                    with self._proto_lock:
                        self._proto.send_stream_data(chunk)
                        parts = self._proto.data_to_send_parts()
                    self._write(parts)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, size)
            except BaseException as exc:
                # Whatever stopped us (the source, the progress callback, an
                # interrupt), the peer must not be left inside the stream.
                self._abort_stream(exc)
                raise
            with self._proto_lock:
                length, digest = self._proto.end_stream()
                out = self._proto.data_to_send()
            self._write(out)
        return StreamInfo(length, digest.hex() if digest is not None else None, name)

    def _abort_stream(self, exc: BaseException) -> None:
        """(under ``_send_lock``) Tell the peer the stream is abandoned; if that
        cannot be sent, the connection is closed."""
        with self._proto_lock:
            if not (self._proto.sending_stream and self._proto.can_send):
                return
            self._proto.abort_stream(f"the sender failed ({type(exc).__name__})")
            out = self._proto.data_to_send()
        try:
            self._write(out)
        except CallcpError:
            pass  # _write failed the connection

    def _write(self, data: Union[bytes, List[bytes]]) -> None:
        """Write under ``_send_lock``; a failed write kills the connection.
        A list of pieces is written with gathering writes when it is large
        (no copy into one buffer), joined when it is small."""
        if not data:
            return
        try:
            if isinstance(data, bytes):
                self._sock.sendall(data)
            elif len(data) <= 2 and sum(map(len, data)) <= GATHER_MIN:
                self._sock.sendall(b"".join(data))
            else:
                _sendmsg_all(self._sock, data)
        except OSError as exc:
            if self._closed:  # closed under us (a forced shutdown)
                raise self._proto.closed_error() from None
            err = self._reason_for_write_error(exc)
            with self._proto_lock:
                self._proto.fail(err)
            self._close_socket()
            raise err from exc

    def _reason_for_write_error(self, exc: OSError) -> CallcpError:
        """A write failed, typically because the peer closed on us (a refused
        upload).  Its CLOSE record may be waiting unread: if so, report that
        (with its code and reason) rather than a bare reset."""
        err: CallcpError = _translate(exc, "sending")
        if not isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            return err
        if not self._recv_lock.acquire(blocking=False):
            return err  # a receiver is reading: it will see the close itself
        try:
            try:
                pending = self._sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
            except OSError:
                return err
            return self._close_in(pending, err)
        finally:
            self._recv_lock.release()

    def _close_in(self, pending: bytes, err: CallcpError) -> CallcpError:
        """The peer's close error if ``pending`` holds its CLOSE, else ``err``."""
        with self._proto_lock:
            self._proto.receive_data(pending)
            try:
                while True:
                    event = self._proto.next_event()
                    if event is NEED_DATA:
                        return err
                    if isinstance(event, CloseReceived):
                        return self._proto.closed_error()
            except CallcpError:
                return err

    def _flush(self, *, best_effort: bool = True) -> None:
        """Write whatever the core has queued (close replies, alerts, the
        handshake flight).  With ``best_effort`` a failed write is ignored:
        the connection is failing or closing anyway."""
        with self._send_lock:
            with self._proto_lock:
                out = self._proto.data_to_send()
            try:
                self._write(out)
            except CallcpError:
                if not best_effort:
                    raise

    # ------------------------------------------------------------ receiving

    def recv(self, timeout: Union[float, None, _Default] = DEFAULT) -> bytes:
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
        t = self._timeout if isinstance(timeout, _Default) else timeout
        deadline = None if t is None else time.monotonic() + t
        with self._recv_lock:
            event = self._next_app_event(deadline)
            if isinstance(event, MessageReceived):
                return event.data
            self._pending = event
            raise StreamPending(
                "a stream arrived, not a message: receive it with recv_stream()",
                name=event.name,
                size=event.size,
            )

    def recv_stream(self, dest: Destination, *, progress: Optional[Progress] = None) -> StreamInfo:
        """Receive a stream into ``dest`` (a path, or a binary file) in bounded
        memory, whatever its size.

        A path receives the bytes in ``<path>.part``, renamed to ``<path>``
        only once the stream's length and SHA-256 verified; on failure the
        ``.part`` file is deleted.  A seekable file is truncated back to where
        it started on failure.  ``progress(received, total_or_None)`` is
        called after each chunk.  Each wait for data is bounded by the
        connection's timeout; a timeout in the middle of a stream closes the
        connection.

        Raises:
            StreamAbortedError: the sender abandoned the stream (the connection
                stays usable).
            ConnectionClosedError: the connection broke mid-stream (truncation).
            CryptoError, RemoteProtocolError: a chunk was tampered with, or the
                stream failed its integrity check.
            MessagePending: a message arrived instead (it stays pending for
                :meth:`recv`).
            OSError: ``dest`` could not be written.
        """
        with self._recv_lock:
            event = self._next_app_event(self._deadline())
            started = event
            if not isinstance(started, StreamStarted):
                self._pending = event
                raise MessagePending("a message arrived, not a stream: receive it with recv()")
            try:
                rx = StreamReception(started, dest, progress)
            except BaseException:
                self._abandon_stream("the receiver could not open its output")
                raise
            try:
                while True:
                    info = rx.feed(self._next_app_event(self._deadline()))
                    if info is not None:
                        return info
            except BaseException as exc:
                if rx.failed(exc):
                    self._abandon_stream("the receiver failed in the middle of a stream")
                raise

    def _abandon_stream(self, reason: str) -> None:
        """A stream cannot be received to its end here: close the connection
        (the rest of the stream would otherwise be misread)."""
        self.close(CloseCode.INTERNAL_ERROR, reason)

    def _deadline(self) -> Optional[float]:
        return None if self._timeout is None else time.monotonic() + self._timeout

    def _next_app_event(self, deadline: Optional[float]) -> Any:
        """The next event the application sees (a message or a stream event),
        reading from the socket as needed; the peer's CLOSE raises."""
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        proto = self._proto
        while True:
            if proto.needs_data:  # nothing to parse: read first
                self._read(deadline)
            try:
                with self._proto_lock:
                    event = proto.next_event()
            except CallcpError:
                self._flush()
                self._close_socket()
                raise
            if event is NEED_DATA:
                self._read(deadline)
            elif isinstance(event, CloseReceived):
                self._flush()  # our reply CLOSE
                self._close_socket()
                raise self._proto.closed_error()
            elif not isinstance(event, (HandshakeCompleted, ServerKeyAccepted)):
                return event

    def _next_event(self) -> Any:
        try:
            with self._proto_lock:
                return self._proto.next_event()
        except CallcpError:
            self._flush()
            self._close_socket()
            raise

    def _read(self, deadline: Optional[float]) -> None:
        if self._stoppable:  # (a server's connection: shutdown may wake us)
            with self._state_lock:
                if self._stopping:
                    self._stop_now()
                self._reading = True
        try:
            if deadline is None:
                self._set_recv_timeout(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CallcpTimeout("timed out while receiving")
                self._set_recv_timeout(remaining)
            if self._bulk:
                # Bulk transfer: large reads straight into new bytes objects
                # (the core decrypts in place from them: no copy at all).
                data = self._sock.recv(READ_SIZE)
                if len(data) < FIRST_READ_SIZE:
                    self._bulk = False
            else:
                n = self._sock.recv_into(self._rbuf)
                data = self._rview[:n].tobytes()
                self._bulk = n == FIRST_READ_SIZE
        except OSError as exc:
            if self._closed:
                raise self._proto.closed_error() from None
            err = _translate(exc, "receiving")
            if isinstance(err, CallcpTimeout):
                raise err from None  # the connection stays usable
            with self._proto_lock:
                self._proto.fail(err)
            self._close_socket()
            raise err from exc
        finally:
            if self._stoppable:
                with self._state_lock:
                    self._reading = False
        if not data and self._woken_to_stop:
            self._stop_now()  # our own shutdown ended the read, not the peer
        with self._proto_lock:
            self._proto.receive_data(data)

    def request(self, message: Buffer, timeout: Union[float, None, _Default] = DEFAULT) -> bytes:
        """Send one message and return the next message received."""
        self.send(message)
        return self.recv(timeout)

    def __iter__(self) -> Iterator[bytes]:
        """Incoming messages until the peer closes cleanly (a broken
        connection raises instead of ending the loop).  Each wait is bounded
        by the connection's timeout (the server's ``idle_timeout``)."""
        while True:
            try:
                yield self.recv()
            except ConnectionClosedOK:
                return

    # -------------------------------------------------------------- closing

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send the authenticated close and close the socket; never raises."""
        if self._closed:
            return
        try:
            with self._proto_lock:
                self._proto.close(code, reason)
            self._flush()
        finally:
            self._close_socket()

    def _close_socket(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _stop_now(self) -> None:
        """(server shutdown) close with GOING_AWAY and tell the handler."""
        self.close(CloseCode.GOING_AWAY, "server shutting down")
        raise ConnectionClosedOK(
            "the server is shutting down", code=CloseCode.GOING_AWAY, reason="server shutting down"
        )

    def _begin_stop(self) -> None:
        """Called by Server.shutdown(): an idle reader is woken and closed now;
        a busy handler finishes its current message first."""
        with self._state_lock:
            self._stopping = True
            if self._reading:
                self._woken_to_stop = True
                try:
                    self._sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    def _force_close(self, code: int, reason: str) -> None:
        """Close now, even if another thread is stuck writing to a peer that
        does not read: the authenticated close is sent only if the send lock
        is free (and for at most 0.1 s); the socket is shut down regardless,
        which unblocks any reader or writer."""
        if self._send_lock.acquire(blocking=False):
            try:
                self._set_send_timeout(0.1)
                with self._proto_lock:
                    self._proto.close(code, reason)
                    out = self._proto.data_to_send()
                try:
                    self._write(out)
                except CallcpError:
                    pass
            finally:
                self._send_lock.release()
        with self._proto_lock:
            self._proto.fail(ConnectionClosedOK(reason, code=code, reason=reason))
        self._close_socket()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<callcp.Connection {self.remote_address!r} {self._proto.state.value}>"


# ================================================================== client


def connect(
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
    """Open a callcp/2 connection and run the client side of the handshake.

    The server's key is checked against ``server_fingerprint`` if given, else
    against the known-hosts file (``known_hosts``, default
    ``~/.callcp/known_hosts``; an unknown server is trusted on first use
    unless ``trust_on_first_use=False``).  ``insecure=True`` turns checking
    off, loudly.  Returns once the client's key exchange is sent, so the first
    request shares its flight (1-RTT); the server's Finished is checked before
    any reply is returned.

    Raises:
        ServerKeyChanged, UnknownServerKey: the server's key is not trusted.
        HandshakeError: any other handshake failure.
        CallcpTimeout, TransportError: the network failed (nothing listening,
            unreachable, timeout).
        KeyManagementError: ``client_key`` could not be loaded.
    """
    check_port(port, allow_zero=False)
    log = logger_for(logger)
    proto = client_protocol(
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
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise _translate(exc, f"connecting to {host}:{port}") from exc
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(sock, proto, timeout=timeout, logger=log)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while proto.state is State.WAIT_SERVER_HELLO:
            event = conn._next_event()
            if event is NEED_DATA:
                conn._read(deadline)
        conn._flush(best_effort=False)
    except CallcpTimeout as exc:
        conn._close_socket()
        raise HandshakeTimeout(f"no ServerHello from {host}:{port} within {timeout} s") from exc
    except BaseException:
        conn._close_socket()
        raise
    return conn


# ================================================================== server

Handler = Callable[[Connection], Any]


class Server:
    """A threaded callcp/2 server; see :func:`serve`."""

    def __init__(
        self,
        handler: Handler,
        host: Optional[str] = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        key: Optional[KeySource] = None,
        key_password: Optional[str] = None,
        authorized_keys: Optional[AuthorizedSource] = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        backlog: int = 128,
        reuse_port: bool = False,
        workers: int = 1,
        logger: Optional[logging.Logger] = None,
    ) -> None:
        check_port(port, allow_zero=True)
        check_workers(workers)
        if max_connections < 1 or max_handshakes < 1:
            raise ValueError("max_connections and max_handshakes must be >= 1")
        self._handler = handler
        self._log = logger_for(logger)
        self.keypair = load_server_key(key, password=key_password)
        self._public_der = self.keypair.public_der
        self._authorize = client_authorizer(authorized_keys)
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_message_size = max_message_size
        self._handshakes = threading.BoundedSemaphore(max_handshakes)
        self._lock = threading.Lock()
        self._active: Set[Connection] = set()
        self._busy = 0  # connections being served (bounded by max_connections)
        self._idle = threading.Condition(self._lock)  # notified when _busy drops
        self._threads = _ThreadPool()
        self._shutdown_requested = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self.workers = workers
        self._pool: Optional[WorkerPool] = None
        if workers > 1:
            # The parent supervises; each worker process listens on the port.
            try:
                self._sock, self._address = reserve_port(host, port)
            except OSError as exc:
                raise _translate(exc, f"listening on {host}:{port}") from exc
            worker_args = (
                handler,
                host,
                self._address[1],
                dict(
                    key=self.keypair,
                    authorized_keys=authorized_keys,
                    max_connections=max_connections,
                    max_handshakes=max_handshakes,
                    handshake_timeout=handshake_timeout,
                    idle_timeout=idle_timeout,
                    max_message_size=max_message_size,
                    backlog=backlog,
                    logger=logger,
                ),
            )
            # Listening starts now, as for one process: serve_forever() only waits.
            self._pool = WorkerPool(workers, _sync_worker, worker_args)
            try:
                self._pool.start()
            except BaseException:
                self._sock.close()
                raise
            self._log.info(
                "callcp server listening on %s with %d worker processes (key %s)",
                self._address,
                workers,
                self.fingerprint,
            )
        else:
            self._sock = self._bind(host, port, backlog, reuse_port)
            self._address = tuple(self._sock.getsockname())

    @staticmethod
    def _bind(host: Optional[str], port: int, backlog: int, reuse_port: bool) -> socket.socket:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(addr)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            raise _translate(exc, f"listening on {host}:{port}") from exc
        return sock

    # ------------------------------------------------------------ properties

    @property
    def server_address(self) -> Address:
        """The bound address (still known after shutdown)."""
        return self._address

    @property
    def port(self) -> int:
        port: int = self._address[1]
        return port

    @property
    def fingerprint(self) -> str:
        return self.keypair.fingerprint

    @property
    def active_connections(self) -> int:
        with self._lock:
            return self._busy

    # ------------------------------------------------------------ serving

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and serve connections until :meth:`shutdown` (returns at
        once if shutdown was already requested)."""
        with self._lock:
            if self._shutdown_requested.is_set():
                return
            self._stopped.clear()
        if self.workers > 1:
            self._supervise(poll_interval)
            return
        try:
            self._sock.settimeout(poll_interval)
            self._log.info(
                "callcp server listening on %s (key %s)", self.server_address, self.fingerprint
            )
            while not self._shutdown_requested.is_set():
                try:
                    sock, addr = self._sock.accept()
                except socket.timeout:
                    continue
                except OSError as exc:
                    if self._shutdown_requested.is_set():
                        break
                    self._log.warning("accept failed: %s", exc)
                    time.sleep(0.05)  # e.g. EMFILE: do not spin
                    continue
                self._admit(sock, addr)
        finally:
            self._stopped.set()

    def _supervise(self, poll_interval: float) -> None:
        """(workers > 1) wait for the worker processes until shutdown."""
        assert self._pool is not None
        try:
            self._pool.wait(poll_interval, stop=self._shutdown_requested.is_set)
        finally:
            self._stopped.set()

    def _admit(self, sock: socket.socket, addr: Address) -> None:
        with self._lock:
            full = self._busy >= self.max_connections
            if not full:
                self._busy += 1
        if full:
            self._log.warning(
                "refused %s: max_connections (%d) reached", _fmt(addr), self.max_connections
            )
            try:
                sock.settimeout(0)
                sock.send(alert_frame(CloseCode.GOING_AWAY, "server busy: too many connections"))
            except OSError:
                pass
            sock.close()
            return
        self._threads.submit(self._serve_one, sock, addr)

    def _serve_one(self, sock: socket.socket, addr: Address) -> None:
        peer = _fmt(addr)
        conn: Optional[Connection] = None
        try:
            conn = self._handshake(sock, peer)
            if conn is None:
                return
            with self._lock:
                self._active.add(conn)
                stopping = self._shutdown_requested.is_set()
            if stopping:
                conn._begin_stop()
            try:
                self._handler(conn)
            except ConnectionClosedOK:
                pass
            except CallcpTimeout:
                self._log.warning("closed %s: idle for more than %s s", peer, self.idle_timeout)
                conn.close(CloseCode.TIMEOUT, "idle timeout")
            except CallcpError as exc:
                self._log.warning("connection %s ended: %s", peer, exc)
            except Exception:
                self._log.exception("handler raised on connection %s", peer)
                conn.close(CloseCode.INTERNAL_ERROR, "internal server error")
        finally:
            if conn is not None:
                conn.close()
                with self._lock:
                    self._active.discard(conn)
            else:
                sock.close()
            with self._lock:
                self._busy -= 1
                self._idle.notify_all()

    def _handshake(self, sock: socket.socket, peer: str) -> Optional[Connection]:
        """Run the server handshake under the handshake deadline (counted from
        accept); None on failure (logged on one line)."""
        deadline = time.monotonic() + self.handshake_timeout
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        proto = ServerProtocol(
            self.keypair.private_key,
            authorize_client=self._authorize,
            max_message_size=self.max_message_size,
            server_public_der=self._public_der,
        )
        conn = Connection(sock, proto, timeout=self.handshake_timeout, logger=self._log)
        conn._stoppable = True
        slot = False
        try:
            proto.start()
            conn._flush()
            # A handshake slot (it bounds the CPU spent on RSA at once) is
            # taken only when the client has sent something: connections that
            # stay silent cannot hold the slots and starve real clients.
            while proto.needs_data:
                conn._read(deadline)
            remaining = deadline - time.monotonic()
            slot = remaining > 0 and self._handshakes.acquire(timeout=remaining)
            if not slot:
                conn._close_socket()
                self._log.warning("dropped %s: too many handshakes in progress", peer)
                return None
            while True:
                event = conn._next_event()
                if event is NEED_DATA:
                    conn._read(deadline)
                elif isinstance(event, HandshakeCompleted):
                    break
            conn._flush()  # our Finished
        except CallcpTimeout:
            err = HandshakeTimeout(f"handshake timed out after {self.handshake_timeout} s")
            with conn._proto_lock:
                proto.fail(err)
            conn._flush()
            conn._close_socket()
            self._log.warning("handshake with %s failed: %s", peer, err)
            return None
        except CallcpError as exc:
            conn._close_socket()
            self._log.warning("handshake with %s failed: %s", peer, exc)
            return None
        finally:
            if slot:
                self._handshakes.release()
        conn.settimeout(self.idle_timeout)
        who = f" as {proto.peer_fingerprint}" if proto.peer_fingerprint else ""
        self._log.debug("connection from %s%s", peer, who)
        return conn

    # ------------------------------------------------------------ stopping

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout``
        seconds), then close every connection with an authenticated close."""
        with self._lock:
            self._shutdown_requested.set()
            pool = self._pool
        if pool is not None:
            pool.stop(timeout + 2.0)  # each worker shuts down gracefully on SIGTERM
        self._stopped.wait(timeout=2.0)
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._active)
        for conn in conns:
            conn._begin_stop()
        with self._lock:
            if not self._idle.wait_for(lambda: self._busy == 0, timeout):
                conns = list(self._active)
            else:
                conns = []
        for conn in conns:  # past the deadline: close what is left
            conn._force_close(CloseCode.GOING_AWAY, "server shutting down")
        with self._lock:
            self._idle.wait_for(lambda: self._busy == 0, 1.0)
        self._log.info("callcp server stopped")

    close = shutdown

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _ThreadPool:
    """Daemon threads that serve one connection after another: a thread is
    started only when none is idle, and an idle one exits after a while.
    (Starting a thread per connection costs more than a handshake's
    symmetric crypto.)  The server bounds how many run at once."""

    IDLE_SECONDS = 30.0

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Tuple[Callable[..., None], Tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            reuse = self._idle > 0
            if reuse:
                self._idle -= 1  # that idle thread will take this job
        if reuse:
            self._jobs.put((fn, args))
        else:
            threading.Thread(target=self._work, args=(fn, args), daemon=True).start()

    def _work(self, fn: Callable[..., None], args: Tuple[Any, ...]) -> None:
        while True:
            fn(*args)  # the server's job catches and logs everything
            with self._lock:
                self._idle += 1
            try:
                fn, args = self._jobs.get(timeout=self.IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody claimed us: leave
                        self._idle -= 1
                        return
                fn, args = self._jobs.get()  # claimed just now: the job is coming


def _sendmsg_all(sock: socket.socket, parts: List[bytes]) -> None:
    """sendall() for a list of buffers, with sendmsg (writev)."""
    views: List[Any] = list(parts)
    while views:
        sent = sock.sendmsg(views[:IOV_MAX])
        while sent:
            first = len(views[0])
            if sent >= first:
                sent -= first
                del views[0]
            else:
                views[0] = memoryview(views[0])[sent:]
                sent = 0


def _timeval(timeout: Optional[float]) -> bytes:
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO (zero means "no timeout",
    so a deadline already reached becomes one microsecond)."""
    if timeout is None:
        return struct.pack("@ll", 0, 0)
    micros = max(1, int(timeout * 1_000_000))
    return struct.pack("@ll", micros // 1_000_000, micros % 1_000_000)


def _fmt(addr: Address) -> str:
    if len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return str(addr)


def _sync_worker(
    handler: Handler,
    host: Optional[str],
    port: int,
    options: Any,
    ready: Callable[[], None],
) -> None:
    """One worker process of a ``workers=N`` server: an ordinary server on a
    SO_REUSEPORT socket, shut down gracefully on SIGTERM."""
    server = Server(handler, host, port, reuse_port=True, **options)
    stopper: list[threading.Thread] = []

    def on_term(signum: int, frame: Any) -> None:
        if not stopper:  # shutdown() waits for serve_forever: not from its thread
            thread = threading.Thread(target=server.shutdown, name="callcp-stop")
            stopper.append(thread)
            thread.start()

    signal.signal(signal.SIGTERM, on_term)
    ready()
    server.serve_forever()
    for thread in stopper:
        thread.join()


def serve(
    handler: Handler,
    host: Optional[str] = "127.0.0.1",
    port: int = DEFAULT_PORT,
    **options: Any,
) -> Server:
    """Create a listening :class:`Server` (bound now; call ``serve_forever()``).

    ``handler(conn)`` runs in its own thread for each connection, after the
    handshake (and client authorization) succeeded; the connection is closed
    when it returns.  Options: ``key`` (KeyPair, RSA private key or PEM path,
    generated on first use; default ``~/.callcp/server_key.pem``),
    ``key_password``, ``authorized_keys`` (path or fingerprints: requires
    client authentication), ``max_connections`` (512), ``max_handshakes``
    (64), ``handshake_timeout`` (10 s), ``idle_timeout`` (300 s),
    ``max_message_size`` (16 MiB), ``backlog``, ``reuse_port``, ``logger``,
    ``workers`` (N > 1: N processes accept on the port with SO_REUSEPORT,
    Linux; the handler then runs in the worker processes).
    """
    return Server(handler, host, port, **options)
