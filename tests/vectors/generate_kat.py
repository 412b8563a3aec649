"""Regenerate tests/vectors/handshake_kat.json (run once; the test then pins it).

    python tests/vectors/generate_kat.py

The RSA key, the OAEP ciphertext and the share's RSA-PSS signature are
random when made (the first two are kept from the existing vector when there
is one); everything else is fixed.  Re-running it makes a *new* vector: only
do so when the protocol changes on purpose, and update docs/PROTOCOL.md to
match.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, x25519

from callcp._core.keys import fingerprint
from callcp._core.protocol import OAEP, ClientProtocol, ServerProtocol
from callcp._core.shares import SignedShare, sign_share
from tests.helpers import FixedEntropy

HERE = Path(__file__).parent

INPUTS = {
    "server_random": bytes(range(0x00, 0x20)),
    "server_share_private": bytes(range(0x20, 0x40)),
    "client_random": bytes(range(0x40, 0x60)),
    "client_x25519_private": bytes(range(0x60, 0x80)),
    "premaster": bytes(range(0x80, 0xA0)),
    "request": b"hello callcp/2",
    "reply": b"hello client",
}
#: The share's expiry (u64 Unix time: 2027-01-15T08:00:00Z) and the client's
#: clock during the handshake (30 s earlier).
SHARE_EXPIRY = 1_800_000_000
CLIENT_CLOCK = SHARE_EXPIRY - 30.0


def share_of(signature: bytes) -> SignedShare:
    private = x25519.X25519PrivateKey.from_private_bytes(INPUTS["server_share_private"])
    public = private.public_key().public_bytes_raw()
    return SignedShare(private, public, SHARE_EXPIRY, signature, CLIENT_CLOCK)


def run(key: rsa.RSAPrivateKey, oaep: bytes, signature: bytes) -> dict:
    i = INPUTS
    fp = fingerprint(key)
    c = ClientProtocol(
        lambda f, der: None,
        entropy=FixedEntropy(
            [i["premaster"], i["client_random"]], i["client_x25519_private"], oaep
        ),
        clock=lambda: CLIENT_CLOCK,
    )
    s = ServerProtocol(
        key,
        entropy=FixedEntropy([i["server_random"]], b""),
        share=share_of(signature),
    )
    s.start()
    server_hello = s.data_to_send()
    c.receive_data(server_hello)
    c.next_event()
    secrets = c._secrets
    c.send(i["request"])
    client_flight = c.data_to_send()
    s.receive_data(client_flight)
    s.next_event()
    s.next_event()
    s.send(i["reply"])
    server_flight = s.data_to_send()
    assert secrets is not None
    return {
        "fingerprint": fp,
        "server_hello": server_hello.hex(),
        "client_flight": client_flight.hex(),
        "server_flight": server_flight.hex(),
        "client_traffic_secret": secrets.client_traffic.hex(),
        "server_traffic_secret": secrets.server_traffic.hex(),
        "client_finished_key": secrets.client_finished.hex(),
        "server_finished_key": secrets.server_finished.hex(),
    }


def main() -> None:
    path = HERE / "handshake_kat.json"
    if path.exists():  # keep the key (and its fingerprint in the spec)
        old = json.loads(path.read_text())
        pem = old["server_private_key_pem"]
        loaded = serialization.load_pem_private_key(pem.encode(), None)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        key, oaep = loaded, bytes.fromhex(old["encrypted_premaster"])
    else:
        key = rsa.generate_private_key(65537, 2048)
        oaep = key.public_key().encrypt(INPUTS["premaster"], OAEP)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    signature = sign_share(
        key, share_of(b"").private, SHARE_EXPIRY, CLIENT_CLOCK
    ).signature
    vector = {
        "inputs": {k: v.hex() for k, v in INPUTS.items()},
        "share_expiry": SHARE_EXPIRY,
        "client_clock": CLIENT_CLOCK,
        "server_private_key_pem": pem,
        "encrypted_premaster": oaep.hex(),
        "share_signature": signature.hex(),
        "expected": run(key, oaep, signature),
    }
    path.write_text(json.dumps(vector, indent=2) + "\n")
    write_spec_section(vector)


def _wrap(hex_text: str) -> str:
    return "\n".join(textwrap.wrap(hex_text, 64))


def write_spec_section(d: dict) -> None:
    """Rewrite docs/PROTOCOL.md §12 (to the end of the file) from the vector."""
    spec = HERE.parent.parent / "docs" / "PROTOCOL.md"
    text = spec.read_text()
    inp, e = d["inputs"], d["expected"]
    section = f"""## 12. Known-answer handshake

A handshake without client authentication and without a session ticket,
with fixed randomness, in which the client's first request is `hello
callcp/2` and the server's reply is `hello client`.
`tests/vectors/handshake_kat.json` holds the same values (it is made by
`tests/vectors/generate_kat.py`, which also writes this section);
`tests/test_kat.py` checks them against the library and against an
independent re-derivation from this document.

Inputs (hex):

```
server_random            {inp["server_random"]}
server_share_private     {inp["server_share_private"]}
client_random            {inp["client_random"]}
client_x25519_private    {inp["client_x25519_private"]}
premaster                {inp["premaster"]}
request                  {inp["request"]}
reply                    {inp["reply"]}
share_expiry             {d["share_expiry"]} (u64; 2027-01-15T08:00:00Z)
client clock             {int(d["client_clock"])} (30 s before the expiry)
```

The server's RSA-2048 key is the PKCS#8 PEM `server_private_key_pem` of
`tests/vectors/handshake_kat.json` (fingerprint `{e["fingerprint"]}`).
RSA-OAEP and RSA-PSS are randomized, so the vector fixes the ciphertext the
client sends (it decrypts to `premaster` under that key) and the share's
signature (it verifies under that key):

```
encrypted_premaster
{_wrap(d["encrypted_premaster"])}

share_signature
{_wrap(d["share_signature"])}
```

Expected bytes on the wire:

```
ServerHello frame
{_wrap(e["server_hello"])}

client flight: ClientHello | FINISHED (seq 0) | DATA_END(request) (seq 1)
{_wrap(e["client_flight"])}

server flight: FINISHED (seq 0) | DATA_END(reply) (seq 1)
{_wrap(e["server_flight"])}
```

Expected secrets (named as in the JSON file; §5's names in brackets):

```
client_traffic_secret   [client_traffic_0]  {e["client_traffic_secret"]}
server_traffic_secret   [server_traffic_0]  {e["server_traffic_secret"]}
client_finished_key     [client_finished]   {e["client_finished_key"]}
server_finished_key     [server_finished]   {e["server_finished_key"]}
```
"""
    spec.write_text(text[: text.index("## 12. Known-answer handshake")] + section)


if __name__ == "__main__":
    main()
