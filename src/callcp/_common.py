"""What the blocking and asyncio adapters share that is not protocol:
turning user options into a trust policy and a server key, and logging."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from cryptography.hazmat.primitives.asymmetric import rsa

from ._core.errors import (
    CallcpTimeout,
    ConnectionLost,
    ConnectionRefused,
    KeyManagementError,
    TransportError,
)
from ._core.legacy import MISSING as LEGACY_MISSING
from ._core.legacy import LegacyClient
from ._core.protocol import ClientProtocol
from ._core.tickets import Session
from ._core.wire import printable
from ._options import CALLCP1, DEFAULT_PORT, ClientOptions
from .hsm import is_pkcs11_uri
from .keys import KeyPair
from .keys import _check_mode as check_secret_file_mode
from .trust import AuthorizedKeys, ServerKeyPolicy

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_SERVER_KEY",
    "KeySource",
    "AuthorizedSource",
    "check_port",
    "translate_oserror",
    "logger_for",
    "ServerTrust",
    "client_protocol",
    "load_server_key",
    "load_client_key",
    "client_authorizer",
]

#: Where ``serve()`` keeps its key when none is given.
DEFAULT_SERVER_KEY = Path("~/.callcp/server_key.pem")

PathLike = Union[str, "os.PathLike[str]"]
KeySource = Union[KeyPair, rsa.RSAPrivateKey, str, "os.PathLike[str]"]
AuthorizedSource = Union[AuthorizedKeys, PathLike, "list[str]", "set[str]", "tuple[str, ...]"]

LOG = logging.getLogger("callcp")


def translate_oserror(exc: OSError, doing: str) -> TransportError:
    """The one place where socket errors become callcp errors (both adapters)."""
    # socket.timeout: a Python-level timeout; BlockingIOError (EAGAIN): the
    # kernel-level SO_RCVTIMEO / SO_SNDTIMEO deadline of a blocking socket.
    if isinstance(exc, (socket.timeout, BlockingIOError)):
        return CallcpTimeout(f"timed out while {doing}")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return ConnectionLost(f"the connection was reset while {doing}: {exc.strerror}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionRefused(f"nothing is listening (connection refused) while {doing}")
    if exc.errno in _UNREACHABLE:
        return ConnectionRefused(f"no route while {doing}: {exc.strerror}")
    if exc.errno == errno.ETIMEDOUT:
        return CallcpTimeout(f"timed out while {doing}: {exc.strerror}")
    return TransportError(f"network error while {doing}: {exc}")


_UNREACHABLE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})


def check_port(port: int, *, allow_zero: bool) -> None:
    """Refuse a port outside 1..65535 (0 too, where it means "pick one")."""
    low = 0 if allow_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise ValueError(f"port must be an integer from {low} to 65535, not {port!r}")


def logger_for(logger: Optional[logging.Logger]) -> logging.Logger:
    return logger if logger is not None else LOG


class ServerTrust:
    """The client's trust decisions about one server address: the core's
    ``verify_server_key`` (:meth:`verify`) and ``on_next_key``
    (:meth:`next_key`) callbacks, from the user's options.

    Precedence: ``insecure`` (explicit, logged loudly) > pinned
    ``server_fingerprint`` (one or several) > the known-hosts file (trust on
    first use unless turned off).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        server_fingerprint: Union[str, Sequence[str], None],
        known_hosts: Optional[PathLike],
        trust_on_first_use: bool,
        insecure: bool,
        logger: logging.Logger,
    ) -> None:
        self.host, self.port, self.log = host, port, logger
        if insecure:
            if server_fingerprint is not None:
                raise ValueError("insecure=True contradicts server_fingerprint=...; choose one")
            self.policy = ServerKeyPolicy.insecure()
            logger.warning(
                "SERVER KEY CHECKING IS OFF for %s:%s: anyone on the network path can "
                "impersonate the server (insecure=True)",
                host,
                port,
            )
        elif server_fingerprint is not None:
            self.policy = ServerKeyPolicy.pinned(server_fingerprint)
        else:
            self.policy = ServerKeyPolicy.known_hosts(
                known_hosts, trust_on_first_use=trust_on_first_use
            )

    def verify(self, fingerprint: str, der: bytes) -> Optional[Callable[[], None]]:
        """At the ServerHello: decide (raises to refuse); what to do once the
        server has proved the key (record a new one; forget the keys an
        announced one replaced), or None."""
        outcome = self.policy.verify(self.host, self.port, fingerprint, record=False)
        if outcome == "new":
            return lambda: self._record(fingerprint)
        if outcome == "rotated":
            return lambda: self._rotated(fingerprint)
        return None

    def _record(self, fingerprint: str) -> None:
        if self.policy.verify(self.host, self.port, fingerprint) == "new":
            self.log.warning(
                "permanently added %s:%s (%s) to the known hosts (trust on first use)",
                self.host,
                self.port,
                fingerprint,
            )

    def _rotated(self, fingerprint: str) -> None:
        kh = self.policy.known_hosts_file
        assert kh is not None
        try:
            forgot = kh.forget_older(self.host, self.port, fingerprint)
        except KeyManagementError as exc:
            self.log.warning("could not update the known hosts file: %s", exc)
            return
        if forgot:
            self.log.info(
                "%s:%s now uses its announced key %s; forgot the key(s) it replaced",
                self.host,
                self.port,
                fingerprint,
            )

    def next_key(self, fingerprint: str, der: bytes) -> None:
        """The server proved, in a verified session, that it holds the key it
        will use next: a trust-on-first-use known-hosts client records it
        as one more accepted key (pins and managed files are left alone)."""
        kh = self.policy.known_hosts_file
        if kh is None or not self.policy.trust_on_first_use:
            return
        try:
            added = kh.add_also(self.host, self.port, fingerprint)
        except (KeyManagementError, ValueError, OSError) as exc:  # (never fails the session)
            self.log.warning("could not record the announced next key: %s", exc)
            return
        if added:
            self.log.info(
                "%s:%s announced its next key %s: recorded as accepted",
                self.host,
                self.port,
                fingerprint,
            )


def client_protocol(
    host: str, port: int, options: ClientOptions
) -> Union[ClientProtocol, LegacyClient]:
    """The client's sans-I/O core, set up from ``connect()``'s options (both
    adapters): callcp/2's, or with ``protocol="callcp1"`` Callcp 1.0's (its
    WARNING logged: one per connection).

    Raises:
        KeyManagementError: ``client_key`` could not be loaded.
        ValueError: a malformed pin.
    """
    log = logger_for(options.logger)
    if options.protocol == CALLCP1:
        log.warning(
            "connecting to %s:%s with CALLCP 1.0's wire format (protocol='callcp1'): %s",
            printable(str(host)),
            port,
            LEGACY_MISSING,
        )
    trust = ServerTrust(
        host,
        port,
        server_fingerprint=options.server_fingerprint,
        known_hosts=options.known_hosts,
        trust_on_first_use=options.trust_on_first_use,
        insecure=options.insecure,
        logger=log,
    )
    if options.protocol == CALLCP1:

        def unproved() -> None:  # (trust on first use: the key waited for a reply)
            log.warning(
                "the key of %s:%s was not recorded in the known hosts: no reply came to "
                "prove it (Callcp 1.0 proves a key only by replying); until it is, each "
                "connection trusts whatever key it is shown: pin it with server_fingerprint=",
                printable(str(host)),
                port,
            )

        return LegacyClient(trust.verify, on_unproved=unproved)
    keypair = load_client_key(
        options.client_key,
        password=options.key_password,
        insecure_ok=options.allow_insecure_permissions,
    )
    store, identity = options.session_store, keypair.fingerprint if keypair else ""
    session = on_ticket = None
    if store is not None:
        session = store.take(host, port, identity)

        def on_ticket(ticket: Session) -> None:
            store.put(host, port, identity, ticket)

    return ClientProtocol(
        trust.verify,
        on_next_key=trust.next_key,
        client_key=keypair.private_key if keypair is not None else None,
        max_message_size=options.max_message_size,
        session=session,
        on_ticket=on_ticket,
    )


def load_ticket_key(
    source: Union[bytes, PathLike, None], *, insecure_ok: bool = False
) -> Optional[List[bytes]]:
    """A server's ``ticket_key`` option as its master secrets, the one that
    seals first (None: a random key, this server's alone).

    A file holds one secret per line, 64 hex digits (32 bytes; ``#``
    comments and blank lines allowed): the first line seals new tickets,
    every line opens them (the previous secrets, kept across a rotation
    while their tickets live: ``callcp keygen --ticket-key FILE --rotate``).
    A file that is not text is one secret, its raw bytes (at least 32: a
    file from ``head -c 32 /dev/urandom``).  Its permissions follow the
    server key's rule (0600, or 0640 for a group that may only read;
    ``insecure_ok``: only warned about).

    Raises:
        KeyManagementError: the file is missing, unreadable, exposed (see
            above), a text file with a line that is not a key, or holds
            less than 32 bytes of secret.
    """
    if source is None or isinstance(source, (bytes, bytearray)):
        return None if source is None else [bytes(source)]
    path = Path(os.path.expanduser(source))
    try:
        # (links followed: a Kubernetes secret is one; O_NONBLOCK: a FIFO put
        # there does not block the server, which reads this while accepting)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with open(fd, "rb") as handle:
            st = os.fstat(handle.fileno())  # (the file read, not the path's)
            if not stat.S_ISREG(st.st_mode):
                raise KeyManagementError(f"the ticket key file {path} is not a regular file")
            data = handle.read(TICKET_FILE_LIMIT + 1)
    except OSError as exc:
        raise KeyManagementError(
            f"cannot read the ticket key file {path}: {exc.strerror}"
        ) from None
    check_secret_file_mode(path, st, insecure_ok, "ticket key")
    if len(data) > TICKET_FILE_LIMIT:
        raise KeyManagementError(f"the ticket key file {path} is over {TICKET_FILE_LIMIT} bytes")
    try:
        secrets = parse_ticket_keys(data)
    except ValueError as exc:
        raise KeyManagementError(f"the ticket key file {path}: {exc}") from None
    if secrets is not None:
        return secrets
    if len(data) < 32:
        raise KeyManagementError(
            f"the ticket key file {path} holds {len(data)} bytes; it needs at least 32 "
            f"random bytes (callcp keygen --ticket-key {path})"
        )
    return [data]


#: A ticket key file is small: a few lines of 64 hex digits.
TICKET_FILE_LIMIT = 64 * 1024
#: The most keys a ticket key file may hold (the current one and the previous).
MAX_TICKET_KEYS = 8
_HEX_SECRET = re.compile(r"(?:[0-9a-fA-F]{2}){32,}")


def parse_ticket_keys(data: bytes) -> Optional[List[bytes]]:
    """The secrets of a ticket key file of hex lines, first first; None if
    the file is not text (it is then one raw secret).

    Raises:
        ValueError: a text file with a line that is not 64 or more hex
            digits (a truncated or mistyped key), or with no key at all.
    """
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    if any(ch < " " and ch not in "\n\r\t" for ch in text) or "\x7f" in text:
        return None  # (control bytes: a raw secret that happens to be ASCII)
    secrets = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not _HEX_SECRET.fullmatch(line):
            raise ValueError(
                f"line {number} is not a key (64 or more hex digits, an even number): "
                "a truncated or mistyped copy?"
            )
        secrets.append(bytes.fromhex(line))
    if not secrets:
        raise ValueError("no key in it (lines of 64 hex digits: callcp keygen --ticket-key)")
    if len(secrets) > MAX_TICKET_KEYS:
        raise ValueError(
            f"{len(secrets)} keys; at most {MAX_TICKET_KEYS} (each one a forged ticket tries)"
        )
    return secrets


def ticket_key_line(secret: bytes) -> str:
    """One line of a ticket key file."""
    return secret.hex()


def load_server_key(
    key: Optional[KeySource], *, password: Optional[str] = None, insecure_ok: bool = False
) -> KeyPair:
    """A server KeyPair from a KeyPair, a private key, or a PEM path (generated
    there on first use).  ``None`` means DEFAULT_SERVER_KEY."""
    if isinstance(key, KeyPair):
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        return KeyPair(key)
    if is_pkcs11_uri(key):
        return KeyPair.from_pkcs11(str(key), allow_insecure_permissions=insecure_ok)
    path = Path(os.path.expanduser(key if key is not None else DEFAULT_SERVER_KEY))
    return KeyPair.load_or_generate(path, password=password, allow_insecure_permissions=insecure_ok)


def load_client_key(
    key: Optional[KeySource], *, password: Optional[str] = None, insecure_ok: bool = False
) -> Optional[KeyPair]:
    """A client KeyPair, or None.  A path must exist: clients never generate."""
    if key is None or isinstance(key, KeyPair):
        return key
    if isinstance(key, rsa.RSAPrivateKey):
        return KeyPair(key)
    if is_pkcs11_uri(key):
        return KeyPair.from_pkcs11(str(key), allow_insecure_permissions=insecure_ok)
    path = Path(os.path.expanduser(key))
    return KeyPair.load(path, password=password, allow_insecure_permissions=insecure_ok)


def client_authorizer(
    authorized_keys: Optional[AuthorizedSource],
) -> Optional[Callable[[str], bool]]:
    """The core's ``authorize_client`` from a file path, a list of
    fingerprints, or an AuthorizedKeys; None turns client auth off."""
    if authorized_keys is None:
        return None
    if isinstance(authorized_keys, AuthorizedKeys):
        allowed = authorized_keys
    elif isinstance(authorized_keys, (list, set, tuple, frozenset)):
        allowed = AuthorizedKeys.from_fingerprints(authorized_keys)
    elif isinstance(authorized_keys, (str, os.PathLike)):
        allowed = AuthorizedKeys.load(Path(os.path.expanduser(authorized_keys)))
    else:
        raise KeyManagementError(
            f"authorized_keys must be a path or fingerprints, not {type(authorized_keys).__name__}"
        )
    return allowed.__contains__
