"""``callcp serve --receive-dir``: where received files go, and what is refused.

A sender is anyone who completes a handshake (unless the server requires
client authentication), so the directory is guarded like any input:

- **Names.** Only the base name the sender gave, NFC-normalised (so ``é``
  composed and decomposed are one name), is used.  Refused: empty, ``.``,
  ``..``, a leading ``.`` (dotfiles), ``-`` (taken for an option by the
  tools that will handle the file) or ``~``; leading or trailing blanks, a
  trailing dot; names of blanks or invisible characters only; any character
  that is not printable (controls, C1, bidi and other format characters,
  line separators); a ``.part`` ending in any case; Windows device names
  (``CON``, ``nul.txt``...); and names over :data:`MAX_NAME_BYTES` bytes of
  UTF-8.  (Look-alikes from other scripts, such as a Cyrillic ``а``, are not
  detected.)
- **Never overwritten, never seen half-written.** The bytes go to a hidden
  temporary file, ``.callcp-<random>.part`` (``O_EXCL``, mode 0600, never
  through a link), and only once the stream verified is it linked under its
  name: ``name``, then ``stem (1).ext`` to ``stem (9).ext``, then
  ``stem (<8 random hex>).ext`` (a hard link fails on an existing name, so
  nothing is ever replaced, and the tenth file of one name costs what the
  first does).  Every operation goes through a descriptor of the directory
  opened at start-up: swapping the directory for a link later changes
  nothing.
- **Limits**, refused with REFUSED and the reason: a file larger than
  ``max_file_size`` (by its announced size before a byte is stored, else as
  soon as it goes over); files beyond ``max_files``; their total beyond
  ``max_total_size``; less than ``min_free_space`` left on the file system;
  more than ``max_uploads`` uploads at once, or ``max_uploads_per_source``
  from one address.  Room is taken as bytes arrive (a stalled upload holds
  only what it sent), and the directory is counted again (at most once a
  second) before a limit refuses, so files taken away free their room.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Dict, List, Optional, Tuple

from ._core.errors import StreamTooLarge

__all__ = ["DEFAULT_LIMITS", "Inbox", "InboxLimits", "Refused", "safe_file_name"]

log = logging.getLogger("callcp.cli")

#: Longest received file name accepted, in UTF-8 bytes (room left for " (n)").
MAX_NAME_BYTES = 200
GIB = 1 << 30
#: The temporary files of uploads under way (names no sender can give).
TEMP_PREFIX, TEMP_SUFFIX = ".callcp-", ".part"
_DEVICES = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?", re.IGNORECASE)
#: Blank characters that ``str.isprintable()`` calls printable.
_BLANKS = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}


@dataclass(frozen=True)
class InboxLimits:
    """What a receive directory accepts (see the module)."""

    max_file_size: int = 1 * GIB
    max_total_size: int = 10 * GIB
    max_files: int = 10_000
    min_free_space: int = 1 * GIB
    max_uploads: int = 32
    max_uploads_per_source: int = 4


DEFAULT_LIMITS = InboxLimits()


class Refused(Exception):
    """A file the directory will not take; ``str()`` is the reason the
    sender is told (no path, no local detail)."""


def safe_file_name(sent: str) -> Optional[str]:
    """The name a received file is stored under, or None to refuse it (the
    module says what is refused)."""
    base = unicodedata.normalize("NFC", re.split(r"[/\\]", sent)[-1])
    if base in ("", ".", "..") or base[0] in ".-~" or base != base.strip() or base[-1] == ".":
        return None
    if not base.isprintable() or all(c.isspace() or c in _BLANKS for c in base):
        return None
    if base.lower().endswith(TEMP_SUFFIX) or _DEVICES.fullmatch(base):
        return None
    if len(base.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        return None
    return base


def _candidates(name: str) -> List[str]:
    stem, ext = os.path.splitext(name)
    numbered = [name] + [f"{stem} ({n}){ext}" for n in range(1, 10)]
    return numbered + [f"{stem} ({secrets.token_hex(4)}){ext}" for _ in range(100)]


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class Slot:
    """One upload under way: its temporary file, and the room it has taken."""

    def __init__(self, inbox: Inbox, name: str, source: str, temp: str, fd: int) -> None:
        self.inbox, self.name, self.source, self._temp = inbox, name, source, temp
        self.file: IO[bytes] = os.fdopen(fd, "wb")
        #: The most bytes this stream may have (recv_stream's max_size).
        self.max_size = inbox.limits.max_file_size
        self.held = 0  # bytes of room taken (as they arrive)
        self.path: Optional[Path] = None  # once committed
        self._done = False

    def progress(self, received: int, total: Optional[int]) -> None:
        """(recv_stream's progress callback) Take room for what arrived.

        Raises:
            StreamTooLarge: the room is gone (the connection is then closed
                with REFUSED and this reason).
        """
        if received > self.held:
            self.inbox._take(self, received)

    def commit(self, length: int) -> Path:
        """The stream verified: link the file under a free name like its
        own (never replacing one) and let go of the temporary name."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.path = self.inbox._name(self._temp, self.name)
        self._end(length)
        return self.path

    def discard(self) -> None:
        """The upload failed: nothing of it stays."""
        if self._done:
            return
        try:
            self.file.close()
        except OSError:
            pass
        self.inbox._unlink(self._temp)
        self._end(None)

    def _end(self, stored: Optional[int]) -> None:
        self._done = True
        self.inbox._release(self, stored)


class Inbox:
    """A receive directory, its limits and its usage (see the module)."""

    RESCAN_EVERY = 1.0

    def __init__(self, directory: Path, fd: int, limits: InboxLimits) -> None:
        self.directory = directory
        self.limits = limits
        self._fd = fd
        self._lock = threading.Lock()
        self.files, self.bytes = self._usage()
        self._scanned = time.monotonic()
        self._uploads: Dict[str, int] = {}  # source -> uploads under way
        self._in_flight = 0  # bytes of room taken by uploads under way

    @classmethod
    def open(cls, directory: Path, limits: InboxLimits = DEFAULT_LIMITS) -> Inbox:
        """Create the directory if needed, open it (following a link given
        here, once), and check that this process can store files there, now
        rather than at the first upload.

        Raises:
            OSError: it is not a directory, cannot be created, or cannot be
                written (the message says which).
        """
        if os.path.lexists(directory) and not directory.is_dir():
            raise NotADirectoryError(f"{directory} is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            probe = f"{TEMP_PREFIX}write-test-{secrets.token_hex(8)}{TEMP_SUFFIX}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=fd))
            os.unlink(probe, dir_fd=fd)
            mode = os.fstat(fd).st_mode
            if mode & (stat.S_IWGRP | stat.S_IWOTH):
                log.warning(
                    "other users can write into %s: they can fill it, and take or add files "
                    "(chmod go-w %s)",
                    directory,
                    directory,
                )
            inbox = cls(directory, fd, limits)
        except BaseException:
            os.close(fd)
            raise
        stale = inbox._stale_temp_files()
        if stale:
            log.warning(
                "%d unfinished uploads from an earlier run in %s (%s*%s): delete them",
                stale,
                directory,
                TEMP_PREFIX,
                TEMP_SUFFIX,
            )
        return inbox

    # -- counting ------------------------------------------------------------

    def _entries(self) -> List[Tuple[str, os.stat_result]]:
        found = []
        with os.scandir(self._fd) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append((entry.name, st))
        return found

    def _usage(self) -> Tuple[int, int]:
        done = [st for name, st in self._entries() if not _is_temp(name)]
        return len(done), sum(st.st_size for st in done)

    def _stale_temp_files(self) -> int:
        return sum(1 for name, _ in self._entries() if _is_temp(name))

    def _rescan(self) -> None:
        """(under the lock) Count the directory again, at most once a
        second: files taken away free their room."""
        now = time.monotonic()
        if now - self._scanned >= self.RESCAN_EVERY:
            self.files, self.bytes = self._usage()
            self._scanned = now

    # -- uploads -------------------------------------------------------------

    def admit(self, name: str, size: Optional[int], source: str = "") -> Slot:
        """An upload of a file like ``name`` (from :func:`safe_file_name`)
        of ``size`` bytes (None: not announced) from ``source``.

        Raises:
            Refused: a limit says no (the reason for the sender).
            OSError: the directory cannot be written.
        """
        limits = self.limits
        if size is not None and size > limits.max_file_size:
            raise Refused(
                f"the file is larger than this server's limit of {_show(limits.max_file_size)}"
            )
        with self._lock:
            uploads = sum(self._uploads.values())
            if uploads >= limits.max_uploads:
                raise Refused(f"this server takes at most {limits.max_uploads} uploads at once")
            if self._uploads.get(source, 0) >= limits.max_uploads_per_source:
                raise Refused(
                    f"this server takes at most {limits.max_uploads_per_source} uploads at "
                    "once from one address"
                )
            problem = self._room_problem(size or 0, uploads + 1)
            if problem is not None:
                self._rescan()
                problem = self._room_problem(size or 0, uploads + 1)
            if problem is not None:
                raise Refused(problem)
            self._uploads[source] = self._uploads.get(source, 0) + 1
        try:
            temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
            fd = os.open(temp, flags, 0o600, dir_fd=self._fd)
        except BaseException:
            with self._lock:
                self._leave(source)
            raise
        slot = Slot(self, name, source, temp, fd)
        if size is not None:
            slot.max_size = size  # (a file longer than it announced is refused)
        return slot

    def _room_problem(self, more: int, files: int) -> Optional[str]:
        """(under the lock) Why ``more`` bytes (and this many files under
        way) do not fit, or None."""
        limits = self.limits
        if self.files + files > limits.max_files:
            return f"this server holds its maximum of {limits.max_files} files"
        if self.bytes + self._in_flight + more > limits.max_total_size:
            return (
                f"the file would take this server over its total of {_show(limits.max_total_size)}"
            )
        free = shutil.disk_usage(f"/proc/self/fd/{self._fd}" if _PROC else self.directory).free
        if free - more < limits.min_free_space:
            return "this server's disk is too full to store the file"
        return None

    def _take(self, slot: Slot, received: int) -> None:
        """Room for the ``received`` bytes of ``slot`` (one chunk more)."""
        want = received - slot.held
        with self._lock:
            uploads = sum(self._uploads.values())
            problem = self._room_problem(want, uploads)
            if problem is not None:
                self._rescan()
                problem = self._room_problem(want, uploads)
            if problem is not None:
                raise StreamTooLarge(problem, reason=problem)
            self._in_flight += want
            slot.held += want

    def _release(self, slot: Slot, stored: Optional[int]) -> None:
        with self._lock:
            self._in_flight -= slot.held
            slot.held = 0
            self._leave(slot.source)
            if stored is not None:
                self.files += 1
                self.bytes += stored

    def _leave(self, source: str) -> None:
        left = self._uploads.get(source, 0) - 1
        if left > 0:
            self._uploads[source] = left
        else:
            self._uploads.pop(source, None)

    def _name(self, temp: str, name: str) -> Path:
        """Link ``temp`` under the first free name like ``name``; unlink ``temp``."""
        fd = self._fd
        try:
            for candidate in _candidates(name):
                try:
                    os.link(temp, candidate, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    continue
                except OSError as exc:  # (a file system without hard links)
                    if exc.errno not in _NO_LINKS:
                        raise
                    try:
                        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
                        os.close(os.open(candidate, flags, 0o600, dir_fd=fd))
                    except FileExistsError:
                        continue
                    os.replace(temp, candidate, src_dir_fd=fd, dst_dir_fd=fd)
                    return self.directory / candidate
                return self.directory / candidate
            raise FileExistsError(f"too many files named like {name!r} in {self.directory}")
        finally:
            self._unlink(temp)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self._fd)
        except OSError:
            pass

    def close(self) -> None:
        os.close(self._fd)


_PROC = os.path.isdir("/proc/self/fd")
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def _is_temp(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def _show(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"
