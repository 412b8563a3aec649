"""The sans-I/O core on its own: handshake, messages, key update, close."""

from __future__ import annotations

from typing import List

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from callcp._core.errors import (
    ClientAuthError,
    CloseCode,
    ConnectionClosedError,
    ConnectionClosedOK,
    CryptoError,
    HandshakeAborted,
    HandshakeError,
    KeyManagementError,
    LocalProtocolError,
    MessageTooLarge,
    RemoteProtocolError,
    ServerGoingAway,
    ServerKeyError,
    VersionMismatch,
)
from callcp._core.events import (
    CloseReceived,
    HandshakeCompleted,
    MessageReceived,
    ServerKeyAccepted,
)
from callcp._core.keys import fingerprint
from callcp._core.protocol import ClientProtocol, ServerProtocol, State
from callcp._core.wire import HEADER, FrameType, decode_alert
from tests.helpers import Pair, drain, feed, split_frames


def test_handshake_and_first_request_in_one_flight(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    events = p.to_client()
    assert events == [ServerKeyAccepted(fingerprint(server_key))]
    # 1-RTT: the client may send its first request before the server answers
    p.client.send(b"first request")
    flight = p.client.data_to_send()
    kinds = [f[0] for f in split_frames(flight)]
    assert kinds == [FrameType.CLIENT_HELLO, FrameType.FINISHED, FrameType.DATA_END]
    events = feed(p.server, flight)
    assert events == [HandshakeCompleted(4, None), MessageReceived(b"first request")]
    p.server.send(b"reply")
    events = p.to_client()
    assert events == [HandshakeCompleted(4, fingerprint(server_key)), MessageReceived(b"reply")]
    assert p.client.state is State.OPEN and p.server.state is State.OPEN


def test_client_cannot_send_before_server_hello(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    with pytest.raises(LocalProtocolError):
        p.client.send(b"too early")


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536 + 5])
def test_message_sizes_round_trip(server_key: rsa.RSAPrivateKey, size: int) -> None:
    p = Pair(server_key)
    p.handshake()
    payload = bytes(i % 251 for i in range(size))
    p.client.send(payload)
    assert p.to_server() == [MessageReceived(payload)]
    p.server.send(payload)
    assert p.to_client() == [MessageReceived(payload)]


def test_records_are_at_most_64k(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"x" * (200 * 1024))
    frames = split_frames(p.client.data_to_send())
    assert [f[0] for f in frames] == [FrameType.DATA] * 3 + [FrameType.DATA_END]
    assert all(len(f) - 5 - 16 <= 65536 for f in frames)


def test_message_boundaries_kept(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    for m in [b"a", b"", b"bc" * 40000, b"d"]:
        p.client.send(m)
    assert p.to_server() == [
        MessageReceived(b"a"),
        MessageReceived(b""),
        MessageReceived(b"bc" * 40000),
        MessageReceived(b"d"),
    ]


def test_byte_at_a_time_delivery(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.to_client()
    p.client.send(b"hello")
    flight = p.client.data_to_send()
    events = []
    for i in range(len(flight)):
        events += feed(p.server, flight[i : i + 1])
    assert events == [HandshakeCompleted(4, None), MessageReceived(b"hello")]


def test_max_message_size_enforced_without_buffering_it(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key, server_kwargs={"max_message_size": 100_000})
    p.handshake()
    p.client.send(b"x" * 100_000)
    assert p.to_server() == [MessageReceived(b"x" * 100_000)]
    p.client.send(b"x" * 100_001)
    with pytest.raises(MessageTooLarge, match="100000"):
        p.to_server()
    # the server tells the client, with an authenticated close
    (event,) = p.to_client()
    assert isinstance(event, CloseReceived) and event.code == CloseCode.MESSAGE_TOO_LARGE
    with pytest.raises(ConnectionClosedError, match="message too large") as info:
        p.client.next_event()
    assert info.value.code == CloseCode.MESSAGE_TOO_LARGE


def test_key_update_rolls_keys_in_both_directions(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(
        server_key,
        client_kwargs={"key_update_interval": 3},
        server_kwargs={"key_update_interval": 3},
    )
    p.handshake()
    for i in range(20):
        p.client.send(b"ping %d" % i)
        p.server.send(b"pong %d" % i)
    assert [e.data for e in p.to_server()] == [b"ping %d" % i for i in range(20)]  # type: ignore[union-attr]
    assert [e.data for e in p.to_client()] == [b"pong %d" % i for i in range(20)]  # type: ignore[union-attr]
    assert p.client._sender is not None and p.client._sender.generation >= 6
    assert p.server._receiver is not None and p.server._receiver.generation >= 6


def test_key_update_changes_the_key(server_key: rsa.RSAPrivateKey) -> None:
    """A record sealed after an update does not open under the old key."""
    p = Pair(server_key, client_kwargs={"key_update_interval": 2})
    p.handshake()
    p.client.send(b"a")  # seq 1 (Finished was 0)
    p.client.send(b"b")  # KEY_UPDATE at seq 2, then b under the new key
    frames = split_frames(p.client.data_to_send())
    assert [f[0] for f in frames] == [FrameType.DATA_END, FrameType.KEY_UPDATE, FrameType.DATA_END]
    # drop the KEY_UPDATE: the next record must fail to authenticate
    feed(p.server, frames[0])
    from callcp._core.errors import CryptoError

    with pytest.raises(CryptoError):
        feed(p.server, frames[2])


def test_clean_close_both_ways(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"last")
    p.client.close()
    assert p.to_server() == [MessageReceived(b"last"), CloseReceived(CloseCode.NORMAL, "")]
    with pytest.raises(ConnectionClosedOK):
        p.server.next_event()
    # the server answered with its own CLOSE
    assert p.to_client() == [CloseReceived(CloseCode.NORMAL, "")]
    with pytest.raises(LocalProtocolError):
        p.client.send(b"after close")


def test_eof_without_close_is_truncation(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"data")
    p.to_server()
    p.server.receive_data(b"")
    with pytest.raises(ConnectionClosedError, match="truncated"):
        p.server.next_event()


def test_eof_mid_message_delivers_nothing(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"y" * 200_000)
    data = p.client.data_to_send()
    assert feed(p.server, data[: len(data) - 10]) == []
    p.server.receive_data(b"")
    with pytest.raises(ConnectionClosedError):
        p.server.next_event()


def test_close_mid_message_drops_the_partial_message(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"z" * 200_000)
    frames = split_frames(p.client.data_to_send())
    # deliver two DATA fragments, then a close sealed as the next record
    partial = b"".join(frames[:2])
    assert feed(p.server, partial) == []
    # forge what the client would send next: its own close (seq continues)
    c = p.client
    c._sender.seq = 3  # type: ignore[union-attr]  # after Finished + 2 fragments
    c._close_sent = False
    c.close()
    events = feed(p.server, c.data_to_send())
    assert events == [CloseReceived(CloseCode.PROTOCOL_ERROR, "closed in the middle of a message")]


def test_version_mismatch_is_clear(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key, server_kwargs={"versions": (7,)})
    with pytest.raises(VersionMismatch, match=r"\[7\].*\[4\]"):
        p.to_client()
    # the client tells the server, in a plaintext alert: unauthenticated, so
    # the server reports only an aborted handshake, with the code
    with pytest.raises(HandshakeAborted, match="unauthenticated alert") as info:
        p.to_server()
    assert not isinstance(info.value, VersionMismatch)
    assert info.value.alert_code == CloseCode.UNSUPPORTED_VERSION
    assert "[7]" not in str(info.value)  # (the peer's text stays out of the message)


def test_server_rejects_a_version_it_did_not_offer(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key, client_kwargs={"versions": (4, 9)})
    # the client picks the best common version: 4
    p.handshake()
    assert p.client.version == 4


def test_client_auth_required_and_authorized(
    server_key: rsa.RSAPrivateKey, client_key: rsa.RSAPrivateKey
) -> None:
    fp = fingerprint(client_key)
    p = Pair(
        server_key,
        client_kwargs={"client_key": client_key},
        server_kwargs={"authorize_client": {fp}.__contains__},
    )
    p.to_client()
    p.client.send(b"hi")
    assert p.to_server() == [HandshakeCompleted(4, fp), MessageReceived(b"hi")]


def test_unlisted_client_refused_before_any_message(
    server_key: rsa.RSAPrivateKey, client_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    p = Pair(
        server_key,
        client_kwargs={"client_key": other_key},
        server_kwargs={"authorize_client": {fingerprint(client_key)}.__contains__},
    )
    p.to_client()
    p.client.send(b"secret request")
    p.server.receive_data(p.client.data_to_send())
    with pytest.raises(ClientAuthError, match="not authorized"):
        p.server.next_event()  # no MessageReceived came first
    with pytest.raises(ClientAuthError, match="unauthorized"):
        p.to_client()


def test_client_without_key_told_clearly(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key, server_kwargs={"authorize_client": lambda fp: True})
    with pytest.raises(ClientAuthError, match="client_key"):
        p.to_client()


def test_client_auth_signature_must_verify(
    server_key: rsa.RSAPrivateKey, client_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    """Presenting an authorized public key without its private key fails."""
    from callcp._core import protocol

    allowed = fingerprint(client_key)
    p = Pair(
        server_key,
        client_kwargs={"client_key": other_key},
        server_kwargs={"authorize_client": {allowed}.__contains__},
    )
    real = protocol.public_der
    protocol.public_der = lambda key: real(client_key)  # type: ignore[assignment]
    try:
        p.to_client()
    finally:
        protocol.public_der = real
    with pytest.raises(ClientAuthError, match="signature"):
        p.to_server()


def test_failed_connection_refuses_further_use(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.server.receive_data(HEADER.pack(FrameType.DATA_END, 100) + b"\0" * 100)
    with pytest.raises(RemoteProtocolError):
        p.server.next_event()
    with pytest.raises(ConnectionClosedError):
        p.server.next_event()
    with pytest.raises(ConnectionClosedError):
        p.server.send(b"x")


def test_server_start_twice_is_local_error(server_key: rsa.RSAPrivateKey) -> None:
    s = ServerProtocol(server_key)
    s.start()
    with pytest.raises(LocalProtocolError):
        s.start()


def test_handshake_eof_is_handshake_error(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.server.receive_data(b"")
    with pytest.raises(HandshakeError, match="without sending a byte: as a Callcp 1.0 client"):
        drain(p.server)
    p = Pair(server_key)
    p.server.receive_data(b"\x02\x00")
    p.server.receive_data(b"")
    with pytest.raises(HandshakeError, match="during the handshake .2 bytes"):
        drain(p.server)


def test_key_update_interval_of_one_with_client_auth(
    server_key: rsa.RSAPrivateKey, client_key: rsa.RSAPrivateKey
) -> None:
    """Even the smallest interval never puts a KEY_UPDATE inside the handshake."""
    p = Pair(
        server_key,
        client_kwargs={"client_key": client_key, "key_update_interval": 1},
        server_kwargs={"authorize_client": lambda fp: True, "key_update_interval": 1},
    )
    p.to_client()
    for i in range(3):
        p.client.send(b"m%d" % i)
    events = p.to_server()
    assert [e.data for e in events if isinstance(e, MessageReceived)] == [b"m0", b"m1", b"m2"]
    p.server.send(b"r")
    assert p.to_client()[-1] == MessageReceived(b"r")


def test_deferred_decryption(server_key: rsa.RSAPrivateKey) -> None:
    """defer_decryption hands the RSA work to the adapter, then resumes."""
    from callcp._core.events import DecryptionRequested

    p = Pair(server_key, server_kwargs={"defer_decryption": True})
    p.to_client()
    p.client.send(b"early")
    p.server.receive_data(p.client.data_to_send())
    request = p.server.next_event()
    assert isinstance(request, DecryptionRequested)
    assert p.server.state is State.WAIT_DECRYPTION
    with pytest.raises(LocalProtocolError):
        p.server.next_event()
    p.server.premaster_decrypted(request.run())
    assert drain(p.server) == [HandshakeCompleted(4, None), MessageReceived(b"early")]


def test_deferred_decryption_failure_is_implicitly_rejected(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key, server_kwargs={"defer_decryption": True})
    p.to_client()
    p.server.receive_data(p.client.data_to_send())
    p.server.next_event()
    p.server.premaster_decrypted(None)  # as if the ciphertext were bad
    with pytest.raises(HandshakeError):
        drain(p.server)


def test_back_to_back_key_updates_are_refused(server_key: rsa.RSAPrivateKey) -> None:
    """A KEY_UPDATE must follow at least one other record under its key, so a
    peer cannot make the receiver derive keys over and over for free."""
    pair = Pair(server_key)
    pair.handshake()
    sender = pair.client._sender
    assert sender is not None
    out: List[bytes] = []
    sender.seal(FrameType.KEY_UPDATE, b"", out)  # fine: FINISHED used this key
    sender.update()
    sender.seal(FrameType.KEY_UPDATE, b"", out)  # nothing under the new key yet
    with pytest.raises(RemoteProtocolError, match="KEY_UPDATE"):
        feed(pair.server, b"".join(out))


# ---------------------------------------------------------- the key verifier


def test_alerts_carry_no_local_details(server_key: rsa.RSAPrivateKey) -> None:
    """An error of our own (here: an unreadable known-hosts file) is reported
    to the peer by its code name only, never with its message."""

    def verify(fingerprint: str, der: bytes) -> None:
        raise KeyManagementError("cannot read known hosts file /home/alice/secret/known_hosts")

    client = ClientProtocol(verify)
    server = ServerProtocol(server_key)
    server.start()
    with pytest.raises(KeyManagementError):
        feed(client, server.data_to_send())
    (alert,) = split_frames(client.data_to_send())
    assert alert[0] == FrameType.ALERT
    code, reason = decode_alert(alert[5:])
    assert "alice" not in reason and "/" not in reason
    assert reason == "internal error"


def test_a_failing_key_verifier_refuses_the_key(server_key: rsa.RSAPrivateKey) -> None:
    """A verifier that fails with an ordinary exception (a bug, an odd host
    name) refuses the server like a mismatch, instead of escaping the core."""

    def broken(fingerprint: str, der: bytes) -> None:
        raise ValueError("not a host name")

    client = ClientProtocol(broken)
    server = ServerProtocol(server_key)
    server.start()
    with pytest.raises(ServerKeyError, match="ValueError"):
        feed(client, server.data_to_send())
    (alert,) = split_frames(client.data_to_send())
    assert alert[0] == FrameType.ALERT


def test_our_own_close_then_eof_is_clean(server_key: rsa.RSAPrivateKey) -> None:
    """A reader that sees EOF after its own side closed is told so cleanly,
    not that the stream "may have been truncated"."""
    p = Pair(server_key)
    p.handshake()
    p.client.close()
    p.client.data_to_send()
    p.client.receive_data(b"")
    with pytest.raises(ConnectionClosedOK, match="closed locally"):
        p.client.next_event()


def test_the_servers_finished_comes_before_its_first_message(
    server_key: rsa.RSAPrivateKey,
) -> None:
    """The server's FINISHED is owed by its receiving side and sealed by its
    writer, always first."""
    p = Pair(server_key)
    p.to_client()
    p.client.send(b"hi")
    feed(p.server, p.client.data_to_send())
    out = p.server.send_bytes(b"first")  # (owed records pending: the parts come back)
    kinds = [f[0] for f in split_frames(out if isinstance(out, bytes) else b"".join(out))]
    assert kinds == [FrameType.FINISHED, FrameType.DATA_END]


def test_receive_message_returns_a_whole_record_at_once(server_key: rsa.RSAPrivateKey) -> None:
    """The adapters' hot path: one read holding exactly one small message."""
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"one")
    record = p.client.data_to_send()
    assert p.server.receive_message(memoryview(bytearray(record))) == b"one"
    assert p.server.needs_data


@pytest.mark.parametrize("shape", ["partial", "two", "fragmented"])
def test_receive_message_falls_back_to_events(server_key: rsa.RSAPrivateKey, shape: str) -> None:
    """Anything but one whole one-record message is buffered (copied out of
    the caller's reusable buffer) and comes out of next_event()."""
    p = Pair(server_key)
    p.handshake()
    if shape == "fragmented":
        p.client.send(b"x" * 70000)  # DATA then DATA_END
        expected = [MessageReceived(b"x" * 70000)]
    else:
        p.client.send(b"a")
        p.client.send(b"b")
        expected = [MessageReceived(b"a"), MessageReceived(b"b")]
    wire = p.client.data_to_send()
    reads = [wire[:3], wire[3:]] if shape == "partial" else [wire]
    for chunk in reads:
        scratch = bytearray(chunk)
        assert p.server.receive_message(memoryview(scratch)) is None
        scratch[:] = b"\0" * len(scratch)  # the caller reuses its buffer
    assert drain(p.server) == expected


def test_receive_message_fails_the_connection_on_a_forged_record(
    server_key: rsa.RSAPrivateKey,
) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"secret")
    record = bytearray(p.client.data_to_send())
    record[-1] ^= 1
    with pytest.raises(CryptoError):
        p.server.receive_message(bytes(record))
    assert p.server.state is State.FAILED
    kinds = [f[0] for f in split_frames(p.server.data_to_send())]
    assert kinds == [FrameType.CLOSE]


def test_ping_is_answered_by_one_pong_and_nothing_reaches_the_application(
    server_key: rsa.RSAPrivateKey,
) -> None:
    p = Pair(server_key)
    p.handshake()
    assert p.client.ping() and p.client.ping()  # two PINGs, sealed by the next write
    pings = p.client.data_to_send()
    assert [f[0] for f in split_frames(pings)] == [FrameType.PING, FrameType.PING]
    p.client.send(b"between")
    assert feed(p.server, pings + p.client.data_to_send()) == [MessageReceived(b"between")]
    assert p.server.owes  # one PONG answers both
    pong = p.server.data_to_send()
    assert [f[0] for f in split_frames(pong)] == [FrameType.PONG]
    assert not p.server.owes
    p.server.send(b"after")
    assert feed(p.client, pong + p.server.data_to_send()) == [MessageReceived(b"after")]


def test_a_pong_is_ignored_and_a_ping_with_a_body_is_refused(
    server_key: rsa.RSAPrivateKey,
) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client._owed.append((FrameType.PONG, b""))  # an unsolicited PONG: harmless
    assert p.to_server() == []
    p.client._owed.append((FrameType.PING, b"x"))
    with pytest.raises(RemoteProtocolError, match="PING record with a body"):
        p.to_server()


def test_no_ping_before_keys_or_after_close(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    assert not p.client.ping()  # no keys yet
    p.handshake()
    p.client.close()
    assert not p.client.ping()


def test_a_server_speaking_only_an_older_layout_gets_a_clear_version_error(
    server_key: rsa.RSAPrivateKey,
) -> None:
    from callcp._core.wire import MAGIC, frame

    client = ClientProtocol(lambda fp, der: None, versions=(2, 3))
    old_layout = frame(FrameType.SERVER_HELLO, MAGIC + b"\x01\x00\x02" + bytes(64) + b"\x00")
    with pytest.raises(VersionMismatch, match=r"offers protocol versions \[2\]"):
        feed(client, old_layout)


# ------------------------------------------- GOING_AWAY counts what it took (§8)


def test_going_away_tells_the_client_which_messages_went_unread(
    server_key: rsa.RSAPrivateKey,
) -> None:
    """The server closes after taking two messages; the third, already on
    its way, is never delivered, and the client learns it went unread."""
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"one")
    p.client.send(b"two")
    assert [e.data for e in p.to_server()] == [b"one", b"two"]  # type: ignore[attr-defined]
    p.client.send(b"three")  # (crosses the server's close)
    p.server.close(CloseCode.GOING_AWAY, "server shutting down")
    assert p.to_server() == []  # "three" arrives after the CLOSE: not delivered
    assert p.server.delivered == 2
    events = p.to_client()
    assert isinstance(events[-1], CloseReceived)
    err = p.client.closed_error()
    assert isinstance(err, ServerGoingAway) and err.retryable and err.unread == 1
    assert "did not read the last 1 message" in str(err)


def test_going_away_after_reading_everything_leaves_nothing_unread(
    server_key: rsa.RSAPrivateKey,
) -> None:
    for counted in (True, False):
        p = Pair(server_key)
        p.handshake()
        p.client.send(b"one")
        p.to_server()
        p.client.send(b"two")  # (unread, but an uncounted close cannot say so)
        p.server.close(CloseCode.GOING_AWAY, "", counted=counted)
        p.to_client()
        err = p.client.closed_error()
        assert isinstance(err, ServerGoingAway)
        assert err.unread == (1 if counted else 0)


def test_a_going_away_claiming_more_than_was_sent_is_a_protocol_error(
    server_key: rsa.RSAPrivateKey,
) -> None:
    p = Pair(server_key)
    p.handshake()
    p.server.delivered = 5  # (a lying server: the client sent nothing)
    p.server.close(CloseCode.GOING_AWAY, "")
    with pytest.raises(RemoteProtocolError, match="counts 5 messages delivered; 0 were sent"):
        p.to_client()


def test_a_short_going_away_body_is_malformed() -> None:
    from callcp._core.wire import decode_close, encode_close

    assert decode_close(encode_close(CloseCode.GOING_AWAY, "bye", 7)) == (
        CloseCode.GOING_AWAY, "bye", 7,
    )  # fmt: skip
    assert decode_close(encode_close(CloseCode.NORMAL, "bye", 7)) == (CloseCode.NORMAL, "bye", None)
    with pytest.raises(RemoteProtocolError, match="malformed"):
        decode_close(b"\x00\x0a\x00\x00")


def test_the_one_record_fast_path_counts_and_stops_after_close(
    server_key: rsa.RSAPrivateKey,
) -> None:
    """receive_message() (the blocking adapters' hot path) counts what it
    delivers, and delivers nothing once this side sent its CLOSE."""
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"one")
    assert p.server.receive_message(p.client.data_to_send()) == b"one"
    assert p.server.delivered == 1
    p.client.send(b"two")
    p.server.close(CloseCode.GOING_AWAY, "")
    assert p.server.receive_message(p.client.data_to_send()) is None
    assert drain(p.server) == [] and p.server.delivered == 1
    p.to_client()
    err = p.client.closed_error()
    assert isinstance(err, ServerGoingAway) and err.unread == 1


def test_streams_after_a_close_are_dropped_and_what_follows_is_no_error(
    server_key: rsa.RSAPrivateKey,
) -> None:
    p = Pair(server_key)
    p.handshake()
    p.server.close(CloseCode.GOING_AWAY, "")
    p.client.start_stream(5, "late.bin")
    p.client.send_stream_data(b"12345")
    p.client.end_stream()
    p.client.send(b"and a message")
    p.client.start_stream(None, "aborted")
    p.client.abort_stream("never mind")
    assert p.to_server() == []  # nothing delivered, nothing fails
    assert p.server.delivered == 0 and p.server.state is State.OPEN
    p.to_client()
    err = p.client.closed_error()
    assert isinstance(err, ServerGoingAway) and err.unread == 3


# ---------------------------------------------------------- a peer of another protocol


@pytest.mark.parametrize(
    ("first", "says"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n", "it speaks SSH ('SSH-2.0-OpenSSH_9.2p1 Debian')"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "it speaks HTTP ('HTTP/1.1 400 Bad Request')"),
        (b"\x15\x03\x01\x00\x02\x02\x28", "it speaks TLS"),
        (b"220 mail.example ESMTP\r\n", "it speaks SMTP or FTP"),
        (b"-----BEGIN PUBLIC KEY-----\nMIIB", "it sent a PEM public key, as a Callcp 1.0"),
        (b"\x7fELF\x1b[2Jxx", "its first bytes are not a callcp/2 frame ('\\x7fELF\\x1b[2Jxx')"),
    ],
)
def test_a_server_of_another_protocol_is_named(first: bytes, says: str) -> None:
    """A client that reached something else (the wrong port) says what it
    seems to speak, with its first line escaped, not "unknown frame type"."""
    client = ClientProtocol(lambda fp, der: None)
    with pytest.raises(HandshakeError, match="not a callcp") as caught:
        client.receive_data(first)
        client.next_event()
    assert says in str(caught.value)
    assert "\x1b" not in str(caught.value) and "\r" not in str(caught.value)


def test_a_client_of_another_protocol_is_named(server_key: rsa.RSAPrivateKey) -> None:
    server = ServerProtocol(server_key)
    server.start()
    server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(
        HandshakeError, match=r"not a callcp client: it speaks HTTP \('GET / HTTP/1.1'\)"
    ):
        server.next_event()
    alert = split_frames(server.data_to_send())[-1]
    assert alert[0] == FrameType.ALERT
    assert decode_alert(alert[5:])[0] == CloseCode.PROTOCOL_ERROR  # (spec §4.6)
