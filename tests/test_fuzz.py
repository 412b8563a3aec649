"""Fuzzing the core: whatever bytes arrive, only callcp's own errors escape,
nothing unauthenticated is delivered, and memory stays bounded."""

from __future__ import annotations

from typing import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callcp._core.errors import CallcpError, RemoteProtocolError
from callcp._core.events import NEED_DATA, MessageReceived
from callcp._core.protocol import ClientProtocol, ServerProtocol, State, _Protocol
from callcp._core.wire import HEADER, MAX_RECORD_BODY, FrameType
from tests.helpers import Pair, accept_any

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
ALL_TYPES = sorted(FrameType.NAMES) + [0x00, 0x04, 0x2D, 0x7F, 0xFF]


def _fresh_server(key: rsa.RSAPrivateKey) -> _Protocol:
    s = ServerProtocol(key)
    s.start()
    s.data_to_send()
    return s


def _fresh_client(key: rsa.RSAPrivateKey) -> _Protocol:
    return ClientProtocol(accept_any)


def _open_server(key: rsa.RSAPrivateKey) -> _Protocol:
    p = Pair(key)
    p.handshake()
    return p.server


def _open_client(key: rsa.RSAPrivateKey) -> _Protocol:
    p = Pair(key)
    p.handshake()
    return p.client


def _waiting_client(key: rsa.RSAPrivateKey) -> _Protocol:
    p = Pair(key)
    p.to_client()
    return p.client


def _streaming_server(key: rsa.RSAPrivateKey) -> _Protocol:
    p = Pair(key)
    p.handshake()
    p.client.start_stream(None, "f")
    p.client.send_stream_data(b"some bytes")
    p.to_server()
    assert p.server.state is State.STREAMING
    return p.server


MAKERS: dict[str, Callable[[rsa.RSAPrivateKey], _Protocol]] = {
    "fresh_server": _fresh_server,
    "fresh_client": _fresh_client,
    "waiting_client": _waiting_client,
    "open_server": _open_server,
    "open_client": _open_client,
    "streaming_server": _streaming_server,
}


def _run(proto: _Protocol, chunks: list[bytes]) -> None:
    """Feed chunks; only CallcpError may escape; no message may be delivered."""
    try:
        for chunk in chunks:
            proto.receive_data(chunk)
            while True:
                ev = proto.next_event()
                assert not isinstance(ev, MessageReceived), "forged message delivered"
                if ev is NEED_DATA:
                    break
        proto.receive_data(b"")
        while proto.next_event() is not NEED_DATA:
            pass
    except CallcpError:
        pass
    # the buffer never holds more than one maximal frame plus one chunk
    assert proto.buffered <= MAX_RECORD_BODY + 5 + max(map(len, chunks), default=0)


@pytest.mark.parametrize("maker", MAKERS)
@SETTINGS
@given(data=st.binary(max_size=3000))
def test_random_bytes_whole(server_key: rsa.RSAPrivateKey, maker: str, data: bytes) -> None:
    _run(MAKERS[maker](server_key), [data])


@pytest.mark.parametrize("maker", MAKERS)
@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes_one_at_a_time(server_key: rsa.RSAPrivateKey, maker: str, data: bytes) -> None:
    _run(MAKERS[maker](server_key), [data[i : i + 1] for i in range(len(data))])


frames = st.tuples(
    st.sampled_from(ALL_TYPES),
    st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
    st.binary(max_size=300),
)


@pytest.mark.parametrize("maker", MAKERS)
@SETTINGS
@given(parts=st.lists(frames, max_size=6))
def test_structured_frames(server_key: rsa.RSAPrivateKey, maker: str, parts: list) -> None:
    """Frames with plausible headers and lying or honest lengths."""
    stream = b"".join(HEADER.pack(t, min(n, 2**32 - 1)) + body for t, n, body in parts)
    _run(MAKERS[maker](server_key), [stream])


@pytest.mark.parametrize("maker", MAKERS)
@pytest.mark.parametrize("ftype", ALL_TYPES)
def test_state_table_pairs(server_key: rsa.RSAPrivateKey, maker: str, ftype: int) -> None:
    """Every (state, frame type) pair: either the table has it (and a bogus
    body is a remote error) or the frame is refused as unexpected."""
    proto = MAKERS[maker](server_key)
    state = proto.state
    body = b"\x00" * 40
    proto.receive_data(HEADER.pack(ftype, len(body)) + body)
    with pytest.raises(CallcpError) as info:
        while proto.next_event() is not NEED_DATA:
            pass
        raise AssertionError(f"accepted {FrameType.NAMES.get(ftype, ftype)} in {state}")
    assert isinstance(info.value, (RemoteProtocolError, CallcpError))
    if (state, ftype) not in type(proto)._TABLE and ftype in FrameType.NAMES:
        assert "unexpected" in str(info.value)
    assert proto.state is State.FAILED


def test_huge_length_prefix_is_refused_at_once(server_key: rsa.RSAPrivateKey) -> None:
    s = _open_server(server_key)
    s.receive_data(HEADER.pack(FrameType.DATA, 2**32 - 1))
    with pytest.raises(RemoteProtocolError, match="limit"):
        s.next_event()
