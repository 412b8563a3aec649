"""Streams in the sans-I/O core: chunked delivery, integrity, abort, cut-offs."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from callcp._core.errors import (
    CloseCode,
    ConnectionClosedError,
    CryptoError,
    LocalProtocolError,
    RemoteProtocolError,
)
from callcp._core.events import (
    CloseReceived,
    MessageReceived,
    StreamAborted,
    StreamChunk,
    StreamEnded,
    StreamStarted,
)
from callcp._core.protocol import State
from callcp._core.wire import FrameType
from tests.helpers import Pair, feed, split_frames


@pytest.fixture
def pair(server_key: rsa.RSAPrivateKey) -> Pair:
    p = Pair(server_key, server_kwargs={"max_message_size": 1000})
    p.handshake()
    return p


def test_stream_round_trip_is_chunked_and_unbounded(pair: Pair) -> None:
    payload = bytes(range(256)) * 1024  # 256 KiB, far over max_message_size
    pair.client.start_stream(len(payload), "data.bin", checksum=True)
    pair.client.send_stream_data(payload[:100_000])
    pair.client.send_stream_data(payload[100_000:])
    length, digest = pair.client.end_stream()
    assert (length, digest) == (len(payload), hashlib.sha256(payload).digest())
    events = pair.to_server()
    assert events[0] == StreamStarted(len(payload), "data.bin", True)
    chunks = [e.data for e in events if isinstance(e, StreamChunk)]
    assert all(len(c) <= 65536 for c in chunks)
    assert b"".join(chunks) == payload
    assert events[-1] == StreamEnded(len(payload), digest)
    assert pair.server.state is State.OPEN
    # messages work again afterwards
    pair.client.send(b"after")
    assert pair.to_server() == [MessageReceived(b"after")]


def test_empty_stream_and_unknown_size(pair: Pair) -> None:
    pair.client.start_stream(checksum=True)
    pair.client.end_stream()
    assert pair.to_server() == [
        StreamStarted(None, "", True),
        StreamEnded(0, hashlib.sha256(b"").digest()),
    ]


@pytest.mark.parametrize("checksum", [False, True])
def test_stream_integrity_check(pair: Pair, checksum: bool) -> None:
    """A sender whose STREAM_END disagrees with the bytes is caught."""
    pair.client.start_stream(checksum=checksum)
    pair.client.send_stream_data(b"abc")
    pair.client._out_stream_length += 1  # a buggy or lying sender
    pair.client.end_stream()
    with pytest.raises(RemoteProtocolError, match="integrity"):
        pair.to_server()


def test_tampered_stream_chunk(pair: Pair) -> None:
    pair.client.start_stream()
    pair.client.send_stream_data(b"x" * 1000)
    data = bytearray(pair.client.data_to_send())
    data[-20] ^= 1
    with pytest.raises(CryptoError):
        feed(pair.server, bytes(data))


def test_stream_abort_keeps_connection(pair: Pair) -> None:
    pair.client.start_stream()
    pair.client.send_stream_data(b"partial")
    pair.client.abort_stream("disk error")
    events = pair.to_server()
    assert events[-1] == StreamAborted("disk error")
    pair.client.send(b"still here")
    assert pair.to_server() == [MessageReceived(b"still here")]


def test_close_mid_stream_is_an_error(pair: Pair) -> None:
    pair.client.start_stream()
    pair.client.send_stream_data(b"partial")
    pair.client._out_stream_active = False  # let close() through
    pair.client.close()
    events = pair.to_server()
    assert isinstance(events[-1], CloseReceived)
    assert events[-1].code == CloseCode.PROTOCOL_ERROR
    assert "stream" in events[-1].reason
    with pytest.raises(ConnectionClosedError):
        pair.server.next_event()


def test_eof_mid_stream_is_truncation(pair: Pair) -> None:
    pair.client.start_stream()
    pair.client.send_stream_data(b"partial")
    pair.to_server()
    pair.server.receive_data(b"")
    with pytest.raises(ConnectionClosedError, match="middle of a stream"):
        pair.server.next_event()


def test_no_interleaving_on_send(pair: Pair) -> None:
    pair.client.start_stream()
    with pytest.raises(LocalProtocolError):
        pair.client.send(b"message during stream")
    with pytest.raises(LocalProtocolError):
        pair.client.start_stream()
    pair.client.end_stream()
    with pytest.raises(LocalProtocolError):
        pair.client.end_stream()


def test_stream_start_mid_message_is_refused(pair: Pair) -> None:
    # forge: a DATA fragment (more to follow), then a STREAM_START
    c = pair.client
    c._seal(FrameType.DATA, b"frag")
    c.start_stream()
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        feed(pair.server, pair.client.data_to_send())


def test_messages_are_refused_inside_a_stream(pair: Pair) -> None:
    c = pair.client
    c.start_stream()
    c._out_stream_active = False  # sidestep the local guard to forge the interleaving
    c.send(b"interleaved")
    frames = split_frames(c.data_to_send())
    assert [f[0] for f in frames] == [FrameType.STREAM_START, FrameType.DATA_END]
    with pytest.raises(RemoteProtocolError, match="unexpected DATA_END"):
        feed(pair.server, b"".join(frames))


def test_stream_without_checksum(pair: Pair) -> None:
    """The default: no SHA-256 on either side; the length is still checked."""
    pair.client.start_stream(3, "n")
    pair.client.send_stream_data(b"abc")
    assert pair.client.end_stream() == (3, None)
    assert pair.to_server() == [
        StreamStarted(3, "n", False),
        StreamChunk(b"abc"),
        StreamEnded(3, None),
    ]


def test_stream_digest_is_checked(pair: Pair) -> None:
    """With a checksum, a digest that disagrees with the bytes is refused."""
    pair.client.start_stream(checksum=True)
    pair.client.send_stream_data(b"abc")
    pair.client._out_stream_hash.update(b"!")  # type: ignore[union-attr]
    pair.client.end_stream()
    with pytest.raises(RemoteProtocolError, match="SHA-256"):
        pair.to_server()
