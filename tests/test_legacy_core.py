"""The sans-I/O Callcp 1.0 cores (callcp._core.legacy), over real sockets
against the faithful Callcp 1.0 peer (tests/callcp1_peer.py) in both
directions, and in memory for what a peer cannot easily provoke."""

from __future__ import annotations

import os
import socket
import threading
from typing import Iterator, List, Optional

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from callcp._core.errors import (
    ConnectionClosedError,
    ConnectionClosedOK,
    CryptoError,
    HandshakeError,
    LocalProtocolError,
    RemoteProtocolError,
    ServerKeyChanged,
)
from callcp._core.events import NEED_DATA, CloseReceived, HandshakeCompleted, MessageReceived
from callcp._core.keys import fingerprint
from callcp._core.legacy import MAX_PLAINTEXT, MAX_RECORD, LegacyClient, LegacyServer
from tests.callcp1_peer import Callcp1Server, callcp1_request
from tests.sock_support import wait_until


def _until(core: object, sock: socket.socket, kind: type) -> object:
    while True:
        event = core.next_event()  # type: ignore[attr-defined]
        if event is NEED_DATA:
            core.receive_data(sock.recv(65536))  # type: ignore[attr-defined]
            continue
        assert isinstance(event, kind), event
        return event


def core_client(port: int, messages: List[bytes], pause: float = 0.05) -> List[bytes]:
    """A LegacyClient driven over a socket: the handshake, then each request."""
    core = LegacyClient(lambda fp, der: None)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        _until(core, sock, HandshakeCompleted)
        sock.sendall(core.data_to_send())
        threading.Event().wait(pause)  # (Callcp 1.0's server: key and request not in one read)
        replies = []
        for message in messages:
            sock.sendall(core.send_bytes(message))
            event = _until(core, sock, MessageReceived)
            replies.append(event.data)  # type: ignore[attr-defined]
        return replies


class CoreServer:
    """A LegacyServer per connection (a thread each), echoing."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.key = key
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port: int = self.sock.getsockname()[1]
        self.served = 0
        self.errors: List[BaseException] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        core = LegacyServer(self.key)
        core.start()
        with conn:
            try:
                conn.sendall(core.data_to_send())
                _until(core, conn, HandshakeCompleted)
                while True:
                    event = _until(core, conn, (MessageReceived, CloseReceived))  # type: ignore[arg-type]
                    if isinstance(event, CloseReceived):
                        return
                    conn.sendall(core.send_bytes(event.data))  # type: ignore[attr-defined]
                    with self._lock:
                        self.served += 1
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def core_server(server_key: rsa.RSAPrivateKey) -> Iterator[CoreServer]:
    server = CoreServer(server_key)
    yield server
    server.close()


SIZES = [b"", b"a", os.urandom(MAX_PLAINTEXT)]


def test_legacy_client_talks_to_a_callcp1_server(server_key: rsa.RSAPrivateKey) -> None:
    peer = Callcp1Server(server_key)
    try:
        assert core_client(peer.port, SIZES) == SIZES
        assert peer.dropped == 0
    finally:
        peer.close()


def test_legacy_server_serves_callcp1_clients(core_server: CoreServer) -> None:
    """0 B, 1 B, 4,068 B; and 300 back-to-back Callcp-1.0-style clients
    (key and first message sent at once, which Callcp 1.0's own server
    drops) all served."""
    assert callcp1_request(core_server.port, SIZES) == SIZES
    for i in range(300):
        assert callcp1_request(core_server.port, [b"m%d" % i]) == [b"m%d" % i]
    assert wait_until(lambda: core_server.served == 303), core_server.served
    assert not core_server.errors


def test_a_message_over_the_limit_is_refused_before_anything_is_sent(
    server_key: rsa.RSAPrivateKey,
) -> None:
    client, server = _pair(server_key)
    with pytest.raises(LocalProtocolError, match="at most 4068 bytes; this one has 4069"):
        client.send_bytes(b"x" * (MAX_PLAINTEXT + 1))
    assert client.data_to_send() == b""
    client.send_bytes(b"x" * MAX_PLAINTEXT)  # (the limit itself goes)


def _pair(server_key: rsa.RSAPrivateKey, verify: Optional[object] = None) -> tuple:
    """A client and a server core, handshake done, in memory."""
    server = LegacyServer(server_key)
    server.start()
    client = LegacyClient(verify or (lambda fp, der: None))  # type: ignore[arg-type]
    client.receive_data(server.data_to_send())
    assert isinstance(client.next_event(), HandshakeCompleted)
    server.receive_data(client.data_to_send())
    assert isinstance(server.next_event(), HandshakeCompleted)
    return client, server


def test_messages_are_reassembled_a_byte_at_a_time(server_key: rsa.RSAPrivateKey) -> None:
    client, server = _pair(server_key)
    record = client.send_bytes(b"hello")
    for i in range(len(record) - 1):
        server.receive_data(record[i : i + 1])
        assert server.next_event() is NEED_DATA
    server.receive_data(record[-1:])
    assert server.next_event() == MessageReceived(b"hello")


def test_strict_request_response(server_key: rsa.RSAPrivateKey) -> None:
    client, server = _pair(server_key)
    with pytest.raises(LocalProtocolError, match="only replies to a request"):
        server.send_bytes(b"unasked")
    client.send_bytes(b"one")
    with pytest.raises(LocalProtocolError, match="one request, then its reply"):
        client.send_bytes(b"two")


def test_the_end_of_a_session_and_a_cut_message(server_key: rsa.RSAPrivateKey) -> None:
    client, server = _pair(server_key)
    server.receive_data(b"")
    assert server.next_event() == CloseReceived(0, "")
    client, server = _pair(server_key)
    server.receive_data(client.send_bytes(b"cut short")[:20])
    server.receive_data(b"")
    with pytest.raises(ConnectionClosedError, match="in the middle of a message"):
        server.next_event()


def test_a_message_that_never_authenticates_is_refused_at_4096_bytes(
    server_key: rsa.RSAPrivateKey,
) -> None:
    client, server = _pair(server_key)
    server.receive_data(os.urandom(MAX_RECORD - 1))
    assert server.next_event() is NEED_DATA
    server.receive_data(b"x")
    with pytest.raises(CryptoError, match="did not authenticate within 4096 bytes"):
        server.next_event()


def test_a_key_that_does_not_decrypt_gets_a_random_one(server_key: rsa.RSAPrivateKey) -> None:
    """Implicit rejection: garbage where the AES key should be is not
    refused at once (that would be a decryption oracle); the first message,
    sealed under any key the sender knows, then fails to authenticate."""
    server = LegacyServer(server_key)
    server.start()
    server.receive_data(os.urandom(256))
    assert isinstance(server.next_event(), HandshakeCompleted)
    client, honest = _pair(server_key)
    server.receive_data(client.send_bytes(b"x" * MAX_PLAINTEXT))
    with pytest.raises(CryptoError):
        server.next_event()


def test_the_clients_key_check_decides(server_key: rsa.RSAPrivateKey) -> None:
    expected = fingerprint(server_key.public_key())
    seen: List[str] = []
    _pair(server_key, lambda fp, der: seen.append(fp))
    assert seen == [expected]

    def refuse(fp: str, der: bytes) -> None:
        raise ServerKeyChanged("changed", expected="SHA256:x", presented=fp)

    server = LegacyServer(server_key)
    server.start()
    client = LegacyClient(refuse)
    client.receive_data(server.data_to_send())
    with pytest.raises(ServerKeyChanged):
        client.next_event()
    assert client.data_to_send() == b""  # (no key sent to a refused server)


def test_a_server_that_is_not_callcp1(server_key: rsa.RSAPrivateKey) -> None:
    client = LegacyClient(lambda fp, der: None)
    client.receive_data(b"SSH-2.0-OpenSSH_9\r\n" + b"x" * 5000)
    with pytest.raises(HandshakeError, match="not a Callcp 1.0 server"):
        client.next_event()
    server = LegacyServer(server_key)
    server.start()
    client = LegacyClient(lambda fp, der: None)
    client.receive_data(server.data_to_send() + b"unasked")
    with pytest.raises(RemoteProtocolError, match="after its key"):
        client.next_event()
    assert client.data_to_send() == b""


def test_the_key_goes_out_on_its_own_before_the_first_request(
    server_key: rsa.RSAPrivateKey,
) -> None:
    """Callcp 1.0's server drops a connection whose key and first request
    come in one read: the client refuses a request until its key was taken
    (to be written on its own, then PAUSE_AFTER_KEY)."""
    server = LegacyServer(server_key)
    server.start()
    client = LegacyClient(lambda fp, der: None)
    client.receive_data(server.data_to_send())
    assert isinstance(client.next_event(), HandshakeCompleted)
    with pytest.raises(LocalProtocolError, match="write the key"):
        client.send_bytes(b"too early")
    assert len(client.data_to_send()) == 256
    assert client.send_bytes(b"now")


def test_a_server_that_closes_instead_of_replying_is_an_error(
    server_key: rsa.RSAPrivateKey,
) -> None:
    client, server = _pair(server_key)
    client.send_bytes(b"request")
    client.receive_data(b"")
    with pytest.raises(ConnectionClosedError, match="before replying"):
        client.next_event()
    with pytest.raises(ConnectionClosedError):  # (and stays so: no spinning on NEED_DATA)
        client.next_event()


def test_a_record_seen_before_is_refused(server_key: rsa.RSAPrivateKey) -> None:
    """A man in the middle reflecting a request back as its reply, or
    replaying an old record, is caught (a nonce is used once per session)."""
    client, server = _pair(server_key)
    request = client.send_bytes(b"transfer 100 to bob")
    client.receive_data(request)  # (the request, reflected)
    with pytest.raises(CryptoError, match="seen before"):
        client.next_event()
    client, server = _pair(server_key)
    first = client.send_bytes(b"one")
    server.receive_data(first)
    assert server.next_event() == MessageReceived(b"one")
    server.send_bytes(b"reply")
    server.receive_data(first)  # (replayed)
    with pytest.raises(CryptoError, match="seen before"):
        server.next_event()


def test_pipelined_requests_and_floods_are_refused(server_key: rsa.RSAPrivateKey) -> None:
    client, server = _pair(server_key)
    server.receive_data(client.send_bytes(b"one"))
    assert server.next_event() == MessageReceived(b"one")
    server.receive_data(b"more before the reply")
    with pytest.raises(RemoteProtocolError, match="does not pipeline"):
        server.next_event()
    client, server = _pair(server_key)
    server.receive_data(os.urandom(64 * 1024))  # (no record is that long)
    with pytest.raises(RemoteProtocolError, match="more than"):
        server.next_event()


def test_a_trickled_record_is_found_when_whole_at_one_tag_check_per_read(
    server_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte per read: the record is delivered at its last byte (a bound
    on tries per size, as the core had, left such a record unread), with at
    most one tag check per read and none when nothing new arrived; bytes
    that never authenticate are refused at MAX_RECORD."""
    from callcp._core import legacy

    tries: List[int] = []
    real = legacy.AESGCM

    class Counting:
        def __init__(self, key: bytes) -> None:
            self._aead = real(key)

        def encrypt(self, *args: object) -> bytes:
            return self._aead.encrypt(*args)  # type: ignore[arg-type]

        def decrypt(self, *args: object) -> bytes:
            tries.append(1)
            return self._aead.decrypt(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(legacy, "AESGCM", Counting)
    client, server = _pair(server_key)
    record = client.send_bytes(b"m" * 3000)
    for byte in record[:-1]:
        server.receive_data(bytes([byte]))
        assert server.next_event() is NEED_DATA
        assert server.next_event() is NEED_DATA  # (no new byte: no new check)
    server.receive_data(record[-1:])
    assert server.next_event() == MessageReceived(b"m" * 3000)
    assert len(tries) <= len(record)
    tries.clear()
    client, server = _pair(server_key)
    with pytest.raises(CryptoError, match=f"did not authenticate within {MAX_RECORD}"):
        for byte in os.urandom(MAX_RECORD):
            server.receive_data(bytes([byte]))
            assert server.next_event() is NEED_DATA
    assert len(tries) <= MAX_RECORD


def test_events_after_the_end_and_before_the_start(server_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(LocalProtocolError, match="start"):
        LegacyServer(server_key).next_event()
    client, server = _pair(server_key)
    server.receive_data(b"")
    assert isinstance(server.next_event(), CloseReceived)
    with pytest.raises(ConnectionClosedOK, match="the peer closed"):
        server.next_event()


def test_the_public_pem_must_be_the_keys(
    server_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    from cryptography.hazmat.primitives import serialization

    other_pem = other_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(LocalProtocolError, match="not the private key's public key"):
        LegacyServer(server_key, other_pem)
    private_pem = server_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(LocalProtocolError, match="not a PEM public key"):
        LegacyServer(server_key, private_pem)


def test_deferred_decryption(server_key: rsa.RSAPrivateKey) -> None:
    """(For an engine: the RSA work runs where it chooses.)"""
    from callcp._core.events import DecryptionRequested

    server = LegacyServer(server_key, defer_decryption=True)
    server.start()
    client = LegacyClient(lambda fp, der: None)
    client.receive_data(server.data_to_send())
    client.next_event()
    server.receive_data(client.data_to_send())
    request = server.next_event()
    assert isinstance(request, DecryptionRequested)
    assert server.premaster_decrypted(request.run()) is None
    assert isinstance(server.next_event(), HandshakeCompleted)
    server.receive_data(client.send_bytes(b"after"))
    assert server.next_event() == MessageReceived(b"after")


def test_the_pems_last_line_break_may_come_later(server_key: rsa.RSAPrivateKey) -> None:
    server = LegacyServer(server_key)
    server.start()
    pem = server.data_to_send()
    client = LegacyClient(lambda fp, der: None)
    client.receive_data(pem[:-1])
    assert isinstance(client.next_event(), HandshakeCompleted)
    client.receive_data(pem[-1:])
    assert client.next_event() is NEED_DATA


def test_a_record_longer_than_callcp1_can_carry_is_refused_whole_or_in_pieces(
    server_key: rsa.RSAPrivateKey,
) -> None:
    """A record over MAX_RECORD bytes is refused even when it authenticates
    and arrives in one read (Callcp 1.0's receiver could not have read it)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    for split in (False, True):
        client, server = _pair(server_key)
        aes = client._aes
        assert isinstance(aes, AESGCM)
        nonce = os.urandom(12)
        record = nonce + aes.encrypt(nonce, b"z" * (MAX_PLAINTEXT + 1), None)
        assert len(record) == MAX_RECORD + 1
        if split:
            server.receive_data(record[:MAX_RECORD])
            with pytest.raises(CryptoError, match="did not authenticate within 4096"):
                server.next_event()
        else:
            server.receive_data(record)
            with pytest.raises(RemoteProtocolError, match="4097 bytes where one Callcp 1.0"):
                server.next_event()


def test_a_long_session_remembers_a_bounded_window_of_nonces(
    server_key: rsa.RSAPrivateKey,
) -> None:
    """Memory for replay checks is bounded (the last NONCE_WINDOW nonces),
    and a reflection of the request just sent is still refused."""
    from callcp._core.legacy import NONCE_WINDOW

    client, server = _pair(server_key)
    for i in range(3 * NONCE_WINDOW):
        server.receive_data(client.send_bytes(b"%d" % i))
        assert server.next_event() == MessageReceived(b"%d" % i)
        client.receive_data(server.send_bytes(b"ok"))
        assert client.next_event() == MessageReceived(b"ok")
    assert len(server._nonces._set) <= NONCE_WINDOW and len(client._nonces._order) <= NONCE_WINDOW
    request = client.send_bytes(b"reflect me")
    client.receive_data(request)
    with pytest.raises(CryptoError, match="reflected"):
        client.next_event()


def test_the_server_ends_a_session_whose_client_left_before_the_reply(
    server_key: rsa.RSAPrivateKey,
) -> None:
    """A request, then the end of TCP: the next event is the session's end,
    never NEED_DATA again (a reader would wait, or spin, for nothing)."""
    client, server = _pair(server_key)
    server.receive_data(client.send_bytes(b"fire and forget"))
    assert server.next_event() == MessageReceived(b"fire and forget")
    server.receive_data(b"")
    assert isinstance(server.next_event(), CloseReceived)


def test_close_leaves_the_readers_buffer_alone(server_key: rsa.RSAPrivateKey) -> None:
    """close() may come from another thread while the reader decrypts: it
    changes flags only."""
    client, server = _pair(server_key)
    record = client.send_bytes(b"partial")
    server.receive_data(record[:20])
    server.close(counted=False)
    assert server.buffered == 20


def test_the_first_reply_may_follow_the_pems_late_line_break(
    server_key: rsa.RSAPrivateKey,
) -> None:
    server = LegacyServer(server_key)
    server.start()
    pem = server.data_to_send()
    assert pem.endswith(b"\n")
    client = LegacyClient(lambda fp, der: None)
    client.receive_data(pem[:-1])  # (the PEM's last line break comes later)
    assert isinstance(client.next_event(), HandshakeCompleted)
    server.receive_data(client.data_to_send())
    assert isinstance(server.next_event(), HandshakeCompleted)
    server.receive_data(client.send_bytes(b"hello"))
    assert server.next_event() == MessageReceived(b"hello")
    client.receive_data(b"\n" + server.send_bytes(b"world"))
    assert client.next_event() == MessageReceived(b"world")
    server.receive_data(client.send_bytes(b"again"))
    assert server.next_event() == MessageReceived(b"again")
    client.receive_data(b"\n" + server.send_bytes(b"no"))  # (only before the first reply)
    with pytest.raises((CryptoError, ConnectionClosedError, RemoteProtocolError)):
        client.receive_data(b"")
        client.next_event()


def test_a_client_whose_key_no_reply_proved_says_so_at_close(
    server_key: rsa.RSAPrivateKey,
) -> None:
    unproved: List[int] = []
    server = LegacyServer(server_key)
    server.start()
    client = LegacyClient(lambda fp, der: lambda: None, on_unproved=lambda: unproved.append(1))
    client.receive_data(server.data_to_send())
    assert isinstance(client.next_event(), HandshakeCompleted)
    client.close()
    assert unproved == [1]
    client.close()
    assert unproved == [1]
