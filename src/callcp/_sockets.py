"""Blocking-socket odds and ends for the blocking adapter (and workers):
listening, gathering writes, kernel deadlines, a best-effort last word, a
pool of reusable threads."""

from __future__ import annotations

import queue
import socket
import struct
import threading
from typing import Any, Callable, List, Optional, Tuple

from ._common import translate_oserror
from ._workers import reserve_port

__all__ = ["listen", "reserve", "send_and_close", "peer_alive", "sendmsg_all", "timeval"]

IOV_MAX = 512


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


def sendmsg_all(sock: socket.socket, parts: List[bytes]) -> None:
    """sendall() for a list of buffers, with sendmsg (writev): no joining copy."""
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


def timeval(timeout: Optional[float]) -> bytes:
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO (zero means "no timeout",
    so a deadline already reached becomes one microsecond)."""
    if timeout is None:
        return struct.pack("@ll", 0, 0)
    micros = max(1, int(timeout * 1_000_000))
    return struct.pack("@ll", micros // 1_000_000, micros % 1_000_000)


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
