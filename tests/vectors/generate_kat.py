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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa, x25519

from callcp._core.errors import CloseCode
from callcp._core.events import MessageReceived
from callcp._core.keys import fingerprint, public_der
from callcp._core.protocol import OAEP, PSS, ClientProtocol, ServerProtocol
from callcp._core.shares import SignedShare, sign_share
from callcp._core.tickets import Session, TicketKeys, key_hash
from callcp._core.wire import VERSION_4
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
#: The session vector: what the client sends after the handshake, with its
#: key update interval set to 4 records so that a KEY_UPDATE shows.
SESSION = {
    "message": bytes(i % 251 for i in range(70000)),  # two records: DATA, DATA_END
    "stream_name": "kat.bin",
    "stream": bytes(range(100)),
    "key_update_interval": 4,
}
#: The resumed-handshake vector's own randomness, and the ticket key.
RESUMED = {
    "server_random": bytes(range(0xA0, 0xC0)),
    "client_random": bytes(range(0xC0, 0xE0)),
    "client_x25519_private": bytes(range(0xE0, 0x100)),
    "premaster": bytes(range(0x10, 0x30)),
    "ticket_master": bytes(range(0x30, 0x50)),
    "ticket_nonce": bytes(range(0x50, 0x5C)),  # the first ticket's
    "next_ticket_nonce": bytes(range(0x60, 0x6C)),  # the one the resumed server issues
    "request": b"hello again",
    "reply": b"welcome back",
}
TICKET_LIFETIME = 3600
REFUSAL_REASON = "server busy: handshake queue full"
#: The share's expiry (u64 Unix time: 2027-01-15T08:00:00Z) and the client's
#: clock during the handshake (30 s earlier).
SHARE_EXPIRY = 1_800_000_000
CLIENT_CLOCK = SHARE_EXPIRY - 30.0


def share_of(signature: bytes) -> SignedShare:
    private = x25519.X25519PrivateKey.from_private_bytes(INPUTS["server_share_private"])
    public = private.public_key().public_bytes_raw()
    return SignedShare(private, public, SHARE_EXPIRY, signature, CLIENT_CLOCK)


def run_client_auth(
    key: rsa.RSAPrivateKey, client_key: rsa.RSAPrivateKey, oaep: bytes, signature: bytes,
    auth_signature: bytes,
) -> dict:  # fmt: skip
    """The main handshake's inputs, with client authentication required."""
    i = INPUTS
    c = ClientProtocol(
        lambda f, der: None,
        entropy=FixedEntropy(
            [i["premaster"], i["client_random"]], i["client_x25519_private"], oaep, auth_signature
        ),
        clock=lambda: CLIENT_CLOCK,
        client_key=client_key,
    )
    s = ServerProtocol(
        key,
        entropy=FixedEntropy([i["server_random"]], b""),
        share=share_of(signature),
        authorize_client=lambda fp: True,
    )
    s.start()
    server_hello = s.data_to_send()
    c.receive_data(server_hello)
    c.next_event()
    c.send(i["request"])
    client_flight = c.data_to_send()
    s.receive_data(client_flight)
    s.next_event()
    s.next_event()
    s.send(i["reply"])
    return {
        "auth_server_hello": server_hello.hex(),
        "auth_client_flight": client_flight.hex(),
        "auth_server_flight": s.data_to_send().hex(),
    }


class _Capture(FixedEntropy):
    """The main inputs, signing for real and keeping the signature."""

    signature = b""
    signed = b""

    def pss_sign(self, key: rsa.RSAPrivateKey, data: bytes) -> bytes:
        _Capture.signature = super().pss_sign(key, data)
        _Capture.signed = data
        return _Capture.signature


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
    # -- the same hellos, declined before the key exchange (§4.10)
    busy = ServerProtocol(
        key,
        entropy=FixedEntropy([i["server_random"]], b""),
        share=share_of(signature),
        defer_decryption=True,
    )
    busy.start()
    assert busy.data_to_send() == server_hello
    busy.receive_data(client_flight)
    busy.next_event()  # (the DecryptionRequested it will not run)
    busy.close(CloseCode.GOING_AWAY, REFUSAL_REASON)
    refusal = busy.data_to_send()
    c.receive_data(server_flight)
    c.next_event()
    # -- the session: a two-record message, a key update, a stream, CLOSE
    c.key_update_interval = SESSION["key_update_interval"]
    c.send(SESSION["message"])
    c.start_stream(len(SESSION["stream"]), SESSION["stream_name"], checksum=True)
    c.send_stream_data(SESSION["stream"])
    c.end_stream()
    c.close()
    session_c2s = c.data_to_send()
    s.receive_data(session_c2s)
    got = [s.next_event() for _ in range(5)]  # message, start, chunk, end, close
    assert got[0] == MessageReceived(SESSION["message"]), "the session vector"
    # -- a resumed handshake with a ticket for this session
    r = RESUMED
    nonces = [r["ticket_nonce"], r["next_ticket_nonce"]]
    keys = TicketKeys(TICKET_LIFETIME, r["ticket_master"], random=lambda n: nonces.pop(0))
    ticket = keys.seal(CLIENT_CLOCK, VERSION_4, key_hash(public_der(key)), None, secrets.resumption)
    fp_session = Session(ticket, secrets.resumption, fp, CLIENT_CLOCK + TICKET_LIFETIME)
    c2 = ClientProtocol(
        lambda f, der: None,
        entropy=FixedEntropy(
            [r["premaster"], r["client_random"]], r["client_x25519_private"], oaep
        ),
        clock=lambda: CLIENT_CLOCK,
        session=fp_session,
    )
    s2 = ServerProtocol(
        key,
        entropy=FixedEntropy([r["server_random"]], b""),
        share=share_of(signature),
        tickets=keys,
        clock=lambda: CLIENT_CLOCK,
    )
    s2.start()
    resumed_hello = s2.data_to_send()
    c2.receive_data(resumed_hello)
    c2.next_event()
    resumed_secrets = c2._secrets
    c2.send(r["request"])
    resumed_client_flight = c2.data_to_send()
    s2.receive_data(resumed_client_flight)
    s2.next_event()
    s2.next_event()
    assert s2.resumed, "the resumed vector must resume"
    s2.send(r["reply"])
    resumed_server_flight = s2.data_to_send()
    assert resumed_secrets is not None
    return {
        "fingerprint": fp,
        "server_hello": server_hello.hex(),
        "client_flight": client_flight.hex(),
        "server_flight": server_flight.hex(),
        "refusal": refusal.hex(),
        "client_traffic_secret": secrets.client_traffic.hex(),
        "server_traffic_secret": secrets.server_traffic.hex(),
        "client_finished_key": secrets.client_finished.hex(),
        "server_finished_key": secrets.server_finished.hex(),
        "resumption_secret": secrets.resumption.hex(),
        "session_client_records": session_c2s.hex(),
        "ticket": ticket.hex(),
        "resumed_server_hello": resumed_hello.hex(),
        "resumed_client_flight": resumed_client_flight.hex(),
        "resumed_server_flight": resumed_server_flight.hex(),
        "resumed_client_traffic_secret": resumed_secrets.client_traffic.hex(),
        "resumed_server_traffic_secret": resumed_secrets.server_traffic.hex(),
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
    if path.exists():  # (RSA-PSS is randomized: keep the pinned signature)
        signature = bytes.fromhex(old["share_signature"])
    else:
        signature = sign_share(key, share_of(b"").private, SHARE_EXPIRY, CLIENT_CLOCK).signature
    if path.exists() and "client_private_key_pem" in old:
        client_pem = old["client_private_key_pem"]
        loaded = serialization.load_pem_private_key(client_pem.encode(), None)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        client_key = loaded
    else:
        client_key = rsa.generate_private_key(65537, 2048)
        client_pem = client_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    # the client's RSA-PSS signature is randomized: sign once, then pin it
    i = INPUTS
    capture = _Capture([i["premaster"], i["client_random"]], i["client_x25519_private"], oaep)
    c = ClientProtocol(
        lambda f, der: None, entropy=capture, clock=lambda: CLIENT_CLOCK, client_key=client_key
    )
    s = ServerProtocol(
        key,
        entropy=FixedEntropy([i["server_random"]], b""),
        share=share_of(signature),
        authorize_client=lambda fp: True,
    )
    s.start()
    c.receive_data(s.data_to_send())
    c.next_event()
    auth_signature = _Capture.signature
    if path.exists() and "client_auth_signature" in old:  # (pinned, as the share's,
        pinned = bytes.fromhex(old["client_auth_signature"])  # while it signs these hellos)
        try:
            client_key.public_key().verify(pinned, _Capture.signed, PSS, hashes.SHA256())
            auth_signature = pinned
        except InvalidSignature:
            pass
    vector = {
        "inputs": {k: v.hex() for k, v in INPUTS.items()},
        "session_inputs": {
            "message": "bytes(i % 251 for i in range(70000))",
            "stream_name": SESSION["stream_name"],
            "stream": SESSION["stream"].hex(),
            "key_update_interval": SESSION["key_update_interval"],
        },
        "resumed_inputs": {k: v.hex() for k, v in RESUMED.items()},
        "ticket_lifetime": TICKET_LIFETIME,
        "share_expiry": SHARE_EXPIRY,
        "client_clock": CLIENT_CLOCK,
        "server_private_key_pem": pem,
        "encrypted_premaster": oaep.hex(),
        "share_signature": signature.hex(),
        "client_private_key_pem": client_pem,
        "client_auth_signature": auth_signature.hex(),
        "expected": {
            **run(key, oaep, signature),
            **run_client_auth(key, client_key, oaep, signature, auth_signature),
        },
    }
    path.write_text(json.dumps(vector, indent=2) + "\n")
    write_spec_section(vector)


def _wrap(hex_text: str) -> str:
    return "\n".join(textwrap.wrap(hex_text, 64))


def write_spec_section(d: dict) -> None:
    """Rewrite docs/PROTOCOL.md §12 (to the end of the file) from the vector."""
    spec = HERE.parent.parent / "docs" / "PROTOCOL.md"
    text = spec.read_text()
    inp, e, r = d["inputs"], d["expected"], d["resumed_inputs"]
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
resumption_secret       [resumption]        {e["resumption_secret"]}
```

### 12.1 The rest of the session

After the reply, the client (its key update interval set to
{d["session_inputs"]["key_update_interval"]} records) sends a 70,000-byte message whose byte `i` is
`i mod 251`, a stream named `{d["session_inputs"]["stream_name"]}` of the 100 bytes `00 01 .. 63`
with the checksum flag, and a CLOSE (code `NORMAL`, no reason).  Its records,
seq 2 on: DATA, DATA_END, KEY_UPDATE (seq 4, the last under
`client_traffic_0`), then under `client_traffic_1` = HKDF-Expand(
`client_traffic_0`, "callcp/2 key update", 32) from seq 0: STREAM_START,
STREAM_DATA, STREAM_END, CLOSE:

```
{_wrap(e["session_client_records"])}
```

### 12.2 A resumed handshake

The server's ticket key (ticket key file contents) is `ticket_master`; the
first ticket was sealed with the nonce `ticket_nonce` at the client clock
above (epoch = floor(clock / {d["ticket_lifetime"]})), carrying the session's `resumption`
secret and no client key; the resumed server seals its new ticket with the
nonce `next_ticket_nonce`.  The server's share, its signature and the
OAEP ciphertext are the ones above (the server never decrypts it: the
ticket gives it the premaster).

```
server_random            {r["server_random"]}
client_random            {r["client_random"]}
client_x25519_private    {r["client_x25519_private"]}
premaster                {r["premaster"]}
ticket_master            {r["ticket_master"]}
ticket_nonce             {r["ticket_nonce"]}
next_ticket_nonce        {r["next_ticket_nonce"]}
request                  {r["request"]}
reply                    {r["reply"]}

ticket
{_wrap(e["ticket"])}

ServerHello frame
{_wrap(e["resumed_server_hello"])}

client flight: ClientHello (with ticket and premaster_box) | FINISHED | DATA_END(request)
{_wrap(e["resumed_client_flight"])}

server flight: FINISHED | NEW_TICKET | DATA_END(reply)
{_wrap(e["resumed_server_flight"])}

client_traffic_secret   {e["resumed_client_traffic_secret"]}
server_traffic_secret   {e["resumed_server_traffic_secret"]}
```

### 12.3 A refusal

The hellos of §12, but the server declines before its key exchange (§4.10)
with the reason `{REFUSAL_REASON}`:

```
refusal_key  = HKDF(salt = TH_hello, IKM = dh, info = "callcp/2 refusal", L = 32)
REFUSAL frame: code GOING_AWAY | reason | HMAC-SHA256(refusal_key, code || reason)
{_wrap(e["refusal"])}
```

### 12.4 A handshake with client authentication

The inputs of §12, but the server requires client authentication (flags
bit 0).  The client's RSA-2048 key is the PEM `client_private_key_pem` of
the JSON file; its RSA-PSS signature is randomized, so the vector fixes it:

```
client_auth_signature
{_wrap(d["client_auth_signature"])}

ServerHello frame
{_wrap(e["auth_server_hello"])}

client flight: ClientHello | CLIENT_AUTH (seq 0) | FINISHED (seq 1) | DATA_END(request) (seq 2)
{_wrap(e["auth_client_flight"])}

server flight: FINISHED (seq 0) | DATA_END(reply) (seq 1)
{_wrap(e["auth_server_flight"])}
```
"""
    spec.write_text(text[: text.index("## 12. Known-answer handshake")] + section)


if __name__ == "__main__":
    main()
