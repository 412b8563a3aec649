"""The callcp exception hierarchy: one tree for the whole library.

Callcp 1.0 had two trees of the same names, one rooted at
``SecureTCPServerError`` (server side) and one at ``SecureTCPClientError``
(client side).  Code written for it catches either root around either side,
so here every concrete error derives from *both* roots through
:class:`CallcpError`'s children::

    CallcpError
    ├── SecureTCPServerError ─┐
    ├── SecureTCPClientError ─┤ (both are bases of everything below)
    │   ├── KeyManagementError        bad, unreadable or mismatched key files
    │   ├── HandshakeError            the handshake could not complete
    │   │   ├── VersionMismatch       no protocol version in common
    │   │   ├── ServerKeyError        the server's key is not trusted
    │   │   │   ├── UnknownServerKey  no pin, no known-hosts entry, no TOFU
    │   │   │   ├── ServerKeyChanged  the key differs from the pin/known host
    │   │   │   └── ServerKeyRevoked  the key is marked @revoked
    │   │   ├── ClientAuthError       client authentication failed/refused
    │   │   ├── HandshakeTimeout   R
    │   │   ├── HandshakeAborted   R  an unauthenticated alert, or TCP ended
    │   │   └── ServerBusy         R  the server declined (authenticated)
    │   ├── CryptoError               a record failed authentication
    │   ├── RemoteProtocolError       the peer sent bytes that break the rules
    │   │   └── MessageTooLarge       a message over the configured maximum
    │   ├── StreamAbortedError        the sender abandoned a stream
    │   ├── TransportError            the connection itself
    │   │   ├── ConnectionRefused  R  nothing listening, no route to the host
    │   │   ├── ConnectionClosed      the connection is closed (see .code)
    │   │   │   ├── ConnectionClosedOK     with an authenticated close
    │   │   │   │   └── ServerGoingAway R  the server's close: GOING_AWAY
    │   │   │   └── ConnectionClosedError  broken, truncated, or failed
    │   │   │       └── ConnectionLost  R  TCP ended without a close (reset, FIN)
    │   │   │           └── PeerUnresponsive R  no answer to a keepalive PING
    │   │   └── CallcpTimeout      R  an I/O deadline passed
    │   └── LocalProtocolError        the caller misused the API
    │       ├── StreamPending         recv() met a stream: use recv_stream()
    │       └── MessagePending        recv_stream() met a message: use recv()

The classes marked R are also :class:`RetryableError` (``.retryable`` is
True): the same operation, tried again later (on a new connection), may
succeed.  Whether a *request* may be sent again is another question: only
when the server cannot have received it (see ``docs/reliability.md``).

Errors say whose fault it was (the h11 split): ``RemoteProtocolError`` and
``CryptoError`` mean the peer (or an attacker on the path) sent bad bytes;
``LocalProtocolError`` means this program called the API wrongly.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "CallcpError",
    "SecureTCPServerError",
    "SecureTCPClientError",
    "KeyManagementError",
    "HandshakeError",
    "VersionMismatch",
    "ServerKeyError",
    "UnknownServerKey",
    "ServerKeyChanged",
    "ServerKeyRevoked",
    "ClientAuthError",
    "HandshakeTimeout",
    "HandshakeAborted",
    "ServerBusy",
    "RetryableError",
    "ConnectionRefused",
    "ServerGoingAway",
    "ConnectionLost",
    "PeerUnresponsive",
    "CryptoError",
    "RemoteProtocolError",
    "MessageTooLarge",
    "TransportError",
    "ConnectionClosed",
    "ConnectionClosedOK",
    "ConnectionClosedError",
    "CallcpTimeout",
    "LocalProtocolError",
    "StreamAbortedError",
    "StreamPending",
    "MessagePending",
    "CloseCode",
]


class CloseCode:
    """Codes carried by CLOSE records and plaintext alerts (u16 on the wire)."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    HANDSHAKE_FAILURE = 2
    UNSUPPORTED_VERSION = 3
    UNTRUSTED_KEY = 4
    UNAUTHORIZED = 5
    MESSAGE_TOO_LARGE = 6
    DECRYPT_ERROR = 7
    TIMEOUT = 8
    INTERNAL_ERROR = 9
    GOING_AWAY = 10
    REFUSED = 11

    NAMES = {
        0: "normal closure",
        1: "protocol error",
        2: "handshake failure",
        3: "unsupported version",
        4: "untrusted key",
        5: "unauthorized",
        6: "message too large",
        7: "decrypt error",
        8: "timeout",
        9: "internal error",
        10: "going away",
        11: "refused",
    }

    @classmethod
    def name(cls, code: int) -> str:
        """The readable name of a close/alert code ('going away'), else 'code N'."""
        return cls.NAMES.get(code, f"code {code}")


class CallcpError(Exception):
    """Base class of every error callcp raises."""

    #: Trying the same operation again later may succeed (see RetryableError).
    retryable = False


class RetryableError(CallcpError):
    """A transient failure: the network, a restarting or busy server, a
    deadline.  ``except callcp.RetryableError`` catches all of them; trying
    again later (on a new connection) may succeed.  Not a promise that the
    server did not act on a request in flight: :class:`callcp.Retry` and the
    pools re-send a request only when it cannot have been received, or when
    the caller says it is idempotent."""

    retryable = True


class SecureTCPServerError(CallcpError):
    """Callcp 1.0's server-side root; every callcp error is one."""


class SecureTCPClientError(CallcpError):
    """Callcp 1.0's client-side root; every callcp error is one."""


class _Error(SecureTCPServerError, SecureTCPClientError):
    """Internal common base: under both Callcp 1.0 roots."""


class KeyManagementError(_Error):
    """A key could not be generated, loaded, parsed, decrypted or saved."""


class HandshakeError(_Error):
    """The handshake failed; no application data was exchanged."""

    #: the close code to tell the peer, when one applies
    code: int = CloseCode.HANDSHAKE_FAILURE


class VersionMismatch(HandshakeError):
    """The two sides share no protocol version."""

    code = CloseCode.UNSUPPORTED_VERSION


class ServerKeyError(HandshakeError):
    """The server's key is not one this client trusts."""

    code = CloseCode.UNTRUSTED_KEY


class UnknownServerKey(ServerKeyError):
    """The server is unknown and trust-on-first-use was not allowed."""


class ServerKeyChanged(ServerKeyError):
    """The server presented a key other than the pinned or known one.

    ``expected`` and ``presented`` hold the two ``SHA256:`` fingerprints.
    """

    def __init__(self, message: str, *, expected: str, presented: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.presented = presented


class ServerKeyRevoked(ServerKeyError):
    """The server presented a key that the known-hosts file marks
    ``@revoked``.  ``presented`` holds its ``SHA256:`` fingerprint."""

    def __init__(self, message: str, *, presented: str) -> None:
        super().__init__(message)
        self.presented = presented


class ClientAuthError(HandshakeError):
    """Client authentication was missing, invalid, or not authorized."""

    code = CloseCode.UNAUTHORIZED


class HandshakeTimeout(HandshakeError, RetryableError):
    """The handshake did not finish within its deadline."""

    code = CloseCode.TIMEOUT


class HandshakeAborted(HandshakeError, RetryableError):
    """The handshake was cut off by something unauthenticated: a plaintext
    ALERT (``code`` and ``reason`` are what it said, ``reason`` escaped), or
    the end of TCP (``code`` None).  Either could come from an attacker on
    the path, so it never selects a more specific error, and its text never
    repeats the peer's advice."""

    def __init__(self, message: str, *, code: Optional[int] = None, reason: str = "") -> None:
        super().__init__(message)
        self.alert_code = code
        self.reason = reason


class ServerBusy(HandshakeError, RetryableError):
    """The server declined this connection before its key exchange (at
    capacity, or shutting down), in a refusal it authenticated (§4.10 of
    the protocol): it received nothing from this connection, not even a
    first request sent with the handshake.  ``reason`` is its text."""

    code = CloseCode.GOING_AWAY

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class RemoteProtocolError(_Error):
    """The peer sent bytes that violate callcp/2."""

    code: int = CloseCode.PROTOCOL_ERROR


class CryptoError(RemoteProtocolError):
    """A record failed authentication: tampered, replayed, reordered,
    reflected, dropped, or sealed with another key."""

    code = CloseCode.DECRYPT_ERROR


class MessageTooLarge(RemoteProtocolError):
    """An incoming message exceeded ``max_message_size``."""

    code = CloseCode.MESSAGE_TOO_LARGE


class StreamTooLarge(RemoteProtocolError):
    """An incoming stream was larger than ``recv_stream(max_size=...)``
    allows (by the size the sender announced, or by what it sent): nothing
    of it was kept, and the connection was closed with REFUSED.  Raised by
    a ``progress`` callback, it refuses the stream the same way, with
    ``reason`` (what the sender is told)."""

    code = CloseCode.REFUSED

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class StreamAbortedError(_Error):
    """The peer abandoned the stream it was sending (``reason`` says why);
    the connection stays usable."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class TransportError(_Error):
    """The connection failed or is closed."""


class ConnectionClosed(TransportError):
    """The connection is closed; ``code`` and ``reason`` say how.

    ``code`` is a :class:`CloseCode` value, or ``None`` when the connection
    ended without any close record (a TCP close or reset).
    """

    def __init__(self, message: str, *, code: Optional[int] = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class ConnectionRefused(TransportError, RetryableError):
    """The connection could not be opened: nothing listens on that port
    (refused), or there is no route to the host right now."""


class ConnectionClosedOK(ConnectionClosed):
    """The connection was closed cleanly with an authenticated close."""


class ServerGoingAway(ConnectionClosedOK, RetryableError):
    """The server closed the connection with GOING_AWAY (authenticated): it
    is shutting down or shedding load.  Its close says how many of this
    connection's messages it delivered to its application, and it delivers
    none after: ``unread`` is how many of the last messages sent it never
    read (0 if it read them all, or cannot say), so these may be sent again
    elsewhere without a duplicate."""

    def __init__(
        self, message: str, *, code: Optional[int] = None, reason: str = "", unread: int = 0
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.unread = unread


class ConnectionClosedError(ConnectionClosed):
    """The connection broke: the peer vanished, closed TCP without the
    authenticated close (possible truncation), or closed with an error code."""


class ConnectionLost(ConnectionClosedError, RetryableError):
    """TCP ended without the authenticated close: a reset, a FIN, a peer
    process that died.  A request in flight may or may not have been acted on."""


class PeerUnresponsive(ConnectionLost):
    """The peer did not answer a keepalive PING in time (a partition, a
    frozen host): the connection was given up."""


class CallcpTimeout(TransportError, TimeoutError, RetryableError):
    """A socket operation did not finish before its deadline."""


class LocalProtocolError(_Error):
    """This program used the API in a way the protocol does not allow."""


class StreamPending(LocalProtocolError):
    """``recv()`` found a stream where a message was expected.  The stream
    stays pending: receive it with ``recv_stream()`` (``name`` and ``size``
    are the sender's hints), or close the connection."""

    def __init__(self, message: str, *, name: str, size: Optional[int]) -> None:
        super().__init__(message)
        self.name = name
        self.size = size


class MessagePending(LocalProtocolError):
    """``recv_stream()`` found a message where a stream was expected; the
    message stays pending for ``recv()``."""
