"""``serve_forever(handle_signals=True)`` on both adapters: Ctrl-C (SIGINT)
and SIGTERM drain the server gracefully in a real process: idle clients get
an authenticated GOING_AWAY close, the call returns normally, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import callcp
from callcp import CloseCode, ConnectionClosedOK

pytestmark = pytest.mark.timeout(60)

SYNC = """
import logging, sys, callcp
logging.basicConfig(level=logging.INFO)
def handler(conn):
    for message in conn:
        conn.send(message)
server = callcp.serve(handler, "127.0.0.1", 0, key=sys.argv[1])
print(server.port, server.fingerprint, flush=True)
server.serve_forever(handle_signals=True)
print("returned", flush=True)
"""

AIO = """
import asyncio, logging, sys, callcp.aio
logging.basicConfig(level=logging.INFO)
async def handler(conn):
    async for message in conn:
        await conn.send(message)
async def main():
    server = await callcp.aio.serve(handler, "127.0.0.1", 0, key=sys.argv[1])
    print(server.port, server.fingerprint, flush=True)
    await server.serve_forever(handle_signals=True)
    print("returned", flush=True)
asyncio.run(main())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_a_signal_drains_the_server_gracefully(
    tmp_path: Path, server_key: object, flavour: str, signum: int
) -> None:
    key = tmp_path / "key.pem"
    callcp.KeyPair(server_key).save(key)  # type: ignore[arg-type]
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(SYNC if flavour == "sync" else AIO))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        port, fingerprint = proc.stdout.readline().decode().split()
        with callcp.connect("127.0.0.1", int(port), server_fingerprint=fingerprint) as conn:
            assert conn.request(b"ping") == b"ping"
            proc.send_signal(signum)
            with pytest.raises(ConnectionClosedOK) as info:
                conn.recv(timeout=20)
            assert info.value.code == CloseCode.GOING_AWAY
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "returned"
    assert b"Traceback" not in err
