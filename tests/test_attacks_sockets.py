"""The attacks of the brief, over real sockets, through a man-in-the-middle
TCP proxy that rewrites the byte stream frame by frame (tests/sock_proxy.py).

Core-level versions of these attacks live in tests/test_attacks.py; here the
blocking client and server run for real, and each attack must end with the
specific exception on the side that detects it, while the server's handler
never receives a tampered, replayed, reordered or forged message.  (The
version-downgrade tests force versions through callcp.sync's internals:
they are in tests/test_sync_internals.py.)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa, x25519

from callcp._core.errors import (
    CloseCode,
    ConnectionClosed,
    ConnectionClosedError,
    CryptoError,
    HandshakeError,
    ServerKeyChanged,
    UnknownServerKey,
)
from callcp._core.wire import MAGIC, FrameType
from callcp.sync import Connection
from tests.sock_proxy import FrameProxy, Relay, flip_bit, hook_on, make_frame
from tests.sock_support import (
    LOOPBACK,
    REQUEST,
    Target,
    handshake_failure_logged,
    read_until_closed,
    records_about,
    recv_frame,
    via,
    wait_until,
)

pytestmark = pytest.mark.timeout(30)

SECOND = b"transfer 999 to mallory"


def types(frames: Sequence[bytes]) -> List[int]:
    return [f[0] for f in frames]


# --------------------------------------------------------------- sanity


def test_transparent_proxy_changes_nothing(
    target: Target, make_proxy: Callable[..., FrameProxy], log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy()
    with via(proxy, target) as conn:
        assert conn.request(REQUEST) == b"ok:" + REQUEST
    relay = proxy.relay(0)
    assert relay.done.wait(5)
    assert types(relay.c2s_frames) == [
        FrameType.CLIENT_HELLO,
        FrameType.FINISHED,
        FrameType.DATA_END,
        FrameType.CLOSE,
    ]
    assert types(relay.s2c_frames) == [
        FrameType.SERVER_HELLO,
        FrameType.FINISHED,
        FrameType.NEW_TICKET,  # a session ticket for the next connection
        FrameType.DATA_END,
        FrameType.CLOSE,
    ]
    assert REQUEST not in relay.c2s_raw  # encrypted on the wire
    assert target.rec.seen() == [REQUEST]
    assert log.records == []


# ------------------------------------------------------------- tampering


@pytest.mark.parametrize(
    "offset, bit",
    [(0, 0x01), (5, 0x01), (5, 0x80), (-1, 0x01), (-17, 0x40)],
    ids=["type-byte", "first-ciphertext-bit", "first-ciphertext-top-bit", "tag", "last-ct-byte"],
)
def test_bit_flip_client_to_server(
    target: Target, make_proxy: Callable[..., FrameProxy], offset: int, bit: int
) -> None:
    flip = hook_on(FrameType.DATA_END, lambda r, i, f: [flip_bit(f, offset, bit)])
    proxy = make_proxy(c2s=flip)
    with via(proxy, target) as conn:
        conn.send(REQUEST)
        with pytest.raises(ConnectionClosedError) as info:
            conn.recv()
    assert info.value.code == CloseCode.DECRYPT_ERROR
    assert isinstance(target.rec.error(), CryptoError)
    assert target.rec.seen() == []


def test_bit_flip_server_to_client(target: Target, make_proxy: Callable[..., FrameProxy]) -> None:
    proxy = make_proxy(s2c=hook_on(FrameType.DATA_END, lambda r, i, f: [flip_bit(f, 7)]))
    conn = via(proxy, target)
    with pytest.raises(CryptoError):
        conn.request(REQUEST)  # no byte of the tampered reply is returned
    with pytest.raises(ConnectionClosed):
        conn.recv()  # and the connection refuses further use
    conn.close()
    # the client told the server why, with an authenticated close
    err = target.rec.error()
    assert isinstance(err, ConnectionClosedError)
    assert err.code == CloseCode.DECRYPT_ERROR
    assert target.rec.seen() == [REQUEST]


def test_bit_flip_in_client_finished(
    target: Target, make_proxy: Callable[..., FrameProxy], log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy(c2s=hook_on(FrameType.FINISHED, lambda r, i, f: [flip_bit(f, 9)]))
    conn = via(proxy, target)
    conn.send(REQUEST)
    with pytest.raises(HandshakeError):
        conn.recv()
    conn.close()
    assert wait_until(lambda: handshake_failure_logged(log))
    assert target.rec.calls == 0


def test_bit_flip_in_server_finished(target: Target, make_proxy: Callable[..., FrameProxy]) -> None:
    proxy = make_proxy(s2c=hook_on(FrameType.FINISHED, lambda r, i, f: [flip_bit(f, 9)]))
    conn = via(proxy, target)
    with pytest.raises(HandshakeError, match="handshake record failed authentication"):
        conn.request(REQUEST)
    conn.close()


@pytest.mark.parametrize("when", ["immediately", "later"])
def test_replayed_record(target: Target, make_proxy: Callable[..., FrameProxy], when: str) -> None:
    def replay(relay: Relay, index: int, frame: bytes) -> Sequence[bytes]:
        if frame[0] != FrameType.DATA_END:
            return [frame]
        if "first" not in relay.state:
            relay.state["first"] = frame
            return [frame, frame] if when == "immediately" else [frame]
        return [frame, relay.state["first"]]  # "later": after the second message

    proxy = make_proxy(c2s=replay)
    with via(proxy, target) as conn:
        assert conn.request(REQUEST) == b"ok:" + REQUEST
        if when == "later":
            assert conn.request(SECOND) == b"ok:" + SECOND
        with pytest.raises(ConnectionClosedError) as info:
            conn.recv()
    assert info.value.code == CloseCode.DECRYPT_ERROR
    assert isinstance(target.rec.error(), CryptoError)
    # each genuine message was delivered exactly once; the replay never
    assert target.rec.seen() == ([REQUEST] if when == "immediately" else [REQUEST, SECOND])


def test_reordered_records(target: Target, make_proxy: Callable[..., FrameProxy]) -> None:
    def swap(relay: Relay, index: int, frame: bytes) -> Sequence[bytes]:
        if frame[0] != FrameType.DATA_END:
            return [frame]
        if "held" not in relay.state:
            relay.state["held"] = frame
            return []
        return [frame, relay.state["held"]]

    proxy = make_proxy(c2s=swap)
    with via(proxy, target) as conn:
        conn.send(REQUEST)
        conn.send(SECOND)
        with pytest.raises(ConnectionClosedError) as info:
            conn.recv()
    assert info.value.code == CloseCode.DECRYPT_ERROR
    assert isinstance(target.rec.error(), CryptoError)
    assert target.rec.seen() == []


def test_dropped_record(target: Target, make_proxy: Callable[..., FrameProxy]) -> None:
    proxy = make_proxy(c2s=hook_on(FrameType.DATA_END, lambda r, i, f: []))
    with via(proxy, target) as conn:
        conn.send(REQUEST)  # lost on the way
        conn.send(SECOND)
        with pytest.raises(ConnectionClosedError) as info:
            conn.recv()
    assert info.value.code == CloseCode.DECRYPT_ERROR
    assert isinstance(target.rec.error(), CryptoError)
    assert target.rec.seen() == []


def test_dropped_fragment_of_a_large_message(
    target: Target, make_proxy: Callable[..., FrameProxy]
) -> None:
    proxy = make_proxy(c2s=hook_on(FrameType.DATA, lambda r, i, f: [], nth=1))
    with via(proxy, target) as conn:
        conn.send(b"q" * 300_000)  # DATA, DATA, DATA, DATA, DATA_END
        with pytest.raises(ConnectionClosedError) as info:
            conn.recv()
    assert info.value.code == CloseCode.DECRYPT_ERROR
    assert isinstance(target.rec.error(), CryptoError)
    assert target.rec.seen() == []


def test_server_record_reflected_to_the_server(
    target: Target, make_proxy: Callable[..., FrameProxy]
) -> None:
    def reflect(relay: Relay, index: int, frame: bytes) -> Sequence[bytes]:
        relay.to_server(frame)  # as if the client had sent it
        return [frame]

    proxy = make_proxy(s2c=hook_on(FrameType.DATA_END, reflect))
    with via(proxy, target) as conn:
        assert conn.request(REQUEST) == b"ok:" + REQUEST
        with pytest.raises(ConnectionClosedError) as info:
            conn.recv()
    assert info.value.code == CloseCode.DECRYPT_ERROR
    assert isinstance(target.rec.error(), CryptoError)
    assert target.rec.seen() == [REQUEST]  # not b"ok:" + REQUEST


# ------------------------------------------------------------- truncation


@contextlib.contextmanager
def _truncating_target(
    server_key: rsa.RSAPrivateKey, messages: Sequence[bytes]
) -> Iterator[Target]:
    def handler(conn: Connection) -> None:
        conn.recv()
        for m in messages:
            conn.send(m)
        # returning sends the authenticated CLOSE, which the proxy suppresses

    t = Target(server_key, handler=handler)
    try:
        yield t
    finally:
        t.srv.stop()


def test_truncation_after_whole_messages(server_key: rsa.RSAPrivateKey) -> None:
    with _truncating_target(server_key, [b"part 1", b"part 2"]) as target:

        def cut(relay: Relay, index: int, frame: bytes) -> Sequence[bytes]:
            relay.end_to_client()  # a clean TCP FIN instead of the CLOSE
            return []

        with FrameProxy(target.address, s2c=hook_on(FrameType.CLOSE, cut)) as proxy:
            conn = via(proxy, target)
            conn.send(b"go")
            got: List[bytes] = []
            with pytest.raises(ConnectionClosedError, match="truncat"):
                for message in conn:
                    got.append(message)
            conn.close()
            assert proxy.errors == []
        assert got == [b"part 1", b"part 2"]


def test_truncation_inside_a_message(server_key: rsa.RSAPrivateKey) -> None:
    big = bytes(range(256)) * 1000  # 256 000 bytes: four records
    with _truncating_target(server_key, [big]) as target:

        def cut(relay: Relay, index: int, frame: bytes) -> Sequence[bytes]:
            relay.to_client(frame)
            relay.end_to_client()
            return []

        with FrameProxy(target.address, s2c=hook_on(FrameType.DATA, cut, nth=1)) as proxy:
            conn = via(proxy, target)
            conn.send(b"go")
            with pytest.raises(ConnectionClosedError, match="truncat"):
                conn.recv()  # no partial message
            conn.close()
            assert proxy.errors == []


# ---------------------------------------------------------- replayed session


def test_whole_recorded_session_replayed_to_the_server(
    target: Target, make_proxy: Callable[..., FrameProxy], log: pytest.LogCaptureFixture
) -> None:
    proxy = make_proxy()
    with via(proxy, target) as conn:
        assert conn.request(REQUEST) == b"ok:" + REQUEST
    relay = proxy.relay(0)
    assert relay.done.wait(5)
    recorded = bytes(relay.c2s_raw)
    assert types(relay.c2s_frames)[-1] == FrameType.CLOSE  # a complete session

    with target.srv.raw() as sock:
        port = sock.getsockname()[1]
        fresh_hello = recv_frame(sock)
        assert fresh_hello != relay.s2c_frames[0]  # fresh randomness
        sock.sendall(recorded)
        read_until_closed(sock, timeout=2.0)
    assert wait_until(lambda: records_about(log.records, port))
    [line] = records_about(log.records, port)
    assert "handshake with" in line.getMessage()
    assert target.rec.calls == 1  # only the genuine session
    assert target.rec.seen() == [REQUEST]


# -------------------------------------------------------- men in the middle


@pytest.fixture
def impostor(other_key: rsa.RSAPrivateKey) -> Iterator[Target]:
    """A callcp server with its own key, for the attacker to front."""
    t = Target(other_key)
    yield t
    t.srv.stop()


def test_mitm_with_own_key_rejected_by_pin(
    target: Target, impostor: Target, make_proxy: Callable[..., FrameProxy]
) -> None:
    proxy = make_proxy()
    proxy.target = impostor.address
    with pytest.raises(ServerKeyChanged) as info:
        via(proxy, target)
    assert info.value.expected == target.fingerprint
    assert info.value.presented == impostor.fingerprint
    assert target.fingerprint in str(info.value)
    assert impostor.fingerprint in str(info.value)
    relay = proxy.relay(0)
    assert relay.done.wait(5)
    # the client sent no key exchange, let alone data: only its refusal
    assert types(relay.c2s_frames) == [FrameType.ALERT]
    assert impostor.rec.calls == 0 and target.rec.calls == 0


def test_mitm_with_own_key_rejected_by_known_hosts(
    target: Target, impostor: Target, make_proxy: Callable[..., FrameProxy], tmp_path: Path
) -> None:
    known_hosts = str(tmp_path / "known_hosts")
    proxy = make_proxy()
    with via(proxy, target, known_hosts=known_hosts) as conn:  # first use: trusted
        assert conn.request(REQUEST) == b"ok:" + REQUEST
    proxy.target = impostor.address  # the attacker takes over the path
    with pytest.raises(ServerKeyChanged) as info:
        via(proxy, target, known_hosts=known_hosts)
    assert info.value.expected == target.fingerprint
    assert info.value.presented == impostor.fingerprint
    message = str(info.value)
    assert target.fingerprint in message and impostor.fingerprint in message
    assert f"{LOOPBACK}:{proxy.port}" in message
    assert impostor.rec.calls == 0
    assert target.rec.seen() == [REQUEST]


def test_refusing_a_server_tells_it_nothing_local(
    target: Target, make_proxy: Callable[..., FrameProxy], tmp_path: Path
) -> None:
    known_hosts = tmp_path / "home" / "alice-secret-user" / ".callcp" / "known_hosts"
    proxy = make_proxy()
    with pytest.raises(UnknownServerKey):
        via(proxy, target, known_hosts=str(known_hosts), trust_on_first_use=False)
    relay = proxy.relay(0)
    assert relay.done.wait(5)
    assert types(relay.c2s_frames) == [FrameType.ALERT]  # the refusal itself is right
    assert b"alice-secret-user" not in relay.c2s_raw


def _x25519_offset(body: bytes) -> int:
    assert body[: len(MAGIC)] == MAGIC
    n = body[len(MAGIC)]
    return len(MAGIC) + 1 + 2 * n + 32


def test_mitm_substituting_its_own_x25519_share(
    target: Target,
    make_proxy: Callable[..., FrameProxy],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The attack that made the server's share signed (issue 8): a man in
    the middle swaps only the X25519 share in the ServerHello, records
    everything, and later steals the server's RSA key.  The client refuses
    at the ServerHello, before it seals any application byte, on every API
    (connect + several send()s, and `callcp send-file`); the attacker, with
    the RSA key and its own share's private key, has nothing to decrypt."""
    attacker = x25519.X25519PrivateKey.generate()
    share = attacker.public_key().public_bytes_raw()

    def substitute(relay: Relay, index: int, frame: bytes) -> Sequence[bytes]:
        body = frame[5:]
        at = _x25519_offset(body)
        return [make_frame(frame[0], body[:at] + share + body[at + 32 :])]

    proxy = make_proxy(s2c=hook_on(FrameType.SERVER_HELLO, substitute))
    with pytest.raises(HandshakeError, match="not signed by the server's key"):
        conn = via(proxy, target)  # a fire-and-forget client gets no further
        for _ in range(3):
            conn.send(REQUEST)
    payload = b"the secret upload " * 4096
    (tmp_path / "upload.bin").write_bytes(payload)
    from callcp import cli

    code = cli.main(
        [
            "send-file", LOOPBACK, str(proxy.port), str(tmp_path / "upload.bin"),
            "--fingerprint", target.fingerprint, "--timeout", "10",
        ]
    )  # fmt: skip
    assert code == cli.EXIT_HANDSHAKE
    assert "not signed by the server's key" in capsys.readouterr().err
    assert wait_until(lambda: len(proxy.relays) == 2 and all(r.done.is_set() for r in proxy.relays))
    for relay in proxy.relays:
        # Nothing sealed left the client: no ClientHello, no record; only its
        # plaintext alert.  So the stolen RSA key (which would open an OAEP
        # premaster) and the attacker's share (which would give the X25519
        # secret) have no ciphertext to work on.
        assert types(relay.c2s_frames) == [FrameType.ALERT]
        assert REQUEST not in relay.c2s_raw and payload[:64] not in relay.c2s_raw
    assert target.rec.calls == 0

