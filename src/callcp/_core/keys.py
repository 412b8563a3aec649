"""Pure key helpers: encodings and fingerprints (no files, no I/O)."""

from __future__ import annotations

import base64
import hashlib
from typing import Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .errors import HandshakeError

__all__ = [
    "RSA_KEY_SIZES",
    "MIN_RSA_BITS",
    "MAX_RSA_BITS",
    "public_der",
    "fingerprint",
    "fingerprint_der",
    "load_public_der",
]

#: RSA modulus sizes callcp generates; 2048 is the default.
RSA_KEY_SIZES = (2048, 3072, 4096)
#: Peers' keys outside [MIN, MAX] are refused.
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192

AnyRSAKey = Union[rsa.RSAPublicKey, rsa.RSAPrivateKey]


def public_der(key: AnyRSAKey) -> bytes:
    """DER SubjectPublicKeyInfo of an RSA key (public or private)."""
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def fingerprint_der(der: bytes) -> str:
    """``SHA256:<base64, no padding>`` of a DER SubjectPublicKeyInfo, as SSH prints."""
    digest = hashlib.sha256(der).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def fingerprint(key: AnyRSAKey) -> str:
    """The ``SHA256:`` fingerprint of an RSA key (public or private)."""
    return fingerprint_der(public_der(key))


def load_public_der(der: bytes, *, what: str) -> rsa.RSAPublicKey:
    """Parse a peer's DER public key; refuse non-RSA keys and odd sizes.

    Raises:
        HandshakeError: the bytes are not an acceptable RSA public key.
    """
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise HandshakeError(f"{what} public key is not valid DER") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise HandshakeError(f"{what} public key is not an RSA key")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise HandshakeError(
            f"{what} RSA key has {key.key_size} bits; "
            f"callcp accepts {MIN_RSA_BITS} to {MAX_RSA_BITS}"
        )
    return key
