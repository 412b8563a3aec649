"""The Callcp 1.0 wire format, against a faithful Callcp 1.0 peer
(tests/callcp1_peer.py, written from ../shared/CALLCP1-WIRE.md with both of
its bugs): the peer itself, and a callcp/2 client meeting one.  The opt-in
mode that speaks it (``protocol="callcp1"``): tests/test_legacy.py."""

from __future__ import annotations

import time
from typing import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
from tests.callcp1_peer import Callcp1Server, callcp1_request


@pytest.fixture
def callcp1_server(server_key: rsa.RSAPrivateKey) -> Iterator[Callcp1Server]:
    server = Callcp1Server(server_key)
    yield server
    server.close()


def test_the_faithful_peer_speaks_callcp1(callcp1_server: Callcp1Server) -> None:
    """(The peer itself.) Messages of 0 B, 1 B and 4,068 B go both ways."""
    messages = [b"", b"a", b"x" * 4068]
    assert callcp1_request(callcp1_server.port, messages, pause=0.05) == messages


def test_the_faithful_peer_has_callcp1s_server_bug(callcp1_server: Callcp1Server) -> None:
    """(The peer itself.) A client whose key and first message reach the
    server in one read is dropped, as by Callcp 1.0's server; a pause after
    the key avoids it."""
    failures = 0
    for _ in range(50):
        try:
            callcp1_request(callcp1_server.port, [b"hello"])
        except (ValueError, OSError):
            failures += 1
    assert failures > 0 and callcp1_server.dropped == failures
    for _ in range(5):
        assert callcp1_request(callcp1_server.port, [b"hello"], pause=0.05) == [b"hello"]


def test_a_callcp2_client_names_a_callcp1_server_at_once(callcp1_server: Callcp1Server) -> None:
    started = time.monotonic()
    named = "as a Callcp 1.0 server does; .* connect with protocol='callcp1'"
    with pytest.raises(callcp.HandshakeError, match=named):
        callcp.connect("127.0.0.1", callcp1_server.port, insecure=True, timeout=10)
    assert time.monotonic() - started < 5.0  # (no timeout waited out)
