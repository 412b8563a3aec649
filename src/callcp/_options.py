"""Options: one frozen, validated object per role, one place for each default.

``connect()`` and ``serve()`` (both adapters), the Callcp 1.0 API and the
CLI all build a :class:`ClientOptions` or :class:`ServerOptions`; the object
checks itself once, in ``__post_init__``, and raises ``ValueError`` naming the
option.  Like h2's ``H2Configuration``, it has almost no behaviour of its own.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple, TypeVar, Union

if TYPE_CHECKING:
    from typing_extensions import TypedDict
else:
    from typing import TypedDict

from ._core.protocol import DEFAULT_MAX_MESSAGE_SIZE, MAX_TICKET_LIFETIME
from ._core.shares import MAX_SHARE_VALIDITY
from ._retry import Retry
from .sessions import PROCESS_SESSIONS, SessionStore

__all__ = [
    "ClientOptions",
    "ServerOptions",
    "ClientKwargs",
    "ServerKwargs",
    "DEFAULT_PORT",
    "CALLCP1",
    "CALLCP2",
    "PROTOCOLS",
    "default_max_connections",
]

DEFAULT_PORT = 8436

#: The wire protocols a client or server can speak: callcp/2 (the default),
#: or Callcp 1.0's, opted into by name (never negotiated, never fallen back
#: to): see docs/guides/migrating.md.
CALLCP2 = "callcp/2"
CALLCP1 = "callcp1"
PROTOCOLS = (CALLCP2, CALLCP1)

PathLike = Union[str, "os.PathLike[str]"]
_T = TypeVar("_T", bound="_Options")

#: File descriptors kept free beside the connections (listening sockets,
#: log files, key files, the application's own): at least this many, or a
#: tenth of the limit.
FD_HEADROOM = 64
#: The default max_connections never goes above this.
MAX_DEFAULT_CONNECTIONS = 10_000
#: Soft RLIMIT_NOFILE is raised up to this (never above the hard limit).
WANTED_FD_LIMIT = 16_384


def default_max_connections() -> int:
    """The default ``max_connections``: what the file-descriptor limit allows.

    Raises the soft RLIMIT_NOFILE toward the hard limit where the system
    allows it, then keeps headroom, so that callcp's polite "server busy"
    refusal always comes before the kernel's EMFILE.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_FD_LIMIT if hard == resource.RLIM_INFINITY else min(hard, WANTED_FD_LIMIT)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return MAX_DEFAULT_CONNECTIONS
    headroom = max(FD_HEADROOM, soft // 10)
    return max(1, min(MAX_DEFAULT_CONNECTIONS, soft - headroom))


#: The longest share_lifetime a server may choose (seconds).
MAX_SHARE_LIFETIME = 3600


def _positive_or_none(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number of seconds > 0, or None; not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite (use None for no limit), not {value!r}")


def _keepalive(interval: Any, timeout: Any) -> None:
    _positive_or_none("keepalive_interval", interval)
    _positive_or_none("keepalive_timeout", timeout)
    if timeout is None:
        raise ValueError("keepalive_timeout must be a number of seconds > 0, not None")


def _count(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}, not {value!r}")


def _protocol(value: Any, unsupported: Sequence[Tuple[str, Any, str]]) -> None:
    """``protocol`` is one of PROTOCOLS; with Callcp 1.0's, each option in
    ``unsupported`` (name, value, why) must be left unset."""
    if value not in PROTOCOLS:
        known = ", ".join(map(repr, PROTOCOLS))
        raise ValueError(f"protocol must be one of {known}, not {value!r}")
    if value == CALLCP1:
        for name, given, why in unsupported:
            if given is not None:
                raise ValueError(f"{name} cannot be used with protocol='callcp1': {why}")


def _proxies(enabled: Any, entries: Any) -> None:
    """``trusted_proxies`` is a list of addresses or networks, given with
    ``proxy_protocol=True`` (and only then)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"proxy_protocol must be True or False, not {enabled!r}")
    if isinstance(entries, (str, bytes)) or not isinstance(entries, (list, tuple, set, frozenset)):
        raise ValueError(
            "trusted_proxies must be a list of addresses or networks "
            f'(["10.0.0.0/8", "127.0.0.1"]), not {entries!r}'
        )
    for entry in entries:
        try:
            if not isinstance(entry, str):
                raise TypeError
            network = ipaddress.ip_network(entry, strict=False)
        except (ValueError, TypeError):
            raise ValueError(
                f"trusted_proxies: {entry!r} is not an IP address or network (a str)"
            ) from None
        if network.prefixlen == 0:
            raise ValueError(
                f"trusted_proxies: {entry!r} trusts every address: anyone could name "
                "any client; give the load balancers' addresses"
            )
    if enabled and not entries:
        raise ValueError(
            "proxy_protocol=True needs trusted_proxies: the load balancers whose "
            "connections carry a PROXY header"
        )
    if entries and not enabled:
        raise ValueError("trusted_proxies is only used with proxy_protocol=True")


def _logger(value: Any) -> None:
    if value is not None and not isinstance(value, logging.Logger):
        raise ValueError(f"logger must be a logging.Logger or None, not {type(value).__name__}")


class _Options:
    """What both option classes share."""

    def replace(self: _T, **changes: Any) -> _T:
        """A copy with ``changes`` applied (and validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class ClientOptions(_Options):
    """Everything ``connect()`` accepts besides the address.

    Attributes:
        timeout: seconds for connecting, the handshake, and each later
            blocking call (None: wait forever).
        server_fingerprint: pin the server's key (``SHA256:...``), or
            several (a list: the current key and the next, across a key
            rotation); else the
            known-hosts file decides.
        known_hosts: the known-hosts file (default ``~/.callcp/known_hosts``).
        trust_on_first_use: record an unknown server's key (else refuse it).
        insecure: accept any server key (loudly logged; contradicts a pin).
        client_key: the client's key, for servers that require client
            authentication (KeyPair, RSA private key or PEM path).
        key_password: the passphrase of an encrypted ``client_key`` file.
        allow_insecure_permissions: load a ``client_key`` file that others
            may read or write (logged); else it is refused (``chmod 600``).
        max_message_size: the largest message ``recv()`` accepts (bytes).
        keepalive_interval: after this many seconds without a byte from the
            peer, while waiting in ``recv()``, send it a sealed PING (None:
            no keepalive).  The peer answers whenever it next reads.
        keepalive_timeout: seconds after a PING without any answer before the
            peer is declared unresponsive (PeerUnresponsive, a ConnectionClosedError).
        session_store: where session tickets are kept and taken from, to
            resume (``callcp.SessionStore``; default: this process's, in
            memory; None: no tickets).
        retry: try again after a transient failure (``callcp.Retry``): a
            failed connect or handshake, and in a pool a request the server
            cannot have received (None: fail at once).
        protocol: ``"callcp/2"``, or ``"callcp1"`` to talk to a Callcp 1.0
            server (its wire format: no server authentication, no forward
            secrecy, no replay protection, messages of at most 4,068 bytes;
            a WARNING is logged per connection; ``client_key`` and
            keepalive cannot be used, and no tickets are offered).
        logger: where callcp logs (default: the ``callcp`` logger).
    """

    timeout: Optional[float] = 30.0
    server_fingerprint: Union[str, Sequence[str], None] = None
    known_hosts: Optional[PathLike] = None
    trust_on_first_use: bool = True
    insecure: bool = False
    client_key: Optional[Any] = None
    key_password: Optional[str] = None
    allow_insecure_permissions: bool = False
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    keepalive_interval: Optional[float] = None
    keepalive_timeout: float = 10.0
    session_store: Optional[SessionStore] = PROCESS_SESSIONS
    retry: Optional[Retry] = None
    protocol: str = CALLCP2
    logger: Optional[logging.Logger] = None

    def __post_init__(self) -> None:
        _positive_or_none("timeout", self.timeout)
        _protocol(
            self.protocol,
            [
                ("client_key", self.client_key, "Callcp 1.0 has no client authentication"),
                ("keepalive_interval", self.keepalive_interval, "Callcp 1.0 has no keepalive"),
            ],
        )
        if self.retry is not None and not isinstance(self.retry, Retry):
            kind = type(self.retry).__name__
            raise ValueError(f"retry must be a callcp.Retry or None, not {kind}")
        if self.session_store is not None and not isinstance(self.session_store, SessionStore):
            raise ValueError(
                "session_store must be a callcp.SessionStore or None, "
                f"not {type(self.session_store).__name__}"
            )
        _count("max_message_size", self.max_message_size, low=0)
        _keepalive(self.keepalive_interval, self.keepalive_timeout)
        if self.insecure and self.server_fingerprint is not None:
            raise ValueError("insecure=True contradicts server_fingerprint=...; choose one")
        _logger(self.logger)


@dataclass(frozen=True)
class ServerOptions(_Options):
    """Everything ``serve()`` accepts besides the handler and address; the
    same defaults on both adapters (docs/LIMITS.md explains each limit).

    Attributes:
        key: the server's key (KeyPair, RSA private key or PEM path,
            generated there on first use; default ``~/.callcp/server_key.pem``).
        key_password: the passphrase of an encrypted key file.
        allow_insecure_permissions: load key files (``key``, ``next_key``,
            a ``ticket_key`` file) that others may read or write (logged);
            else they are refused (``chmod 600``).
        authorized_keys: require client authentication and admit only these
            keys (a file path or fingerprints).
        max_connections: open connections at once, in every phase (None:
            derived from the file-descriptor limit, at most 10,000).
        max_connections_per_source: open connections from one source
            address (an IPv4 address or an IPv6 /64); 0 turns it off.
        max_handshakes: RSA key exchanges running at once; more complete
            ClientHellos wait their turn, each until its handshake deadline;
            one that could not get its turn before then is refused at once
            ("server busy").
        max_handshakes_per_source: handshakes (waiting or running) from one
            source address; 0 turns it off.
        handshake_timeout: seconds from accept to a completed handshake.
        next_key: the key this server will use next (KeyPair, RSA private
            key or PEM path, which must exist): announced to every client
            inside the session with proof of possession, so trust-on-first-
            use clients accept it silently after the switch.
        ticket_lifetime: seconds a session ticket is valid, and how often
            the ticket key changes (0: issue and accept no tickets; at most
            7 days).
        ticket_key: what the ticket keys derive from: 32 or more secret
            bytes, or the path of a ticket key file (``callcp keygen
            --ticket-key``: lines of 64 hex digits, the first sealing new
            tickets and every line opening them; mode 0600, or 0640 for a
            group that may only read), shared by every server that should
            resume each other's sessions.  A file is read again within a
            second of a change (a rotation: ``--rotate``).  None: a random
            key, this server's alone (with ``workers=N``, shared by its N
            processes).
        share_lifetime: seconds the server uses one signed X25519 share for
            its ServerHellos (one RSA signature each; 1 to 3,600).  A share
            is valid for ``share_lifetime + handshake_timeout`` seconds.
        idle_timeout: seconds a handler's wait for a message may last (None:
            forever).
        max_message_size: the largest message a handler's ``recv()`` accepts.
        max_buffered_bytes: partially received message bytes across all
            connections; past it the connection with the largest unfinished
            message is closed with MESSAGE_TOO_LARGE.
        shutdown_timeout: seconds ``shutdown()`` lets handlers finish.
        keepalive_interval: after this many seconds without a byte from the
            peer, while waiting in a handler's ``recv()``, send it a sealed PING (None:
            no keepalive).  The peer answers whenever it next reads.
        keepalive_timeout: seconds after a PING without any answer before the
            peer is declared unresponsive (PeerUnresponsive, a ConnectionClosedError).
        backlog: the listening socket's accept queue.
        reuse_port: set SO_REUSEPORT on the listening socket.
        workers: N > 1 forks N processes that accept on the port (Linux).
        proxy_protocol: connections from ``trusted_proxies`` must begin with
            a PROXY protocol header (v1 or v2, as HAProxy's ``send-proxy``
            and ``send-proxy-v2`` send): the client it names is the
            connection's ``remote_address``, in the logs, and what the
            per-source limits count.  A missing or malformed header is
            refused, and so is a header from any other address.
        trusted_proxies: the load balancers' addresses or networks
            (``"10.0.0.0/8"``, ``"127.0.0.1"``, ``"fd00::/8"``); required
            with ``proxy_protocol``.
        protocol: ``"callcp/2"``, or ``"callcp1"`` to serve Callcp 1.0
            clients (their wire format: no server authentication, no
            forward secrecy, no replay protection, messages of at most
            4,068 bytes; a WARNING is logged per connection).  The key is
            the Callcp 1.0 server's; ``authorized_keys``, ``next_key``,
            ``ticket_key`` and keepalive cannot be used, and
            ``max_message_size``, ``share_lifetime`` and
            ``ticket_lifetime`` do not apply.
        logger: where callcp logs (default: the ``callcp`` logger).
    """

    key: Optional[Any] = None
    key_password: Optional[str] = None
    allow_insecure_permissions: bool = False
    authorized_keys: Optional[Any] = None
    max_connections: Optional[int] = None
    max_connections_per_source: int = 512
    max_handshakes: int = 16
    max_handshakes_per_source: int = 64
    handshake_timeout: float = 10.0
    next_key: Optional[Any] = None
    share_lifetime: float = 60.0
    ticket_lifetime: float = 3600.0
    ticket_key: Optional[Union[bytes, PathLike]] = None
    idle_timeout: Optional[float] = 300.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_buffered_bytes: int = 256 * 1024 * 1024
    shutdown_timeout: float = 5.0
    keepalive_interval: Optional[float] = None
    keepalive_timeout: float = 10.0
    backlog: int = 1024
    reuse_port: bool = False
    workers: int = 1
    proxy_protocol: bool = False
    trusted_proxies: Sequence[str] = ()
    protocol: str = CALLCP2
    logger: Optional[logging.Logger] = None

    def __post_init__(self) -> None:
        _proxies(self.proxy_protocol, self.trusted_proxies)
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        _protocol(
            self.protocol,
            [
                ("authorized_keys", self.authorized_keys, "Callcp 1.0 has no client keys"),
                ("next_key", self.next_key, "Callcp 1.0 cannot announce a key"),
                ("ticket_key", self.ticket_key, "Callcp 1.0 has no session tickets"),
                ("keepalive_interval", self.keepalive_interval, "Callcp 1.0 has no keepalive"),
            ],
        )
        if self.max_connections is None:
            object.__setattr__(self, "max_connections", default_max_connections())
        _count("max_connections", self.max_connections, low=1)
        _count("max_connections_per_source", self.max_connections_per_source, low=0)
        _count("max_handshakes", self.max_handshakes, low=1)
        _count("max_handshakes_per_source", self.max_handshakes_per_source, low=0)
        _positive_or_none("handshake_timeout", self.handshake_timeout)
        if self.handshake_timeout is None:
            raise ValueError("handshake_timeout must be a number of seconds > 0, not None")
        lifetime = self.share_lifetime
        if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)):
            raise ValueError(f"share_lifetime must be a number of seconds, not {lifetime!r}")
        if not 1 <= lifetime <= MAX_SHARE_LIFETIME or lifetime + self.handshake_timeout > (
            MAX_SHARE_VALIDITY
        ):
            raise ValueError(
                f"share_lifetime must be from 1 to {MAX_SHARE_LIFETIME} seconds, not {lifetime!r}"
            )
        ticket = self.ticket_lifetime
        if isinstance(ticket, bool) or not isinstance(ticket, (int, float)):
            raise ValueError(f"ticket_lifetime must be a number of seconds, not {ticket!r}")
        if not (ticket == 0 or 1 <= ticket <= MAX_TICKET_LIFETIME):
            raise ValueError(
                f"ticket_lifetime must be 0 (no tickets) or from 1 to {MAX_TICKET_LIFETIME} "
                f"seconds, not {ticket!r}"
            )
        if isinstance(self.ticket_key, (bytes, bytearray)) and len(self.ticket_key) < 32:
            raise ValueError("ticket_key must be at least 32 bytes (or a file path)")
        _positive_or_none("idle_timeout", self.idle_timeout)
        _count("max_message_size", self.max_message_size, low=0)
        _count("max_buffered_bytes", self.max_buffered_bytes, low=1)
        if self.max_buffered_bytes < self.max_message_size:
            # One message must always fit, or a legitimate one is refused.
            object.__setattr__(self, "max_buffered_bytes", self.max_message_size)
        _positive_or_none("shutdown_timeout", self.shutdown_timeout)
        _keepalive(self.keepalive_interval, self.keepalive_timeout)
        _count("backlog", self.backlog, low=1)
        _count("workers", self.workers, low=1)
        _logger(self.logger)

    @property
    def max_waiting_handshakes(self) -> int:
        """Complete ClientHellos that may wait for a key-exchange slot (the
        wait is bounded in time too: see HandshakeQueue)."""
        assert self.max_connections is not None
        return self.max_connections


# The keyword arguments of connect() and serve(), for ``**options:
# Unpack[...]``: type checkers and IDEs see every option by name (a misspelt
# one is an error), and each signature is written once.  A test keeps these
# in step with the dataclasses above.


class ClientKwargs(TypedDict, total=False):
    """:func:`callcp.connect`'s options (see :class:`ClientOptions`)."""

    timeout: Optional[float]
    server_fingerprint: Union[str, Sequence[str], None]
    known_hosts: Optional[PathLike]
    trust_on_first_use: bool
    insecure: bool
    client_key: Optional[Any]
    key_password: Optional[str]
    allow_insecure_permissions: bool
    max_message_size: int
    keepalive_interval: Optional[float]
    keepalive_timeout: float
    session_store: Optional[SessionStore]
    retry: Optional[Retry]
    protocol: str
    logger: Optional[logging.Logger]


class ServerKwargs(TypedDict, total=False):
    """:func:`callcp.serve`'s options (see :class:`ServerOptions`)."""

    key: Optional[Any]
    key_password: Optional[str]
    allow_insecure_permissions: bool
    authorized_keys: Optional[Any]
    max_connections: Optional[int]
    max_connections_per_source: int
    max_handshakes: int
    max_handshakes_per_source: int
    handshake_timeout: float
    next_key: Optional[Any]
    share_lifetime: float
    ticket_lifetime: float
    ticket_key: Optional[Union[bytes, PathLike]]
    idle_timeout: Optional[float]
    max_message_size: int
    max_buffered_bytes: int
    shutdown_timeout: float
    keepalive_interval: Optional[float]
    keepalive_timeout: float
    backlog: int
    reuse_port: bool
    workers: int
    proxy_protocol: bool
    trusted_proxies: Sequence[str]
    protocol: str
    logger: Optional[logging.Logger]
