"""Support for the asyncio-only tests (tests/test_aio.py, a few in
tests/test_streams.py): a server on 127.0.0.1:0 that hands the test both
ends of a connection, a bounded ``asyncio.run``, log capture, RSS sampling.
(Tests over both adapters use tests/adapters.py.)

No sleeps are used as synchronisation: waits are on events, queues and
sockets, each with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, List, Optional, Tuple, TypeVar

import callcp.aio
from tests.aio_stream_peer import proc_status

LOOPBACK = "127.0.0.1"
PEER_SCRIPT = str(Path(__file__).with_name("aio_stream_peer.py"))
PYTHON = sys.executable
MIB = 1 << 20

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """``asyncio.run`` with a deadline on the whole coroutine."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def wait_for_condition(
    predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``predicate`` on the event loop until true (deadline: AssertionError)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


# ----------------------------------------------------------------- logging


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.records.append(record)

    def messages(self, min_level: int = logging.DEBUG) -> List[str]:
        with self._lock2:
            return [r.getMessage() for r in self.records if r.levelno >= min_level]

    def about(self, needle: str, min_level: int = logging.DEBUG) -> List[str]:
        return [m for m in self.messages(min_level) if needle in m]


@contextlib.contextmanager
def captured_logger() -> Any:
    """A fresh logger (a child of ``callcp``) recording everything."""
    logger = logging.getLogger(f"callcp.test.{uuid.uuid4().hex[:8]}")
    logger.setLevel(logging.DEBUG)
    handler = ListHandler()
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


# --------------------------------------------------------------- memory


class RssSampler:
    """Samples this process's VmRSS in a thread (every ``interval`` s)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.baseline = proc_status()["VmRSS"]
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = proc_status()["VmRSS"]
            self.samples += 1
            if rss > self.peak:
                self.peak = rss

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        rss = proc_status()["VmRSS"]
        self.peak = max(self.peak, rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


# ------------------------------------------------------ asyncio harness


class AioHarness:
    """A callcp.aio server whose handler hands each connection to the test
    (``await accept()``) and holds it open until the harness closes
    (``async with``)."""

    def __init__(self, key: Any, **options: Any) -> None:
        self._key = key
        self._options = options
        self._conns: Optional[asyncio.Queue[callcp.aio.Connection]] = None
        self._release: Optional[asyncio.Event] = None
        self._clients: List[callcp.aio.Connection] = []
        self.server: Any = None

    async def __aenter__(self) -> AioHarness:
        conns: asyncio.Queue[callcp.aio.Connection] = asyncio.Queue()
        release = asyncio.Event()
        self._conns, self._release = conns, release

        async def handler(conn: callcp.aio.Connection) -> None:
            await conns.put(conn)
            await release.wait()

        self.server = await callcp.aio.serve(handler, LOOPBACK, 0, key=self._key, **self._options)
        return self

    @property
    def port(self) -> int:
        port: int = self.server.port
        return port

    @property
    def fingerprint(self) -> str:
        fp: str = self.server.fingerprint
        return fp

    async def connect(self, port: Optional[int] = None, **kwargs: Any) -> callcp.aio.Connection:
        kwargs.setdefault("timeout", 10.0)
        kwargs.setdefault("server_fingerprint", self.fingerprint)
        conn = await callcp.aio.connect(LOOPBACK, port or self.port, **kwargs)
        self._clients.append(conn)
        return conn

    async def accept(self, timeout: float = 10.0) -> callcp.aio.Connection:
        assert self._conns is not None
        return await asyncio.wait_for(self._conns.get(), timeout)

    async def pair(self, port: Optional[int] = None) -> Tuple[callcp.aio.Connection, ...]:
        client = await self.connect(port)
        return client, await self.accept()

    async def __aexit__(self, *exc: object) -> None:
        assert self._release is not None
        self._release.set()
        for conn in self._clients:
            await conn.close()
        await self.server.shutdown()
