"""The asyncio side of one connection: a Protocol that moves bytes between
its transport and the engine's core and wakes the one task waiting for them
(the blocking adapter's counterpart is ``_sockets.SocketLink``).

Bytes wait unparsed in the core (one buffer, never an object per read); past
PAUSE_READING_AT the link stops reading, and TCP's back-pressure does the
rest until the reader needs bytes again.  Waits cost one future, no task;
long deadlines share one lazily re-armed timer per link.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import (
    Any,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Deque,
    List,
    Optional,
    Set,
    Tuple,
    Union,
)

from ._common import translate_oserror
from ._core.errors import CallcpTimeout
from ._core.events import DecryptionRequested
from ._engine import Arrival, Engine, ServerCore
from ._sockets import peer_alive, unsent
from ._streams import iter_chunks

__all__ = ["Link", "Turn", "DONE", "PAUSE_READING_AT", "FOREVER", "achunks", "next_chunk"]

#: Unparsed received bytes past which a link stops reading the socket.
PAUSE_READING_AT = 256 << 10
#: Waits at least this long (seconds) use the link's shared, lazily re-armed timer.
COARSE_TIMEOUT = 1.0
FOREVER = float("inf")
#: A closing transport that the peer does not drain is dropped after this.
CLOSE_GRACE = 1.0
#: While a hello waits for a key-exchange slot, reading stops past this many
#: bytes (its Finished and first request fit; the rest waits in the kernel).
WAITING_BUFFER = 16 << 10
RECEIVING = "receiving"
SENDING = "sending"

Address = Tuple[Any, ...]
Buffer = Union[bytes, bytearray, memoryview]
AsyncSource = Union[Any, AsyncIterable[Buffer]]


class Link(asyncio.Protocol):
    """One TCP connection: moves bytes between its transport and its engine,
    and wakes the task waiting for them."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        engine: Any,
        core: Optional[ServerCore] = None,
        links: Optional[Set[Link]] = None,
        start: Optional[Callable[[Link], None]] = None,
    ) -> None:
        self.loop = loop
        self.engine: Engine = engine  # (a server's: set when admitted)
        #: (server) the server's core, its set of open links, and what
        #: starts a connection's task once it has a key-exchange slot
        self.core, self.links, self.start = core, links, start
        self.transport: Any = None
        self.addr: Address = ()
        self.lost: asyncio.Future[None] = loop.create_future()
        #: (server) bytes before the key exchange go here instead
        self.on_data: Optional[Callable[[Link, bytes], None]] = None
        self.arrival: Optional[Arrival] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self._waiter: Optional[asyncio.Future[None]] = None
        self._deadline = 0.0  # of the current long wait
        self._deadline_timer: Optional[asyncio.TimerHandle] = None
        self._drain: List[asyncio.Future[None]] = []
        self.paused_reading = False
        self.paused_writing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.addr = tuple(peer) if peer else ()
        if self.core is not None:
            self._arrive()

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(self, data)
            return
        engine = self.engine
        core = engine.core
        core.receive_data(data)
        if engine.keepalive is not None:
            engine.keepalive.heard(self.loop.time())
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if (
            core.buffered > PAUSE_READING_AT
            and not self.paused_reading
            or (
                self.arrival is not None
                and self.arrival.state == "waiting"
                and core.buffered > WAITING_BUFFER
                and not self.paused_reading
            )
        ):
            self.pause()

    def eof_received(self) -> bool:
        self.data_received(b"")
        # A client that sent its whole flight and closed (fire and forget)
        # while its hello waits for a key-exchange slot is still served: keep
        # the transport until its turn.  One that sent only a hello is gone.
        return (
            self.arrival is not None
            and self.arrival.state == "waiting"
            and (self.arrival.wanted(False))
        )

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.engine is not None:
            lost = translate_oserror(exc, "receiving") if isinstance(exc, OSError) else None
            self.engine.transport_lost(lost)
        self.wake()
        self.resume_writing()
        if not self.lost.done():
            self.lost.set_result(None)
        if self.links is not None and self in self.links:
            self._gone()

    # ---------------------------------------------- (server) before the key exchange

    def _arrive(self) -> None:
        """Admit the connection (or not) and send the ServerHello."""
        assert self.core is not None and self.links is not None
        arrival, first = self.core.arrive(self.addr)
        self.transport.write(first)
        if arrival is None:
            self.transport.close()
            return
        arrival.io, self.arrival, self.engine = self, arrival, arrival.engine
        self.on_data = Link._hello
        self.links.add(self)
        self.timer = self.loop.call_later(self.core.options.handshake_timeout, self._too_slow)
        self.loop.call_soon(self.core.prepare)  # the next connection's ServerHello

    def _hello(self, data: bytes) -> None:
        """Bytes before the key exchange: is the ClientHello whole yet?"""
        arrival = self.arrival
        assert arrival is not None and self.start is not None
        done = arrival.received(data)
        self.addr = arrival.addr  # (the client's, once a trusted proxy's header named it)
        if not done:
            return
        # From here bytes go to the core (bounded by PAUSE_READING_AT): reading
        # goes on, so a peer that leaves while its hello waits is seen to go.
        self.on_data = None
        start = self.start
        arrival.queue(lambda: start(self), self._alive, self.abort)
        if arrival.state == "dropped":
            self.abort()

    def _alive(self) -> bool:
        """Is the connection still worth its key exchange (any thread)?  Asked
        just before RSA work, when the loop may not have seen the peer's FIN
        or RST yet: a peek at the socket tells."""
        assert self.arrival is not None
        if self.lost.done():
            return self.arrival.wanted(False)
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return True
        raw = socket.socket(fileno=sock.fileno())  # a view of the same descriptor
        try:
            connected = peer_alive(raw)
        finally:
            raw.detach()
        return self.arrival.wanted(connected)

    def _too_slow(self) -> None:
        """The handshake deadline passed before the key exchange started."""
        if self.arrival is not None and self.arrival.expire():
            self.abort()

    def _gone(self) -> None:
        assert self.core is not None and self.links is not None
        self.links.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.arrival is not None:
            self.arrival.lost()  # no RSA work for a peer that is gone
            self.arrival.release()

    # ------------------------------------------------------------ moving

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        engine = self.engine
        if engine is not None and engine.keepalive is not None:
            engine.keepalive.heard(self.loop.time())  # the peer takes our bytes again
        for waiter in self._drain:
            if not waiter.done():
                waiter.set_result(None)
        self._drain.clear()

    def pause(self) -> None:
        self.paused_reading = True
        self.transport.pause_reading()

    def resume(self) -> None:
        """(the reader needs bytes) read again."""
        self.paused_reading = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def unsent(self) -> int:
        """Our bytes the peer has not taken yet: the transport's buffer and
        the socket's send queue."""
        sock = self.transport.get_extra_info("socket")
        queued = unsent(sock) if sock is not None else 0
        return int(self.transport.get_write_buffer_size()) + queued

    def flush(self) -> None:
        """Write what the core has queued."""
        out = self.engine.core.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)

    async def drain(self, timeout: Optional[float]) -> None:
        """Wait while the transport is full, at most ``timeout`` seconds: a
        peer that stops reading cannot hold a sender (or its connection's
        place) forever; then the connection fails with CallcpTimeout."""
        if not self.paused_writing or self.lost.done():
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._drain.append(waiter)
        timer = None if timeout is None else self.loop.call_later(timeout, expire, waiter, SENDING)
        try:
            await waiter
        except CallcpTimeout as exc:
            self.engine.core.fail(exc)
            self.transport.abort()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def abort(self) -> None:
        """Write what is queued (the CLOSE or ALERT saying why) and close;
        what the peer does not take within CLOSE_GRACE is dropped."""
        self.flush()
        if not self.transport.is_closing():
            self.transport.close()
            self.loop.call_later(CLOSE_GRACE, self._hard_close)

    def _hard_close(self) -> None:
        if not self.lost.done():
            self.transport.abort()

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, deadline: float) -> None:
        """Wait for bytes, the transport's loss or a wake-up; CallcpTimeout at
        ``deadline`` (loop time; inf: none).  Long waits share one lazily
        re-armed timer per link: no task and no timer per message."""
        if self.lost.done():
            return
        loop = self.loop
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = None
        remaining = deadline - loop.time()
        if remaining <= 0:
            self._waiter = None
            raise CallcpTimeout("timed out while receiving")
        if remaining < COARSE_TIMEOUT:
            timer = loop.call_later(remaining, expire, waiter)
        elif deadline != FOREVER:
            self._deadline = deadline
            shared = self._deadline_timer
            if shared is None or shared.when() > deadline:
                if shared is not None:
                    shared.cancel()
                self._deadline_timer = loop.call_at(deadline, self._check_deadline)
        try:
            await waiter
        finally:
            self._waiter = None
            self._deadline = 0.0
            if timer is not None:
                timer.cancel()

    def _check_deadline(self) -> None:
        """The shared timer fired: expire the current wait if its deadline
        passed, else re-arm for it."""
        self._deadline_timer = None
        deadline, waiter = self._deadline, self._waiter
        if not deadline or waiter is None or waiter.done():
            return
        if self.loop.time() >= deadline:
            expire(waiter)
        else:
            self._deadline_timer = self.loop.call_at(deadline, self._check_deadline)


def expire(waiter: asyncio.Future[None], doing: str = RECEIVING) -> None:
    if not waiter.done():
        waiter.set_exception(CallcpTimeout(f"timed out while {doing}"))


class Turn:
    """Receivers take turns (first come, first served), like an asyncio.Lock
    but without a coroutine per uncontended call: ``await take()``, ``give()``."""

    __slots__ = ("_loop", "_busy", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._busy = False
        self._waiters: Deque[asyncio.Future[None]] = deque()

    def take(self) -> Any:
        if not self._busy:
            self._busy = True
            return DONE
        return self._wait()

    async def _wait(self) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed the turn, then cancelled
                self.give()
            raise

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the turn passes on: still busy
                return
        self._busy = False


class _Done:
    """An awaitable that is already complete (no coroutine, no future)."""

    __slots__ = ()

    def __await__(self) -> Any:
        return iter(())


DONE = _Done()


async def decrypt_here(request: DecryptionRequested) -> Optional[bytes]:
    return request.run()


async def achunks(source: AsyncSource) -> AsyncIterator[Buffer]:
    if hasattr(source, "__aiter__"):
        async for item in source:
            for chunk in iter_chunks([item]):
                yield chunk
    else:
        for chunk in iter_chunks(source):  # type: ignore[arg-type]
            yield chunk


async def next_chunk(chunks: AsyncIterator[Buffer]) -> Optional[Buffer]:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None
