"""The opt-in Callcp 1.0 wire mode (``protocol="callcp1"``, issue 12), on
both adapters, against the faithful Callcp 1.0 peer (tests/callcp1_peer.py,
written from ../shared/CALLCP1-WIRE.md with both of its bugs), and what the
default callcp/2 side does when it meets a Callcp 1.0 peer.

The sans-I/O cores themselves: tests/test_legacy_core.py."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
import callcp.aio
import callcp.sync
from callcp import (
    HandshakeError,
    KnownHosts,
    LocalProtocolError,
    SecureTCPClient,
    SecureTCPServer,
    ServerKeyChanged,
)
from callcp._core.legacy import MAX_PLAINTEXT, MAX_RECORD, OAEP
from tests.adapters import FLAVOURS, Adapter, Echo, Handlers, fresh_logger
from tests.callcp1_peer import (
    Callcp1Server,
    callcp1_request,
    callcp1_send,
    open_sealed,
    seal,
)
from tests.sock_support import wait_until

LEGACY = {"protocol": "callcp1"}
SIZES = [0, 1, MAX_PLAINTEXT]  # (0 B, 1 B, 4,068 B: Callcp 1.0's largest)
MISSING = "no server authentication, no forward secrecy, no replay protection, no framing"


@pytest.fixture
def callcp1_server(server_key: rsa.RSAPrivateKey) -> Iterator[Callcp1Server]:
    server = Callcp1Server(server_key)
    yield server
    server.close()


@pytest.fixture
def client_log() -> Iterator[tuple]:
    logger, handler = fresh_logger()
    yield logger, handler
    logger.removeHandler(handler)


def _echo(adapter: Adapter) -> Any:
    return adapter.serve(Echo(reply=lambda message: message), **LEGACY)


# ================================================ the legacy server, Callcp 1.0 clients


def test_a_legacy_server_serves_callcp1_clients_both_ways(adapter: Adapter) -> None:
    """0 B, 1 B and 4,068 B requests and replies, several in one session,
    from Callcp 1.0's own client (one recv per reply, no pause after the key)."""
    server = _echo(adapter)
    messages = [os.urandom(size) for size in SIZES]
    assert callcp1_request(server.port, messages) == messages
    assert callcp1_request(server.port, messages[::-1]) == messages[::-1]
    assert server.behaviour.calls == 2


def test_300_back_to_back_callcp1_clients_are_all_served(adapter: Adapter) -> None:
    """Callcp 1.0's own server drops a client whose key and first message
    arrive in one read (about 4 % of these: test_callcp1_wire.py); this one
    reads exactly the key's size, so every one of them is served."""
    server = _echo(adapter)
    failures: List[BaseException] = []
    for i in range(300):
        message = b"request %d" % i
        try:
            assert callcp1_request(server.port, [message]) == [message]
        except (ValueError, OSError) as exc:
            failures.append(exc)
    assert failures == []
    assert wait_until(lambda: server.behaviour.calls == 300)


def test_a_legacy_server_warns_at_listen_and_per_connection(adapter: Adapter) -> None:
    server = _echo(adapter)
    assert server.log is not None
    listening = server.log.about("speaking CALLCP 1.0's wire format", logging.WARNING)
    assert len(listening) == 1 and MISSING in listening[0]
    for _ in range(3):
        callcp1_request(server.port, [b"hi"])
    assert wait_until(lambda: len(server.log.about("Callcp 1.0 connection from")) == 3)
    assert all(MISSING in line for line in server.log.about("Callcp 1.0 connection from"))


def test_a_reply_over_4068_bytes_is_refused_before_anything_is_sent(adapter: Adapter) -> None:
    refused: List[BaseException] = []

    def sync(conn: callcp.sync.Connection) -> None:
        conn.recv()
        try:
            conn.send(b"x" * (MAX_PLAINTEXT + 1))
        except LocalProtocolError as exc:
            refused.append(exc)
        conn.send(b"refused")  # (the session is still usable: nothing went out)

    async def aio(conn: callcp.aio.Connection) -> None:
        await conn.recv()
        try:
            await conn.send(b"x" * (MAX_PLAINTEXT + 1))
        except LocalProtocolError as exc:
            refused.append(exc)
        await conn.send(b"refused")

    server = adapter.serve(Handlers(sync, aio), **LEGACY)
    assert callcp1_request(server.port, [b"big, please"]) == [b"refused"]
    assert "at most 4068 bytes; this one has 4069 (nothing was sent" in str(refused[0])


def test_a_trickled_request_is_accumulated_until_its_tag_verifies(adapter: Adapter) -> None:
    """Callcp 1.0 trusts one read per message; the legacy server does not:
    a request that arrives a few bytes at a time is still one request."""
    server = _echo(adapter)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        pem = b""
        while b"-----END PUBLIC KEY-----" not in pem:
            pem += sock.recv(4096)
        public = serialization.load_pem_public_key(pem)
        assert isinstance(public, rsa.RSAPublicKey)
        aes = os.urandom(32)
        sock.sendall(public.encrypt(aes, OAEP))
        record = seal(aes, b"y" * 3000)
        for at in range(0, len(record), 97):
            sock.sendall(record[at : at + 97])
            time.sleep(0.001)
        reply = b""
        while True:  # (the reply may come in several reads too)
            reply += sock.recv(4096)
            try:
                assert open_sealed(aes, reply) == b"y" * 3000
                break
            except Exception:  # noqa: S112 - not whole yet
                continue


def test_bad_bytes_close_the_connection_and_others_are_still_served(adapter: Adapter) -> None:
    """A key that does not decrypt (implicit rejection: the handshake
    "completes" with a random key), then a record that never authenticates:
    closed at MAX_RECORD bytes, no message reaches the handler; a client
    meanwhile is served."""
    server = _echo(adapter)
    size = 256
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        pem = b""
        while b"-----END PUBLIC KEY-----" not in pem:
            pem += sock.recv(4096)
        sock.sendall(os.urandom(size))  # (not an OAEP ciphertext of this key)
        time.sleep(0.05)
        assert callcp1_request(server.port, [b"legit"]) == [b"legit"]
        try:
            sock.sendall(os.urandom(MAX_RECORD))
            assert sock.recv(10) == b""  # closed, nothing sent back
        except ConnectionResetError:
            pass
    assert server.behaviour.seen() == [b"legit"]
    error = server.behaviour.error()
    assert isinstance(error, callcp.CryptoError) and "did not authenticate" in str(error)


def test_a_silent_or_trickling_client_is_dropped_at_the_handshake_deadline(
    adapter: Adapter,
) -> None:
    """One byte a second toward the key costs the server a small buffer
    (no thread, no RSA slot) until handshake_timeout; others are served."""
    server = adapter.serve(Echo(reply=lambda m: m), handshake_timeout=1.0, **LEGACY)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        started = time.monotonic()
        sock.recv(4096)
        closed = False
        for _ in range(30):
            try:
                sock.sendall(b"\x00")
            except OSError:
                closed = True
                break
            assert callcp1_request(server.port, [b"ok"]) == [b"ok"]
            time.sleep(0.1)
            sock.settimeout(0.01)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except socket.timeout:
                pass
        assert closed and time.monotonic() - started < 3.0
    assert server.behaviour.calls >= 1


# ================================================ the legacy client, Callcp 1.0 servers


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_legacy_client_talks_to_a_callcp1_server_both_ways(
    flavour: str, callcp1_server: Callcp1Server, server_key: rsa.RSAPrivateKey
) -> None:
    """Against Callcp 1.0's own server, bug included: the pause after the
    key keeps it from reading the key and the first request in one read."""
    adapter = Adapter(client=flavour, server=flavour, key=server_key)
    try:
        for _ in range(20):
            with adapter.connect(callcp1_server.port, insecure=True, **LEGACY) as conn:
                for size in SIZES:
                    message = os.urandom(size)
                    assert conn.request(message) == message
        assert callcp1_server.dropped == 0
        assert callcp1_server.served == 20 * len(SIZES)
    finally:
        adapter.close()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_request_over_4068_bytes_is_refused_before_anything_is_sent(
    flavour: str, callcp1_server: Callcp1Server, server_key: rsa.RSAPrivateKey
) -> None:
    adapter = Adapter(client=flavour, server=flavour, key=server_key)
    try:
        with adapter.connect(callcp1_server.port, insecure=True, **LEGACY) as conn:
            with pytest.raises(LocalProtocolError, match="at most 4068 bytes; this one has 4069"):
                conn.send(b"x" * (MAX_PLAINTEXT + 1))
            assert callcp1_server.served == 0
            assert conn.request(b"after") == b"after"  # (still usable)
        assert callcp1_server.dropped == 0
    finally:
        adapter.close()


def test_legacy_client_and_server_together(mixed: Adapter) -> None:
    server = _echo(mixed)
    with server.connect(**LEGACY) as conn:
        assert conn.peer_fingerprint == server.fingerprint
        for size in SIZES:
            message = os.urandom(size)
            assert conn.request(message) == message
        with pytest.raises(LocalProtocolError, match="no streams"):
            conn.send_stream(b"data")
    assert wait_until(lambda: len(server.behaviour.seen()) == len(SIZES))


def test_a_legacy_client_warns_once_per_connection(adapter: Adapter, client_log: tuple) -> None:
    logger, handler = client_log
    server = _echo(adapter)
    for _ in range(2):
        with server.connect(logger=logger, **LEGACY) as conn:
            conn.request(b"x")
    lines = handler.about("with CALLCP 1.0's wire format", logging.WARNING)
    assert len(lines) == 2 and all(MISSING in line for line in lines)


def test_trust_on_first_use_records_the_key_once_a_reply_proved_it(
    adapter: Adapter, tmp_path: Path, other_key: rsa.RSAPrivateKey
) -> None:
    """The server's key arrives unproved (Callcp 1.0 has no Finished): it is
    recorded only once a reply authenticated, which only its holder could
    make.  A changed key is refused, as for callcp/2."""
    known = tmp_path / "known_hosts"
    server = _echo(adapter)
    with server.connect(known_hosts=str(known), **LEGACY) as conn:
        assert not known.exists() or KnownHosts(known).lookup("127.0.0.1", server.port) is None
        assert conn.request(b"prove it") == b"prove it"
    assert KnownHosts(known).lookup("127.0.0.1", server.port) == server.fingerprint
    impostor = adapter.serve(Echo(), key=other_key, **LEGACY)
    KnownHosts(known).add("127.0.0.1", impostor.port, server.fingerprint)
    with pytest.raises(ServerKeyChanged):
        impostor.connect(known_hosts=str(known), **LEGACY)


# ================================================ never by default, never a fallback


def test_a_callcp2_client_names_the_option_at_a_legacy_server(adapter: Adapter) -> None:
    server = _echo(adapter)
    with pytest.raises(HandshakeError, match="connect with protocol='callcp1'"):
        server.connect()


def test_a_legacy_client_refuses_a_callcp2_server(adapter: Adapter) -> None:
    server = adapter.serve(Echo())
    started = time.monotonic()
    with pytest.raises(HandshakeError, match="not a Callcp 1.0 server: it speaks callcp/2"):
        server.connect(**LEGACY)
    assert time.monotonic() - started < 1.0


def test_the_default_server_refuses_a_callcp1_client_at_once(adapter: Adapter) -> None:
    """The ServerHello's reserved versions spell the PEM end marker: a
    Callcp 1.0 client stops reading there, fails to parse a key and closes,
    in well under a second (not the 10 s handshake timeout); the server
    logs why; callcp/2 clients are served all along."""
    server = adapter.serve(Echo(reply=lambda m: m), handshake_timeout=10.0)
    assert server.log is not None
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(ValueError, match="PEM"):
            callcp1_request(server.port, [b"hello"])
        assert time.monotonic() - started < 1.0
        assert wait_until(
            lambda: server.log.about("as a Callcp 1.0 client does", logging.INFO), timeout=1.0
        )
        with server.connect() as conn:
            assert conn.request(b"callcp/2") == b"callcp/2"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"protocol": "tls"}, "protocol must be one of 'callcp/2', 'callcp1'"),
        ({"protocol": "callcp1", "authorized_keys": []}, "authorized_keys cannot be used"),
        ({"protocol": "callcp1", "next_key": "k.pem"}, "next_key cannot be used"),
        ({"protocol": "callcp1", "ticket_key": b"k" * 32}, "ticket_key cannot be used"),
        ({"protocol": "callcp1", "keepalive_interval": 5}, "keepalive_interval cannot be used"),
    ],
)
def test_server_options_callcp1_cannot_honour_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        callcp.ServerOptions(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"protocol": "callcp/1"}, "protocol must be one of"),
        ({"protocol": "callcp1", "client_key": "k.pem"}, "client_key cannot be used"),
        ({"protocol": "callcp1", "keepalive_interval": 5}, "keepalive_interval cannot be used"),
    ],
)
def test_client_options_callcp1_cannot_honour_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        callcp.ClientOptions(**options)


# ================================================ more processes, the Callcp 1.0 API


def test_a_legacy_server_with_worker_processes(
    tmp_path: Path, server_key: rsa.RSAPrivateKey
) -> None:
    def echo(conn: callcp.sync.Connection) -> None:
        for message in conn:
            conn.send(message)

    server = callcp.serve(echo, "127.0.0.1", 0, key=callcp.KeyPair(server_key), workers=2, **LEGACY)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for i in range(20):
            assert callcp1_request(server.port, [b"%d" % i]) == [b"%d" % i]
    finally:
        server.shutdown()
        thread.join(10)


def _callcp1_key_files(directory: Path, key: rsa.RSAPrivateKey) -> tuple:
    """Callcp 1.0's server_private.pem / server_public.pem, as it wrote them
    (PKCS#8 unencrypted, SubjectPublicKeyInfo; the process umask: 0644)."""
    private = directory / "server_private.pem"
    public = directory / "server_public.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private.chmod(0o644)
    public.chmod(0o644)
    return private, public


def test_the_callcp1_api_serves_and_reaches_callcp1_peers(
    tmp_path: Path, server_key: rsa.RSAPrivateKey, callcp1_server: Callcp1Server
) -> None:
    """SecureTCPServer(protocol="callcp1") on Callcp 1.0's own key files, as
    they are, answers Callcp 1.0's client with the key it always had; and
    SecureTCPClient(protocol="callcp1") talks to Callcp 1.0's server."""
    private, public = _callcp1_key_files(tmp_path, server_key)
    server = SecureTCPServer(
        host="127.0.0.1",
        port=0,
        private_key_path=str(private),
        public_key_path=str(public),
        message_callback=lambda message: message.upper(),
        use_display=False,
        protocol="callcp1",
    )
    server.initialize()
    assert server.fingerprint == callcp.KeyPair(server_key).fingerprint
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(10)
        assert callcp1_request(server.port, [b"hello", b""]) == [b"HELLO", b""]
    finally:
        server.shutdown()
        thread.join(10)
    client = SecureTCPClient(
        host="127.0.0.1",
        port=callcp1_server.port,
        use_display=False,
        server_fingerprint=callcp.KeyPair(server_key).fingerprint,
        protocol="callcp1",
    )
    client.connect()
    try:
        assert client.send_message(b"x" * MAX_PLAINTEXT) == b"x" * MAX_PLAINTEXT
    finally:
        client.disconnect()
    assert callcp1_server.dropped == 0


def test_the_callcp1_api_reports_a_callback_reply_over_the_limit(
    tmp_path: Path, server_key: rsa.RSAPrivateKey
) -> None:
    logger, handler = fresh_logger()
    private, public = _callcp1_key_files(tmp_path, server_key)
    server = SecureTCPServer(
        host="127.0.0.1",
        port=0,
        private_key_path=str(private),
        public_key_path=str(public),
        message_callback=lambda message: message * 5000,
        logger=logger,
        use_display=False,
        protocol="callcp1",
    )
    server.initialize()
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(10)
        with pytest.raises((ConnectionError, OSError)):
            callcp1_request(server.port, [b"hello"])
        assert wait_until(lambda: handler.about("over Callcp 1.0's 4068"))
    finally:
        server.shutdown()
        thread.join(10)
        logger.removeHandler(handler)


def test_a_handler_that_does_not_reply_ends_when_its_client_leaves(adapter: Adapter) -> None:
    """A handler reading without replying, a client that sends and leaves:
    the handler's next read ends the session (before: the blocking server
    spun until idle_timeout, the asyncio one froze); others are served."""
    ended = threading.Event()

    def sync(conn: callcp.sync.Connection) -> None:
        for message in conn:
            if message != b"quiet":
                conn.send(message)
        ended.set()

    async def aio(conn: callcp.aio.Connection) -> None:
        async for message in conn:
            if message != b"quiet":
                await conn.send(message)
        ended.set()

    server = adapter.serve(Handlers(sync, aio), idle_timeout=60.0, **LEGACY)
    callcp1_send(server.port, b"quiet")
    assert ended.wait(5)
    assert callcp1_request(server.port, [b"served"]) == [b"served"]


def test_a_send_only_client_on_first_use_is_warned_that_the_key_is_unrecorded(
    adapter: Adapter, tmp_path: Path, client_log: tuple
) -> None:
    logger, handler = client_log
    known = tmp_path / "known_hosts"
    server = _echo(adapter)
    conn = server.connect(known_hosts=str(known), logger=logger, **LEGACY)
    conn.send(b"notification")
    conn.close()
    assert handler.about("was not recorded in the known hosts: no reply came", logging.WARNING)
    assert not known.exists() or KnownHosts(known).lookup("127.0.0.1", server.port) is None
