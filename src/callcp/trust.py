"""Who trusts whom: server authentication for clients, client authorization for servers.

A client decides whether the server's RSA key is the right one with a
:class:`ServerKeyPolicy`:

- :meth:`ServerKeyPolicy.pinned` — the key must have one exact fingerprint;
- :meth:`ServerKeyPolicy.known_hosts` — as SSH does: a known-hosts file maps
  ``host:port`` to a fingerprint; an unknown server is trusted on first use (and
  recorded) unless that is turned off; a *changed* key is always a hard failure;
- :meth:`ServerKeyPolicy.insecure` — no checking at all, explicitly and loudly.

A server decides which clients may connect with :class:`AuthorizedKeys`, a set
of client key fingerprints.

Fingerprints are ``SHA256:<base64, no padding>`` of the DER SubjectPublicKeyInfo
(:func:`callcp._core.keys.fingerprint`), as ``callcp fingerprint`` prints them.
Where people type them (pins, files), :func:`normalize_fingerprint` also takes
the base64 with padding or without the ``SHA256:`` prefix, and hex.

Known-hosts file format
    UTF-8 text, one entry per line: ``host:port SHA256:<base64>``; anything after
    the fingerprint is a comment.  IPv6 addresses are bracketed
    (``[::1]:8436``).  Host names are compared case-insensitively and IP
    addresses in one canonical form (every spelling the system's resolver
    takes, ``127.1`` or ``0x7f.0.0.1`` or ``::ffff:127.0.0.1``, is
    ``127.0.0.1``).  ``#`` comments and blank lines are ignored, and
    so are malformed lines (:meth:`KnownHosts.entries` reports them) — except
    that a malformed line naming the very ``host:port`` being checked fails the
    check instead of letting trust-on-first-use paper over it.  Several lines for
    one ``host:port`` are allowed (any of their keys is accepted).  The file is
    created with mode 0600 in a directory created with mode 0700.

All file access here is blocking; asyncio callers should run
:meth:`ServerKeyPolicy.verify` in an executor when a known-hosts file is used.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import ipaddress
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from ._core.errors import (
    KeyManagementError,
    ServerKeyChanged,
    ServerKeyError,
    ServerKeyRevoked,
    UnknownServerKey,
)
from ._core.keys import fingerprint as _key_fingerprint
from .keys import StrPath, _cause, _make_parent, _parse_public_pem, _read_file, _write_atomic

if sys.platform != "win32":
    import fcntl

__all__ = [
    "DEFAULT_KNOWN_HOSTS",
    "AuthorizedKeys",
    "KnownHosts",
    "KnownHostsEntry",
    "MalformedLine",
    "ServerKeyPolicy",
    "VerifyResult",
    "format_address",
    "normalize_fingerprint",
]

logger = logging.getLogger(__name__)

#: Where clients remember servers' keys (``~`` is expanded when the file is used).
DEFAULT_KNOWN_HOSTS = Path("~/.callcp/known_hosts")

#: What :meth:`ServerKeyPolicy.verify` reports on success.
VerifyResult = Literal["pinned", "known", "rotated", "new", "unrecorded", "insecure"]

# Known-hosts and authorized-keys files can be longer than key files.
_MAX_LIST_FILE_SIZE = 16 << 20

_B64_FP = re.compile(r"[A-Za-z0-9+/]{43}=?")
_HEX_FP = re.compile(r"[0-9a-fA-F]{64}")
_PORT = re.compile(r"[0-9]{1,5}")


# ---------------------------------------------------------------------------
# Fingerprints and addresses


def normalize_fingerprint(text: str) -> str:
    """The canonical ``SHA256:<base64>`` form of a typed SHA-256 key fingerprint.

    Accepts ``SHA256:<base64>`` (the prefix in any case, with or without ``=``
    padding), the bare base64, and 64 hex digits (optionally ``:``-separated,
    optionally prefixed).

    Raises:
        ValueError: ``text`` is not a SHA-256 fingerprint in any of those forms.
        TypeError: ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"a fingerprint must be a str, not {type(text).__name__}")
    body = text.strip()
    if body[:7].lower() == "sha256:":
        body = body[7:]
    digest: Optional[bytes] = None
    if _B64_FP.fullmatch(body):
        try:
            digest = base64.b64decode(body.rstrip("=") + "=", validate=True)
        except binascii.Error:
            digest = None
    elif _HEX_FP.fullmatch(body.replace(":", "")):
        digest = bytes.fromhex(body.replace(":", ""))
    if digest is None or len(digest) != 32:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ValueError(
            f"not a SHA-256 key fingerprint: {shown!r}; expected 'SHA256:' followed by "
            "43 base64 characters, as `callcp fingerprint` prints"
        )
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


_INET_ATON_CHARS = frozenset("0123456789abcdefABCDEFxX.")


def _ip_of(text: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The IP address ``text`` spells, in any form the system's resolver
    takes (``127.1``, ``0x7f.0.0.1``, ``2130706433``, ``127.000.000.001``:
    inet_aton's octal and hex parts), IPv4-mapped IPv6 as IPv4; else None."""
    ip: Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        ip = None
        if text and text[0].isdigit() and _INET_ATON_CHARS.issuperset(text):
            try:
                ip = ipaddress.IPv4Address(socket.inet_aton(text))
            except OSError:
                return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _normalize_host(host: str) -> str:
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, not {type(host).__name__}")
    h = host
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if not h.isascii():
        # As the resolver does: IDNA (fullwidth digits, zero-width characters
        # and the like fold away), so no spelling is a new host to it.
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"not a valid host name or IP address: {host!r}") from None
    ip = _ip_of(h)
    if ip is not None:
        scope = getattr(ip, "scope_id", None)
        if scope is not None and not _ZONE.fullmatch(scope):
            raise ValueError(f"not a valid IPv6 zone in {host!r}")
        return str(ip)
    h = h.lower()
    if h.endswith(".") and len(h) > 1:  # (the root's dot: example.org. is example.org)
        h = h[:-1]
    if not h or any(c.isspace() or c in "#[]:/\\" or ord(c) < 32 for c in h):
        raise ValueError(f"not a valid host name or IP address: {host!r}")
    return h


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, not {type(port).__name__}")
    if not 0 < port < 65536:
        raise ValueError(f"port must be between 1 and 65535, not {port}")
    return port


def format_address(host: str, port: int) -> str:
    """``host:port`` as known-hosts files write it: ``[::1]:8436`` for IPv6.

    Host names are lower-cased and IP addresses put in canonical form.

    Raises:
        ValueError: the host or port is not valid (whitespace, ``#``, port out
            of range...).
        TypeError: ``host`` is not a str or ``port`` not an int.
    """
    h = _normalize_host(host)
    _check_port(port)
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


def _parse_address(text: str) -> str:
    """Parse a known-hosts ``host:port`` field into its canonical form."""
    if text.startswith("["):
        end = text.find("]:")
        if end < 0:
            raise ValueError("bracketed address without ']:port'")
        host, port_text = text[1:end], text[end + 2 :]
        if ":" not in host:
            raise ValueError("brackets are for IPv6 addresses only")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("no ':port'")
        if ":" in host:
            raise ValueError("IPv6 addresses must be bracketed, as in [::1]:8436")
    if not _PORT.fullmatch(port_text):
        raise ValueError(f"bad port {port_text!r}")
    return format_address(host, int(port_text))


# ---------------------------------------------------------------------------
# Known hosts


@dataclass(frozen=True)
class KnownHostsEntry:
    """One valid known-hosts line."""

    lineno: int
    host: str
    port: int
    fingerprint: str
    #: an ``@revoked`` line: this key is refused (host ``*``: for every server)
    revoked: bool = False

    @property
    def address(self) -> str:
        """``host:port`` as written in the file (IPv6 bracketed; ``*`` for
        an ``@revoked`` line that names every server)."""
        return "*" if self.host == "*" else format_address(self.host, self.port)


@dataclass(frozen=True)
class MalformedLine:
    """A known-hosts line that could not be parsed (it is otherwise ignored).

    ``address`` is the canonical ``host:port`` when that much of the line parsed.
    """

    lineno: int
    text: str
    reason: str
    address: Optional[str] = None


KnownHostsLine = Union[KnownHostsEntry, MalformedLine]

# One lock for every KnownHosts in this process: check-then-write sequences
# (trust on first use) must not interleave between threads.
_KNOWN_HOSTS_LOCK = threading.RLock()


def _parse_known_hosts(text: str) -> list[KnownHostsLine]:
    result: list[KnownHostsLine] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        revoked = fields[0] == "@revoked"
        if fields[0].startswith("@"):
            if not revoked:
                result.append(MalformedLine(lineno, raw, f"unknown marker {fields[0]}"))
                continue
            fields = fields[1:]
            if not fields:
                result.append(MalformedLine(lineno, raw, "@revoked without a host"))
                continue
        if revoked and fields[0] == "*":
            address = "*"
        else:
            try:
                address = _parse_address(fields[0])
            except (ValueError, TypeError) as exc:
                result.append(MalformedLine(lineno, raw, f"bad host:port field: {exc}"))
                continue
        if len(fields) < 2:
            result.append(MalformedLine(lineno, raw, "no fingerprint", address))
            continue
        try:
            fp = normalize_fingerprint(fields[1])
        except ValueError:
            result.append(MalformedLine(lineno, raw, "bad fingerprint", address))
            continue
        if address == "*":
            result.append(KnownHostsEntry(lineno, "*", 0, fp, revoked=True))
            continue
        host, _, port = address.rpartition(":")
        result.append(KnownHostsEntry(lineno, host.strip("[]"), int(port), fp, revoked))
    return result


class KnownHosts:
    """A known-hosts file: which key each ``host:port`` is known to have.

    ``path`` defaults to :data:`DEFAULT_KNOWN_HOSTS`; ``~`` is expanded each
    time the file is used.  A missing file is an empty list.
    """

    def __init__(self, path: Optional[StrPath] = None) -> None:
        self._path = Path(path) if path is not None else DEFAULT_KNOWN_HOSTS

    @property
    def path(self) -> Path:
        """The file's path, with ``~`` expanded."""
        return self._path.expanduser()

    def __repr__(self) -> str:
        return f"KnownHosts({os.fspath(self._path)!r})"

    # -- reading ------------------------------------------------------------

    def _read(self) -> str:
        path = self.path
        try:
            data = _read_file(path, "known hosts", _MAX_LIST_FILE_SIZE)
        except KeyManagementError as exc:
            # A missing file, or a missing directory on the way, is an empty list.
            if isinstance(exc.__cause__, (FileNotFoundError, NotADirectoryError)):
                return ""
            raise
        # surrogateescape: undecodable lines stay malformed, and survive rewrites.
        return data.decode("utf-8", errors="surrogateescape")

    def entries(self) -> list[KnownHostsLine]:
        """Every entry and every malformed line, in file order.

        Valid lines are :class:`KnownHostsEntry`, bad ones :class:`MalformedLine`;
        comments and blank lines are left out.

        Raises:
            KeyManagementError: the file exists but cannot be read.
        """
        return _parse_known_hosts(self._read())

    def _find(self, address: str) -> tuple[list[KnownHostsEntry], list[MalformedLine]]:
        found: list[KnownHostsEntry] = []
        bad: list[MalformedLine] = []
        for item in self.entries():
            if isinstance(item, KnownHostsEntry):
                if item.address == address:
                    found.append(item)
            elif item.address == address:
                bad.append(item)
        return found, bad

    def lookup(self, host: str, port: int) -> Optional[str]:
        """The fingerprint recorded for ``host:port`` (the first, if several), or None.

        Raises:
            KeyManagementError: the file exists but cannot be read.
            ValueError, TypeError: ``host`` or ``port`` is not valid.
        """
        found, _ = self._find(format_address(host, port))
        keys = [entry for entry in found if not entry.revoked]
        return keys[0].fingerprint if keys else None

    # -- writing ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise check-then-write among threads, and processes where possible.

        Across processes this takes an advisory flock on the file's directory
        (POSIX, best effort; nothing is locked if the directory is missing).
        """
        with _KNOWN_HOSTS_LOCK:
            if sys.platform == "win32":
                yield
                return
            try:
                dir_fd: Optional[int] = os.open(self.path.parent, os.O_RDONLY)
            except OSError:
                dir_fd = None
            try:
                if dir_fd is not None:
                    try:
                        fcntl.flock(dir_fd, fcntl.LOCK_EX)
                    except OSError:
                        pass
                yield
            finally:
                if dir_fd is not None:
                    os.close(dir_fd)  # closing drops the lock

    def _ensure_dir(self) -> None:
        _make_parent(self.path, "known hosts", 0o700)

    def _append(self, text: str, line: str) -> None:
        """Append ``line`` to the file whose current contents are ``text``."""
        if any(c in line for c in "\n\r\x00"):  # (one line, whatever made it)
            raise ValueError("a known-hosts line may not hold a line break or NUL")
        path = self.path
        self._ensure_dir()
        data = line + "\n"
        if text and not text.endswith("\n"):
            data = "\n" + data
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags, 0o600)
            try:
                os.write(fd, data.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise KeyManagementError(
                f"cannot write known hosts file {path}: {_cause(exc)}"
            ) from exc

    def _rewrite(self, lines: Iterable[str]) -> None:
        body = "".join(line + "\n" for line in lines)
        if "\x00" in body or "\r" in body:
            raise ValueError("a known-hosts line may not hold NUL or CR")
        self._ensure_dir()
        _write_atomic(
            self.path, body.encode("utf-8", errors="surrogateescape"), 0o600, "known hosts"
        )

    def add(self, host: str, port: int, fingerprint: str) -> None:
        """Record ``fingerprint`` as the key of ``host:port``.

        Any other entries for ``host:port`` are replaced (the file is rewritten
        atomically, keeping all other lines); a new host is appended.  The file
        is created with mode 0600, its directory with 0700.

        Raises:
            KeyManagementError: the file cannot be read or written.
            ValueError: the host, port or fingerprint is not valid.
            TypeError: an argument has the wrong type.
        """
        address = format_address(host, port)
        fp = normalize_fingerprint(fingerprint)
        new_line = f"{address} {fp}"
        with self._locked():
            text = self._read()
            mine = [item for item in _parse_known_hosts(text) if item.address == address]
            if not mine:
                self._append(text, new_line)
                return
            if all(isinstance(item, KnownHostsEntry) and item.fingerprint == fp for item in mine):
                return  # already recorded, and nothing else for this address
            drop = {item.lineno for item in mine}
            kept = [line for n, line in enumerate(text.splitlines(), start=1) if n not in drop]
            self._rewrite([*kept, new_line])

    def add_also(self, host: str, port: int, fingerprint: str) -> bool:
        """Record ``fingerprint`` as one more accepted key of ``host:port``
        (an announced next key), keeping the others; False if it was there.

        Raises: as :meth:`add`.
        """
        address = format_address(host, port)
        fp = normalize_fingerprint(fingerprint)
        with self._locked():
            text = self._read()
            for item in _parse_known_hosts(text):
                if (
                    isinstance(item, KnownHostsEntry)
                    and item.address == address
                    and item.fingerprint == fp
                ):
                    return False
            self._append(text, f"{address} {fp}")
            return True

    def forget_older(self, host: str, port: int, fingerprint: str) -> int:
        """The server proved ``fingerprint``: drop the keys of ``host:port``
        recorded before it (the keys it replaced); return how many.

        Raises: as :meth:`add`.
        """
        address = format_address(host, port)
        fp = normalize_fingerprint(fingerprint)
        with self._locked():
            text = self._read()
            older: set[int] = set()
            for item in _parse_known_hosts(text):
                if not isinstance(item, KnownHostsEntry) or item.address != address:
                    continue
                if item.revoked:
                    continue
                if item.fingerprint == fp:
                    break
                older.add(item.lineno)
            else:
                return 0  # (not recorded: nothing to go by)
            if older:
                self._rewrite(
                    line for n, line in enumerate(text.splitlines(), start=1) if n not in older
                )
            return len(older)

    def remove(self, host: str, port: Optional[int] = None) -> list[KnownHostsLine]:
        """Delete every line for ``host:port`` (every port of ``host`` if
        ``port`` is None), malformed ones and ``@revoked`` markers for it
        too; return what was removed.  ``host`` is matched in canonical form:
        ``127.1`` removes ``127.0.0.1``'s lines, but not ``localhost``'s.

        Raises:
            KeyManagementError: the file cannot be read or rewritten.
            ValueError, TypeError: ``host`` or ``port`` is not valid.
        """
        if port is None:
            wanted = _normalize_host(host)

            def mine(address: Optional[str]) -> bool:
                return address is not None and address.rpartition(":")[0].strip("[]") == wanted

        else:
            exact = format_address(host, port)

            def mine(address: Optional[str]) -> bool:
                return address == exact

        with self._locked():
            text = self._read()
            gone = [item for item in _parse_known_hosts(text) if mine(item.address)]
            if gone:
                drop = {item.lineno for item in gone}
                self._rewrite(
                    line for n, line in enumerate(text.splitlines(), start=1) if n not in drop
                )
            return gone

    def revoke(self, fingerprint: str, host: str = "*", port: Optional[int] = None) -> bool:
        """Mark ``fingerprint`` ``@revoked``: refused, loudly, for every
        server (``host`` ``*``) or for ``host:port``, whatever else the file
        says.  False if it was marked already.

        Raises: as :meth:`add`.
        """
        fp = normalize_fingerprint(fingerprint)
        if host == "*":
            address = "*"
        else:
            if port is None:
                raise ValueError("revoking a key for one host needs its port")
            address = format_address(host, port)
        with self._locked():
            text = self._read()
            for item in _parse_known_hosts(text):
                if (
                    isinstance(item, KnownHostsEntry)
                    and item.revoked
                    and item.address == address
                    and item.fingerprint == fp
                ):
                    return False
            self._append(text, f"@revoked {address} {fp}")
            return True


# ---------------------------------------------------------------------------
# Server key policy


_BANNER = "@" * 59
_CHANGED_BANNER = (
    f"{_BANNER}\n"
    "@    WARNING: REMOTE SERVER IDENTIFICATION HAS CHANGED!   @\n"
    f"{_BANNER}\n"
    "IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n"
    "Someone could be eavesdropping on you right now (man-in-the-middle attack)!\n"
    "It is also possible that the server's key has just been changed.\n"
)

_REVOKED_BANNER = (
    f"{_BANNER}\n"
    "@          WARNING: REVOKED SERVER KEY PRESENTED!         @\n"
    f"{_BANNER}\n"
)

_INSECURE_WARNING = (
    "server key checking is DISABLED (ServerKeyPolicy.insecure()): the connection is "
    "encrypted but the server is NOT authenticated, so anyone on the network path can "
    "impersonate it and read or change everything sent. Pin the server's fingerprint "
    "or use a known-hosts file instead."
)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))


class ServerKeyPolicy:
    """How a client decides to trust the server's key.

    Build one with :meth:`pinned`, :meth:`known_hosts` or :meth:`insecure`; then
    call :meth:`verify` with the server's address and key fingerprint during the
    handshake.
    """

    __slots__ = ("_mode", "_pin", "_known_hosts", "_tofu")

    def __init__(
        self,
        *,
        _mode: Literal["pinned", "known_hosts", "insecure"],
        _pin: Optional[str] = None,
        _known_hosts: Optional[KnownHosts] = None,
        _tofu: bool = False,
    ) -> None:
        # Private: use the class-method constructors.
        self._mode = _mode
        self._pin = _pin
        self._known_hosts = _known_hosts
        self._tofu = _tofu

    @classmethod
    def pinned(cls, fingerprint: Union[str, Iterable[str]]) -> ServerKeyPolicy:
        """Trust exactly the key with this fingerprint, or any of several
        (the current key and the next one, across a key rotation).

        Raises:
            ValueError: a fingerprint is not a SHA-256 fingerprint (see
                :func:`normalize_fingerprint`), or none is given.
            TypeError: a fingerprint is not a str.
        """
        given = [fingerprint] if isinstance(fingerprint, str) else list(fingerprint)
        if not given:
            raise ValueError("pin at least one fingerprint")
        pins = tuple(dict.fromkeys(normalize_fingerprint(fp) for fp in given))
        return cls(_mode="pinned", _pin=" ".join(pins))

    @classmethod
    def known_hosts(
        cls, path: Optional[StrPath] = None, *, trust_on_first_use: bool = True
    ) -> ServerKeyPolicy:
        """Check servers against a known-hosts file (default ``~/.callcp/known_hosts``).

        With ``trust_on_first_use`` an unknown server's key is recorded and
        accepted; without it an unknown server is refused.  A server whose key
        differs from the recorded one is always refused.  The file is not read
        until :meth:`verify` is called.
        """
        return cls(_mode="known_hosts", _known_hosts=KnownHosts(path), _tofu=trust_on_first_use)

    @classmethod
    def insecure(cls) -> ServerKeyPolicy:
        """Accept any server key: encryption without authentication.

        Only for tests and throwaway setups; callers should log :attr:`warning`.
        """
        return cls(_mode="insecure")

    @property
    def mode(self) -> str:
        """``"pinned"``, ``"known_hosts"`` or ``"insecure"``."""
        return self._mode

    @property
    def pin(self) -> Optional[str]:
        """The pinned fingerprint (canonical form; several separated by
        spaces), for a pinned policy."""
        return self._pin

    @property
    def known_hosts_file(self) -> Optional[KnownHosts]:
        """The known-hosts file, for a known-hosts policy."""
        return self._known_hosts

    @property
    def trust_on_first_use(self) -> bool:
        """Whether unknown servers are recorded and accepted."""
        return self._tofu

    @property
    def warning(self) -> Optional[str]:
        """A loud explanation for an insecure policy, else None."""
        return _INSECURE_WARNING if self._mode == "insecure" else None

    def __repr__(self) -> str:
        if self._mode == "pinned":
            return f"ServerKeyPolicy.pinned({self._pin!r})"
        if self._mode == "known_hosts":
            assert self._known_hosts is not None
            return (
                f"ServerKeyPolicy.known_hosts({os.fspath(self._known_hosts._path)!r}, "
                f"trust_on_first_use={self._tofu})"
            )
        return "ServerKeyPolicy.insecure()"

    def verify(
        self, host: str, port: int, fingerprint: str, *, record: bool = True
    ) -> VerifyResult:
        """Decide whether the server at ``host:port`` with this key is trusted.

        Returns what happened: ``"pinned"`` (matches the pin), ``"known"``
        (matches the known-hosts file), ``"new"`` (unknown, trusted on first use
        and recorded — callers should log that it was permanently added),
        ``"unrecorded"`` (trusted on first use, but the file could not be
        written: logged as a warning, and it does not refuse the server, as in
        SSH), or ``"insecure"`` (not checked).  With
        ``record=False`` a new key is only reported, not written: the
        handshake checks at the ServerHello and records (calling again) only
        once the server has proved that it holds the key.

        Raises:
            ServerKeyChanged: the key differs from the pin or the recorded key;
                ``expected`` and ``presented`` hold both fingerprints.
            UnknownServerKey: the server is not in the known-hosts file and trust
                on first use is off.
            ServerKeyError: the known-hosts line for this server is malformed.
            KeyManagementError: the known-hosts file exists but cannot be read.
            ValueError, TypeError: ``host``, ``port`` or ``fingerprint`` is not
                valid (a caller bug; fingerprints come from the handshake).
        """
        presented = normalize_fingerprint(fingerprint)
        if self._mode == "insecure":
            return "insecure"
        if self._mode == "pinned":
            assert self._pin is not None
            matched = False
            for pin in self._pin.split():  # no early exit: constant work per pin
                matched |= _same(presented, pin)
            if matched:
                return "pinned"
            try:
                address = format_address(host, port)
            except (ValueError, TypeError):  # only used in the message here
                address = f"{host}:{port}"
            raise ServerKeyChanged(
                f"the callcp server at {address} presented key {presented}, but the pinned "
                f"fingerprint is {self._pin}. Someone may be intercepting the connection "
                "(man-in-the-middle attack), or the server's key was replaced; if the "
                "change is legitimate, update the pinned fingerprint. Connection refused.",
                expected=self._pin,
                presented=presented,
            )
        assert self._known_hosts is not None
        return self._verify_known(
            self._known_hosts, format_address(host, port), presented, record
        )

    def _verify_known(
        self, kh: KnownHosts, address: str, presented: str, record: bool
    ) -> VerifyResult:
        path = kh.path
        if self._tofu:
            with contextlib.suppress(KeyManagementError):
                kh._ensure_dir()  # so the directory lock below covers first use
        with kh._locked():
            text = kh._read()
            found: list[KnownHostsEntry] = []
            bad: list[MalformedLine] = []
            revoked: Optional[KnownHostsEntry] = None
            for item in _parse_known_hosts(text):
                if isinstance(item, KnownHostsEntry) and item.revoked:
                    if item.address in (address, "*") and _same(item.fingerprint, presented):
                        revoked = item
                    continue
                if item.address != address:
                    continue
                if isinstance(item, KnownHostsEntry):
                    found.append(item)
                else:
                    bad.append(item)
            if revoked is not None:
                raise ServerKeyRevoked(
                    f"{_REVOKED_BANNER}"
                    f"The callcp server at {address} presented the key\n"
                    f"    {presented}\n"
                    f"which {path}:{revoked.lineno} marks as @revoked. Someone may be "
                    "using a stolen or retired key. Connection refused.",
                    presented=presented,
                )
            matched = rotated = False
            for n, entry in enumerate(found):  # no early exit: constant work per entry
                same = _same(entry.fingerprint, presented)
                matched |= same
                rotated |= same and n > 0 and not any(
                    _same(e.fingerprint, presented) for e in found[:n]
                )
            if matched:
                # A key recorded after others (an announced next key) that now
                # proves itself replaces them: "rotated" (see forget_older).
                return "rotated" if rotated else "known"
            if found:
                expected = found[0].fingerprint
                lines = ", ".join(str(e.lineno) for e in found)
                which = "line" if len(found) == 1 else "lines"
                after = (
                    "the new key will then be trusted on first use"
                    if self._tofu
                    else f"then add the line '{address} {presented}'"
                )
                raise ServerKeyChanged(
                    f"{_CHANGED_BANNER}"
                    f"The callcp server at {address} presented the key\n"
                    f"    {presented}\n"
                    f"but {path}:{found[0].lineno} records\n"
                    f"    {expected}\n"
                    f"If the change is legitimate, remove {which} {lines} of {path} "
                    f"and connect again; {after}.\n"
                    f"Connection to {address} refused: the server's key has changed.",
                    expected=expected,
                    presented=presented,
                )
            if bad:
                raise ServerKeyError(
                    f"the known hosts file {path} has a malformed entry for {address} "
                    f"at line {bad[0].lineno} ({bad[0].reason}); fix or remove that line. "
                    f"The server presented key {presented}. Connection refused."
                )
            if not self._tofu:
                raise UnknownServerKey(
                    f"the callcp server at {address} is not in the known hosts file {path} "
                    f"and trust on first use is off. It presented key {presented}. If that "
                    "is the right key (compare it with `callcp fingerprint` on the server), "
                    f"add the line '{address} {presented}' to {path}, or pin it."
                )
            if not record:
                return "new"
            try:
                kh._append(text, f"{address} {presented}")
            except KeyManagementError as exc:
                logger.warning(
                    "could not record the key of %s (%s), trusted for this connection only: %s",
                    address,
                    presented,
                    exc,
                )
                return "unrecorded"
            return "new"


# ---------------------------------------------------------------------------
# Authorized client keys


class AuthorizedKeys:
    """The client key fingerprints a server accepts.

    Build one with :meth:`from_fingerprints` or :meth:`load`.  Membership tests
    (``fingerprint in keys``) compare against every entry in constant time per
    entry and never raise: anything that is not a valid fingerprint is simply
    not a member.

    A list loaded from a file follows the file: a membership test looks at
    the file (one ``stat``) at most once every :attr:`CHECK_EVERY` seconds
    and reloads it when it changed; :meth:`reload` does so at once (the CLI
    calls it on SIGHUP).  A file that no longer parses leaves the list as
    it was, and is logged.
    """

    __slots__ = ("_entries", "_path", "_stamp", "_checked", "_lock")

    #: Seconds between two looks at the file.
    CHECK_EVERY = 1.0

    def __init__(self, fingerprints: Iterable[str] = (), *, path: Optional[Path] = None) -> None:
        """Prefer :meth:`from_fingerprints` / :meth:`load`.

        Raises:
            ValueError: an entry is not a SHA-256 fingerprint.
            TypeError: ``fingerprints`` is a single str, or holds a non-str.
        """
        if isinstance(fingerprints, (str, bytes)):
            raise TypeError("fingerprints must be an iterable of str, not a single string")
        unique: dict[str, None] = {}
        for fp in fingerprints:
            unique[normalize_fingerprint(fp)] = None
        self._entries: tuple[bytes, ...] = tuple(fp.encode("ascii") for fp in unique)
        self._path = path
        self._stamp = _file_stamp(path) if path is not None else None
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_fingerprints(cls, fingerprints: Iterable[str]) -> AuthorizedKeys:
        """A set of accepted fingerprints (any form :func:`normalize_fingerprint` takes).

        Raises:
            ValueError: an entry is not a SHA-256 fingerprint.
            TypeError: ``fingerprints`` is a single str, or holds a non-str.
        """
        return cls(fingerprints)

    @classmethod
    def load(cls, path: StrPath) -> AuthorizedKeys:
        """Read an authorized-keys file (see :meth:`_parse`)."""
        return cls(cls._parse(path), path=Path(path))

    def reload(self) -> bool:
        """Read the file again now; True if the list changed.  A file that
        cannot be read or parsed leaves the list as it was (logged).

        Raises:
            ValueError: nothing to reload (not loaded from a file).
        """
        if self._path is None:
            raise ValueError("this AuthorizedKeys was not loaded from a file")
        with self._lock:
            stamp = _file_stamp(self._path)
            try:
                found = self._parse(self._path)
            except (KeyManagementError, ValueError, OSError) as exc:
                logger.error("authorized keys not reloaded (the old list stays): %s", exc)
                self._stamp = stamp  # (not again until it changes again)
                return False
            fresh = AuthorizedKeys(found)._entries
            changed = fresh != self._entries
            self._entries, self._stamp = fresh, stamp
            if changed:
                logger.info(
                    "authorized keys reloaded from %s: %d key(s)", self._path, len(fresh)
                )
            return changed

    def _follow(self) -> None:
        """(a membership test) Reload if the file changed, at most once a
        :attr:`CHECK_EVERY`."""
        now = time.monotonic()
        if now - self._checked < self.CHECK_EVERY:
            return
        self._checked = now
        assert self._path is not None
        if _file_stamp(self._path) != self._stamp:
            self.reload()

    @staticmethod
    def _parse(path: StrPath) -> list[str]:
        """Read an authorized-keys file.

        Each non-blank, non-``#`` line is a ``SHA256:`` fingerprint, optionally
        followed by a comment; a PEM public key block (``-----BEGIN PUBLIC
        KEY-----`` ... ``-----END PUBLIC KEY-----``) also counts, as its key's
        fingerprint.  An empty file authorizes nobody.  Unlike known-hosts files,
        a bad line is an error here: an access list is not guessed at.

        Raises:
            KeyManagementError: the file is missing or unreadable, or a line is
                neither a fingerprint nor part of a valid RSA PEM public key; the
                message names the file (and the line).
        """
        shown = os.fspath(path)
        text = _read_file(path, "authorized keys", _MAX_LIST_FILE_SIZE).decode(
            "utf-8", errors="replace"
        )
        found: list[str] = []
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            lineno = i + 1
            line = lines[i].strip()
            i += 1
            if not line or line.startswith("#"):
                continue
            if line.startswith("-----BEGIN "):
                block = [line]
                while i < len(lines) and not lines[i].strip().startswith("-----END "):
                    block.append(lines[i].strip())
                    i += 1
                if i >= len(lines):
                    raise KeyManagementError(
                        f"authorized keys file {shown}, line {lineno}: PEM block has no "
                        "-----END line"
                    )
                block.append(lines[i].strip())
                i += 1
                pem = ("\n".join(block) + "\n").encode("utf-8")
                key = _parse_public_pem(pem, f"authorized keys file {shown}, line {lineno}")
                found.append(_key_fingerprint(key))
                continue
            token = line.split(None, 1)[0]
            try:
                found.append(normalize_fingerprint(token))
            except ValueError:
                raise KeyManagementError(
                    f"authorized keys file {shown}, line {lineno}: expected a SHA256: "
                    "fingerprint or a PEM public key"
                ) from None
        return found

    @property
    def path(self) -> Optional[Path]:
        """The file this list was loaded from, if any."""
        return self._path

    @property
    def fingerprints(self) -> frozenset[str]:
        """The accepted fingerprints, in canonical form."""
        return frozenset(e.decode("ascii") for e in self._entries)

    def __contains__(self, fingerprint: object) -> bool:
        if self._path is not None:
            self._follow()
        if not isinstance(fingerprint, str):
            return False
        try:
            wanted = normalize_fingerprint(fingerprint).encode("ascii")
        except ValueError:
            return False
        found = False
        for entry in self._entries:  # no early exit
            found |= hmac.compare_digest(entry, wanted)
        return found

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return (e.decode("ascii") for e in self._entries)

    def __repr__(self) -> str:
        where = f" from {os.fspath(self._path)!r}" if self._path is not None else ""
        return f"<AuthorizedKeys: {len(self)} key(s){where}>"


def _file_stamp(path: Path) -> Optional[tuple[int, int, int]]:
    """What tells that a file changed: (inode, size, mtime in ns); None if gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
