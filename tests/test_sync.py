"""What only the blocking API (callcp.sync) has: the Server's shape
(server_address, a context manager around serve_forever in a thread) and
serve_forever after shutdown.  Everything both adapters do is in
tests/test_connection.py, run over both."""

from __future__ import annotations

import socket
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from callcp.sync import Connection, connect, serve
from tests.adapters import CLIENT_TIMEOUT, LOOPBACK

pytestmark = pytest.mark.timeout(30)


def echo(conn: Connection) -> None:
    for message in conn:
        conn.send(message)


def test_server_shape_and_context_managers(server_key: rsa.RSAPrivateKey) -> None:
    with serve(echo, LOOPBACK, 0, key=server_key, max_connections=8, max_handshakes=8) as server:
        port = server.port
        assert port > 0
        assert server.server_address == (LOOPBACK, port)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        with connect(
            LOOPBACK, port, server_fingerprint=server.fingerprint, timeout=CLIENT_TIMEOUT
        ) as conn:
            assert conn.request(b"ctx") == b"ctx"
            assert server.active_connections == 1
        assert conn.closed
    # leaving the block shut the server down: serve_forever returned...
    thread.join(10)
    assert not thread.is_alive()
    # ...the address is still known, and the listening socket is gone
    assert server.server_address == (LOOPBACK, port)
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, port), timeout=5).close()


def test_serve_forever_after_shutdown_returns(server_key: rsa.RSAPrivateKey) -> None:
    server = serve(echo, LOOPBACK, 0, key=server_key)
    server.shutdown(timeout=1)
    server.serve_forever(poll_interval=0.05)  # must return at once, not raise
