"""workers=N: several server processes on one port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Set

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
import callcp.aio
from callcp import CloseCode, ConnectionClosedOK

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="workers need fork and SO_REUSEPORT"),
]


def _pid_echo(conn: callcp.Connection) -> None:
    for _ in conn:
        conn.send(str(os.getpid()).encode())


async def _apid_echo(conn: callcp.aio.Connection) -> None:
    async for _ in conn:
        await conn.send(str(os.getpid()).encode())


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_workers_must_be_a_positive_whole_number(
    server_key: rsa.RSAPrivateKey, bad: object
) -> None:
    with pytest.raises(ValueError, match="workers"):
        callcp.serve(_pid_echo, "127.0.0.1", 0, key=server_key, workers=bad)  # type: ignore[arg-type]


def test_sync_workers_share_the_port_and_stop_gracefully(server_key: rsa.RSAPrivateKey) -> None:
    server = callcp.serve(_pid_echo, "127.0.0.1", 0, key=server_key, workers=2)
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    try:
        pids: Set[bytes] = set()
        for _ in range(60):  # the kernel hashes connections over the two sockets
            with callcp.connect(
                "127.0.0.1", server.port, server_fingerprint=server.fingerprint, timeout=10
            ) as conn:
                pids.add(conn.request(b"pid?"))
            if len(pids) == 2:
                break
        assert len(pids) == 2 and str(os.getpid()).encode() not in pids
        idle = callcp.connect("127.0.0.1", server.port, server_fingerprint=server.fingerprint)
        assert idle.request(b"pid?") in pids
    finally:
        server.shutdown()
        runner.join(15)
    assert not runner.is_alive()
    with pytest.raises(ConnectionClosedOK) as info:  # closed by its worker's graceful stop
        idle.recv(timeout=5)
    assert info.value.code == CloseCode.GOING_AWAY


def test_aio_workers_share_the_port_and_stop_gracefully(server_key: rsa.RSAPrivateKey) -> None:
    async def main() -> None:
        server = await callcp.aio.serve(_apid_echo, "127.0.0.1", 0, key=server_key, workers=2)
        forever = asyncio.ensure_future(server.serve_forever())
        pids: Set[bytes] = set()
        for _ in range(60):
            conn = await callcp.aio.connect(
                "127.0.0.1", server.port, server_fingerprint=server.fingerprint
            )
            pids.add(await conn.request(b"pid?"))
            await conn.close()
            if len(pids) == 2:
                break
        assert len(pids) == 2 and str(os.getpid()).encode() not in pids
        idle = await callcp.aio.connect(
            "127.0.0.1", server.port, server_fingerprint=server.fingerprint
        )
        assert await idle.request(b"pid?") in pids
        await server.shutdown()
        await asyncio.wait_for(forever, 15)
        with pytest.raises(ConnectionClosedOK) as info:
            await idle.recv(timeout=5)
        assert info.value.code == CloseCode.GOING_AWAY

    asyncio.run(asyncio.wait_for(main(), 45))
