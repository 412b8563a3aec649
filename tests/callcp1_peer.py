"""A faithful Callcp 1.0 peer, written from ../shared/CALLCP1-WIRE.md, bugs
included, for testing callcp against the Callcp 1.0 wire format.

- :class:`Callcp1Server`: sends its PEM public key on accept, reads the
  RSA-OAEP-encrypted AES key with ONE ``recv(4096)`` (so a client's first
  message that arrives in the same read breaks the decryption and the
  connection is dropped: Callcp 1.0's server bug), then answers each
  ``recv(4096)`` with the echo of its plaintext.
- :func:`callcp1_request`: the Callcp 1.0 client: one ``recv(4096)`` for the
  PEM (plus one more if its end marker has not arrived), the key sent, then
  each message sent with one ``sendall`` and its reply read with ONE
  ``recv(4096)`` (Callcp 1.0's client bug: a reply split over two reads
  fails).

Nothing here is callcp code: it is the other side.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import List, Optional

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
END_MARKER = b"-----END PUBLIC KEY-----"


def seal(key: bytes, plaintext: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, None)


def open_sealed(key: bytes, data: bytes) -> bytes:
    return AESGCM(key).decrypt(data[:12], data[12:], None)


class Callcp1Server:
    """Callcp 1.0's server on 127.0.0.1 (a thread per connection; echo).
    ``dropped`` counts connections it dropped because the key's read also
    held the first message (its bug); ``served`` counts echoed messages."""

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self.key = private_key
        self.pem = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.dropped = 0
        self.served = 0
        self._lock = threading.Lock()
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(self.pem)
                data = conn.recv(4096)  # (the bug: the key and maybe more, in one read)
                try:
                    aes_key = self.key.decrypt(data, OAEP)
                except ValueError:
                    with self._lock:
                        self.dropped += 1
                    return
                while True:
                    data = conn.recv(4096)
                    if not data:
                        return
                    plaintext = open_sealed(aes_key, data)
                    conn.sendall(seal(aes_key, plaintext))
                    with self._lock:
                        self.served += 1
            except Exception:  # noqa: S110 - (Callcp 1.0 drops the connection)
                return

    def close(self) -> None:
        self._stopped = True
        self.sock.close()


def _key_exchange(sock: socket.socket) -> bytes:
    """Callcp 1.0's client handshake: one recv(4096) for the PEM (one more
    if its end marker is missing), then the AES key, RSA-OAEP encrypted."""
    pem = sock.recv(4096)
    if END_MARKER not in pem:
        pem += sock.recv(4096)
    public = serialization.load_pem_public_key(pem)
    assert isinstance(public, rsa.RSAPublicKey)
    aes_key = os.urandom(32)
    sock.sendall(public.encrypt(aes_key, OAEP))
    return aes_key


def callcp1_request(
    port: int, messages: List[bytes], *, pause: float = 0.0, host: str = "127.0.0.1"
) -> List[bytes]:
    """Callcp 1.0's client: connect, take the server's key, send each message
    and read its reply (one recv each).  ``pause``: seconds between the key
    and the first message (0: none, as Callcp 1.0's own client).

    Raises:
        ValueError, OSError: as Callcp 1.0's client fails (a PEM that does
            not load, a reply that does not decrypt, a closed connection).
    """
    with socket.create_connection((host, port), timeout=10) as sock:
        aes_key = _key_exchange(sock)
        if pause:
            threading.Event().wait(pause)
        replies = []
        for message in messages:
            sock.sendall(seal(aes_key, message))
            data = sock.recv(4096)
            if not data:
                raise ConnectionError("the server closed the connection")
            replies.append(open_sealed(aes_key, data))
        return replies


def callcp1_send(port: int, message: bytes, *, host: str = "127.0.0.1") -> None:
    """A Callcp 1.0 client that sends one message and leaves without
    waiting for the reply (fire and forget)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        aes_key = _key_exchange(sock)
        threading.Event().wait(0.05)
        sock.sendall(seal(aes_key, message))


def first_bytes_of(port: int, timeout: float = 5.0) -> Optional[bytes]:
    """What a server sends first (up to 4096 bytes), or None if nothing in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            return sock.recv(4096)
        except socket.timeout:
            return None
