"""Connection pools: reuse callcp connections to one server.

``pool = callcp.Pool(host, port, size=8, **client options)``;
``pool.request(message)`` borrows a connection for one request/response, and
``with pool.connection() as conn:`` for several.  Thread-safe
(``callcp.aio.Pool``: the same, awaited, task-safe).  New connections resume
with the session tickets the server gave earlier ones (the client's session
store), so most cost no RSA work on the server.

An idle connection is checked before it is handed out (``Connection.poll()``
reads what arrived meanwhile: a server going away, a PING) and retired after
``max_idle`` seconds unused or ``max_lifetime`` seconds old.  A connection that
saw an error (an exception left the ``with`` block) is closed, never handed
out again.  ``close()`` closes every connection with the authenticated CLOSE.

``request()`` tries again where that cannot duplicate the request
(src/callcp/_retry.py): at once on another connection when a reused one
turns out dead before the request left (a server that went away while it
sat idle), and under the ``retry`` option (a :class:`callcp.Retry`) after a
failed connect or handshake, a ServerBusy refusal, or, with
``idempotent=True``, any transient failure.

The bookkeeping (:class:`_Slots`) is written once; the two pools differ only
in how they wait and do I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Deque,
    Generic,
    Iterator,
    List,
    Optional,
    Tuple,
    TypeVar,
)

from . import aio
from ._common import logger_for
from ._core.errors import CallcpError, CallcpTimeout, LocalProtocolError
from ._engine import DEFAULT, Buffer
from ._options import DEFAULT_PORT, ClientKwargs, ClientOptions
from ._retry import Attempts
from .sync import Connection, connect_once

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Pool", "AsyncPool", "PoolStats"]

C = TypeVar("C")


@dataclass(frozen=True)
class PoolStats:
    """A pool's connections now, and since it was made."""

    open: int  # connections open (idle + in use)
    idle: int
    in_use: int
    created: int  # connections opened so far
    failed: int  # connections that failed to open, or were retired after an error
    retried: int  # request tries after the first (on another connection)


#: :meth:`_Slots.take`'s answer when a new connection may be opened.
NEW: Any = object()


class _Slots(Generic[C]):
    """A pool's state, without waiting or I/O (the caller holds its lock;
    the asyncio pool needs none: nothing here awaits)."""

    def __init__(self, host: str, port: int, size: int, max_idle: float, max_lifetime: float):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a whole number >= 1, not {size!r}")
        for name, value in (("max_idle", max_idle), ("max_lifetime", max_lifetime)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a number of seconds > 0, not {value!r}")
        self.host, self.port = host, port
        self.size, self.max_idle, self.max_lifetime = size, max_idle, max_lifetime
        self.idle: Deque[Tuple[C, float, float]] = deque()  # (conn, made, last used)
        self.open = self.in_use = self.created = self.failed = self.retried = 0
        self.waiting = 0  # callers waiting for a place (notify only then)
        self.retired: List[C] = []  # expired idle connections, for the caller to close
        self.closed = False

    def stats(self) -> PoolStats:
        """The pool's connections now and since it was made (a PoolStats)."""
        return PoolStats(
            self.open, len(self.idle), self.in_use, self.created, self.failed, self.retried
        )

    def take(self) -> Any:
        """An idle connection to check, as (conn, made); :data:`NEW` (open
        one); or None (wait).  Expired idle ones go to ``retired``."""
        if self.closed:
            raise LocalProtocolError("the pool is closed")
        idle = self.idle
        if idle:
            now = time.monotonic()
            while idle:
                conn, made, used = idle.pop()  # the most recently used
                if now - used > self.max_idle or now - made > self.max_lifetime:
                    self.retired.append(conn)
                    self.open -= 1
                    continue
                self.in_use += 1
                return conn, made
        if self.open < self.size:
            self.open += 1  # (a place for the new connection)
            self.in_use += 1
            return NEW
        return None

    def drain(self) -> List[C]:
        retired, self.retired = self.retired, []
        return retired

    def lost(self, *, failed: bool) -> None:
        """A taken place is given up: its connection failed to open, or was
        found gone at checkout."""
        self.in_use -= 1
        self.open -= 1
        if failed:
            self.failed += 1

    def give_back(self, conn: C, made: float, broken: bool) -> bool:
        """True if the connection is kept (else the caller closes it)."""
        self.in_use -= 1
        keep = not broken and not self.closed
        if keep:
            self.idle.append((conn, made, time.monotonic()))
        else:
            self.open -= 1
            if broken:
                self.failed += 1
        return keep

    def shut(self) -> List[C]:
        """Close the pool: the idle connections, to close."""
        self.closed = True
        idle = [conn for conn, _, _ in self.idle]
        self.idle.clear()
        self.open -= len(idle)
        return idle

    def exhausted(self, timeout: Optional[float]) -> CallcpTimeout:
        return CallcpTimeout(
            f"no pooled connection to {self.host}:{self.port} was free within {timeout} s "
            f"(all {self.size} in use)"
        )


class _PoolBase(Generic[C]):
    """What both pools are made of: the options and the slots."""

    _name = "callcp.Pool"

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
        self._slots: _Slots[C] = _Slots(host, port, size, max_idle, max_lifetime)
        self.options = ClientOptions(**options)
        self._cond = self._new_condition()
        self._log = logger_for(self.options.logger)

    def _attempts(self) -> Attempts:
        s = self._slots
        return Attempts(self.options.retry, self._log, f"a request to {s.host}:{s.port}")

    def _new_condition(self) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        s = self._slots
        return f"{self._name}({s.host!r}, {s.port}, size={s.size}) {s.stats()}"


class Pool(_PoolBase[Connection]):
    """Up to ``size`` connections to ``host:port``, reused (see the module).
    ``size``: connections open at once at most; ``max_idle``, ``max_lifetime``:
    seconds after which an unused, or any, connection is retired; the other
    options are :func:`callcp.connect`'s."""

    _cond: threading.Condition

    def _new_condition(self) -> threading.Condition:
        # The hot path takes the plain lock (a C-level ``with``); only waiters
        # use the condition, which shares it.
        self._lock = threading.Lock()
        return threading.Condition(self._lock)

    def stats(self) -> PoolStats:
        """The pool's connections now and since it was made (a PoolStats)."""
        with self._lock:
            return self._slots.stats()

    def request(
        self, message: Buffer, timeout: Any = DEFAULT, *, idempotent: bool = False
    ) -> bytes:
        """Send one message on a pooled connection and return the reply.

        Tried again, on another connection, only where the server cannot
        have received the message (see the module), or after any
        RetryableError with ``idempotent=True`` (the caller says a
        duplicate is harmless).  The ``retry`` option bounds the tries.

        Raises:
            RetryableError: a transient failure, after the tries allowed.
            As :meth:`Connection.request` and :func:`callcp.connect`.
        """
        attempts: Optional[Attempts] = None  # (made at the first failure)
        while True:
            sent = reused = False
            try:
                conn, made, reused = self._acquire()
                try:
                    conn.send(message)
                    sent = True
                    reply = conn.recv(timeout)
                except BaseException:
                    self._release(conn, made, broken=True)
                    raise
                self._release(conn, made, broken=conn.closed)
                return reply
            except CallcpError as exc:
                attempts = attempts or self._attempts()
                again = attempts.again(exc, sent=sent, idempotent=idempotent, reused=reused)
                if again is None:
                    raise
                wait = again
                with self._lock:
                    self._slots.retried += 1
            time.sleep(wait)

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
        attempts = self._attempts()
        while True:
            try:
                conn, made, _ = self._acquire()
                break
            except CallcpError as exc:
                wait = attempts.again(exc)
                if wait is None:
                    raise
            time.sleep(wait)
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
            idle = self._slots.shut()
            self._cond.notify_all()
        for conn in idle:
            conn.close()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acquire(self) -> Tuple[Connection, float, bool]:
        """(a connection, when it was made, whether it was reused)."""
        slots, cond = self._slots, self._cond
        deadline: Optional[float] = None
        while True:
            with self._lock:
                got = slots.take()
                if got is None:  # (all in use: wait, until the client timeout)
                    timeout = self.options.timeout
                    if deadline is None and timeout is not None:
                        deadline = time.monotonic() + timeout
                    slots.waiting += 1
                    try:
                        while got is None:
                            left = None if deadline is None else deadline - time.monotonic()
                            if left is not None and left <= 0:
                                raise slots.exhausted(timeout)
                            cond.wait(left)
                            got = slots.take()
                    finally:
                        slots.waiting -= 1
                retired = slots.drain() if slots.retired else ()
            for old in retired:
                old.close()
            if got is NEW:
                return (*self._new(), False)
            conn, made = got
            if conn.poll():  # (outside the lock: it may read and answer a PING)
                return conn, made, True
            with self._lock:  # gone while idle: retire it, try again
                slots.lost(failed=False)
                if slots.waiting:
                    cond.notify()

    def _new(self) -> Tuple[Connection, float]:
        try:
            conn = connect_once(self._slots.host, self._slots.port, self.options)
        except BaseException:
            with self._lock:
                self._slots.lost(failed=True)
                if self._slots.waiting:
                    self._cond.notify()
            raise
        with self._lock:
            self._slots.created += 1
        return conn, time.monotonic()

    def _release(self, conn: Connection, made: float, *, broken: bool) -> None:
        with self._lock:
            keep = self._slots.give_back(conn, made, broken)
            if self._slots.waiting:
                self._cond.notify()
        if not keep:
            conn.close()


class AsyncPool(_PoolBase["aio.Connection"]):
    """:class:`Pool` for asyncio (``callcp.aio.Pool``): the same, awaited,
    task-safe; one event loop."""

    _name = "callcp.aio.Pool"

    _cond: asyncio.Condition

    def _new_condition(self) -> asyncio.Condition:
        return asyncio.Condition()  # (bound to the loop that first uses it)

    def stats(self) -> PoolStats:
        """The pool's connections now and since it was made (a PoolStats)."""
        return self._slots.stats()

    async def request(
        self, message: Buffer, timeout: Any = DEFAULT, *, idempotent: bool = False
    ) -> bytes:
        """Send one message on a pooled connection and return the reply
        (tried again as :meth:`Pool.request` says)."""
        attempts: Optional[Attempts] = None  # (made at the first failure)
        while True:
            sent = reused = False
            try:
                conn, made, reused = await self._acquire()
                try:
                    await conn.send(message)
                    sent = True
                    reply = await conn.recv(timeout)
                except BaseException:
                    await self._release(conn, made, broken=True)
                    raise
                await self._release(conn, made, broken=conn.closed)
                return reply
            except CallcpError as exc:
                attempts = attempts or self._attempts()
                again = attempts.again(exc, sent=sent, idempotent=idempotent, reused=reused)
                if again is None:
                    raise
                wait = again
                self._slots.retried += 1
            await asyncio.sleep(wait)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[aio.Connection]:
        """A connection for the ``async with`` block (see :meth:`Pool.connection`)."""
        attempts = self._attempts()
        while True:
            try:
                conn, made, _ = await self._acquire()
                break
            except CallcpError as exc:
                wait = attempts.again(exc)
                if wait is None:
                    raise
            await asyncio.sleep(wait)
        try:
            yield conn
        except BaseException:
            await self._release(conn, made, broken=True)
            raise
        await self._release(conn, made, broken=conn.closed)

    async def close(self) -> None:
        """Close the idle connections now and the ones in use when they come back."""
        cond = self._cond
        async with cond:
            idle = self._slots.shut()
            cond.notify_all()
        for conn in idle:
            await conn.close()

    async def __aenter__(self) -> AsyncPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _acquire(self) -> Tuple[aio.Connection, float, bool]:
        slots = self._slots
        while True:
            got = slots.take()  # (no lock: one loop, and nothing here awaits)
            if got is None:
                got = await self._wait()
            if slots.retired:
                for old in slots.drain():
                    await old.close()
            if got is NEW:
                return (*await self._new(), False)
            conn, made = got
            if await conn.poll():
                return conn, made, True
            slots.lost(failed=False)
            await self._wake()

    async def _wait(self) -> Any:
        """All in use: wait for a place, until the client timeout."""
        slots, cond, timeout = self._slots, self._cond, self.options.timeout
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        async with cond:
            slots.waiting += 1
            try:
                while True:
                    got = slots.take()
                    if got is not None:
                        return got
                    left = None if deadline is None else deadline - loop.time()
                    if left is not None and left <= 0:
                        raise slots.exhausted(timeout)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(cond.wait(), left)
            finally:
                slots.waiting -= 1

    async def _wake(self) -> None:
        """A place came free: tell a waiter, if any waits."""
        if self._slots.waiting:
            async with self._cond:
                self._cond.notify()

    async def _new(self) -> Tuple[aio.Connection, float]:
        try:
            conn = await aio.connect_once(self._slots.host, self._slots.port, self.options)
        except BaseException:
            self._slots.lost(failed=True)
            await self._wake()
            raise
        self._slots.created += 1
        return conn, time.monotonic()

    async def _release(self, conn: aio.Connection, made: float, *, broken: bool) -> None:
        keep = self._slots.give_back(conn, made, broken)
        await self._wake()
        if not keep:
            await conn.close()
