"""The blocking side of connections: :class:`SocketLink` moves bytes between
one socket and its engine's core under kernel deadlines (the asyncio
adapter's counterpart is ``_aiolink.Link``); and socket odds and ends:
listening, gathering writes, a best-effort last word, a pool of reusable
threads."""

from __future__ import annotations

import fcntl
import queue
import selectors
import socket
import struct
import termios
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple, Union

from ._common import translate_oserror
from ._core.errors import CallcpError, CallcpTimeout
from ._engine import Engine
from ._workers import reserve_port

__all__ = [
    "SocketLink",
    "Acceptor",
    "ThreadPool",
    "listen",
    "reserve",
    "send_and_close",
    "peer_alive",
    "remaining",
    "unsent",
    "FOREVER",
]

IOV_MAX = 512
#: Bytes asked of the socket per read: small reads go through one reusable
#: buffer; once a read fills it, bulk transfer is likely and reads grow.
READ_SIZE = 256 * 1024
FIRST_READ_SIZE = 16 * 1024
#: Below this many bytes, pieces are joined and written with one send().
GATHER_MIN = 16 * 1024
#: How long an abort waits for a sender to let go of the socket.
CLOSE_WAIT = 0.5
FOREVER = float("inf")


class SocketLink:
    """One connection's blocking socket and its engine.  Deadlines are the
    kernel's (SO_RCVTIMEO/SO_SNDTIMEO: no poll() per call).  ``_send_lock``
    owns everything written (the core seals records only when asked for its
    output, under that lock); ``_recv_lock`` serialises receivers."""

    def __init__(self, sock: socket.socket, engine: Engine, timeout: Optional[float]) -> None:
        self._sock = sock
        self._engine = engine
        self._core = engine.core
        self._timeout = timeout
        self._rbuf = bytearray(FIRST_READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._bulk = False
        self._send_lock = threading.RLock()
        self._recv_lock = threading.Lock()
        self._closed = False
        self._rcv_timeout: Optional[float] = None  # SO_RCVTIMEO as set
        self._snd_timeout = timeout  # SO_SNDTIMEO as set
        engine.wake = self._wake
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(timeout))
        try:
            self.remote_address: Tuple[Any, ...] = tuple(sock.getpeername())
        except OSError:
            self.remote_address = ()
        self.local_address: Tuple[Any, ...] = tuple(sock.getsockname())

    @property
    def closed(self) -> bool:
        """True once the connection is closed; it then refuses further use."""
        return self._closed

    def settimeout(self, timeout: Optional[float]) -> None:
        """Deadline in seconds for each later blocking operation (None: wait forever)."""
        self._timeout = timeout
        self._snd_timeout = timeout
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(timeout))

    def _read(self, timeout: Optional[float]) -> None:
        self._core.receive_data(self._recv(timeout))

    def _recv(self, timeout: Optional[float]) -> Union[bytes, memoryview]:
        """One read (``b""``: end of stream).  A small read is a view into the
        reusable buffer, valid until the next read: feed it to the core now."""
        if timeout != self._rcv_timeout:  # (a syscall saved per read on the common path)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(timeout))
            self._rcv_timeout = timeout
        data: Union[bytes, memoryview]
        try:
            if self._bulk:  # large reads straight into new bytes (decrypted in place)
                data = self._sock.recv(READ_SIZE)
                self._bulk = len(data) >= FIRST_READ_SIZE
            else:
                n = self._sock.recv_into(self._rbuf)
                data = self._rview[:n]
                self._bulk = n == FIRST_READ_SIZE
        except OSError as exc:
            if self._closed:
                raise self._engine.lost_error() from None
            err = translate_oserror(exc, "receiving")
            if isinstance(err, CallcpTimeout):  # the connection stays usable
                raise err from None
            self._core.fail(err)
            self._abort()
            raise err from exc
        if not data and self._engine.interruption is not None:  # our wake-up, not EOF
            try:
                self._engine.check_interrupt()
            except CallcpError:
                self._abort()
                raise
        return data

    def _write(self, data: Union[bytes, List[bytes]]) -> None:
        """Write under ``_send_lock``; a failed write kills the connection.
        Large lists of pieces go out with gathering writes (no joining copy)."""
        if not data:
            return
        try:
            if isinstance(data, bytes):
                self._send_all(data)
            elif len(data) <= 2 and sum(map(len, data)) <= GATHER_MIN:
                self._send_all(b"".join(data))
            else:
                self._send_all(data)
        except OSError as exc:
            raise self._write_failed(exc) from exc

    def _send_all(self, data: Union[bytes, List[bytes]]) -> None:
        """sendall() (a list: gathering writes, no joining copy) within ONE
        deadline, ``timeout`` from now: the kernel's SO_SNDTIMEO restarts
        with every call that moves a byte, so a peer that reads a trickle
        would otherwise hold a send for ever.  The common case is one call."""
        sock = self._sock
        timeout = self._timeout
        started = time.monotonic()
        if isinstance(data, bytes):
            sent = sock.send(data)
            if sent == len(data):
                return
            views: List[Any] = [memoryview(data)[sent:]]
        else:
            views = list(data)
        try:
            while views:
                if timeout is not None:
                    left = timeout - (time.monotonic() - started)
                    if left <= 0:
                        raise socket.timeout("the send deadline passed")
                    if left < self._snd_timeout_or_inf():
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(left))
                        self._snd_timeout = left
                sent = sock.sendmsg(views[:IOV_MAX])
                while sent:
                    first = len(views[0])
                    if sent >= first:
                        sent -= first
                        del views[0]
                    else:
                        views[0] = memoryview(views[0])[sent:]
                        sent = 0
        finally:
            if self._snd_timeout != timeout:  # (the next call gets its whole timeout)
                self._snd_timeout = timeout
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(timeout))
                except OSError:
                    pass  # (closed meanwhile)

    def _snd_timeout_or_inf(self) -> float:
        return FOREVER if self._snd_timeout is None else self._snd_timeout

    def _write_failed(self, exc: OSError) -> CallcpError:
        """A write failed: the connection is dead; the error to raise.  If the
        peer closed on us (a refused upload), its CLOSE may be waiting
        unread: then that is the error (its code and reason), not a reset."""
        if self._closed:  # closed under us (a forced shutdown)
            return self._engine.lost_error()
        err: CallcpError = translate_oserror(exc, "sending")
        # The receiving half of the core is the reader's: only with the
        # receive lock may this thread read the peer's CLOSE or fail the core.
        # Else the reader fails it at its next read (never in the middle of a
        # message it is assembling).
        if self._recv_lock.acquire(blocking=False):
            try:
                if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                    self._core.receive_data(self._sock.recv(READ_SIZE, socket.MSG_DONTWAIT))
                    err = self._engine.peer_close_or(err)
            except OSError:
                pass
            finally:
                self._core.fail(err)
                self._recv_lock.release()
        else:
            self._engine.transport_broke(err)
        self._close_socket()
        return err

    def _abort(self, send_timeout: Optional[float] = None) -> None:
        """Write what the core has queued (a CLOSE, an ALERT), best effort,
        and close.  A sender stuck on a peer that does not read holds the
        send lock: after CLOSE_WAIT the socket is closed anyway."""
        if self._closed:
            return
        if self._send_lock.acquire(timeout=CLOSE_WAIT):
            try:
                if send_timeout is not None:
                    self._sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(send_timeout)
                    )
                self._write(self._core.data_to_send())
            except (CallcpError, OSError):
                pass
            finally:
                self._send_lock.release()
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

    def _unblock(self) -> None:
        """(forced shutdown, any thread) A sender stuck on a peer that does
        not read is released now: its socket stops sending and receiving."""
        if not self._closed and self._send_lock.acquire(blocking=False):
            self._send_lock.release()  # (nobody is writing: abort() will say goodbye)
            return
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _wake(self) -> None:
        """(any thread) End a blocked read: the reader sees the interrupt."""
        if self._closed:  # (its descriptor may belong to another socket by now)
            return
        try:
            self._sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


def unsent(sock: socket.socket) -> int:
    """Bytes in the socket's send queue that the peer has not acknowledged
    yet (Linux SIOCOUTQ; 0 where it cannot be read)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, AttributeError, ValueError):
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count


def remaining(deadline: float) -> Optional[float]:
    """Seconds left until ``deadline`` (None: no deadline); CallcpTimeout if none."""
    if deadline == FOREVER:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise CallcpTimeout("timed out while receiving")
    return left


def listen(host: Optional[str], port: int, backlog: int, reuse_port: bool) -> socket.socket:
    """A listening socket on host:port.

    Raises:
        TransportError: it could not be bound (in use, not a local address...).
    """
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
        raise translate_oserror(exc, f"listening on {host}:{port}") from exc
    return sock


def reserve(host: Optional[str], port: int) -> Tuple[socket.socket, Tuple[Any, ...]]:
    """``reserve_port`` with callcp's errors."""
    try:
        return reserve_port(host, port)
    except OSError as exc:
        raise translate_oserror(exc, f"listening on {host}:{port}") from exc


def send_and_close(sock: socket.socket, data: bytes) -> None:
    """Best effort, never blocking: a refusal or an alert, then close."""
    try:
        sock.setblocking(False)
        if data:
            sock.send(data)
    except OSError:
        pass
    sock.close()


def peer_alive(sock: socket.socket) -> bool:
    """The peer has not closed (checked before spending RSA work on it)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def timeval(timeout: Optional[float]) -> bytes:
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO (zero means "no timeout",
    so a deadline already reached becomes one microsecond)."""
    if timeout is None:
        return struct.pack("@ll", 0, 0)
    micros = max(1, int(timeout * 1_000_000))
    return struct.pack("@ll", micros // 1_000_000, micros % 1_000_000)


class Acceptor:
    """The blocking server's selector thread: it accepts, and holds each
    connection until its whole ClientHello is in, then queues it for a
    key-exchange slot; ``start(arrival)`` hands it to a thread when a slot is
    free.  A peer that trickles or withholds its hello costs a small buffer
    and a file descriptor, never a thread, until its handshake deadline."""

    def __init__(self, sock: socket.socket, core: Any, start: Callable[[Any], None]) -> None:
        self._sock = sock
        self._core = core  # (a ServerCore)
        self._start = start
        # In accept order = deadline order; weak, so an arrival that started or
        # was dropped is freed at once, not when the silent one ahead expires.
        self._arrivals: Deque[Any] = deque()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()

    def wake(self) -> None:
        """(any thread) Make run() look at ``core.stopping`` now."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def run(self) -> None:
        """Accept and hold arrivals until the server stops."""
        sel, core, arrivals = self._sel, self._core, self._arrivals
        self._sock.setblocking(False)
        sel.register(self._sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        paused_until = 0.0
        try:
            while not core.stopping:
                now = time.monotonic()
                if paused_until and now >= paused_until:
                    sel.register(self._sock, selectors.EVENT_READ, None)
                    paused_until = 0.0
                wait = arrivals[0][0] - now if arrivals else 1.0
                for key, _ in sel.select(min(1.0, max(0.0, wait))):
                    if key.data is None:
                        if not self._accept_some():  # EMFILE and the like: do not spin
                            sel.unregister(self._sock)
                            paused_until = time.monotonic() + 0.1
                    elif key.data is self._wake_r:
                        self._wake_r.recv(4096)
                    else:
                        self._readable(key.data)
                core.prepare()  # the next connection's ServerHello, while idle
                now = time.monotonic()
                while arrivals:
                    deadline, ref = arrivals[0]
                    arrival = ref()
                    if arrival is not None and not arrival.gone and deadline > now:
                        break
                    arrivals.popleft()
                    if arrival is not None and not arrival.gone:
                        if arrival.state == "hello":
                            sel.unregister(arrival.io)
                        if arrival.expire():
                            self._drop(arrival)
                core.notices.flush()
        finally:
            for _, ref in arrivals:
                arrival = ref()
                if arrival is None or arrival.gone:
                    continue
                if arrival.state == "hello":
                    sel.unregister(arrival.io)
                if arrival.stop():
                    self._drop(arrival)
            arrivals.clear()
            sel.close()

    def _accept_some(self) -> bool:
        """Accept what is waiting (a bounded batch); False if accept failed."""
        for _ in range(64):
            try:
                sock, addr = self._sock.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                self._core.notices.note("accept failed", "", "accept failed: %s", exc)
                return False
            arrival, first = self._core.arrive(addr)
            if arrival is None:
                send_and_close(sock, first)
                continue
            arrival.io = sock
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.send(first)  # the ServerHello (a fresh socket takes it whole)
            except OSError:
                arrival.received(b"")  # dropped, noted
                self._drop(arrival)
                continue
            self._sel.register(sock, selectors.EVENT_READ, arrival)
            self._arrivals.append((arrival.deadline, weakref.ref(arrival)))
        return True

    def _readable(self, arrival: Any) -> None:
        sock: socket.socket = arrival.io
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            arrival.engine.transport_lost(translate_oserror(exc, "receiving"))
        if not arrival.received(data):
            return
        self._sel.unregister(sock)  # the kernel holds the rest
        arrival.queue(
            lambda: self._start(arrival),
            lambda: arrival.wanted(peer_alive(sock)),
            lambda: self._drop(arrival),
        )
        if arrival.state == "dropped":
            self._drop(arrival)

    def _drop(self, arrival: Any) -> None:
        """Close a connection still in the acceptor's hands, with the ALERT
        the engine queued."""
        send_and_close(arrival.io, arrival.engine.core.data_to_send())
        arrival.release()


class ThreadPool:
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
            args = ()  # (an idle thread keeps nothing of its last connection)
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
