"""The callcp/2 key schedule (HKDF-SHA256), in one screen.

Inputs, after the two hellos:
    dh        = X25519(own ephemeral private, peer ephemeral public)   32 bytes
    premaster = 32 random bytes chosen by the client, sent RSA-OAEP'd
    th        = SHA-256(ServerHello frame || ClientHello frame)

    ikm = dh || premaster
    secret(label) = HKDF-SHA256(salt = th, ikm, info = "callcp/2 " + label, L = 32)

    client_traffic_0 = secret("c traffic")     server_traffic_0 = secret("s traffic")
    client_finished  = secret("c finished")    server_finished  = secret("s finished")
    resumption       = secret("resumption")    (sealed into the session ticket)

A server that declines a connection after the hellos, before its key
exchange (§4.10), proves it with a key from ``dh`` alone:
    refusal_key = HKDF-SHA256(salt = th, dh, info = "callcp/2 refusal", L = 32)

Per traffic secret S (one per direction):
    key = HKDF-Expand(S, "callcp/2 key", 32)       AES-256-GCM key
    iv  = HKDF-Expand(S, "callcp/2 iv", 12)        nonce = iv XOR (0^4 || seq u64)
    next S = HKDF-Expand(S, "callcp/2 key update", 32)   after a KEY_UPDATE record

Both secrets enter every key: a recorded session stays sealed after the RSA key
leaks (the attacker lacks ``dh``) and after an ephemeral leak (lacks
``premaster``).  The transcript hash binds the keys to both randoms, both
ephemeral shares, the version list and the server's RSA key.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

__all__ = [
    "HandshakeSecrets",
    "derive_handshake_secrets",
    "refusal_key",
    "traffic_key_iv",
    "next_secret",
]

LABEL_PREFIX = b"callcp/2 "


def _expand(secret: bytes, label: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, LABEL_PREFIX + label).derive(secret)


@dataclass(frozen=True)
class HandshakeSecrets:
    client_traffic: bytes
    server_traffic: bytes
    client_finished: bytes
    server_finished: bytes
    resumption: bytes  # what a session ticket carries (§4.8)


def derive_handshake_secrets(
    dh: bytes, premaster: bytes, transcript_hash: bytes
) -> HandshakeSecrets:
    ikm = dh + premaster

    def secret(label: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, transcript_hash, LABEL_PREFIX + label).derive(ikm)

    return HandshakeSecrets(
        client_traffic=secret(b"c traffic"),
        server_traffic=secret(b"s traffic"),
        client_finished=secret(b"c finished"),
        server_finished=secret(b"s finished"),
        resumption=secret(b"resumption"),
    )


def refusal_key(dh: bytes, transcript_hash: bytes) -> bytes:
    """The key of a REFUSAL's MAC: only the two holders of ``dh`` have it."""
    return HKDF(hashes.SHA256(), 32, transcript_hash, LABEL_PREFIX + b"refusal").derive(dh)


def traffic_key_iv(secret: bytes) -> tuple[bytes, bytes]:
    return _expand(secret, b"key", 32), _expand(secret, b"iv", 12)


def next_secret(secret: bytes) -> bytes:
    return _expand(secret, b"key update", 32)
