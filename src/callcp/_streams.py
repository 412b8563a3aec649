"""Stream sources and sinks shared by the blocking and asyncio adapters.

A *source* is a binary file object (anything with ``read(n)``), a bytes-like
object, or an iterable of bytes-like chunks.  A *sink* is a path or a
writable binary file object.  For a path the bytes go to ``<path>.part``,
which is renamed to ``<path>`` only after the stream verified (its length,
and its SHA-256 when the sender sent one); on any failure it is deleted.
The ``.part`` file is created anew with mode 0600: never through a symbolic
link, never over a file already there (a hard link to another file, another
transfer's ``.part``: then ``<path>.<random>.part`` is used), so the
received file is private to its owner.  For a file object, a failure
truncates it back to where it started when it is seekable (when it is not,
the exception is the only signal: do not trust what was written).
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Union

from ._core.errors import CallcpError, CallcpTimeout, StreamAbortedError, StreamTooLarge
from ._core.events import StreamAborted, StreamChunk, StreamEnded, StreamStarted

__all__ = [
    "StreamInfo",
    "StreamReception",
    "Progress",
    "Source",
    "Destination",
    "Sink",
    "iter_chunks",
    "source_size",
    "CHUNK_SIZE",
]

#: Bytes read from a source per record.
CHUNK_SIZE = 65536

#: ``progress(bytes_done, total_or_None)``
Progress = Callable[[int, Optional[int]], None]
Buffer = Union[bytes, bytearray, memoryview]
Source = Union[IO[bytes], Buffer, Iterable[Buffer]]
Destination = Union[str, "os.PathLike[str]", IO[bytes]]


@dataclass(frozen=True)
class StreamInfo:
    """What a completed stream was: its length, its SHA-256 (hex; None when
    the sender did not ask for a checksum) and the sender's name for it."""

    length: int
    sha256: Optional[str]
    name: str = ""


def iter_chunks(source: Source, chunk_size: int = CHUNK_SIZE) -> Iterator[Buffer]:
    """Cut a source into chunks of at most ``chunk_size`` bytes (bounded memory).

    Raises:
        TypeError: the source is not a binary file, bytes-like or an iterable
            of bytes-like objects.
    """
    read = getattr(source, "read", None)
    if read is not None:
        while True:
            chunk = read(chunk_size)
            if not chunk:
                return
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise TypeError("send_stream() needs a file opened in binary mode")
            yield chunk
    elif isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source).cast("B")
        for offset in range(0, len(view), chunk_size):
            yield view[offset : offset + chunk_size]
    else:
        for item in source:
            if not isinstance(item, (bytes, bytearray, memoryview)):
                raise TypeError(f"stream chunks must be bytes-like, not {type(item).__name__}")
            view = memoryview(item).cast("B")
            for offset in range(0, len(view), chunk_size):
                yield view[offset : offset + chunk_size]


def source_size(source: Any) -> Optional[int]:
    """The number of bytes left in a source, when it can be known cheaply
    (bytes-like objects and regular files); else None."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).nbytes
    try:
        st = os.fstat(source.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(0, int(st.st_size - source.tell()))
    except (AttributeError, OSError, ValueError):
        return None


class Sink:
    """Where a received stream goes; ``commit()`` or ``discard()`` it."""

    def __init__(self, dest: Destination) -> None:
        self.path: Optional[Path] = None
        self._part: Optional[Path] = None
        if isinstance(dest, (str, os.PathLike)):
            self.path = Path(dest)
            self._part = self.path.with_name(self.path.name + ".part")
            # A new file, private until done: never a link planted at the
            # .part name, nor a file already there (a hard link to another
            # file, another transfer's .part) truncated.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(self._part, flags, 0o600)
            except FileExistsError:  # (an earlier receive's leftover, or another's)
                self._part = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}.part")
                fd = os.open(self._part, flags, 0o600)
            self._fh: IO[bytes] = os.fdopen(fd, "wb")
            self._start = 0
        else:
            if not hasattr(dest, "write"):
                raise TypeError("recv_stream() needs a path or a binary file opened for writing")
            self._fh = dest
            try:
                self._start = dest.tell() if dest.seekable() else -1
            except (OSError, AttributeError, ValueError):
                self._start = -1

    def write(self, data: bytes) -> None:
        self._fh.write(data)

    def commit(self) -> None:
        """The stream verified: make the output final."""
        if self._part is not None and self.path is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self._part, self.path)
        else:
            self._fh.flush()

    def discard(self) -> None:
        """The stream failed: remove (or roll back) what was written.  Never raises."""
        try:
            if self._part is not None:
                self._fh.close()
                self._part.unlink()
            elif self._start >= 0:
                self._fh.seek(self._start)
                self._fh.truncate()
        except (OSError, ValueError):
            pass


def too_large(size: Optional[int], max_size: Optional[int]) -> bool:
    return max_size is not None and size is not None and size > max_size


def check_max_size(max_size: Optional[int]) -> None:
    """``recv_stream(max_size=...)``: None, or a whole number >= 0."""
    if max_size is not None and (
        isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0
    ):
        raise ValueError(f"max_size must be a whole number of bytes >= 0, not {max_size!r}")


class StreamReception:
    """What ``recv_stream()`` does with each event, for both adapters: write
    chunks to the sink, report progress, finish or abandon it."""

    def __init__(
        self,
        started: StreamStarted,
        dest: Destination,
        progress: Optional[Progress],
        max_size: Optional[int] = None,
    ):
        self.started = started
        self.max_size = max_size
        if too_large(started.size, max_size):
            raise StreamTooLarge(
                f"the peer announced a stream of {started.size} bytes; at most {max_size} "
                "are accepted"
            )
        self.sink = Sink(dest)
        self.progress = progress
        self.received = 0

    def feed(self, event: Any) -> Optional[StreamInfo]:
        """Handle one event of the stream; its StreamInfo once it ended.

        Raises:
            StreamAbortedError: the sender abandoned the stream.
        """
        if isinstance(event, StreamChunk):
            if too_large(self.received + len(event.data), self.max_size):
                raise StreamTooLarge(
                    f"the peer sent more than {self.max_size} bytes in one stream; at most "
                    f"{self.max_size} are accepted"
                )
            self.sink.write(event.data)
            self.received += len(event.data)
            if self.progress is not None:
                self.progress(self.received, self.started.size)
        elif isinstance(event, StreamEnded):
            self.sink.commit()
            digest = event.sha256.hex() if event.sha256 is not None else None
            return StreamInfo(event.length, digest, self.started.name)
        elif isinstance(event, StreamAborted):
            raise StreamAbortedError(
                "the sender abandoned the stream" + (f": {event.reason}" if event.reason else ""),
                reason=event.reason,
            )
        return None

    def failed(self, exc: Optional[BaseException]) -> bool:
        """The reception stopped with ``exc``: discard the output, and say
        whether the connection must be closed (the rest of the stream would
        otherwise be misread): after a timeout or a local error, not after
        a protocol error (already closed) or the sender's abort (still open)."""
        self.sink.discard()
        return isinstance(exc, CallcpTimeout) or not isinstance(exc, CallcpError)
