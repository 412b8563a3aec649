"""A callcp peer run in a separate process by tests/test_streams.py and
tests/test_aio.py (``python tests/aio_stream_peer.py MODE ...``).

It also holds the data generator and /proc helpers those tests import
(this file only imports callcp and the standard library, so it runs as a
plain script too).

Modes (every result is one JSON line on stdout):

``send-forever PORT FINGERPRINT REPORT_MIB``
    connect (blocking API) and send one endless stream; print ``{"sent": n}``
    once ``REPORT_MIB`` MiB went out, then keep sending until killed.
``send PORT FINGERPRINT SIZE``
    send a generated stream of SIZE bytes; print its length, SHA-256, the
    time taken and this process's peak RSS (VmHWM).
``recv DEST``
    serve one connection on 127.0.0.1:0 with a fresh key: print
    ``{"port": ..., "fingerprint": ...}``, receive one stream into DEST,
    print its StreamInfo, the time taken and the peak RSS.
``connect-many PORT FINGERPRINT N``
    (asyncio) open N connections at once, one request each; print
    ``{"ok": count}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import random
import sys
import threading
import time
from typing import Dict, Iterator, Optional

MIB = 1 << 20
BLOCK = MIB


def proc_status(pid: str = "self") -> Dict[str, int]:
    """VmRSS / VmHWM / VmPeak... of a process, in bytes (from /proc)."""
    out: Dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Vm"):
                key, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    return out


class PatternSource:
    """``total`` bytes of deterministic pseudo-random data, made on the fly
    1 MiB at a time (never held in memory whole); ``sha256`` is updated as
    the chunks are handed out.  ``total=None``: endless."""

    def __init__(self, total: Optional[int], seed: int = 1234) -> None:
        self.total = total
        self.sha256 = hashlib.sha256()
        self.produced = 0
        self._block = random.Random(seed).getrandbits(BLOCK * 8).to_bytes(BLOCK, "little")

    def __iter__(self) -> Iterator[bytes]:
        index = 0
        while self.total is None or self.produced < self.total:
            n = BLOCK if self.total is None else min(BLOCK, self.total - self.produced)
            # every block differs (its index in front), so reordering shows
            chunk = index.to_bytes(8, "big") + self._block[8:n] if n > 8 else self._block[:n]
            self.sha256.update(chunk)
            self.produced += len(chunk)
            index += 1
            yield chunk


def _emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _send_forever(port: int, fingerprint: str, report_mib: int) -> None:
    import callcp.sync

    conn = callcp.sync.connect("127.0.0.1", port, server_fingerprint=fingerprint, timeout=30)
    reported = False

    def progress(done: int, total: Optional[int]) -> None:
        nonlocal reported
        if not reported and done >= report_mib * MIB:
            reported = True
            _emit(sent=done)

    conn.send_stream(iter(PatternSource(None)), name="endless", progress=progress)


def _send(port: int, fingerprint: str, size: int) -> None:
    import callcp.sync

    conn = callcp.sync.connect("127.0.0.1", port, server_fingerprint=fingerprint, timeout=60)
    source = PatternSource(size)
    t0 = time.perf_counter()
    info = conn.send_stream(iter(source), size=size, name="big.bin", checksum=True)
    # wait for the receiver's verdict, so the timing covers the whole transfer
    verdict = conn.recv(timeout=120)
    seconds = time.perf_counter() - t0
    conn.close()
    status = proc_status()
    _emit(
        length=info.length,
        sha256=info.sha256,
        generated_sha256=source.sha256.hexdigest(),
        verdict=verdict.decode(),
        seconds=seconds,
        hwm=status["VmHWM"],
        rss=status["VmRSS"],
    )


def _recv(dest: str) -> None:
    import callcp.sync
    from callcp.keys import KeyPair

    results: queue.Queue[object] = queue.Queue()

    def handler(conn: callcp.sync.Connection) -> None:
        t0 = time.perf_counter()
        try:
            info = conn.recv_stream(dest)
        except BaseException as exc:
            results.put(exc)
            raise
        seconds = time.perf_counter() - t0
        conn.send(info.sha256.encode())
        results.put((info, seconds))

    server = callcp.sync.serve(handler, "127.0.0.1", 0, key=KeyPair.generate(), idle_timeout=120)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    _emit(port=server.port, fingerprint=server.fingerprint)
    try:
        result = results.get(timeout=600)
    finally:
        server.shutdown(timeout=5)
        thread.join(10)
    if isinstance(result, BaseException):
        _emit(error=f"{type(result).__name__}: {result}")
        sys.exit(1)
    info, seconds = result  # type: ignore[misc]
    status = proc_status()
    _emit(
        length=info.length,
        sha256=info.sha256,
        name=info.name,
        seconds=seconds,
        hwm=status["VmHWM"],
        rss=status["VmRSS"],
    )


async def _connect_many(port: int, fingerprint: str, n: int) -> None:
    import callcp.aio

    async def one(i: int) -> bool:
        conn = await callcp.aio.connect(
            "127.0.0.1", port, server_fingerprint=fingerprint, timeout=30
        )
        try:
            message = b"hello %d" % i
            return await conn.request(message) == message
        finally:
            await conn.close()

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    _emit(ok=sum(1 for r in results if r is True), errors=errors[:5])


def main(argv: list) -> None:
    mode = argv[0]
    if mode == "send-forever":
        _send_forever(int(argv[1]), argv[2], int(argv[3]))
    elif mode == "send":
        _send(int(argv[1]), argv[2], int(argv[3]))
    elif mode == "recv":
        _recv(argv[1])
    elif mode == "connect-many":
        asyncio.run(_connect_many(int(argv[1]), argv[2], int(argv[3])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
