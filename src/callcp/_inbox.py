"""``callcp serve --receive-dir``: where received files go, and what is refused.

A sender is anyone who completes a handshake (unless the server requires
client authentication), so the directory is guarded like any input:

- **Names.** Only the base name the sender gave, NFC-normalised (so ``é``
  composed and decomposed are one name), is used.  Refused: empty, ``.``,
  ``..``, a leading ``.`` (dotfiles) or ``-`` (taken for an option by the
  tools that will handle the file), whitespace only, any character that is
  not printable (controls, C1, bidi and other format characters, line
  separators), a ``.part`` ending (the server's own temporary files), and
  names over :data:`MAX_NAME_BYTES` bytes of UTF-8.
- **Never overwritten.** The name is claimed with ``O_EXCL`` (``name``, then
  ``stem (1).ext`` to ``stem (9).ext``, then ``stem (<8 random hex>).ext``:
  the tenth file of one name costs what the first does), and the bytes go
  to ``<claimed>.part``, also created with ``O_EXCL``, never through a link:
  a collision picks another name.  The ``.part`` file is renamed over the
  claim only once the stream verified.
- **Limits**, refused with REFUSED and the reason before any byte is stored
  when the sender announced the size, else as soon as it goes over: a file
  larger than ``max_file_size``; files in the directory beyond
  ``max_files``; their total beyond ``max_total_size``; less than
  ``min_free_space`` left on the file system.  The directory's files are
  counted at start-up and then as this server stores them (and reserves room
  for those under way); what other programs add meanwhile counts at the
  next start, and the free space is read from the file system at each
  upload.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import IO, List, Optional, Tuple

__all__ = ["DEFAULT_LIMITS", "Inbox", "InboxLimits", "Refused", "reserve_path", "safe_file_name"]

#: Longest received file name accepted, in UTF-8 bytes (room left for " (n)" and ".part").
MAX_NAME_BYTES = 200
GIB = 1 << 30


@dataclass(frozen=True)
class InboxLimits:
    """What a receive directory accepts (see the module)."""

    max_file_size: int = 1 * GIB
    max_total_size: int = 10 * GIB
    max_files: int = 10_000
    min_free_space: int = 1 * GIB


DEFAULT_LIMITS = InboxLimits()


class Refused(Exception):
    """A file the directory will not take; ``str()`` is the reason the
    sender is told (no path, no local detail)."""


def safe_file_name(sent: str) -> Optional[str]:
    """The name a received file is stored under, or None to refuse it (the
    module says what is refused)."""
    base = unicodedata.normalize("NFC", re.split(r"[/\\]", sent)[-1])
    if base in ("", ".", "..") or base[0] in ".-" or not base.strip():
        return None
    if not base.isprintable() or base.endswith(".part"):
        return None
    if len(base.encode("utf-8", "replace")) > MAX_NAME_BYTES:
        return None
    return base


def _candidates(name: str) -> List[str]:
    stem, ext = os.path.splitext(name)
    numbered = [name] + [f"{stem} ({n}){ext}" for n in range(1, 10)]
    return numbered + [f"{stem} ({secrets.token_hex(4)}){ext}" for _ in range(100)]


def reserve_path(directory: Path, name: str) -> Tuple[Path, Path, int]:
    """Claim a new file for ``name`` in ``directory``: (the claimed path,
    its ``.part`` path, the ``.part`` file's descriptor, open for writing).

    Both are created with ``O_EXCL`` (the ``.part`` file mode 0600, never
    through a link), so concurrent uploads of one name, or a file planted
    at either name, make it pick another candidate.

    Raises:
        OSError: the directory cannot be written; FileExistsError when no
            candidate was free.
    """
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    for candidate_name in _candidates(name):
        candidate = directory / candidate_name
        part = directory / (candidate_name + ".part")
        try:
            claim = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
        except FileExistsError:
            continue
        os.close(claim)
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o600)
        except FileExistsError:
            candidate.unlink(missing_ok=True)
            continue
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        return candidate, part, fd
    raise FileExistsError(f"too many files named like {name!r} in {directory}")


class Slot:
    """One upload under way: where it goes, how large it may get."""

    def __init__(self, inbox: Inbox, path: Path, part: Path, fd: int, room: int, held: int):
        self.inbox, self.path, self.part = inbox, path, part
        self.file: IO[bytes] = os.fdopen(fd, "wb")
        #: The most bytes this stream may have (recv_stream's max_size).
        self.max_size = room
        self._held = held
        self._done = False

    def commit(self, length: int) -> None:
        """The stream verified: the file takes its name."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.part, self.path)
        self._end(length)

    def discard(self) -> None:
        """The upload failed: nothing of it stays."""
        if self._done:
            return
        try:
            self.file.close()
        except OSError:
            pass
        for leftover in (self.part, self.path):
            try:
                leftover.unlink()
            except OSError:
                pass
        self._end(None)

    def _end(self, stored: Optional[int]) -> None:
        self._done = True
        self.inbox._release(self._held, stored)


class Inbox:
    """A receive directory, its limits and its usage (see the module)."""

    def __init__(self, directory: Path, limits: InboxLimits = DEFAULT_LIMITS) -> None:
        self.directory = directory
        self.limits = limits
        self._lock = threading.Lock()
        self.files, self.bytes = self._usage()
        self._reserved_bytes = 0
        self._reserved_files = 0

    @classmethod
    def open(cls, directory: Path, limits: InboxLimits = DEFAULT_LIMITS) -> Inbox:
        """Create the directory if needed and check that this process can
        store files there, now rather than at the first upload.

        Raises:
            OSError: it is not a directory, cannot be created, or cannot be
                written (the message says which).
        """
        if os.path.lexists(directory) and not directory.is_dir():
            raise NotADirectoryError(f"{directory} is not a directory")
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".callcp-write-test-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
        return cls(directory, limits)

    def _usage(self) -> Tuple[int, int]:
        files = total = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    files += 1
                    total += st.st_size
        return files, total

    def admit(self, name: str, size: Optional[int]) -> Slot:
        """Room for a file of ``size`` bytes (None: not announced) under a
        name like ``name`` (from :func:`safe_file_name`).

        Raises:
            Refused: a limit says no (the reason for the sender).
            OSError: the directory cannot be written.
        """
        limits = self.limits
        if size is not None and size > limits.max_file_size:
            raise Refused(
                f"the file is larger than this server's limit of {_show(limits.max_file_size)}"
            )
        free = shutil.disk_usage(self.directory).free
        with self._lock:
            if self.files + self._reserved_files >= limits.max_files:
                raise Refused(f"this server holds its maximum of {limits.max_files} files")
            total_room = limits.max_total_size - self.bytes - self._reserved_bytes
            disk_room = free - limits.min_free_space - self._reserved_bytes
            room = min(limits.max_file_size, total_room, disk_room)
            if size is not None and size > total_room:
                raise Refused(
                    f"the file would take this server over its total of "
                    f"{_show(limits.max_total_size)}"
                )
            if size is not None and size > disk_room or room <= 0:
                raise Refused("this server's disk is too full to store the file")
            held = size if size is not None else room
            self._reserved_bytes += held
            self._reserved_files += 1
        try:
            path, part, fd = reserve_path(self.directory, name)
        except BaseException:
            self._release(held, None)
            raise
        return Slot(self, path, part, fd, room if size is None else size, held)

    def _release(self, held: int, stored: Optional[int]) -> None:
        with self._lock:
            self._reserved_bytes -= held
            self._reserved_files -= 1
            if stored is not None:
                self.files += 1
                self.bytes += stored


def _show(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} bytes"
