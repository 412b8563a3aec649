"""The known-answer handshake of docs/PROTOCOL.md, byte for byte.

Two checks: (1) the library, given the vector's fixed randomness, emits the
exact recorded bytes; (2) an independent re-derivation written here from the
formulas of docs/PROTOCOL.md (raw cryptography calls, no callcp code) yields
the same secrets and opens the recorded records.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any, Dict

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from tests.helpers import split_frames
from tests.vectors.generate_kat import run, run_client_auth

VECTOR: Dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "handshake_kat.json").read_text()
)
IN = {k: bytes.fromhex(v) for k, v in VECTOR["inputs"].items()}
EXP = VECTOR["expected"]


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    k = serialization.load_pem_private_key(VECTOR["server_private_key_pem"].encode(), None)
    assert isinstance(k, rsa.RSAPrivateKey)
    return k


def test_library_reproduces_the_vector(key: rsa.RSAPrivateKey) -> None:
    oaep, share_signature = (
        bytes.fromhex(VECTOR["encrypted_premaster"]),
        bytes.fromhex(VECTOR["share_signature"]),
    )
    client = serialization.load_pem_private_key(VECTOR["client_private_key_pem"].encode(), None)
    assert isinstance(client, rsa.RSAPrivateKey)
    got = {
        **run(key, oaep, share_signature),
        **run_client_auth(
            key, client, oaep, share_signature, bytes.fromhex(VECTOR["client_auth_signature"])
        ),
    }
    for name in EXP:
        assert got[name] == EXP[name], name


def _hkdf(ikm: bytes, salt: bytes, label: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, b"callcp/2 " + label).derive(ikm)


def _expand(secret: bytes, label: bytes, n: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), n, b"callcp/2 " + label).derive(secret)


def _open(secret: bytes, seq: int, record: bytes) -> bytes:
    key, iv = _expand(secret, b"key", 32), _expand(secret, b"iv", 12)
    nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big")))
    return AESGCM(key).decrypt(nonce, record[5:], record[:5])


def test_independent_derivation_matches(key: rsa.RSAPrivateKey) -> None:
    sh = bytes.fromhex(EXP["server_hello"])
    client_frames = split_frames(bytes.fromhex(EXP["client_flight"]))
    server_frames = split_frames(bytes.fromhex(EXP["server_flight"]))
    ch, c_fin, c_data = client_frames
    s_fin, s_data = server_frames
    assert [sh[0], ch[0], c_fin[0], c_data[0], s_fin[0], s_data[0]] == [
        0x01, 0x02, 0x10, 0x21, 0x10, 0x21,
    ]  # fmt: skip

    # ServerHello layout: magic, versions, random, share, expiry, der, signature, flags
    body = sh[5:]
    assert body[:6] == b"CALLCP" and body[6] == 1 and body[7:9] == b"\x00\x04"
    assert body[9:41] == IN["server_random"]
    server_pub = body[41:73]
    expiry = int.from_bytes(body[73:81], "big")
    assert expiry == VECTOR["share_expiry"]
    der_len = int.from_bytes(body[81:83], "big")
    der = body[83 : 83 + der_len]
    rest = body[83 + der_len :]
    sig_len = int.from_bytes(rest[:2], "big")
    signature = rest[2 : 2 + sig_len]
    assert rest[2 + sig_len :] == b"\x00"  # flags
    assert der == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # the share is signed: RSA-PSS(SHA-256, MGF1-SHA-256, salt 32) over
    # "callcp/2 server share" || 0x00 || share || u64 expiry
    key.public_key().verify(
        signature,
        b"callcp/2 server share\x00" + server_pub + expiry.to_bytes(8, "big"),
        padding.PSS(padding.MGF1(hashes.SHA256()), 32),
        hashes.SHA256(),
    )
    assert server_pub == x25519.X25519PrivateKey.from_private_bytes(
        IN["server_share_private"]
    ).public_key().public_bytes_raw()
    assert VECTOR["client_clock"] <= expiry + 300  # within the clock tolerance
    # ClientHello layout
    cb = ch[5:]
    assert cb[:6] == b"CALLCP" and cb[6:8] == b"\x00\x04"
    assert cb[8:40] == IN["client_random"]
    client_pub = cb[40:72]
    assert int.from_bytes(cb[72:74], "big") == 256
    enc = cb[74:330]
    assert cb[330:] == b"\x00\x00\x00\x00"  # no session ticket, no premaster box
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    assert key.decrypt(enc, oaep) == IN["premaster"]

    dh = x25519.X25519PrivateKey.from_private_bytes(IN["client_x25519_private"]).exchange(
        x25519.X25519PublicKey.from_public_bytes(server_pub)
    )
    dh2 = x25519.X25519PrivateKey.from_private_bytes(IN["server_share_private"]).exchange(
        x25519.X25519PublicKey.from_public_bytes(client_pub)
    )
    assert dh == dh2
    th = hashlib.sha256(sh + ch).digest()
    ikm = dh + IN["premaster"]
    c_traffic = _hkdf(ikm, th, b"c traffic")
    s_traffic = _hkdf(ikm, th, b"s traffic")
    c_fin_key = _hkdf(ikm, th, b"c finished")
    s_fin_key = _hkdf(ikm, th, b"s finished")
    assert c_traffic.hex() == EXP["client_traffic_secret"]
    assert s_traffic.hex() == EXP["server_traffic_secret"]
    assert c_fin_key.hex() == EXP["client_finished_key"]
    assert s_fin_key.hex() == EXP["server_finished_key"]

    # client Finished = HMAC(c_fin_key, SHA256(SH || CH)), record seq 0
    c_verify = _open(c_traffic, 0, c_fin)
    assert c_verify == hmac.new(c_fin_key, th, hashlib.sha256).digest()
    assert _open(c_traffic, 1, c_data) == IN["request"]
    # server Finished over SH || CH || FINISHED-frame(client verify data)
    cf_plain_frame = bytes([0x10]) + len(c_verify).to_bytes(4, "big") + c_verify
    th2 = hashlib.sha256(sh + ch + cf_plain_frame).digest()
    assert _open(s_traffic, 0, s_fin) == hmac.new(s_fin_key, th2, hashlib.sha256).digest()
    assert _open(s_traffic, 1, s_data) == IN["reply"]

    # §12.3: the refusal of the same hellos, MACed with a key from dh alone
    refusal = bytes.fromhex(EXP["refusal"])
    assert refusal[0] == 0x04 and int.from_bytes(refusal[1:5], "big") == len(refusal) - 5
    signed, tag = refusal[5:-32], refusal[-32:]
    assert signed == (10).to_bytes(2, "big") + b"server busy: handshake queue full"
    refusal_key = _hkdf(dh, th, b"refusal")
    assert tag == hmac.new(refusal_key, signed, hashlib.sha256).digest()


def test_the_spec_prints_this_vector() -> None:
    """docs/PROTOCOL.md §12 shows the very bytes pinned here (the spec is
    what a second implementation is written from)."""
    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    section = doc[doc.index("## 12. Known-answer handshake") :]
    joined = "".join(section.split())  # hex blocks are wrapped at 64 columns
    values = [
        *VECTOR["inputs"].values(),
        *VECTOR["resumed_inputs"].values(),
        VECTOR["encrypted_premaster"],
        VECTOR["share_signature"],
        VECTOR["client_auth_signature"],
        str(VECTOR["share_expiry"]),
        *EXP.values(),
    ]
    missing = [v[:16] for v in values if v not in joined]
    assert missing == []


def test_independent_session_records() -> None:
    """§12.1: the records after the handshake, opened with the spec's
    formulas, key update included."""
    import struct

    secret = bytes.fromhex(EXP["client_traffic_secret"])
    message = bytes(i % 251 for i in range(70000))
    stream = bytes.fromhex(VECTOR["session_inputs"]["stream"])
    expected = [
        (0x20, message[:65536]),
        (0x21, message[65536:]),
        (0x30, b""),
        (0x22, struct.pack(">QBH", 100, 1, 7) + b"kat.bin"),
        (0x23, stream),
        (0x24, struct.pack(">Q", 100) + hashlib.sha256(stream).digest()),
        (0x31, b"\x00\x00"),
    ]
    seq = 2  # (FINISHED was 0, the first request 1)
    for record, (kind, plaintext) in zip(
        split_frames(bytes.fromhex(EXP["session_client_records"])), expected, strict=True
    ):
        assert record[0] == kind
        assert _open(secret, seq, record) == plaintext
        seq += 1
        if kind == 0x30:  # KEY_UPDATE: the next secret, seq from 0
            secret, seq = _expand(secret, b"key update", 32), 0


def test_independent_resumed_handshake(key: rsa.RSAPrivateKey) -> None:
    """§12.2: the ticket opens with the documented format, the premaster box
    and the resumed keys follow the formulas of §4.8 and §5."""
    import struct

    r = {k: bytes.fromhex(v) for k, v in VECTOR["resumed_inputs"].items()}
    clock, lifetime = VECTOR["client_clock"], VECTOR["ticket_lifetime"]
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # the first session's resumption secret, from its handshake
    sh = bytes.fromhex(EXP["server_hello"])
    ch = split_frames(bytes.fromhex(EXP["client_flight"]))[0]
    dh = x25519.X25519PrivateKey.from_private_bytes(IN["server_share_private"]).exchange(
        x25519.X25519PublicKey.from_public_bytes(ch[5 + 6 + 2 + 32 : 5 + 6 + 2 + 64])
    )
    resumption = _hkdf(dh + IN["premaster"], hashlib.sha256(sh + ch).digest(), b"resumption")
    assert resumption.hex() == EXP["resumption_secret"]

    def ticket_key(epoch: int) -> AESGCM:
        master = HKDF(hashes.SHA256(), 32, None, b"callcp/2 ticket master").derive(
            r["ticket_master"]
        )
        raw = HKDFExpand(hashes.SHA256(), 32, b"callcp/2 ticket key" + struct.pack(">Q", epoch))
        return AESGCM(raw.derive(master))

    def open_ticket(ticket: bytes, nonce: bytes) -> tuple:
        epoch = int(clock // lifetime)
        assert ticket[:8] == struct.pack(">Q", epoch) and ticket[8:20] == nonce
        plain = ticket_key(epoch).decrypt(nonce, ticket[20:], ticket[:8])
        return struct.unpack(">HQ32sB32s32s", plain)

    ticket = bytes.fromhex(EXP["ticket"])
    assert open_ticket(ticket, r["ticket_nonce"]) == (
        4, int(clock + lifetime), hashlib.sha256(der).digest(), 0, bytes(32), resumption,
    )  # fmt: skip

    rsh = bytes.fromhex(EXP["resumed_server_hello"])
    rch, r_fin, r_data = split_frames(bytes.fromhex(EXP["resumed_client_flight"]))
    body = rch[5:]
    assert body[6:8] == b"\x00\x04" and body[8:40] == r["client_random"]
    client_pub = body[40:72]
    at = 72 + 2 + int.from_bytes(body[72:74], "big")  # past encrypted_premaster
    got_ticket = body[at + 2 : at + 2 + int.from_bytes(body[at : at + 2], "big")]
    assert got_ticket == ticket
    at += 2 + len(got_ticket)
    box = body[at + 2 :]
    assert int.from_bytes(body[at : at + 2], "big") == len(box) == 48
    box_key = HKDFExpand(
        hashes.SHA256(), 32, b"callcp/2 ticket premaster" + r["client_random"]
    ).derive(resumption)
    assert box == AESGCM(box_key).encrypt(bytes(12), r["premaster"], ticket)

    dh2 = x25519.X25519PrivateKey.from_private_bytes(IN["server_share_private"]).exchange(
        x25519.X25519PublicKey.from_public_bytes(client_pub)
    )
    th2 = hashlib.sha256(rsh + rch).digest()
    ikm2 = dh2 + r["premaster"]
    c_traffic = _hkdf(ikm2, th2, b"c traffic")
    s_traffic = _hkdf(ikm2, th2, b"s traffic")
    assert c_traffic.hex() == EXP["resumed_client_traffic_secret"]
    assert s_traffic.hex() == EXP["resumed_server_traffic_secret"]
    c_verify = _open(c_traffic, 0, r_fin)
    assert c_verify == hmac.new(_hkdf(ikm2, th2, b"c finished"), th2, hashlib.sha256).digest()
    assert _open(c_traffic, 1, r_data) == r["request"]
    s_fin, s_ticket, s_data = split_frames(bytes.fromhex(EXP["resumed_server_flight"]))
    assert [s_fin[0], s_ticket[0], s_data[0]] == [0x10, 0x34, 0x21]
    new_ticket = _open(s_traffic, 1, s_ticket)
    assert struct.unpack(">IH", new_ticket[:6]) == (lifetime, len(new_ticket) - 6)
    next_plain = open_ticket(new_ticket[6:], r["next_ticket_nonce"])
    resumed_resumption = _hkdf(ikm2, th2, b"resumption")
    assert next_plain[5] == resumed_resumption  # a ticket for the next connection
    assert _open(s_traffic, 2, s_data) == r["reply"]


def test_independent_client_authentication(key: rsa.RSAPrivateKey) -> None:
    """§12.3 and §4.4: the CLIENT_AUTH record and the FINISHED after it."""
    client = serialization.load_pem_private_key(VECTOR["client_private_key_pem"].encode(), None)
    assert isinstance(client, rsa.RSAPrivateKey)
    sh = bytes.fromhex(EXP["auth_server_hello"])
    assert sh[-1] == 0x01  # flags: client authentication required
    ch, auth, fin, data = split_frames(bytes.fromhex(EXP["auth_client_flight"]))
    assert [auth[0], fin[0], data[0]] == [0x11, 0x10, 0x21]
    client_pub = ch[5 + 6 + 2 + 32 : 5 + 6 + 2 + 64]
    dh = x25519.X25519PrivateKey.from_private_bytes(IN["server_share_private"]).exchange(
        x25519.X25519PublicKey.from_public_bytes(client_pub)
    )
    th = hashlib.sha256(sh + ch).digest()
    ikm = dh + IN["premaster"]
    c_traffic = _hkdf(ikm, th, b"c traffic")
    body = _open(c_traffic, 0, auth)  # client_rsa vec16 | signature vec16
    n = int.from_bytes(body[:2], "big")
    der, rest = body[2 : 2 + n], body[2 + n :]
    signature = rest[2:]
    assert int.from_bytes(rest[:2], "big") == len(signature)
    assert signature.hex() == VECTOR["client_auth_signature"]
    assert der == client.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    client.public_key().verify(
        signature,
        b"callcp/2 client auth\x00" + th,
        padding.PSS(padding.MGF1(hashes.SHA256()), 32),
        hashes.SHA256(),
    )
    auth_frame = bytes([0x11]) + len(body).to_bytes(4, "big") + body
    th_auth = hashlib.sha256(sh + ch + auth_frame).digest()
    c_fin_key = _hkdf(ikm, th, b"c finished")
    assert _open(c_traffic, 1, fin) == hmac.new(c_fin_key, th_auth, hashlib.sha256).digest()
    assert _open(c_traffic, 2, data) == IN["request"]
