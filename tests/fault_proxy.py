"""A fault-injecting TCP proxy for tests over real sockets (tests/test_faults.py).

:class:`FaultProxy` listens on 127.0.0.1:0 and relays every accepted
connection to ``proxy.target`` (a ``(host, port)`` that may be changed at
any time: it is read when a client connects).  Unlike tests/sock_proxy.py it
knows nothing about callcp frames: it moves bytes, and breaks the network
the way real networks break, while connections are live:

* :meth:`~FaultProxy.partition` / :meth:`~FaultProxy.heal`: nothing is
  forwarded either way.  Bytes are *held*, not dropped: the proxy stops
  reading its sockets, so the senders' kernel buffers fill and TCP
  backpressure applies, and the few chunks it had already read wait for
  :meth:`~FaultProxy.heal`.  No FIN, no RST: both TCP connections stay open
  and silent, as behind a dead router.
* :meth:`~FaultProxy.reset_all`: RST every relayed connection (SO_LINGER 0,
  then close), towards the client and towards the server.
  :meth:`~FaultProxy.reset_after`: the same once ``n`` more bytes went one
  way (at most ``n`` reach the other side): a cut in the middle of a
  message or a stream.  Bytes still queued in the proxy are discarded.
* :meth:`~FaultProxy.set_latency`: each chunk is delivered ``latency`` ±
  ``jitter`` seconds after it was read, never before an earlier chunk of
  the same direction (order is preserved: the jitter only delays).
* :meth:`~FaultProxy.set_bandwidth`: at most that many bytes per second,
  per connection and direction (paced in small slices).
* :meth:`~FaultProxy.stats`: bytes forwarded each way, connections
  relayed, open, reset.

A peer's own FIN is passed on (half-close); a peer's RST is passed on as an
RST to the other side.

Bounded: each direction of a relay is a reader thread and a writer thread
with a queue of at most ``queue_chunks`` chunks of ``chunk_size`` bytes
between them (1 MiB by default; with latency, a connection thus carries
at most that much per ``latency`` each way); at most ``max_connections``
relays (more clients are reset at once).  Sockets are non-blocking; every
wait is a short poll, and every socket call happens under one lock, so a
fault injected from the test's thread takes effect at once and exactly:
after ``partition()`` returns nothing more is forwarded, after
``reset_all()`` returns both sides have been sent their RST.
"""

from __future__ import annotations

import random
import selectors
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

C2S = "c2s"  # client -> server
S2C = "s2c"  # server -> client
DIRECTIONS = (C2S, S2C)

#: The longest any proxy thread waits before looking at its flags again.
POLL = 0.05


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot: bytes forwarded (written to the far side) each way, and
    connections relayed in all, open now, ended by an RST."""

    c2s: int
    s2c: int
    connections: int
    active: int
    resets: int


def _rst(sock: socket.socket) -> None:
    """Close ``sock`` with an RST rather than a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Relay:
    """One proxied connection: client <-> proxy <-> server, four threads."""

    def __init__(
        self, proxy: FaultProxy, index: int, client: socket.socket, server: socket.socket
    ) -> None:
        self.proxy = proxy
        self.index = index
        self.client = client
        self.server = server
        self.src = {C2S: client, S2C: server}
        self.dst = {C2S: server, S2C: client}
        # chunks read and not yet written: (due time, bytes); b"" is the peer's FIN
        self.queues: Dict[str, Deque[Tuple[float, bytes]]] = {d: deque() for d in DIRECTIONS}
        # bytes still allowed each way before an RST (None: no limit); under the lock
        self.budget: Dict[str, Optional[int]] = dict(proxy._default_budget)
        self.ended: set = set()  # directions whose FIN went on
        self.dead = False  # sockets closed (under the lock)
        self.closed = threading.Event()
        self._threads = [
            threading.Thread(target=fn, args=(d,), name=f"fault-proxy-{index}-{fn.__name__}-{d}",
                             daemon=True)
            for d in DIRECTIONS
            for fn in (self._reader, self._writer)
        ]  # fmt: skip

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------ under the proxy's lock

    def reset(self) -> None:
        """RST both sides (caller holds the lock)."""
        if self.dead:
            return
        self.dead = True
        _rst(self.client)
        _rst(self.server)
        self.proxy._resets += 1
        self._closed()

    def _finish(self, direction: str) -> None:
        """Pass a FIN on (caller holds the lock); close once both went."""
        try:
            self.dst[direction].shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.ended.add(direction)
        if len(self.ended) == 2:
            self.dead = True
            self.client.close()
            self.server.close()
            self._closed()

    def _closed(self) -> None:
        for q in self.queues.values():
            q.clear()
        self.proxy._active -= 1
        self.closed.set()
        self.proxy._cond.notify_all()

    # ------------------------------------------------------------- threads

    def _reader(self, direction: str) -> None:
        proxy, cond, q = self.proxy, self.proxy._cond, self.queues[direction]
        src = self.src[direction]
        last_due = 0.0
        with selectors.DefaultSelector() as sel:
            with cond:  # (sockets are closed under the lock only)
                if self.dead:
                    return
                sel.register(src, selectors.EVENT_READ)
            while True:
                with cond:
                    # (full queue, or partitioned: do not read, let TCP push back)
                    while not self.dead and (proxy._partitioned or len(q) >= proxy.queue_chunks):
                        cond.wait(POLL)
                    if self.dead:
                        return
                if not sel.select(POLL):
                    continue
                with cond:
                    if self.dead or proxy._partitioned:
                        continue
                    try:
                        data = src.recv(proxy.chunk_size)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:  # the peer's RST: pass it on
                        self.reset()
                        return
                    latency, jitter = proxy._latency, proxy._jitter
                    delay = max(0.0, latency + random.uniform(-jitter, jitter))
                    last_due = max(last_due, time.monotonic() + delay)
                    q.append((last_due, data))
                    cond.notify_all()
                    if not data:
                        return

    def _writer(self, direction: str) -> None:
        proxy, cond, q = self.proxy, self.proxy._cond, self.queues[direction]
        dst = self.dst[direction]
        next_free = 0.0  # (bandwidth pacing) when the next slice may go
        with selectors.DefaultSelector() as sel:
            with cond:  # (sockets are closed under the lock only)
                if self.dead:
                    return
                sel.register(dst, selectors.EVENT_WRITE)
            while True:
                with cond:
                    while not self.dead and not q:
                        cond.wait(POLL)
                    if self.dead:
                        return
                    due, data = q[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, POLL))
                    continue
                if not data:
                    with cond:
                        while not self.dead and proxy._partitioned:
                            cond.wait(POLL)
                        if not self.dead:
                            q.popleft()
                            self._finish(direction)
                        return
                rate = proxy._bandwidth[direction]
                if rate:
                    wait = next_free - time.monotonic()
                    if wait > 0:
                        time.sleep(min(wait, POLL))
                        continue
                    data = data[: max(1, int(rate * 0.02))]  # a 20 ms slice
                if not sel.select(POLL):
                    continue
                with cond:
                    if self.dead:
                        return
                    if proxy._partitioned:
                        cond.wait(POLL)
                        continue
                    budget = self.budget[direction]
                    if budget is not None:
                        if budget <= 0:
                            self.reset()
                            return
                        data = data[:budget]
                    try:
                        sent = dst.send(data)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:  # the far side reset: pass it on
                        self.reset()
                        return
                    if direction == C2S:
                        proxy._c2s += sent
                    else:
                        proxy._s2c += sent
                    head_due, head = q[0]
                    if sent == len(head):
                        q.popleft()
                    else:
                        q[0] = (head_due, head[sent:])
                    cond.notify_all()
                    if budget is not None:
                        self.budget[direction] = budget - sent
                        if budget - sent <= 0:
                            self.reset()
                            return
                if rate:
                    next_free = max(next_free, time.monotonic() - 0.02) + sent / rate


class FaultProxy:
    """Listen on 127.0.0.1:0 and relay to ``target`` with injectable faults
    (see the module docstring).  Use as a context manager, or call close()."""

    def __init__(
        self,
        target: Tuple[str, int],
        *,
        chunk_size: int = 16384,
        queue_chunks: int = 64,
        max_connections: int = 64,
    ) -> None:
        self.target = target
        self.chunk_size = chunk_size
        self.queue_chunks = queue_chunks
        self.max_connections = max_connections
        self._cond = threading.Condition()  # guards everything below and every socket call
        self._partitioned = False
        self._latency = 0.0
        self._jitter = 0.0
        self._bandwidth: Dict[str, Optional[float]] = {C2S: None, S2C: None}
        self._default_budget: Dict[str, Optional[int]] = {C2S: None, S2C: None}
        self._relays: List[_Relay] = []
        self._c2s = self._s2c = self._active = self._resets = 0
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(POLL)
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def address(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.port)

    # -------------------------------------------------------------- faults

    def partition(self) -> None:
        """Stop forwarding, both ways, on every connection (held, not dropped)."""
        with self._cond:
            self._partitioned = True

    def heal(self) -> None:
        """Forward again: what was held goes on, in order."""
        with self._cond:
            self._partitioned = False
            self._cond.notify_all()

    def reset_all(self) -> None:
        """RST every relayed connection, both sides, now."""
        with self._cond:
            for relay in self._relays:
                relay.reset()

    def reset_after(self, nbytes: int, direction: str = C2S, *, future: bool = False) -> None:
        """RST each open connection once ``nbytes`` more bytes went
        ``direction`` (at most that many are delivered); ``future``: also
        each later connection, counting from its first byte."""
        assert direction in DIRECTIONS
        with self._cond:
            for relay in self._relays:
                relay.budget[direction] = nbytes
            if future:
                self._default_budget[direction] = nbytes

    def set_latency(self, latency: float, jitter: float = 0.0) -> None:
        """Delay each chunk read from now on by ``latency`` ± ``jitter`` s."""
        with self._cond:
            self._latency, self._jitter = latency, jitter

    def set_bandwidth(
        self, bytes_per_second: Optional[float], direction: Optional[str] = None
    ) -> None:
        """Cap each connection's ``direction`` (None: both) to that many
        bytes per second (None: no cap)."""
        with self._cond:
            for d in DIRECTIONS if direction is None else (direction,):
                self._bandwidth[d] = bytes_per_second

    # ---------------------------------------------------------- inspection

    def stats(self) -> ProxyStats:
        with self._cond:
            return ProxyStats(self._c2s, self._s2c, len(self._relays), self._active, self._resets)

    def wait_connections(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until ``n`` connections were relayed in all."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._relays) >= n, timeout)

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Wait until no relayed connection is open."""
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout)

    # ------------------------------------------------------------ machinery

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                full = self._active >= self.max_connections
            if full:
                _rst(client)
                continue
            try:
                server = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                _rst(client)  # (nothing there: the client sees a reset)
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
            with self._cond:
                relay = _Relay(self, len(self._relays), client, server)
                self._relays.append(relay)
                self._active += 1
                self._cond.notify_all()
            relay.start()

    def close(self) -> None:
        """Stop accepting and reset every connection still open."""
        self._stop.set()
        self._thread.join(5.0)
        self._listener.close()
        self.reset_all()
        for relay in self._relays:
            for thread in relay._threads:
                thread.join(5.0)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
