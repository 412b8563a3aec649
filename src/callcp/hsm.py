"""Private keys in a PKCS#11 token: an HSM, a smart card, SoftHSM2.

A key in a token is named by an RFC 7512 ``pkcs11:`` URI, accepted wherever
callcp takes a key file's path (``serve(key=...)``, ``connect(client_key=...)``,
``KeyPair.load``, ``callcp serve --key``, ``callcp send --client-key``,
``callcp fingerprint``)::

    pkcs11:token=callcp;object=server?module-name=softhsm2&pin-source=file:/etc/callcp/pin

The private key never leaves the token: :class:`Pkcs11Key` is a
``cryptography`` ``RSAPrivateKey`` whose ``sign`` (RSA-PSS) and ``decrypt``
(RSA-OAEP) run there, so the protocol code uses it as it uses a key from a
file.  Needs the optional extra ``hsm`` (python-pkcs11): ``pip install '.[hsm]'``
from the callcp source directory, or ``pip install python-pkcs11``.

The URI (path attributes after ``pkcs11:``, ``;``-separated; query attributes
after ``?``, ``&``-separated; values percent-encoded):

- ``token``, ``manufacturer``, ``serial``, ``model``, ``slot-id``: which token
  (exactly one must match);
- ``object`` (the key's label), ``id`` (its CKA_ID, percent-encoded bytes),
  ``type`` (``private``): which key (exactly one private RSA key must match);
- ``module-path`` (an absolute path) or ``module-name`` (``softhsm2`` finds
  ``libsofthsm2.so`` in the usual directories): the PKCS#11 library, else
  ``$CALLCP_PKCS11_MODULE``, else p11-kit's proxy when it is installed;
- ``pin-source``: ``file:/path`` (a file that only its owner may read, like a
  key file) or ``env:NAME`` (an environment variable); without it,
  ``$CALLCP_PKCS11_PIN`` when set, else no login.  ``pin-value`` is refused: a
  PIN written in a URI ends up in shell histories and process lists.

Anything else is refused rather than ignored, so a typo cannot select a
different key.

Threads and processes: python-pkcs11 initialises a library without
``CKF_OS_LOCKING_OK``, so PKCS#11 lets only one thread into it at a time;
callcp holds one lock per library per process around every call; a process
logs in to a token once, and a key uses one session.  Token operations of
one process therefore run one at a time; ``workers=N`` gives N processes,
and after ``fork()`` each re-initialises the library, logs in and opens its
own session on first use (nothing of the parent's is used).  A session that
is lost (a token restarted) is replaced, logging in again if the login was
lost too, and the operation tried once more.

Decryption: the token decrypts with ``CKM_RSA_PKCS_OAEP`` (SHA-256, MGF1-SHA-256)
when it supports those parameters.  SoftHSM2 2.6 supports OAEP with SHA-1
only; there callcp asks the token for the raw RSA operation (``CKM_RSA_X_509``)
and removes the OAEP padding itself, without branching on the decrypted bytes
before one verdict (:func:`oaep_decode`).  Every decryption failure, the
token's own included, is the same ValueError, which the handshake turns
into its implicit rejection.  The private key still never leaves the
token.  Which path a key uses is :attr:`Pkcs11Key.oaep_in_token`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import platform
import sysconfig
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional, Set, Tuple, TypeVar
from urllib.parse import quote, unquote_to_bytes

from cryptography.exceptions import UnsupportedAlgorithm, _Reasons
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding

from ._core import keys as _ckeys
from ._core.errors import KeyManagementError
from ._core.wire import printable

__all__ = [
    "MODULE_ENV",
    "PIN_ENV",
    "Pkcs11Key",
    "Pkcs11Uri",
    "generate_key",
    "is_pkcs11_uri",
]

logger = logging.getLogger(__name__)

#: The environment variable naming the PKCS#11 library when the URI does not.
MODULE_ENV = "CALLCP_PKCS11_MODULE"
#: The environment variable holding the token's user PIN when the URI has no
#: ``pin-source``.
PIN_ENV = "CALLCP_PKCS11_PIN"

_SCHEME = "pkcs11:"
_PATH_ATTRS = ("token", "manufacturer", "serial", "model", "slot-id", "object", "id", "type")
_QUERY_ATTRS = ("pin-source", "pin-value", "module-name", "module-path")
_MAX_URI = 4096
_MAX_PIN_FILE = 1024
#: Where ``module-name=NAME`` is looked for (``NAME``, ``libNAME.so``).
_MULTIARCH = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
_MODULE_DIRS = (
    f"/usr/lib/{_MULTIARCH}/pkcs11",
    f"/usr/lib/{_MULTIARCH}/softhsm",
    f"/usr/lib/{_MULTIARCH}",
    "/usr/lib/pkcs11",
    "/usr/lib64/pkcs11",
    "/usr/lib/softhsm",
    "/usr/lib64/softhsm",
    "/usr/local/lib/softhsm",
    "/usr/local/lib/pkcs11",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
)
_P11_KIT_PROXY = "p11-kit-proxy.so"

T = TypeVar("T")


def is_pkcs11_uri(value: object) -> bool:
    """Whether ``value`` is a ``pkcs11:`` URI (a str starting with the scheme)."""
    return isinstance(value, str) and value[: len(_SCHEME)].lower() == _SCHEME


# ---------------------------------------------------------------------------
# The URI (RFC 7512)


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI (the attributes callcp supports; see the
    module's documentation).  ``str()`` gives it back, percent-encoded."""

    token: Optional[str] = None
    manufacturer: Optional[str] = None
    serial: Optional[str] = None
    model: Optional[str] = None
    slot_id: Optional[int] = None
    object: Optional[str] = None
    id: Optional[bytes] = None
    type: Optional[str] = None
    pin_source: Optional[str] = None
    module_name: Optional[str] = None
    module_path: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        """Parse a ``pkcs11:`` URI.

        Raises:
            KeyManagementError: not a ``pkcs11:`` URI, or an attribute that is
                unknown, repeated, badly encoded or has a bad value (the
                message names it); or a ``pin-value``.
        """
        if not isinstance(text, str):
            raise KeyManagementError(f"a PKCS#11 URI is a str, not {type(text).__name__}")
        if not is_pkcs11_uri(text):
            raise KeyManagementError(f"not a PKCS#11 URI (pkcs11:...): {_shown(text)}")
        if len(text) > _MAX_URI:
            raise KeyManagementError(f"the PKCS#11 URI is longer than {_MAX_URI} characters")
        if any(c.isspace() or not c.isprintable() for c in text):
            raise KeyManagementError(
                f"the PKCS#11 URI {_shown(text)} holds a space or control character "
                "(percent-encode it)"
            )
        path, _, query = text[len(_SCHEME) :].partition("?")
        values: Dict[str, bytes] = {}
        for part, sep, allowed in ((path, ";", _PATH_ATTRS), (query, "&", _QUERY_ATTRS)):
            for item in part.split(sep) if part else ():
                name, eq, raw = item.partition("=")
                name = name.lower()
                if not eq or not name:
                    raise KeyManagementError(
                        f"the PKCS#11 URI attribute {_shown(item)} is not name=value"
                    )
                if name not in allowed:
                    where = "path" if sep == ";" else "query"
                    known = ", ".join(allowed)
                    raise KeyManagementError(
                        f"callcp does not support the PKCS#11 URI {where} attribute "
                        f"{_shown(name)} (it supports {known})"
                    )
                if name in values:
                    raise KeyManagementError(
                        f"the PKCS#11 URI gives {_shown(name)} twice; give it once"
                    )
                values[name] = unquote_to_bytes(raw)
        if "pin-value" in values:
            raise KeyManagementError(
                "the PKCS#11 URI carries its PIN (pin-value): a PIN in a URI ends up in shell "
                f"histories and process lists; put it in a file only you can read "
                f"(pin-source=file:/path) or in ${PIN_ENV}"
            )
        fields: Dict[str, Any] = {}
        for name, encoded in values.items():
            key = name.replace("-", "_")
            if name == "id":
                if not encoded:
                    raise KeyManagementError("the PKCS#11 URI attribute id is empty")
                fields[key] = encoded
                continue
            try:
                value = encoded.decode("utf-8")
            except UnicodeDecodeError:
                raise KeyManagementError(
                    f"the PKCS#11 URI attribute {name} is not UTF-8 text"
                ) from None
            if not value.isprintable():
                raise KeyManagementError(
                    f"the PKCS#11 URI attribute {name} holds a control character"
                )
            if not value:
                raise KeyManagementError(
                    f"the PKCS#11 URI attribute {name} is empty (leave it out instead)"
                )
            if name == "slot-id":
                if not (value.isascii() and value.isdigit()) or len(value) > 20:
                    raise KeyManagementError(
                        f"the PKCS#11 URI's slot-id must be a number, not {_shown(value)}"
                    )
                fields[key] = int(value)
            elif name == "type" and value != "private":
                raise KeyManagementError(
                    f"the PKCS#11 URI names a {_shown(value)} object; callcp needs the "
                    "private key (type=private, or no type)"
                )
            elif name == "module-path" and not os.path.isabs(value):
                raise KeyManagementError(
                    f"the PKCS#11 URI's module-path must be absolute, not {_shown(value)}"
                )
            elif name == "module-name" and ("/" in value or not value):
                raise KeyManagementError(
                    f"the PKCS#11 URI's module-name is a library's name, not a path: "
                    f"{_shown(value)} (use module-path for a path)"
                )
            else:
                fields[key] = value
        return cls(**fields)

    def __str__(self) -> str:
        path = []
        for name in _PATH_ATTRS:
            value = getattr(self, name.replace("-", "_"))
            if value is not None:
                raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
                path.append(f"{name}={quote(raw, safe='')}")
        query = []
        for name in ("module-name", "module-path", "pin-source"):
            value = getattr(self, name.replace("-", "_"))
            if value is not None:
                query.append(f"{name}={quote(value, safe='/:')}")
        return _SCHEME + ";".join(path) + ("?" + "&".join(query) if query else "")

    @property
    def key_name(self) -> str:
        """How this key is named in messages: its object label and/or id."""
        parts = []
        if self.object is not None:
            parts.append(f"object={_shown(self.object)}")
        if self.id is not None:
            parts.append(f"id={quote(self.id, safe='')}")
        return " ".join(parts) or "(any private key)"


def _shown(text: str) -> str:
    """A URI part for an error message: escaped, and cut if long."""
    return repr(printable(text[:80] + ("..." if len(text) > 80 else "")))


# ---------------------------------------------------------------------------
# The library, the PIN


def _binding() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise KeyManagementError(
            "a PKCS#11 key needs the python-pkcs11 package: pip install python-pkcs11 "
            "(or, in the callcp source directory, pip install '.[hsm]')"
        ) from None
    return pkcs11


def _module_path(uri: Pkcs11Uri) -> str:
    """The PKCS#11 library to load (see the module's documentation), as a
    real path: one library reached by two paths is loaded, and locked, once."""
    return os.path.realpath(_find_module(uri))


def _find_module(uri: Pkcs11Uri) -> str:
    if uri.module_path is not None:
        if not os.path.isfile(uri.module_path):
            raise KeyManagementError(f"no PKCS#11 library at {_shown(uri.module_path)}")
        return uri.module_path
    if uri.module_name is not None:
        names = (uri.module_name, f"lib{uri.module_name}.so", f"{uri.module_name}.so")
        for directory in _MODULE_DIRS:
            for name in names:
                candidate = os.path.join(directory, name)
                if os.path.isfile(candidate):
                    return candidate
        raise KeyManagementError(
            f"no PKCS#11 library named {_shown(uri.module_name)} in "
            f"{', '.join(_MODULE_DIRS[:5])}, ...: give its path (module-path=/path/lib.so)"
        )
    env = os.environ.get(MODULE_ENV)
    if env:
        if not os.path.isfile(env):
            raise KeyManagementError(f"${MODULE_ENV} names no file: {_shown(env)}")
        return env
    for directory in _MODULE_DIRS:
        candidate = os.path.join(directory, _P11_KIT_PROXY)
        if os.path.isfile(candidate):
            return candidate
    raise KeyManagementError(
        "which PKCS#11 library? add module-name=NAME (e.g. softhsm2) or "
        f"module-path=/path/lib.so to the URI, or set ${MODULE_ENV}"
    )


def _read_pin(uri: Pkcs11Uri, allow_insecure_permissions: bool) -> Optional[str]:
    """The user PIN: from ``pin-source``, else ``$CALLCP_PKCS11_PIN``, else None."""
    source = uri.pin_source
    if source is None:
        pin = os.environ.get(PIN_ENV)
        return pin if pin else None
    if source.startswith("env:"):
        name = source[4:]
        pin = os.environ.get(name) if name else None
        if not pin:
            raise KeyManagementError(
                f"the PKCS#11 URI's PIN source, environment variable {_shown(name)}, is not set"
            )
        return pin
    if source.startswith("file:"):
        path = source[5:]
        if path.startswith("//"):  # file://HOST/path: only the local host
            host, slash, rest = path[2:].partition("/")
            if host not in ("", "localhost") or not slash:
                raise KeyManagementError(
                    f"the PKCS#11 PIN source {_shown(source)} is not a local file"
                )
            path = "/" + rest
    elif source.startswith(("/", "~/")):
        path = source
    else:
        raise KeyManagementError(
            f"the PKCS#11 URI's pin-source must be file:/path or env:NAME, not {_shown(source)}"
        )
    from .keys import _read_private

    if path.startswith("~/"):
        path = os.path.expanduser(path)
    if not os.path.isabs(path):
        raise KeyManagementError(
            f"the PKCS#11 URI's PIN file must be an absolute path (file:/path), not {_shown(path)}"
        )
    data = _read_private(path, "PKCS#11 PIN", allow_insecure_permissions, _MAX_PIN_FILE)
    try:
        pin = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyManagementError(f"the PKCS#11 PIN file {_shown(path)} is not UTF-8") from None
    pin = pin[:-1] if pin.endswith("\n") else pin
    pin = pin[:-1] if pin.endswith("\r") else pin
    if not pin:
        raise KeyManagementError(f"the PKCS#11 PIN file {_shown(path)} is empty")
    return pin


def _failure(exc: BaseException) -> str:
    """A PKCS#11 exception's name, for a message (python-pkcs11 names the CKR_)."""
    text = str(exc).strip()
    name = type(exc).__name__
    return printable(f"{name}: {text}"[:200]) if text and text != name else name


#: The library of each path re-initialised in this process (pid, path).
_initialised: Dict[str, int] = {}
_initialised_lock = threading.Lock()


def _load_library(path: str) -> Any:
    """python-pkcs11's library object for ``path``, initialised in this
    process (after a fork, once: the child's copy of a library's state is
    not its own, PKCS#11 v2.40 section 6.6.1)."""
    p11 = _binding()
    with _initialised_lock:
        try:
            lib = p11.lib(path)
        except p11.PKCS11Error as exc:
            raise KeyManagementError(
                f"cannot load the PKCS#11 library {_shown(path)}: {_failure(exc)}"
            ) from None
        pid = os.getpid()
        if _initialised.setdefault(path, pid) != pid:
            try:
                lib.finalize()  # (the parent's state, as far as this process sees it)
            except p11.PKCS11Error:
                pass  # (a library that resets itself on fork: nothing to finalise)
            try:
                lib.initialize()
            except p11.PKCS11Error as exc:
                raise KeyManagementError(
                    f"cannot initialise the PKCS#11 library {_shown(path)} in process {pid}: "
                    f"{_failure(exc)}"
                ) from None
            _initialised[path] = pid
        return lib


def _find_token(lib: Any, uri: Pkcs11Uri, path: str) -> Any:
    p11 = _binding()
    matches, seen = [], []
    try:
        slots = lib.get_slots(token_present=True)
        for slot in slots:
            token = slot.get_token()
            if not token.flags & p11.TokenFlag.TOKEN_INITIALIZED:
                continue  # (an empty slot's blank token: SoftHSM keeps one free)
            serial = token.serial.decode("ascii", "replace").strip()
            seen.append(token.label)
            if (
                (uri.slot_id is None or slot.slot_id == uri.slot_id)
                and (uri.token is None or token.label == uri.token)
                and (uri.manufacturer is None or token.manufacturer_id == uri.manufacturer)
                and (uri.model is None or token.model == uri.model)
                and (uri.serial is None or serial == uri.serial)
            ):
                matches.append(token)
    except p11.PKCS11Error as exc:
        raise KeyManagementError(
            f"cannot list the tokens of PKCS#11 library {_shown(path)}: {_failure(exc)}"
        ) from None
    if len(matches) == 1:
        return matches[0]
    labels = ", ".join(_shown(label) for label in seen[:10]) or "none"
    if not matches:
        raise KeyManagementError(
            f"no PKCS#11 token matches {_shown(str(replace(uri, pin_source=None)))} "
            f"(tokens present: {labels})"
        )
    raise KeyManagementError(
        f"{len(matches)} PKCS#11 tokens match (tokens present: {labels}); "
        "name one with token=LABEL, serial= or slot-id="
    )


def _key_template(uri: Pkcs11Uri, object_class: Any) -> Dict[Any, Any]:
    p11 = _binding()
    attrs: Dict[Any, Any] = {
        p11.Attribute.CLASS: object_class,
        p11.Attribute.KEY_TYPE: p11.KeyType.RSA,
    }
    if uri.object is not None:
        attrs[p11.Attribute.LABEL] = uri.object
    if uri.id is not None:
        attrs[p11.Attribute.ID] = uri.id
    return attrs


# ---------------------------------------------------------------------------
# Sessions


#: Errors after which a session is worth replacing (and the operation
#: trying once more): the session, or its login, is gone.
_SESSION_GONE = (
    "SessionHandleInvalid",
    "SessionClosed",
    "UserNotLoggedIn",
    "DeviceRemoved",
    "TokenNotPresent",
    "KeyHandleInvalid",
    "ObjectHandleInvalid",
)
#: Errors that mean "this ciphertext is not valid": a decryption failure,
#: which the handshake turns into its implicit rejection (like cryptography's
#: ValueError).
_BAD_CIPHERTEXT = ("EncryptedDataInvalid", "EncryptedDataLenRange", "DataInvalid", "DataLenRange")


class _Login:
    """This process's login to one token: the session that logged in (kept
    open: closing a logged-in session logs every session of the process
    out) and a digest of the PIN it used."""

    __slots__ = ("pid", "pin_digest", "holder", "confirmed")

    def __init__(self, pin_digest: bytes, holder: Any) -> None:
        self.pid, self.pin_digest, self.holder = os.getpid(), pin_digest, holder
        #: The login was found alive while a key was missing: do not try
        #: again until a key is found (each try may leave a session open).
        self.confirmed = False


#: (library path, slot id) -> this process's login to that token.
_logins: Dict[Tuple[str, int], _Login] = {}
#: (library path, slot id, PIN digest): PINs a token refused; never tried
#: again by this process (a token locks after a few wrong PINs).
_refused_pins: Set[Tuple[str, int, bytes]] = set()
#: After a key failed to reconnect, its next attempt waits this long
#: (operations fail at once meanwhile: no token call per handshake).
RECONNECT_BACKOFF = 1.0
#: A token that fails decryptions is logged at most once per this many seconds.
FAILURE_LOG_INTERVAL = 10.0


def _pin_digest(pin: Optional[str]) -> bytes:
    return b"" if pin is None else hashlib.sha256(b"callcp pkcs11 pin\0" + pin.encode()).digest()


class _KeyNotFound(KeyManagementError):
    """No private key matches the URI (perhaps only for want of a login)."""


def _log_in(path: str, token: Any, pin: Optional[str], *, again: bool = False) -> bool:
    """(under the library's lock) Log this process in to the token with
    ``pin``, unless it is logged in already (with the same PIN: another one
    is refused); True if it logged in now.  ``again``: the login may have
    been lost (a key is not found, a call said "not logged in"): try even
    though one was recorded, once per such episode (a token that answers
    "already logged in" keeps the session python-pkcs11 opened for the try).
    A refused PIN is never tried again by this process."""
    p11 = _binding()
    digest = _pin_digest(pin)
    where = (path, token.slot.slot_id)
    login = _logins.get(where)
    if login is not None and login.pid != os.getpid():
        login = None
    if login is not None and pin is not None and not hmac.compare_digest(login.pin_digest, digest):
        raise KeyManagementError(
            f"this process is logged in to PKCS#11 token {_shown(token.label)} with "
            "another PIN; one process uses one PIN per token"
        )
    if pin is None or (login is not None and (not again or login.confirmed)):
        return False
    if (*where, digest) in _refused_pins:
        raise KeyManagementError(
            f"the PKCS#11 token {_shown(token.label)} refused this PIN before; it is not "
            "tried again (too many wrong PINs lock the token): fix it and restart"
        )
    try:
        try:
            holder = token.open(user_pin=pin)
        except p11.UserAlreadyLoggedIn:
            if login is not None:  # (the login is alive after all)
                login.confirmed = True
                return False
            holder = token.open()  # (logged in by other code of this process)
    except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinLocked) as exc:
        _refused_pins.add((*where, digest))
        if isinstance(exc, p11.PinLocked):
            raise KeyManagementError(
                f"the PKCS#11 token {_shown(token.label)} is locked (too many wrong PINs): "
                "its security officer must reset the user PIN"
            ) from None
        raise KeyManagementError(
            f"the PKCS#11 token {_shown(token.label)} refused the PIN "
            f"({type(exc).__name__}; too many wrong PINs lock the token)"
        ) from None
    except p11.PKCS11Error as exc:
        raise KeyManagementError(
            f"cannot log in to PKCS#11 token {_shown(token.label)}: {_failure(exc)}"
        ) from None
    _logins[where] = _Login(digest, holder)  # (an old holder is let go, never closed)
    return True


class _Session:
    """A key's session with its token and the key's handle in it.

    python-pkcs11 initialises a library without ``CKF_OS_LOCKING_OK``, and
    PKCS#11 then lets no two threads call into it at once (SoftHSM2 crashes
    if they do): every call goes through :func:`_library_lock`, one lock per
    library per process, so one session per key is all a process can use.
    (``workers=N`` processes each have their own library state, sessions
    and lock.)  A login belongs to the whole process: :class:`_Login`
    records it once per token, and a key whose PIN differs from the one
    that logged in is refused.
    """

    def __init__(self, uri: Pkcs11Uri, pin: Optional[str]) -> None:
        self.uri, self._pin, self._digest = uri, pin, _pin_digest(pin)
        self._path = _module_path(uri)
        self._pid = -1  # the process whose session this is (set once it works)
        self._session: Any = None
        self._key: Any = None
        self._token: Any = None
        self._token_pid = -1
        self._retry_at = 0.0
        self._relogin = False  # (a call said "not logged in": log in again)
        self._warned, self._unwarned = -FAILURE_LOG_INTERVAL, 0
        self.token_label = ""
        #: (modulus, exponent) of the key, once known: a key found again
        #: after a lost session must be the same key.
        self.expected: Optional[Tuple[bytes, bytes]] = None
        with _library_lock(self._path):  # (here: a bad URI or PIN fails at load)
            self._connect()

    def _connect(self) -> None:
        """(under the library's lock) This process's library, token, login,
        session and key handle: at load, after a fork, after a lost session.
        Nothing of an earlier session is kept if this fails."""
        p11 = _binding()
        self._session = self._key = None
        if self._token_pid != os.getpid():
            lib = _load_library(self._path)
            self._token = _find_token(lib, self.uri, self._path)
            self.token_label = self._token.label
            self._token_pid = os.getpid()
        token = self._token
        _log_in(self._path, token, self._pin, again=self._relogin)
        self._relogin = False
        try:
            session = token.open()  # (logged in: the login is the process's)
        except p11.PKCS11Error as exc:
            raise KeyManagementError(
                f"cannot open a session with PKCS#11 token {_shown(token.label)}: {_failure(exc)}"
            ) from None
        try:
            try:
                key = self._find_key(session)
            except _KeyNotFound:  # (perhaps the token forgot the login)
                if not _log_in(self._path, token, self._pin, again=True):
                    raise
                key = self._find_key(session)
        except BaseException:
            _close(session)
            raise
        login = _logins.get((self._path, token.slot.slot_id))
        if login is not None:
            login.confirmed = False
        self._session, self._key, self._pid = session, key, os.getpid()

    def _find_key(self, session: Any) -> Any:
        p11 = _binding()
        what = f"{self.uri.key_name} in PKCS#11 token {_shown(self.token_label)}"
        try:
            found = list(session.get_objects(_key_template(self.uri, p11.ObjectClass.PRIVATE_KEY)))
            if len(found) == 1 and self.expected is not None:
                key = found[0]
                numbers = (key[p11.Attribute.MODULUS], key[p11.Attribute.PUBLIC_EXPONENT])
                if numbers != self.expected:
                    raise KeyManagementError(
                        f"the key {what} is no longer the key this process loaded (it was "
                        "replaced in the token): restart with the new key"
                    )
        except p11.PKCS11Error as exc:
            raise KeyManagementError(f"cannot search {what}: {_failure(exc)}") from None
        if len(found) == 1:
            return found[0]
        if not found:
            login = (
                ""
                if self._pin is not None
                else " (no PIN was given, and a token shows private keys only after a "
                f"login: add pin-source=file:/path to the URI or set ${PIN_ENV})"
            )
            raise _KeyNotFound(f"no RSA private key {what}{login}")
        raise KeyManagementError(
            f"{len(found)} RSA private keys match {what}: name one with object= and id="
        )

    def _reconnect(self) -> None:
        """(under the library's lock) :meth:`_connect`, at most once per
        :data:`RECONNECT_BACKOFF` while it fails."""
        now = time.monotonic()
        if now < self._retry_at:
            raise KeyManagementError(
                f"the key {self.uri.key_name} in PKCS#11 token {_shown(self.token_label)} is "
                "unavailable (its last reconnection failed; retrying shortly)"
            )
        try:
            self._connect()
        except KeyManagementError:
            self._retry_at = time.monotonic() + RECONNECT_BACKOFF
            raise
        self._retry_at = 0.0

    def _drop(self, failure: str) -> None:
        """(under the library's lock) Let go of a session that failed."""
        if self._session is not None:
            _close(self._session)  # (not logged in itself: no logout)
        self._session = self._key = None
        self._relogin = self._relogin or failure == "UserNotLoggedIn"

    def _warn(self, exc: Exception) -> None:
        """(under the library's lock) A lost session, logged at most once per
        FAILURE_LOG_INTERVAL with a count."""
        now = time.monotonic()
        self._unwarned += 1
        if now >= self._warned + FAILURE_LOG_INTERVAL:
            logger.warning(
                "PKCS#11 token %s: %s; opening a new session (%d time(s) since the last such line)",
                printable(self.token_label),
                _failure(exc),
                self._unwarned,
            )
            self._warned, self._unwarned = now, 0

    def run(self, operation: Callable[[Any], T]) -> T:
        """``operation(key)`` under the library's lock.  A session whose
        handle or login is gone (the token restarted, say) is replaced, and
        the operation tried once more.

        Raises:
            PKCS11Error: the token failed the operation (the caller maps it).
            KeyManagementError: no session could be opened.
        """
        p11 = _binding()
        with _library_lock(self._path):
            if self._pid != os.getpid() or self._session is None:
                self._reconnect()  # (forked: nothing of the parent's is this process's)
            try:
                return operation(self._key)
            except p11.PKCS11Error as exc:
                failure = type(exc).__name__
                if failure not in _SESSION_GONE:
                    raise
                self._warn(exc)
            self._drop(failure)
            self._reconnect()
            try:
                return operation(self._key)
            except p11.PKCS11Error as exc:
                if type(exc).__name__ in _SESSION_GONE:
                    self._drop(type(exc).__name__)
                raise


def _close(session: Any) -> None:
    """Close a session that did not log in (so no logout)."""
    try:
        session.close()
    except Exception:  # noqa: S110 - (a session already gone)
        pass


_library_locks: Dict[str, threading.RLock] = {}
_library_locks_lock = threading.Lock()


def _library_lock(path: str) -> threading.RLock:
    """The lock every call into the library at ``path`` holds (see :class:`_Session`)."""
    with _library_locks_lock:
        lock = _library_locks.get(path)
        if lock is None:
            lock = _library_locks[path] = threading.RLock()
        return lock


def _after_fork_in_child() -> None:
    # A lock another thread held at fork() would never be released here.
    global _library_locks_lock, _initialised_lock
    _library_locks_lock = threading.Lock()
    _initialised_lock = threading.Lock()
    _library_locks.clear()
    _logins.clear()  # (the parent's logins: gone with its library state)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# The key


_HASHES: Dict[str, Tuple[str, str, int]] = {
    # cryptography name -> (digest Mechanism, MGF, digest size)
    "sha1": ("SHA_1", "SHA1", 20),
    "sha256": ("SHA256", "SHA256", 32),
    "sha384": ("SHA384", "SHA384", 48),
    "sha512": ("SHA512", "SHA512", 64),
}
_SIGN_MECHANISMS = {"sha256": "SHA256", "sha384": "SHA384", "sha512": "SHA512"}


class Pkcs11Key(rsa.RSAPrivateKey):
    """An RSA private key in a PKCS#11 token.

    Open one with ``Pkcs11Key(uri)`` (or through ``KeyPair.load(uri)``).
    ``sign`` (RSA-PSS and PKCS#1 v1.5, SHA-256/384/512) and ``decrypt``
    (RSA-OAEP) run in the token; ``private_bytes`` and ``private_numbers``
    raise: the key cannot leave it.  Thread-safe; fork-safe (see the module).

    Raises:
        KeyManagementError: the URI is bad, the library cannot be loaded, no
            single token or private RSA key matches, the PIN is refused, or
            the key fails its self-test (a signature and a decryption, checked
            against its public key, run at load).
    """

    def __init__(self, uri: str, *, allow_insecure_permissions: bool = False) -> None:
        self._uri = Pkcs11Uri.parse(uri)
        p11 = _binding()
        self._p11 = p11
        pin = _read_pin(self._uri, allow_insecure_permissions)
        self._session = _Session(self._uri, pin)
        self._public = self._read_public()
        self._size = self._public.key_size
        self._modulus = self._public.public_numbers().n
        self._failures_lock = threading.Lock()
        self._failures, self._failure_logged = 0, -FAILURE_LOG_INTERVAL
        self.oaep_in_token = True
        self._self_test()

    # -- what it is ---------------------------------------------------------

    @property
    def uri(self) -> Pkcs11Uri:
        """Where the key is (the parsed URI)."""
        return self._uri

    @property
    def token_label(self) -> str:
        """The label of the token holding the key."""
        return self._session.token_label

    @property
    def key_size(self) -> int:
        """The modulus size in bits."""
        return self._size

    def public_key(self) -> rsa.RSAPublicKey:
        """The public half, read from the token."""
        return self._public

    def _read_public(self) -> rsa.RSAPublicKey:
        p11 = self._p11

        def read(key: Any) -> Tuple[bytes, bytes]:
            return key[p11.Attribute.MODULUS], key[p11.Attribute.PUBLIC_EXPONENT]

        try:
            modulus, exponent = self._session.run(read)
            self._session.expected = (modulus, exponent)
        except p11.PKCS11Error as exc:
            raise KeyManagementError(
                f"cannot read the public half of {self._where()}: {_failure(exc)}"
            ) from None
        try:
            public = rsa.RSAPublicNumbers(
                int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big")
            ).public_key()
        except ValueError:
            raise KeyManagementError(f"{self._where()} has an invalid RSA public key") from None
        problem = _ckeys.rsa_key_problem(public)
        if problem is not None:
            raise KeyManagementError(f"{self._where()} {problem}")
        return public

    def _self_test(self) -> None:
        """Sign and decrypt once, checked against the public key: a token
        whose key does not match its public attributes, or that lacks the
        mechanisms, fails here and not in a handshake.  Also picks how
        OAEP is done (in the token, or raw RSA there and the padding here)."""
        probe = os.urandom(32)
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        try:
            self._public.verify(self.sign(probe, pss, hashes.SHA256()), probe, pss, hashes.SHA256())
        except Exception as exc:
            raise KeyManagementError(
                f"{self._where()} failed its RSA-PSS self-test: {_failure(exc)}"
            ) from None
        oaep = padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        )
        ciphertext = self._public.encrypt(probe, oaep)
        try:
            native = self._run(lambda key: self._oaep_native(key, ciphertext, "sha256"))
        except _Unsupported:
            self.oaep_in_token = False
            native = None
        except Exception as exc:
            raise KeyManagementError(
                f"{self._where()} failed its RSA-OAEP self-test: {_failure(exc)}"
            ) from None
        if native is None:
            try:
                plain = self._decrypt(ciphertext, "sha256")
            except Exception as exc:
                raise KeyManagementError(
                    f"{self._where()} can do neither RSA-OAEP with SHA-256 nor raw RSA "
                    f"(CKM_RSA_X_509): {_failure(exc)}"
                ) from None
        else:
            plain = native
        if not hmac.compare_digest(plain, probe):
            raise KeyManagementError(f"{self._where()} failed its RSA-OAEP self-test")

    def _where(self) -> str:
        return f"key {self._uri.key_name} in PKCS#11 token {_shown(self._session.token_label)}"

    # -- operations ---------------------------------------------------------

    def _run(self, operation: Callable[[Any], T]) -> T:
        return self._session.run(operation)

    def _token_error(self, exc: Exception, what: str) -> KeyManagementError:
        return KeyManagementError(f"{self._where()} failed to {what}: {_failure(exc)}")

    def sign(
        self,
        data: bytes,
        padding: AsymmetricPadding,
        algorithm: Any,
    ) -> bytes:
        """Sign ``data`` in the token: RSA-PSS (MGF1 over the same hash) or
        PKCS#1 v1.5, with SHA-256, SHA-384 or SHA-512 (or ``Prehashed``).

        Raises:
            UnsupportedAlgorithm: another padding or hash.
            KeyManagementError: the token failed.
        """
        p11 = self._p11
        prehashed = isinstance(algorithm, asym_utils.Prehashed)
        digest = algorithm._algorithm if prehashed else algorithm
        name = getattr(digest, "name", None)
        if name not in _SIGN_MECHANISMS:
            raise UnsupportedAlgorithm(
                f"a PKCS#11 key signs with SHA-256, SHA-384 or SHA-512, not {name}",
                _Reasons.UNSUPPORTED_HASH,
            )
        hash_mech, mgf, size = _HASHES[name]
        if isinstance(padding, _PSS):
            mgf_hash = getattr(getattr(padding, "_mgf", None), "_algorithm", None)
            if getattr(mgf_hash, "name", None) != name:
                raise UnsupportedAlgorithm(
                    "a PKCS#11 key signs RSA-PSS with MGF1 over the signature's hash",
                    _Reasons.UNSUPPORTED_PADDING,
                )
            salt = _pss_salt(padding, self._size, size)
            mechanism = (
                p11.Mechanism.RSA_PKCS_PSS
                if prehashed
                else getattr(p11.Mechanism, f"{_SIGN_MECHANISMS[name]}_RSA_PKCS_PSS")
            )
            param: Any = (getattr(p11.Mechanism, hash_mech), getattr(p11.MGF, mgf), salt)
            message = data
        elif isinstance(padding, _PKCS1):
            if prehashed:
                mechanism, param = p11.Mechanism.RSA_PKCS, None
                message = _digest_info(name) + data
            else:
                mechanism = getattr(p11.Mechanism, f"{_SIGN_MECHANISMS[name]}_RSA_PKCS")
                param, message = None, data
        else:
            raise UnsupportedAlgorithm(
                f"a PKCS#11 key signs with PSS or PKCS1v15, not {type(padding).__name__}",
                _Reasons.UNSUPPORTED_PADDING,
            )
        if prehashed and len(data) != size:
            raise ValueError(f"the prehashed digest must be {size} bytes")
        try:
            signature: bytes = self._run(
                lambda key: key.sign(message, mechanism=mechanism, mechanism_param=param)
            )
        except p11.PKCS11Error as exc:
            raise self._token_error(exc, "sign") from None
        return signature

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        """RSA-OAEP decryption in the token.  Every failure is ValueError,
        as with cryptography's keys, whatever the token said: a peer that
        sends ciphertexts learns nothing from how one fails (the handshake
        turns any failure into its implicit rejection).  A failure of the
        token itself (not a bad ciphertext) is logged, at most once every
        :data:`FAILURE_LOG_INTERVAL` seconds.

        Raises:
            ValueError: decryption failed.
            UnsupportedAlgorithm: not OAEP with MGF1 over its hash, with no label.
        """
        name = _oaep_hash(padding)
        try:
            return self._decrypt(ciphertext, name)
        except KeyManagementError as exc:
            self._note_failure(exc)
            raise ValueError("Decryption failed") from None

    def _decrypt(self, ciphertext: bytes, name: str) -> bytes:
        """:meth:`decrypt`, a token's own failure raised as KeyManagementError."""
        p11 = self._p11
        if (
            len(ciphertext) != (self._size + 7) // 8
            or int.from_bytes(ciphertext, "big") >= self._modulus
        ):  # (public facts: a token may call them a "general error")
            raise ValueError("Decryption failed")
        try:
            if self.oaep_in_token:
                return self._run(lambda key: self._oaep_native(key, ciphertext, name))
            raw = self._run(lambda key: key.decrypt(ciphertext, mechanism=p11.Mechanism.RSA_X_509))
        except _Unsupported as exc:
            raise self._token_error(exc, "decrypt") from None
        except p11.PKCS11Error as exc:
            if type(exc).__name__ in _BAD_CIPHERTEXT:
                raise ValueError("Decryption failed") from None
            raise self._token_error(exc, "decrypt") from None
        plain = oaep_decode(raw, (self._size + 7) // 8, name)
        if plain is None:
            raise ValueError("Decryption failed")
        return plain

    def _note_failure(self, exc: KeyManagementError) -> None:
        now = time.monotonic()
        with self._failures_lock:
            self._failures += 1
            if now < self._failure_logged + FAILURE_LOG_INTERVAL:
                return
            count, self._failures, self._failure_logged = self._failures, 0, now
        logger.warning("%s (%d time(s) since the last such line)", exc, count)

    def _oaep_native(self, key: Any, ciphertext: bytes, name: str) -> bytes:
        p11 = self._p11
        hash_mech, mgf, _ = _HASHES[name]
        param = (getattr(p11.Mechanism, hash_mech), getattr(p11.MGF, mgf), None)
        try:
            plain: bytes = key.decrypt(
                ciphertext, mechanism=p11.Mechanism.RSA_PKCS_OAEP, mechanism_param=param
            )
        except (p11.ArgumentsBad, p11.MechanismInvalid, p11.MechanismParamInvalid) as exc:
            raise _Unsupported(_failure(exc)) from None
        except p11.PKCS11Error as exc:
            if type(exc).__name__ in _BAD_CIPHERTEXT:
                raise ValueError("Decryption failed") from None
            raise
        return plain

    # -- what it will not do ------------------------------------------------

    def _stays(self) -> KeyManagementError:
        return KeyManagementError(
            f"the private key is in PKCS#11 token {_shown(self._session.token_label)} "
            "and cannot leave it (save its public key, or its fingerprint, instead)"
        )

    def private_bytes(self, encoding: Any, format: Any, encryption_algorithm: Any) -> bytes:
        """Refused (KeyManagementError): the private key never leaves the token."""
        raise self._stays()

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        """Refused (KeyManagementError): the private key never leaves the token."""
        raise self._stays()

    def __copy__(self) -> Pkcs11Key:
        return self

    def __deepcopy__(self, memo: Any) -> Pkcs11Key:
        return self

    def __reduce__(self) -> Any:
        raise TypeError("a PKCS#11 key cannot be pickled (open it by its URI in each process)")

    def __repr__(self) -> str:
        return f"<Pkcs11Key rsa-{self._size} {self._where()}>"


def _oaep_hash(pad: AsymmetricPadding) -> str:
    """The hash name of an OAEP padding a token key decrypts, or UnsupportedAlgorithm."""
    if not isinstance(pad, _OAEP):
        raise UnsupportedAlgorithm(
            f"a PKCS#11 key decrypts RSA-OAEP only, not {type(pad).__name__}",
            _Reasons.UNSUPPORTED_PADDING,
        )
    name = getattr(getattr(pad, "_algorithm", None), "name", None)
    mgf_name = getattr(getattr(getattr(pad, "_mgf", None), "_algorithm", None), "name", None)
    if name not in _HASHES or mgf_name != name or getattr(pad, "_label", None):
        raise UnsupportedAlgorithm(
            "a PKCS#11 key decrypts RSA-OAEP with MGF1 over its hash and no label",
            _Reasons.UNSUPPORTED_PADDING,
        )
    return str(name)


class _Unsupported(Exception):
    """The token does not do RSA-OAEP with these parameters."""


_PSS = padding.PSS
_OAEP = padding.OAEP
_PKCS1 = padding.PKCS1v15


def _pss_salt(pad: padding.PSS, key_bits: int, digest_size: int) -> int:
    salt = getattr(pad, "_salt_length", None)
    em_len = (key_bits - 1 + 7) // 8
    if isinstance(salt, int) and not isinstance(salt, bool):
        if salt < 0:
            raise ValueError("the PSS salt length must not be negative")
        return salt
    if salt is padding.PSS.DIGEST_LENGTH:
        return digest_size
    if salt is padding.PSS.MAX_LENGTH:
        return em_len - digest_size - 2
    raise UnsupportedAlgorithm(
        "a PKCS#11 key signs RSA-PSS with a fixed salt length", _Reasons.UNSUPPORTED_PADDING
    )


#: DER DigestInfo prefixes (RFC 8017 section 9.2, note 1).
_DIGEST_INFO = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}


def _digest_info(name: str) -> bytes:
    return _DIGEST_INFO[name]


# ---------------------------------------------------------------------------
# OAEP padding, for tokens that only do raw RSA


def _mgf1(seed: bytes, length: int, name: str) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def oaep_decode(em: bytes, k: int, name: str = "sha256", label: bytes = b"") -> Optional[bytes]:
    """The message in an OAEP-encoded block ``em`` (RFC 8017 section 7.1.2,
    steps 3a-3g) for a ``k``-byte modulus, or None if it is not valid.

    Side-channel care: every check runs on every input, with no branch on a
    decrypted byte until the single verdict: the leading zero and the label
    hash are compared together in constant time, and the separator is found
    by a scan over all of the padding that only does arithmetic.  (The
    message's length, once the verdict is "valid", is the plaintext's own.)
    """
    h = hashlib.new(name).digest_size
    if k < 2 * h + 2 or len(em) > k:
        return None
    em = em.rjust(k, b"\0")  # (a token may leave out leading zero bytes)
    masked_seed, masked_db = em[1 : 1 + h], em[1 + h :]
    seed = _xor(masked_seed, _mgf1(masked_db, h, name))
    db = _xor(masked_db, _mgf1(seed, k - h - 1, name))
    head_ok = hmac.compare_digest(em[:1] + db[:h], b"\0" + hashlib.new(name, label).digest())
    # DB = lHash || PS (zeros) || 0x01 || M: find the 0x01, and see that
    # only zeros come before it.
    looking, index, bad = 1, 0, 0
    for i, byte in enumerate(db[h:]):
        zero = ((byte - 1) >> 8) & 1  # 1 when byte == 0
        one = (((byte ^ 1) - 1) >> 8) & 1  # 1 when byte == 1
        found = looking & one
        index |= -found & i
        bad |= looking & (1 - zero) & (1 - one)
        looking &= zero
    ok = (int(head_ok) & (1 - (bad | looking))) == 1
    if not ok:
        return None
    return db[h + index + 1 :]


# ---------------------------------------------------------------------------
# Generating a key in a token


def generate_key(
    uri: str, bits: int = 2048, *, allow_insecure_permissions: bool = False
) -> Pkcs11Key:
    """Generate an RSA key pair in the token (public exponent 65537; the
    private key sensitive and not extractable) labelled ``object`` with
    CKA_ID ``id`` (8 random bytes when the URI has none), and open it.

    Raises:
        KeyManagementError: ``bits`` is not one of 2048, 3072, 4096; the URI
            has no ``object``; the token already holds a private key with
            that label or id (callcp never replaces a key in a token); or the
            token cannot generate it.
    """
    if isinstance(bits, bool) or bits not in _ckeys.RSA_KEY_SIZES:
        sizes = ", ".join(str(b) for b in _ckeys.RSA_KEY_SIZES)
        raise KeyManagementError(f"cannot generate a {bits}-bit RSA key: choose one of {sizes}")
    parsed = Pkcs11Uri.parse(uri)
    if parsed.object is None:
        raise KeyManagementError(
            "name the new key: add object=LABEL to the PKCS#11 URI (and optionally id=)"
        )
    parsed = replace(parsed, id=parsed.id if parsed.id is not None else os.urandom(8))
    pin = _read_pin(parsed, allow_insecure_permissions)
    if pin is None:
        raise KeyManagementError(
            f"generating a key in a token needs its user PIN: add pin-source=file:/path "
            f"to the URI or set ${PIN_ENV}"
        )
    path = _module_path(parsed)
    with _library_lock(path):
        _generate_in_token(parsed, pin, path, bits)
    return Pkcs11Key(str(parsed), allow_insecure_permissions=allow_insecure_permissions)


def _generate_in_token(parsed: Pkcs11Uri, pin: str, path: str, bits: int) -> None:
    """(under the library's lock) :func:`generate_key`'s work in the token."""
    p11 = _binding()
    label, key_id = parsed.object, parsed.id
    assert label is not None and key_id is not None
    lib = _load_library(path)
    token = _find_token(lib, parsed, path)
    where = f"PKCS#11 token {_shown(token.label)}"
    _log_in(path, token, pin)
    try:
        session = token.open(rw=True)  # (not logging in itself: closing it logs no one out)
    except p11.PKCS11Error as exc:
        raise KeyManagementError(f"cannot open a session with {where}: {_failure(exc)}") from None
    try:
        for attribute, value, named in (
            (p11.Attribute.LABEL, label, f"label {_shown(label)}"),
            (p11.Attribute.ID, key_id, f"id {quote(key_id, safe='')}"),
        ):
            if list(
                session.get_objects(
                    {p11.Attribute.CLASS: p11.ObjectClass.PRIVATE_KEY, attribute: value}
                )
            ):
                raise KeyManagementError(
                    f"{where} already holds a private key with {named}; callcp never "
                    "replaces a key in a token: choose another object= (or id=)"
                )
        common = {p11.Attribute.TOKEN: True, p11.Attribute.LABEL: label, p11.Attribute.ID: key_id}
        session.generate_keypair(
            p11.KeyType.RSA,
            bits,
            store=True,
            label=label,
            id=key_id,
            public_template={
                **common,
                p11.Attribute.PUBLIC_EXPONENT: (65537).to_bytes(3, "big"),
                p11.Attribute.VERIFY: True,
                p11.Attribute.ENCRYPT: True,
                p11.Attribute.PRIVATE: False,
            },
            private_template={
                **common,
                p11.Attribute.PRIVATE: True,
                p11.Attribute.SENSITIVE: True,
                p11.Attribute.EXTRACTABLE: False,
                p11.Attribute.SIGN: True,
                p11.Attribute.DECRYPT: True,
                p11.Attribute.UNWRAP: False,
                p11.Attribute.DERIVE: False,
            },
        )
    except p11.PKCS11Error as exc:
        raise KeyManagementError(
            f"{where} could not generate a {bits}-bit RSA key: {_failure(exc)}"
        ) from None
    finally:
        _close(session)
