"""Events the sans-I/O core hands to adapters: small, frozen, past tense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = [
    "Event",
    "NEED_DATA",
    "NeedData",
    "ServerKeyAccepted",
    "HandshakeCompleted",
    "MessageReceived",
    "CloseReceived",
    "StreamStarted",
    "StreamChunk",
    "StreamEnded",
    "StreamAborted",
    "DecryptionRequested",
]


class NeedData:
    """Sentinel type: feed more bytes with ``receive_data`` before asking again."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True)
class ServerKeyAccepted:
    """(client) The server's key passed verification and the client's key
    exchange is queued: the client may send data now (1-RTT)."""

    __slots__ = ("fingerprint",)
    fingerprint: str


@dataclass(frozen=True)
class HandshakeCompleted:
    """Both Finished MACs verified; ``peer_fingerprint`` is the peer's key
    (the server's for a client; the client's, or None, for a server)."""

    __slots__ = ("version", "peer_fingerprint")
    version: int
    peer_fingerprint: Optional[str]


@dataclass(frozen=True)
class MessageReceived:
    """A whole, authenticated message."""

    __slots__ = ("data",)
    data: bytes


@dataclass(frozen=True)
class CloseReceived:
    """The peer sent an authenticated CLOSE."""

    __slots__ = ("code", "reason")
    code: int
    reason: str


@dataclass(frozen=True)
class StreamStarted:
    """The peer began a stream; ``size`` is its announced length (None:
    unknown); ``checksum``: its end will carry a SHA-256."""

    __slots__ = ("size", "name", "checksum")
    size: Optional[int]
    name: str
    checksum: bool


@dataclass(frozen=True)
class StreamChunk:
    """Authenticated bytes of the current stream, in order."""

    __slots__ = ("data",)
    data: bytes


@dataclass(frozen=True)
class StreamEnded:
    """The stream is complete: its length (and SHA-256, when the sender
    asked for one; else None) were verified."""

    __slots__ = ("length", "sha256")
    length: int
    sha256: Optional[bytes]


@dataclass(frozen=True)
class StreamAborted:
    """The sender abandoned the stream; what arrived of it is incomplete."""

    __slots__ = ("reason",)
    reason: str


@dataclass(frozen=True)
class DecryptionRequested:
    """(server, ``defer_decryption=True``) The ClientHello's premaster needs
    its RSA decryption.  Call ``run()`` -- anywhere, e.g. in a worker thread:
    it touches nothing but the key -- and hand the result to
    ``ServerProtocol.premaster_decrypted()`` before asking for more events."""

    __slots__ = ("key", "ciphertext", "premaster")
    key: Any
    ciphertext: bytes
    #: Known already (a resumed session: the ticket unlocked it): run() is free.
    premaster: Optional[bytes]

    @property
    def resumed(self) -> bool:
        """No RSA work: the client's ticket gave the premaster."""
        return self.premaster is not None

    def run(self) -> Optional[bytes]:
        """The decrypted premaster, or None if decryption failed."""
        from .protocol import OAEP

        if self.premaster is not None:
            return self.premaster
        try:
            plaintext: bytes = self.key.decrypt(self.ciphertext, OAEP)
        except ValueError:
            return None
        return plaintext


Event = Union[
    DecryptionRequested,
    ServerKeyAccepted,
    HandshakeCompleted,
    MessageReceived,
    CloseReceived,
    StreamStarted,
    StreamChunk,
    StreamEnded,
    StreamAborted,
]
