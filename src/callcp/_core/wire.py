"""Byte layouts of callcp/2: frame header, record types, hello bodies.

Every frame on the wire, in both directions and in every phase, is::

    type    u8      one of the FrameType values
    length  u32     big-endian length of the body that follows
    body    length bytes

Plaintext frames (SERVER_HELLO, CLIENT_HELLO, ALERT) appear only during the
handshake.  Every other type is an AEAD record: its body is
AES-256-GCM(key, nonce, plaintext, aad = the 5 header bytes), i.e. ciphertext
followed by the 16-byte tag.  The type is in clear but authenticated.

docs/PROTOCOL.md is the specification; this module is its executable form.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .errors import CloseCode, HandshakeError, RemoteProtocolError

__all__ = [
    "MAGIC",
    "VERSION_4",
    "SUPPORTED_VERSIONS",
    "LEGACY_TRIPWIRE",
    "HEADER",
    "HEADER_SIZE",
    "TAG_SIZE",
    "MAX_FRAGMENT",
    "MAX_RECORD_BODY",
    "MAX_PLAINTEXT_FRAME",
    "FrameType",
    "ServerHello",
    "ClientHello",
    "encode_alert",
    "decode_alert",
]

MAGIC = b"CALLCP"
#: Wire version 3: the server's X25519 share is signed (version 2, an
#: unsigned per-connection share, is no longer spoken).
VERSION_4 = 4
SUPPORTED_VERSIONS: Tuple[int, ...] = (VERSION_4,)
#: Reserved version numbers, never a version: the ASCII of a PEM block's end
#: marker, ``-----END PUBLIC KEY-----``, as 12 u16.  A server appends them to
#: its ServerHello's list (the Callcp 1.0 tripwire, PROTOCOL.md §3, §11): a
#: Callcp 1.0 client, which reads until that marker, then fails to parse a
#: key and closes at once, instead of waiting for a PEM that never comes.
#: A client ignores them, as any version it does not speak.
LEGACY_TRIPWIRE: Tuple[int, ...] = tuple(struct.unpack(">12H", b"-----END PUBLIC KEY-----"))

HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size  # 5
TAG_SIZE = 16
#: Maximum plaintext carried by one record (64 KiB).
MAX_FRAGMENT = 65536
#: Maximum body of an encrypted record.
MAX_RECORD_BODY = MAX_FRAGMENT + TAG_SIZE
#: Maximum body of a plaintext handshake frame (hellos and alerts).
MAX_PLAINTEXT_FRAME = 4096
#: Maximum length of a close or alert reason, in bytes of UTF-8.
MAX_REASON = 256


class FrameType:
    # plaintext, handshake only
    SERVER_HELLO = 0x01
    CLIENT_HELLO = 0x02
    ALERT = 0x03
    REFUSAL = 0x04  # server -> client: declined before the key exchange, MACed (§4.10)
    # encrypted records
    FINISHED = 0x10
    CLIENT_AUTH = 0x11
    DATA = 0x20  # a message fragment; more follow
    DATA_END = 0x21  # the last (or only) fragment of a message
    STREAM_START = 0x22  # a stream begins: size hint and name
    STREAM_DATA = 0x23  # a stream chunk
    STREAM_END = 0x24  # a stream ends: length and SHA-256 of its bytes
    STREAM_ABORT = 0x25  # the sender gave up on the stream
    KEY_UPDATE = 0x30
    CLOSE = 0x31
    PING = 0x32  # keepalive: "answer me"
    PONG = 0x33  # the answer
    NEW_TICKET = 0x34  # server -> client: a session ticket for resumption
    NEXT_KEY = 0x35  # server -> client: the key it will use next, proved

    PLAINTEXT = frozenset({SERVER_HELLO, CLIENT_HELLO, ALERT, REFUSAL})
    ENCRYPTED = frozenset(
        {
            FINISHED,
            CLIENT_AUTH,
            DATA,
            DATA_END,
            STREAM_START,
            STREAM_DATA,
            STREAM_END,
            STREAM_ABORT,
            KEY_UPDATE,
            CLOSE,
            PING,
            PONG,
            NEW_TICKET,
            NEXT_KEY,
        }
    )
    NAMES = {
        0x01: "SERVER_HELLO",
        0x02: "CLIENT_HELLO",
        0x03: "ALERT",
        0x04: "REFUSAL",
        0x10: "FINISHED",
        0x11: "CLIENT_AUTH",
        0x20: "DATA",
        0x21: "DATA_END",
        0x22: "STREAM_START",
        0x23: "STREAM_DATA",
        0x24: "STREAM_END",
        0x25: "STREAM_ABORT",
        0x30: "KEY_UPDATE",
        0x31: "CLOSE",
        0x32: "PING",
        0x33: "PONG",
        0x34: "NEW_TICKET",
        0x35: "NEXT_KEY",
    }


def frame(ftype: int, body: bytes) -> bytes:
    """A whole plaintext frame."""
    return HEADER.pack(ftype, len(body)) + body


class _Reader:
    """Bounds-checked cursor over a frame body; overruns are remote errors."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise HandshakeError(f"{self._what} is truncated")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def vec16(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> None:
        if self._pos != len(self._data):
            raise HandshakeError(f"{self._what} has {len(self._data) - self._pos} trailing bytes")


@dataclass(frozen=True)
class ServerHello:
    """The server's first flight, in clear.

    body = MAGIC(6) | n u8 | versions u16*n | server_random(32) |
           share(32) | share_expiry u64 | rsa_public_der vec16 |
           share_signature vec16 | flags u8
    """

    versions: Tuple[int, ...]
    random: bytes
    x25519_public: bytes
    share_expiry: int
    rsa_public_der: bytes
    share_signature: bytes
    require_client_auth: bool

    def encode(self) -> bytes:
        body = b"".join(
            [
                MAGIC,
                bytes([len(self.versions)]),
                b"".join(struct.pack(">H", v) for v in self.versions),
                self.random,
                self.x25519_public,
                struct.pack(">Q", self.share_expiry),
                struct.pack(">H", len(self.rsa_public_der)),
                self.rsa_public_der,
                struct.pack(">H", len(self.share_signature)),
                self.share_signature,
                bytes([1 if self.require_client_auth else 0]),
            ]
        )
        return frame(FrameType.SERVER_HELLO, body)

    @classmethod
    def decode(cls, body: bytes) -> ServerHello:
        r = _Reader(body, "ServerHello")
        if r.take(len(MAGIC)) != MAGIC:
            raise HandshakeError("ServerHello has a bad magic: the peer is not a callcp server")
        n = r.u8()
        if n == 0:
            raise HandshakeError("ServerHello offers no protocol version")
        versions = tuple(r.u16() for _ in range(n))
        if VERSION_4 not in versions:  # (an older layout follows: do not parse it)
            return cls(versions, b"", b"", 0, b"", b"", False)
        random = r.take(32)
        x_pub = r.take(32)
        (expiry,) = struct.unpack(">Q", r.take(8))
        der = r.vec16()
        signature = r.vec16()
        flags = r.u8()
        r.done()
        if flags & ~1:
            raise HandshakeError(f"ServerHello has unknown flags 0x{flags:02x}")
        return cls(versions, random, x_pub, expiry, der, signature, bool(flags & 1))


@dataclass(frozen=True)
class ClientHello:
    """The client's key exchange, in clear.

    body = MAGIC(6) | version u16 | client_random(32) | x25519_public(32) |
           encrypted_premaster vec16 | ticket vec16 | premaster_box vec16
    (the RSA-OAEP-SHA256 of the 32-byte premaster; a session ticket, and the
    premaster sealed under its secret: both empty without a ticket)
    """

    version: int
    random: bytes
    x25519_public: bytes
    encrypted_premaster: bytes
    ticket: bytes = b""
    premaster_box: bytes = b""

    def encode(self) -> bytes:
        body = b"".join(
            [
                MAGIC,
                struct.pack(">H", self.version),
                self.random,
                self.x25519_public,
                struct.pack(">H", len(self.encrypted_premaster)),
                self.encrypted_premaster,
                struct.pack(">H", len(self.ticket)),
                self.ticket,
                struct.pack(">H", len(self.premaster_box)),
                self.premaster_box,
            ]
        )
        return frame(FrameType.CLIENT_HELLO, body)

    @classmethod
    def decode(cls, body: bytes) -> ClientHello:
        r = _Reader(body, "ClientHello")
        if r.take(len(MAGIC)) != MAGIC:
            raise HandshakeError("ClientHello has a bad magic: the peer is not a callcp client")
        version = r.u16()
        random = r.take(32)
        x_pub = r.take(32)
        enc = r.vec16()
        ticket = r.vec16()
        box = r.vec16()
        r.done()
        return cls(version, random, x_pub, enc, ticket, box)


def encode_new_ticket(lifetime: int, ticket: bytes) -> bytes:
    """NEW_TICKET plaintext: lifetime u32 (seconds) | ticket vec16."""
    return struct.pack(">IH", lifetime, len(ticket)) + ticket


def decode_new_ticket(body: bytes) -> Tuple[int, bytes]:
    r = _Reader(body, "NEW_TICKET")
    (lifetime,) = struct.unpack(">I", r.take(4))
    ticket = r.vec16()
    r.done()
    if not ticket:
        raise HandshakeError("NEW_TICKET carries no ticket")
    return lifetime, ticket


def encode_alert(code: int, reason: str) -> bytes:
    """Body of a CLOSE record or a plaintext ALERT: code u16 | reason (UTF-8)."""
    raw = reason.encode("utf-8", "replace")[:MAX_REASON]
    return struct.pack(">H", code) + raw


def decode_alert(body: bytes) -> Tuple[int, str]:
    if len(body) < 2 or len(body) > 2 + MAX_REASON:
        raise RemoteProtocolError(f"close/alert body of {len(body)} bytes is malformed")
    (code,) = struct.unpack(">H", body[:2])
    return code, printable(body[2:].decode("utf-8", "replace"))


#: ``delivered`` in a GOING_AWAY CLOSE when the sender cannot say (§8).
DELIVERED_UNKNOWN = (1 << 64) - 1


def encode_close(code: int, reason: str, delivered: int) -> bytes:
    """Body of a CLOSE record: an alert's, but GOING_AWAY also carries how
    many of the peer's messages were delivered (u64, after the code)."""
    if code != CloseCode.GOING_AWAY:
        return encode_alert(code, reason)
    raw = reason.encode("utf-8", "replace")[:MAX_REASON]
    return struct.pack(">HQ", code, delivered) + raw


def decode_close(body: bytes) -> Tuple[int, str, Optional[int]]:
    """(code, reason, delivered: None unless GOING_AWAY)."""
    if len(body) >= 2 and struct.unpack(">H", body[:2])[0] == CloseCode.GOING_AWAY:
        if len(body) < 10 or len(body) > 10 + MAX_REASON:
            raise RemoteProtocolError(f"GOING_AWAY close body of {len(body)} bytes is malformed")
        code, delivered = struct.unpack(">HQ", body[:10])
        return code, printable(body[10:].decode("utf-8", "replace")), delivered
    code, reason = decode_alert(body)
    return code, reason, None


def printable(text: str) -> str:
    """The peer's text made safe for one log line: control and other
    non-printable characters are shown escaped (no forged log lines)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def encode_client_auth(public_der: bytes, signature: bytes) -> bytes:
    """CLIENT_AUTH plaintext: public_der vec16 | signature vec16."""
    return b"".join(
        [
            struct.pack(">H", len(public_der)),
            public_der,
            struct.pack(">H", len(signature)),
            signature,
        ]
    )


def decode_client_auth(body: bytes) -> Tuple[bytes, bytes]:
    r = _Reader(body, "CLIENT_AUTH")
    der = r.vec16()
    sig = r.vec16()
    r.done()
    return der, sig


def split_versions(offered: Tuple[int, ...], supported: Tuple[int, ...]) -> List[int]:
    """The versions both sides support, best first."""
    return sorted(set(offered) & set(supported), reverse=True)


def alert_frame(code: int, reason: str) -> bytes:
    """A whole plaintext ALERT frame, e.g. for refusing a connection before
    any handshake state exists (server at capacity)."""
    return frame(FrameType.ALERT, encode_alert(code, reason))


#: STREAM_START size value meaning "unknown".
UNKNOWN_SIZE = 2**64 - 1
MAX_STREAM_NAME = 255


#: STREAM_START flag: the STREAM_END carries the stream's SHA-256.
FLAG_SHA256 = 0x01


def encode_stream_start(size: Optional[int], name: str, checksum: bool = False) -> bytes:
    """STREAM_START body: size u64 (2**64-1: unknown) | flags u8 | name vec16
    (UTF-8).  Flag bit 0: the STREAM_END carries a SHA-256."""
    if not name.isprintable():
        raise ValueError("stream name must not contain control characters")
    raw = name.encode("utf-8")
    if len(raw) > MAX_STREAM_NAME:
        raise ValueError(
            f"stream name is {len(raw)} bytes of UTF-8; the limit is {MAX_STREAM_NAME}"
        )
    if size is not None and not 0 <= size < UNKNOWN_SIZE:
        raise ValueError(f"stream size {size} out of range")
    flags = FLAG_SHA256 if checksum else 0
    return struct.pack(">QBH", UNKNOWN_SIZE if size is None else size, flags, len(raw)) + raw


def decode_stream_start(body: bytes) -> Tuple[Optional[int], str, bool]:
    """(size or None, name, whether the STREAM_END carries a SHA-256)."""
    if len(body) < 11:
        raise RemoteProtocolError("STREAM_START is truncated")
    size, flags, n = struct.unpack(">QBH", body[:11])
    if flags & ~FLAG_SHA256:
        raise RemoteProtocolError(f"STREAM_START has unknown flags 0x{flags:02x}")
    raw = body[11:]
    if len(raw) != n or n > MAX_STREAM_NAME:
        raise RemoteProtocolError("STREAM_START has a malformed name")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("STREAM_START name is not UTF-8") from None
    if not name.isprintable():
        raise RemoteProtocolError("STREAM_START name contains control characters")
    return (None if size == UNKNOWN_SIZE else size), name, bool(flags & FLAG_SHA256)


def encode_stream_end(length: int, digest: Optional[bytes]) -> bytes:
    """STREAM_END body: length u64 [| SHA-256 of the stream's bytes (32)]."""
    return struct.pack(">Q", length) + (digest or b"")


def decode_stream_end(body: bytes, checksum: bool) -> Tuple[int, Optional[bytes]]:
    if len(body) != (40 if checksum else 8):
        raise RemoteProtocolError(f"STREAM_END body of {len(body)} bytes is malformed")
    (length,) = struct.unpack(">Q", body[:8])
    return length, (body[8:] if checksum else None)
