"""A callcp echo server in its own process, for tests/test_hostile_load.py.

    python -m tests.hostile_server ADAPTER OPTIONS_JSON

ADAPTER is ``sync`` (``callcp.serve``) or ``aio`` (``callcp.aio.serve``).
OPTIONS_JSON is an object of :class:`callcp.ServerOptions` keyword arguments
(``key`` is a PEM path) plus these keys of our own, removed before serving:

``log_file``
    where WARNING and above of every logger go (the ``callcp`` logger, and
    ``asyncio``'s own accept errors), one line per record:
    ``LOGGER LEVEL message``.
``notices_window``
    seconds: ``callcp._engine.Notices.WINDOW`` is set to this before serving
    (rate-limited notices are summed up once per window).

Once listening, one JSON line goes to stdout: ``{"port", "fingerprint",
"pid", "max_connections", "nofile"}``.  On SIGUSR1 another says how many RSA
decryptions (``DecryptionRequested.run``, both adapters) the server has run:
``{"event": "stats", "rsa_runs": N}``.  The server runs until its stdin
closes (the test closes it, or dies), then shuts down gracefully, which also
flushes the pending notice summaries to the log, and says
``{"event": "stopped", "rsa_runs": N}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import signal
import sys
import threading
from typing import Any, Dict


def _logging(log_file: str) -> None:
    handler = logging.FileHandler(log_file, encoding="utf-8")  # flushed after each record
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def _ready(port: int, fingerprint: str, max_connections: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    line = {
        "port": port,
        "fingerprint": fingerprint,
        "pid": os.getpid(),
        "max_connections": max_connections,
        "nofile": [soft, hard],
    }
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _when_stdin_closes(callback: Any) -> None:
    """Call ``callback()`` (from a daemon thread) once stdin reaches EOF."""

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        finally:
            callback()

    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def run_sync(options: Dict[str, Any]) -> None:
    import callcp

    def echo(conn: Any) -> None:
        for message in conn:
            conn.send(message)

    server = callcp.serve(echo, "127.0.0.1", 0, **options)
    assert server.options.max_connections is not None
    _ready(server.port, server.fingerprint, server.options.max_connections)
    stopped = threading.Event()

    def stop() -> None:
        try:
            server.shutdown(timeout=1.0)
        finally:
            stopped.set()

    _when_stdin_closes(stop)
    server.serve_forever(poll_interval=0.1)
    stopped.wait(10.0)  # shutdown() ends after serve_forever (its final notices)


def run_aio(options: Dict[str, Any]) -> None:
    import callcp.aio

    async def echo(conn: Any) -> None:
        async for message in conn:
            await conn.send(message)

    async def main() -> None:
        server = await callcp.aio.serve(echo, "127.0.0.1", 0, **options)
        assert server.options.max_connections is not None
        _ready(server.port, server.fingerprint, server.options.max_connections)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        _when_stdin_closes(lambda: loop.call_soon_threadsafe(stop.set))
        await stop.wait()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


RSA_RUNS = [0]
_rsa_lock = threading.Lock()


def _count_rsa() -> None:
    """Count the RSA decryptions the server runs (both adapters call
    ``DecryptionRequested.run``)."""
    from callcp._core.events import DecryptionRequested

    run = DecryptionRequested.run

    def counted(self: Any) -> Any:
        with _rsa_lock:
            RSA_RUNS[0] += 1
        return run(self)

    DecryptionRequested.run = counted  # type: ignore[method-assign]


def _stats(event: str) -> None:
    """One JSON line on stdout: the RSA decryptions run so far."""
    sys.stdout.write(json.dumps({"event": event, "rsa_runs": RSA_RUNS[0]}) + "\n")
    sys.stdout.flush()


def main(argv: Any) -> None:
    adapter, options = argv[1], json.loads(argv[2])
    log_file = options.pop("log_file", None)
    window = options.pop("notices_window", None)
    if log_file:
        _logging(log_file)
    if window is not None:
        import callcp._engine

        callcp._engine.Notices.WINDOW = float(window)
    _count_rsa()
    signal.signal(signal.SIGUSR1, lambda signum, frame: _stats("stats"))
    if adapter == "sync":
        run_sync(options)
    elif adapter == "aio":
        run_aio(options)
    else:
        raise SystemExit(f"unknown adapter {adapter!r} (sync or aio)")
    _stats("stopped")


if __name__ == "__main__":
    main(sys.argv)
