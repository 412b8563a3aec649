"""Record protection: AES-256-GCM with per-direction keys and counters.

Each direction of a connection has its own traffic secret, hence its own key
and IV.  The nonce of record number ``seq`` is ``iv XOR (0^4 || seq)``: never
random, never sent, never reused.  Because the receiver computes the nonce from
*its own* count of records, a replayed, reordered or dropped record is opened
with the wrong nonce and fails authentication; a record reflected back to its
sender is opened with the other direction's key and fails too.  The 5-byte
frame header is the associated data, so the type and length are authenticated.

Keys roll over with a KEY_UPDATE record.  The sender updates after
``key_update_interval`` records (default 2**22), far below the 2**24.5 records
AES-GCM tolerates per key with 64 KiB records; the receiver refuses a peer
that sends more than ``MAX_RECORDS_PER_KEY`` records under one key.
"""

from __future__ import annotations

from typing import List, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import CryptoError, RemoteProtocolError
from .schedule import next_secret, traffic_key_iv
from .wire import HEADER, TAG_SIZE

__all__ = ["RecordSender", "RecordReceiver", "MAX_RECORDS_PER_KEY", "DEFAULT_KEY_UPDATE_INTERVAL"]

#: A receiver refuses more records than this under one key (AES-GCM limit).
MAX_RECORDS_PER_KEY = 2**24
#: A sender rolls its key after this many records.
DEFAULT_KEY_UPDATE_INTERVAL = 2**22


class _Direction:
    __slots__ = ("_secret", "_aead", "_iv", "seq", "generation")

    def __init__(self, secret: bytes) -> None:
        self.generation = 0
        self._install(secret)

    def _install(self, secret: bytes) -> None:
        key, iv = traffic_key_iv(secret)
        self._secret = secret
        self._aead = AESGCM(key)
        self._iv = int.from_bytes(iv, "big")
        self.seq = 0

    def _nonce(self) -> bytes:
        return (self._iv ^ self.seq).to_bytes(12, "big")

    def update(self) -> None:
        """Move to the next traffic secret (after a KEY_UPDATE record)."""
        self._install(next_secret(self._secret))
        self.generation += 1


class RecordSender(_Direction):
    __slots__ = ()

    def seal(self, ftype: int, plaintext: Union[bytes, memoryview], out: List[bytes]) -> None:
        """Append one sealed record (header, then ciphertext and tag) to ``out``."""
        header = HEADER.pack(ftype, len(plaintext) + TAG_SIZE)
        out.append(header)
        out.append(self._aead.encrypt(self._nonce(), plaintext, header))
        self.seq += 1

    def seal_one(self, ftype: int, plaintext: Union[bytes, memoryview]) -> bytes:
        """One sealed record as one bytes object (the hot path of small messages)."""
        header = HEADER.pack(ftype, len(plaintext) + TAG_SIZE)
        sealed = self._aead.encrypt((self._iv ^ self.seq).to_bytes(12, "big"), plaintext, header)
        self.seq += 1
        return header + sealed


class RecordReceiver(_Direction):
    __slots__ = ()

    def open(self, header: Union[bytes, memoryview], body: Union[bytes, memoryview]) -> bytes:
        """Authenticate and decrypt one record; the only place InvalidTag is caught.

        Raises:
            CryptoError: the record is not the next one this direction expects
                under this key (tampered, replayed, reordered, dropped, reflected,
                or sealed with another key).
            RemoteProtocolError: the peer exceeded the per-key record limit.
        """
        if self.seq >= MAX_RECORDS_PER_KEY:
            raise RemoteProtocolError(
                f"peer sent {self.seq} records without a key update (limit {MAX_RECORDS_PER_KEY})"
            )
        try:
            plaintext = self._aead.decrypt((self._iv ^ self.seq).to_bytes(12, "big"), body, header)
        except InvalidTag:
            raise CryptoError(
                f"record {self.seq} (key generation {self.generation}) failed authentication: "
                "tampered, replayed, reordered, dropped, reflected or wrong key"
            ) from None
        self.seq += 1
        return plaintext
