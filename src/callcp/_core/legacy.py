"""Callcp 1.0's wire format, sans-I/O: the two sides of the opt-in legacy
mode (issue 12; the format is ../shared/CALLCP1-WIRE.md's).

Callcp 1.0 has no framing, no authentication of the server beyond the key
it sends, no forward secrecy and no replay protection; these cores speak it
exactly, and fix what a careful peer can fix on its side:

- **Server.** It sends its PEM public key, then reads *exactly* the
  modulus's size for the RSA-OAEP-encrypted AES key (Callcp 1.0's own
  server reads once, and drops a client whose first message came in the same
  read).  A key that does not decrypt is replaced by a random one (implicit
  rejection, as callcp/2 does): the first message then fails to
  authenticate, so a sender of ciphertexts cannot tell a bad padding from a
  bad message.  Each message is accumulated until its AES-GCM tag verifies,
  at most :data:`MAX_RECORD` bytes (Callcp 1.0 trusts one read).
- **Client.** It takes the server's key once its PEM end marker arrived
  (at most :data:`MAX_PEM` bytes), checks it with the caller's key check,
  sends the encrypted AES key, and accumulates each reply as the server does.
- **Both.** Strict request/response, client first; a message over
  :data:`MAX_PLAINTEXT` bytes is refused before anything is sent (Callcp
  1.0's receiver reads 4,096 bytes at most); the end of the TCP stream
  between messages is the end of the session (there is no close message).

The cores do no I/O and no logging.  ``receive_data``, ``next_event`` and
``data_to_send`` work as those of the callcp/2 cores; ``send_bytes`` returns
a message's record to write (it does not queue it), as there.  After a
close or a failure ``next_event`` raises.  A driver writes the client's
key (``data_to_send()`` after the handshake) on its own, then waits
:data:`PAUSE_AFTER_KEY` before the first request: Callcp 1.0's server
drops a connection whose key and first request arrive in one read.

Within a session, a record whose nonce was already seen (sent by this side,
or received) is refused: a man in the middle cannot reflect a request back
as its reply, or replay an old record.  A receiver tries a record's tag at
most :data:`MAX_ATTEMPTS` times as bytes trickle in, then only as they grow
by :data:`ATTEMPT_STEP` bytes (an honest record arrives in a few reads).
"""

from __future__ import annotations

import enum
import os
from typing import Callable, Optional, Set, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import keys as _keys
from .errors import (
    CloseCode,
    ConnectionClosedError,
    CryptoError,
    HandshakeError,
    LocalProtocolError,
    RemoteProtocolError,
)
from .events import (
    NEED_DATA,
    CloseReceived,
    DecryptionRequested,
    HandshakeCompleted,
    MessageReceived,
    NeedData,
)

__all__ = ["MAX_PEM", "MAX_PLAINTEXT", "MAX_RECORD", "LegacyClient", "LegacyServer"]

#: The most bytes a Callcp 1.0 receiver reads for one message.
MAX_RECORD = 4096
_NONCE, _TAG = 12, 16
#: The largest message Callcp 1.0 can carry.
MAX_PLAINTEXT = MAX_RECORD - _NONCE - _TAG
#: The most bytes of the server's PEM public key a client waits for.
MAX_PEM = 4096
PEM_END = b"-----END PUBLIC KEY-----"
AES_KEY_SIZE = 32
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
#: Callcp 1.0's protocol version number in HandshakeCompleted.
VERSION = 1
#: Seconds a client driver waits between its key and its first request.
PAUSE_AFTER_KEY = 0.05
MAX_ATTEMPTS = 16
ATTEMPT_STEP = 256
#: The most bytes buffered from a peer at any time (a key of up to 8192
#: bits, and one record, or the PEM).
MAX_BUFFERED = 1024 + MAX_RECORD

Event = Union[NeedData, HandshakeCompleted, MessageReceived, CloseReceived, DecryptionRequested]
Entropy = Callable[[int], bytes]


class State(enum.Enum):
    WAIT_KEY = "wait server key"
    WAIT_CLIENT_KEY = "wait client key"
    WAIT_DECRYPTION = "wait decryption"
    NEW = "not started"
    READY = "ready to send"
    WAIT_REPLY = "wait reply"
    WAIT_REQUEST = "wait request"
    REPLYING = "replying"
    CLOSED = "closed"
    FAILED = "failed"


class _Legacy:
    """What both sides share: buffers, sealing, accumulating a message."""

    def __init__(self, entropy: Entropy) -> None:
        self._entropy = entropy
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._aes: Optional[AESGCM] = None
        self.state = State.NEW
        self.error: Optional[Exception] = None
        self._nonces: Set[bytes] = set()  # (nonces seen in this session, either way)
        self._attempts = 0
        self._tried_at = 0

    def receive_data(self, data: Union[bytes, memoryview]) -> None:
        """Bytes read from the peer; ``b""``: it closed the TCP stream."""
        if not data:
            self._eof = True
            return
        if self.state in (State.CLOSED, State.FAILED):
            return
        self._buf += data
        if len(self._buf) > MAX_BUFFERED:
            self._fail(
                RemoteProtocolError(
                    f"the peer sent more than {MAX_BUFFERED} bytes that are no Callcp 1.0 "
                    "record (Callcp 1.0 is strict request/response)"
                )
            )

    def _check_open(self) -> None:
        """(next_event) Raise once the session is over, or before it began."""
        if self.state is State.FAILED:
            assert self.error is not None
            raise self.error
        if self.state is State.CLOSED:
            raise ConnectionClosedError("the Callcp 1.0 session is over")
        if self.state is State.NEW:
            raise LocalProtocolError("start() the server before asking for events")

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def close(self) -> None:
        """End the session (the caller closes the TCP stream: Callcp 1.0 has
        no close message)."""
        if self.state is not State.FAILED:
            self.state = State.CLOSED

    def _fail(self, err: Exception) -> Exception:
        self.state = State.FAILED
        self.error = err
        self._buf.clear()
        return err

    def _seal(self, message: bytes) -> bytes:
        assert self._aes is not None
        if len(message) > MAX_PLAINTEXT:
            raise LocalProtocolError(
                f"a Callcp 1.0 message carries at most {MAX_PLAINTEXT} bytes; this one has "
                f"{len(message)} (nothing was sent; callcp/2 has no such limit)"
            )
        nonce = self._entropy(_NONCE)
        while nonce in self._nonces:  # (never twice in a session)
            nonce = self._entropy(_NONCE)
        self._nonces.add(nonce)
        return nonce + self._aes.encrypt(nonce, bytes(message), None)

    def _worth_trying(self, size: int) -> bool:
        """Try the tag now?  The first MAX_ATTEMPTS times, then each
        ATTEMPT_STEP bytes more (and at MAX_RECORD)."""
        if self._attempts >= MAX_ATTEMPTS and size - self._tried_at < ATTEMPT_STEP:
            return size >= MAX_RECORD
        self._attempts += 1
        self._tried_at = size
        return True

    def _message(self, whose: str) -> Union[bytes, NeedData, CloseReceived]:
        """The message accumulated so far, once its tag verifies.  The end
        of the stream before a message is the end of the session for a
        server (the client left), and an error for a client (no reply)."""
        buf = self._buf
        if not buf:
            if not self._eof:
                return NEED_DATA
            if whose == "server":
                raise self._fail(
                    ConnectionClosedError("the server closed the connection before replying")
                )
            self.state = State.CLOSED
            return CloseReceived(CloseCode.NORMAL, "")
        if len(buf) >= _NONCE + _TAG and self._worth_trying(len(buf)):
            assert self._aes is not None
            view = memoryview(buf)
            try:
                plaintext = self._aes.decrypt(view[:_NONCE], view[_NONCE:], None)
            except InvalidTag:
                plaintext = None
            nonce = bytes(view[:_NONCE])
            view.release()
            if plaintext is not None:
                if nonce in self._nonces:
                    raise self._fail(
                        CryptoError(
                            f"the {whose} sent a record seen before in this session "
                            "(a replay, or this side's own record reflected)"
                        )
                    )
                self._nonces.add(nonce)
                buf.clear()
                self._attempts = self._tried_at = 0
                return plaintext
        if len(buf) >= MAX_RECORD:
            raise self._fail(
                CryptoError(
                    f"the {whose}'s message did not authenticate within {MAX_RECORD} bytes "
                    "(a wrong key, or tampering)"
                )
            )
        if self._eof:
            raise self._fail(
                ConnectionClosedError(
                    f"the {whose} closed the connection in the middle of a message"
                )
            )
        return NEED_DATA


class LegacyClient(_Legacy):
    """The client side.  ``verify_server_key(fingerprint, der)`` decides
    whether the server's key is trusted (it raises to refuse it)."""

    def __init__(
        self,
        verify_server_key: Callable[[str, bytes], object],
        *,
        entropy: Entropy = os.urandom,
    ) -> None:
        super().__init__(entropy)
        self._verify = verify_server_key
        self.peer_fingerprint: Optional[str] = None
        self.state = State.WAIT_KEY
        self._requests = 0

    def next_event(self) -> Event:
        """The next event: the handshake's end, a reply, the end of the session.

        Raises:
            the session's error once it failed; ConnectionClosedError once
            it is over.
        """
        self._check_open()
        if self.state is State.WAIT_KEY:
            return self._server_key()
        if self.state is State.WAIT_REPLY:
            got = self._message("server")
            if isinstance(got, bytes):
                self.state = State.READY
                return MessageReceived(got)
            return got
        if self.state is State.READY:
            if not self._requests:  # (the PEM's last line break, in a read of its own)
                while self._buf and self._buf[0] in b"\r\n":
                    del self._buf[:1]
            if self._buf:
                raise self._fail(RemoteProtocolError("the server sent bytes nobody asked for"))
            if self._eof:
                self.state = State.CLOSED
                return CloseReceived(CloseCode.NORMAL, "")
        return NEED_DATA

    def _server_key(self) -> Event:
        buf = self._buf
        end = buf.find(PEM_END)
        if end > MAX_PEM:
            end = -1
        if end < 0:
            if len(buf) > MAX_PEM + len(PEM_END) or self._eof:
                raise self._fail(
                    HandshakeError("not a Callcp 1.0 server: no PEM public key in its first bytes")
                )
            return NEED_DATA
        end += len(PEM_END)
        pem = bytes(buf[:end])
        del buf[:end]
        while buf and buf[0] in b"\r\n":
            del buf[:1]
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError):
            raise self._fail(HandshakeError("the server's PEM public key does not load")) from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise self._fail(HandshakeError("the server's key is not an RSA key"))
        problem = _keys.rsa_key_problem(key)
        if problem is not None:
            raise self._fail(HandshakeError(f"the server's RSA key {problem}"))
        if buf:
            raise self._fail(RemoteProtocolError("the server sent bytes after its key"))
        der = _keys.public_der(key)
        fingerprint = _keys.fingerprint_der(der)
        try:
            self._verify(fingerprint, der)
        except Exception as exc:
            raise self._fail(exc) from None
        aes_key = self._entropy(AES_KEY_SIZE)
        self._aes = AESGCM(aes_key)
        self._out += key.encrypt(aes_key, OAEP)
        self.peer_fingerprint = fingerprint
        self.state = State.READY
        return HandshakeCompleted(VERSION, fingerprint)

    def send_bytes(self, message: bytes) -> bytes:
        """One request's record, to write (not queued).

        Raises:
            LocalProtocolError: not now (before the handshake; before the
                key was taken with data_to_send(), to be written on its own;
                before the last request's reply: Callcp 1.0 is strict
                request/response), or the message is over MAX_PLAINTEXT bytes.
        """
        if self.state is not State.READY:
            raise LocalProtocolError(
                "Callcp 1.0 is strict request/response: one request, then its reply"
                if self.state is State.WAIT_REPLY
                else f"cannot send in state {self.state.value!r}"
            )
        if self._out:
            raise LocalProtocolError(
                "write the key (data_to_send()) on its own, and wait PAUSE_AFTER_KEY, "
                "before the first request"
            )
        record = self._seal(message)
        self._requests += 1
        self.state = State.WAIT_REPLY
        return record


class LegacyServer(_Legacy):
    """The server side, for ``private_key``; ``public_pem`` is sent as it is
    (Callcp 1.0's ``server_public.pem``), else made from the key."""

    def __init__(
        self,
        private_key: rsa.RSAPrivateKey,
        public_pem: Optional[bytes] = None,
        *,
        defer_decryption: bool = False,
        entropy: Entropy = os.urandom,
    ) -> None:
        super().__init__(entropy)
        self._key = private_key
        self._size = (private_key.key_size + 7) // 8
        own = private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if public_pem is not None:
            try:
                given = serialization.load_pem_public_key(public_pem)
            except (ValueError, TypeError):
                raise LocalProtocolError(
                    "public_pem is not a PEM public key (SubjectPublicKeyInfo)"
                ) from None
            if (
                not public_pem.lstrip().startswith(b"-----BEGIN PUBLIC KEY-----")
                or not isinstance(given, rsa.RSAPublicKey)
                or _keys.public_der(given) != _keys.public_der(private_key.public_key())
            ):
                raise LocalProtocolError("public_pem is not the private key's public key")
        self._pem = public_pem or own
        self._defer = defer_decryption
        self.peer_fingerprint: Optional[str] = None

    def start(self) -> None:
        """Queue the server's key: the first bytes on the wire."""
        self._out += self._pem
        self.state = State.WAIT_CLIENT_KEY

    def next_event(self) -> Event:
        """The next event: the handshake's end (or, with ``defer_decryption``,
        a DecryptionRequested first), a request, the end of the session.

        Raises:
            the session's error once it failed; ConnectionClosedError once
            it is over; LocalProtocolError before start().
        """
        self._check_open()
        if self.state is State.WAIT_CLIENT_KEY:
            if len(self._buf) < self._size:
                if self._eof:
                    raise self._fail(
                        ConnectionClosedError("the client closed the connection before its key")
                    )
                return NEED_DATA
            ciphertext = bytes(self._buf[: self._size])
            del self._buf[: self._size]  # (the rest is the first request: kept)
            if self._defer:
                self.state = State.WAIT_DECRYPTION
                return DecryptionRequested(self._key, ciphertext, None)
            try:
                aes_key: Optional[bytes] = self._key.decrypt(ciphertext, OAEP)
            except ValueError:
                aes_key = None
            return self._keyed(aes_key)
        if self.state is State.WAIT_REQUEST:
            got = self._message("client")
            if isinstance(got, bytes):
                self.state = State.REPLYING
                return MessageReceived(got)
            return got
        if self.state is State.REPLYING and self._buf:
            raise self._fail(
                RemoteProtocolError(
                    "the client sent a request before the reply to its last one "
                    "(Callcp 1.0 does not pipeline)"
                )
            )
        return NEED_DATA

    def premaster_decrypted(self, aes_key: Optional[bytes]) -> HandshakeCompleted:
        """(``defer_decryption``) DecryptionRequested.run()'s result: the
        handshake's end."""
        if self.state is not State.WAIT_DECRYPTION:
            raise LocalProtocolError("premaster_decrypted() without a DecryptionRequested")
        return self._keyed(aes_key)

    def _keyed(self, aes_key: Optional[bytes]) -> HandshakeCompleted:
        if aes_key is None or len(aes_key) != AES_KEY_SIZE:  # implicit rejection: see the module
            aes_key = self._entropy(AES_KEY_SIZE)
        self._aes = AESGCM(aes_key)
        self.state = State.WAIT_REQUEST
        return HandshakeCompleted(VERSION, None)

    def send_bytes(self, message: bytes) -> bytes:
        """The reply's record, to write (not queued), to the request just received.

        Raises:
            LocalProtocolError: no request waits for a reply, or the reply
                is over MAX_PLAINTEXT bytes.
        """
        if self.state is not State.REPLYING:
            raise LocalProtocolError(
                "Callcp 1.0 is strict request/response: a server only replies to a request"
            )
        record = self._seal(message)
        self.state = State.WAIT_REQUEST
        return record
