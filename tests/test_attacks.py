"""Attacks on the core, each of which must be detected with a specific
exception and without handing any byte of a bad message to the application."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, List, Tuple

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa, x25519

from callcp._core.errors import (
    CallcpError,
    ClientAuthError,
    CloseCode,
    ConnectionClosedError,
    CryptoError,
    HandshakeAborted,
    HandshakeError,
    ServerBusy,
    ServerKeyChanged,
    VersionMismatch,
)
from callcp._core.events import DecryptionRequested, MessageReceived
from callcp._core.keys import fingerprint, fingerprint_der, public_der
from callcp._core.protocol import OAEP, ClientProtocol, ServerProtocol, _refusal_tag
from callcp._core.records import RecordReceiver
from callcp._core.schedule import derive_handshake_secrets
from callcp._core.shares import CLOCK_SKEW, MAX_SHARE_VALIDITY, SignedShare, sign_share
from callcp._core.wire import ClientHello, FrameType, ServerHello, encode_alert
from tests.helpers import FixedEntropy, Pair, drain, feed, pin, split_frames

REQUEST = b"transfer 100 to alice"
REPLY = b"done: transfer 100 to alice"


@dataclass
class Session:
    """A recorded, reproducible session: both sides' entropy is fixed, so a
    fresh pair built by ``make_pair`` emits the very same bytes again."""

    server_key: rsa.RSAPrivateKey
    s2c: bytes  # ServerHello | Finished, DATA_END(reply) | CLOSE
    c2s: bytes  # ClientHello, Finished, DATA_END(request) | CLOSE
    oaep: bytes
    share: SignedShare  # (signed once: a PSS signature is randomized)

    def client(self) -> ClientProtocol:
        ent = FixedEntropy([b"P" * 32, b"C" * 32], b"\x11" * 32, self.oaep)
        return ClientProtocol(pin(fingerprint(self.server_key)), entropy=ent)

    def server(self) -> ServerProtocol:
        ent = FixedEntropy([b"S" * 32, b"F" * 32], b"\x22" * 32)
        s = ServerProtocol(self.server_key, entropy=ent, share=self.share)
        s.start()
        return s


@pytest.fixture(scope="module")
def session(server_key: rsa.RSAPrivateKey) -> Session:
    oaep = server_key.public_key().encrypt(b"P" * 32, OAEP)
    now = time.time()
    share = sign_share(
        server_key, x25519.X25519PrivateKey.from_private_bytes(b"\x22" * 32), int(now) + 600, now
    )
    rec = Session(server_key, b"", b"", oaep, share)
    c, s = rec.client(), rec.server()
    sh = s.data_to_send()
    feed(c, sh)
    c.send(REQUEST)
    c2s = c.data_to_send()
    assert [type(e).__name__ for e in feed(s, c2s)] == ["HandshakeCompleted", "MessageReceived"]
    s.send(REPLY)
    s2c = s.data_to_send()
    feed(c, s2c)
    c.close()
    c_close = c.data_to_send()
    feed(s, c_close)
    s_close = s.data_to_send()
    rec.s2c = sh + s2c + s_close
    rec.c2s = c2s + c_close
    return rec


def _record_ends(stream: bytes) -> List[int]:
    ends, pos = [], 0
    for f in split_frames(stream):
        pos += len(f)
        ends.append(pos)
    return ends


def _deliver(proto: object, stream: bytes) -> Tuple[List[bytes], BaseException]:
    """Feed a whole stream then EOF; return the delivered messages and the
    error that must end it."""
    delivered: List[bytes] = []
    try:
        proto.receive_data(stream)  # type: ignore[attr-defined]
        proto.receive_data(b"")  # type: ignore[attr-defined]
        while True:
            ev = proto.next_event()  # type: ignore[attr-defined]
            if isinstance(ev, MessageReceived):
                delivered.append(ev.data)
    except CallcpError as exc:
        return delivered, exc
    raise AssertionError("unreachable")


def test_recorded_session_replays_cleanly(session: Session) -> None:
    """Sanity: the untampered recording is accepted by fresh objects."""
    c = session.client()
    c.receive_data(session.s2c[: _record_ends(session.s2c)[0]])
    drain(c)
    delivered, err = _deliver(c, session.s2c[_record_ends(session.s2c)[0] :])
    assert delivered == [REPLY]
    assert err.__class__.__name__ == "ConnectionClosedOK"


@pytest.mark.parametrize("direction", ["server_to_client", "client_to_server"])
def test_bit_flip_in_every_position_is_detected(session: Session, direction: str) -> None:
    stream = session.s2c if direction == "server_to_client" else session.c2s
    message = REPLY if direction == "server_to_client" else REQUEST
    frames = split_frames(stream)
    ends = _record_ends(stream)
    data_index = [f[0] for f in frames].index(FrameType.DATA_END)
    data_end = ends[data_index]
    for i in range(len(stream)):
        for bit in (0x01, 0x80):
            tampered = bytearray(stream)
            tampered[i] ^= bit
            proto = session.client() if direction == "server_to_client" else session.server()
            delivered, err = _deliver(proto, bytes(tampered))
            assert isinstance(err, CallcpError)
            assert err.__class__.__name__ != "ConnectionClosedOK", (i, bit)
            # the message is delivered only if the flip lies after its record
            if i < data_end:
                assert delivered == [], (i, bit, delivered)
            else:
                assert delivered == [message], (i, bit)


def test_replayed_record_rejected(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"pay 5")
    record = p.client.data_to_send()
    assert feed(p.server, record) == [MessageReceived(b"pay 5")]
    with pytest.raises(CryptoError):
        feed(p.server, record)


def test_reordered_records_rejected(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"first")
    first = p.client.data_to_send()
    p.client.send(b"second")
    second = p.client.data_to_send()
    with pytest.raises(CryptoError):
        feed(p.server, second + first)


def test_dropped_record_detected(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"first")
    p.client.data_to_send()  # lost on the way
    p.client.send(b"second")
    with pytest.raises(CryptoError):
        p.to_server()


def test_reflected_record_rejected(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"c1")
    p.to_server()
    p.server.send(b"s1")
    reflected = p.server.data_to_send()
    with pytest.raises(CryptoError):
        feed(p.server, reflected)


def test_dropped_fragment_of_a_large_message(server_key: rsa.RSAPrivateKey) -> None:
    p = Pair(server_key)
    p.handshake()
    p.client.send(b"q" * 300_000)
    frames = split_frames(p.client.data_to_send())
    with pytest.raises(CryptoError):
        feed(p.server, b"".join(frames[:2] + frames[3:]))


def test_whole_client_session_replayed_to_server(session: Session) -> None:
    """A recorded client flight replayed against a server with fresh randomness."""
    s = ServerProtocol(session.server_key)
    s.start()
    delivered, err = _deliver(s, session.c2s)
    assert delivered == []
    assert isinstance(err, HandshakeError)


def test_mitm_with_own_rsa_key_rejected_by_pin(
    server_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    expected = fingerprint(server_key)
    c = ClientProtocol(pin(expected))
    mitm = ServerProtocol(other_key)
    mitm.start()
    with pytest.raises(ServerKeyChanged) as info:
        feed(c, mitm.data_to_send())
    assert info.value.expected == expected
    assert info.value.presented == fingerprint(other_key)
    # nothing of the client's key exchange was produced; only an alert
    out = c.data_to_send()
    assert [f[0] for f in split_frames(out)] == [FrameType.ALERT]
    with pytest.raises(CallcpError):
        c.send(b"secret")


def test_mitm_substituting_x25519_share(server_key: rsa.RSAPrivateKey) -> None:
    """The attacker relays the real RSA key (and its signature) but swaps in
    its own X25519 share: the client refuses at the ServerHello, before it
    seals anything, so a later theft of the RSA key opens nothing."""
    c = ClientProtocol(pin(fingerprint(server_key)))
    s = ServerProtocol(server_key)
    s.start()
    hello = ServerHello.decode(s.data_to_send()[5:])
    attacker = x25519.X25519PrivateKey.generate()
    forged = dataclasses.replace(
        hello, x25519_public=attacker.public_key().public_bytes_raw()
    ).encode()
    with pytest.raises(HandshakeError, match="not signed by the server's key"):
        feed(c, forged)
    assert [f[0] for f in split_frames(c.data_to_send())] == [FrameType.ALERT]
    with pytest.raises(CallcpError):
        c.send(b"secret first request")
    assert c.peer_fingerprint is None


@pytest.mark.parametrize("field", ["share_expiry", "share_signature"])
def test_the_share_and_its_expiry_are_signed_together(
    server_key: rsa.RSAPrivateKey, field: str
) -> None:
    """An attacker cannot stretch a share's validity, nor pass off a
    signature made for another share."""
    c = ClientProtocol(pin(fingerprint(server_key)))
    s = ServerProtocol(server_key)
    s.start()
    hello = ServerHello.decode(s.data_to_send()[5:])
    other = ServerProtocol(server_key)
    other.start()
    value = (
        hello.share_expiry + 3600
        if field == "share_expiry"
        else ServerHello.decode(other.data_to_send()[5:]).share_signature
    )
    with pytest.raises(HandshakeError, match="not signed"):
        feed(c, dataclasses.replace(hello, **{field: value}).encode())


@pytest.mark.parametrize(
    ("offset", "message"),
    [(-CLOCK_SKEW - 5, "expired"), (MAX_SHARE_VALIDITY + CLOCK_SKEW + 5, "valid for")],
)
def test_a_share_outside_its_validity_is_refused(
    server_key: rsa.RSAPrivateKey, offset: int, message: str
) -> None:
    """A replayed old ServerHello (its share expired) or a share claiming a
    validity nobody gives is refused, with the clock tolerance stated."""
    now = 1_800_000_000.0
    share = sign_share(server_key, x25519.X25519PrivateKey.generate(), int(now) + offset, now)
    c = ClientProtocol(pin(fingerprint(server_key)), clock=lambda: now)
    s = ServerProtocol(server_key, share=share)
    s.start()
    with pytest.raises(HandshakeError, match=message):
        feed(c, s.data_to_send())
    # within the tolerance, it is accepted
    share = sign_share(server_key, x25519.X25519PrivateKey.generate(), int(now) - 60, now)
    c = ClientProtocol(pin(fingerprint(server_key)), clock=lambda: now)
    s = ServerProtocol(server_key, share=share)
    s.start()
    assert feed(c, s.data_to_send())


def test_version_downgrade_detected(server_key: rsa.RSAPrivateKey) -> None:
    """Both sides support versions 4 and 5; the attacker strips 5 from the
    ServerHello so the client picks 4.  The transcript catches it."""
    c = ClientProtocol(pin(fingerprint(server_key)), versions=(4, 5))
    s = ServerProtocol(server_key, versions=(4, 5))
    s.start()
    hello = ServerHello.decode(s.data_to_send()[5:])
    assert hello.versions == (4, 5)
    feed(c, dataclasses.replace(hello, versions=(4,)).encode())
    assert c.version == 4
    c.send(b"request")
    delivered, err = _deliver(s, c.data_to_send())
    assert delivered == []
    assert isinstance(err, HandshakeError)


def test_unknown_versions_fail_clearly(server_key: rsa.RSAPrivateKey) -> None:
    c = ClientProtocol(pin(fingerprint(server_key)))
    s = ServerProtocol(server_key, versions=(5, 6))
    s.start()
    with pytest.raises(VersionMismatch, match="versions"):
        feed(c, s.data_to_send())


def test_session_keys_differ_per_connection(server_key: rsa.RSAPrivateKey) -> None:
    secrets = set()
    for _ in range(3):
        p = Pair(server_key)
        p.to_client()
        assert p.client._secrets is not None
        secrets.add(p.client._secrets.client_traffic)
    assert len(secrets) == 3


def test_session_keys_depend_on_the_x25519_secret(server_key: rsa.RSAPrivateKey) -> None:
    """Same premaster, same randoms, different X25519 share: different keys."""
    results = []
    for x in (b"\x11" * 32, b"\x12" * 32):
        ent = FixedEntropy([b"P" * 32, b"C" * 32], x, b"\0" * 256)
        c = ClientProtocol(pin(fingerprint(server_key)), entropy=ent)
        s = ServerProtocol(server_key, entropy=FixedEntropy([b"S" * 32], b"\x22" * 32))
        s.start()
        feed(c, s.data_to_send())
        assert c._secrets is not None
        results.append(c._secrets)
    assert results[0].client_traffic != results[1].client_traffic
    assert results[0].server_traffic != results[1].server_traffic


def test_rsa_key_leak_does_not_open_recorded_session(session: Session) -> None:
    """Forward secrecy: with the server's RSA private key an eavesdropper
    recovers the premaster, but without an X25519 private key it cannot
    derive the traffic keys of a recorded session."""
    sh, ch = split_frames(session.s2c)[0], split_frames(session.c2s)[0]
    enc = ClientHello.decode(ch[5:]).encrypted_premaster
    premaster = session.server_key.decrypt(enc, OAEP)
    assert premaster == b"P" * 32
    import hashlib

    th = hashlib.sha256(sh + ch).digest()
    # the eavesdropper's best guesses for the X25519 secret fail
    for guess in (b"\0" * 32, os.urandom(32), ch[5 + 6 + 2 + 32 : 5 + 6 + 2 + 64]):
        secrets = derive_handshake_secrets(guess, premaster, th)
        receiver = RecordReceiver(secrets.client_traffic)
        finished = split_frames(session.c2s)[1]
        with pytest.raises(CryptoError):
            receiver.open(finished[:5], finished[5:])


def test_eof_before_close_after_data_is_truncation(session: Session) -> None:
    s = session.server()
    without_close = session.c2s[: _record_ends(session.c2s)[2]]
    delivered, err = _deliver(s, without_close)
    assert delivered == [REQUEST]
    assert isinstance(err, ConnectionClosedError)
    assert "truncat" in str(err)


def _tofu(known: Any, host: str) -> Any:
    """A trust-on-first-use client's key check, with its own known-hosts file."""
    from callcp._common import ServerTrust

    trust = ServerTrust(
        host,
        8436,
        server_fingerprint=None,
        known_hosts=known,
        trust_on_first_use=True,
        insecure=False,
        logger=logging.getLogger("test"),
    )
    return trust.verify


def _malformed_der(n: int, e: int) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = rsa.RSAPublicNumbers(e, n).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("n", "e", "problem"),
    [
        ((1 << 2047) | 2, 65537, "even modulus"),  # passes DER parsing; OAEP then fails
        ((1 << 3071) | 1, (1 << 3000) | 1, "public exponent a 3001-bit number"),
        ((1 << 1023) | 1, 65537, "has 1024 bits"),
    ],
    ids=["even-modulus", "huge-exponent", "1024-bit"],
)
def test_a_malformed_server_key_is_refused_before_trust_and_use(
    server_key: rsa.RSAPrivateKey, tmp_path: Any, n: int, e: int, problem: str
) -> None:
    """A first-contact attacker presenting a key that cannot work (or costs
    far more than it should) gets a HandshakeError naming the problem, not a
    bare ValueError; nothing is recorded in known_hosts, nothing is sealed."""
    known = tmp_path / "known_hosts"
    verify = _tofu(known, "192.0.2.7")
    c = ClientProtocol(verify)
    s = ServerProtocol(server_key)
    s.start()
    hello = ServerHello.decode(s.data_to_send()[5:])
    forged = dataclasses.replace(hello, rsa_public_der=_malformed_der(n, e)).encode()
    with pytest.raises(HandshakeError, match=problem):
        feed(c, forged)
    assert not known.exists() or known.read_text() == ""
    assert [f[0] for f in split_frames(c.data_to_send())] == [FrameType.ALERT]


def test_trust_on_first_use_records_nothing_the_server_did_not_prove(
    server_key: rsa.RSAPrivateKey, tmp_path: Any
) -> None:
    """A replayed or relayed ServerHello (the real key, validly signed) from
    someone who cannot finish the handshake: the client refuses at the
    server's Finished and the known-hosts file stays empty."""
    known = tmp_path / "known_hosts"
    verify = _tofu(known, "192.0.2.8")
    c = ClientProtocol(verify)
    s = ServerProtocol(server_key)
    s.start()
    feed(c, s.data_to_send())  # genuine ServerHello, replayed by the attacker
    assert c.awaiting_proof and c.peer_fingerprint is None
    c.data_to_send()
    forged_finished = bytes([FrameType.FINISHED]) + (48).to_bytes(4, "big") + os.urandom(48)
    with pytest.raises(HandshakeError):
        feed(c, forged_finished)
    assert not known.exists() or known.read_text() == ""
    assert c.peer_fingerprint is None


def test_an_announced_next_key_must_be_proved_for_this_session(
    server_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    """NEXT_KEY is signed by the next key over this session's transcript: an
    announcement relayed from another session fails the connection and
    reaches no trust store."""
    from cryptography.hazmat.primitives import hashes

    from callcp._core.errors import RemoteProtocolError
    from callcp._core.keys import public_der
    from callcp._core.protocol import NEXT_KEY_CONTEXT, PSS
    from callcp._core.wire import encode_client_auth

    announced: List[str] = []

    def session(next_key: Any) -> Tuple[ClientProtocol, ServerProtocol]:
        c = ClientProtocol(
            pin(fingerprint(server_key)), on_next_key=lambda fp, der: announced.append(fp)
        )
        s = ServerProtocol(server_key, next_key=next_key)
        s.start()
        feed(c, s.data_to_send())
        feed(s, c.data_to_send())
        return c, s

    c, s = session(other_key)
    flight = s.data_to_send()
    assert [f[0] for f in split_frames(flight)] == [FrameType.FINISHED, FrameType.NEXT_KEY]
    feed(c, flight)
    assert announced == [fingerprint(other_key)]
    assert c.next_server_fingerprint == fingerprint(other_key)

    # the first session's proof, relayed into a second one by a server that
    # holds the current key but not the next
    assert c._th_full is not None
    relayed = encode_client_auth(
        public_der(other_key),
        other_key.sign(NEXT_KEY_CONTEXT + c._th_full, PSS, hashes.SHA256()),
    )
    c2, s2 = session(None)
    finished = s2.data_to_send()
    s2._seal(FrameType.NEXT_KEY, relayed)
    with pytest.raises(RemoteProtocolError, match="not proved"):
        feed(c2, finished + s2.data_to_send())
    assert announced == [fingerprint(other_key)]


# ===================================================== refusal (§4.10)


def _refused(server_key: rsa.RSAPrivateKey, reason: str = "server busy: queue full") -> Pair:
    """A client whose flight (with a first request) the server declines
    before its key exchange; the REFUSAL is in ``server.data_to_send()``."""
    p = Pair(server_key, server_kwargs={"defer_decryption": True})
    p.to_client()
    p.client.send(b"transfer 100 to mallory")  # (first-flight data)
    p.server.receive_data(p.client.data_to_send())
    assert isinstance(p.server.next_event(), DecryptionRequested)
    p.server.close(CloseCode.GOING_AWAY, reason)
    return p


def test_a_busy_server_proves_its_refusal(server_key: rsa.RSAPrivateKey) -> None:
    p = _refused(server_key)
    data = p.server.data_to_send()
    assert [f[0] for f in split_frames(data)] == [FrameType.REFUSAL]
    assert b"mallory" not in data
    with pytest.raises(ServerBusy, match="server busy: queue full") as info:
        feed(p.client, data)
    assert info.value.retryable and info.value.reason == "server busy: queue full"
    assert p.client.data_to_send() == b""  # (nothing answers a refusal)


@pytest.mark.parametrize("where", ["tag", "reason", "code"])
def test_a_forged_refusal_is_not_taken_for_a_busy_server(
    server_key: rsa.RSAPrivateKey, where: str
) -> None:
    """An attacker who let the flight through (the server may have acted on
    the request) cannot make the client believe it was never read."""
    p = _refused(server_key)
    frame_ = bytearray(p.server.data_to_send())
    at = {"tag": len(frame_) - 1, "reason": 8, "code": 6}[where]
    frame_[at] ^= 1
    with pytest.raises(HandshakeError, match="REFUSAL failed authentication") as info:
        feed(p.client, bytes(frame_))
    assert not isinstance(info.value, ServerBusy)


def test_a_refusal_from_another_connection_does_not_verify(server_key: rsa.RSAPrivateKey) -> None:
    recorded = _refused(server_key).server.data_to_send()
    p = _refused(server_key)
    with pytest.raises(HandshakeError, match="REFUSAL failed authentication"):
        feed(p.client, recorded)


def test_a_refusal_needs_the_key_exchange_inputs(server_key: rsa.RSAPrivateKey) -> None:
    """Before its ServerHello the client has no dh: a REFUSAL there is fatal
    (not a busy server), as is one with a valid tag but another code."""
    recorded = _refused(server_key).server.data_to_send()
    fresh = ClientProtocol(lambda fp, der: None)
    with pytest.raises(HandshakeError) as info:
        feed(fresh, recorded)
    assert not isinstance(info.value, ServerBusy)
    p = Pair(server_key)
    p.to_client()
    assert p.client._refusal is not None
    dh, th = p.client._refusal  # (test only: a valid tag over another code)
    body = encode_alert(CloseCode.NORMAL, "bye")
    body += _refusal_tag(dh, th, body)
    with pytest.raises(HandshakeError, match="only GOING_AWAY") as info:
        feed(p.client, bytes([FrameType.REFUSAL]) + len(body).to_bytes(4, "big") + body)
    assert not isinstance(info.value, ServerBusy)


def test_an_unauthenticated_alert_selects_nothing_specific(server_key: rsa.RSAPrivateKey) -> None:
    """An ALERT saying "server busy" or "unsupported version" after the
    client's flight is reported only as an aborted handshake: it may be an
    attacker's, so it proves nothing about the request in the flight, and
    its text (advice an attacker could steer) stays out of the message."""
    for code, text in [
        (CloseCode.GOING_AWAY, "server busy: retry at evil.example"),
        (CloseCode.UNSUPPORTED_VERSION, "upgrade from evil.example"),
        (CloseCode.UNAUTHORIZED, "unauthorized"),
    ]:
        p = Pair(server_key)
        p.to_client()
        p.client.send(b"request")
        alert = bytes([FrameType.ALERT]) + (2 + len(text)).to_bytes(4, "big")
        alert += code.to_bytes(2, "big") + text.encode()
        with pytest.raises(HandshakeAborted) as info:
            feed(p.client, alert)
        assert type(info.value) is HandshakeAborted
        assert "evil" not in str(info.value) and "unauthenticated" in str(info.value)
        assert info.value.alert_code == code and info.value.reason == text


def test_a_refusal_is_bound_to_its_connection_even_with_the_same_dh(
    server_key: rsa.RSAPrivateKey,
) -> None:
    """Two connections on one signed share whose client reuses its X25519
    key (so the same ``dh``): the first's REFUSAL does not verify on the
    second, because TH_hello (both randoms) salts its key."""
    now = time.time()
    share = sign_share(server_key, x25519.X25519PrivateKey.generate(), int(now) + 60, now)
    eph = os.urandom(32)

    def refused_connection() -> Tuple[ClientProtocol, bytes]:
        c = ClientProtocol(
            lambda fp, der: None,
            entropy=FixedEntropy([os.urandom(32), os.urandom(32)], eph, b"\x01" * 256),
        )
        s = ServerProtocol(server_key, share=share, defer_decryption=True)
        s.start()
        feed(c, s.data_to_send())
        s.receive_data(c.data_to_send())
        assert isinstance(s.next_event(), DecryptionRequested)
        s.close(CloseCode.GOING_AWAY, "server busy: full")
        return c, s.data_to_send()

    first, first_refusal = refused_connection()
    second, second_refusal = refused_connection()
    assert first._refusal is not None and second._refusal is not None
    assert first._refusal[0] == second._refusal[0]  # the same dh
    with pytest.raises(HandshakeError, match="REFUSAL failed authentication"):
        feed(second, first_refusal)
    with pytest.raises(ServerBusy):
        feed(first, first_refusal)


def test_a_refusal_lets_go_of_the_keys_and_a_low_order_share_gets_an_alert(
    server_key: rsa.RSAPrivateKey,
) -> None:
    p = _refused(server_key)
    assert p.server._eph is None and p.server._peer_share is None  # (used once, let go)
    p.server.data_to_send()
    q = Pair(server_key, server_kwargs={"defer_decryption": True})
    q.to_client()
    q.server.receive_data(q.client.data_to_send())
    assert isinstance(q.server.next_event(), DecryptionRequested)
    # (test only) a share whose exchange gives all zeros: no proof is possible
    q.server._peer_share = x25519.X25519PublicKey.from_public_bytes(bytes(32))
    q.server.close(CloseCode.GOING_AWAY, "server busy")
    assert [f[0] for f in split_frames(q.server.data_to_send())] == [FrameType.ALERT]
    # and a server out of proof budget sends an ALERT too
    r = Pair(server_key, server_kwargs={"defer_decryption": True})
    r.to_client()
    r.server.receive_data(r.client.data_to_send())
    r.server.next_event()
    r.server.refusal_proof = False
    r.server.close(CloseCode.GOING_AWAY, "server busy")
    with pytest.raises(HandshakeAborted):
        feed(r.client, r.server.data_to_send())


def test_the_client_forgets_the_refusal_key_once_the_server_proved_itself(
    server_key: rsa.RSAPrivateKey,
) -> None:
    p = Pair(server_key)
    p.to_client()
    assert p.client._refusal is not None
    p.to_server()
    p.to_client()  # (the server's FINISHED)
    assert p.client._refusal is None


@pytest.mark.parametrize("count", [0, 1, 2**64 - 1])
def test_a_sealed_going_away_before_the_servers_finished(
    server_key: rsa.RSAPrivateKey, count: int
) -> None:
    """A server with keys that declines before its FINISHED: a count of 0
    proves the flight unread (ServerBusy); "cannot say" proves nothing; any
    other count is a lie (it delivers nothing before its FINISHED)."""
    p = Pair(server_key)
    p.to_client()
    p.client.send(b"first flight")
    hello = split_frames(p.client.data_to_send())[0]
    p.server.receive_data(hello)  # (only the hello: keys, no FINISHED yet)
    assert drain(p.server) == [] and p.server.state.name == "WAIT_CLIENT_FINISHED"
    p.server.delivered = count if count != 2**64 - 1 else 0  # (test only: what it claims)
    p.server.close(CloseCode.GOING_AWAY, "stopping", counted=count != 2**64 - 1)
    data = p.server.data_to_send()
    if count == 0:
        with pytest.raises(ServerBusy):
            feed(p.client, data)
    else:
        with pytest.raises(HandshakeError) as info:
            feed(p.client, data)
        assert not isinstance(info.value, ServerBusy)


# ============================================ client auth: cheapest refusal first


def _client_auth_frame(p: Pair, der: bytes, signature: bytes) -> bytes:
    """The client's CLIENT_AUTH record with ``der`` and ``signature`` in it,
    sealed as the client would (the client's own keys)."""
    from callcp._core.records import RecordSender
    from callcp._core.wire import encode_client_auth

    body = encode_client_auth(der, signature)
    assert p.client._secrets is not None
    out: List[bytes] = []
    RecordSender(p.client._secrets.client_traffic).seal(FrameType.CLIENT_AUTH, body, out)
    return b"".join(out)


@pytest.mark.parametrize("case", ["unlisted", "huge-exponent"])
def test_client_auth_is_refused_before_any_rsa_work(
    server_key: rsa.RSAPrivateKey, client_key: rsa.RSAPrivateKey, case: str
) -> None:
    """An unlisted key is refused on its fingerprint (a hash), and a listed
    fingerprint whose key has a 3,001-bit exponent on the key check: the
    garbage signature is never looked at (it would say "invalid")."""
    if case == "unlisted":
        der = public_der(client_key)
        listed = {"SHA256:someone-else"}
        expected = "is not authorized"
    else:
        der = _malformed_der((1 << 3071) | 1, (1 << 3000) | 1)
        listed = {fingerprint_der(der)}
        expected = "public exponent a 3001-bit number"
    p = Pair(
        server_key,
        client_kwargs={"client_key": client_key},
        server_kwargs={"authorize_client": listed.__contains__},
    )
    p.to_client()
    hello = split_frames(p.client.data_to_send())[0]
    p.server.receive_data(hello)
    assert drain(p.server) == []
    p.server.receive_data(_client_auth_frame(p, der, b"\x00" * 256))
    with pytest.raises(ClientAuthError, match=expected):
        drain(p.server)
