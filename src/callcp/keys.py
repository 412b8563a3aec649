"""Key files: generating, loading and saving RSA keys.

This is the I/O side of key handling; the pure encodings and fingerprints live in
:mod:`callcp._core.keys`.  The shape follows pyca/cryptography: a
:class:`KeyPair` built through class-method constructors (:meth:`KeyPair.generate`,
:meth:`KeyPair.from_pem`, :meth:`KeyPair.load`) with explicit encodings
(:meth:`KeyPair.private_pem`, :meth:`KeyPair.public_pem`, :attr:`KeyPair.public_der`).

Files
    Private keys are PKCS#8 PEM, public keys SubjectPublicKeyInfo PEM: exactly
    Callcp 1.0's ``server_private.pem`` / ``server_public.pem``, which load as they
    are (traditional ``BEGIN RSA PRIVATE KEY`` PEM loads too).  Every write is
    atomic: the bytes go to a temporary file in the destination's directory, are
    fsynced, and replace the destination with :func:`os.replace`, so a reader sees
    the old file or the new one, never half of one.  A private key file is created
    with mode 0600 (it is never world-readable, not even for a moment); a public
    key file gets mode 0644.  Missing parent directories are created.

Passphrases
    The functions that touch files (:meth:`KeyPair.load`, :meth:`KeyPair.save`,
    :meth:`KeyPair.load_or_generate`) use the ``password`` argument when one is
    given, else the environment variable ``CALLCP_KEY_PASSPHRASE`` when it is set
    and not empty, else no passphrase.  The bytes-level methods
    (:meth:`KeyPair.from_pem`, :meth:`KeyPair.private_pem`) use only their
    argument, so serialising a key never changes with the environment.  An
    unencrypted key loads even when a passphrase is available (a warning is
    logged), so Callcp 1.0's unencrypted files keep working.

Errors
    Every failure is a :class:`~callcp._core.errors.KeyManagementError` whose
    message names the file and the cause.  Messages never contain key material
    or passphrases.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Optional, Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

from ._core import keys as _ckeys
from ._core.errors import KeyManagementError
from .hsm import is_pkcs11_uri

__all__ = [
    "PASSPHRASE_ENV",
    "KeyPair",
    "load_public_key",
    "public_key_from_pem",
]

logger = logging.getLogger(__name__)

#: Environment variable holding the passphrase for private key files.
PASSPHRASE_ENV = "CALLCP_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret

#: bcrypt-pbkdf rounds of an encrypted key file (OpenSSH's default, as
#: ``ssh-keygen -a 16``): about 170 ms per unlock (and per guess) here.
KDF_ROUNDS = 16

#: The public exponent of generated keys (Callcp 1.0 used the same).
PUBLIC_EXPONENT = 65537

#: Key files are small; refuse to read more than this (guards against pointing
#: a key path at a huge file or a device).
_MAX_KEY_FILE_SIZE = 1 << 20

StrPath = Union[str, "os.PathLike[str]"]
Password = Union[bytes, str, None]


# ---------------------------------------------------------------------------
# Key pairs


class KeyPair:
    """An RSA private key and its public half, with file I/O.

    Construct one with :meth:`generate`, :meth:`from_pem`, :meth:`load` or
    :meth:`load_or_generate`, or wrap an existing
    :class:`~cryptography.hazmat.primitives.asymmetric.rsa.RSAPrivateKey`.

    Raises:
        TypeError: ``private_key`` is not an RSA private key.
        KeyManagementError: callcp does not accept the key: its size is
            outside ``MIN_RSA_BITS`` to ``MAX_RSA_BITS`` bits, or its public
            exponent is even, below 3 or above 2^32-1.
    """

    __slots__ = ("_private_key", "_public_key", "_public_der", "_fingerprint")

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise TypeError(f"KeyPair needs an RSA private key, not {type(private_key).__name__}")
        problem = _ckeys.rsa_key_problem(private_key)
        if problem is not None:
            raise KeyManagementError(f"the RSA private key {problem}")
        self._private_key = private_key
        self._public_key = private_key.public_key()
        self._public_der = _ckeys.public_der(self._public_key)
        self._fingerprint = _ckeys.fingerprint_der(self._public_der)

    # -- constructors -------------------------------------------------------

    @classmethod
    def generate(cls, bits: int = 2048) -> KeyPair:
        """Generate a new RSA key (public exponent 65537).

        Raises:
            KeyManagementError: ``bits`` is not one of ``RSA_KEY_SIZES``
                (2048, 3072, 4096).
        """
        if isinstance(bits, bool) or bits not in _ckeys.RSA_KEY_SIZES:
            sizes = ", ".join(str(b) for b in _ckeys.RSA_KEY_SIZES)
            raise KeyManagementError(f"cannot generate a {bits}-bit RSA key: choose one of {sizes}")
        return cls(rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=bits))

    @classmethod
    def from_pem(cls, data: bytes, password: Password = None) -> KeyPair:
        """Parse a PEM private key: PKCS#8 (encrypted or not) or traditional RSA.

        Only ``password`` is used; the environment is not consulted here.

        Raises:
            KeyManagementError: the data is not a PEM RSA private key, is
                encrypted and no password was given, the password is wrong, or
                the key's size is not accepted.
            TypeError: ``password`` is neither bytes, str nor None.
        """
        return cls._from_pem(data, _coerce_password(password), "PEM data")

    @classmethod
    def load(
        cls, path: StrPath, password: Password = None, *, allow_insecure_permissions: bool = False
    ) -> KeyPair:
        """Load a private key file (see :meth:`from_pem` for the formats).

        The passphrase is ``password``, else ``$CALLCP_KEY_PASSPHRASE``, else none.
        A file that other users may read, or that anyone but its owner may
        write (group- or world-writable, world-readable), is refused with the
        ``chmod 600`` that fixes it, unless ``allow_insecure_permissions``
        (then it is loaded with a warning).

        ``path`` may also be a ``pkcs11:`` URI naming a key in a PKCS#11
        token (see :mod:`callcp.hsm`; ``password`` does not apply there: the
        token's PIN comes from the URI's ``pin-source`` or
        ``$CALLCP_PKCS11_PIN``).

        Raises:
            KeyManagementError: the file is missing or unreadable, or its
                contents are not an acceptable private key (see :meth:`from_pem`);
                the message names the file.  (A token's failures: see
                :class:`callcp.hsm.Pkcs11Key`.)
            TypeError: ``password`` is neither bytes, str nor None.
        """
        if is_pkcs11_uri(path):
            return cls.from_pkcs11(
                os.fspath(path), allow_insecure_permissions=allow_insecure_permissions
            )
        pw = _resolve_password(password)
        data = _read_private(path, "private key", allow_insecure_permissions)
        return cls._from_pem(data, pw, f"file {_show(path)}")

    @classmethod
    def from_pkcs11(cls, uri: str, *, allow_insecure_permissions: bool = False) -> KeyPair:
        """Open the RSA private key a ``pkcs11:`` URI names in a PKCS#11
        token (an HSM; see :mod:`callcp.hsm`).  Its signatures and
        decryptions run in the token, and it cannot be saved or exported.
        ``allow_insecure_permissions`` applies to a ``pin-source`` file.

        Raises:
            KeyManagementError: see :class:`callcp.hsm.Pkcs11Key`.
        """
        from .hsm import Pkcs11Key

        return cls(Pkcs11Key(uri, allow_insecure_permissions=allow_insecure_permissions))

    @property
    def in_token(self) -> bool:
        """Whether the private key lives in a PKCS#11 token."""
        from .hsm import Pkcs11Key

        return isinstance(self._private_key, Pkcs11Key)

    @classmethod
    def load_or_generate(
        cls,
        private_path: StrPath,
        public_path: Optional[StrPath] = None,
        *,
        bits: int = 2048,
        password: Password = None,
        allow_insecure_permissions: bool = False,
    ) -> KeyPair:
        """Load the key at ``private_path``, or generate and save one on first run.

        - No file at ``private_path``: generate a ``bits``-bit key and save it
          (and its public half at ``public_path`` when given).  If another process
          creates the file at the same moment, its key wins and is loaded, so
          concurrent first runs agree on one key.
        - A file at ``private_path``: load it.  If ``public_path`` is given and
          exists, it must hold the matching public key; if it is missing it is
          written.

        The passphrase (for loading and saving) is ``password``, else
        ``$CALLCP_KEY_PASSPHRASE``, else none.

        A ``pkcs11:`` URI is opened (:meth:`from_pkcs11`), never generated:
        ``callcp keygen --pkcs11 URI`` makes a key in a token.

        Raises:
            KeyManagementError: ``bits`` is not a supported size; a file cannot be
                read, parsed, decrypted or written; or the public key file does
                not match the private key (the message names both files).
            TypeError: ``password`` is neither bytes, str nor None.
        """
        if is_pkcs11_uri(private_path):
            keypair = cls.from_pkcs11(
                os.fspath(private_path), allow_insecure_permissions=allow_insecure_permissions
            )
            if public_path is not None:
                keypair._check_or_write_public(private_path, public_path)
            return keypair
        if isinstance(bits, bool) or bits not in _ckeys.RSA_KEY_SIZES:
            sizes = ", ".join(str(b) for b in _ckeys.RSA_KEY_SIZES)
            raise KeyManagementError(f"cannot generate a {bits}-bit RSA key: choose one of {sizes}")
        pw = _resolve_password(password)
        if not _exists(private_path, "private key"):
            keypair = cls.generate(bits)
            pem = keypair.private_pem(pw)
            if _write_new(private_path, pem, 0o600, "private key"):
                logger.info(
                    "generated a new %d-bit RSA key %s in %s",
                    bits,
                    keypair.fingerprint,
                    _show(private_path),
                )
                if public_path is not None:
                    _write_atomic(public_path, keypair.public_pem(), 0o644, "public key")
                return keypair
            # Another process created the file first: use its key.

        keypair = cls.load(private_path, pw, allow_insecure_permissions=allow_insecure_permissions)
        if public_path is not None:
            keypair._check_or_write_public(private_path, public_path)
        return keypair

    @classmethod
    def _from_pem(cls, data: bytes, password: Optional[bytes], source: str) -> KeyPair:
        key = _parse_private_pem(data, password, source)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyManagementError(
                f"cannot load private key from {source}: it is an {_kind(key)} key, "
                "callcp needs an RSA key"
            )
        try:
            return cls(key)
        except KeyManagementError as exc:
            raise KeyManagementError(f"cannot load private key from {source}: {exc}") from None

    # -- properties ---------------------------------------------------------

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        """The wrapped private key."""
        return self._private_key

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        """The public half."""
        return self._public_key

    @property
    def public_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo (what the handshake sends)."""
        return self._public_der

    @property
    def fingerprint(self) -> str:
        """``SHA256:<base64>`` of :attr:`public_der`, the form people compare."""
        return self._fingerprint

    @property
    def key_size(self) -> int:
        """The modulus size in bits."""
        return self._private_key.key_size

    # -- encodings ----------------------------------------------------------

    def private_pem(self, password: Password = None) -> bytes:
        """The private key as PEM: PKCS#8 (as Callcp 1.0 wrote it), or, when
        ``password`` is given, OpenSSH's encrypted format (AES-256-CTR under
        a key from bcrypt-pbkdf with :data:`KDF_ROUNDS` rounds, OpenSSH's
        default: about 170 ms to unlock on the benchmark machine, a cost per
        guess that a stolen file's attacker pays too; ``ssh-keygen`` reads
        it).  Only ``password`` is used; the environment is not consulted
        here (:meth:`save` does that).

        Raises:
            KeyManagementError: ``password`` is empty.
            TypeError: ``password`` is neither bytes, str nor None.
        """
        pw = _coerce_password(password)
        if pw is None:
            return self._private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        openssh = serialization.PrivateFormat.OpenSSH
        enc = openssh.encryption_builder().kdf_rounds(KDF_ROUNDS).build(pw)
        return self._private_key.private_bytes(serialization.Encoding.PEM, openssh, enc)

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (``BEGIN PUBLIC KEY``)."""
        return self._public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # -- files --------------------------------------------------------------

    def save(
        self,
        private_path: StrPath,
        public_path: Optional[StrPath] = None,
        *,
        password: Password = None,
    ) -> None:
        """Write the private key (mode 0600) and optionally the public key (0644).

        Each file is written atomically and replaces any file already there.
        The private key is encrypted with ``password``, else with
        ``$CALLCP_KEY_PASSPHRASE``, else not at all.

        Raises:
            KeyManagementError: a file or its directory cannot be written (the
                message names it), or the passphrase is empty.
            TypeError: ``password`` is neither bytes, str nor None.
        """
        pem = self.private_pem(_resolve_password(password))
        _write_atomic(private_path, pem, 0o600, "private key")
        if public_path is not None:
            _write_atomic(public_path, self.public_pem(), 0o644, "public key")

    def _check_or_write_public(self, private_path: StrPath, public_path: StrPath) -> None:
        if not _exists(public_path, "public key"):
            logger.info("writing missing public key file %s", _show(public_path))
            _write_atomic(public_path, self.public_pem(), 0o644, "public key")
            return
        public = load_public_key(public_path)
        presented = _ckeys.fingerprint(public)
        if presented != self._fingerprint:
            raise KeyManagementError(
                f"public key file {_show(public_path)} ({presented}) does not match "
                f"private key file {_show(private_path)} ({self._fingerprint}); "
                "check the paths, or delete the public key file to have it rewritten"
            )

    def __repr__(self) -> str:
        return f"<KeyPair rsa-{self.key_size} {self._fingerprint}>"


# ---------------------------------------------------------------------------
# Public keys


def public_key_from_pem(data: bytes) -> rsa.RSAPublicKey:
    """Parse a PEM RSA public key (``BEGIN PUBLIC KEY`` or ``BEGIN RSA PUBLIC KEY``).

    Raises:
        KeyManagementError: the data is not a PEM public key, the key is not
            RSA, or its size is not accepted.
    """
    return _parse_public_pem(data, "PEM data")


def load_public_key(path: StrPath) -> rsa.RSAPublicKey:
    """Load a PEM RSA public key file (Callcp 1.0's ``server_public.pem``).

    Raises:
        KeyManagementError: the file is missing or unreadable, or does not hold
            an acceptable PEM RSA public key; the message names the file.
    """
    data = _read_file(path, "public key")
    return _parse_public_pem(data, f"file {_show(path)}")


# ---------------------------------------------------------------------------
# Parsing helpers


def _parse_private_pem(data: bytes, password: Optional[bytes], source: str) -> object:
    """Load a PEM private key, turning every failure into a clear KeyManagementError."""
    what = f"cannot load private key from {source}"
    if not isinstance(data, bytes):
        raise TypeError(f"PEM data must be bytes, not {type(data).__name__}")
    if b"-----BEGIN" not in data:
        raise KeyManagementError(f"{what}: not a PEM file (no -----BEGIN line)")
    if b"PRIVATE KEY-----" not in data and b"PUBLIC KEY-----" in data:
        raise KeyManagementError(f"{what}: it holds a public key, not a private key")
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in data:
        return _parse_openssh_private(data, password, what, source)
    try:
        # First without a passphrase: that loads unencrypted keys (Callcp 1.0's)
        # and tells an encrypted key apart (TypeError) from garbage (ValueError).
        key: object = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        if password is None:
            raise KeyManagementError(
                f"{what}: the key is encrypted and no passphrase was given "
                f"(pass password= or set {PASSPHRASE_ENV})"
            ) from None
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError):
            raise KeyManagementError(
                f"{what}: wrong passphrase (or the file is corrupted)"
            ) from None
        except UnsupportedAlgorithm as exc:
            raise KeyManagementError(f"{what}: unsupported key encryption ({exc})") from None
        return key
    except ValueError as exc:
        raise KeyManagementError(f"{what}: malformed or corrupted PEM private key") from exc
    except UnsupportedAlgorithm as exc:
        raise KeyManagementError(f"{what}: unsupported key type ({exc})") from None
    if password is not None:
        logger.warning(
            "private key from %s is not encrypted although a passphrase was given", source
        )
    return key


def _parse_openssh_private(
    data: bytes, password: Optional[bytes], what: str, source: str
) -> object:
    """An OpenSSH-format private key (what :meth:`KeyPair.private_pem`
    writes when encrypting, and what ``ssh-keygen`` writes)."""
    try:
        key: object = serialization.load_ssh_private_key(data, password=None)
    except TypeError:  # encrypted
        if password is None:
            raise KeyManagementError(
                f"{what}: the key is encrypted and no passphrase was given "
                f"(pass password= or set {PASSPHRASE_ENV})"
            ) from None
    except ValueError as exc:
        raise KeyManagementError(f"{what}: malformed or corrupted OpenSSH private key") from exc
    except UnsupportedAlgorithm as exc:
        raise KeyManagementError(f"{what}: unsupported key type or encryption ({exc})") from None
    else:
        if password is not None:
            logger.warning(
                "private key from %s is not encrypted although a passphrase was given", source
            )
        return key
    try:
        return serialization.load_ssh_private_key(data, password=password)
    except (ValueError, TypeError):
        raise KeyManagementError(f"{what}: wrong passphrase (or the file is corrupted)") from None
    except UnsupportedAlgorithm as exc:
        raise KeyManagementError(f"{what}: unsupported key encryption ({exc})") from None


def _parse_public_pem(data: bytes, source: str) -> rsa.RSAPublicKey:
    what = f"cannot load public key from {source}"
    if not isinstance(data, bytes):
        raise TypeError(f"PEM data must be bytes, not {type(data).__name__}")
    if b"-----BEGIN" not in data:
        raise KeyManagementError(f"{what}: not a PEM file (no -----BEGIN line)")
    if b"PUBLIC KEY-----" not in data and b"PRIVATE KEY-----" in data:
        raise KeyManagementError(f"{what}: it holds a private key, not a public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyManagementError(f"{what}: malformed or corrupted PEM public key") from exc
    except UnsupportedAlgorithm as exc:
        raise KeyManagementError(f"{what}: unsupported key type ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyManagementError(f"{what}: it is an {_kind(key)} key, callcp needs an RSA key")
    problem = _ckeys.rsa_key_problem(key)
    if problem is not None:
        raise KeyManagementError(f"{what}: the RSA public key {problem}")
    return key


def _kind(key: object) -> str:
    """A human name for a key's algorithm (for error messages)."""
    kinds: tuple[tuple[tuple[type, ...], str], ...] = (
        ((ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey), "EC"),
        ((ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey), "Ed25519"),
        ((ed448.Ed448PrivateKey, ed448.Ed448PublicKey), "Ed448"),
        ((dsa.DSAPrivateKey, dsa.DSAPublicKey), "DSA"),
        ((x25519.X25519PrivateKey, x25519.X25519PublicKey), "X25519"),
        ((x448.X448PrivateKey, x448.X448PublicKey), "X448"),
    )
    for types, name in kinds:
        if isinstance(key, types):
            return name
    return type(key).__name__


# ---------------------------------------------------------------------------
# Passphrases


def _coerce_password(password: Password) -> Optional[bytes]:
    if password is None:
        return None
    if isinstance(password, str):
        password = password.encode("utf-8")
    if not isinstance(password, bytes):
        raise TypeError(f"password must be bytes, str or None, not {type(password).__name__}")
    if not password:
        raise KeyManagementError("the key passphrase must not be empty")
    return password


def _resolve_password(password: Password) -> Optional[bytes]:
    """The explicit password, else $CALLCP_KEY_PASSPHRASE (if set, non-empty), else None."""
    if password is not None:
        return _coerce_password(password)
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env.encode("utf-8")
    return None


# ---------------------------------------------------------------------------
# File helpers (shared with callcp.trust)


def _show(path: StrPath) -> str:
    return os.fspath(path)


def _cause(exc: OSError) -> str:
    """A short, human cause for an OSError (no path: callers add it)."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory, not a file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, NotADirectoryError):
        return "a parent path is not a directory"
    return exc.strerror or type(exc).__name__


def _exists(path: StrPath, what: str) -> bool:
    """Whether anything (even a dangling symlink) is at ``path``.

    A dangling symlink counts as present, so it is reported when loaded rather
    than silently replaced by a new key.
    """
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise KeyManagementError(f"cannot access {what} file {_show(path)}: {_cause(exc)}") from exc
    return True


def _read_file(path: StrPath, what: str, limit: int = _MAX_KEY_FILE_SIZE) -> bytes:
    """Read a small key file; every failure is a KeyManagementError naming it."""
    return _read(path, what, limit, None)


def _read_private(
    path: StrPath, what: str, allow_insecure_permissions: bool, limit: int = _MAX_KEY_FILE_SIZE
) -> bytes:
    """:func:`_read_file` for a secret (a private key, a PIN): its
    permissions are checked (:func:`_check_mode`) on the file opened,
    so what is checked is what is read."""
    return _read(path, what, limit, allow_insecure_permissions)


def _read(path: StrPath, what: str, limit: int, allow: Optional[bool]) -> bytes:
    try:
        # O_NONBLOCK: a FIFO put in a key file's place cannot block the open;
        # only a regular file is read.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
            if not stat.S_ISREG(st.st_mode):
                raise KeyManagementError(
                    f"cannot read {what} file {_show(path)}: not a regular file"
                )
            if allow is not None:
                _check_mode(path, st, allow, what)
            data = f.read(limit + 1)
    except OSError as exc:
        raise KeyManagementError(f"cannot read {what} file {_show(path)}: {_cause(exc)}") from exc
    if len(data) > limit:
        raise KeyManagementError(
            f"cannot read {what} file {_show(path)}: larger than {limit} bytes, not a {what} file"
        )
    return data


#: Who must not have a private key file: its group writing it, others
#: reading or writing it (a group that may only read, 0640, is allowed).
_EXPOSED = stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH


def _check_mode(path: StrPath, st: os.stat_result, allow: bool, what: str) -> None:
    """Refuse (or, with ``allow``, warn about) a private key file (or another
    secret: ``what``) that others may read or anyone but its owner may write
    (``st``: the opened file's ``fstat``)."""
    if os.name != "posix":
        return
    mode = st.st_mode
    foreign = st.st_uid not in (os.geteuid(), 0)  # (its owner could replace it)
    if not mode & _EXPOSED and not foreign:
        return
    who = [f"owned by another user (uid {st.st_uid})"] if foreign else []
    if mode & stat.S_IROTH:
        who.append("readable by every user")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        who.append("writable by " + ("every user" if mode & stat.S_IWOTH else "its group"))
    text = (
        f"{what} file {_show(path)} is {' and '.join(who)} (mode "
        f"{stat.S_IMODE(mode):04o}): others could read or replace it"
    )
    if allow:
        logger.warning("%s; loading it anyway (insecure key permissions allowed)", text)
        return
    raise KeyManagementError(
        f"{text}; run `chmod 600 {_show(path)}` (or allow it explicitly: "
        "allow_insecure_permissions=True, --insecure-key-permissions)"
    )


def _make_parent(path: Path, what: str, mode: int) -> None:
    parent = path.parent
    try:
        parent.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyManagementError(
            f"cannot create directory {parent} for {what} file {path}: {_cause(exc)}"
        ) from exc


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a fresh temporary file next to ``path``; fsync it.

    The file is created with ``mode`` by os.open (O_EXCL), so it never exists
    with wider permissions; fchmod then sets exactly ``mode`` whatever the umask.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, mode)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 collisions of 48 random bits
        raise FileExistsError(f"no free temporary name next to {path}")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); best effort."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: StrPath, data: bytes, mode: int, what: str) -> None:
    """Atomically create or replace ``path`` with ``data`` and permissions ``mode``.

    Raises:
        KeyManagementError: naming the file and the cause.
    """
    target = Path(path)
    _make_parent(target, what, 0o700 if mode & 0o077 == 0 else 0o755)
    try:
        tmp = _write_temp(target, data, mode)
        try:
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise KeyManagementError(f"cannot write {what} file {target}: {_cause(exc)}") from exc
    _fsync_dir(target.parent)


def _write_new(path: StrPath, data: bytes, mode: int, what: str) -> bool:
    """Atomically create ``path`` only if nothing is there; False if something is.

    A hard link of the finished temporary file never replaces an existing file,
    so two processes generating a key at the same time cannot overwrite each
    other.  Where hard links are unsupported it falls back to os.replace.

    Raises:
        KeyManagementError: naming the file and the cause.
    """
    target = Path(path)
    _make_parent(target, what, 0o700 if mode & 0o077 == 0 else 0o755)
    try:
        tmp = _write_temp(target, data, mode)
        moved = False
        try:
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            except OSError:
                # No hard links here (some network or FUSE file systems).
                os.replace(tmp, target)
                moved = True
        finally:
            if not moved:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
    except OSError as exc:
        raise KeyManagementError(f"cannot write {what} file {target}: {_cause(exc)}") from exc
    _fsync_dir(target.parent)
    return True
