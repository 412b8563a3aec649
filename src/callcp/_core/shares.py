"""The server's signed X25519 share (docs/PROTOCOL.md §4.2, §5).

The server does not send a fresh, unsigned X25519 share per connection: it
signs (RSA-PSS, with its long-term RSA key) a *semi-static* share and an
expiry time, uses it for the ServerHellos of ``lifetime`` seconds, then makes
a new one.  The client checks the signature and the expiry before it seals
anything, so an attacker on the path cannot substitute its own share, and
every session key depends on an X25519 secret that nobody can recompute once
the share's private key is gone (a later theft of the RSA key opens nothing).

A share's private key lives in the :class:`ShareKeeper` until the share is
replaced, and after that only in the connections whose ServerHello carried
it, until they have computed their secret (at most a handshake timeout):
then the last reference goes and OpenSSL clears the key as it frees it.

Pure: no clock is read here; callers pass ``now`` (Unix time, seconds).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519

from .errors import HandshakeError

__all__ = [
    "SHARE_CONTEXT",
    "CLOCK_SKEW",
    "MAX_SHARE_VALIDITY",
    "SignedShare",
    "ShareKeeper",
    "share_signed_data",
    "sign_share",
    "check_share",
]

#: What the server signs is prefixed with this context string.
SHARE_CONTEXT = b"callcp/2 server share\x00"
#: How far apart the two hosts' clocks may be (seconds) before a valid share
#: is refused as expired (or as valid for too long).
CLOCK_SKEW = 300
#: The longest validity a client accepts for one share (seconds).
MAX_SHARE_VALIDITY = 86400

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def share_signed_data(share: bytes, expiry: int) -> bytes:
    """The bytes the server's RSA key signs: context || share || u64 expiry."""
    return SHARE_CONTEXT + share + struct.pack(">Q", expiry)


@dataclass(frozen=True, eq=False)
class SignedShare:
    """One semi-static X25519 key pair, its expiry and the server's signature."""

    private: x25519.X25519PrivateKey
    public: bytes
    expiry: int  # Unix time, seconds: clients refuse the share after it
    signature: bytes
    created: float  # Unix time, when the keeper made it


def sign_share(
    rsa_key: rsa.RSAPrivateKey,
    private: x25519.X25519PrivateKey,
    expiry: int,
    now: float,
) -> SignedShare:
    """Sign ``private``'s public share with ``rsa_key`` (one RSA-PSS signature)."""
    public = private.public_key().public_bytes_raw()
    signature = rsa_key.sign(share_signed_data(public, expiry), PSS, hashes.SHA256())
    return SignedShare(private, public, expiry, signature, now)


class ShareKeeper:
    """The server's current signed share, replaced every ``lifetime`` seconds.

    A share is handed out for ``lifetime`` seconds after it is made and is
    valid (its expiry) ``lifetime + grace`` seconds after that, ``grace``
    being the handshake timeout: a ServerHello sent at the last moment stays
    valid for as long as its handshake may last.  So one RSA signature per
    ``lifetime`` per process.  :meth:`refresh` replaces a share a little
    early, so that the signature is made when the server is idle rather
    than on the path of a connection.
    """

    #: refresh() replaces a share this many seconds before it would be due.
    AHEAD = 2.0

    def __init__(self, rsa_key: rsa.RSAPrivateKey, lifetime: float, grace: float) -> None:
        self._rsa_key = rsa_key
        self.lifetime = lifetime
        self.grace = grace
        self._share: Optional[SignedShare] = None

    def current(self, now: float) -> SignedShare:
        """The share to put in a ServerHello now (a new one if it is due)."""
        share = self._share
        if share is None or now >= share.created + self.lifetime or now < share.created:
            share = self._renew(now)
        return share

    def refresh(self, now: float) -> None:
        """(when idle) Replace the share if it is due within AHEAD seconds."""
        share = self._share
        ahead = min(self.AHEAD, self.lifetime / 2)  # (short lifetimes: not every call)
        if share is None or now >= share.created + self.lifetime - ahead:
            self._renew(now)

    def still_valid(self, now: float) -> Optional[SignedShare]:
        """The current share if a handshake started now would end before it
        expires (a new one could not be made), else None."""
        share = self._share
        if share is None or now < share.created or now + self.grace >= share.expiry:
            return None
        return share

    def forget(self) -> None:
        """(the server stopped) Let go of the current share's private key."""
        self._share = None

    def _renew(self, now: float) -> SignedShare:
        expiry = math.ceil(now + self.lifetime + self.grace)
        share = sign_share(self._rsa_key, x25519.X25519PrivateKey.generate(), expiry, now)
        self._share = share
        return share


def check_share(
    server_key: rsa.RSAPublicKey, share: bytes, expiry: int, signature: bytes, now: float
) -> None:
    """The client's checks of a ServerHello's share, before it uses it.

    Raises:
        HandshakeError: the signature does not verify under ``server_key``,
            the share expired more than CLOCK_SKEW seconds ago, or it claims
            a validity beyond MAX_SHARE_VALIDITY (+ CLOCK_SKEW) from now.
    """
    try:
        server_key.verify(signature, share_signed_data(share, expiry), PSS, hashes.SHA256())
    except (InvalidSignature, ValueError):
        raise HandshakeError(
            "the server's key share is not signed by the server's key: someone on the "
            "path replaced it, or the server is misconfigured"
        ) from None
    if now > expiry + CLOCK_SKEW:
        raise HandshakeError(
            f"the server's key share expired {int(now - expiry)} s ago: a replayed "
            f"ServerHello, or the clocks of the two hosts differ by more than {CLOCK_SKEW} s"
        )
    if expiry > now + MAX_SHARE_VALIDITY + CLOCK_SKEW:
        raise HandshakeError(
            f"the server's key share claims to be valid for {int(expiry - now)} s; "
            f"callcp accepts at most {MAX_SHARE_VALIDITY} s (or the clocks of the two "
            f"hosts differ by more than {CLOCK_SKEW} s)"
        )
