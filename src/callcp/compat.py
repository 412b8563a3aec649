"""The Callcp 1.0 API: ``SecureTCPServer`` and ``SecureTCPClient``.

Code written for Callcp 1.0 runs unchanged on these two classes.  They are thin
wrappers over the blocking API (:mod:`callcp.sync`): no protocol logic and no
sockets live here, so they speak callcp/2 with everything it brings (forward
secrecy, server authentication, framing for messages of any size).  What
changed under the same calls:

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
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Optional, Union

from . import sync
from ._common import DEFAULT_PORT, AuthorizedSource, KeySource
from ._core.errors import (
    CallcpError,
    CloseCode,
    SecureTCPClientError,
    SecureTCPServerError,
)
from ._core.protocol import DEFAULT_MAX_MESSAGE_SIZE
from ._options import ClientOptions, ServerOptions
from .display import Display, make_display
from .keys import KeyPair

__all__ = ["SecureTCPServer", "SecureTCPClient", "MessageCallback"]

#: Callcp 1.0's message handler: request bytes in, response bytes out.
MessageCallback = Callable[[bytes], bytes]
PathLike = Union[str, "os.PathLike[str]"]

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


def _default_logger(name: str) -> logging.Logger:
    """Callcp 1.0's default logger: a stream handler at INFO, added only if the
    logger has no handler yet."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
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
    (seconds in-flight requests get to finish on shutdown).
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
    ) -> None:
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
        return self._running

    def initialize(self) -> None:
        """Load the server key, or generate and save it on first run.

        ``private_key_path`` holds a PKCS#8 PEM private key (mode 0600) and
        ``public_key_path`` its SubjectPublicKeyInfo PEM public key: Callcp
        1.0's files load as they are.

        Raises:
            KeyManagementError: a key file cannot be read, parsed, decrypted or
                written, or the two files do not match.
        """
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
            self.logger.error("Key management failed: %s", exc)
            if self.display is not None:
                self.display.print_error(f"Key management failed: {exc}")
            raise
        self.logger.info("Server key %s (%s)", self.keypair.fingerprint, self.private_key_path)
        if self.display is not None:
            self.display.print_success(f"Server key loaded: {self.keypair.fingerprint}")

    def start(self) -> None:
        """Bind and serve until :meth:`shutdown` or Ctrl-C (blocks).

        Ctrl-C (KeyboardInterrupt) logs "Received shutdown signal", shuts the
        server down gracefully and returns.

        Raises:
            SecureTCPServerError: :meth:`initialize` was not called, or the
                server is already running.
            TransportError: the address cannot be bound (in use, not local).
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

    def _serve(self, keypair: KeyPair) -> None:
        try:
            options = ServerOptions(
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
                logger=self.logger,
            )
            server = sync.Server(self._handle, self.host, self.port, options)
        except CallcpError as exc:
            self.logger.error("Failed to start server on %s:%s: %s", self.host, self.port, exc)
            if self.display is not None:
                self.display.print_error(f"Failed to start server: {exc}")
            raise
        with self._lock:
            self._server = server
            stop = self._stop_requested
        self.port = server.port
        if stop:  # shutdown() was called while we were binding
            return
        if self.display is not None:
            self.display.startup_banner(self.host, self.port, keypair.fingerprint)
        self.ready.set()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            self.logger.info("Received shutdown signal")
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
        self.logger.info("Shutting down server")
        try:
            server.shutdown(self.shutdown_timeout)
        except Exception as exc:  # shutdown must not raise: report and go on
            self.logger.error("Error during shutdown: %s", exc)
        if self.display is not None:
            self.display.print_info("Server stopped")

    # ------------------------------------------------------------- per client

    def _callback_failed(self, conn: sync.Connection, peer: str, count: int, what: str) -> None:
        """Log a failed ``message_callback`` on one line and close the connection."""
        self.logger.error(
            "message_callback %s on message %d from %s; closing the connection", what, count, peer
        )
        if self.display is not None:
            self.display.print_error(f"{peer}: message_callback {what}; connection closed")
        conn.close(CloseCode.INTERNAL_ERROR, "internal server error")

    def _handle(self, conn: sync.Connection) -> None:
        """The sync handler: one call of ``message_callback`` per message."""
        peer = _peer(conn)
        display = self.display
        if display is not None:
            display.connection_banner(peer, conn.peer_fingerprint)
            display.channel_panel()
        count = 0
        try:
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
                conn.send(reply)
                self.logger.debug(
                    "%s: message %d: %d bytes in, %d bytes out",
                    peer,
                    count,
                    len(message),
                    len(reply),
                )
                if display is not None:
                    display.print_info(
                        f"{peer}: received {len(message)} bytes, replied {len(reply)} bytes"
                    )
        except CallcpError as exc:
            if display is not None:
                display.print_warning(f"{peer}: connection ended: {exc}")
            raise  # sync.Server logs it on one line
        self.logger.info("Client %s disconnected after %d messages", peer, count)
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
    ``key_password``, ``max_message_size`` (the largest reply accepted).
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
    ) -> None:
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
        self._conn: Optional[sync.Connection] = None
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> Optional[str]:
        """The connected server's key fingerprint (None when not connected)."""
        conn = self._conn
        return conn.peer_fingerprint if conn is not None else None

    def is_connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed

    def connect(self) -> None:
        """Connect and run the handshake (a no-op when already connected).

        Raises (all SecureTCPClientError subclasses, messages starting
        "Failed to connect: "):
            ServerKeyChanged: the server's key differs from the pinned or known one.
            UnknownServerKey: the server is unknown and TOFU is off.
            HandshakeError: any other handshake failure.
            TransportError: nothing listening, unreachable, timed out.
            KeyManagementError: ``client_key`` could not be loaded.
        """
        if self.is_connected():
            return
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
            self.logger.error("%s", exc)
            if display is not None:
                display.print_error(str(exc))
            raise
        self._conn = conn
        self.logger.info(
            "Connected to %s:%s (server key %s)", self.host, self.port, conn.peer_fingerprint
        )
        if display is not None:
            display.handshake_panel(f"{self.host}:{self.port}", conn.peer_fingerprint)
            display.channel_panel()

    def _open(self) -> sync.Connection:
        conn = sync.connect(
            self.host,
            self.port,
            timeout=self.timeout,
            server_fingerprint=self.server_fingerprint,
            known_hosts=os.fspath(self.known_hosts) if self.known_hosts is not None else None,
            trust_on_first_use=self.trust_on_first_use,
            insecure=self.insecure,
            client_key=self.client_key,
            key_password=self.key_password,
            max_message_size=self.max_message_size,
            logger=self.logger,
        )
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
            self.logger.error("Request to %s:%s failed: %s", self.host, self.port, exc)
            if display is not None:
                display.print_error(f"Request failed: {exc}")
            self.disconnect()
            raise
        self.logger.debug("Sent %d bytes, received %d bytes", len(message), len(reply))
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
        self.logger.info("Disconnected from %s:%s", self.host, self.port)
        if self.display is not None:
            self.display.print_info("Disconnected")

    def __enter__(self) -> SecureTCPClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()
