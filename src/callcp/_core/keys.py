"""Pure key helpers: encodings and fingerprints (no files, no I/O)."""

from __future__ import annotations

import base64
import hashlib
from typing import Optional, Union

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
    "rsa_key_problem",
]

#: RSA modulus sizes callcp generates; 2048 is the default.
RSA_KEY_SIZES = (2048, 3072, 4096)
#: Peers' keys outside [MIN, MAX] are refused.
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
#: The largest public exponent accepted (as BoringSSL's 33-bit cap, a
#: little tighter): a huge exponent makes every signature check and
#: encryption with the key expensive.  callcp's keys use 65537.
MAX_RSA_EXPONENT = 2**32 - 1

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


def rsa_key_problem(key: AnyRSAKey) -> Optional[str]:
    """What makes an RSA key unacceptable to callcp (None: nothing): a
    modulus outside MIN..MAX_RSA_BITS, an even modulus, or a public exponent
    that is even, below 3 or above MAX_RSA_EXPONENT (such keys either fail at
    first use or cost far more than they should)."""
    # (a private key's public half: a key in a token has no private numbers)
    public = key if isinstance(key, rsa.RSAPublicKey) else key.public_key()
    numbers = public.public_numbers()
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        return f"has {key.key_size} bits; callcp accepts {MIN_RSA_BITS} to {MAX_RSA_BITS}"
    if numbers.n % 2 == 0:
        return "has an even modulus (not a product of two odd primes)"
    e = numbers.e
    if e % 2 == 0 or not 3 <= e <= MAX_RSA_EXPONENT:
        shown = str(e) if e.bit_length() <= 64 else f"a {e.bit_length()}-bit number"
        return f"has public exponent {shown}; callcp accepts odd exponents from 3 to 2^32-1"
    return None


def load_public_der(der: bytes, *, what: str) -> rsa.RSAPublicKey:
    """Parse a peer's DER public key; refuse non-RSA keys and malformed or
    odd ones (:func:`rsa_key_problem`).

    Raises:
        HandshakeError: the bytes are not an acceptable RSA public key.
    """
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise HandshakeError(f"{what} public key is not valid DER") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise HandshakeError(f"{what} public key is not an RSA key")
    problem = rsa_key_problem(key)
    if problem is not None:
        raise HandshakeError(f"{what} RSA key {problem}")
    return key
