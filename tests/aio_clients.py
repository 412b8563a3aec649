"""Client side of the many-connections test, run as a separate process so
the test process measures the server alone:

    python -m tests.aio_clients PORT FINGERPRINT CONNECTIONS REQUESTS

Opens all connections (in batches), signals "open" on stdout and waits for
a line on stdin, then has every connection do REQUESTS request/replies,
closes them, and prints one JSON line with the timings.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import List

import callcp.aio

BATCH = 200


async def main(port: int, fingerprint: str, n: int, requests: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    t0 = time.perf_counter()
    conns: List[callcp.aio.Connection] = []
    for start in range(0, n, BATCH):
        conns += await asyncio.gather(
            *(
                callcp.aio.connect("127.0.0.1", port, server_fingerprint=fingerprint, timeout=60)
                for _ in range(start, min(n, start + BATCH))
            )
        )
    connected = time.perf_counter() - t0
    print("open", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def work(conn: callcp.aio.Connection, index: int) -> int:
        for i in range(requests):
            message = b"conn %d request %d " % (index, i) + bytes(index % 97)
            reply = await conn.request(message)
            if reply != b"re:" + message:
                raise AssertionError(f"connection {index} request {i}: wrong reply")
        return index

    t1 = time.perf_counter()
    done = await asyncio.gather(*(work(c, i) for i, c in enumerate(conns)))
    worked = time.perf_counter() - t1
    await asyncio.gather(*(c.close() for c in conns))
    print(
        json.dumps({"connected": connected, "worked": worked, "ok": sorted(done) == list(range(n))})
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
