"""callcp: encrypted, authenticated, message-oriented channels over plain TCP.

Blocking API (``callcp.aio`` has the same, awaited)::

    import callcp
    with callcp.connect("127.0.0.1", 8436) as conn:
        reply = conn.request(b"hello")

The Callcp 1.0 API (``SecureTCPServer``, ``SecureTCPClient``) is kept.
"""

from . import aio
from ._core.errors import (
    CallcpError,
    CallcpTimeout,
    ClientAuthError,
    CloseCode,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    ConnectionLost,
    ConnectionRefused,
    CryptoError,
    HandshakeAborted,
    HandshakeError,
    HandshakeTimeout,
    KeyManagementError,
    LocalProtocolError,
    MessagePending,
    MessageTooLarge,
    PeerUnresponsive,
    RemoteProtocolError,
    RetryableError,
    SecureTCPClientError,
    SecureTCPServerError,
    ServerBusy,
    ServerGoingAway,
    ServerKeyChanged,
    ServerKeyError,
    ServerKeyRevoked,
    StreamAbortedError,
    StreamPending,
    StreamTooLarge,
    TransportError,
    UnknownServerKey,
    VersionMismatch,
)
from ._core.keys import fingerprint
from ._options import ClientOptions, ServerOptions
from ._retry import Retry
from ._streams import StreamInfo
from .compat import SecureTCPClient, SecureTCPServer
from .keys import KeyPair
from .pool import Pool, PoolStats
from .sessions import SessionStore
from .sync import Connection, Server, connect, serve
from .trust import AuthorizedKeys, KnownHosts, ServerKeyPolicy

__version__ = "2.0.0"

__all__ = [
    # blocking API
    "connect",
    "serve",
    "Connection",
    "Server",
    "StreamInfo",
    "ClientOptions",
    "ServerOptions",
    # asyncio API: callcp.aio.connect, callcp.aio.serve
    "aio",
    # keys and trust
    "KeyPair",
    "Pool",
    "PoolStats",
    "Retry",
    "SessionStore",
    "KnownHosts",
    "AuthorizedKeys",
    "ServerKeyPolicy",
    "fingerprint",
    # Callcp 1.0 API
    "SecureTCPServer",
    "SecureTCPClient",
    # errors
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
    "CryptoError",
    "RemoteProtocolError",
    "MessageTooLarge",
    "TransportError",
    "ConnectionClosed",
    "ConnectionClosedOK",
    "ConnectionClosedError",
    "ConnectionLost",
    "PeerUnresponsive",
    "ConnectionRefused",
    "ServerGoingAway",
    "RetryableError",
    "CallcpTimeout",
    "LocalProtocolError",
    "StreamAbortedError",
    "StreamTooLarge",
    "StreamPending",
    "MessagePending",
    "CloseCode",
    "__version__",
]
