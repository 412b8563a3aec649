"""In-memory helpers for driving the sans-I/O core (h11's tests/helpers.py style)."""

from __future__ import annotations

from typing import Callable, List, Optional

from cryptography.hazmat.primitives.asymmetric import rsa, x25519

from callcp._core.events import NEED_DATA, CloseReceived, Event
from callcp._core.protocol import ClientProtocol, Entropy, ServerProtocol, _Protocol


def accept_any(fingerprint: str, der: bytes) -> None:
    return None


def pin(expected: str) -> Callable[[str, bytes], None]:
    from callcp._core.errors import ServerKeyChanged

    def verify(fingerprint: str, der: bytes) -> None:
        if fingerprint != expected:
            raise ServerKeyChanged(
                f"expected {expected}, got {fingerprint}", expected=expected, presented=fingerprint
            )

    return verify


def drain(proto: _Protocol) -> List[Event]:
    """All events available now (raises what the core raises)."""
    events: List[Event] = []
    while True:
        ev = proto.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)  # type: ignore[arg-type]
        if isinstance(ev, CloseReceived):
            return events  # the next call would raise ConnectionClosed


def feed(proto: _Protocol, data: bytes) -> List[Event]:
    proto.receive_data(data)
    return drain(proto)


class Pair:
    """A client and a server wired back to back in memory."""

    def __init__(
        self,
        server_key: rsa.RSAPrivateKey,
        *,
        client_kwargs: Optional[dict] = None,
        server_kwargs: Optional[dict] = None,
    ) -> None:
        ck = dict(client_kwargs or {})
        verify = ck.pop("verify", accept_any)
        self.client = ClientProtocol(verify, **ck)
        self.server = ServerProtocol(server_key, **(server_kwargs or {}))
        self.server.start()
        # wire logs: every chunk each side produced, in order
        self.c2s: List[bytes] = []
        self.s2c: List[bytes] = []

    def to_client(self) -> List[Event]:
        data = self.server.data_to_send()
        self.s2c.append(data)
        return feed(self.client, data)

    def to_server(self) -> List[Event]:
        data = self.client.data_to_send()
        self.c2s.append(data)
        return feed(self.server, data)

    def handshake(self) -> None:
        self.to_client()
        self.to_server()
        self.to_client()


class FixedEntropy(Entropy):
    """Deterministic entropy for known-answer tests."""

    def __init__(
        self,
        randoms: List[bytes],
        x25519_private: bytes,
        oaep_ciphertext: bytes = b"",
        signature: bytes = b"",
    ):
        self._randoms = list(randoms)
        self._x = x25519_private
        self._oaep = oaep_ciphertext
        self._signature = signature

    def random(self, n: int) -> bytes:
        value = self._randoms.pop(0)
        assert len(value) == n
        return value

    def x25519_key(self) -> x25519.X25519PrivateKey:
        return x25519.X25519PrivateKey.from_private_bytes(self._x)

    def oaep_encrypt(self, key: rsa.RSAPublicKey, premaster: bytes) -> bytes:
        return self._oaep

    def pss_sign(self, key: rsa.RSAPrivateKey, data: bytes) -> bytes:
        return self._signature or super().pss_sign(key, data)


def split_frames(data: bytes) -> List[bytes]:
    """Cut a byte stream into whole frames (type u8, length u32, body)."""
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        out.append(data[pos : pos + 5 + length])
        pos += 5 + length
    return out
