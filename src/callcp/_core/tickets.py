"""Session tickets: resumption without the server's RSA decryption
(docs/PROTOCOL.md §4.8).

After a handshake the server sends the client a ticket: the connection's
resumption secret, sealed under a ticket key only the server (or the servers
sharing its ticket key) can open.  On its next connection the client sends the
ticket back, with its premaster sealed under a key derived from that secret
*as well as* RSA-OAEP-encrypted: a server that opens the ticket skips the RSA
decryption (its one expensive operation); one that cannot (stale, forged, or
another server's ticket) decrypts the OAEP copy instead and the handshake goes
on as a full one, in the same connection, with no error and nothing to resend.

Ticket keys rotate: the key of epoch ``e`` (``e = floor(unix time /
lifetime)``) is derived from a master secret, so processes and machines that
share the master (a ticket key file) share the keys without talking to each
other.  A ticket sealed in epoch ``e`` is accepted while its own expiry has not
passed and ``e`` is the current or the previous epoch.

Pure: callers pass ``now`` (Unix time, seconds).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

__all__ = [
    "TicketKeys",
    "Session",
    "TicketContents",
    "PREMASTER_BOX_SIZE",
    "box_premaster",
    "open_premaster",
    "key_hash",
]

#: version, expiry, server key hash, has a client key, client key hash, secret
_TICKET_PLAINTEXT = struct.Struct(">HQ32sB32s32s")
_EPOCH = struct.Struct(">Q")
_NONCE_SIZE = 12
_TAG_SIZE = 16
#: The sealed ticket's size: epoch, nonce, plaintext, tag.
TICKET_SIZE = _EPOCH.size + _NONCE_SIZE + _TICKET_PLAINTEXT.size + _TAG_SIZE
#: The premaster sealed under the ticket's secret: 32 bytes and a tag.
PREMASTER_BOX_SIZE = 32 + _TAG_SIZE
#: The largest ticket a client keeps (a ClientHello must stay small).
MAX_TICKET_BYTES = 1024
#: Ticket keys change at least this often (seconds), whatever the lifetime:
#: a bounded number of tickets is sealed under one key (random nonces).
MAX_KEY_PERIOD = 3600.0


@dataclass(frozen=True)
class TicketContents:
    """What a server finds in a ticket it opened."""

    version: int
    expiry: int
    client_key_hash: Optional[bytes]  # SHA-256 of the client key's DER, if it authenticated
    secret: bytes  # the resumption secret


@dataclass(frozen=True)
class Session:
    """What a client keeps to resume with one server: the ticket and its
    secret, the server key it was issued under, and when it expires."""

    ticket: bytes
    secret: bytes
    server_fingerprint: str
    expiry: float  # Unix time


class TicketKeys:
    """A server's ticket keys, derived per epoch from ``master`` (any length,
    at least 32 bytes; None: a random one, this process's alone), which
    seals; ``previous`` masters (a rotation's older ones) still open the
    tickets they sealed, while those live."""

    def __init__(
        self,
        lifetime: float,
        master: Optional[bytes] = None,
        random: Callable[[int], bytes] = os.urandom,
        previous: Sequence[bytes] = (),
    ) -> None:
        self._random = random  # (the nonces; tests fix it for known answers)
        if master is None:
            master = os.urandom(32)
        if any(len(secret) < 32 for secret in (master, *previous)):
            raise ValueError("a ticket key must be at least 32 bytes")
        self.lifetime = lifetime
        self.period = min(lifetime, MAX_KEY_PERIOD)
        self._back = math.ceil(lifetime / self.period)  # epochs a valid ticket may be old
        self._masters = [
            HKDF(hashes.SHA256(), 32, None, b"callcp/2 ticket master").derive(secret)
            for secret in (master, *previous)
        ]
        self._keys: Dict[Tuple[int, int], AESGCM] = {}

    def _key(self, epoch: int, which: int = 0) -> AESGCM:
        key = self._keys.get((which, epoch))
        if key is None:
            if len(self._keys) > 8 * len(self._masters):  # (derived again when needed: cheap)
                self._keys.clear()
            raw = HKDFExpand(
                hashes.SHA256(), 32, b"callcp/2 ticket key" + _EPOCH.pack(epoch)
            ).derive(self._masters[which])
            key = self._keys[(which, epoch)] = AESGCM(raw)
        return key

    def _epoch(self, now: float) -> int:
        return int(now // self.period)

    def seal(
        self,
        now: float,
        version: int,
        server_key_hash: bytes,
        client_key_hash: Optional[bytes],
        secret: bytes,
    ) -> bytes:
        """A new ticket, valid for ``lifetime`` seconds from ``now``."""
        epoch = self._epoch(now)
        plaintext = _TICKET_PLAINTEXT.pack(
            version,
            int(now + self.lifetime),
            server_key_hash,
            client_key_hash is not None,
            client_key_hash or bytes(32),
            secret,
        )
        nonce = self._random(_NONCE_SIZE)
        head = _EPOCH.pack(epoch)
        return head + nonce + self._key(epoch).encrypt(nonce, plaintext, head)

    def open(self, ticket: bytes, now: float, server_key_hash: bytes) -> Optional[TicketContents]:
        """The contents of a ticket this server (or one sharing its key)
        sealed, still valid and issued under ``server_key_hash``; else None."""
        if len(ticket) != TICKET_SIZE:
            return None
        (epoch,) = _EPOCH.unpack_from(ticket)
        current = self._epoch(now)
        if not 0 <= current - epoch <= self._back:
            return None
        nonce = ticket[_EPOCH.size : _EPOCH.size + _NONCE_SIZE]
        sealed, head = ticket[_EPOCH.size + _NONCE_SIZE :], ticket[: _EPOCH.size]
        for which in range(len(self._masters)):  # (the current master first)
            try:
                plaintext = self._key(epoch, which).decrypt(nonce, sealed, head)
                break
            except InvalidTag:
                continue
        else:
            return None
        version, expiry, server, has_client, client, secret = _TICKET_PLAINTEXT.unpack(plaintext)
        if now > expiry or server != server_key_hash or has_client > 1:
            return None
        return TicketContents(version, expiry, client if has_client else None, secret)


def _premaster_key(secret: bytes, client_random: bytes) -> AESGCM:
    raw = HKDFExpand(hashes.SHA256(), 32, b"callcp/2 ticket premaster" + client_random).derive(
        secret
    )
    return AESGCM(raw)


def box_premaster(secret: bytes, client_random: bytes, ticket: bytes, premaster: bytes) -> bytes:
    """The premaster sealed under the ticket's secret (key per connection:
    the client random enters it, so the all-zero nonce is never reused)."""
    return _premaster_key(secret, client_random).encrypt(bytes(12), premaster, ticket)


def open_premaster(
    secret: bytes, client_random: bytes, ticket: bytes, box: bytes
) -> Optional[bytes]:
    try:
        return _premaster_key(secret, client_random).decrypt(bytes(12), box, ticket)
    except InvalidTag:
        return None


def key_hash(der: bytes) -> bytes:
    """SHA-256 of a DER public key (what a ticket binds)."""
    return hashlib.sha256(der).digest()

