"""The connection engine: everything above the sans-I/O core that is not
"how do I wait for bytes", written once for both adapters.

Theory of operation
-------------------
An adapter (``sync.py`` with ``_sockets.py``, ``aio.py`` with
``_aiolink.py``) owns a transport and a way to wait.  For each connection it
holds one :class:`Engine` and does only this:

* feed what it reads to the core (``core.receive_data``; ``b""`` at end of
  stream), reading first when the core ``needs_data``;
* ask ``engine.next_event()`` for the next application event; on NEED_DATA,
  wait for bytes and ask again;
* write what the core has to send (``send_bytes`` for a message, else
  ``data_to_send_parts()``), always under its one send lock: records are
  sealed only there, so the record sequence has one owner;
* run the engine's procedures (:func:`handshake`, :func:`send_stream`,
  :func:`receive_stream`) with its ``_drive`` loop, doing what each asks
  (WRITE, READ, EVENT, CHUNK, DECRYPT, ABORT) its own way;
* on a CallcpError that failed the connection, write what is queued (the
  CLOSE or ALERT telling the peer why) and close the transport.

The engine decides everything else: which events the application sees
(handshake events are consumed, the peer's CLOSE becomes an exception), the
handshake steps, what a timeout during the handshake means, how a server
interrupts a connection (shutdown between two messages, the global message
budget at once), and what a sender sees once the transport is gone.

For servers, :class:`ServerCore` holds what is shared by every connection of
one server: the options, the key, the admission policy (:class:`Admission`),
the key-exchange queue (:class:`HandshakeQueue`), the global budget for
partially received messages (:class:`MessageBudget`), rate-limited logging
of refusals (:class:`Notices`), and the handler-outcome policy
(:func:`handler_outcome`).  All of it is thread-safe: the blocking server
calls it from many threads, the asyncio server from one.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Generator, Optional, Set, Tuple, Union

from ._common import (
    client_authorizer,
    load_client_key,
    load_server_key,
    load_ticket_key,
    logger_for,
)
from ._core.errors import (
    CallcpError,
    CallcpTimeout,
    CloseCode,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ConnectionLost,
    HandshakeAborted,
    HandshakeError,
    HandshakeTimeout,
    KeyManagementError,
    MessagePending,
    MessageTooLarge,
    PeerUnresponsive,
    ServerBusy,
    StreamPending,
    StreamTooLarge,
)
from ._core.events import (
    NEED_DATA,
    CloseReceived,
    DecryptionRequested,
    HandshakeCompleted,
    MessageReceived,
    NeedData,
    ServerKeyAccepted,
    StreamStarted,
)
from ._core.legacy import MISSING as LEGACY_MISSING
from ._core.legacy import LegacyClient, LegacyServer
from ._core.protocol import ServerProtocol, State, _Protocol
from ._core.proxy import ProxyHeaderError, ProxyHeaderReader
from ._core.shares import ShareKeeper, SignedShare
from ._core.tickets import TicketKeys
from ._core.wire import alert_frame, printable
from ._options import CALLCP1, ServerOptions
from ._streams import Destination, Progress, StreamInfo, StreamReception
from .trust import AuthorizedKeys

__all__ = [
    "Engine",
    "ConnectionBase",
    "DEFAULT",
    "ServerBase",
    "ServerCore",
    "Admission",
    "HandshakeQueue",
    "MessageBudget",
    "Notices",
    "Outcome",
    "handler_outcome",
    "format_peer",
    "source_of",
    "NEED_DATA",
]

Address = Tuple[Any, ...]
#: A sans-I/O core the engine drives: callcp/2's, or Callcp 1.0's (the
#: opt-in legacy wire format, which shows the engine the same surface).
Core = Union[_Protocol, LegacyClient, LegacyServer]
HandshakeStep = Union[NeedData, DecryptionRequested, None]

SHUTTING_DOWN = "server shutting down"
PEER_LEFT = "the peer closed the connection before its key exchange"
#: Seconds a server whose key failed to sign a share waits before asking it
#: again (a PKCS#11 token failing): meanwhile connections are refused at no
#: cost to the token.
KEY_RETRY = 1.0


def _going_away() -> ConnectionClosedOK:
    return ConnectionClosedOK(
        "the server is shutting down", code=CloseCode.GOING_AWAY, reason=SHUTTING_DOWN
    )


# ====================================================================== engine


class Keepalive:
    """One connection's keepalive: after ``interval`` seconds without a
    byte from the peer, send a PING; if nothing at all arrives within
    ``timeout`` seconds after it, the peer is unresponsive.  Any bytes count
    as a sign of life (the PONG, or anything else).  The adapters call
    :meth:`heard` when they read bytes and :meth:`due` when their wait for
    :meth:`next_wake` ends; times are their clock's (monotonic)."""

    __slots__ = ("interval", "timeout", "last_heard", "pinged", "_unsent")

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.last_heard = now
        self.pinged = 0.0  # when the outstanding PING went out (0: none)
        self._unsent = -1  # our bytes not yet taken by the peer, when last looked at

    def heard(self, now: float) -> None:
        self.last_heard = now
        self.pinged = 0.0
        self._unsent = -1

    def next_wake(self) -> float:
        """When :meth:`due` has something to say, if nothing is heard before."""
        if self.pinged:
            return self.pinged + self.timeout
        return self.last_heard + self.interval

    def due(self, now: float, unsent: int = 0) -> Optional[str]:
        """``"ping"`` (send one now), ``"dead"`` (give up), or None.
        ``unsent``: our bytes the peer has not taken yet (the socket's send
        queue): while it shrinks, the peer is working through what we sent
        before the PING, so it is alive and its answer is on the way."""
        if self.pinged:
            if now < self.pinged + self.timeout:
                return None
            if 0 < unsent < self._unsent:  # (shrunk since the PING or the last look)
                self._unsent = unsent
                self.pinged = now  # (the same PING: it waits behind our bytes)
                return None
            return "dead"
        if now >= self.last_heard + self.interval:
            self.pinged = now
            self._unsent = unsent  # (what the PING queues behind)
            return "ping"
        return None

    def woke(self, core: Core, now: float, unsent: int) -> bool:
        """The adapter's wait for :meth:`next_wake` ended with nothing
        heard: True if a PING was queued (write it now).

        Raises:
            ConnectionClosedError: the peer is unresponsive (the core is
                failed, its CLOSE queued: abort the transport).
        """
        action = self.due(now, unsent)
        if action == "dead":
            raise self.unresponsive(core, now)
        return action == "ping" and core.ping()

    def unresponsive(self, core: Core, now: float) -> CallcpError:
        """The peer did not answer: fail the core (a CLOSE with TIMEOUT is
        queued, should it wake up) and return the error to raise."""
        quiet = now - self.last_heard
        err = PeerUnresponsive(
            f"peer unresponsive for {quiet:.0f} s (no answer to a keepalive PING "
            f"within {self.timeout:g} s)",
            code=CloseCode.TIMEOUT,
            reason="peer unresponsive",
        )
        core.close(CloseCode.TIMEOUT, "peer unresponsive")
        core.fail(err)
        return err


def keepalive_for(interval: Optional[float], timeout: float) -> Optional[Keepalive]:
    """A new connection's Keepalive (None: keepalive off)."""
    return None if interval is None else Keepalive(interval, timeout, time.monotonic())


class Engine:
    """One connection's policy above the core (see the module docstring)."""

    __slots__ = (
        "core",
        "wake",
        "pending",
        "interruption",
        "_lost",
        "_budget",
        "charged",
        "handshake_deadline",
        "handshaken",
        "source",
        "keepalive",
    )

    def __init__(
        self,
        core: Core,
        *,
        budget: Optional[MessageBudget] = None,
        keepalive: Optional[Keepalive] = None,
    ) -> None:
        self.core = core
        #: When to ping a quiet peer, and when to give up on it (None: never).
        self.keepalive = keepalive
        #: Called (from any thread) when an interrupt must reach a waiting reader.
        self.wake: Callable[[], None] = _nothing
        #: An event handed back (recv vs recv_stream), or a server's
        #: DecryptionRequested seen by poll_hello(): the next one out.
        self.pending: Any = None
        #: Set by :meth:`interrupt`: the reader raises it at its next wait.
        self.interruption: Optional[CallcpError] = None
        self._lost: Optional[CallcpError] = None  # the transport's own error
        self._budget = budget
        self.charged = 0  # bytes of this connection's partial message in the budget
        #: (server) (time.monotonic() deadline, seconds): fixed at accept
        self.handshake_deadline: Optional[Tuple[float, float]] = None
        self.handshaken = False  # handshake_step() said "done" once
        self.source = ""  # (server) what per-source limits count it under

    @property
    def failed(self) -> bool:
        """The connection failed (its alert or CLOSE may still be queued)."""
        return self.core.state is State.FAILED

    @property
    def is_server(self) -> bool:
        return self.core._role == "server"

    # ------------------------------------------------------------ handshake

    def handshake_limits(self, seconds: Optional[float]) -> Tuple[float, Optional[float]]:
        """The handshake's deadline (time.monotonic(); inf: none) and its
        length: a server's was fixed at accept, a client's starts now."""
        if self.handshake_deadline is not None:
            return self.handshake_deadline
        return (float("inf") if seconds is None else time.monotonic() + seconds), seconds

    def handshake_step(self) -> HandshakeStep:
        """Advance the handshake as far as the buffered bytes allow.

        Returns NEED_DATA (wait for bytes, then call again), a
        DecryptionRequested (server: run it, hand the result to
        :meth:`decrypted`, call again), or None: the handshake is done as far
        as this side waits for it (a client's key exchange is queued, so its
        first message shares the flight; a server verified the client's
        Finished).  Write ``core.data_to_send()`` after each step.

        Raises:
            HandshakeError (and subclasses), ConnectionClosed: the handshake
                failed; the alert for the peer is queued.
        """
        if self.handshaken:  # (again: nothing to do, and no event to swallow)
            return None
        if self.pending is not None:  # a DecryptionRequested seen by poll_hello()
            step, self.pending = self.pending, None
            return step  # type: ignore[no-any-return]
        core = self.core
        while True:
            event = core.next_event()
            if event is NEED_DATA:
                self.check_interrupt()
                if core._eof:  # (as in next_event: no byte will come)
                    err = HandshakeAborted("the peer closed the connection during the handshake")
                    core.fail(err)
                    raise err
                return NEED_DATA
            if isinstance(event, DecryptionRequested):
                return event
            if isinstance(event, (ServerKeyAccepted, HandshakeCompleted)):
                self.handshaken = True
                return None

    def confirm_step(self) -> HandshakeStep:
        """(client, after handshake_step() returned None) Read on until the
        server's Finished verified: NEED_DATA (wait for bytes, call again) or
        None (the server proved its key; ``peer_fingerprint`` is set).  The
        server sends nothing before its Finished, so no message is consumed.

        Raises: as :meth:`handshake_step`.
        """
        core = self.core
        while core.state is State.WAIT_SERVER_FINISHED:
            event = core.next_event()
            if event is NEED_DATA:
                self.check_interrupt()
                return NEED_DATA
            if isinstance(event, CloseReceived):
                raise core.closed_error()
        if core.state is not State.OPEN and core.state is not State.STREAMING:
            raise core.closed_error()
        return None

    def poll_hello(self) -> bool:
        """(server) True once a whole ClientHello is buffered: from then on
        the connection is worth a key-exchange slot.  The first
        :meth:`handshake_step` returns its DecryptionRequested.

        Raises: as :meth:`handshake_step` (a malformed hello).
        """
        if self.pending is not None:
            return True
        event = self.core.next_event()
        if event is NEED_DATA:
            return False
        self.pending = event
        return True

    def decrypted(self, premaster: Optional[bytes]) -> None:
        """Hand a DecryptionRequested's result to the core."""
        core: ServerProtocol = self.core  # type: ignore[assignment]
        core.premaster_decrypted(premaster)

    def handshake_timed_out(self, seconds: Optional[float], peer: str) -> HandshakeTimeout:
        """The handshake deadline passed: fail the core (the alert is queued)
        and return the error to raise."""
        if self.is_server:
            err = HandshakeTimeout(f"handshake timed out after {seconds} s")
        elif self.handshaken:
            err = HandshakeTimeout(f"{peer} did not finish the handshake within {seconds} s")
        else:
            err = HandshakeTimeout(f"no ServerHello from {peer} within {seconds} s")
        self.core.fail(err)
        return err

    # ------------------------------------------------------------ receiving

    def feed(self, data: bytes) -> None:
        """Bytes read from the transport (``b""``: the peer closed it)."""
        self.core.receive_data(data)

    def transport_broke(self, err: CallcpError) -> None:
        """(a sender, without the receive lock) The transport broke: remember
        why; the reader reports it at its next read.  Touches nothing the
        reader is using."""
        if self._lost is None:
            self._lost = err

    def transport_lost(self, err: Optional[CallcpError]) -> None:
        """The transport is gone (``err``: it broke).  What is buffered is
        still delivered; then the loss is reported."""
        if err is not None and self._lost is None:
            self._lost = err
        core = self.core
        if not core._eof:
            core.receive_data(b"")

    def next_event(self) -> Any:
        """The next event for the application: MessageReceived or a stream
        event, or NEED_DATA.  Handshake events are consumed.

        Raises:
            ConnectionClosed: the peer closed (its CLOSE; our reply is queued),
                or the connection is already closed or failed.
            RemoteProtocolError, HandshakeError, CryptoError, MessageTooLarge:
                the peer sent bad bytes (the close is queued).
            the interrupt set by :meth:`interrupt`.
        """
        if self.pending is not None:
            event, self.pending = self.pending, None
            return event
        core = self.core
        try:
            while True:
                event = core.next_event()
                if type(event) is MessageReceived:
                    return event
                if event is NEED_DATA:
                    if core._eof:  # (a core waiting after the end of the stream: nothing comes)
                        err = self.lost_error()
                        core.fail(err)
                        raise err
                    if self.interruption is not None and (
                        not getattr(self.interruption, "graceful", False) or self.at_boundary
                    ):
                        self.check_interrupt()
                    if self._budget is not None and core._fragments_size != self.charged:
                        self._budget.charge(self, core._fragments_size)
                    return NEED_DATA
                if isinstance(event, CloseReceived):
                    raise core.closed_error()
                if not isinstance(event, (ServerKeyAccepted, HandshakeCompleted)):
                    return event
        except ConnectionClosedError as exc:
            lost = self._lost
            if lost is not None and exc.code is None:  # our EOF stands for a broken transport
                self._lost = None
                raise lost from exc
            raise

    def lost_error(self) -> CallcpError:
        """What a sender gets once the transport is gone (nothing buffered for
        a receiver is consumed to find out)."""
        core = self.core
        if core.state is State.FAILED or core.state is State.CLOSED or core._close_sent:
            return core.closed_error()
        if self._lost is None:  # (an end of TCP: the peer closed, or its process died)
            return ConnectionLost("the peer ended the connection without an authenticated close")
        return self._lost

    def peer_close_or(self, err: CallcpError) -> CallcpError:
        """After a failed write: the peer's CLOSE, if its bytes are buffered
        (a refused upload: its code and reason matter), else ``err``."""
        try:
            while self.next_event() is not NEED_DATA:
                pass  # what arrived before it no longer matters to a failed sender
        except CallcpError as closed:
            if self.core._close_received is not None:
                return closed
        return err

    def message_from(self, event: Any) -> bytes:
        """``recv()``'s answer for ``event``: its data, or StreamPending (the
        event stays first in line for ``recv_stream()``)."""
        if type(event) is MessageReceived:
            return event.data
        self.pending = event
        raise StreamPending(
            "a stream arrived, not a message: receive it with recv_stream()",
            name=event.name,
            size=event.size,
        )

    def stream_from(self, event: Any) -> StreamStarted:
        """``recv_stream()``'s start: a StreamStarted, or MessagePending."""
        if isinstance(event, StreamStarted):
            return event
        self.pending = event
        raise MessagePending("a message arrived, not a stream: receive it with recv()")

    # ------------------------------------------------------------ interrupts

    def interrupt(self, exc: CallcpError) -> None:
        """End the connection from outside (any thread): the reader gets
        ``exc`` at its next wait for bytes (woken now if it waits)."""
        if self.interruption is None:
            self.interruption = exc
            self.wake()

    def stop(self) -> None:
        """Server shutdown: an idle reader is closed now with GOING_AWAY; a
        handler busy with a request, or in the middle of receiving one, at its
        next wait for bytes between two messages (the forced deadline ends
        the rest)."""
        exc = _going_away()
        exc.graceful = True  # type: ignore[attr-defined]  # (waits for a message boundary)
        if self.interruption is None:
            self.interruption = exc
            if self.at_boundary:
                self.wake()

    @property
    def at_boundary(self) -> bool:
        """Between two messages: nothing of the next one has arrived."""
        core = self.core
        return core.state is State.OPEN and core.buffered == 0 and not core._fragments_size

    def check_interrupt(self) -> None:
        """Raise the interrupt, if any, after queuing its close for the peer."""
        exc = self.interruption
        if exc is None:
            return
        core = self.core
        if isinstance(exc, ConnectionClosed):  # a clean end: our CLOSE says why
            core.close(exc.code if exc.code is not None else CloseCode.NORMAL, exc.reason or "")
        core.fail(exc)
        raise exc

    def release(self) -> None:
        """The connection is over: give back its share of the budget."""
        if self._budget is not None and self.charged:
            self._budget.charge(self, 0)

    # ------------------------------------------------------------ closing

    def close(self, code: int, reason: str, *, counted: bool = True) -> None:
        """Queue the authenticated close (idempotent); ``counted=False`` from
        a thread other than the reader's (see the core's ``close``)."""
        self.core.close(code, reason, counted=counted)

    def closed_error(self) -> ConnectionClosed:
        return self.core.closed_error()


def _nothing() -> None:
    pass


# ================================================================ procedures
#
# What takes more than one step -- the handshake, sending a stream, receiving
# one -- is written once, here, as a generator: it yields what it needs from
# its adapter, an (op, argument) pair, and the adapter's ``_drive()`` loop
# does it the blocking or the asyncio way and sends back the result.  A
# failure of the adapter's part (the source, the network) is thrown into the
# generator, so the procedure's own clean-up (abort the stream, close the
# connection) always runs.  A CallcpError escaping a procedure means the
# connection is over: the driver writes what is queued and closes.

#: Write what the core has queued and (asyncio) wait while the transport is
#: full; a failure is raised.  With the argument NOW (a handshake flight, or a
#: last word on the way out) it is written as far as the transport takes it,
#: with no wait and no error: what the peer sent is still read.
WRITE = "write"
NOW = "now"
#: Wait for bytes (the argument: a time.monotonic() deadline) and feed them to the core.
READ = "read"
#: The next application event (the adapter's own receive loop); send it back.
EVENT = "event"
#: The next chunk of the stream source (the argument); send back None at its end.
CHUNK = "chunk"
#: Run the RSA decryption (the argument, a DecryptionRequested) off the event
#: loop, and send back its result.
DECRYPT = "decrypt"
#: Write what is queued (a CLOSE saying why) and close the transport.
ABORT = "abort"
#: Wait the argument's seconds, reading nothing (a Callcp 1.0 client, after its key).
PAUSE = "pause"

Op = Tuple[str, Any]
Procedure = Generator[Op, Any, Any]
_WRITE: Op = (WRITE, None)
_WRITE_NOW: Op = (WRITE, NOW)
_EVENT: Op = (EVENT, None)
_ABORT: Op = (ABORT, None)


class Run:
    """A procedure being run by an adapter's ``_drive`` loop::

        run = Run(engine, steps, abort)
        for op, arg in run:
            try:
                ...do op; set run.reply to what goes back...
            except BaseException as exc:
                run.thrown = exc       # the procedure cleans up, then raises
        return run.value

    A CallcpError that failed the connection runs ``abort()`` (write the
    queued ALERT or CLOSE, close the transport) before it propagates.
    """

    __slots__ = ("_steps", "_engine", "_abort", "reply", "thrown", "value")

    def __init__(self, engine: Engine, steps: Procedure, abort: Callable[[], None]) -> None:
        self._steps, self._engine, self._abort = steps, engine, abort
        self.reply: Any = None
        self.thrown: Optional[BaseException] = None
        self.value: Any = None

    def __iter__(self) -> Run:
        return self

    def __next__(self) -> Op:
        reply, thrown = self.reply, self.thrown
        self.reply = self.thrown = None
        try:
            return self._steps.send(reply) if thrown is None else self._steps.throw(thrown)
        except StopIteration as done:
            self.value = done.value
            raise StopIteration from None
        except CallcpError:
            if self._engine.failed:
                self._abort()
            raise


def handshake(
    engine: Engine, deadline: float, seconds: Optional[float], peer: Any, confirm: bool = False
) -> Procedure:
    """Run the handshake until data may flow (see Engine.handshake_step);
    ``confirm`` (client): on until the server's Finished verified."""
    try:
        while True:
            step = engine.handshake_step()
            if step is None and (confirm or getattr(engine.core, "awaiting_proof", False)):
                step = engine.confirm_step()  # (first contact: the key is recorded then)
            yield _WRITE_NOW
            if step is None:
                core = engine.core
                pause, core.pause_after_key = core.pause_after_key, 0.0
                if pause:  # (Callcp 1.0's server: the key and a request must not share a read)
                    yield (PAUSE, pause)
                return
            if step is NEED_DATA:
                yield (READ, deadline)
            else:
                engine.decrypted((yield (DECRYPT, step)))
    except CallcpTimeout:
        raise engine.handshake_timed_out(seconds, format_peer(peer)) from None


def send_stream(
    core: Core,
    chunks: Any,
    size: Optional[int],
    name: str,
    checksum: bool,
    progress: Optional[Progress],
) -> Procedure:
    """``send_stream()``: start, the chunks of ``chunks``, end; and the abort
    that no failure (the source, the progress callback, a cancellation) may
    skip, so the peer is never left inside the stream."""
    core.start_stream(size, name, checksum=checksum)
    done = 0
    try:
        yield _WRITE
        while True:
            chunk = yield (CHUNK, chunks)
            if chunk is None:
                break
            core.send_stream_data(chunk)
            yield _WRITE
            done += len(chunk)
            if progress is not None:
                progress(done, size)
        length, digest = core.end_stream()
    except GeneratorExit:
        raise
    except BaseException as exc:
        if core.sending_stream and core.can_send:
            core.abort_stream(f"the sender failed ({type(exc).__name__})")
            try:
                yield _WRITE_NOW
            except CallcpError:
                pass  # the write failed: the connection is closed
        raise
    yield _WRITE
    return StreamInfo(length, digest.hex() if digest is not None else None, name)


def receive_stream(
    engine: Engine, dest: Destination, progress: Optional[Progress], max_size: Optional[int]
) -> Procedure:
    """``recv_stream()``: the stream's events into a sink; on a failure of
    ours mid-stream the connection is closed (the rest would be misread).
    A stream over ``max_size`` (announced, or sent) is refused: REFUSED, with
    the reason, before anything of it is kept."""
    started = engine.stream_from((yield _EVENT))
    try:
        rx = StreamReception(started, dest, progress, max_size)
    except GeneratorExit:
        raise
    except StreamTooLarge as exc:
        engine.close(CloseCode.REFUSED, f"the stream is larger than {max_size} bytes")
        yield _ABORT
        raise exc from None
    except BaseException:
        engine.close(CloseCode.INTERNAL_ERROR, "the receiver could not open its output")
        yield _ABORT
        raise
    try:
        while True:
            info = rx.feed((yield _EVENT))
            if info is not None:
                return info
    except GeneratorExit:
        raise
    except StreamTooLarge as exc:
        rx.failed(None)
        engine.close(CloseCode.REFUSED, exc.reason or f"the stream is larger than {max_size} bytes")
        yield _ABORT
        raise
    except BaseException as exc:
        if rx.failed(exc):
            engine.close(CloseCode.INTERNAL_ERROR, "the receiver failed in the middle of a stream")
            yield _ABORT
        raise


# ================================================================ addresses


def format_peer(addr: Any) -> str:
    """``host:port`` (``[v6]:port``) for logs; "unknown peer" without one."""
    if addr and isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return "unknown peer" if not addr else str(addr)


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def source_of(addr: Any) -> str:
    """What per-source limits count: an IPv4 address, or an IPv6 /64 (one
    subscriber's prefix); an IPv6 address that carries an IPv4 one
    (v4-mapped, 6to4, NAT64's 64:ff9b::/96) counts as that IPv4 address."""
    if not addr or not isinstance(addr, tuple):
        return "local"
    return _source_of_host(str(addr[0]))


@functools.lru_cache(maxsize=1024)  # (a connection asks up to four times)
def _source_of_host(host: str) -> str:
    host = host.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:  # (v4-mapped, 6to4, NAT64: the IPv4 host is the source)
            return str(embedded)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


#: Seconds between two looks at a ticket key file (has it changed?).
TICKET_FILE_CHECK = 1.0


def _file_stamp(path: Any) -> Tuple[int, int, int]:
    st = os.stat(os.path.expanduser(path))
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _unmapped(network: Any) -> Any:
    """An IPv4-mapped IPv6 network (``::ffff:10.0.0.5``) as the IPv4 network
    it stands for: peers are matched as IPv4 (see TrustedProxies.trusts)."""
    if network.version == 6 and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False)
    return network


def via_proxy(addr: Any) -> str:
    """The admission's name for a trusted proxy's connection before its
    PROXY header said whose it is."""
    return f"proxy {source_of(addr)}"


class TrustedProxies:
    """The addresses (networks) whose connections must begin with a PROXY
    protocol header: ``trusted_proxies``, validated by the options."""

    __slots__ = ("_networks",)

    def __init__(self, entries: Any) -> None:
        self._networks = tuple(_unmapped(ipaddress.ip_network(e, strict=False)) for e in entries)

    def trusts(self, addr: Any) -> bool:
        if not addr or not isinstance(addr, tuple):
            return False
        try:
            ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self._networks)


# ================================================================ admission


class Admission:
    """Open connections, counted globally and per source address.

    A connection is refused when ``max_connections`` are open, when its
    source already has ``per_source`` open (0: no such limit), or when the
    server is nearly full (the last tenth of ``max_connections`` is kept for
    sources with fewer than :attr:`FEW` connections, so one busy source
    cannot take the last places).
    """

    FEW = 4

    def __init__(self, max_connections: int, per_source: int) -> None:
        self.max_connections = max_connections
        self.per_source = per_source
        self._reserved = max_connections // 10
        self._lock = threading.Lock()
        self.open = 0
        self._by_source: Dict[str, int] = {}

    def admit(self, source: str, *, per_source: bool = True) -> Optional[str]:
        """Count a new connection in; None if admitted, else why not.
        ``per_source=False``: a trusted proxy's connection, not yet known to
        be whose (see :meth:`move`): counted, but not held to the per-source
        limits."""
        with self._lock:
            mine = self._by_source.get(source, 0)
            if self.open >= self.max_connections:
                return f"too many connections: max_connections ({self.max_connections}) reached"
            why = None if not per_source else self._over_limits(mine)
            if why is None:
                self.open += 1
                self._by_source[source] = mine + 1
            return why

    def move(self, old: str, new: str) -> Optional[str]:
        """A counted connection turns out to be ``new``'s (a PROXY header
        named its client): count it there, held to the per-source limit.
        None if moved; else why not (it stays counted under ``old``)."""
        with self._lock:
            mine = self._by_source.get(new, 0)
            why = self._over_limits(mine)
            if why is None:
                self._by_source[new] = mine + 1
                self._forget(old)
            return why

    def release(self, source: str) -> None:
        with self._lock:
            self.open -= 1
            self._forget(source)

    def _over_limits(self, mine: int) -> Optional[str]:
        """(under the lock) Why a source with ``mine`` connections may not
        have one more; None: it may."""
        if self.per_source and mine >= self.per_source:
            return (
                "too many connections from one address: "
                f"max_connections_per_source ({self.per_source}) reached"
            )
        if self.open >= self.max_connections - self._reserved and mine >= self.FEW:
            return "nearly full: the last places are kept for other addresses"
        return None

    def _forget(self, source: str) -> None:
        left = self._by_source.get(source, 1) - 1
        if left > 0:
            self._by_source[source] = left
        else:
            self._by_source.pop(source, None)


class HandshakeTicket:
    """One connection's claim on a key-exchange slot."""

    __slots__ = ("source", "start", "alive", "dead", "state", "started")

    def __init__(
        self,
        source: str,
        start: Callable[[], None],
        alive: Callable[[], bool],
        dead: Callable[[], None] = lambda: None,
    ) -> None:
        self.source = source
        self.start = start  # called (outside any lock) when the slot is granted
        self.alive = alive  # False: the connection is gone, skip it...
        self.dead = dead  # ...and call this (outside any lock) to close and release it
        self.state = "new"  # then "waiting", "running", "done"
        self.started = 0.0  # when its key exchange started


class HandshakeQueue:
    """Key exchanges (one RSA decryption each) of connections whose whole
    ClientHello is in hand: at most ``limit`` running, at most ``max_waiting``
    waiting in arrival order, at most ``per_source`` (running or waiting)
    from one source (0: no such limit).  A waiting ticket whose connection
    closed or timed out is cancelled, so no work is done for a peer that is
    gone.

    The queue is also bounded in time: a ticket that would wait longer than
    ``patience`` seconds (the handshake timeout: it would time out anyway)
    is refused at once, "server busy".  The expected wait is the queue's
    length times the recent cost of a key exchange (from its start to its
    end, so contention for the CPU is counted) over ``limit``."""

    def __init__(
        self, limit: int, max_waiting: int, per_source: int, patience: float = float("inf")
    ) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.per_source = per_source
        self.patience = patience
        self.cost = 0.0  # seconds per key exchange, a moving average
        self._lock = threading.Lock()
        self.running = 0
        self._waiting: Deque[HandshakeTicket] = deque()
        self._by_source: Dict[str, int] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, ticket: HandshakeTicket) -> Optional[str]:
        """Start the ticket now or queue it; None, or why it is refused."""
        with self._lock:
            mine = self._by_source.get(ticket.source, 0)
            if self.per_source and mine >= self.per_source:
                return f"max_handshakes_per_source ({self.per_source}) reached"
            if self.running < self.limit:
                self.running += 1
                ticket.state = "running"
                ticket.started = time.monotonic()
            elif (
                len(self._waiting) < self.max_waiting
                and (len(self._waiting) + 1) * self.cost / self.limit < self.patience
            ):
                ticket.state = "waiting"
                self._waiting.append(ticket)
            else:
                return f"too many handshakes in progress (max_handshakes={self.limit})"
            self._by_source[ticket.source] = mine + 1
        if ticket.state == "running":
            ticket.start()
        return None

    def done(self, ticket: HandshakeTicket) -> None:
        """The ticket's key exchange finished (or failed): let the next in."""
        starts, dead = [], []
        with self._lock:
            if ticket.state != "running":
                return
            ticket.state = "done"
            took = time.monotonic() - ticket.started
            self.cost = took if not self.cost else 0.9 * self.cost + 0.1 * took
            self.running -= 1
            self._forget(ticket.source)
            while self._waiting and self.running < self.limit:
                nxt = self._waiting.popleft()
                try:
                    alive = nxt.alive()
                except Exception:  # (a transport closing under the check)
                    alive = False
                if not alive:
                    nxt.state = "done"
                    self._forget(nxt.source)
                    dead.append(nxt)
                    continue
                nxt.state = "running"
                nxt.started = time.monotonic()
                self.running += 1
                starts.append(nxt)
        for gone in dead:
            gone.dead()
        for nxt in starts:
            nxt.start()

    def cancel(self, ticket: HandshakeTicket) -> bool:
        """The ticket's connection is gone: it waits no more.  False if its
        key exchange already started (it frees its slot through done())."""
        with self._lock:
            if ticket.state != "waiting":
                return ticket.state == "new"
            ticket.state = "done"
            self._waiting.remove(ticket)
            self._forget(ticket.source)
            return True

    def _forget(self, source: str) -> None:
        left = self._by_source.get(source, 1) - 1
        if left > 0:
            self._by_source[source] = left
        else:
            self._by_source.pop(source, None)


class MessageBudget:
    """Partially received message bytes across all of a server's
    connections.  Past ``limit``, the connection holding the largest
    unfinished message is interrupted with MESSAGE_TOO_LARGE (raised at once
    if that is the caller's own)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._lock = threading.Lock()
        self._holders: Set[Engine] = set()

    def charge(self, engine: Engine, size: int) -> None:
        victim: Optional[Engine] = None
        with self._lock:
            self.total += size - engine.charged
            engine.charged = size
            if size:
                self._holders.add(engine)
            else:
                self._holders.discard(engine)
            if self.total > self.limit:
                # The source holding the most unfinished bytes loses its
                # largest message: many mid-sized ones from one source cannot
                # make another source's single upload the victim.
                by_source: Dict[str, int] = {}
                for holder in self._holders:
                    by_source[holder.source] = by_source.get(holder.source, 0) + holder.charged
                worst = max(by_source, key=by_source.__getitem__)
                victim = max(
                    (h for h in self._holders if h.source == worst), key=lambda e: e.charged
                )
                # Its bytes are as good as freed: it will not read again.
                self.total -= victim.charged
                victim.charged = 0
                self._holders.discard(victim)
        if victim is not None:
            err = MessageTooLarge(
                "the server's budget for partially received messages is exhausted; "
                "this unfinished message is dropped"
            )
            if victim is engine:
                engine.core.fail(err)
                raise err
            victim.interrupt(err)


class Proofs:
    """A token bucket for REFUSAL proofs (one X25519 exchange each, about
    45 µs): at most ``RATE`` a second on average, ``BURST`` at once.  Beyond
    it a refusal is a plain ALERT (no proof: the client cannot know its
    flight went unread), so a flood of hellos at a full queue costs the
    accept thread no more than an ALERT each.  Thread-safe enough: a lost
    update only shifts one token."""

    RATE = 1000.0
    BURST = 100.0

    __slots__ = ("tokens", "stamp")

    def __init__(self) -> None:
        self.tokens = self.BURST
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.BURST, self.tokens + (now - self.stamp) * self.RATE)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


# ================================================================== logging


class Notices:
    """Refusals, resets and failed handshakes, logged without flooding.

    The first :attr:`BURST` notices of each kind in a :attr:`WINDOW` are
    logged one per line; the rest are only counted, and once the window
    ends one line sums them up ("refused 512 connections from 1 source in
    the last 10 s: busy").  ``flush()`` is called by the server's clock.
    """

    WINDOW = 10.0
    BURST = 10
    MAX_SOURCES = 1000

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._lock = threading.Lock()
        self._start = time.monotonic()
        # kind -> [count, suppressed, sources]
        self._kinds: Dict[str, Tuple[int, int, Set[str]]] = {}
        self._levels: Dict[str, int] = {}  # kind -> its lines' level

    def note(
        self, kind: str, source: str, message: str, *args: Any, level: int = logging.WARNING
    ) -> None:
        """One event of ``kind`` (e.g. "refused ...: busy") from ``source``;
        ``message % args`` is its own line (at ``level``), if it is logged."""
        now = time.monotonic()
        if now - self._start >= self.WINDOW:
            self.flush(now)
        with self._lock:
            count, suppressed, sources = self._kinds.get(kind, (0, 0, set()))
            if len(sources) < self.MAX_SOURCES:
                sources.add(source)
            loud = count < self.BURST
            self._kinds[kind] = (count + 1, suppressed + (not loud), sources)
            self._levels[kind] = level
        if loud:
            self._log.log(level, message, *args)

    def flush(self, now: Optional[float] = None) -> None:
        """End the window if it is over: one summary line per kind that had
        notices left unlogged."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._start < self.WINDOW:
                return
            seconds = min(now, time.monotonic()) - self._start  # (now: inf when stopping)
            kinds, self._kinds = self._kinds, {}
            self._start = now
        for kind, (count, suppressed, sources) in kinds.items():
            if suppressed:
                many = f"{len(sources)}+" if len(sources) >= self.MAX_SOURCES else len(sources)
                plural = "" if len(sources) == 1 else "s"
                self._log.log(
                    self._levels.get(kind, logging.WARNING),
                    "%s: %d in the last %.0f s from %s source%s (%d not logged one by one)",
                    kind,
                    count,
                    seconds,
                    many,
                    plural,
                    suppressed,
                )


# ================================================================= handlers


@dataclass(frozen=True)
class Outcome:
    """What a server does when a handler returns or raises."""

    close_code: int  #: the code of the CLOSE we send (if the connection is open)
    close_reason: str
    log_kind: Optional[str]  #: a Notices kind, or None: not logged
    log_message: str  #: a logging format: the peer's address, then ``detail``
    detail: str = ""  #: an argument, never part of the format (it may quote the peer)
    traceback: bool = False  #: log the handler's traceback (an application bug)


class Arrival:
    """(server) An accepted connection before its key exchange: its
    ClientHello arriving, then its wait in the :class:`HandshakeQueue`.

    The adapter reads into :meth:`received` until it says the hello is
    whole, stops reading (the kernel holds the rest), and calls
    :meth:`queue`; its ``start`` callback hands the connection to a thread
    or task when a slot is free.  Until then the adapter calls :meth:`expire`
    at the deadline and :meth:`lost` when the peer goes.  ``state`` is
    "hello", "waiting", "started" (the thread or task owns it now) or
    "dropped" (the adapter writes ``engine.core.data_to_send()``, an ALERT
    saying why, and closes).
    """

    __slots__ = (
        "server",
        "addr",
        "engine",
        "deadline",
        "ticket",
        "state",
        "io",
        "released",
        "counted_as",
        "proxy",
        "health_check",
        "__weakref__",
    )

    def __init__(
        self, server: ServerCore, addr: Any, engine: Engine, *, proxied: bool = False
    ) -> None:
        self.io: Any = None  #: the adapter's transport (a socket, an asyncio link)
        self.server = server
        #: The peer's address: the client's, once a trusted proxy's PROXY
        #: header named it (logs, limits and ``remote_address`` use it).
        self.addr = addr
        self.engine = engine
        self.deadline = time.monotonic() + server.options.handshake_timeout
        engine.handshake_deadline = (self.deadline, server.options.handshake_timeout)
        #: Whom the admission counts this connection under.
        self.counted_as = via_proxy(addr) if proxied else source_of(addr)
        engine.source = source_of(addr)
        self.released = False
        self.ticket: Optional[HandshakeTicket] = None
        self.state = "hello"
        #: (a trusted proxy's connection) its PROXY header, until read
        self.proxy: Optional[ProxyHeaderReader] = ProxyHeaderReader() if proxied else None
        #: The trusted proxy's own connection, a health check (a header
        #: naming no client: v2 LOCAL, v1 UNKNOWN; or no byte at all): its
        #: end without a ClientHello is logged at DEBUG only.
        self.health_check = False

    def received(self, data: bytes) -> bool:
        """Bytes of the hello (``b""``: the peer closed), after a trusted
        proxy's PROXY header.  True once the hello is whole or the
        connection was dropped (a malformed hello or header, or the client
        the header names is over its limits)."""
        try:
            if self.proxy is not None:
                data = self._proxy_header(data)
                if not data:
                    return False
            self.engine.feed(data)
            return self.engine.poll_hello()
        except CallcpError as exc:
            self._drop(exc)
            return True
        except Exception as exc:  # (a bug this peer's bytes reached: it costs the peer only)
            self.server.internal_error(self.addr, exc)
            err = HandshakeError("internal error")
            err.code = CloseCode.INTERNAL_ERROR
            with contextlib.suppress(Exception):
                self.engine.core.fail(err)
            self._drop(err)
            return True

    def _proxy_header(self, data: bytes) -> bytes:
        """Read the PROXY header: the bytes after it (b"": none yet).

        Raises:
            ProxyHeaderError: no valid header (the proxy's fault, or a
                stranger's bytes).
            ServerBusy: the client it names is over its limits.
        """
        reader = self.proxy
        assert reader is not None
        try:
            got = reader.feed(data)
        except ProxyHeaderError as exc:
            # The proxy connected and left without a byte: its health check
            # (one that sends no header), not worth a WARNING each time.
            self.health_check = not data and not reader.buffered
            self.engine.core.fail(exc)  # (an ALERT says why, to whoever reads it)
            raise
        if got is None:
            return b""
        self.proxy = None
        info, rest = got
        self.health_check = info.source is None  # (v2 LOCAL, v1 UNKNOWN: the proxy's own)
        if info.source is not None:
            self.addr = info.source
        # (no client named: the connection's own endpoints, the proxy's, and its limits)
        source = source_of(self.addr)
        why = self.server.admission.move(self.counted_as, source)
        if why is not None:
            self.server.refused(self.addr, why)
            err = ServerBusy(f"server busy: {why}")
            self.engine.core.fail(err)  # (the ALERT tells the client why)
            raise err
        self.counted_as = self.engine.source = source
        return rest

    def queue(
        self, start: Callable[[], None], alive: Callable[[], bool], drop: Callable[[], None]
    ) -> None:
        """Queue for a key-exchange slot: ``start()`` (maybe at once) when it
        is granted; ``alive()`` says whether the peer is still there; ``drop()``
        closes and releases a connection whose peer left while it waited."""
        if self.state != "hello":
            return
        self.state = "waiting"
        if getattr(self.engine.pending, "resumed", False):  # a ticket: no RSA work, no slot
            self._start(start, drop)()
            return

        def dead() -> None:
            self.state = "dropped"
            self.server.handshake_failed(self.addr, HandshakeError(PEER_LEFT))
            drop()

        self.ticket = HandshakeTicket(source_of(self.addr), self._start(start, drop), alive, dead)
        why = self.server.handshakes.submit(self.ticket)
        if why is not None:
            self.server.refused(self.addr, why)
            self._refuse(f"server busy: {why}")
            self.state = "dropped"

    def _start(self, start: Callable[[], None], drop: Callable[[], None]) -> Callable[[], None]:
        def started() -> None:
            self.state = "started"
            try:
                start()
            except Exception as exc:  # no thread (a task limit): busy, not a dead server
                self.state = "dropped"
                self.key_exchange_done()
                self.server.log.error("could not serve %s: %s", format_peer(self.addr), exc)
                self._refuse("server busy")
                drop()

        return started

    def wanted(self, connected: bool) -> bool:
        """Is the connection still worth its key exchange?  Yes while the
        peer is connected; after its FIN only if it sent more than its hello
        (a client that sent its whole flight and closed is still served; one
        that sent a hello and left costs no RSA work)."""
        return connected or self.engine.core.buffered > 0

    @property
    def gone(self) -> bool:
        """No longer the acceptor's: started (a thread or task has it) or dropped."""
        return self.state == "started" or self.state == "dropped"

    def decrypt(self, request: DecryptionRequested) -> Optional[bytes]:
        """(blocking server) :meth:`run_key_exchange`, then free the slot at
        once (the rest of the handshake does not hold it)."""
        try:
            return self.run_key_exchange(request)
        finally:
            self.key_exchange_done()

    def run_key_exchange(self, request: DecryptionRequested) -> Optional[bytes]:
        """The RSA decryption (any thread).  A peer that left, or a deadline
        already passed, costs none: the handshake then goes on and fails."""
        try:
            gone = time.monotonic() >= self.deadline or (
                self.ticket is not None and not self.ticket.alive()
            )
        except Exception:
            gone = True
        return None if gone else request.run()

    def key_exchange_done(self) -> None:
        """The RSA work is over (or failed): the next ticket may start."""
        if self.ticket is not None:
            self.server.handshakes.done(self.ticket)

    def expire(self) -> bool:
        """The deadline passed: True if the connection is to be dropped now
        (its key exchange had not started)."""
        if self.state == "hello" or (
            self.state == "waiting"
            and self.ticket is not None
            and self.server.handshakes.cancel(self.ticket)
        ):
            seconds = self.server.options.handshake_timeout
            self._drop(self.engine.handshake_timed_out(seconds, ""))
            return True
        return False

    def stop(self) -> bool:
        """Server shutdown: True if the connection is to be dropped now."""
        if self.state == "hello" or (
            self.state == "waiting"
            and self.ticket is not None
            and self.server.handshakes.cancel(self.ticket)
        ):
            self._refuse(SHUTTING_DOWN)
            self.state = "dropped"
            return True
        return False

    def _refuse(self, reason: str) -> None:
        """Decline before the key exchange: a REFUSAL (proved, §4.10) while
        the proof budget lasts, else an ALERT."""
        core = self.engine.core
        if isinstance(core, ServerProtocol):
            core.refusal_proof = self.server.proofs.take()
        self.engine.close(CloseCode.GOING_AWAY, reason)

    def lost(self) -> None:
        """The peer went before its key exchange: no RSA work for it."""
        if self.ticket is not None:
            self.server.handshakes.cancel(self.ticket)

    def release(self) -> None:
        """The connection is over: give back its place (once, whoever asks)."""
        if not self.released:
            self.released = True
            self.server.release(self.counted_as, self.engine)
        if self.state != "started":  # (a started key exchange lets go of them itself)
            self.engine.core.discard_keys()  # the share's private key, for one

    def _drop(self, exc: BaseException) -> None:
        self.state = "dropped"
        if isinstance(exc, ServerBusy):  # (refused after its PROXY header: logged as such)
            return
        if self.health_check and isinstance(exc, (HandshakeAborted, ProxyHeaderError)):
            self.server.log.debug("health check from %s", format_peer(self.addr))
            return
        self.server.handshake_failed(self.addr, exc)


def handler_outcome(exc: Optional[BaseException], idle_timeout: Optional[float]) -> Outcome:
    """The one policy for a handler's end, for both adapters."""
    if exc is None or isinstance(exc, ConnectionClosedOK):
        return Outcome(CloseCode.NORMAL, "", None, "")
    if isinstance(exc, CallcpTimeout):
        return Outcome(
            CloseCode.TIMEOUT,
            "idle timeout",
            "connections closed: idle timeout",
            "closed %s: idle for more than %s s",
            str(idle_timeout),
        )
    if isinstance(exc, CallcpError):
        return Outcome(
            CloseCode.NORMAL,
            "",
            "connections ended by an error",
            "connection %s ended: %s",
            str(exc),
        )
    if not isinstance(exc, Exception):  # cancellation, KeyboardInterrupt: we are stopping
        return Outcome(CloseCode.GOING_AWAY, SHUTTING_DOWN, None, "")
    return Outcome(
        CloseCode.INTERNAL_ERROR,
        "internal server error",
        "handler errors",
        "handler raised on connection %s",
        traceback=True,
    )


# ================================================================== servers


class _Default:
    """Sentinel type: "use the connection's timeout"."""

    __slots__ = ()


#: A ``timeout`` argument's default: the connection's own timeout.
DEFAULT: Any = _Default()
Buffer = Union[bytes, bytearray, memoryview]


class ConnectionBase:
    """What both adapters' Connections show of their engine."""

    _core: Core
    _timeout: Optional[float]
    remote_address: Address
    _repr_name = "callcp.Connection"

    @property
    def peer_fingerprint(self) -> Optional[str]:
        """The peer's key fingerprint (``SHA256:...``): the server's on a
        client; the client's on a server with client authentication, else None."""
        return self._core.peer_fingerprint

    @property
    def resumed(self) -> bool:
        """A session ticket was used: on a server, the client's ticket was
        accepted (no RSA key exchange); on a client, one was offered (the
        server may still have done a full key exchange, unseen)."""
        core = self._core
        return bool(getattr(core, "resumed", False) or getattr(core, "offered_ticket", False))

    def _seconds(self, timeout: Any) -> Optional[float]:
        """A call's ``timeout`` argument, DEFAULT being the connection's."""
        return self._timeout if isinstance(timeout, _Default) else timeout

    def __repr__(self) -> str:
        return f"<{self._repr_name} {self.remote_address!r} {self._core.state.value}>"


class ServerBase:
    """What both servers show of their ServerCore."""

    _core: ServerCore

    @property
    def fingerprint(self) -> str:
        """The server key's ``SHA256:`` fingerprint."""
        return self._core.fingerprint

    @property
    def active_connections(self) -> int:
        """Connections open now, in every phase (the hello, the handshake,
        the handler)."""
        return self._core.admission.open


class ServerCore:
    """What every connection of one server shares (both adapters)."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.log = logger_for(options.logger)
        insecure_ok = options.allow_insecure_permissions
        self.keypair = load_server_key(
            options.key, password=options.key_password, insecure_ok=insecure_ok
        )
        self._public_der = self.keypair.public_der
        self.next_keypair = load_client_key(
            options.next_key, password=options.key_password, insecure_ok=insecure_ok
        )
        if self.next_keypair is not None and self.next_keypair.fingerprint == self.fingerprint:
            raise ValueError("next_key is the server's current key: give the key it will use next")
        self._authorize = client_authorizer(options.authorized_keys)
        #: The allow list, when it came from a file (``reload()`` it on SIGHUP).
        self.authorized_keys: Optional[AuthorizedKeys] = getattr(self._authorize, "__self__", None)
        assert options.max_connections is not None
        self.admission = Admission(options.max_connections, options.max_connections_per_source)
        self.handshakes = HandshakeQueue(
            options.max_handshakes,
            options.max_waiting_handshakes,
            options.max_handshakes_per_source,
            options.handshake_timeout,
        )
        self.budget = MessageBudget(options.max_buffered_bytes)
        self.notices = Notices(self.log)
        self.proofs = Proofs()
        self.stopping = False
        self.shares = ShareKeeper(
            self.keypair.private_key, options.share_lifetime, options.handshake_timeout
        )
        #: The proxies whose connections start with a PROXY header (None: off).
        self.proxies = (
            TrustedProxies(options.trusted_proxies) if options.proxy_protocol else None
        )
        #: Callcp 1.0's wire format (``protocol="callcp1"``): no shares, no tickets.
        self.legacy = options.protocol == CALLCP1
        self.tickets: Optional[TicketKeys] = None
        #: (a ticket key file) what it was when read: (mtime_ns, size, inode)
        self._ticket_file: Optional[Tuple[int, int, int]] = None
        self._ticket_checked = time.monotonic()
        if options.ticket_lifetime and not self.legacy:
            self.tickets = self._ticket_keys()
        self._spare: Optional[Tuple[Engine, SignedShare]] = None
        self._key_retry_at = 0.0  # (monotonic) the key failed: not asked again before
        self._traceback_logged = -Notices.WINDOW  # (monotonic) internal_error()'s last traceback

    @property
    def fingerprint(self) -> str:
        return self.keypair.fingerprint

    def _ticket_keys(self) -> TicketKeys:
        """The ticket keys from ``ticket_key`` (a file: read now, and noted
        so that :meth:`prepare` reads it again when it changes)."""
        source = self.options.ticket_key
        if source is not None and not isinstance(source, (bytes, bytearray)):
            try:
                self._ticket_file = _file_stamp(source)
            except OSError:
                pass  # (load_ticket_key says why, in its terms)
        secrets = load_ticket_key(source, insecure_ok=self.options.allow_insecure_permissions)
        if secrets is None:
            return TicketKeys(self.options.ticket_lifetime)
        return TicketKeys(self.options.ticket_lifetime, secrets[0], previous=secrets[1:])

    def _reload_ticket_keys(self) -> None:
        """(at most once a second) A ticket key file that changed is read
        again: a rotation reaches a running server.  A file that cannot be
        read leaves the keys as they were (logged)."""
        now = time.monotonic()
        if self._ticket_file is None or now - self._ticket_checked < TICKET_FILE_CHECK:
            return
        self._ticket_checked = now
        source = self.options.ticket_key
        assert source is not None and not isinstance(source, (bytes, bytearray))
        try:
            stamp = _file_stamp(source)
            if stamp == self._ticket_file:
                return
            keys = self._ticket_keys()
        except (OSError, KeyManagementError) as exc:
            self.notices.note(
                "ticket key file unreadable",
                "ticket key",
                "the ticket key file could not be read again (the keys stay as they were): %s",
                printable(str(getattr(exc, "strerror", None) or exc)),
            )
            return
        self.tickets = keys
        self._spare = None  # (it holds the old keys: a removed key opens nothing more)
        self.log.info("ticket keys read again from %s", printable(str(source)))

    def prepare(self) -> None:
        """(the accepting thread, when it has nothing else to do; at least
        once a second) Renew the signed share when it is nearly due (its RSA
        signature then costs no connection a wait), and make the next
        connection's engine: its ServerHello is ready when it arrives.  One
        spare at most, used by one connection, and only while its share is
        the current one.  (A Callcp 1.0 server signs nothing: its
        connections' engines are made at arrival.)"""
        if self.stopping or self.legacy:
            return
        if self._ticket_file is not None:
            self._reload_ticket_keys()
        now = time.time()
        if time.monotonic() >= self._key_retry_at:
            try:
                self.shares.refresh(now)
            except KeyManagementError as exc:
                self._key_failed(exc)
        share = self._current_share(now)
        if share is None:
            return
        if self._spare is None or self._spare[1] is not share:
            self._spare = (self._new_engine(share), share)

    def _current_share(self, now: float) -> Optional[SignedShare]:
        """The share for a ServerHello now.  When the server key cannot sign
        a new one (a PKCS#11 token failing), the last one while it is still
        valid for a whole handshake, else None: connections are then refused
        (retryable) until the key signs again.  After a failure the key is
        not asked again for KEY_RETRY seconds (a refused connection costs no
        token call)."""
        if time.monotonic() < self._key_retry_at:
            return self.shares.still_valid(now)
        try:
            return self.shares.current(now)
        except KeyManagementError as exc:
            self._key_failed(exc)
            return self.shares.still_valid(now)

    def _key_failed(self, exc: KeyManagementError) -> None:
        self._key_retry_at = time.monotonic() + KEY_RETRY
        self.notices.note(
            "the server key failed", "server key", "the server key cannot sign a share: %s", exc
        )

    def _new_engine(self, share: SignedShare) -> Engine:
        """A server connection's engine; its ServerHello (with ``share``) is queued."""
        core = ServerProtocol(
            self.keypair.private_key,
            authorize_client=self._authorize,
            max_message_size=self.options.max_message_size,
            server_public_der=self._public_der,
            defer_decryption=True,
            share=share,
            tickets=self.tickets,
            next_key=self.next_keypair.private_key if self.next_keypair else None,
            legacy_tripwire=True,
        )
        core.start()
        return Engine(core, budget=self.budget)

    def arrive(self, addr: Any) -> Tuple[Optional[Arrival], bytes]:
        """A connection was accepted: its :class:`Arrival` (None: refused)
        and what to write to it now (its ServerHello, or the refusal)."""
        proxied = self.proxies is not None and self.proxies.trusts(addr)
        if self.stopping:
            why: Optional[str] = SHUTTING_DOWN
        elif proxied:  # (whose it is, the PROXY header says: then its limits apply)
            why = self.admission.admit(via_proxy(addr), per_source=False)
        else:
            why = self.admission.admit(source_of(addr))
        if why is not None:
            self.refused(addr, why)
            if self.legacy:  # (Callcp 1.0 has no message for it: the connection is closed)
                return None, b""
            return None, alert_frame(CloseCode.GOING_AWAY, f"server busy: {why}")
        if self.legacy:
            legacy = LegacyServer(self.keypair.private_key, defer_decryption=True)
            legacy.start()
            arrival = Arrival(self, addr, Engine(legacy, budget=self.budget), proxied=proxied)
            return arrival, legacy.data_to_send()
        spare, self._spare = self._spare, None
        share = self._current_share(time.time())
        if share is None:
            self.refused(addr, "the server key is unavailable")
            return None, alert_frame(CloseCode.GOING_AWAY, "server busy: its key is unavailable")
        engine = spare[0] if spare is not None and spare[1] is share else self._new_engine(share)
        engine.keepalive = keepalive_for(
            self.options.keepalive_interval, self.options.keepalive_timeout
        )
        arrival = Arrival(self, addr, engine, proxied=proxied)
        return arrival, arrival.engine.core.data_to_send()

    def internal_error(self, addr: Any, exc: BaseException) -> None:
        """A bug reached by a peer's bytes: logged with its traceback at most
        once per Notices.WINDOW (a peer that can reach it could flood the
        log), else counted like other notices; the text escaped."""
        now = time.monotonic()
        if now - self._traceback_logged >= Notices.WINDOW:
            self._traceback_logged = now
            self.log.error(
                "internal error reading the hello of %s: %s",
                format_peer(addr),
                printable(repr(exc))[:300],
                exc_info=True,
            )
            return
        self.notices.note(
            "internal errors",
            source_of(addr),
            "internal error reading the hello of %s: %s",
            format_peer(addr),
            printable(repr(exc))[:300],
        )

    def refused(self, addr: Any, why: str) -> None:
        self.notices.note(
            f"refused connections: {why}", source_of(addr), "refused %s: %s", format_peer(addr), why
        )

    def listening(self, address: Any, workers: int) -> None:
        processes = f" with {workers} worker processes" if workers > 1 else ""
        if self.legacy:
            self.log.warning(
                "callcp server listening on %s%s (key %s) speaking CALLCP 1.0's wire format "
                "(protocol='callcp1'): %s; move its clients to callcp/2",
                address,
                processes,
                self.fingerprint,
                LEGACY_MISSING,
            )
            return
        self.log.info(
            "callcp server listening on %s%s (key %s)", address, processes, self.fingerprint
        )

    def stopped(self) -> None:
        self._spare = None
        self.shares.forget()
        self.notices.flush(float("inf"))
        self.log.info("callcp server stopped")

    def handshake_failed(self, addr: Any, exc: BaseException) -> None:
        if not isinstance(exc, CallcpError):  # a bug, not the peer: loudly, with the traceback
            self.log.error(
                "internal error in the handshake with %s", format_peer(addr), exc_info=exc
            )
            return
        if getattr(exc, "without_a_byte", False):  # (port checks, probes: not a warning)
            self.notices.note(
                "connections closed without a byte",
                source_of(addr),
                "connection from %s closed without a byte: %s",
                format_peer(addr),
                exc,
                level=logging.INFO,
            )
            return
        self.notices.note(
            "failed handshakes",
            source_of(addr),
            "handshake with %s failed: %s",
            format_peer(addr),
            exc,
        )

    def ended(
        self, addr: Any, engine: Engine, outcome: Outcome, exc: Optional[BaseException]
    ) -> None:
        """Log a handler's end by its outcome and queue the close."""
        if outcome.traceback:
            self.log.error(outcome.log_message, format_peer(addr), exc_info=exc)
        elif outcome.log_kind is not None:
            self.notices.note(
                outcome.log_kind,
                source_of(addr),
                outcome.log_message,
                format_peer(addr),
                outcome.detail,
            )
        engine.close(outcome.close_code, outcome.close_reason)

    def release(self, counted_as: str, engine: Optional[Engine]) -> None:
        """A connection admitted by :meth:`arrive` is over (``counted_as``:
        the source its admission counts it under)."""
        self.admission.release(counted_as)
        if engine is not None:
            engine.release()

    def connected(self, addr: Any, engine: Engine) -> None:
        """The handshake completed: the handler runs next."""
        if self.stopping:
            engine.stop()
        if self.legacy:  # one WARNING per connection (a flood: counted, one line per window)
            self.notices.note(
                "Callcp 1.0 connections (protocol='callcp1')",
                source_of(addr),
                "Callcp 1.0 connection from %s: %s",
                format_peer(addr),
                LEGACY_MISSING,
            )
            return
        fp = engine.core.peer_fingerprint
        self.log.debug("connection from %s%s", format_peer(addr), f" as {fp}" if fp else "")
