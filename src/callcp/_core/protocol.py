"""The callcp/2 connection state machines (client and server), sans I/O.

Theory of operation
-------------------
A protocol object owns everything about one connection except the socket.
The adapter loop is always the same::

    proto.receive_data(bytes_from_socket)     # b"" means the peer closed TCP
    while (event := proto.next_event()) is not NEED_DATA:
        ...handle event...
    socket.sendall(proto.data_to_send())

and ``proto.send(message)`` / ``proto.close()`` queue outgoing records.

Incoming bytes are cut into frames (``wire``).  What a frame may do depends
on the state, and the allowed (state, frame type) pairs are the table
``_CLIENT_TABLE`` / ``_SERVER_TABLE`` below; any other pair is a protocol
violation.  The first error of any kind is *fatal*: the object queues a
CLOSE record (or, before keys exist, a plaintext ALERT) telling the peer why,
remembers the error, raises it, and from then on refuses to be used.

Flights (1-RTT, the server speaks first)::

    server:  SERVER_HELLO
    client:  CLIENT_HELLO, [CLIENT_AUTH], FINISHED, DATA...     (one flight)
    server:  FINISHED, DATA...

The client may send data as soon as it has queued its FINISHED: its keys
depend on a premaster secret that only the holder of the server's (verified)
RSA key can decrypt.  It reads the server's FINISHED before any server data,
so nothing is delivered to the application from an unconfirmed handshake.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections import deque
from hmac import compare_digest as hmac_compare
from typing import Any, Callable, Deque, Dict, List, NoReturn, Optional, Tuple, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519

from .errors import (
    CallcpError,
    ClientAuthError,
    CloseCode,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ConnectionLost,
    CryptoError,
    HandshakeAborted,
    HandshakeError,
    LocalProtocolError,
    MessageTooLarge,
    RemoteProtocolError,
    ServerBusy,
    ServerGoingAway,
    ServerKeyError,
    VersionMismatch,
)
from .events import (
    NEED_DATA,
    CloseReceived,
    DecryptionRequested,
    Event,
    HandshakeCompleted,
    MessageReceived,
    NeedData,
    ServerKeyAccepted,
    StreamAborted,
    StreamChunk,
    StreamEnded,
    StreamStarted,
)
from .keys import fingerprint_der, load_public_der, public_der
from .proxy import V1_PREFIX as PROXY_V1_PREFIX
from .proxy import V2_SIGNATURE as PROXY_V2_SIGNATURE
from .records import DEFAULT_KEY_UPDATE_INTERVAL, RecordReceiver, RecordSender
from .schedule import HandshakeSecrets, derive_handshake_secrets, refusal_key
from .shares import SignedShare, check_share, sign_share
from .tickets import (
    MAX_TICKET_BYTES,
    Session,
    TicketKeys,
    box_premaster,
    key_hash,
    open_premaster,
)
from .wire import (
    DELIVERED_UNKNOWN,
    HEADER,
    HEADER_SIZE,
    LEGACY_TRIPWIRE,
    MAX_FRAGMENT,
    MAX_PLAINTEXT_FRAME,
    MAX_RECORD_BODY,
    SUPPORTED_VERSIONS,
    TAG_SIZE,
    ClientHello,
    FrameType,
    ServerHello,
    decode_alert,
    decode_client_auth,
    decode_close,
    decode_new_ticket,
    decode_stream_end,
    decode_stream_start,
    encode_alert,
    encode_client_auth,
    encode_close,
    encode_new_ticket,
    encode_stream_end,
    encode_stream_start,
    frame,
    printable,
    split_versions,
)

__all__ = [
    "State",
    "Entropy",
    "ClientProtocol",
    "ServerProtocol",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "OAEP",
    "PSS",
]

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
#: Received chunks smaller than this are coalesced into one buffer.
COALESCE_BELOW = 16 * 1024

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
CLIENT_AUTH_CONTEXT = b"callcp/2 client auth\x00"
NEXT_KEY_CONTEXT = b"callcp/2 next key\x00"
PREMASTER_SIZE = 32
#: A ServerProtocol given no share signs one of its own, valid this long.
STANDALONE_SHARE_SECONDS = 60
#: A client keeps a session ticket at most this long, whatever the server says.
MAX_TICKET_LIFETIME = 7 * 86400

#: Verifies the server's key: called with (fingerprint, DER) at the
#: ServerHello; raises to refuse.  It may return an action to run once the
#: server has proved that it holds the key (its Finished verified): that is
#: when a trust-on-first-use policy records the key.
ServerKeyVerifier = Callable[[str, bytes], Optional[Callable[[], None]]]
#: Decides whether a client key (by fingerprint) may connect.
ClientAuthorizer = Callable[[str], bool]


class State(enum.Enum):
    WAIT_SERVER_HELLO = "wait ServerHello"
    WAIT_CLIENT_HELLO = "wait ClientHello"
    WAIT_CLIENT_AUTH = "wait client authentication"
    WAIT_CLIENT_FINISHED = "wait client Finished"
    WAIT_SERVER_FINISHED = "wait server Finished"
    WAIT_DECRYPTION = "wait for the premaster's decryption"
    OPEN = "open"
    STREAMING = "open, receiving a stream"
    CLOSED = "closed"  # the peer's authenticated CLOSE arrived
    FAILED = "failed"  # a fatal error happened (either side's fault)


# Module-level names for the states the hot paths test: an enum member
# lookup (``State.OPEN``) costs ten times a global's.
_OPEN = State.OPEN
_DATA_END = FrameType.DATA_END
_STREAMING = State.STREAMING
_CLOSED = State.CLOSED
_FAILED = State.FAILED
_WAIT_DECRYPTION = State.WAIT_DECRYPTION

_HANDSHAKE_STATES = frozenset(
    {
        _WAIT_DECRYPTION,
        State.WAIT_SERVER_HELLO,
        State.WAIT_CLIENT_HELLO,
        State.WAIT_CLIENT_AUTH,
        State.WAIT_CLIENT_FINISHED,
        State.WAIT_SERVER_FINISHED,
    }
)


class Entropy:
    """Every source of randomness the handshake uses, in one replaceable place.

    Tests substitute a deterministic subclass to reproduce the known-answer
    handshake of docs/PROTOCOL.md; production code never does.
    """

    def random(self, n: int) -> bytes:
        import os

        return os.urandom(n)

    def x25519_key(self) -> x25519.X25519PrivateKey:
        return x25519.X25519PrivateKey.generate()

    def oaep_encrypt(self, key: rsa.RSAPublicKey, premaster: bytes) -> bytes:
        return key.encrypt(premaster, OAEP)

    def pss_sign(self, key: rsa.RSAPrivateKey, data: bytes) -> bytes:
        """An RSA-PSS signature (its salt is random)."""
        return key.sign(data, PSS, hashes.SHA256())


#: The first bytes of other protocols a callcp port may meet, and their names.
_FOREIGN = (
    (b"SSH-", "SSH"),
    (b"HTTP/", "HTTP"),
    (b"GET ", "HTTP"),
    (b"POST ", "HTTP"),
    (b"HEAD ", "HTTP"),
    (b"PUT ", "HTTP"),
    (b"OPTIONS ", "HTTP"),
    (b"CONNECT ", "HTTP"),
    (b"PRI * HTTP/2", "HTTP/2"),
    (b"\x16\x03", "TLS"),
    (b"\x15\x03", "TLS"),
    (b"220", "SMTP or FTP"),
    (b"+OK", "POP3"),
    (b"* OK", "IMAP"),
    (b"RFB ", "VNC"),
)


_FOREIGN_PREFIXES = tuple(prefix for prefix, _ in _FOREIGN) + (
    b"-----BEGIN",
    PROXY_V1_PREFIX,
    PROXY_V2_SIGNATURE,
)


def _finished_mac(key: bytes, transcript_hash: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(transcript_hash)
    return h.finalize()


def _verify_finished(key: bytes, transcript_hash: bytes, received: bytes) -> bool:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(transcript_hash)
    try:
        h.verify(received)  # constant-time comparison
    except InvalidSignature:
        return False
    return True


# An exception class chosen by the close code a peer sent during the handshake.
# Only for a sealed CLOSE (authenticated); an ALERT is always HandshakeAborted.
_HANDSHAKE_ERROR_BY_CODE: Dict[int, type] = {
    CloseCode.UNSUPPORTED_VERSION: VersionMismatch,
    CloseCode.UNAUTHORIZED: ClientAuthError,
    CloseCode.UNTRUSTED_KEY: HandshakeError,
    CloseCode.GOING_AWAY: ServerBusy,  # (before its FINISHED: nothing was delivered)
}


def _refusal_tag(dh: bytes, transcript_hash: bytes, code_and_reason: bytes) -> bytes:
    """The MAC that ends a REFUSAL body (§4.10)."""
    mac = hmac.HMAC(refusal_key(dh, transcript_hash), hashes.SHA256())
    mac.update(code_and_reason)
    return mac.finalize()

# Close codes that end a connection cleanly (the peer's choice, not a failure).
_CLEAN_CODES = frozenset({CloseCode.NORMAL, CloseCode.GOING_AWAY})

_HANDSHAKE_RECORDS = frozenset({FrameType.CLIENT_AUTH, FrameType.FINISHED})

# States in which more bytes from the peer can still make events.
_LIVE_STATES = frozenset({State.OPEN, State.STREAMING} | _HANDSHAKE_STATES) - {
    State.WAIT_DECRYPTION
}

# States in which this side may send data (the client from its Finished on).
_SENDING_STATES = frozenset({State.OPEN, State.STREAMING, State.WAIT_SERVER_FINISHED, State.CLOSED})

Handler = Callable[["_Protocol", bytes, bytes], Optional[Event]]


class _Protocol:
    """What the client and server share: framing, records, messages, close."""

    _TABLE: Dict[Tuple[State, int], str] = {}
    _role = ""
    #: Seconds a driver waits after the handshake before the first message
    #: (the Callcp 1.0 client's; none here).
    pause_after_key = 0.0

    def __init__(
        self,
        *,
        max_message_size: int,
        key_update_interval: int,
        entropy: Optional[Entropy],
    ) -> None:
        if max_message_size < 0:
            raise ValueError("max_message_size must be >= 0")
        if key_update_interval < 1:
            raise ValueError("key_update_interval must be >= 1")
        self.max_message_size = max_message_size
        self.key_update_interval = key_update_interval
        self._entropy = entropy or Entropy()
        self.state: State = _FAILED  # set by subclasses
        self.version: Optional[int] = None
        self.peer_fingerprint: Optional[str] = None
        self.error: Optional[CallcpError] = None
        self._close_received: Optional[Tuple[int, str]] = None
        self._close_sent = False
        #: Messages (and streams) handed to this side's application so far,
        #: and sealed for the peer: a GOING_AWAY close tells the peer the
        #: first, so it knows which of its messages went unread (§8).
        self.delivered = 0
        self.sent = 0
        self._peer_delivered: Optional[int] = None  # (from the peer's GOING_AWAY)
        # Received bytes: ``_buf[_pos:]`` then the ``_chunks`` not yet joined
        # (joined only once a whole frame is there: no copy in the common
        # case, and no quadratic re-copying when bytes trickle in).
        # (``_buf`` and the chunks are immutable bytes, or views of them: a
        # view into them stays valid while a record is decrypted from it.)
        self._buf: Union[bytes, bytearray, memoryview] = b""
        self._pos = 0
        self._chunks: Deque[Union[bytes, bytearray, memoryview]] = deque()
        self._chunks_len = 0
        self._eof = False
        self._out: List[bytes] = []
        # Records the receiving side owes the peer (the server's FINISHED, a
        # CLOSE), sealed by the next data_to_send(): whoever writes seals them,
        # so a receiving thread never seals (the sending side owns the record
        # sequence, under the adapter's send lock).
        self._owed: List[Tuple[int, bytes]] = []
        self._peer_closed_first = False
        self._transcript = hashlib.sha256()
        self._secrets: Optional[HandshakeSecrets] = None
        self._sender: Optional[RecordSender] = None
        self._receiver: Optional[RecordReceiver] = None
        self._fragments: List[bytes] = []
        self._fragments_size = 0
        # the stream being received (_STREAMING) / sent
        # (the hashes exist only for streams whose sender asked for a SHA-256)
        self._in_stream_hash: Optional[Any] = None
        self._in_stream_checksum = False
        self._in_stream_length = 0
        self._out_stream_active = False
        self._out_stream_hash: Optional[Any] = None
        self._out_stream_length = 0

    # ---------------------------------------------------------------- public

    @property
    def can_send(self) -> bool:
        """True when ``send`` would succeed."""
        return self._sender is not None and not self._close_sent and self.state in _SENDING_STATES

    @property
    def sending_stream(self) -> bool:
        """True between ``start_stream`` and ``end_stream``/``abort_stream``."""
        return self._out_stream_active

    def receive_data(self, data: Union[bytes, memoryview]) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed TCP."""
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after end of stream")
            return
        if not data:
            self._eof = True
            return
        if self.state is _FAILED or self.state is _CLOSED:
            return  # nothing more is read from a finished connection
        if self._pos >= len(self._buf) and not self._chunks:
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
            return
        # Small reads are copied into one growing buffer: an object kept per
        # read would hold far more memory than the bytes it carries (a peer
        # sending one byte per TCP segment).  Large reads are kept as they are.
        chunks = self._chunks
        if len(data) < COALESCE_BELOW:
            tail = chunks[-1] if chunks else None
            if type(tail) is bytearray:
                tail += data
            else:
                chunks.append(bytearray(data))
        else:
            chunks.append(data if type(data) is bytes else bytes(data))
        self._chunks_len += len(data)

    def receive_message(self, data: Union[bytes, memoryview]) -> Optional[bytes]:
        """``receive_data(data)``, then, when ``data`` is exactly one whole
        one-record message and nothing else is buffered, that message's
        plaintext (an adapter's hot path: the commonest read is one small
        request).  None otherwise: ask :meth:`next_event`.  ``data`` may be a
        view into a buffer the caller reuses: nothing keeps it.

        Raises: as :meth:`next_event` (a record that fails authentication).
        """
        if (
            self.state is _OPEN
            and self._pos >= len(self._buf)
            and not self._chunks
            and not self._fragments
            and not self._close_sent
            and len(data) > HEADER_SIZE
        ):
            ftype, length = HEADER.unpack_from(data)
            if (
                ftype == _DATA_END
                and len(data) == HEADER_SIZE + length
                and TAG_SIZE <= length <= MAX_RECORD_BODY
                and length - TAG_SIZE <= self.max_message_size
            ):
                assert self._receiver is not None
                view = memoryview(data)
                try:
                    message = self._receiver.open(view[:HEADER_SIZE], view[HEADER_SIZE:])
                except CallcpError as exc:
                    self._fail(exc)
                    raise
                self.delivered += 1
                return message
        self.receive_data(data)
        return None

    @property
    def needs_data(self) -> bool:
        """True when ``next_event()`` could only answer NEED_DATA: nothing is
        buffered and the connection is live.  (Lets an adapter read first.)"""
        return (
            self._chunks_len == 0
            and self._pos >= len(self._buf)
            and not self._eof
            and (self.state is _OPEN or self.state in _LIVE_STATES)
        )

    @property
    def partial_message_bytes(self) -> int:
        """Bytes of an incoming message received so far but not yet whole."""
        return self._fragments_size

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events (at most one frame and
        whatever the adapter fed since)."""
        return len(self._buf) - self._pos + self._chunks_len

    def _gather(self, need: int) -> bool:
        """Make ``need`` bytes contiguous at ``_buf[_pos:]``; False if fewer
        have arrived (then nothing is copied)."""
        have = len(self._buf) - self._pos
        if have >= need:
            return True
        if have + self._chunks_len < need:
            return False
        chunks = self._chunks
        if have == 0:  # move on to the next chunk: no copy
            nxt = chunks.popleft()
            self._chunks_len -= len(nxt)
            self._buf, self._pos = nxt, 0
            if len(nxt) >= need:
                return True
            have = len(nxt)
        # Copy exactly the ``need`` bytes that straddle chunks; the rest of the
        # last chunk stays where it is (as a view).
        parts = [self._buf[self._pos :]]
        while have < need:
            chunk = chunks[0]
            take = need - have
            if len(chunk) <= take:
                parts.append(chunks.popleft())
                taken = len(chunk)
            else:
                view = memoryview(chunk)
                parts.append(view[:take])
                chunks[0] = view[take:]
                taken = take
            self._chunks_len -= taken
            have += taken
        self._buf, self._pos = b"".join(parts), 0
        return True

    def next_event(self) -> Union[Event, NeedData]:
        """The next event, or NEED_DATA.

        Raises:
            HandshakeError, RemoteProtocolError (incl. CryptoError,
            MessageTooLarge): the peer broke the protocol; the connection is
            now failed and ``data_to_send()`` holds the close/alert to send.
            ConnectionClosed: the connection is closed or failed already
            (ConnectionClosedOK after the peer's normal CLOSE).
        """
        state = self.state
        if state is _FAILED or state is _CLOSED:
            raise self.closed_error()
        if state is _WAIT_DECRYPTION:
            raise LocalProtocolError("call premaster_decrypted() before asking for more events")
        try:
            if state is _OPEN and not self._fragments and not self._close_sent:
                # Fast path for the commonest frame: a whole one-record message.
                # Same checks and outcome as the table's (OPEN, DATA_END) entry.
                buf, pos = self._buf, self._pos
                if len(buf) - pos >= HEADER_SIZE:
                    ftype, length = HEADER.unpack_from(buf, pos)
                    end = pos + HEADER_SIZE + length
                    if (
                        ftype == _DATA_END
                        and TAG_SIZE <= length <= MAX_RECORD_BODY
                        and end <= len(buf)
                        and length - TAG_SIZE <= self.max_message_size
                    ):
                        assert self._receiver is not None
                        body = memoryview(buf)[pos + HEADER_SIZE : end]
                        data = self._receiver.open(bytes(buf[pos : pos + HEADER_SIZE]), body)
                        if end >= len(buf) and not self._chunks:  # (_consumed, inline)
                            self._buf = b""
                            self._pos = 0
                        else:
                            self._pos = end
                        self.delivered += 1
                        return MessageReceived(data)
            while True:
                frame_ = self._next_frame()
                if frame_ is None:
                    if self._eof:
                        self._on_eof()
                    return NEED_DATA
                event = self._dispatch(*frame_)
                if event is not None:
                    if (
                        self.state is _FAILED
                    ):  # failed meanwhile (another thread): nothing half-made goes out
                        raise self.closed_error()
                    return event
        except CallcpError as exc:
            err = self._fail(exc)
            if err is exc:
                raise
            raise err from exc

    def data_to_send(self) -> bytes:
        """Bytes to write to the socket now (possibly empty)."""
        if self._owed:
            self._seal_owed()
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def data_to_send_parts(self) -> List[bytes]:
        """What ``data_to_send()`` would return, as a list of pieces (for a
        gathering write: large records are not copied into one buffer)."""
        if self._owed:
            self._seal_owed()
        out, self._out = self._out, []
        return out

    def send_bytes(self, message: Union[bytes, bytearray, memoryview]) -> Union[bytes, List[bytes]]:
        """``send(message)`` then what to write, in one step: the adapters'
        hot path.  A small message on an open connection is sealed straight
        into the bytes to write; anything else comes back as
        ``data_to_send_parts()`` (large records are not joined).

        Raises: as :meth:`send`.
        """
        sender = self._sender
        if (
            type(message) is bytes
            and len(message) <= MAX_FRAGMENT
            and self.state is _OPEN
            and sender is not None
            and not self._close_sent
            and not self._out_stream_active
            and not self._out
            and not self._owed
            and sender.seq < self.key_update_interval
        ):
            self.sent += 1
            return sender.seal_one(FrameType.DATA_END, message)
        self._seal_message(message)
        return self.data_to_send_parts()

    def send(self, message: Union[bytes, bytearray, memoryview]) -> None:
        """Queue one message (any size: it is split into 64 KiB records).

        Raises:
            LocalProtocolError: the handshake has not reached the point where
                data may be sent, or the connection is closing.
            ConnectionClosed: the connection is closed or failed.
        """
        out = self.send_bytes(message)
        if isinstance(out, bytes):
            self._out.append(out)
        else:
            self._out.extend(out)  # (what send_bytes took from the queue, back in order)

    def _seal_message(self, message: Union[bytes, bytearray, memoryview]) -> None:
        """The general case of :meth:`send`: checks, then 64 KiB records."""
        self._check_can_send()
        if self._out_stream_active:
            raise LocalProtocolError("send() while a stream is being sent: end it first")
        view = memoryview(message).cast("B")
        total = len(view)
        self.sent += 1
        if total <= MAX_FRAGMENT:
            self._seal(FrameType.DATA_END, view)
            return
        offset = 0
        while offset < total:
            end = offset + MAX_FRAGMENT
            self._seal(FrameType.DATA_END if end >= total else FrameType.DATA, view[offset:end])
            offset = end

    # Streams: payloads of any size, delivered to the receiver chunk by chunk
    # (no max_message_size, no buffering), closed by a STREAM_END carrying the
    # length and SHA-256 that the receiver checks.

    def start_stream(
        self, size: Optional[int] = None, name: str = "", *, checksum: bool = False
    ) -> None:
        """Begin sending a stream; ``size`` (if known) and ``name`` are hints
        for the receiver (progress, file name).  With ``checksum`` the end of
        the stream carries a SHA-256 of its bytes, which the receiver checks
        (the record layer authenticates every byte either way; the digest is
        for applications that want to show or store it, and costs a hash of
        every byte on both sides).

        Raises:
            LocalProtocolError: a stream is already being sent, or sending is
                not possible now.
            ValueError: ``name`` is over 255 bytes of UTF-8 or not printable.
        """
        self._check_can_send()
        if self._out_stream_active:
            raise LocalProtocolError("a stream is already being sent")
        body = encode_stream_start(size, name, checksum)
        self._out_stream_active = True
        self._out_stream_hash = hashlib.sha256() if checksum else None
        self._out_stream_length = 0
        self.sent += 1
        self._seal(FrameType.STREAM_START, body)

    def send_stream_data(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Queue stream bytes (split into 64 KiB records; empty data is a no-op)."""
        self._check_can_send()
        if not self._out_stream_active:
            raise LocalProtocolError("send_stream_data() without start_stream()")
        view = memoryview(data).cast("B")
        if self._out_stream_hash is not None:
            self._out_stream_hash.update(view)
        self._out_stream_length += len(view)
        for offset in range(0, len(view), MAX_FRAGMENT):
            self._seal(FrameType.STREAM_DATA, view[offset : offset + MAX_FRAGMENT])

    def end_stream(self) -> Tuple[int, Optional[bytes]]:
        """Finish the stream; returns its length and SHA-256 (None without
        ``checksum``)."""
        self._check_can_send()
        if not self._out_stream_active:
            raise LocalProtocolError("end_stream() without start_stream()")
        digest = self._out_stream_hash
        result = (self._out_stream_length, digest.digest() if digest is not None else None)
        self._out_stream_active = False
        self._out_stream_hash = None
        self._seal(FrameType.STREAM_END, encode_stream_end(*result))
        return result

    def abort_stream(self, reason: str = "") -> None:
        """Abandon the stream being sent; the receiver discards what it got."""
        self._check_can_send()
        if not self._out_stream_active:
            raise LocalProtocolError("abort_stream() without start_stream()")
        self._out_stream_active = False
        self._out_stream_hash = None
        self._seal(FrameType.STREAM_ABORT, encode_alert(CloseCode.NORMAL, reason))

    def close(
        self, code: int = CloseCode.NORMAL, reason: str = "", *, counted: bool = True
    ) -> None:
        """Queue the authenticated CLOSE (idempotent).  Before keys exist it
        is a plaintext ALERT.  After it, ``send`` is refused and nothing more
        is delivered.  A GOING_AWAY close tells the peer how many of its
        messages were delivered (``counted=False``: "unknown", for a close
        made while another thread may be delivering one)."""
        if self._close_sent or self.state is _FAILED:
            return
        self._close_sent = True
        if self.state in _HANDSHAKE_STATES:
            self.discard_keys()
        if self._sender is not None:
            delivered = self.delivered if counted else DELIVERED_UNKNOWN
            self._owed.append((FrameType.CLOSE, encode_close(code, reason, delivered)))
        else:
            self._out.append(frame(FrameType.ALERT, encode_alert(code, reason)))

    def ping(self) -> bool:
        """Queue a keepalive PING (sealed by the next write); the peer answers
        with a PONG when it next reads.  False if this side cannot send now."""
        if not self.can_send:
            return False
        self._owed.append((FrameType.PING, b""))
        return True

    @property
    def owes(self) -> bool:
        """Records this side owes the peer (a PONG, a CLOSE, the server's
        FINISHED) are waiting for a write."""
        return bool(self._owed)

    def _seal_owed(self) -> None:
        owed, self._owed = self._owed, []
        for ftype, body in owed:
            self._seal(ftype, body)

    def fail(self, exc: CallcpError) -> None:
        """Mark the connection failed because of ``exc`` (a local decision such
        as a timeout) and queue the matching close for the peer."""
        self._fail(exc)

    def closed_error(self) -> ConnectionClosed:
        """The exception for using this connection after it closed or failed."""
        if self._close_received is not None:
            code, reason = self._close_received
            if code == CloseCode.GOING_AWAY:
                delivered = self._peer_delivered
                unread = 0 if delivered is None else self.sent - delivered
                return ServerGoingAway(
                    "the peer closed the connection: going away"
                    + (f" ({reason})" if reason else "")
                    + (f"; it did not read the last {unread} message(s) sent" if unread else ""),
                    code=code,
                    reason=reason,
                    unread=unread,
                )
            if code in _CLEAN_CODES:
                return ConnectionClosedOK(
                    "the peer closed the connection", code=code, reason=reason
                )
            return ConnectionClosedError(
                f"the peer closed the connection: {CloseCode.name(code)}"
                + (f" ({reason})" if reason else ""),
                code=code,
                reason=reason,
            )
        if self.error is not None:
            if isinstance(self.error, ConnectionClosed):
                return self.error
            return ConnectionClosedError(
                f"the connection failed: {self.error}",
                code=getattr(self.error, "code", None),
                reason=str(self.error),
            )
        if self._close_sent:
            return ConnectionClosedOK("the connection was closed locally", code=CloseCode.NORMAL)
        return ConnectionClosedError("the connection is closed")

    # ---------------------------------------------------------------- frames

    def _next_frame(self) -> Optional[Tuple[int, bytes, Union[bytes, memoryview]]]:
        """Cut one whole frame off the buffer: (type, header, body), or None.
        A sealed frame's body is a view into the buffer (decrypted in place)."""
        if not self._gather(HEADER_SIZE):
            if self.state is State.WAIT_SERVER_HELLO and self._first_byte() == 0x2D:
                self._foreign_peer()
            return None
        buf, pos = self._buf, self._pos
        ftype, length = HEADER.unpack_from(buf, pos)
        if self.state in (State.WAIT_SERVER_HELLO, State.WAIT_CLIENT_HELLO) and (
            ftype not in FrameType.NAMES or self._peek(64).startswith(_FOREIGN_PREFIXES)
        ):
            self._foreign_peer()  # (the peer's first bytes: what does it speak?)
        if ftype in FrameType.PLAINTEXT:
            limit = MAX_PLAINTEXT_FRAME
        elif ftype in FrameType.ENCRYPTED:
            limit = MAX_RECORD_BODY
            if length < TAG_SIZE:
                raise RemoteProtocolError(f"record of {length} bytes is shorter than its tag")
        else:
            raise RemoteProtocolError(f"unknown frame type 0x{ftype:02x}")
        if length > limit:
            raise RemoteProtocolError(
                f"{FrameType.NAMES[ftype]} frame announces {length} bytes; the limit is {limit}"
            )
        if not self._gather(HEADER_SIZE + length):
            return None
        buf, pos = self._buf, self._pos
        end = pos + HEADER_SIZE + length
        header = bytes(buf[pos : pos + HEADER_SIZE])
        body: Union[bytes, memoryview]
        if ftype in FrameType.ENCRYPTED:
            body = memoryview(buf)[pos + HEADER_SIZE : end]
        else:
            body = bytes(buf[pos + HEADER_SIZE : end])
        self._consumed(end)
        return ftype, header, body

    def _consumed(self, end: int) -> None:
        """Frames up to ``end`` are handled: advance, and let go of a fully
        read buffer."""
        if end >= len(self._buf) and not self._chunks:
            self._buf = b""
            self._pos = 0
        else:
            self._pos = end

    def _first_byte(self) -> int:
        if self._pos < len(self._buf):
            return self._buf[self._pos]
        return self._chunks[0][0] if self._chunks else -1

    def _peek(self, n: int) -> bytes:
        """Up to ``n`` of the buffered bytes, without consuming them."""
        data = bytes(self._buf[self._pos : self._pos + n])
        for chunk in self._chunks:
            if len(data) >= n:
                break
            data += bytes(chunk[: n - len(data)])
        return data

    def _foreign_peer(self) -> NoReturn:
        """The peer's first bytes are no callcp/2 frame: say what it seems to
        speak (a server on the wrong port, a client of another protocol)."""
        peer = "server" if self.state is State.WAIT_SERVER_HELLO else "client"
        first = self._peek(64)
        spoken = next((name for prefix, name in _FOREIGN if first.startswith(prefix)), None)
        line = first.split(b"\n", 1)[0].rstrip(b"\r")[:60]
        shown = printable(line.decode("utf-8", "replace"))
        if first.startswith((PROXY_V1_PREFIX, PROXY_V2_SIGNATURE)):
            text = (
                "a PROXY protocol header from an address that is not a trusted proxy "
                "(a server takes one only from its trusted_proxies, with proxy_protocol=True)"
            )
        elif first.startswith(b"-----BEGIN"):
            text = (
                f"not a callcp/2 {peer}: it sent a PEM public key, as a Callcp 1.0 server "
                "does; to speak its wire format, connect with protocol='callcp1' "
                "(callcp send --protocol callcp1)"
            )
        elif spoken is None:
            text = f"not a callcp {peer}: its first bytes are not a callcp/2 frame ('{shown}')"
        else:
            text = f"not a callcp {peer}: it speaks {spoken} ('{shown}')"
        err = HandshakeError(text)
        err.code = CloseCode.PROTOCOL_ERROR  # (a fatal protocol error, §4.6)
        raise err

    def _dispatch(
        self, ftype: int, header: bytes, body: Union[bytes, memoryview]
    ) -> Optional[Event]:
        name = self._TABLE.get((self.state, ftype))
        if name is None:
            raise RemoteProtocolError(
                f"unexpected {FrameType.NAMES[ftype]} frame in state '{self.state.value}'"
            )
        plaintext = self._open(header, body) if isinstance(body, memoryview) else body
        handler: Handler = getattr(type(self), name)
        return handler(self, header, plaintext)

    def _open(self, header: bytes, body: Union[bytes, memoryview]) -> bytes:
        assert self._receiver is not None  # guaranteed by the state tables
        try:
            return self._receiver.open(header, body)
        except CryptoError as exc:
            if self.state in _HANDSHAKE_STATES:
                raise HandshakeError(
                    "the peer's handshake record failed authentication: the two sides "
                    "derived different keys (man in the middle, or a key mismatch)"
                ) from exc
            raise

    def _seal(self, ftype: int, plaintext: Union[bytes, memoryview]) -> None:
        if self._owed:  # what the receiving side owes goes first
            self._seal_owed()
        sender = self._sender
        assert sender is not None
        # Roll the key once the interval is reached, but never in the middle
        # of the handshake flight (the peer accepts KEY_UPDATE only when open).
        if sender.seq >= self.key_update_interval and ftype not in _HANDSHAKE_RECORDS:
            sender.seal(FrameType.KEY_UPDATE, b"", self._out)
            sender.update()
        sender.seal(ftype, plaintext, self._out)

    def _check_can_send(self) -> None:
        if self.state is _FAILED or (self.state is _CLOSED and self._peer_closed_first):
            raise self.closed_error()
        if self._close_sent:
            raise LocalProtocolError("send() after close()")
        if not self.can_send:
            raise LocalProtocolError(f"cannot send data in state '{self.state.value}'")

    def _on_eof(self) -> None:
        partial = len(self._buf) - self._pos
        detail = f" ({partial} bytes of an incomplete frame buffered)" if partial else ""
        if self.state is State.WAIT_CLIENT_HELLO and not self.buffered:
            err = HandshakeAborted(
                "the client closed the connection without sending a byte: as a Callcp 1.0 "
                "client does on a callcp/2 ServerHello (serve those with protocol='callcp1' "
                "on a port of their own), or a port check"
            )
            err.without_a_byte = True  # type: ignore[attr-defined]  # (logged at INFO)
            raise err
        if self.state in _HANDSHAKE_STATES:
            raise HandshakeAborted(f"the peer closed the connection during the handshake{detail}")
        if self._close_sent and not self._fragments and self.state is _OPEN:
            # Our own close ended it (the peer's answer may not come): clean.
            raise ConnectionClosedOK("the connection was closed locally", code=CloseCode.NORMAL)
        if self.state is _STREAMING:
            detail = f" in the middle of a stream ({self._in_stream_length} bytes received){detail}"
        raise ConnectionLost(
            "the peer closed TCP without an authenticated close: the stream may have "
            f"been truncated{detail}"
        )

    def _fail(self, exc: CallcpError) -> CallcpError:
        """Make ``exc`` fatal: record it, tell the peer, return what to raise."""
        if self.state in _HANDSHAKE_STATES and isinstance(exc, RemoteProtocolError):
            wrapped = HandshakeError(f"handshake failed: {exc}")
            wrapped.code = exc.code
            wrapped.__cause__ = exc
            exc = wrapped
        if self.state is not _FAILED:
            if not isinstance(exc, ConnectionClosed):
                code = getattr(exc, "code", CloseCode.INTERNAL_ERROR)
                # What we tell the peer: why its bytes were refused, but
                # nothing local (trust decisions, key files name local paths).
                about_peer = isinstance(exc, (RemoteProtocolError, HandshakeError))
                if about_peer and not isinstance(exc, ServerKeyError):
                    reason = str(exc)
                else:
                    reason = CloseCode.name(code)
                self.close(code, reason)
            self.state = _FAILED
            self.error = exc
        self._fragments.clear()
        self._fragments_size = 0
        self._in_stream_hash = None
        self.discard_keys()
        return exc

    def discard_keys(self) -> None:
        """Let go of the handshake's key material now that the connection
        will not complete a handshake (failed, or closed before it): the
        record keys stay, for the close still to be sent and read."""
        if self.state is _FAILED:
            self._secrets = None

    # ------------------------------------------------------- shared handlers

    def _transcript_add(self, ftype: int, body: bytes) -> None:
        self._transcript.update(frame(ftype, body))

    def _on_data(self, header: bytes, body: bytes) -> Optional[Event]:
        if not body:
            raise RemoteProtocolError("empty DATA fragment")
        self._add_fragment(body)
        return None

    def _on_data_end(self, header: bytes, body: bytes) -> Optional[Event]:
        if body:
            self._add_fragment(body)
        data = self._fragments[0] if len(self._fragments) == 1 else b"".join(self._fragments)
        self._fragments.clear()
        self._fragments_size = 0
        if self._close_sent:  # (our CLOSE said how many we took: no more)
            return None
        self.delivered += 1
        return MessageReceived(data)

    def _add_fragment(self, body: bytes) -> None:
        self._fragments_size += len(body)
        if self._fragments_size > self.max_message_size:
            raise MessageTooLarge(
                f"incoming message exceeds max_message_size ({self.max_message_size} bytes)"
            )
        self._fragments.append(body)

    def _on_stream_start(self, header: bytes, body: bytes) -> Optional[Event]:
        if self._fragments:
            raise RemoteProtocolError("STREAM_START in the middle of a message")
        size, name, checksum = decode_stream_start(body)
        self._in_stream_checksum = checksum
        self._in_stream_hash = hashlib.sha256() if checksum else None
        self._in_stream_length = 0
        self.state = _STREAMING
        if self._close_sent:  # (not delivered: its chunks are dropped too)
            self._in_stream_hash = None
            return None
        self.delivered += 1
        return StreamStarted(size, name, checksum)

    def _on_stream_data(self, header: bytes, body: bytes) -> Optional[Event]:
        if not body:
            raise RemoteProtocolError("empty STREAM_DATA record")
        if self._in_stream_hash is not None:
            self._in_stream_hash.update(body)
        self._in_stream_length += len(body)
        return StreamChunk(body) if not self._close_sent else None

    def _on_stream_end(self, header: bytes, body: bytes) -> Optional[Event]:
        if self._close_sent:  # (after our CLOSE: never reported complete)
            self._in_stream_hash = None
            self.state = _OPEN  # (what the peer sends next is dropped as well)
            return None
        length, digest = decode_stream_end(body, self._in_stream_checksum)
        ours = self._in_stream_hash.digest() if self._in_stream_hash is not None else None
        if length != self._in_stream_length or (
            digest is not None and ours is not None and not hmac_compare(digest, ours)
        ):
            raise RemoteProtocolError(
                f"stream integrity check failed: the sender reports {length} bytes, "
                f"{self._in_stream_length} arrived, or their SHA-256 differs"
            )
        self._in_stream_hash = None
        self.state = _OPEN
        return StreamEnded(length, ours)

    def _on_stream_abort(self, header: bytes, body: bytes) -> Optional[Event]:
        if self._close_sent:
            self._in_stream_hash = None
            self.state = _OPEN
            return None
        _, reason = decode_alert(body)
        self._in_stream_hash = None
        self.state = _OPEN
        return StreamAborted(reason)

    def _on_key_update(self, header: bytes, body: bytes) -> Optional[Event]:
        if body:
            raise RemoteProtocolError("KEY_UPDATE record with a body")
        assert self._receiver is not None
        # A key must carry at least one other record before it is replaced:
        # updates are costly to apply, and a legitimate sender updates only
        # after many records.  (seq counts this KEY_UPDATE too.)
        if self._receiver.seq < 2:
            raise RemoteProtocolError("KEY_UPDATE before any record under the current key")
        self._receiver.update()
        return None

    def _on_ping(self, header: bytes, body: bytes) -> Optional[Event]:
        if body:
            raise RemoteProtocolError("PING record with a body")
        pong = (FrameType.PONG, b"")
        if not self._close_sent and pong not in self._owed:  # (one answers many)
            self._owed.append(pong)  # (sealed by the next write)
        return None

    def _on_pong(self, header: bytes, body: bytes) -> Optional[Event]:
        if body:
            raise RemoteProtocolError("PONG record with a body")
        return None  # (the adapter counts any bytes as a sign of life)

    def _on_close(self, header: bytes, body: bytes) -> Optional[Event]:
        code, reason, delivered = decode_close(body)
        if delivered is not None and delivered != DELIVERED_UNKNOWN:
            if delivered > self.sent:
                raise RemoteProtocolError(
                    f"the peer's GOING_AWAY counts {delivered} messages delivered; "
                    f"{self.sent} were sent"
                )
            self._peer_delivered = delivered
        if self.state in _HANDSHAKE_STATES:
            cls = _HANDSHAKE_ERROR_BY_CODE.get(code, HandshakeError)
            if code == CloseCode.GOING_AWAY and delivered != 0:
                # Only a count of 0 proves the flight unread (a server
                # delivers nothing before its FINISHED, which comes first).
                if delivered != DELIVERED_UNKNOWN:
                    raise RemoteProtocolError(
                        f"a GOING_AWAY before the server's FINISHED counts {delivered} "
                        "messages delivered"
                    )
                cls = HandshakeError
            err = cls(f"the peer refused the handshake: {CloseCode.name(code)}: {reason}")
            self._close_received = (code, reason)
            self._close_sent = True  # never answer a refusal
            raise err
        if self._fragments or self.state is _STREAMING:
            # A message or stream was cut short by the close: the message is
            # dropped, never delivered; the stream is reported incomplete.
            what = "stream" if self.state is _STREAMING else "message"
            self._fragments.clear()
            self._fragments_size = 0
            self._in_stream_hash = None
            code = code if code not in _CLEAN_CODES else CloseCode.PROTOCOL_ERROR
            reason = reason or f"closed in the middle of a {what}"
        self._close_received = (code, reason)
        self.state = _CLOSED
        self._peer_closed_first = not self._close_sent
        if not self._close_sent and self._sender is not None:
            self.close(CloseCode.NORMAL, "")
        return CloseReceived(code, reason)

    def _on_alert(self, header: bytes, body: bytes) -> Optional[Event]:
        code, reason = decode_alert(body)
        self._close_sent = True  # never answer an alert
        # Anyone on the path can send one: it selects nothing more specific,
        # and its text (kept in .reason) is not part of the message.
        raise HandshakeAborted(
            f"the handshake was aborted by an unauthenticated alert ({CloseCode.name(code)})",
            code=code,
            reason=reason,
        )


# What an open connection accepts, on both sides.
_OPEN_TABLE: Dict[Tuple[State, int], str] = {
    (State.OPEN, FrameType.DATA): "_on_data",
    (State.OPEN, FrameType.DATA_END): "_on_data_end",
    (State.OPEN, FrameType.STREAM_START): "_on_stream_start",
    (State.OPEN, FrameType.KEY_UPDATE): "_on_key_update",
    (State.OPEN, FrameType.CLOSE): "_on_close",
    (State.STREAMING, FrameType.STREAM_DATA): "_on_stream_data",
    (State.STREAMING, FrameType.STREAM_END): "_on_stream_end",
    (State.STREAMING, FrameType.STREAM_ABORT): "_on_stream_abort",
    (State.STREAMING, FrameType.KEY_UPDATE): "_on_key_update",
    (State.STREAMING, FrameType.CLOSE): "_on_close",
    (State.OPEN, FrameType.PING): "_on_ping",
    (State.OPEN, FrameType.PONG): "_on_pong",
    (State.STREAMING, FrameType.PING): "_on_ping",
    (State.STREAMING, FrameType.PONG): "_on_pong",
}

# ======================================================================= client


class ClientProtocol(_Protocol):
    """The client side of one callcp/2 connection.

    ``verify_server_key(fingerprint, der)`` decides whether to trust the
    server's RSA key; it raises (a ServerKeyError) to refuse.  ``client_key``
    is the client's RSA key for servers that require client authentication.
    """

    _role = "client"

    def __init__(
        self,
        verify_server_key: ServerKeyVerifier,
        *,
        client_key: Optional[rsa.RSAPrivateKey] = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        key_update_interval: int = DEFAULT_KEY_UPDATE_INTERVAL,
        versions: Tuple[int, ...] = SUPPORTED_VERSIONS,
        entropy: Optional[Entropy] = None,
        clock: Callable[[], float] = time.time,
        session: Optional[Session] = None,
        on_ticket: Optional[Callable[[Session], None]] = None,
        on_next_key: Optional[Callable[[str, bytes], None]] = None,
    ) -> None:
        super().__init__(
            max_message_size=max_message_size,
            key_update_interval=key_update_interval,
            entropy=entropy,
        )
        self._session = session  # a ticket to offer (used once)
        self._on_ticket = on_ticket  # where tickets the server issues go
        self._resumption: Optional[bytes] = None  # this connection's resumption secret
        self._next_key_sink = on_next_key  # where a proved next server key goes
        self._th_full: Optional[bytes] = None  # transcript hash through our FINISHED
        self._refusal: Optional[Tuple[bytes, bytes]] = None  # (dh, TH_hello): checks a REFUSAL
        #: The next key the server announced and proved (its fingerprint).
        self.next_server_fingerprint: Optional[str] = None
        #: The ClientHello offered a session ticket (the server may still
        #: have done a full key exchange: a client cannot tell, nor need to).
        self.offered_ticket = False
        self._verify = verify_server_key
        self._on_proved: Optional[Callable[[], None]] = None
        self._client_key = client_key
        self._versions = versions
        self._clock = clock
        self.state = State.WAIT_SERVER_HELLO
        #: The key the server presented (its share's signature verified);
        #: ``peer_fingerprint`` is set only once the server's Finished proved it.
        self.server_fingerprint: Optional[str] = None

    @property
    def awaiting_proof(self) -> bool:
        """A trust-on-first-use policy waits for the server's Finished to
        record its key: the client should read it before it may go away."""
        return self._on_proved is not None

    def _on_server_hello(self, header: bytes, body: bytes) -> Optional[Event]:
        hello = ServerHello.decode(body)
        common = split_versions(hello.versions, self._versions)
        offered = [v for v in hello.versions if v not in LEGACY_TRIPWIRE]  # (shown)
        if not common:
            raise VersionMismatch(
                f"the server offers protocol versions {offered}; "
                f"this client supports {list(self._versions)}"
            )
        if not hello.rsa_public_der:  # (the server offered no version of this layout)
            raise VersionMismatch(
                f"the server offers protocol versions {offered}, whose "
                f"ServerHello this client cannot read; it speaks {list(SUPPORTED_VERSIONS)}"
            )
        self.version = common[0]
        server_key = load_public_der(hello.rsa_public_der, what="server")
        now = self._clock()
        check_share(server_key, hello.x25519_public, hello.share_expiry, hello.share_signature, now)
        fp = fingerprint_der(hello.rsa_public_der)
        try:  # raises ServerKeyError to refuse
            self._on_proved = self._verify(fp, hello.rsa_public_der)
        except CallcpError:
            raise
        except Exception as exc:  # a failing verifier refuses the key, loudly
            raise ServerKeyError(
                f"the server key check failed: {type(exc).__name__}: {exc}"
            ) from exc
        self.server_fingerprint = fp
        if hello.require_client_auth and self._client_key is None:
            raise ClientAuthError(
                "the server requires client authentication; pass a client key (client_key=...)"
            )

        entropy = self._entropy
        eph = entropy.x25519_key()
        try:
            dh = eph.exchange(x25519.X25519PublicKey.from_public_bytes(hello.x25519_public))
        except ValueError as exc:
            raise HandshakeError("the server's X25519 share is invalid") from exc
        premaster = entropy.random(PREMASTER_SIZE)
        try:
            encrypted_premaster = entropy.oaep_encrypt(server_key, premaster)
        except ValueError as exc:  # (load_public_der refuses the keys known to do this)
            raise HandshakeError(f"the server's RSA key cannot encrypt: {exc}") from exc
        client_random = entropy.random(32)
        ticket = box = b""
        session, self._session = self._session, None  # (a ticket is offered once)
        if session is not None and session.server_fingerprint == fp and session.expiry > now:
            ticket = session.ticket
            box = box_premaster(session.secret, client_random, ticket, premaster)
            self.offered_ticket = True
        client_hello = ClientHello(
            version=self.version,
            random=client_random,
            x25519_public=eph.public_key().public_bytes_raw(),
            encrypted_premaster=encrypted_premaster,
            ticket=ticket,
            premaster_box=box,
        )
        ch_frame = client_hello.encode()
        self._transcript_add(FrameType.SERVER_HELLO, body)
        self._transcript.update(ch_frame)
        th = self._transcript.digest()
        secrets = self._secrets = derive_handshake_secrets(dh, premaster, th)
        self._refusal = (dh, th)
        self._resumption = secrets.resumption if self._on_ticket is not None else None
        self._sender = RecordSender(secrets.client_traffic)
        self._receiver = RecordReceiver(secrets.server_traffic)
        self._out.append(ch_frame)

        if hello.require_client_auth:
            assert self._client_key is not None
            signature = self._entropy.pss_sign(self._client_key, CLIENT_AUTH_CONTEXT + th)
            auth = encode_client_auth(public_der(self._client_key), signature)
            self._transcript_add(FrameType.CLIENT_AUTH, auth)
            self._seal(FrameType.CLIENT_AUTH, auth)
        verify_data = _finished_mac(secrets.client_finished, self._transcript.digest())
        self._transcript_add(FrameType.FINISHED, verify_data)
        self._th_full = self._transcript.digest()
        self._seal(FrameType.FINISHED, verify_data)
        self.state = State.WAIT_SERVER_FINISHED
        return ServerKeyAccepted(fp)

    def discard_keys(self) -> None:
        super().discard_keys()
        self._refusal = None

    def _on_refusal(self, header: bytes, body: bytes) -> Optional[Event]:
        """The server declined before its key exchange, and proved it (§4.10)."""
        self._close_sent = True  # never answer a refusal
        if self._refusal is None or len(body) < 2 + 32:
            raise HandshakeError("malformed REFUSAL")
        dh, th = self._refusal
        signed, tag = bytes(body[:-32]), bytes(body[-32:])
        if not hmac_compare(_refusal_tag(dh, th, signed), tag):
            raise HandshakeError("the server's REFUSAL failed authentication")
        code, reason = decode_alert(signed)
        if code != CloseCode.GOING_AWAY:
            raise HandshakeError(f"a REFUSAL with code {code} (only GOING_AWAY is defined)")
        raise ServerBusy(
            "the server declined the connection before its key exchange: "
            + (reason or "going away"),
            reason=reason,
        )

    def _on_new_ticket(self, header: bytes, body: bytes) -> Optional[Event]:
        try:
            lifetime, ticket = decode_new_ticket(body)
        except HandshakeError as exc:
            raise RemoteProtocolError(str(exc)) from None
        on_ticket = self._on_ticket
        if on_ticket is not None and self._resumption is not None:
            if len(ticket) > MAX_TICKET_BYTES:
                return None  # (too large to offer: ignored, not kept)
            self._on_ticket = None  # (one ticket per connection is kept)
            assert self.server_fingerprint is not None
            expiry = self._clock() + min(lifetime, MAX_TICKET_LIFETIME)
            try:
                on_ticket(Session(ticket, self._resumption, self.server_fingerprint, expiry))
            except Exception:  # noqa: S110 - a store that fails costs a later full handshake,
                pass  # never this connection
        return None

    def _on_next_key(self, header: bytes, body: bytes) -> Optional[Event]:
        """The server announces the key it will use next and proves it holds
        it: a signature by that key over the context and this session's
        transcript hash (through the client's FINISHED)."""
        try:
            der, signature = decode_client_auth(body)  # (the same layout)
            next_key = load_public_der(der, what="the announced next")
        except HandshakeError as exc:
            raise RemoteProtocolError(f"NEXT_KEY: {exc}") from None
        assert self._th_full is not None
        try:
            next_key.verify(signature, NEXT_KEY_CONTEXT + self._th_full, PSS, hashes.SHA256())
        except InvalidSignature:
            raise RemoteProtocolError(
                "the server's announced next key is not proved (its signature does not verify)"
            ) from None
        fp = fingerprint_der(der)
        if fp != self.server_fingerprint:
            self.next_server_fingerprint = fp
            if self._next_key_sink is not None:
                self._next_key_sink(fp, der)
        return None

    def _on_server_finished(self, header: bytes, body: bytes) -> Optional[Event]:
        assert self._secrets is not None and self.version is not None
        if not _verify_finished(self._secrets.server_finished, self._transcript.digest(), body):
            raise HandshakeError("the server's Finished MAC does not verify")
        self._secrets = None  # the finished keys are no longer needed
        self._refusal = None
        # The server has now proved it holds the key: only now is it the
        # peer's, and only now does a trust-on-first-use policy record it.
        proved, self._on_proved = self._on_proved, None
        if proved is not None:
            try:
                proved()
            except CallcpError:
                raise
            except Exception as exc:
                raise ServerKeyError(
                    f"recording the server key failed: {type(exc).__name__}: {exc}"
                ) from exc
        self.peer_fingerprint = self.server_fingerprint
        self.state = _OPEN
        return HandshakeCompleted(self.version, self.peer_fingerprint)

    _TABLE = {
        (State.WAIT_SERVER_HELLO, FrameType.SERVER_HELLO): "_on_server_hello",
        (State.WAIT_SERVER_HELLO, FrameType.ALERT): "_on_alert",
        (State.WAIT_SERVER_FINISHED, FrameType.FINISHED): "_on_server_finished",
        (State.WAIT_SERVER_FINISHED, FrameType.ALERT): "_on_alert",
        (State.WAIT_SERVER_FINISHED, FrameType.REFUSAL): "_on_refusal",
        (State.WAIT_SERVER_FINISHED, FrameType.CLOSE): "_on_close",
        (State.OPEN, FrameType.NEW_TICKET): "_on_new_ticket",
        (State.STREAMING, FrameType.NEW_TICKET): "_on_new_ticket",
        (State.OPEN, FrameType.NEXT_KEY): "_on_next_key",
        (State.STREAMING, FrameType.NEXT_KEY): "_on_next_key",
        **_OPEN_TABLE,
    }


# ======================================================================= server


class ServerProtocol(_Protocol):
    """The server side of one callcp/2 connection.

    Call ``start()`` once: it queues the ServerHello.  With
    ``authorize_client`` set, the server requires client authentication and
    admits only the client keys for which it returns True.  With
    ``defer_decryption=True`` the RSA decryption of the premaster is handed
    to the adapter as a DecryptionRequested event (to run off the event loop)
    instead of running inside ``next_event()``.
    """

    _role = "server"

    def __init__(
        self,
        server_key: rsa.RSAPrivateKey,
        *,
        authorize_client: Optional[ClientAuthorizer] = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        key_update_interval: int = DEFAULT_KEY_UPDATE_INTERVAL,
        versions: Tuple[int, ...] = SUPPORTED_VERSIONS,
        entropy: Optional[Entropy] = None,
        server_public_der: Optional[bytes] = None,
        defer_decryption: bool = False,
        share: Optional[SignedShare] = None,
        tickets: Optional[TicketKeys] = None,
        clock: Callable[[], float] = time.time,
        next_key: Optional[rsa.RSAPrivateKey] = None,
        legacy_tripwire: bool = False,
    ) -> None:
        super().__init__(
            max_message_size=max_message_size,
            key_update_interval=key_update_interval,
            entropy=entropy,
        )
        #: Append LEGACY_TRIPWIRE to the ServerHello's versions (§3).
        self.legacy_tripwire = legacy_tripwire
        self._key = server_key
        self._public_der = server_public_der or public_der(server_key)
        self._authorize = authorize_client
        self._versions = versions
        self._eph: Optional[x25519.X25519PrivateKey] = None
        self._peer_share: Optional[x25519.X25519PublicKey] = None
        self._defer_decryption = defer_decryption
        self._share = share
        self._tickets = tickets  # (None: no session tickets issued or accepted)
        self._next_key = next_key  # (announced to every client, proved)
        self._clock = clock
        self._ticket_client: Optional[bytes] = None  # whom an accepted ticket was issued to
        self._client_key_hash: Optional[bytes] = None  # who authenticated, if anyone
        #: The client's session ticket was accepted: no RSA decryption.
        self.resumed = False
        #: A GOING_AWAY before the key exchange is a proved REFUSAL (False:
        #: a plain ALERT; the server's budget for proofs is spent).
        self.refusal_proof = True
        self.state = State.WAIT_CLIENT_HELLO
        self._started = False

    def discard_keys(self) -> None:
        super().discard_keys()
        self._eph = self._peer_share = None

    def close(
        self, code: int = CloseCode.NORMAL, reason: str = "", *, counted: bool = True
    ) -> None:
        """As for both sides; but GOING_AWAY after the ClientHello and before
        the key exchange (a busy or stopping server declining a connection
        waiting for its RSA work) is a REFUSAL the client can authenticate:
        one X25519 exchange, no RSA (§4.10)."""
        eph, share = self._eph, self._peer_share
        if (
            code == CloseCode.GOING_AWAY
            and self.refusal_proof
            and self.state is _WAIT_DECRYPTION
            and eph is not None
            and share is not None
            and not self._close_sent
        ):
            try:
                dh = eph.exchange(share)
            except ValueError:  # (a low-order share: refuse without the proof)
                pass
            else:
                signed = encode_alert(code, reason)
                tag = _refusal_tag(dh, self._transcript.digest(), signed)
                self._close_sent = True
                self.discard_keys()
                self._out.append(frame(FrameType.REFUSAL, signed + tag))
                return
        super().close(code, reason, counted=counted)

    def start(self) -> None:
        """Queue the ServerHello (the server speaks first)."""
        if self._started:
            raise LocalProtocolError("start() called twice")
        self._started = True
        share, self._share = self._share, None
        if share is None:  # (standalone use: a share of its own, signed now)
            now = time.time()
            share = sign_share(
                self._key, self._entropy.x25519_key(), int(now + STANDALONE_SHARE_SECONDS), now
            )
        self._eph = share.private
        hello = ServerHello(
            versions=self._versions + (LEGACY_TRIPWIRE if self.legacy_tripwire else ()),
            random=self._entropy.random(32),
            x25519_public=share.public,
            share_expiry=share.expiry,
            rsa_public_der=self._public_der,
            share_signature=share.signature,
            require_client_auth=self._authorize is not None,
        )
        sh_frame = hello.encode()
        self._transcript.update(sh_frame)
        self._out.append(sh_frame)

    def _on_client_hello(self, header: bytes, body: bytes) -> Optional[Event]:
        if not self._started or self._eph is None:
            raise LocalProtocolError("ServerProtocol.start() was not called")
        hello = ClientHello.decode(body)
        if hello.version not in self._versions:
            raise VersionMismatch(
                f"the client chose protocol version {hello.version}; "
                f"this server offered {list(self._versions)}"
            )
        self.version = hello.version
        try:
            peer_share = x25519.X25519PublicKey.from_public_bytes(hello.x25519_public)
        except ValueError as exc:
            raise HandshakeError("the client's X25519 share is invalid") from exc
        self._transcript_add(FrameType.CLIENT_HELLO, body)
        self._peer_share = peer_share
        premaster = self._resume(hello)
        request = DecryptionRequested(self._key, hello.encrypted_premaster, premaster)
        if self._defer_decryption:
            self.state = _WAIT_DECRYPTION
            return request
        self._finish_key_exchange(request.run())
        return None

    def _resume(self, hello: ClientHello) -> Optional[bytes]:
        """The premaster from the client's session ticket, or None (no
        ticket, or one this server cannot use: stale, forged, another
        server's, another version's).  None falls back to the RSA-OAEP copy:
        a full handshake in the same connection, without an error."""
        if not hello.ticket or self._tickets is None:
            return None
        contents = self._tickets.open(hello.ticket, self._clock(), key_hash(self._public_der))
        if contents is None or contents.version != hello.version:
            return None
        premaster = open_premaster(
            contents.secret, hello.random, hello.ticket, hello.premaster_box
        )
        if premaster is None or len(premaster) != PREMASTER_SIZE:
            return None
        self.resumed = True
        self._ticket_client = contents.client_key_hash
        return premaster

    def premaster_decrypted(self, premaster: Optional[bytes]) -> None:
        """Resume the handshake with ``DecryptionRequested.run()``'s result.

        Raises:
            LocalProtocolError: no decryption was requested.
            HandshakeError: the key exchange failed (the connection is failed).
        """
        if self.state is not _WAIT_DECRYPTION:
            raise LocalProtocolError("premaster_decrypted() without a DecryptionRequested")
        try:
            self._finish_key_exchange(premaster)
        except CallcpError as exc:
            err = self._fail(exc)
            if err is exc:
                raise
            raise err from exc

    def _finish_key_exchange(self, premaster: Optional[bytes]) -> None:
        eph, share = self._eph, self._peer_share  # (another thread may let go of them)
        if eph is None or share is None or self._close_sent:  # (closed meanwhile)
            raise ConnectionClosedError("the connection was closed during the key exchange")
        # Implicit rejection: a premaster that fails to decrypt is replaced by
        # random bytes, so the failure shows only as a Finished mismatch and
        # the server offers no decryption oracle.
        if premaster is None or len(premaster) != PREMASTER_SIZE:
            premaster = self._entropy.random(PREMASTER_SIZE)
        try:
            dh = eph.exchange(share)
        except ValueError as exc:
            raise HandshakeError("the client's X25519 share is invalid") from exc
        finally:
            self._eph = self._peer_share = None  # (the share's key: used once, then let go)
        self._secrets = derive_handshake_secrets(dh, premaster, self._transcript.digest())
        self._sender = RecordSender(self._secrets.server_traffic)
        self._receiver = RecordReceiver(self._secrets.client_traffic)
        self.state = (
            State.WAIT_CLIENT_AUTH if self._authorize is not None else State.WAIT_CLIENT_FINISHED
        )

    def _on_client_auth(self, header: bytes, body: bytes) -> Optional[Event]:
        assert self._authorize is not None
        der, signature = decode_client_auth(body)
        # Cheapest refusal first: the allow list (a hash of the key's bytes),
        # then the key's size and exponent, and only then the RSA check.
        fp = fingerprint_der(der)
        if not self._authorize(fp):
            raise ClientAuthError(f"client key {fp} is not authorized")
        try:
            client_key = load_public_der(der, what="client")
        except HandshakeError as exc:
            raise ClientAuthError(str(exc)) from exc
        try:
            client_key.verify(
                signature, CLIENT_AUTH_CONTEXT + self._transcript.digest(), PSS, hashes.SHA256()
            )
        except InvalidSignature:
            raise ClientAuthError("the client's authentication signature is invalid") from None
        self._client_key_hash = key_hash(der)
        if self.resumed and self._ticket_client not in (None, self._client_key_hash):
            raise ClientAuthError("the session ticket was issued to another client key")
        self.peer_fingerprint = fp
        self._transcript_add(FrameType.CLIENT_AUTH, body)
        self.state = State.WAIT_CLIENT_FINISHED
        return None

    def _on_client_finished(self, header: bytes, body: bytes) -> Optional[Event]:
        assert self._secrets is not None and self.version is not None
        if not _verify_finished(self._secrets.client_finished, self._transcript.digest(), body):
            raise HandshakeError("the client's Finished MAC does not verify")
        self._transcript_add(FrameType.FINISHED, body)
        th_full = self._transcript.digest()
        verify_data = _finished_mac(self._secrets.server_finished, th_full)
        resumption = self._secrets.resumption
        self._secrets = None
        self.state = _OPEN
        self._owed.append((FrameType.FINISHED, verify_data))
        if self._tickets is not None:  # a ticket for the next connection (single use)
            ticket = self._tickets.seal(
                self._clock(), self.version, key_hash(self._public_der),
                self._client_key_hash, resumption,
            )  # fmt: skip
            lifetime = int(self._tickets.lifetime)
            self._owed.append((FrameType.NEW_TICKET, encode_new_ticket(lifetime, ticket)))
        if self._next_key is not None:  # one RSA signature per connection, while announcing
            proof = self._next_key.sign(NEXT_KEY_CONTEXT + th_full, PSS, hashes.SHA256())
            announce = encode_client_auth(public_der(self._next_key), proof)
            self._owed.append((FrameType.NEXT_KEY, announce))
        return HandshakeCompleted(self.version, self.peer_fingerprint)

    _TABLE = {
        (State.WAIT_CLIENT_HELLO, FrameType.CLIENT_HELLO): "_on_client_hello",
        (State.WAIT_CLIENT_HELLO, FrameType.ALERT): "_on_alert",
        (State.WAIT_CLIENT_AUTH, FrameType.CLIENT_AUTH): "_on_client_auth",
        (State.WAIT_CLIENT_FINISHED, FrameType.FINISHED): "_on_client_finished",
        **_OPEN_TABLE,
    }
