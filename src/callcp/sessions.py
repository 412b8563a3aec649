"""Where a client keeps the session tickets servers give it.

A callcp server sends a session ticket after each handshake; offered on the
next connection to that server, it spares the server its RSA decryption (a
resumed handshake, docs/PROTOCOL.md §4.8).  Tickets are single-use: taking one
removes it, and every connection brings a new one, so two connections never
show an observer the same ticket.

By default every client of a process shares :data:`PROCESS_SESSIONS`, in
memory.  ``SessionStore(path)`` keeps them in a file as well (mode 0600: a
ticket's secret lets its holder skip the server's RSA work, nothing more, but
it is still a secret), so short-lived processes resume too.  Pass
``session_store=None`` to ``connect()`` to use no tickets at all.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Union

from ._core.tickets import Session

__all__ = ["SessionStore", "PROCESS_SESSIONS", "Session"]

PathLike = Union[str, "os.PathLike[str]"]


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
        with self._lock:
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
        """Keep a ticket a server gave this client."""
        key = self._key(host, port, identity)
        with self._lock:
            self._load()
            kept = self._sessions.setdefault(key, deque(maxlen=self.per_server))
            kept.append(session)
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_servers:
                self._sessions.popitem(last=False)
            self._save()

    def clear(self) -> None:
        """Forget every ticket (and empty the file)."""
        with self._lock:
            self._sessions.clear()
            self._save()

    def __len__(self) -> int:
        with self._lock:
            self._load()
            return sum(len(kept) for kept in self._sessions.values())

    # -- the file

    def _load(self) -> None:
        """(file stores) Read the file again: another process may have taken
        or added tickets since (the file is the truth; last writer wins)."""
        if self.path is None:
            return
        self._sessions.clear()
        try:
            data: Dict[str, List[Dict[str, Any]]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # missing or unreadable: start empty (tickets are an optimisation)
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
                except (KeyError, TypeError, ValueError):
                    continue
                if session.expiry > now and len(session.secret) == 32:
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
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(data, out)
            os.replace(tmp, self.path)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass  # (tickets are an optimisation: a store that cannot write forgets)


#: The store every client of this process uses unless told otherwise.
PROCESS_SESSIONS = SessionStore()
