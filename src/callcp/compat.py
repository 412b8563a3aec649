"""The Callcp 1.0 API: ``SecureTCPServer`` and ``SecureTCPClient``.

Code written for Callcp 1.0 runs unchanged on these two classes.  They are thin
wrappers over the blocking API (:mod:`callcp.sync`): no protocol logic and no
sockets live here, so they speak callcp/2 with everything it brings (forward
secrecy, server authentication, framing for messages of any size); with
``protocol="callcp1"`` they speak Callcp 1.0's own wire format instead, to
serve or reach unchanged Callcp 1.0 peers during a migration (loudly: see
``docs/guides/migrating.md``).  What changed under the same calls:

- ``SecureTCPServer.start()`` serves many clients at once (one thread each,
  bounded by ``max_connections``); the ``message_callback`` is called from those
  threads, so it must be thread-safe.
- ``SecureTCPClient.connect()`` checks the server's key: against
  ``server_fingerprint`` if given, else against ``~/.callcp/known_hosts`` with
  trust on first use, as SSH does.  A changed key fails with ServerKeyChanged.
- Nothing secret is logged: Callcp 1.0 logged every message; these classes log
  sizes only, and only at DEBUG level.

Options beyond Callcp 1.0 are keyword-only and passed through to
:func:`callcp.sync.serve` / :func:`callcp.sync.connect`.

Bad arguments
-------------
An argument's *value* is checked where it is used (``initialize()``,
``start()``, ``connect()``; attributes such as ``port`` may be changed until
then), and a bad one raises this API's own errors, never a bare ``ValueError``
or ``UnicodeError``.  Each is a SecureTCPServerError and a
SecureTCPClientError, with a one-line message naming the argument:

- TransportError: an address that cannot be used: a host name that is not a
  valid DNS/IDNA name (an empty label, one over 63 characters, a character
  IDNA forbids, whitespace or a control character), or a port that is not
  an integer from 1 to 65535 (0 too on the server: "pick one").  70000, -1,
  ``"abc"``, ``"8436"`` and None are all bad ports: ports often arrive as
  text, so any unusable port is a bad value, not a wrong type.
- KeyManagementError: a malformed ``server_fingerprint`` or ``authorized_keys``
  entry, an unsupported ``key_bits``, a key file that cannot be used.
- LocalProtocolError ("this program misused the API"): any other option out
  of range or contradictory: a timeout <= 0, a limit < 1, ``insecure=True``
  with a ``server_fingerprint``.  The keyword-only tuning options (timeouts,
  limits) are checked as values: anything unusable, whatever its type.

TypeError is kept, as Python's own APIs keep it, for an argument of a type
the method never takes, checked as early as possible: a host that is not a
str (the server's None means every interface), a ``message`` that is not
bytes, a ``message_callback`` that is not callable, a ``logger`` that is not a
``logging.Logger``, a key or known-hosts path that is not a str or
``os.PathLike``, a ``client_key`` of another kind, a fingerprint that is not a
str.  Such a call is a bug in the calling program, to fix rather than to handle.

The console
-----------
Every event is shown once.  With ``use_display=True`` (and rich installed)
the display shows the events (panels and one-line notes on standard output,
warnings and errors on standard error) and they are still logged, marked as
shown (the record attribute ``callcp_displayed``): the console handler this
module adds to its default loggers skips those records, and the INFO lines
the display stands for (the server's "listening" and "stopped"), so nothing
appears twice; warnings the display does not show (a new known host, a
failed handshake) still appear there as log lines.  Handlers the user
configured (on ``logger``, or on an ancestor such as the root logger) receive
every record.  The default loggers (``callcp.server``, ``callcp.client``, as in
Callcp 1.0) get that console handler at INFO only when no handler would
otherwise print their records: after ``logging.basicConfig()`` they log
through the root logger's handlers alone, once.  The errors that
``initialize()``, ``start()``, ``connect()`` and ``send_message()`` raise are
reported this way too (the display's error line, else the log line), so a
program need not print them again (``Server.py`` and ``Client.py`` only set
their exit code); not reported: TypeError, and calls out of order ("Server
not initialized", "already running", "Not connected to server").

Text the peer controls (close and alert reasons, error messages quoting
them, a reply shown by ``Client.py``) is printed with control characters
escaped (``\\x1b``, ``\\r``, ``\\x9b``...): no terminal escape sequence, no
forged line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

from cryptography.hazmat.primitives.asymmetric import rsa

from . import sync
from ._common import DEFAULT_PORT, AuthorizedSource, KeySource
from ._core.errors import (
    CallcpError,
    CloseCode,
    KeyManagementError,
    LocalProtocolError,
    SecureTCPClientError,
    SecureTCPServerError,
    TransportError,
)
from ._core.legacy import MAX_PLAINTEXT as LEGACY_MAX_PLAINTEXT
from ._core.protocol import DEFAULT_MAX_MESSAGE_SIZE
from ._options import CALLCP1, ClientOptions, ServerOptions
from .display import Display, make_display, printable
from .hsm import is_pkcs11_uri
from .keys import KeyPair
from .trust import AuthorizedKeys, normalize_fingerprint

__all__ = ["SecureTCPServer", "SecureTCPClient", "MessageCallback", "DISPLAYED"]

#: Callcp 1.0's message handler: request bytes in, response bytes out.
MessageCallback = Callable[[bytes], bytes]
PathLike = Union[str, "os.PathLike[str]"]

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"

#: The log record attribute set (True) on a record whose event the display
#: has shown: the default console handler skips it; other handlers get it.
DISPLAYED = "callcp_displayed"

# Set (in one thread) while that thread runs a sync.Server call whose INFO
# lines the display stands for: serve_forever() ("listening") and shutdown()
# ("stopped").  Those records come from sync, so they cannot carry DISPLAYED.
_info_shown = threading.local()


class _SkipDisplayed(logging.Filter):
    """The default console handler's filter: one line per event (see the
    module docstring, "The console")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, DISPLAYED, False):
            return False
        return record.levelno >= logging.WARNING or not getattr(_info_shown, "on", False)


@contextlib.contextmanager
def _displaying_info(display: Optional[Display]) -> Iterator[None]:
    """While the block runs (in this thread), the default console handler
    skips INFO records: the display shows what they say."""
    if display is None:
        yield
        return
    before = getattr(_info_shown, "on", False)
    _info_shown.on = True
    try:
        yield
    finally:
        _info_shown.on = before


def _shown(display: Optional[Display]) -> Optional[Mapping[str, object]]:
    """The ``extra=`` of a log call whose event ``display`` also shows."""
    return {DISPLAYED: True} if display is not None else None


def _default_logger(name: str) -> logging.Logger:
    """Callcp 1.0's default logger: a console handler at INFO, added only if
    no handler would print its records (none on it, none on its ancestors)."""
    logger = logging.getLogger(name)
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(_SkipDisplayed())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def _echo(message: bytes) -> bytes:
    return message


def _peer(conn: sync.Connection) -> str:
    addr = conn.remote_address
    if len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return "unknown peer"


# ============================================================ argument checks


def _shorten(value: object) -> str:
    """``repr(value)``, escaped, at most ~80 characters, for an error message."""
    text = repr(value)
    return printable(text if len(text) <= 80 else text[:77] + "...")


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_logger(logger: Optional[logging.Logger]) -> None:
    if logger is not None and not isinstance(logger, logging.Logger):
        raise TypeError(f"logger must be a logging.Logger or None, not {_type_name(logger)}")


def _check_path(name: str, path: object, *, optional: bool) -> None:
    if path is None and optional:
        return
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike path, not {_type_name(path)}")


def _check_address(host: Optional[str], port: int, *, server: bool) -> None:
    """Raises TransportError for an address that cannot be used, TypeError
    for a host that is not a str (see the module docstring)."""
    if not (server and host is None):
        if not isinstance(host, str):
            raise TypeError(f"host must be a str, not {_type_name(host)}")
        if any(c.isspace() or not c.isprintable() for c in host):
            raise TransportError(
                f"invalid host name {_shorten(host)}: it holds whitespace or a control character"
            )
        try:
            host.encode("idna")  # what the resolver does to it (socket.getaddrinfo)
        except UnicodeError as exc:
            # "encoding with 'idna' codec failed (UnicodeError: label too long)"
            found = re.search(r"\((?:UnicodeError: )?(.+)\)$", str(exc))
            why = found.group(1) if found else str(exc)
            raise TransportError(
                f"invalid host name {_shorten(host)}: not a valid DNS or IDNA name ({why})"
            ) from None
    low = 0 if server else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise TransportError(f"invalid port {_shorten(port)}: an integer from {low} to 65535")


def _check_fingerprints(name: str, given: Union[str, Iterable[object]]) -> None:
    """KeyManagementError for a malformed fingerprint in ``given`` (one, or a
    collection), TypeError for one that is not a str."""
    items = [given] if isinstance(given, str) else list(given)
    if not items:
        raise KeyManagementError(f"invalid {name}: give at least one fingerprint")
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must hold str fingerprints, not {_type_name(item)}")
        try:
            normalize_fingerprint(item)
        except ValueError as exc:
            raise KeyManagementError(f"invalid {name}: {printable(str(exc))}") from None


def _check_client_key(client_key: object) -> None:
    if client_key is not None and not isinstance(
        client_key, (KeyPair, rsa.RSAPrivateKey, str, os.PathLike)
    ):
        raise TypeError(
            "client_key must be a KeyPair, an RSA private key or a path, "
            f"not {_type_name(client_key)}"
        )


def _options_error(exc: ValueError) -> LocalProtocolError:
    """An option :class:`ClientOptions` / :class:`ServerOptions` refused."""
    return LocalProtocolError(f"invalid option: {printable(str(exc))}")


def _check_authorized_keys(authorized_keys: object) -> None:
    if authorized_keys is None or isinstance(authorized_keys, (AuthorizedKeys, str, os.PathLike)):
        return
    if isinstance(authorized_keys, (list, set, tuple, frozenset)):
        _check_fingerprints("authorized_keys", authorized_keys)
        return
    raise TypeError(
        "authorized_keys must be a path, fingerprints or an AuthorizedKeys, "
        f"not {_type_name(authorized_keys)}"
    )


# ====================================================================== server


class SecureTCPServer:
    """Callcp 1.0's server: ``initialize()`` then ``start()`` (blocking).

    ``message_callback(request) -> response`` answers each message (default:
    echo).  If it raises, or returns something other than bytes, the error is
    logged on one line (its type only: never message contents) and that client's
    connection is closed with an ``internal error`` close; the server goes on.

    After ``start()`` has bound its socket, :attr:`ready` is set and
    :attr:`port` holds the bound port (useful with ``port=0``).

    Keyword-only options (not in Callcp 1.0): ``key_password`` (else
    ``$CALLCP_KEY_PASSPHRASE``), ``key_bits`` for a generated key,
    ``authorized_keys`` (require client keys), ``max_connections``,
    ``max_handshakes``, ``handshake_timeout``, ``idle_timeout``,
    ``max_message_size``, ``backlog``, ``reuse_port``, ``shutdown_timeout``
    (seconds in-flight requests get to finish on shutdown), ``protocol``
    (``"callcp1"``: speak Callcp 1.0's own wire format, to serve unchanged
    Callcp 1.0 clients; see ``docs/guides/migrating.md``).

    Raises:
        TypeError: ``message_callback`` is not callable, or ``logger`` is not
            a ``logging.Logger`` (the other arguments are checked where they
            are used: see the module docstring, "Bad arguments").
    """

    def __init__(
        self,
        host: str = "0.0.0.0",  # noqa: S104 - Callcp 1.0's documented default
        port: int = DEFAULT_PORT,
        private_key_path: PathLike = "server_private.pem",
        public_key_path: Optional[PathLike] = "server_public.pem",
        message_callback: Optional[MessageCallback] = None,
        logger: Optional[logging.Logger] = None,
        use_display: bool = True,
        *,
        key_password: Optional[str] = None,
        key_bits: int = 2048,
        authorized_keys: Optional[AuthorizedSource] = None,
        max_connections: Optional[int] = None,
        max_handshakes: int = ServerOptions.max_handshakes,
        handshake_timeout: float = ServerOptions.handshake_timeout,
        idle_timeout: Optional[float] = ServerOptions.idle_timeout,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        backlog: int = ServerOptions.backlog,
        reuse_port: bool = False,
        shutdown_timeout: float = ServerOptions.shutdown_timeout,
        protocol: str = ServerOptions.protocol,
    ) -> None:
        if message_callback is not None and not callable(message_callback):
            raise TypeError(
                f"message_callback must be callable, not {_type_name(message_callback)}"
            )
        _check_logger(logger)
        self.host = host
        self.port = port
        self.private_key_path = private_key_path
        self.public_key_path = public_key_path
        self.message_callback: MessageCallback = message_callback or _echo
        self.logger = logger if logger is not None else _default_logger("callcp.server")
        self.use_display = use_display
        self.display: Optional[Display] = make_display(use_display, self.logger)
        self.key_password = key_password
        self.key_bits = key_bits
        self.shutdown_timeout = shutdown_timeout
        self._authorized_keys = authorized_keys
        self._max_connections = max_connections
        self._max_handshakes = max_handshakes
        self._backlog = backlog
        self._handshake_timeout = handshake_timeout
        self._idle_timeout = idle_timeout
        self._max_message_size = max_message_size
        self._reuse_port = reuse_port
        self.protocol = protocol
        #: The server key, once :meth:`initialize` has run.
        self.keypair: Optional[KeyPair] = None
        #: Set once :meth:`start` is listening; cleared when it returns.
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self._running = False
        self._stop_requested = False
        self._server: Optional[sync.Server] = None

    @property
    def fingerprint(self) -> Optional[str]:
        """The server key's ``SHA256:`` fingerprint (None before initialize())."""
        return self.keypair.fingerprint if self.keypair is not None else None

    @property
    def running(self) -> bool:
        """True while start() serves."""
        return self._running

    def _report_error(self, log_message: str, shown_message: str, *args: Any) -> None:
        """An error this API raises: logged, and shown on the display (once)."""
        self.logger.error(log_message, *args, extra=_shown(self.display))
        if self.display is not None:
            self.display.print_error(shown_message)

    def initialize(self) -> None:
        """Load the server key, or generate and save it on first run.

        ``private_key_path`` holds a PKCS#8 PEM private key (mode 0600) and
        ``public_key_path`` its SubjectPublicKeyInfo PEM public key: Callcp
        1.0's files load as they are.  Relative paths (the defaults
        ``server_private.pem`` / ``server_public.pem`` are) name files in the
        working directory at the time of this call.  The log and the display
        say whether the key was generated or loaded.

        Raises:
            KeyManagementError: a key file cannot be read, parsed, decrypted or
                written, the two files do not match, or ``key_bits`` is not
                2048, 3072 or 4096.
            TypeError: a path is not a str or os.PathLike, or ``key_password``
                is not a str, bytes or None.
        """
        _check_path("private_key_path", self.private_key_path, optional=False)
        _check_path("public_key_path", self.public_key_path, optional=True)
        # KeyPair.load_or_generate generates when nothing is at the path (not
        # even a dangling link); a pkcs11: URI is only ever opened.
        generated = not is_pkcs11_uri(self.private_key_path) and not os.path.lexists(
            self.private_key_path
        )
        try:
            self.keypair = KeyPair.load_or_generate(
                self.private_key_path,
                self.public_key_path,
                bits=self.key_bits,
                password=self.key_password,
                # Callcp 1.0 wrote its key files with the process umask (often
                # 0644): its API loads them as they are, with a warning.
                allow_insecure_permissions=True,
            )
        except CallcpError as exc:
            self._report_error("Key management failed: %s", f"Key management failed: {exc}", exc)
            raise
        # (If another process created the file meanwhile, its key was loaded:
        # still "generated" here, a moment ago, by that process.)
        how = "generated" if generated else "loaded"
        fp = self.keypair.fingerprint
        path = printable(os.fspath(self.private_key_path))
        self.logger.info("Server key %s: %s (%s)", how, fp, path, extra=_shown(self.display))
        if self.display is not None:
            self.display.print_success(f"Server key {how}: {fp} ({path})")

    def start(self) -> None:
        """Bind and serve until :meth:`shutdown` or Ctrl-C (blocks).

        Ctrl-C (KeyboardInterrupt) logs "Received shutdown signal", shuts the
        server down gracefully and returns.

        Raises:
            SecureTCPServerError: :meth:`initialize` was not called, or the
                server is already running.
            TransportError: the address cannot be bound (in use, not local),
                or the host or port is not valid.
            KeyManagementError: an ``authorized_keys`` entry is malformed or
                its file cannot be read.
            LocalProtocolError: another option is out of range.
            TypeError: ``host`` is neither a str nor None, or
                ``authorized_keys`` is of an unsupported type.
        """
        keypair = self.keypair
        if keypair is None:
            raise SecureTCPServerError("Server not initialized. Call initialize() first.")
        with self._lock:
            if self._running:
                raise SecureTCPServerError("Server is already running")
            self._running = True
            self._stop_requested = False
        try:
            self._serve(keypair)
        finally:
            self.shutdown()
            with self._lock:
                self._running = False
            self.ready.clear()

    def _options(self, keypair: KeyPair) -> ServerOptions:
        _check_address(self.host, self.port, server=True)
        _check_authorized_keys(self._authorized_keys)
        try:
            return ServerOptions(
                key=keypair,
                authorized_keys=self._authorized_keys,
                max_connections=self._max_connections,
                max_handshakes=self._max_handshakes,
                handshake_timeout=self._handshake_timeout,
                idle_timeout=self._idle_timeout,
                max_message_size=self._max_message_size,
                shutdown_timeout=self.shutdown_timeout,
                backlog=self._backlog,
                reuse_port=self._reuse_port,
                protocol=self.protocol,
                logger=self.logger,
            )
        except ValueError as exc:
            raise _options_error(exc) from None

    def _serve(self, keypair: KeyPair) -> None:
        try:
            server = sync.Server(self._handle, self.host, self.port, self._options(keypair))
        except CallcpError as exc:
            self._report_error(
                "Failed to start server on %s:%s: %s",
                f"Failed to start server: {exc}",
                printable(str(self.host)),
                printable(str(self.port)),
                exc,
            )
            raise
        with self._lock:
            self._server = server
            stop = self._stop_requested
        self.port = server.port
        if stop:  # shutdown() was called while we were binding
            return
        if self.display is not None:
            self.display.startup_banner(
                self.host, self.port, keypair.fingerprint, legacy=self.protocol == CALLCP1
            )
        self.ready.set()
        try:
            with _displaying_info(self.display):  # its "listening" line: the banner
                server.serve_forever()
        except KeyboardInterrupt:
            self.logger.info("Received shutdown signal", extra=_shown(self.display))
            if self.display is not None:
                self.display.print_warning("Received shutdown signal")

    def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (``shutdown_timeout``),
        then close every connection.  Safe from any thread, idempotent; a
        no-op when the server is not running.  Never raises."""
        with self._lock:
            self._stop_requested = True
            server, self._server = self._server, None
        if server is None:
            return
        self.logger.info("Shutting down server", extra=_shown(self.display))
        try:
            with _displaying_info(self.display):  # its "stopped" line: "Server stopped"
                server.shutdown(self.shutdown_timeout)
        except Exception as exc:  # shutdown must not raise: report and go on
            self.logger.error("Error during shutdown: %s", exc)
        if self.display is not None:
            self.display.print_info("Server stopped")

    # ------------------------------------------------------------- per client

    def _callback_failed(self, conn: sync.Connection, peer: str, count: int, what: str) -> None:
        """Log a failed ``message_callback`` on one line and close the connection."""
        self.logger.error(
            "message_callback %s on message %d from %s; closing the connection",
            what,
            count,
            peer,
            extra=_shown(self.display),
        )
        if self.display is not None:
            self.display.print_error(f"{peer}: message_callback {what}; connection closed")
        conn.close(CloseCode.INTERNAL_ERROR, "internal server error")

    def _handle(self, conn: sync.Connection) -> None:
        """The sync handler: one call of ``message_callback`` per message.

        A connection that ends in an error is logged by the server (on one
        line, rate-limited against floods), not shown again here."""
        peer = _peer(conn)
        display = self.display
        if display is not None:
            display.connection_banner(peer, conn.peer_fingerprint)
            display.channel_panel(legacy=self.protocol == CALLCP1)
        count = 0
        for message in conn:
            count += 1
            try:
                reply = self.message_callback(message)
            except Exception as exc:
                # The exception's type only: its text may quote the data.
                self._callback_failed(conn, peer, count, f"raised {type(exc).__name__}")
                return
            if not isinstance(reply, (bytes, bytearray, memoryview)):
                what = f"returned {type(reply).__name__}, not bytes"
                self._callback_failed(conn, peer, count, what)
                return
            if self.protocol == CALLCP1 and len(reply) > LEGACY_MAX_PLAINTEXT:
                what = f"returned {len(reply)} bytes, over Callcp 1.0's {LEGACY_MAX_PLAINTEXT}"
                self._callback_failed(conn, peer, count, what)
                return
            conn.send(reply)
            self.logger.debug(
                "%s: message %d: %d bytes in, %d bytes out",
                peer,
                count,
                len(message),
                len(reply),
                extra=_shown(display),
            )
            if display is not None:
                display.print_info(
                    f"{peer}: received {len(message)} bytes, replied {len(reply)} bytes"
                )
        self.logger.info(
            "Client %s disconnected after %d messages", peer, count, extra=_shown(display)
        )
        if display is not None:
            display.print_info(f"{peer} disconnected ({count} messages)")


# ====================================================================== client


class SecureTCPClient:
    """Callcp 1.0's client: ``connect()``, ``send_message()``, ``disconnect()``.

    The server's key is checked on connect: against ``server_fingerprint``
    (``SHA256:...``) if given, else the ``known_hosts`` file (default
    ``~/.callcp/known_hosts``), trusting an unknown server on first use unless
    ``trust_on_first_use=False``.  ``insecure=True`` turns checking off, loudly.

    Keyword-only options (not in Callcp 1.0): ``timeout`` (seconds for connect
    and each reply; None waits forever), ``server_fingerprint``,
    ``known_hosts``, ``trust_on_first_use``, ``insecure``, ``client_key``
    (KeyPair, RSA key or PEM path, for servers that require client keys),
    ``key_password``, ``max_message_size`` (the largest reply accepted),
    ``protocol`` (``"callcp1"``: speak Callcp 1.0's own wire format, to talk
    to an unchanged Callcp 1.0 server; see ``docs/guides/migrating.md``).

    Raises:
        TypeError: ``logger`` is not a ``logging.Logger`` (the other
            arguments are checked by :meth:`connect`: see the module
            docstring, "Bad arguments").
    """

    def __init__(
        self,
        host: str = "localhost",
        port: int = DEFAULT_PORT,
        logger: Optional[logging.Logger] = None,
        use_display: bool = True,
        *,
        timeout: Optional[float] = ClientOptions.timeout,
        server_fingerprint: Optional[str] = None,
        known_hosts: Optional[PathLike] = None,
        trust_on_first_use: bool = True,
        insecure: bool = False,
        client_key: Optional[KeySource] = None,
        key_password: Optional[str] = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        protocol: str = ClientOptions.protocol,
    ) -> None:
        _check_logger(logger)
        self.host = host
        self.port = port
        self.logger = logger if logger is not None else _default_logger("callcp.client")
        self.use_display = use_display
        self.display: Optional[Display] = make_display(use_display, self.logger)
        self.timeout = timeout
        self.server_fingerprint = server_fingerprint
        self.known_hosts = known_hosts
        self.trust_on_first_use = trust_on_first_use
        self.insecure = insecure
        self.client_key = client_key
        self.key_password = key_password
        self.max_message_size = max_message_size
        self.protocol = protocol
        self._conn: Optional[sync.Connection] = None
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> Optional[str]:
        """The connected server's key fingerprint (None when not connected)."""
        conn = self._conn
        return conn.peer_fingerprint if conn is not None else None

    def is_connected(self) -> bool:
        """True while connected."""
        conn = self._conn
        return conn is not None and not conn.closed

    def connect(self) -> None:
        """Connect and run the handshake (a no-op when already connected).

        Raises (all SecureTCPClientError subclasses, messages starting
        "Failed to connect: "):
            ServerKeyChanged: the server's key differs from the pinned or known one.
            UnknownServerKey: the server is unknown and TOFU is off.
            HandshakeError: any other handshake failure.
            TransportError: nothing listening, unreachable, timed out; or the
                host or port is not valid.
            KeyManagementError: ``client_key`` could not be loaded, or
                ``server_fingerprint`` is malformed.
            LocalProtocolError: another option is out of range or
                contradictory (``insecure=True`` with a pin).
        And, before any network traffic:
            TypeError: ``host`` is not a str, a path is not a str or
                os.PathLike, ``client_key`` or ``server_fingerprint`` is of an
                unsupported type.
        """
        if self.is_connected():
            return
        self._check_types()  # (a TypeError is a bug in the caller: raised as is)
        display = self.display
        try:
            if display is not None:
                with display.status(f"Connecting to {self.host}:{self.port}…"):
                    conn = self._open()
            else:
                conn = self._open()
        except SecureTCPClientError as exc:
            # Keep the specific class (and its attributes); add 1.0's prefix.
            exc.args = (f"Failed to connect: {exc}",)
            self.logger.error("%s", exc, extra=_shown(display))
            if display is not None:
                display.print_error(str(exc))
            raise
        self._conn = conn
        self.logger.info(
            "Connected to %s:%s (server key %s)",
            self.host,
            self.port,
            conn.peer_fingerprint,
            extra=_shown(display),
        )
        if display is not None:
            legacy = self.protocol == CALLCP1
            peer = f"{self.host}:{self.port}"
            display.handshake_panel(peer, conn.peer_fingerprint, legacy=legacy)
            display.channel_panel(legacy=legacy)

    def _check_types(self) -> None:
        """TypeError for an argument of a type :meth:`connect` never takes."""
        if not isinstance(self.host, str):
            raise TypeError(f"host must be a str, not {_type_name(self.host)}")
        _check_path("known_hosts", self.known_hosts, optional=True)
        _check_client_key(self.client_key)
        pins = self.server_fingerprint
        if not (
            pins is None
            or isinstance(pins, str)
            or (
                isinstance(pins, (list, tuple, set, frozenset))
                and all(isinstance(pin, str) for pin in pins)
            )
        ):
            raise TypeError(
                f"server_fingerprint must be a str or a list of str, not {_type_name(pins)}"
            )

    def _options(self) -> ClientOptions:
        """The options, their values checked (the module docstring, "Bad arguments")."""
        _check_address(self.host, self.port, server=False)
        if self.server_fingerprint is not None:
            _check_fingerprints("server_fingerprint", self.server_fingerprint)
        try:
            return ClientOptions(
                timeout=self.timeout,
                server_fingerprint=self.server_fingerprint,
                known_hosts=os.fspath(self.known_hosts) if self.known_hosts is not None else None,
                trust_on_first_use=self.trust_on_first_use,
                insecure=self.insecure,
                client_key=self.client_key,
                key_password=self.key_password,
                max_message_size=self.max_message_size,
                protocol=self.protocol,
                logger=self.logger,
            )
        except ValueError as exc:
            raise _options_error(exc) from None

    def _open(self) -> sync.Connection:
        conn = sync.open_connection(self.host, self.port, self._options())
        try:  # Callcp 1.0's connect() returned with the handshake done: so does this one
            conn.do_handshake(confirm=True)
        except BaseException:
            conn.close()
            raise
        return conn

    def send_message(self, message: bytes) -> bytes:
        """Send ``message`` (any size) and return the server's response.

        Requests from several threads are serialised.  After any error the
        connection is closed (a later reply could not be matched to its
        request): call :meth:`connect` again to go on.

        Raises:
            SecureTCPClientError: not connected ("Not connected to server.
                Call connect() first.").
            TypeError: ``message`` is not bytes-like.
            ConnectionClosed: the server closed the connection, e.g. because
                the message exceeded its size limit or its handler failed.
            MessageTooLarge, CryptoError, RemoteProtocolError: the reply was
                too large or corrupt.
            CallcpTimeout, TransportError: the network failed or timed out.
        """
        conn = self._conn
        if conn is None or conn.closed:
            raise SecureTCPClientError("Not connected to server. Call connect() first.")
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise TypeError(f"message must be bytes, not {type(message).__name__}")
        display = self.display
        if display is not None:
            display.message("Client →", bytes(message))
        try:
            with self._lock:
                reply = conn.request(message)
        except CallcpError as exc:
            self.logger.error(
                "Request to %s:%s failed: %s", self.host, self.port, exc, extra=_shown(display)
            )
            if display is not None:
                display.print_error(f"Request failed: {exc}")
            self.disconnect()
            raise
        self.logger.debug(
            "Sent %d bytes, received %d bytes", len(message), len(reply), extra=_shown(display)
        )
        if display is not None:
            display.print_success(f"Server replied ({len(reply)} bytes)")
        return reply

    def disconnect(self) -> None:
        """Close the connection (authenticated close).  Idempotent; never raises."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.close()
        except Exception as exc:  # never raise from disconnect
            self.logger.debug("Error while disconnecting: %s", exc)
        self.logger.info(
            "Disconnected from %s:%s", self.host, self.port, extra=_shown(self.display)
        )
        if self.display is not None:
            self.display.print_info("Disconnected")

    def __enter__(self) -> SecureTCPClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()
