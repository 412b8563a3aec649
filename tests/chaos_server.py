"""A callcp server in its own process, for the chaos and soak runs
(tests/test_chaos.py): killed with SIGKILL and restarted on the same port
with the same key (and ticket key), it is the same server to its clients.

    python -m tests.chaos_server PORT KEY TICKET_KEY LOG [--aio]

Each request is ``id:payload``; the server appends ``id`` to LOG with one
``write()`` on an O_APPEND descriptor *before* it replies (so a request it
acted on is on record even if it is killed before the reply leaves), and
answers ``ok:id:<sha256 of payload>``.  A request ``stats`` is answered with
the server's own count of what it saw, as JSON: messages, duplicates (a
soak message whose sequence number came before), corrupted (a soak message
whose hash does not match).  Soak messages are ``soak:seq:<sha256>:payload``.
It prints ``ready`` once it listens.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
from typing import Any, Dict

import callcp
import callcp.aio


class Books:
    """What the server saw (one lock: the sync server's handlers are threads)."""

    def __init__(self, log_path: str) -> None:
        self.fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.lock = threading.Lock()
        # one bit per sequence number, allocated up front (2^21 of them): the
        # server's RSS must show the library's memory, not this bookkeeping
        self.seen = bytearray(1 << 18)
        self.counts: Dict[str, int] = {"messages": 0, "duplicates": 0, "corrupted": 0}

    def answer(self, message: bytes) -> bytes:
        if message == b"stats":
            with self.lock:
                return json.dumps(self.counts).encode()
        if message.startswith(b"soak:"):
            _, seq, digest, payload = message.split(b":", 3)
            ok = hashlib.sha256(payload).hexdigest().encode() == digest
            with self.lock:
                self.counts["messages"] += 1
                if not ok:
                    self.counts["corrupted"] += 1
                number = int(seq)
                byte, bit = divmod(number, 8)
                if byte >= len(self.seen):
                    self.seen.extend(bytes(byte + 1 - len(self.seen)))
                if self.seen[byte] >> bit & 1:
                    self.counts["duplicates"] += 1
                self.seen[byte] |= 1 << bit
            return message
        rid, _, payload = message.partition(b":")
        os.write(self.fd, rid + b"\n")  # (on record before the reply)
        return b"ok:" + rid + b":" + hashlib.sha256(payload).hexdigest().encode()


def main(argv: Any) -> None:
    port, key, ticket_key, log_path = int(argv[0]), argv[1], argv[2], argv[3]
    books = Books(log_path)
    options: Any = dict(key=key, ticket_key=ticket_key)
    if "--aio" in argv:

        async def handler(conn: callcp.aio.Connection) -> None:
            async for message in conn:
                await conn.send(books.answer(message))

        async def serve() -> None:
            server = await callcp.aio.serve(handler, "127.0.0.1", port, **options)
            print("ready", flush=True)
            await server.serve_forever()

        asyncio.run(serve())
        return

    def sync_handler(conn: callcp.Connection) -> None:
        for message in conn:
            conn.send(books.answer(message))

    server = callcp.serve(sync_handler, "127.0.0.1", port, **options)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
