"""``workers=N``: N server processes accepting on one port (SO_REUSEPORT).

The parent binds the port first without listening (so port 0 becomes a real
port and stays reserved), then forks N worker processes.  Each worker binds
its own listening socket to that port with SO_REUSEPORT and runs an ordinary
one-process server; the kernel spreads new connections over them.  The
parent only supervises: it waits for the workers and, on shutdown, sends each
SIGTERM, on which a worker shuts down gracefully (authenticated closes).

Workers are forked, so handlers need not be picklable, and the server key is
loaded once in the parent.  This needs a platform with SO_REUSEPORT load
balancing (Linux); elsewhere ``workers > 1`` raises ValueError.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
from typing import Any, Callable, List, Optional, Tuple

from ._options import CALLCP1

__all__ = ["reserve_port", "WorkerPool", "check_workers", "for_server"]


def check_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, not {workers!r}")
    if workers > 1 and (not hasattr(socket, "SO_REUSEPORT") or not hasattr(os, "fork")):
        raise ValueError("workers > 1 needs SO_REUSEPORT and fork (Linux)")


def reserve_port(host: Optional[str], port: int) -> Tuple[socket.socket, Tuple[Any, ...]]:
    """Bind (but do not listen on) host:port with SO_REUSEPORT; return the
    socket, which holds the port, and the bound address."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock, tuple(sock.getsockname())


def for_server(
    host: Optional[str],
    port: int,
    options: Any,
    keypair: Any,
    target: Callable[..., None],
    handler: Any,
) -> WorkerPool:
    """(``workers=N``, N > 1) Reserve host:port, so port 0 becomes a real
    port, and prepare N processes that each run ``target(handler, host,
    port, worker_options, ready)``: an ordinary one-process server on the
    port with SO_REUSEPORT, using the key loaded here.  Start it with
    ``start()``; ``stop()`` also lets go of the port.

    Raises:
        TransportError: the address could not be bound.
    """
    from ._common import translate_oserror

    try:
        sock, address = reserve_port(host, port)
    except OSError as exc:
        raise translate_oserror(exc, f"listening on {host}:{port}") from exc
    worker_options = options.replace(key=keypair, workers=1, reuse_port=True)
    if worker_options.ticket_key is None and options.protocol != CALLCP1:
        # the workers resume each other's sessions
        worker_options = worker_options.replace(ticket_key=os.urandom(32))
    pool = WorkerPool(options.workers, target, (handler, host, address[1], worker_options))
    pool.reserved, pool.address = sock, address
    return pool


class WorkerPool:
    """N forked processes, each running ``target(*args)``."""

    def __init__(self, count: int, target: Callable[..., None], args: Tuple[Any, ...]) -> None:
        self.reserved: Optional[socket.socket] = None  # a socket holding the port
        self.address: Tuple[Any, ...] = ()
        ctx = multiprocessing.get_context("fork")
        self._ready = ctx.Semaphore(0)
        self.processes: List[Any] = [
            ctx.Process(target=_run, args=(target, args, self._ready), name=f"callcp-worker-{i}")
            for i in range(count)
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start every worker and wait until each is listening."""
        for process in self.processes:
            process.start()
        deadline = time.monotonic() + timeout
        for _ in self.processes:
            if not self._ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self.stop(1.0)
                raise RuntimeError("a callcp worker process did not start listening")

    def start_or_close(self) -> None:
        """``start()``, letting go of the port if it fails."""
        try:
            self.start()
        except BaseException:
            self.stop(1.0)
            raise

    @property
    def alive(self) -> int:
        return sum(1 for p in self.processes if p.is_alive())

    def wait(self, poll: float = 0.5, stop: Optional[Callable[[], bool]] = None) -> None:
        """Block until every worker has exited (or ``stop()`` says so)."""
        while self.alive and not (stop is not None and stop()):
            time.sleep(poll)

    def stop(self, timeout: float) -> None:
        """SIGTERM every worker (a graceful shutdown), then SIGKILL what is
        left after ``timeout`` seconds."""
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(1.0)
        if self.reserved is not None:
            self.reserved.close()


def _run(target: Callable[..., None], args: Tuple[Any, ...], ready: Any) -> None:
    # The parent's SIGINT handling (e.g. Ctrl-C in a terminal reaches the
    # whole process group) is left to the parent: it stops us with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target(*args, ready.release)
