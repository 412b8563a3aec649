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

The cores do no I/O and no logging.  They show the connection engine
(``callcp._engine``) the same surface as the callcp/2 cores (``state``,
``receive_data``, ``next_event``, ``data_to_send_parts``, ``send_bytes``,
``close``, ``fail``, ``closed_error``...), so both adapters drive them
unchanged: ``send_bytes`` returns a message's record to write (it does not
queue it), the handshake ends with a HandshakeCompleted (after a
DecryptionRequested with ``defer_decryption``), the peer's end of TCP
between two messages is a CloseReceived, and after a close or a failure
``next_event`` raises.  Callcp 1.0 has no close message, no keepalive and no
streams: ``close`` only ends the session (the driver closes TCP), ``ping``
does nothing, and the stream calls raise LocalProtocolError.  A driver
writes the client's key (``data_to_send()`` after the handshake) on its own,
then waits :data:`PAUSE_AFTER_KEY` (``pause_after_key``) before the first
request: Callcp 1.0's server drops a connection whose key and first request
arrive in one read.  A client trusts the server's key (``verify_server_key``)
when it arrives, but calls what the check returned (a trust-on-first-use
record) only once the first reply authenticated: only the holder of the
private key could have made it.

Within a session, a record whose nonce was already seen (sent by this side,
or received) is refused: a man in the middle cannot reflect a request back
as its reply, or replay an old record.  A receiver tries a record's tag once
each time more of it arrived (at most once per read the driver feeds, each
try about 2 µs for 4 KiB, less than the read itself), so a record that
trickles in is found as soon as it is whole; one that has not verified at
:data:`MAX_RECORD` bytes is refused.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable, Deque, List, Optional, Set, Tuple, Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import keys as _keys
from .errors import (
    CallcpError,
    CloseCode,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ConnectionLost,
    CryptoError,
    HandshakeAborted,
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
from .protocol import State
from .wire import MAGIC, printable

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
#: The nonces a session remembers (the last ones, sent and received).
NONCE_WINDOW = 1024
#: The most bytes buffered from a peer at any time (a key of up to 8192
#: bits, and one record, or the PEM).
MAX_BUFFERED = 1024 + MAX_RECORD

Event = Union[NeedData, HandshakeCompleted, MessageReceived, CloseReceived, DecryptionRequested]
Entropy = Callable[[int], bytes]
#: What a client's key check returns: None, or what to do once the server
#: proved that it holds the key (its first reply authenticated).
Verifier = Callable[[str, bytes], Optional[Callable[[], None]]]

#: What a Callcp 1.0 session lacks (the WARNING each connection logs says so).
MISSING = (
    "no server authentication, no forward secrecy, no replay protection, "
    "no framing (messages of at most 4068 bytes)"
)

_LIVE = frozenset({State.WAIT_SERVER_HELLO, State.WAIT_CLIENT_HELLO, State.OPEN})
NO_STREAMS = (
    "Callcp 1.0 has no streams: send messages of at most 4068 bytes (or move this peer to callcp/2)"
)


class _Legacy:
    """What both sides share: buffers, sealing, accumulating a message, and
    the surface the connection engine drives (see the module docstring)."""

    _role = ""
    #: (the engine's global budget counts partial callcp/2 messages; a
    #: Callcp 1.0 message is at most MAX_RECORD bytes, bounded per connection)
    _fragments_size = 0
    _close_received: Optional[Tuple[int, str]] = None  # (Callcp 1.0 has no close message)
    sending_stream = False
    owes = False
    #: Seconds the driver waits after the client's key (0: none).
    pause_after_key = 0.0

    def __init__(self, entropy: Entropy) -> None:
        self._entropy = entropy
        self._buf = bytearray()
        self._out: List[bytes] = []
        self._eof = False
        self._overflow = False
        self._aes: Optional[AESGCM] = None
        self.state = State.FAILED  # (set by the subclasses)
        self.error: Optional[CallcpError] = None
        self.version: Optional[int] = None
        self.peer_fingerprint: Optional[str] = None
        self._nonces = _NonceWindow()  # (the last nonces of this session, either way)
        self._tried_at = 0  # the record's size at its last tag check
        self._in_flight = False  # a request waits for its reply
        self._pending: Optional[HandshakeCompleted] = None  # handed out by next_event first
        self._close_sent = False
        self._peer_closed = False  # the peer ended the session between two messages
        self.delivered = 0
        self.sent = 0

    # ------------------------------------------------------------ bytes in

    def receive_data(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Bytes read from the peer; ``b""``: it closed the TCP stream."""
        if not data:
            self._eof = True
            return
        if self._eof or self.state is State.FAILED or self.state is State.CLOSED:
            return
        if len(self._buf) + len(data) > MAX_BUFFERED:
            self._overflow = True  # (raised by next_event; nothing more is kept)
            return
        self._buf += data

    def receive_message(self, data: Union[bytes, bytearray, memoryview]) -> Optional[bytes]:
        """``receive_data(data)``; None: ask :meth:`next_event` (the callcp/2
        cores' fast path, which Callcp 1.0 does not need)."""
        self.receive_data(data)
        return None

    @property
    def needs_data(self) -> bool:
        """``next_event()`` could only answer NEED_DATA: read first."""
        return (
            self._pending is None
            and not self._buf
            and not self._eof
            and not self._overflow
            and self.state in _LIVE
        )

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_event(self) -> Event:
        """The next event: the handshake's end (a server with
        ``defer_decryption`` first asks for its RSA decryption), a message,
        the peer's end of the session (CloseReceived), or NEED_DATA.

        Raises:
            HandshakeError, RemoteProtocolError (CryptoError), ConnectionLost:
                the peer failed the session (it is over).
            ConnectionClosed: the session is over already.
            LocalProtocolError: a server before start(), or before its
                decryption's result.
        """
        state = self.state
        if state is State.FAILED or state is State.CLOSED:
            raise self.closed_error()
        pending = self._pending
        if pending is not None:
            self._pending = None
            return pending
        if state is State.WAIT_DECRYPTION:
            raise LocalProtocolError("call premaster_decrypted() before asking for more events")
        try:
            if self._overflow:
                raise RemoteProtocolError(
                    f"the peer sent more than {MAX_BUFFERED} bytes that are no Callcp 1.0 "
                    "record (Callcp 1.0 is strict request/response)"
                )
            return self._next()
        except CallcpError as exc:
            raise self._fail(exc) from None

    def _next(self) -> Event:
        raise NotImplementedError

    # ------------------------------------------------------------ bytes out

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def data_to_send_parts(self) -> List[bytes]:
        out, self._out = self._out, []
        return out

    @property
    def can_send(self) -> bool:
        """True when ``send_bytes`` would succeed."""
        return self._may_send() is None

    def _may_send(self) -> Optional[str]:
        """Why ``send_bytes`` is refused now (None: it is not)."""
        raise NotImplementedError

    def send_bytes(self, message: Union[bytes, bytearray, memoryview]) -> bytes:
        """One message's record, to write (not queued).

        Raises:
            ConnectionClosed: the session is over.
            LocalProtocolError: not now (Callcp 1.0 is strict request/response:
                a client sends one request, then waits for its reply; a
                server only replies to the request it received), or the
                message is over MAX_PLAINTEXT bytes (nothing is sent).
        """
        if self.state is State.FAILED or (self.state is State.CLOSED and not self._close_sent):
            raise self.closed_error()
        if self._close_sent:
            raise LocalProtocolError("send() after close()")
        why = self._may_send()
        if why is not None:
            raise LocalProtocolError(why)
        record = self._seal(message)
        self._in_flight = not self._in_flight
        self.sent += 1
        return record

    def start_stream(self, *args: object, **kwargs: object) -> None:
        raise LocalProtocolError(NO_STREAMS)

    send_stream_data = abort_stream = start_stream

    def end_stream(self) -> Tuple[int, Optional[bytes]]:
        raise LocalProtocolError(NO_STREAMS)

    def ping(self) -> bool:
        """Callcp 1.0 has no keepalive: nothing is sent."""
        return False

    # ------------------------------------------------------------ the end

    def close(
        self, code: int = CloseCode.NORMAL, reason: str = "", *, counted: bool = True
    ) -> None:
        """End the session (idempotent).  Callcp 1.0 has no close message:
        nothing is queued; the driver closes the TCP stream."""
        if self._close_sent or self.state is State.FAILED:
            return
        self._close_sent = True  # (any thread: the reader's buffer is left to the reader)
        self.state = State.CLOSED

    def fail(self, exc: CallcpError) -> None:
        """Mark the session failed because of ``exc`` (a local decision, such
        as a timeout)."""
        self._fail(exc)

    def _fail(self, exc: CallcpError) -> CallcpError:
        if self.state is not State.FAILED:
            self.state = State.FAILED
            self.error = exc
        self._buf.clear()
        self._aes = None
        self._pending = None
        return exc

    def closed_error(self) -> ConnectionClosed:
        """The exception for using this session after it ended."""
        error = self.error
        if error is not None:
            if isinstance(error, ConnectionClosed):
                return error
            return ConnectionClosedError(
                f"the connection failed: {error}",
                code=getattr(error, "code", None),
                reason=str(error),
            )
        if self._peer_closed:
            return ConnectionClosedOK("the peer closed the connection", code=CloseCode.NORMAL)
        if self._close_sent:
            return ConnectionClosedOK("the connection was closed locally", code=CloseCode.NORMAL)
        return ConnectionClosedError("the connection is closed")

    def discard_keys(self) -> None:
        """(the engine's hook) Nothing ephemeral to forget: Callcp 1.0's
        session key goes with the session."""

    # ------------------------------------------------------------ records

    def _seal(self, message: Union[bytes, bytearray, memoryview]) -> bytes:
        assert self._aes is not None
        if len(message) > MAX_PLAINTEXT:
            raise LocalProtocolError(
                f"a Callcp 1.0 message carries at most {MAX_PLAINTEXT} bytes; this one has "
                f"{len(message)} (nothing was sent; callcp/2 has no such limit)"
            )
        nonce = self._entropy(_NONCE)
        while nonce in self._nonces:  # (never one of the window's)
            nonce = self._entropy(_NONCE)
        self._nonces.add(nonce)
        return nonce + self._aes.encrypt(nonce, bytes(message), None)

    def _worth_trying(self, size: int) -> bool:
        """Try the tag now?  Once per size: only when more arrived."""
        if size == self._tried_at:
            return False
        self._tried_at = size
        return True

    def _peer_ended(self) -> CloseReceived:
        """The peer closed TCP between two messages: the session's normal end."""
        self._peer_closed = True
        self.state = State.CLOSED
        return CloseReceived(CloseCode.NORMAL, "")

    def _message(self, whose: str, skip: int = 0) -> Union[bytes, NeedData]:
        """The message accumulated so far, once its tag verifies.  ``skip``:
        up to that many leading CR or LF bytes may precede it (the client's
        first reply: the end of the server's PEM, arrived late)."""
        buf = self._buf
        if len(buf) > MAX_RECORD + skip:  # (whatever its tag says: Callcp 1.0 could not read it)
            raise RemoteProtocolError(
                f"the {whose} sent {len(buf)} bytes where one Callcp 1.0 message "
                f"(at most {MAX_RECORD} bytes) was due"
            )
        if len(buf) >= _NONCE + _TAG and self._worth_trying(len(buf)):
            assert self._aes is not None
            data = bytes(buf)  # (a copy: a close from another thread may clear the buffer)
            starts = [0]
            while len(starts) <= skip and data[starts[-1] : starts[-1] + 1] in (b"\r", b"\n"):
                starts.append(starts[-1] + 1)
            for start in starts:
                record = data[start:]
                try:
                    plaintext = self._aes.decrypt(record[:_NONCE], record[_NONCE:], None)
                except (InvalidTag, ValueError):
                    continue
                nonce = record[:_NONCE]
                if nonce in self._nonces:
                    raise CryptoError(
                        f"the {whose} sent a record seen before in this session "
                        "(a replay, or this side's own record reflected)"
                    )
                self._nonces.add(nonce)
                buf.clear()
                self._tried_at = 0
                self.delivered += 1
                return plaintext
        if len(buf) >= MAX_RECORD + skip:
            raise CryptoError(
                f"the {whose}'s message did not authenticate within {MAX_RECORD} bytes "
                "(a wrong key, or tampering)"
            )
        if self._eof:
            raise ConnectionLost(
                f"the {whose} closed the connection in the middle of a message"
                f" ({len(buf)} bytes of it received)"
            )
        return NEED_DATA


class _NonceWindow:
    """The last :data:`NONCE_WINDOW` nonces of a session (sent and received):
    a record that reuses one is refused (a reflection, a recent replay).
    Bounded, so a long session costs a fixed amount of memory."""

    __slots__ = ("_order", "_set")

    def __init__(self) -> None:
        self._order: Deque[bytes] = deque()
        self._set: Set[bytes] = set()

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._set

    def add(self, nonce: bytes) -> None:
        self._order.append(nonce)
        self._set.add(nonce)
        if len(self._order) > NONCE_WINDOW:
            self._set.discard(self._order.popleft())


class LegacyClient(_Legacy):
    """The client side.  ``verify_server_key(fingerprint, der)`` decides
    whether the server's key is trusted: it raises to refuse it, and may
    return what to do once the server proved it holds the key (its first
    reply authenticated)."""

    _role = "client"
    pause_after_key = PAUSE_AFTER_KEY

    def __init__(
        self,
        verify_server_key: Verifier,
        *,
        entropy: Entropy = os.urandom,
        on_unproved: Optional[Callable[[], None]] = None,
    ) -> None:
        super().__init__(entropy)
        self._verify = verify_server_key
        self._on_proved: Optional[Callable[[], None]] = None
        #: Called at the session's end if what the key check returned (a
        #: trust-on-first-use record) never ran: no reply proved the key.
        self._on_unproved = on_unproved
        self.state = State.WAIT_SERVER_HELLO

    def close(
        self, code: int = CloseCode.NORMAL, reason: str = "", *, counted: bool = True
    ) -> None:
        unproved, self._on_proved = self._on_proved, None
        super().close(code, reason, counted=counted)
        if unproved is not None and self._on_unproved is not None:
            self._on_unproved()

    def _next(self) -> Event:
        if self.state is State.WAIT_SERVER_HELLO:
            return self._server_key()
        buf = self._buf
        if self._in_flight:
            if not buf and self._eof:
                raise ConnectionLost("the server closed the connection before replying")
            got = self._message("server", skip=2 if not self.delivered else 0)
            if isinstance(got, NeedData):
                return got
            self._in_flight = False
            proved, self._on_proved = self._on_proved, None
            if proved is not None:  # only the key's holder could have sealed this reply
                proved()
            return MessageReceived(got)
        if not self.sent:  # (the PEM's last line break, in a read of its own)
            while buf and buf[0] in b"\r\n" and len(buf) <= 2:
                del buf[:1]
        if buf:
            raise RemoteProtocolError("the server sent bytes nobody asked for")
        if self._eof:
            return self._peer_ended()
        return NEED_DATA

    def _server_key(self) -> Event:
        buf = self._buf
        if buf and (buf[0] in (3, 4) or (buf[0] == 1 and buf[5:11] == MAGIC)):
            raise HandshakeError(
                "not a Callcp 1.0 server: it speaks callcp/2 (connect to it without "
                "protocol='callcp1' or --protocol callcp1)"
            )
        end = buf.find(PEM_END)
        if end > MAX_PEM:
            end = -1
        if end < 0:
            if not buf and self._eof:
                raise HandshakeAborted(
                    "the server closed the connection before sending its key (busy?)"
                )
            if len(buf) > MAX_PEM + len(PEM_END) or self._eof:
                shown = printable(bytes(buf[:40]).decode("latin-1"))
                raise HandshakeError(
                    f"not a Callcp 1.0 server: no PEM public key in its first bytes ('{shown}')"
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
            raise HandshakeError("the server's PEM public key does not load") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise HandshakeError("the server's key is not an RSA key")
        problem = _keys.rsa_key_problem(key)
        if problem is not None:
            raise HandshakeError(f"the server's RSA key {problem}")
        if buf:
            raise RemoteProtocolError("the server sent bytes after its key")
        der = _keys.public_der(key)
        fingerprint = _keys.fingerprint_der(der)
        self._on_proved = self._verify(fingerprint, der)  # (raises to refuse the key)
        aes_key = self._entropy(AES_KEY_SIZE)
        self._aes = AESGCM(aes_key)
        self._out.append(key.encrypt(aes_key, OAEP))
        self.peer_fingerprint = fingerprint
        self.version = VERSION
        self.state = State.OPEN
        return HandshakeCompleted(VERSION, fingerprint)

    def _may_send(self) -> Optional[str]:
        if self.state is not State.OPEN:
            return f"cannot send in state '{self.state.value}'"
        if self._in_flight:
            return "Callcp 1.0 is strict request/response: one request, then its reply"
        if self._out:
            return (
                "write the key (data_to_send()) on its own, and wait PAUSE_AFTER_KEY, "
                "before the first request"
            )
        return None


class LegacyServer(_Legacy):
    """The server side, for ``private_key``; ``public_pem`` is sent as it is
    (Callcp 1.0's ``server_public.pem``), else made from the key."""

    _role = "server"

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
        self._started = False
        self.state = State.WAIT_CLIENT_HELLO

    def start(self) -> None:
        """Queue the server's key: the first bytes on the wire."""
        if not self._started:
            self._started = True
            self._out.append(self._pem)

    def _next(self) -> Event:
        if not self._started:
            raise LocalProtocolError("start() the server before asking for events")
        buf = self._buf
        if self.state is State.WAIT_CLIENT_HELLO:
            if len(buf) < self._size:
                if self._eof:
                    raise self._no_key()
                return NEED_DATA
            ciphertext = bytes(buf[: self._size])
            del buf[: self._size]  # (the rest is the first request: kept)
            if self._defer:
                self.state = State.WAIT_DECRYPTION
                return DecryptionRequested(self._key, ciphertext, None)
            try:
                aes_key: Optional[bytes] = self._key.decrypt(ciphertext, OAEP)
            except ValueError:
                aes_key = None
            return self._keyed(aes_key)
        if self._in_flight:
            if buf:
                raise RemoteProtocolError(
                    "the client sent a request before the reply to its last one "
                    "(Callcp 1.0 does not pipeline)"
                )
            if self._eof:  # (it left without waiting for the reply: the session is over)
                return self._peer_ended()
            return NEED_DATA
        if not buf and self._eof:
            return self._peer_ended()
        got = self._message("client")
        if isinstance(got, NeedData):
            return got
        self._in_flight = True
        return MessageReceived(got)

    def _no_key(self) -> CallcpError:
        """The client closed before its whole key: say what it seems to be."""
        buf = self._buf
        if not buf:
            return HandshakeAborted("the client closed the connection before sending its key")
        if buf[0] == 3 and len(buf) >= 7:  # a callcp/2 ALERT (0x03, u32 length, u16 code)
            return HandshakeError(
                "a callcp/2 client: it refused this Callcp 1.0 server (point it at a callcp/2 port)"
            )
        return HandshakeAborted(
            f"the client closed the connection after {len(buf)} of its key's {self._size} bytes"
        )

    def premaster_decrypted(self, aes_key: Optional[bytes]) -> None:
        """(``defer_decryption``) DecryptionRequested.run()'s result (None: it
        failed); the next event is the handshake's end."""
        if self.state is not State.WAIT_DECRYPTION:
            if self.state is State.FAILED:
                return  # (timed out meanwhile: nothing to finish)
            raise LocalProtocolError("premaster_decrypted() without a DecryptionRequested")
        self._pending = self._keyed(aes_key)

    def _keyed(self, aes_key: Optional[bytes]) -> HandshakeCompleted:
        if aes_key is None or len(aes_key) != AES_KEY_SIZE:  # implicit rejection: see the module
            aes_key = self._entropy(AES_KEY_SIZE)
        self._aes = AESGCM(aes_key)
        self.version = VERSION
        self.state = State.OPEN
        return HandshakeCompleted(VERSION, None)

    def _may_send(self) -> Optional[str]:
        if self.state is not State.OPEN or not self._in_flight:
            return "Callcp 1.0 is strict request/response: a server only replies to a request"
        return None
