"""Where a client keeps the session tickets servers give it.

A callcp server sends a session ticket after each handshake; offered on the
next connection to that server, it spares the server its RSA decryption (a
resumed handshake, docs/PROTOCOL.md §4.8).  Tickets are single-use: taking one
removes it, and every connection brings a new one, so two connections never
show an observer the same ticket.

By default every client of a process shares :data:`PROCESS_SESSIONS`, in
memory (a forked child starts with it empty, so parent and child never offer
the same ticket).  ``SessionStore(path)`` keeps them in a file as well, so
short-lived processes resume too: mode 0600, written through a fresh
temporary file and an atomic rename, read only if it is a regular file of
ours that nobody else may write, and updated under an exclusive lock, so
processes sharing it take each ticket once.  (A ticket's secret lets its
holder skip the server's RSA work, nothing more, but it is still a secret.)
Pass ``session_store=None`` to ``connect()`` to use no tickets at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
import threading
import time
import weakref
from collections import OrderedDict, deque
from pathlib import Path
from typing import Deque, Iterator, Optional, Union

from ._core.tickets import MAX_TICKET_BYTES, Session

__all__ = ["SessionStore", "PROCESS_SESSIONS", "Session"]

PathLike = Union[str, "os.PathLike[str]"]

_STORES: weakref.WeakSet[SessionStore] = weakref.WeakSet()


class SessionStore:
    """Session tickets per (server address, client identity), thread-safe.

    At most ``per_server`` tickets are kept for each server (the newest) and
    at most ``max_servers`` servers (the least recently used go first).
    """

    def __init__(
        self, path: Optional[PathLike] = None, *, per_server: int = 4, max_servers: int = 1024
    ) -> None:
        self.path = Path(os.path.expanduser(path)) if path is not None else None
        self.per_server = per_server
        self.max_servers = max_servers
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Deque[Session]] = OrderedDict()
        _STORES.add(self)

    def __repr__(self) -> str:
        where = f"{os.fspath(self.path)!r}" if self.path is not None else "in memory"
        return f"SessionStore({where})"

    @staticmethod
    def _key(host: str, port: int, identity: str) -> str:
        return f"{host.lower()}:{port} {identity}"

    def take(self, host: str, port: int, identity: str = "") -> Optional[Session]:
        """Remove and return a valid ticket for this server (and client key
        fingerprint ``identity``, "" without client authentication)."""
        key = self._key(host, port, identity)
        now = time.time()
        with self._lock, self._file_lock():
            self._load()
            found = self._sessions.get(key)
            session = None
            while found and session is None:
                candidate = found.pop()  # the newest
                if candidate.expiry > now:
                    session = candidate
            if found is not None and not found:
                del self._sessions[key]
            if session is not None or found is not None:
                self._save()
            return session

    def put(self, host: str, port: int, identity: str, session: Session) -> None:
        """Keep a ticket a server gave this client (one too large to offer
        is not kept)."""
        if len(session.ticket) > MAX_TICKET_BYTES or len(session.secret) != 32:
            return
        key = self._key(host, port, identity)
        with self._lock, self._file_lock():
            self._load()
            kept = self._sessions.setdefault(key, deque(maxlen=self.per_server))
            kept.append(session)
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_servers:
                self._sessions.popitem(last=False)
            self._save()

    def clear(self) -> None:
        """Forget every ticket (and empty the file)."""
        with self._lock, self._file_lock():
            self._sessions.clear()
            self._save()

    def __len__(self) -> int:
        with self._lock, self._file_lock():
            self._load()
            return sum(len(kept) for kept in self._sessions.values())

    # -- the file

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """(file stores) An exclusive lock on ``<file>.lock`` across processes,
        so a read-modify-write of the file is not interleaved (best effort)."""
        if self.path is None:
            yield
            return
        fd = -1
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(
                self.path.with_name(self.path.name + ".lock"),
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                0o600,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # (unlockable: tickets are an optimisation)
        try:
            yield
        finally:
            if fd >= 0:
                os.close(fd)  # (closing drops the lock)

    def _load(self) -> None:
        """(file stores) Read the file again: another process may have taken
        or added tickets since (the file is the truth).  Only a regular file
        of ours that nobody else may write is read; anything else (missing,
        damaged, foreign) reads as empty."""
        if self.path is None:
            return
        self._sessions.clear()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return
        try:
            info = os.fstat(fd)
            if (
                not stat.S_ISREG(info.st_mode)
                or info.st_uid != os.getuid()
                or info.st_mode & 0o022
                or info.st_size > 4 * 1024 * 1024
            ):
                return
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = json.loads(f.read())
        except Exception:  # (a damaged file of any kind costs a full handshake, no more)
            return
        finally:
            os.close(fd)
        now = time.time()
        for key, entries in data.items() if isinstance(data, dict) else ():
            kept: Deque[Session] = deque(maxlen=self.per_server)
            for entry in entries if isinstance(entries, list) else ():
                try:
                    session = Session(
                        bytes.fromhex(entry["ticket"]),
                        bytes.fromhex(entry["secret"]),
                        str(entry["server"]),
                        float(entry["expiry"]),
                    )
                except (KeyError, TypeError, ValueError, OverflowError):
                    continue  # (a damaged entry: skipped)
                if (
                    session.expiry > now
                    and len(session.secret) == 32
                    and len(session.ticket) <= MAX_TICKET_BYTES
                ):
                    kept.append(session)
            if kept:
                self._sessions[str(key)] = kept

    def _save(self) -> None:
        if self.path is None:
            return
        data = {
            key: [
                {
                    "ticket": s.ticket.hex(),
                    "secret": s.secret.hex(),
                    "server": s.server_fingerprint,
                    "expiry": s.expiry,
                }
                for s in kept
            ]
            for key, kept in self._sessions.items()
        }
        tmp = ""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # A fresh, unpredictable temporary file (O_EXCL, mode 0600), then an
            # atomic rename: nobody else's file or symlink is ever written.
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w") as out:
                json.dump(data, out)
            os.replace(tmp, self.path)
        except OSError:
            if tmp:  # (tickets are an optimisation: a store that cannot write forgets)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _forget_after_fork() -> None:
    """(a forked child) Start with no in-memory tickets: parent and child
    must not offer the same ones (file stores re-read their file anyway)."""
    for store in list(_STORES):
        store._lock = threading.Lock()
        if store.path is None:
            store._sessions.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


#: The store every client of this process uses unless told otherwise.
PROCESS_SESSIONS = SessionStore()
