"""Connection pools: reuse callcp connections to one server.

``pool = callcp.Pool(host, port, size=8, **client options)``;
``pool.request(message)`` borrows a connection for one request/response, and
``with pool.connection() as conn:`` for several.  Thread-safe.  New
connections resume with the session tickets the server gave earlier ones
(the client's session store), so most cost no RSA work on the server.

An idle connection is checked before it is handed out (:meth:`Connection.poll`
reads what arrived meanwhile: a server going away, a PING) and retired after
``max_idle`` seconds unused or ``max_lifetime`` seconds old.  A connection that
saw an error (an exception left the ``with`` block) is closed, never handed
out again.  ``close()`` closes every connection with the authenticated CLOSE.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Deque, Iterator, List, Tuple

from ._core.errors import CallcpTimeout, LocalProtocolError
from ._engine import DEFAULT, Buffer
from ._options import DEFAULT_PORT, ClientKwargs, ClientOptions
from .sync import Connection, open_connection

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Pool", "PoolStats"]


@dataclass(frozen=True)
class PoolStats:
    """A pool's connections now, and since it was made."""

    open: int  # connections open (idle + in use)
    idle: int
    in_use: int
    created: int  # connections opened so far
    failed: int  # connections that failed to open, or were retired after an error


class Pool:
    """Up to ``size`` connections to ``host:port``, reused (see the module)."""

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        size: int = 8,
        max_idle: float = 60.0,
        max_lifetime: float = 600.0,
        **options: Unpack[ClientKwargs],
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a whole number >= 1, not {size!r}")
        for name, value in (("max_idle", max_idle), ("max_lifetime", max_lifetime)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, not {value!r}")
        self.host, self.port = host, port
        self.size, self.max_idle, self.max_lifetime = size, max_idle, max_lifetime
        self.options = ClientOptions(**options)
        self._cond = threading.Condition()
        self._idle: Deque[Tuple[Connection, float, float]] = deque()  # (conn, made, last used)
        self._open = self._in_use = self._created = self._failed = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"callcp.Pool({self.host!r}, {self.port}, size={self.size}) {self.stats()}"

    def stats(self) -> PoolStats:
        with self._cond:
            return PoolStats(
                self._open, len(self._idle), self._in_use, self._created, self._failed
            )

    def request(self, message: Buffer, timeout: Any = DEFAULT) -> bytes:
        """Send one message on a pooled connection and return the reply."""
        with self.connection() as conn:
            return conn.request(message, timeout)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        """A connection for the ``with`` block, alone; back to the pool after
        it, unless an exception left the block (then it is closed).

        Raises:
            CallcpTimeout: all ``size`` connections stayed in use for the
                client ``timeout``.
            LocalProtocolError: the pool is closed.
            As :func:`callcp.connect` when a new connection is needed.
        """
        conn, made = self._acquire()
        try:
            yield conn
        except BaseException:
            self._release(conn, made, broken=True)
            raise
        self._release(conn, made, broken=conn.closed)

    def close(self) -> None:
        """Close the idle connections now (authenticated CLOSE) and the ones
        in use when they come back; later borrowing raises."""
        with self._cond:
            self._closed = True
            idle = [conn for conn, _, _ in self._idle]
            self._idle.clear()
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- borrowing

    def _acquire(self) -> Tuple[Connection, float]:
        timeout = self.options.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            retired: List[Connection] = []
            with self._cond:
                while True:
                    if self._closed:
                        raise LocalProtocolError("the pool is closed")
                    now = time.monotonic()
                    found = None
                    while self._idle:
                        conn, made, used = self._idle.pop()  # the most recently used
                        if now - used > self.max_idle or now - made > self.max_lifetime:
                            retired.append(conn)
                            self._open -= 1
                            continue
                        found = (conn, made)
                        break
                    if found is not None:
                        self._in_use += 1
                        break
                    if self._open < self.size:
                        self._open += 1  # (a place for the new connection)
                        self._in_use += 1
                        break
                    left = None if deadline is None else deadline - now
                    if left is not None and left <= 0:
                        raise CallcpTimeout(
                            f"no pooled connection to {self.host}:{self.port} was free "
                            f"within {timeout} s (all {self.size} in use)"
                        )
                    self._cond.wait(left)
            for conn in retired:
                conn.close()
            if found is None:
                return self._new()
            conn, made = found
            if conn.poll():  # (outside the lock: it may read and answer a PING)
                return conn, made
            with self._cond:  # gone while idle: retire it, try again
                self._in_use -= 1
                self._open -= 1
                self._cond.notify()

    def _new(self) -> Tuple[Connection, float]:
        try:
            conn = open_connection(self.host, self.port, self.options)
        except BaseException:
            with self._cond:
                self._open -= 1
                self._in_use -= 1
                self._failed += 1
                self._cond.notify()
            raise
        with self._cond:
            self._created += 1
        return conn, time.monotonic()

    def _release(self, conn: Connection, made: float, *, broken: bool) -> None:
        with self._cond:
            self._in_use -= 1
            keep = not broken and not self._closed
            if keep:
                self._idle.append((conn, made, time.monotonic()))
            else:
                self._open -= 1
                if broken:
                    self._failed += 1
            self._cond.notify()
        if not keep:
            conn.close()
