"""Chaos and soak: a pool of clients against a server process that is
SIGKILLed and restarted, through a proxy that partitions the network
(tests/fault_proxy.py), and a long clean run that counts every message.

At the CI scale these run in every test run; ``CALLCP_SLOW=1`` runs them at
the issue's scale (20,000 requests, 3 kills and a 5 s partition; 1,000,000
soak messages over 100 connections) and prints the figures (run with -s).

What they assert:

- chaos, ``idempotent=True``: every request succeeds, with the right reply;
- chaos, ``idempotent=False``: every request succeeds or raises a
  RetryableError, and the server's log (written before each reply, so it
  survives a SIGKILL) shows no request executed twice;
- soak: every message answered exactly once and intact (the server checks
  each one's hash and sequence number), and the server's RSS after warm-up
  grows by less than a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
import callcp.aio
from tests.fault_proxy import FaultProxy
from tests.sock_support import free_port

SLOW = os.environ.get("CALLCP_SLOW") == "1"
REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

# (requests, kills, partition seconds): the scale, and CI's
CHAOS = (20_000, 3, 5.0) if SLOW else (1_600, 1, 1.5)
# (messages, connections)
SOAK = (1_000_000, 100) if SLOW else (20_000, 20)
WORKERS = 8

# At the scale these are the slow tests (``-m slow`` selects them,
# ``-m "not slow"`` leaves them out); at the CI scale they run everywhere.
pytestmark = [pytest.mark.slow] if SLOW else []


class ServerProcess:
    """tests/chaos_server.py on a fixed port: start, SIGKILL, start again."""

    def __init__(self, tmp: Path, key: rsa.RSAPrivateKey, flavour: str) -> None:
        self.port = free_port()
        self.key_path = tmp / "server_key.pem"
        self.key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.key_path.chmod(0o600)
        self.ticket_key = tmp / "ticket.key"
        self.ticket_key.write_bytes(os.urandom(32))
        self.ticket_key.chmod(0o600)
        self.log = tmp / "executed.log"
        self.flavour = flavour
        self.proc: Optional[subprocess.Popen[str]] = None
        self.fingerprint = callcp.fingerprint(key)

    def start(self) -> None:
        args = [
            sys.executable, "-m", "tests.chaos_server", str(self.port), str(self.key_path),
            str(self.ticket_key), str(self.log),
        ] + (["--aio"] if self.flavour == "aio" else [])  # fmt: skip
        self.proc = subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # (blocks until it listens, or dies)
        assert line.strip() == "ready", f"the server did not start: {line!r}"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def executed(self) -> List[bytes]:
        return self.log.read_bytes().split(b"\n")[:-1] if self.log.exists() else []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def server_process(tmp: Path, key: rsa.RSAPrivateKey, flavour: str) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp, key, flavour)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Tally:
    """Outcomes of the requests, in completion order (thread-safe)."""

    replies: Dict[int, bytes] = field(default_factory=dict)
    errors: Dict[int, BaseException] = field(default_factory=dict)
    latencies: List[float] = field(default_factory=list)
    finished: List[float] = field(default_factory=list)  # monotonic time of each success
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self) -> int:
        return len(self.replies) + len(self.errors)

    def record(self, rid: int, started: float, reply: Any) -> None:
        now = time.monotonic()
        with self.lock:
            if isinstance(reply, BaseException):
                self.errors[rid] = reply
            else:
                self.replies[rid] = reply
                self.latencies.append(now - started)
                self.finished.append(now)

    def figures(self) -> Dict[str, float]:
        lat = sorted(self.latencies)
        gaps = [b - a for a, b in zip(self.finished, self.finished[1:])]
        return {
            "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
            "max_ms": 1000 * lat[-1],
            "worst_gap_s": max(gaps) if gaps else 0.0,
        }


def _request(rid: int) -> bytes:
    return b"%d:payload-%d" % (rid, rid)


def _expected(rid: int) -> bytes:
    return b"ok:%d:" % rid + hashlib.sha256(b"payload-%d" % rid).hexdigest().encode()


def _chaos(server: ServerProcess, proxy: FaultProxy, tally: Tally, total: int) -> None:
    """The controller: kills and restarts the server at even steps, then
    partitions the network; each fault waits for progress since the last."""
    _, kills, partition = CHAOS
    steps = kills + 1
    for n in range(1, steps + 1):
        target = total * n // (steps + 1)
        while tally.done() < target:
            time.sleep(0.01)
        if n <= kills:
            server.kill()
            time.sleep(0.2)  # (down for a moment: connects are refused)
            server.start()
        else:
            proxy.partition()
            time.sleep(partition)
            proxy.heal()


POOL_OPTIONS = dict(
    size=WORKERS,
    timeout=2.0,
    keepalive_interval=0.5,
    keepalive_timeout=1.0,
    retry=callcp.Retry(attempts=30, backoff=0.05, max_backoff=1.0),
)


def _run_sync(port: int, fingerprint: str, total: int, idempotent: bool, tally: Tally) -> None:
    with callcp.Pool(LOOPBACK, port, server_fingerprint=fingerprint, **POOL_OPTIONS) as pool:
        ids = iter(range(total))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    rid = next(ids, None)
                if rid is None:
                    return
                started = time.monotonic()
                try:
                    reply: Any = pool.request(_request(rid), idempotent=idempotent)
                except callcp.CallcpError as exc:
                    reply = exc
                tally.record(rid, started, reply)

        threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)


def _run_aio(port: int, fingerprint: str, total: int, idempotent: bool, tally: Tally) -> None:
    async def main() -> None:
        pool = callcp.aio.Pool(LOOPBACK, port, server_fingerprint=fingerprint, **POOL_OPTIONS)
        ids = iter(range(total))

        async def worker() -> None:
            for rid in ids:  # (one iterator: the tasks share it)
                started = time.monotonic()
                try:
                    reply: Any = await pool.request(_request(rid), idempotent=idempotent)
                except callcp.CallcpError as exc:
                    reply = exc
                tally.record(rid, started, reply)

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        await pool.close()

    asyncio.run(main())


@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "not-idempotent"])
@pytest.mark.parametrize("flavour", ["sync", "aio"])
@pytest.mark.timeout(600)
def test_chaos(
    flavour: str, idempotent: bool, tmp_path: Path, server_key: rsa.RSAPrivateKey
) -> None:
    total = CHAOS[0]
    tally = Tally()
    with server_process(tmp_path, server_key, "sync") as server, FaultProxy(
        (LOOPBACK, server.port), max_connections=256
    ) as proxy:
        chaos = threading.Thread(target=_chaos, args=(server, proxy, tally, total))
        chaos.start()
        run = _run_sync if flavour == "sync" else _run_aio
        began = time.monotonic()
        run(proxy.port, server.fingerprint, total, idempotent, tally)
        elapsed = time.monotonic() - began
        chaos.join(60)
        executed = server.executed()
    assert tally.done() == total
    counts: Dict[bytes, int] = {}
    for rid in executed:
        counts[rid] = counts.get(rid, 0) + 1
    for rid, reply in tally.replies.items():
        assert reply == _expected(rid), (rid, reply)
        assert counts.get(b"%d" % rid, 0) >= 1  # (a reply means it ran)
    twice = sorted(int(rid) for rid, n in counts.items() if n > 1)
    if idempotent:
        assert tally.errors == {}, list(tally.errors.items())[:5]
    else:
        wrong = {rid: exc for rid, exc in tally.errors.items() if not exc.retryable}
        assert wrong == {}, list(wrong.items())[:5]
        assert twice == [], f"executed twice: {twice[:20]}"
    figures = tally.figures()
    print(
        f"\nchaos {flavour} idempotent={idempotent}: {total} requests in {elapsed:.1f} s, "
        f"{len(tally.replies)} ok, {len(tally.errors)} retryable errors "
        f"({sorted({type(e).__name__ for e in tally.errors.values()})}), "
        f"executed twice: {len(twice)}; p50 {figures['p50_ms']:.2f} ms, "
        f"p99 {figures['p99_ms']:.1f} ms, slowest {figures['max_ms']:.0f} ms, "
        f"worst gap {figures['worst_gap_s']:.2f} s"
    )


# ------------------------------------------------------------------ soak


def _soak_message(seq: int) -> bytes:
    payload = os.urandom(16) + b"x" * (seq % 200)
    return b"soak:%d:%s:%s" % (seq, hashlib.sha256(payload).hexdigest().encode(), payload)


@pytest.mark.parametrize("flavour", ["sync", "aio"])
@pytest.mark.timeout(1800)
def test_soak(flavour: str, tmp_path: Path, server_key: rsa.RSAPrivateKey) -> None:
    total, connections = SOAK
    per_worker = total // connections
    bad: List[str] = []
    rss: List[int] = []
    with server_process(tmp_path, server_key, flavour) as server:
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                rss.append(server.rss_kib())

        sampler = threading.Thread(target=sample)
        sampler.start()
        options = dict(server_fingerprint=server.fingerprint, size=connections, timeout=30.0)
        began = time.monotonic()
        if flavour == "sync":
            with callcp.Pool(LOOPBACK, server.port, **options) as pool:

                def worker(w: int) -> None:
                    for i in range(per_worker):
                        message = _soak_message(w * per_worker + i)
                        if pool.request(message) != message:
                            bad.append(f"reply to {w * per_worker + i} differs")

                threads = [threading.Thread(target=worker, args=(w,)) for w in range(connections)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(1800)
                stats = json.loads(pool.request(b"stats"))
        else:

            async def main() -> Dict[str, int]:
                async with callcp.aio.Pool(LOOPBACK, server.port, **options) as pool:

                    async def worker(w: int) -> None:
                        for i in range(per_worker):
                            message = _soak_message(w * per_worker + i)
                            if await pool.request(message) != message:
                                bad.append(f"reply to {w * per_worker + i} differs")

                    await asyncio.gather(*(worker(w) for w in range(connections)))
                    result: Dict[str, int] = json.loads(await pool.request(b"stats"))
                    return result

            stats = asyncio.run(main())
        elapsed = time.monotonic() - began
        done.set()
        sampler.join(5)
        rss.append(server.rss_kib())  # (at least one sample: a small run may end in 0.5 s)
    assert bad == []
    assert stats == {"messages": per_worker * connections, "duplicates": 0, "corrupted": 0}
    warm = rss[len(rss) // 5 :] or rss  # (after the first fifth: warm-up)
    start, end = warm[0], warm[-1]
    print(
        f"\nsoak {flavour}: {per_worker * connections} messages over {connections} connections "
        f"in {elapsed:.1f} s ({per_worker * connections / elapsed:,.0f}/s); lost 0, duplicated "
        f"0, corrupted 0; server RSS after warm-up {start} -> {end} KiB (peak {max(rss)} KiB, "
        f"{len(rss)} samples)"
    )
    assert end - start < max(8192, start // 10), (start, end)
