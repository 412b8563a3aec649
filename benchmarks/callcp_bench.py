"""Benchmarks: callcp against Python's ``ssl`` (TLS 1.3) and raw TCP, in one run.

Run it as ``python benchmarks/run.py`` (or ``make bench``, or ``callcp bench``
from a checkout); see benchmarks/README.md for what is measured and how to
read the results.  This module is not part of the callcp package: it lives in
the repository's benchmarks/ directory and imports callcp like any user would
(only its public API).  Results go to benchmarks/results/local/ (ignored by
git) unless ``--save`` asks for benchmarks/results/, the committed ones.

Theory of operation
-------------------
Every scenario runs the same message sizes and patterns over three
*implementations*:

``callcp``
    callcp/2 (``callcp.serve`` / ``callcp.aio.serve``); the client pins the
    server's fingerprint, so no known-hosts file is read or written.
``ssl``
    Python's ``ssl`` module, TLS 1.3 only, an RSA-2048 self-signed
    certificate (SAN ``localhost`` and ``127.0.0.1``) that the client
    verifies (``check_hostname``, ``server_hostname="localhost"``).
``raw``
    plain TCP.

``ssl`` and ``raw`` carry messages as a 4-byte big-endian length and the
payload, so all three deliver whole messages.  Servers run in their own
processes (multiprocessing, ``spawn``); clients run in this process, or in
two client processes for the parallel handshake case, or in one client
process for the concurrency, rtt_cpu and pool scenarios.  Everything is on
127.0.0.1, with TCP_NODELAY on every socket.  Blocking sockets have no
Python-level timeout (which would cost a ``poll()`` per call); kernel
timeouts (SO_RCVTIMEO) keep a broken run from hanging.

Each scenario runs ``reps`` repetitions, after a warm-up; the repetitions of
the three implementations are interleaved (callcp, ssl, raw; then ssl, raw,
callcp; ...) so that a noisy neighbour hurts them alike.  The table shows
the median and the min-max of the repetitions, and the ratios callcp/ssl and
callcp/raw of the medians.  The JSON keeps every sample.

Two scenarios compare callcp with itself, not with ssl and raw TCP
(:data:`CALLCP_ONLY`): ``workers`` (a server with workers=1 vs workers=2) and
``pool`` (``pool.request`` on a warm ``callcp.Pool`` vs ``Connection.request``
on one bare connection, against the same server process).  Their samples are
keyed by those two variants, their one ratio is the second's median over the
first's, and the table shows each of their metrics on one line.

Child processes talk to this one over a ``multiprocessing`` pipe, with
tuples ``(tag, value)``; a child that fails sends ``("error", text)``.
Memory figures come from the process itself: VmRSS / VmHWM in
``/proc/self/status`` (the peak is reset through ``/proc/self/clear_refs``
just before a measured transfer, where the kernel allows it).  CPU figures
(rtt_cpu) do too: user + system time from ``getrusage(RUSAGE_SELF)``, read by
the client process around its round trips, and by the server process when
the parent asks over its pipe, just before and just after them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import importlib
import inspect
import io
import ipaddress
import json
import logging
import math
import multiprocessing
import os
import platform
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import cache
from multiprocessing.connection import Connection as PipeEnd
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    NoReturn,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
)

import callcp
import callcp.aio as callcp_aio

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

__all__ = [
    "CALLCP_ONLY",
    "POOL_BLOCKS",
    "POOL_TOLERANCE",
    "SCENARIOS",
    "SIZES",
    "BenchError",
    "Options",
    "Report",
    "Sizes",
    "build_parser",
    "machine_info",
    "main",
    "options_for",
    "run",
    "workers_support",
]

HOST = "127.0.0.1"
TLS_HOSTNAME = "localhost"
KINDS = ("callcp", "ssl", "raw")
KIND_LABELS = {"callcp": "callcp", "ssl": "ssl TLS1.3", "raw": "raw TCP"}
DEFAULT_RATIOS = (("callcp", "ssl"), ("callcp", "raw"))
MESSAGE_SIZE = 64
ECHO_SIZE = 64 * 1024
CHUNK_SIZE = 64 * 1024
#: Connections opening at once in the concurrency scenario's client.
OPEN_IN_FLIGHT = 64
#: Kernel timeout on benchmark sockets: a safety net, never reached in a good run.
SOCKET_TIMEOUT = 60
#: How long to wait for a child process's answer before giving up.
CHILD_TIMEOUT = 600.0
BACKLOG = 1024
#: Bytes asked of a plain socket per read (as callcp.sync does).
READ_SIZE = 256 * 1024
_HEADER = struct.Struct("!I")
_LENGTH = struct.Struct("!Q")
MB = 1_000_000

#: The committed results (README tables and chart): written only with ``--save``.
SAVED_RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Where a run writes by default (ignored by git: see benchmarks/.gitignore).
LOCAL_RESULTS_DIR = SAVED_RESULTS_DIR / "local"
DEFAULT_JSON = LOCAL_RESULTS_DIR / "latest.json"
DEFAULT_PNG = LOCAL_RESULTS_DIR / "latest.png"

#: Scenario names, in the order they run (``--only`` takes these).
SCENARIOS = (
    "handshake",
    "resume",
    "handshake_2proc",
    "workers",
    "rtt_sync",
    "rtt_aio",
    "rtt_cpu",
    "pool",
    "echo_64k",
    "stream",
    "concurrency",
)

WORKERS_UNSUPPORTED = "workers: not supported by this build"

#: Scenarios that compare two variants of callcp, not callcp with ssl and raw
#: TCP: scenario -> (the baseline, the variant).  Their metrics' samples are
#: keyed by these two names, and their one ratio is variant / baseline.
CALLCP_ONLY: Dict[str, Tuple[str, str]] = {
    "workers": ("workers=1", "workers=2"),
    "pool": ("bare", "pool"),
}
#: The pool scenario's target: ``pool.request`` on a warm pool within 10 % of
#: a bare ``Connection.request`` in the same run (round trips/s at least 0.90x
#: bare; the notes also say whether the client CPU per request is within
#: 1.10x).
POOL_TOLERANCE = 0.10
#: The pool scenario alternates the bare connection and the pool in blocks:
#: each repetition's round trips on each are split into this many blocks.
POOL_BLOCKS = 20


class BenchError(Exception):
    """The benchmark could not run (a child process failed, a port was busy...)."""


@dataclass(frozen=True)
class Sizes:
    """How big and how long: one of :data:`SIZES`."""

    name: str
    reps: int
    #: timed length of one repetition of a rate scenario (s)
    seconds: float
    #: warm-up of each implementation before a rate scenario's repetitions (s)
    warmup: float
    stream_bytes: int
    concurrency: Tuple[int, ...]
    requests_per_connection: int
    #: round trips per repetition of rtt_cpu (a fixed count: CPU time per round trip)
    rtt_count: int


SIZES: Dict[str, Sizes] = {
    "full": Sizes("full", 5, 1.0, 0.3, 1 << 30, (100, 1000, 5000), 10, 20_000),
    "quick": Sizes("quick", 3, 0.3, 0.1, 64 << 20, (100, 1000), 5, 10_000),
    "tiny": Sizes("tiny", 1, 0.05, 0.02, 256 << 10, (4, 8), 2, 200),
}


@dataclass(frozen=True)
class Options:
    """What to run and where to write; see ``python benchmarks/run.py --help``."""

    sizes: str = "full"
    reps: Optional[int] = None
    #: round trips per repetition of rtt_cpu (default: the sizes' ``rtt_count``)
    rtt_count: Optional[int] = None
    json_path: Optional[Path] = DEFAULT_JSON
    png_path: Optional[Path] = DEFAULT_PNG
    #: machine.md (default: next to the JSON file)
    machine_path: Optional[Path] = None
    only: Optional[Sequence[str]] = None
    #: how this run was asked for (recorded in the JSON and machine.md)
    command: str = "python benchmarks/run.py"


# ====================================================================== keys and targets


@dataclass(frozen=True)
class Material:
    """Key material in a temporary directory, shared by every process."""

    callcp_key: str
    callcp_fingerprint: str
    cert: str
    cert_key: str


@dataclass(frozen=True)
class Target:
    """Where a client connects, and how."""

    kind: str
    port: int
    material: Material
    #: callcp: offer session tickets (a resumed handshake); else every
    #: connection is a full handshake
    resume: bool = False


def make_material(directory: Path) -> Material:
    """A callcp server key and an RSA-2048 self-signed certificate for
    ``localhost`` / ``127.0.0.1``, written in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    keypair = callcp.KeyPair.generate(2048)
    callcp_key = directory / "callcp_server_key.pem"
    keypair.save(callcp_key, directory / "callcp_server_key.pub.pem", password=None)

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_HOSTNAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(TLS_HOSTNAME),
                    x509.IPAddress(ipaddress.ip_address(HOST)),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "tls_cert.pem"
    cert_key_path = directory / "tls_key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    cert_key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(cert_key_path, 0o600)
    return Material(str(callcp_key), keypair.fingerprint, str(cert_path), str(cert_key_path))


@cache
def _server_context(material: Material) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(material.cert, material.cert_key)
    return ctx


@cache
def _client_context(material: Material) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(material.cert)
    return ctx


@cache
def _callcp_keypair(path: str) -> callcp.KeyPair:
    return callcp.KeyPair.load(path)


def _tune(sock: socket.socket) -> None:
    """TCP_NODELAY, blocking, and kernel timeouts as a safety net."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    timeval = struct.pack("ll", SOCKET_TIMEOUT, 0)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(BACKLOG)
    return sock


def _quiet_logger() -> logging.Logger:
    """callcp's logger for benchmark servers: errors only (a benchmark's
    clients come and go by the thousand)."""
    log = logging.getLogger("callcp_bench.server")
    log.setLevel(logging.ERROR)
    return log


# ====================================================================== framed plain sockets


class _Framed:
    """Length-prefixed messages over a plain or TLS socket (ssl and raw)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        # One reusable read buffer (as callcp.sync has): recv(256 KiB) would
        # allocate a fresh 256 KiB object on every call.
        self._rview = memoryview(bytearray(READ_SIZE))

    def send(self, payload: bytes) -> None:
        self.sock.sendall(_HEADER.pack(len(payload)) + payload)

    def recv(self) -> Optional[bytes]:
        """The next message; None at a clean end of stream."""
        buf = self._buf
        while True:
            if len(buf) >= 4:
                (size,) = _HEADER.unpack_from(buf)
                if len(buf) >= 4 + size:
                    message = bytes(buf[4 : 4 + size])
                    del buf[: 4 + size]
                    return message
            n = self.sock.recv_into(self._rview)
            if not n:
                if buf:
                    raise ConnectionError("the peer closed in the middle of a message")
                return None
            buf += self._rview[:n]

    def request(self, payload: bytes) -> bytes:
        self.send(payload)
        reply = self.recv()
        if reply is None:
            raise ConnectionError("the server closed the connection")
        return reply

    def close(self) -> None:
        self.sock.close()


class _AFramed:
    """Length-prefixed messages over asyncio streams (ssl and raw)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, payload: bytes) -> bytes:
        self.writer.write(_HEADER.pack(len(payload)) + payload)
        await self.writer.drain()
        (size,) = _HEADER.unpack(await self.reader.readexactly(4))
        return await self.reader.readexactly(size)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)


class _Session(Protocol):
    def request(self, message: bytes) -> bytes: ...

    def close(self) -> None: ...


class _ASession(Protocol):
    async def request(self, message: bytes) -> bytes: ...

    async def close(self) -> None: ...


#: The session tickets of this process's resuming callcp clients.
_RESUME_STORE: Any = None


def _sessions(target: Target) -> Dict[str, Any]:
    """callcp's ``session_store`` option for this target (builds without
    session tickets take none)."""
    store_type = getattr(callcp, "SessionStore", None)
    if store_type is None:
        return {}
    global _RESUME_STORE
    if _RESUME_STORE is None:
        _RESUME_STORE = store_type()
    return {"session_store": _RESUME_STORE if target.resume else None}


def _open_sync(target: Target) -> _Session:
    """A blocking client connection, handshake done (callcp: key exchange sent)."""
    material = target.material
    if target.kind == "callcp":
        return callcp.connect(
            HOST,
            target.port,
            server_fingerprint=material.callcp_fingerprint,
            timeout=SOCKET_TIMEOUT,
            **_sessions(target),
        )
    sock = socket.create_connection((HOST, target.port), timeout=SOCKET_TIMEOUT)
    _tune(sock)
    if target.kind == "ssl":
        sock = _client_context(material).wrap_socket(sock, server_hostname=TLS_HOSTNAME)
    return _Framed(sock)


def _pool_options(target: Target) -> Dict[str, Any]:
    """The client options of a callcp pool to ``target``: those of
    :func:`_open_sync`'s connections (pinned key, timeout, session store)."""
    return {
        "server_fingerprint": target.material.callcp_fingerprint,
        "timeout": SOCKET_TIMEOUT,
        **_sessions(target),
    }


async def _open_aio(target: Target) -> _ASession:
    material = target.material
    if target.kind == "callcp":
        return await callcp_aio.connect(
            HOST,
            target.port,
            server_fingerprint=material.callcp_fingerprint,
            timeout=SOCKET_TIMEOUT,
        )
    tls = _client_context(material) if target.kind == "ssl" else None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            HOST, target.port, ssl=tls, server_hostname=TLS_HOSTNAME if tls else None
        ),
        SOCKET_TIMEOUT,
    )
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _AFramed(reader, writer)


# ====================================================================== memory


def _status_kib(field_name: str) -> Optional[int]:
    """A ``VmRSS``/``VmHWM``-style field of /proc/self/status, in KiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss_kib() -> int:
    if resource is None:  # pragma: no cover
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak // 1024) if sys.platform == "darwin" else int(peak)


def rss_kib() -> int:
    """This process's resident memory now (KiB)."""
    value = _status_kib("VmRSS")
    return value if value is not None else _maxrss_kib()


def peak_rss_kib() -> int:
    """This process's peak resident memory (KiB), since the last reset."""
    value = _status_kib("VmHWM")
    return value if value is not None else _maxrss_kib()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux 4.0+); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cpu_seconds() -> Tuple[float, float]:
    """(user, system) CPU seconds used so far by this process, all threads."""
    if resource is not None:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # microsecond resolution
        return usage.ru_utime, usage.ru_stime
    times = os.times()  # pragma: no cover - clock ticks (10 ms) where getrusage is missing
    return times.user, times.system


# ====================================================================== child processes

_CTX = multiprocessing.get_context("spawn")


def _child_setup() -> None:
    """Common to every child: Ctrl-C is the parent's business; many file
    descriptors; quiet logs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _raise_nofile()
    logging.basicConfig(level=logging.ERROR, format="bench child: %(levelname)s %(message)s")


def _raise_nofile() -> None:
    if resource is None:  # pragma: no cover
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _report_failure(pipe: PipeEnd, exc: BaseException) -> None:
    with contextlib.suppress(OSError, ValueError):
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))


def _command_loop(pipe: PipeEnd, on_stop: Optional[Callable[[], None]] = None) -> None:
    """Answer the parent: ``("rss",)`` -> VmRSS in KiB; ``("cpu",)`` -> this
    process's (user, system) CPU seconds; ``("stop",)`` -> exit (after
    ``on_stop()``, which stops a server's worker processes)."""
    while True:
        try:
            command = pipe.recv()
        except (EOFError, OSError):
            os._exit(0)
        if command[0] == "rss":
            gc.collect()
            pipe.send(("rss", rss_kib()))
        elif command[0] == "cpu":
            pipe.send(("cpu", cpu_seconds()))
        else:  # "stop"
            if on_stop is not None:
                with contextlib.suppress(Exception):
                    on_stop()
            os._exit(0)


def _start_command_thread(pipe: PipeEnd, on_stop: Optional[Callable[[], None]] = None) -> None:
    threading.Thread(
        target=_command_loop, args=(pipe, on_stop), name="bench-commands", daemon=True
    ).start()


class _Child:
    """A spawned child process and this side of its pipe."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        self.pipe, child_end = _CTX.Pipe()
        # Not a daemon: a server with workers=N may start processes of its own.
        self.proc = _CTX.Process(target=target, args=(*args, child_end), name=name)
        self.proc.start()
        child_end.close()
        _LIVE.add(self)

    def expect(self, tag: str, timeout: float = CHILD_TIMEOUT) -> Any:
        """The value of the child's next message, which must be ``tag``."""
        deadline = time.monotonic() + timeout
        while not self.pipe.poll(0.1):
            if not self.proc.is_alive():
                if self.pipe.poll(0):
                    break
                raise BenchError(f"{self.name} exited (code {self.proc.exitcode}) before {tag!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {tag!r} after {timeout:.0f} s")
        try:
            got, value = self.pipe.recv()
        except EOFError:
            raise BenchError(
                f"{self.name} exited (code {self.proc.exitcode}) before {tag!r}"
            ) from None
        if got == "error":
            raise BenchError(f"{self.name} failed: {value}")
        if got != tag:
            raise BenchError(f"{self.name}: expected {tag!r}, got {got!r}")
        return value

    def send(self, *message: Any) -> None:
        self.pipe.send(message)

    def stop(self, wait: float = 5.0) -> None:
        """Ask the child to exit; terminate it if it does not within ``wait`` s."""
        if self.proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.pipe.send(("stop",))
            self.proc.join(wait)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5.0)
        if self.proc.is_alive():  # pragma: no cover - a wedged child
            self.proc.kill()
            self.proc.join(5.0)
        self.pipe.close()
        _LIVE.discard(self)


_LIVE: Set[_Child] = set()


def _stop_all() -> None:
    for child in list(_LIVE):
        child.stop()


# ---------------------------------------------------------------- servers


@dataclass(frozen=True)
class ServerSpec:
    kind: str
    #: "sync": threads, a thread per connection; "aio": asyncio
    flavour: str
    material: Material
    options: Tuple[Tuple[str, Any], ...] = ()


def _callcp_echo(conn: callcp.Connection) -> None:
    for message in conn:
        conn.send(message)


async def _callcp_aecho(conn: callcp_aio.Connection) -> None:
    async for message in conn:
        await conn.send(message)


def _plain_echo(sock: socket.socket, tls: Optional[ssl.SSLContext]) -> None:
    try:
        _tune(sock)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_side=True)
        framed = _Framed(sock)
        while True:
            message = framed.recv()
            if message is None:
                break
            framed.send(message)
    except OSError:  # ssl.SSLError and resets included
        pass
    finally:
        sock.close()


async def _plain_aecho(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            header = await reader.readexactly(4)
            (size,) = _HEADER.unpack(header)
            body = await reader.readexactly(size)
            writer.write(header + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, OSError):
        pass
    finally:
        writer.close()


def _server_main(spec: ServerSpec, pipe: PipeEnd) -> None:
    """A server process: ``("ready", port)``, then serve until ``("stop",)``."""
    _child_setup()
    try:
        options = dict(spec.options)
        if spec.flavour == "aio":
            asyncio.run(_aio_server(spec, options, pipe))
        elif spec.kind == "callcp":
            server = callcp.serve(
                _callcp_echo,
                HOST,
                0,
                key=_callcp_keypair(spec.material.callcp_key),
                backlog=BACKLOG,
                logger=_quiet_logger(),
                **options,
            )
            pipe.send(("ready", server.port))
            # With workers=N, shut down properly: the workers are processes of their own.
            _start_command_thread(pipe, server.shutdown if options.get("workers", 1) > 1 else None)
            server.serve_forever()
        else:
            tls = _server_context(spec.material) if spec.kind == "ssl" else None
            listener = _listen()
            pipe.send(("ready", listener.getsockname()[1]))
            _start_command_thread(pipe)
            while True:
                sock, _ = listener.accept()
                threading.Thread(target=_plain_echo, args=(sock, tls), daemon=True).start()
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


async def _aio_server(spec: ServerSpec, options: Dict[str, Any], pipe: PipeEnd) -> None:
    if spec.kind == "callcp":
        server = await callcp_aio.serve(
            _callcp_aecho,
            HOST,
            0,
            key=_callcp_keypair(spec.material.callcp_key),
            backlog=BACKLOG,
            logger=_quiet_logger(),
            **options,
        )
        port = server.port
        on_stop: Optional[Callable[[], None]] = None
        if options.get("workers", 1) > 1:
            loop = asyncio.get_running_loop()

            def on_stop() -> None:
                asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(30)

    else:
        tls = _server_context(spec.material) if spec.kind == "ssl" else None
        plain = await asyncio.start_server(_plain_aecho, HOST, 0, ssl=tls, backlog=BACKLOG)
        port = plain.sockets[0].getsockname()[1]
        on_stop = None
    pipe.send(("ready", port))
    _start_command_thread(pipe, on_stop)
    await asyncio.Event().wait()  # until the command thread exits the process


class _Servers:
    """One server process per implementation, started together."""

    def __init__(self, kinds: Sequence[str], flavour: str, material: Material) -> None:
        self.children = {
            kind: _Child(
                f"{kind} {flavour} server", _server_main, ServerSpec(kind, flavour, material)
            )
            for kind in kinds
        }
        self.targets = {
            kind: Target(kind, child.expect("ready"), material)
            for kind, child in self.children.items()
        }

    def stop(self) -> None:
        for child in self.children.values():
            child.stop()

    def __enter__(self) -> _Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------- clients


@dataclass(frozen=True)
class HandshakeCount:
    count: int
    errors: int
    started: float
    ended: float


def handshake_loop(target: Target, started: float, seconds: float) -> HandshakeCount:
    """New connection + handshake + one 64-byte request/response, in a loop
    from the monotonic time ``started`` for ``seconds``."""
    message = os.urandom(MESSAGE_SIZE)
    while time.monotonic() < started:
        time.sleep(min(0.01, max(0.0, started - time.monotonic())))
    start = time.monotonic()
    end = start + seconds
    count = errors = 0
    now = start
    while now < end:
        try:
            session = _open_sync(target)
            try:
                if session.request(message) != message:
                    raise BenchError("the server did not echo the request")
            finally:
                session.close()
            count += 1
        except (OSError, callcp.CallcpError):
            errors += 1
            if errors > 100 and errors > 10 * count:
                raise BenchError(f"{target.kind}: {errors} failed connections") from None
        now = time.monotonic()
    return HandshakeCount(count, errors, start, now)


def _client_worker_main(pipe: PipeEnd) -> None:
    """A client process for the parallel handshake case:
    ``("handshakes", target, started, seconds)`` -> ``("result", HandshakeCount)``."""
    _child_setup()
    try:
        pipe.send(("ready", os.getpid()))
        while True:
            command = pipe.recv()
            if command[0] != "handshakes":
                return
            _, target, started, seconds = command
            pipe.send(("result", handshake_loop(target, started, seconds)))
    except EOFError:
        return
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


class _ClientPool:
    """Client processes that run handshake loops at the same time."""

    def __init__(self, size: int) -> None:
        self.children = [_Child(f"client {i + 1}", _client_worker_main) for i in range(size)]
        for child in self.children:
            child.expect("ready")

    def handshakes(self, target: Target, seconds: float) -> Tuple[float, int]:
        """(connections/s over all clients, errors)"""
        started = time.monotonic() + 0.05  # CLOCK_MONOTONIC is system-wide on Linux
        for child in self.children:
            child.send("handshakes", target, started, seconds)
        results: List[HandshakeCount] = [
            child.expect("result", timeout=seconds + 120) for child in self.children
        ]
        elapsed = max(r.ended for r in results) - min(r.started for r in results)
        return sum(r.count for r in results) / elapsed, sum(r.errors for r in results)

    def stop(self) -> None:
        for child in self.children:
            child.stop()


def request_rate(target: Target, payload: bytes, seconds: float) -> float:
    """Requests/s of one blocking connection doing request/response."""
    session = _open_sync(target)
    try:
        for _ in range(10):
            if session.request(payload) != payload:
                raise BenchError(f"{target.kind}: the server did not echo the request")
        count = 0
        start = now = time.monotonic()
        end = start + seconds
        while now < end:
            session.request(payload)
            count += 1
            now = time.monotonic()
        return count / (now - start)
    finally:
        session.close()


async def arequest_rate(target: Target, payload: bytes, seconds: float) -> float:
    """Requests/s of one asyncio connection doing request/response."""
    session = await _open_aio(target)
    try:
        for _ in range(10):
            if await session.request(payload) != payload:
                raise BenchError(f"{target.kind}: the server did not echo the request")
        count = 0
        start = now = time.monotonic()
        end = start + seconds
        while now < end:
            await session.request(payload)
            count += 1
            now = time.monotonic()
        return count / (now - start)
    finally:
        await session.close()


def _rtt_cpu_client_main(pipe: PipeEnd) -> None:
    """The client process of rtt_cpu, one connection at a time:

    ``("rtt", target, flavour, n)`` -> connect and warm up, ``("connected", None)``;
    ``("go",)`` -> ``n`` round trips, ``("result", {...})`` with their wall and
    CPU time; ``("close",)`` -> close the connection; then the next ``"rtt"``.
    The connection stays open until ``"close"`` so that the server's CPU time,
    which the parent reads between ``"connected"`` and ``"result"``, covers
    the round trips and nothing else."""
    _child_setup()
    try:
        pipe.send(("ready", os.getpid()))
        while True:
            command = pipe.recv()
            if command[0] != "rtt":
                return
            _, target, flavour, n = command
            if flavour == "aio":
                asyncio.run(_timed_arequests(target, n, pipe))
            else:
                _timed_requests(target, n, pipe)
    except EOFError:
        return
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


def _rtt_warmup(n: int) -> int:
    return max(10, n // 10)


def _await(pipe: PipeEnd, tag: str) -> None:
    command = pipe.recv()
    if command[0] != tag:
        raise BenchError(f"expected {tag!r} from the parent, got {command[0]!r}")


def _timing(n: int, seconds: float, before: Tuple[float, float]) -> Dict[str, float]:
    user, system = cpu_seconds()
    return {"n": n, "seconds": seconds, "user": user - before[0], "sys": system - before[1]}


def _timed_requests(target: Target, n: int, pipe: PipeEnd) -> None:
    payload = os.urandom(MESSAGE_SIZE)
    session = _open_sync(target)
    try:
        for _ in range(_rtt_warmup(n)):
            if session.request(payload) != payload:
                raise BenchError(f"{target.kind}: the server did not echo the request")
        pipe.send(("connected", None))
        _await(pipe, "go")
        request = session.request
        before = cpu_seconds()
        start = time.perf_counter()
        for _ in range(n):
            request(payload)
        seconds = time.perf_counter() - start
        pipe.send(("result", _timing(n, seconds, before)))
        _await(pipe, "close")
    finally:
        session.close()


async def _timed_arequests(target: Target, n: int, pipe: PipeEnd) -> None:
    # The pipe is read with a blocking call on the event loop: nothing else
    # runs in this process between the measured parts.
    payload = os.urandom(MESSAGE_SIZE)
    session = await _open_aio(target)
    try:
        for _ in range(_rtt_warmup(n)):
            if await session.request(payload) != payload:
                raise BenchError(f"{target.kind}: the server did not echo the request")
        pipe.send(("connected", None))
        _await(pipe, "go")
        request = session.request
        before = cpu_seconds()
        start = time.perf_counter()
        for _ in range(n):
            await request(payload)
        seconds = time.perf_counter() - start
        pipe.send(("result", _timing(n, seconds, before)))
        _await(pipe, "close")
    finally:
        await session.close()


# ---------------------------------------------------------------- pool


def _pool_client_main(pipe: PipeEnd) -> None:
    """The client process of the pool scenario:
    ``("pool", target, flavour, n, first)`` -> ``("result", {...})``: see
    :func:`_pool_vs_bare`; then the next ``"pool"``."""
    _child_setup()
    try:
        pipe.send(("ready", os.getpid()))
        while True:
            command = pipe.recv()
            if command[0] != "pool":
                return
            _, target, flavour, n, first = command
            if flavour == "aio":
                result = asyncio.run(_apool_vs_bare(target, n, first))
            else:
                result = _pool_vs_bare(target, n, first)
            pipe.send(("result", result))
    except EOFError:
        return
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


def _pool_blocks(n: int, first: str) -> List[Tuple[str, int]]:
    """The timed blocks of one repetition of the pool scenario: ``n`` round
    trips for each variant in :data:`POOL_BLOCKS` blocks, in pairs of one
    block of each, ``first`` first in the even pairs and second in the odd
    ones (ABBA: a steady drift of the machine's speed weighs on both alike)."""
    base, variant = CALLCP_ONLY["pool"]
    other = variant if first == base else base
    blocks: List[Tuple[str, int]] = []
    for i in range(POOL_BLOCKS):
        size = n // POOL_BLOCKS + (1 if i < n % POOL_BLOCKS else 0)
        if size:
            pair = (first, other) if i % 2 == 0 else (other, first)
            blocks += [(pair[0], size), (pair[1], size)]
    return blocks


def _new_pool_timing() -> Dict[str, Any]:
    return {"n": 0, "seconds": 0.0, "user": 0.0, "sys": 0.0, "blocks": 0}


def _add_block(
    timing: Dict[str, Any], size: int, seconds: float, before: Tuple[float, float]
) -> None:
    user, system = cpu_seconds()
    timing["n"] += size
    timing["seconds"] += seconds
    timing["user"] += user - before[0]
    timing["sys"] += system - before[1]
    timing["blocks"] += 1


def _pool_result(timings: Dict[str, Dict[str, Any]], pool: Any) -> Dict[str, Any]:
    stats = pool.stats()
    if stats.created != 1 or stats.failed:
        raise BenchError(f"the pool should have reused one connection; {stats}")
    return {**timings, "pool_stats": dataclasses.asdict(stats)}


def _pool_vs_bare(target: Target, n: int, first: str) -> Dict[str, Any]:
    """One repetition, blocking: a bare connection (``callcp.connect()``) and
    a ``callcp.Pool`` to the same server, both warmed up (the pool's
    warm-up opens its one connection), then ``n`` round trips on each in
    alternating blocks, each block timed (wall and this process's CPU)."""
    payload = os.urandom(MESSAGE_SIZE)
    conn = _open_sync(target)
    pool = callcp.Pool(HOST, target.port, **_pool_options(target))
    try:
        requests = {"bare": conn.request, "pool": pool.request}
        for _ in range(_rtt_warmup(n)):
            for request in requests.values():
                if request(payload) != payload:
                    raise BenchError("callcp: the server did not echo the request")
        timings = {v: _new_pool_timing() for v in requests}
        for v, size in _pool_blocks(n, first):
            request = requests[v]
            before = cpu_seconds()
            start = time.perf_counter()
            for _ in range(size):
                request(payload)
            _add_block(timings[v], size, time.perf_counter() - start, before)
        return _pool_result(timings, pool)
    finally:
        conn.close()
        pool.close()


async def _apool_vs_bare(target: Target, n: int, first: str) -> Dict[str, Any]:
    """:func:`_pool_vs_bare` with asyncio: a ``callcp.aio`` connection and a
    ``callcp.aio.Pool``."""
    payload = os.urandom(MESSAGE_SIZE)
    conn = await _open_aio(target)
    pool = callcp_aio.Pool(HOST, target.port, **_pool_options(target))
    try:
        requests = {"bare": conn.request, "pool": pool.request}
        for _ in range(_rtt_warmup(n)):
            for request in requests.values():
                if await request(payload) != payload:
                    raise BenchError("callcp: the server did not echo the request")
        timings = {v: _new_pool_timing() for v in requests}
        for v, size in _pool_blocks(n, first):
            request = requests[v]
            before = cpu_seconds()
            start = time.perf_counter()
            for _ in range(size):
                await request(payload)
            _add_block(timings[v], size, time.perf_counter() - start, before)
        return _pool_result(timings, pool)
    finally:
        await conn.close()
        await pool.close()


# ---------------------------------------------------------------- streams


class _Discard(io.BytesIO):
    """A binary file that keeps nothing (for ``recv_stream``)."""

    def write(self, data: Any) -> int:
        return len(data)


def _chunks(total: int) -> Iterator[bytes]:
    chunk = os.urandom(CHUNK_SIZE)
    full, rest = divmod(total, CHUNK_SIZE)
    for _ in range(full):
        yield chunk
    if rest:
        yield chunk[:rest]


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise ConnectionError("the peer closed early")
        data += more
    return data


def _stream_receiver_main(kind: str, material: Material, total: int, pipe: PipeEnd) -> None:
    """Receive one stream of ``total`` bytes; report ``("result", {...})``
    (peak RSS of the transfer), then wait for ``("stop",)``."""
    _child_setup()
    try:
        if kind == "callcp":
            done = threading.Event()

            def handler(conn: callcp.Connection) -> None:
                try:
                    reset = reset_peak_rss()
                    before = rss_kib()
                    info = conn.recv_stream(_Discard())
                    if info.length != total:
                        raise BenchError(f"received {info.length} bytes, expected {total}")
                    conn.send(b"k")
                    pipe.send(
                        (
                            "result",
                            {
                                "peak_kib": peak_rss_kib(),
                                "rss_before_kib": before,
                                "peak_reset": reset,
                            },
                        )
                    )
                except BaseException as exc:
                    _report_failure(pipe, exc)
                finally:
                    done.set()

            server = callcp.serve(
                handler,
                HOST,
                0,
                key=_callcp_keypair(material.callcp_key),
                logger=_quiet_logger(),
            )
            pipe.send(("ready", server.port))
            _start_command_thread(pipe)
            server.serve_forever()
            return
        tls = _server_context(material) if kind == "ssl" else None
        listener = _listen()
        pipe.send(("ready", listener.getsockname()[1]))
        sock, _ = listener.accept()
        _tune(sock)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_side=True)
        (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
        if length != total:
            raise BenchError(f"announced {length} bytes, expected {total}")
        reset = reset_peak_rss()
        before = rss_kib()
        view = memoryview(bytearray(READ_SIZE))
        got = 0
        while got < total:
            n = sock.recv_into(view, min(len(view), total - got))
            if n == 0:
                raise BenchError(f"the stream ended after {got} of {total} bytes")
            got += n
        sock.sendall(b"k")
        pipe.send(
            ("result", {"peak_kib": peak_rss_kib(), "rss_before_kib": before, "peak_reset": reset})
        )
        _command_loop(pipe)
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


def _stream_sender_main(target: Target, total: int, pipe: PipeEnd) -> None:
    """Send one stream of ``total`` bytes, timed until the receiver's ack."""
    _child_setup()
    try:
        if target.kind == "callcp":
            conn = callcp.connect(
                HOST,
                target.port,
                server_fingerprint=target.material.callcp_fingerprint,
                timeout=SOCKET_TIMEOUT,
            )
            reset = reset_peak_rss()
            before = rss_kib()
            start = time.perf_counter()
            conn.send_stream(_chunks(total), size=total)
            ack = conn.recv()
            seconds = time.perf_counter() - start
            peak = peak_rss_kib()
            conn.close()
        else:
            sock = socket.create_connection((HOST, target.port), timeout=SOCKET_TIMEOUT)
            _tune(sock)
            if target.kind == "ssl":
                sock = _client_context(target.material).wrap_socket(
                    sock, server_hostname=TLS_HOSTNAME
                )
            reset = reset_peak_rss()
            before = rss_kib()
            start = time.perf_counter()
            sock.sendall(_LENGTH.pack(total))
            for chunk in _chunks(total):
                sock.sendall(chunk)
            ack = _recv_exact(sock, 1)
            seconds = time.perf_counter() - start
            peak = peak_rss_kib()
            sock.close()
        if ack != b"k":
            raise BenchError("the receiver did not acknowledge the stream")
        pipe.send(
            (
                "result",
                {
                    "seconds": seconds,
                    "peak_kib": peak,
                    "rss_before_kib": before,
                    "peak_reset": reset,
                },
            )
        )
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


# ---------------------------------------------------------------- concurrency


def _percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of sorted values, linearly interpolated."""
    if not ordered:
        raise BenchError("no successful request to compute a latency from")
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _concurrency_client_main(target: Target, n: int, k: int, pipe: PipeEnd) -> None:
    """Open ``n`` asyncio connections (``("opened", {...})``), wait for
    ``("go",)``, then each does ``k`` requests (``("done", {...})``)."""
    _child_setup()
    try:
        asyncio.run(_concurrency_client(target, n, k, pipe))
    except BaseException as exc:
        _report_failure(pipe, exc)
        raise


async def _concurrency_client(target: Target, n: int, k: int, pipe: PipeEnd) -> None:
    loop = asyncio.get_running_loop()
    message = os.urandom(MESSAGE_SIZE)
    gate = asyncio.Semaphore(OPEN_IN_FLIGHT)

    async def open_one() -> _ASession:
        async with gate:
            session = await _open_aio(target)
            try:
                # The first request proves the connection is fully set up on
                # both sides (for callcp, the server's Finished is checked).
                await session.request(message)
            except BaseException:
                await session.close()
                raise
            return session

    start = time.monotonic()
    opened = await asyncio.gather(*(open_one() for _ in range(n)), return_exceptions=True)
    open_seconds = time.monotonic() - start
    sessions = [s for s in opened if not isinstance(s, BaseException)]
    failures = [s for s in opened if isinstance(s, BaseException)]
    first_error = f"{type(failures[0]).__name__}: {failures[0]}" if failures else ""
    pipe.send(
        ("opened", {"seconds": open_seconds, "errors": len(failures), "first_error": first_error})
    )
    command = await loop.run_in_executor(None, pipe.recv)
    if command[0] != "go":
        return

    latencies: List[float] = []
    errors = 0

    async def run_one(session: _ASession) -> None:
        nonlocal errors
        for _ in range(k):
            t0 = time.perf_counter()
            try:
                reply = await session.request(message)
            except (OSError, asyncio.IncompleteReadError, callcp.CallcpError):
                errors += 1
                return
            latencies.append(time.perf_counter() - t0)
            if reply != message:
                errors += 1

    start = time.monotonic()
    await asyncio.gather(*(run_one(s) for s in sessions))
    seconds = time.monotonic() - start
    latencies.sort()
    pipe.send(
        (
            "done",
            {
                "requests": len(latencies),
                "seconds": seconds,
                "errors": errors,
                "p50_s": _percentile(latencies, 50),
                "p99_s": _percentile(latencies, 99),
            },
        )
    )
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


# ====================================================================== results


@dataclass
class Metric:
    """One measured quantity, with one list of per-repetition samples per
    implementation."""

    name: str
    label: str
    unit: str
    higher_is_better: bool
    samples: Dict[str, List[float]] = field(default_factory=dict)
    ratios: Sequence[Tuple[str, str]] = DEFAULT_RATIOS

    def add(self, impl: str, value: float) -> None:
        self.samples.setdefault(impl, []).append(float(value))

    def median(self, impl: str) -> Optional[float]:
        values = sorted(self.samples.get(impl, ()))
        if not values:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    def ratio(self, num: str, den: str) -> Optional[float]:
        a, b = self.median(num), self.median(den)
        if a is None or b is None or b <= 0 or a < 0:
            return None
        return a / b

    def to_json(self) -> Dict[str, Any]:
        impls = list(self.samples)
        return {
            "label": self.label,
            "unit": self.unit,
            "better": "higher" if self.higher_is_better else "lower",
            "samples": {i: self.samples[i] for i in impls},
            "median": {i: self.median(i) for i in impls},
            "min": {i: min(self.samples[i]) for i in impls},
            "max": {i: max(self.samples[i]) for i in impls},
            "ratios": {f"{a}/{b}": self.ratio(a, b) for a, b in self.ratios},
        }


@dataclass
class ScenarioResult:
    name: str
    title: str
    metrics: List[Metric] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    supported: bool = True

    def metric(self, name: str, label: str, unit: str, higher_is_better: bool, **kw: Any) -> Metric:
        m = Metric(name, label, unit, higher_is_better, **kw)
        self.metrics.append(m)
        return m

    def to_json(self) -> Dict[str, Any]:
        return {
            "title": self.title,
            "supported": self.supported,
            "seconds": round(self.seconds, 3),
            "metrics": {m.name: m.to_json() for m in self.metrics},
            "notes": self.notes,
            "extra": self.extra,
        }


@dataclass
class Report:
    """What :func:`run` measured, and where it wrote it."""

    sizes: Sizes
    scenarios: List[ScenarioResult]
    machine: Dict[str, str]
    started: str
    seconds: float = 0.0
    files: List[Path] = field(default_factory=list)
    chart_note: str = ""

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": 1,
            "callcp_version": callcp.__version__,
            "started": self.started,
            "seconds": round(self.seconds, 1),
            "sizes": {
                "name": self.sizes.name,
                "reps": self.sizes.reps,
                "seconds_per_rep": self.sizes.seconds,
                "warmup_seconds": self.sizes.warmup,
                "stream_bytes": self.sizes.stream_bytes,
                "concurrency": list(self.sizes.concurrency),
                "requests_per_connection": self.sizes.requests_per_connection,
                "rtt_count": self.sizes.rtt_count,
                "message_bytes": MESSAGE_SIZE,
                "echo_bytes": ECHO_SIZE,
            },
            "implementations": {
                "callcp": f"callcp {callcp.__version__} (callcp/2), server key pinned",
                "ssl": f"Python ssl, TLS 1.3 only, RSA-2048 self-signed cert verified "
                f"by the client ({ssl.OPENSSL_VERSION})",
                "raw": "plain TCP, 4-byte length prefix",
            },
            "machine": self.machine,
            "scenarios": {s.name: s.to_json() for s in self.scenarios},
            "table": self.table(),
        }

    def table(self) -> str:
        return format_table(self)


def _num(value: Optional[float]) -> str:
    if value is None or math.isnan(value):
        return "-"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(metric: Metric, impl: str) -> str:
    values = metric.samples.get(impl)
    if not values:
        return "-"
    med = _num(metric.median(impl))
    if len(values) == 1:
        return med
    return f"{med} [{_num(min(values))}-{_num(max(values))}]"


def _ratio_text(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_table(report: Report) -> str:
    """The plain-text table: median [min-max] per implementation, ratios of medians."""
    headers = [
        "metric",
        "unit",
        "better",
        *(KIND_LABELS[k] for k in KINDS),
        "callcp/ssl",
        "callcp/raw",
    ]
    rows: List[List[str]] = []
    spans: List[Tuple[int, str]] = []  # rows that are one line of text
    for scenario in report.scenarios:
        if not scenario.supported or scenario.name in CALLCP_ONLY:
            for text in _callcp_only_lines(scenario):
                spans.append((len(rows), text))
                rows.append([])
            continue
        for m in scenario.metrics:
            rows.append(
                [
                    m.label,
                    m.unit,
                    "higher" if m.higher_is_better else "lower",
                    *(_cell(m, k) for k in KINDS),
                    _ratio_text(m.ratio("callcp", "ssl")),
                    _ratio_text(m.ratio("callcp", "raw")),
                ]
            )
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    right = {3, 4, 5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    span_at = dict(spans)
    lines: List[str] = []
    if len(span_at) < len(rows) or not rows:  # (no header over callcp-only lines alone)
        lines += [line(headers), "  ".join("-" * w for w in widths)]
    for i, row in enumerate(rows):
        lines.append(span_at[i] if i in span_at else line(row))
    sizes = report.sizes
    lines.append("")
    lines.append(
        f"medians of {sizes.reps} repetition(s) [min-max]; ratios are callcp's median over the "
        "other's (for 'better: lower' rows, below 1 means callcp uses less)."
    )
    if any(s.name in CALLCP_ONLY and s.metrics for s in report.scenarios):
        lines.append(
            "callcp-only lines (workers, pool: no ssl or raw TCP): the ratio is the variant's "
            "median over the baseline's, both measured in this run."
        )
    for scenario in report.scenarios:
        lines.extend(f"note ({scenario.name}): {note}" for note in scenario.notes)
    return "\n".join(lines)


def _callcp_only_lines(scenario: ScenarioResult) -> List[str]:
    """The table's lines for a scenario of :data:`CALLCP_ONLY` (or one that
    did not run): one per metric, both variants and their ratio."""
    if not scenario.supported or not scenario.metrics:
        note = scenario.extra.get("note", WORKERS_UNSUPPORTED)
        return [f"{scenario.title}: {note}"]
    base, variant = CALLCP_ONLY[scenario.name]
    lines = []
    for m in scenario.metrics:
        ratio = _ratio_text(m.ratio(variant, base))
        lower = "" if m.higher_is_better else " (lower is better)"
        lines.append(
            f"{m.label}: {base} {_cell(m, base)}, {variant} {_cell(m, variant)} "
            f"{m.unit}; {variant}/{base} {ratio}{lower}"
        )
    return lines


# ====================================================================== scenarios


Say = Callable[[str], None]


class _Runner:
    def __init__(self, sizes: Sizes, material: Material, say: Say) -> None:
        self.sizes = sizes
        self.material = material
        self.say = say
        self.clients: Optional[_ClientPool] = None

    # -- helpers

    def interleaved(self, kinds: Sequence[str], rep: int) -> List[str]:
        """The order of the implementations in repetition ``rep`` (rotated)."""
        shift = rep % len(kinds)
        return [*kinds[shift:], *kinds[:shift]]

    def rate_scenario(
        self,
        result: ScenarioResult,
        metric: Metric,
        flavour: str,
        measure: Callable[[Target, float], float],
        scale: float = 1.0,
    ) -> None:
        with _Servers(KINDS, flavour, self.material) as servers:
            for kind in KINDS:
                measure(servers.targets[kind], self.sizes.warmup)
            for rep in range(self.sizes.reps):
                for kind in self.interleaved(KINDS, rep):
                    metric.add(kind, measure(servers.targets[kind], self.sizes.seconds) * scale)

    def client_pool(self) -> _ClientPool:
        if self.clients is None:
            self.clients = _ClientPool(2)
        return self.clients

    def close(self) -> None:
        if self.clients is not None:
            self.clients.stop()
            self.clients = None

    # -- scenarios

    def handshake(self, result: ScenarioResult) -> None:
        metric = result.metric("rate", "handshake+64 B req/resp, 1 client", "conn/s", True)
        errors: Dict[str, int] = dict.fromkeys(KINDS, 0)

        def measure(target: Target, seconds: float) -> float:
            r = handshake_loop(target, time.monotonic(), seconds)
            errors[target.kind] += r.errors
            return r.count / (r.ended - r.started)

        self.rate_scenario(result, metric, "sync", measure)
        _note_errors(result, errors)

    def resume(self, result: ScenarioResult) -> None:
        metric = result.metric(
            "rate", "resumed handshake+64 B req/resp, 1 client", "conn/s", True
        )
        cpu_metric = result.metric(
            "server_cpu", "server CPU per connection (callcp resumed)", "us", False
        )
        if not _sessions(Target("callcp", 0, self.material)):
            result.notes.append("resume: this build has no session tickets")
            return
        errors: Dict[str, int] = dict.fromkeys(KINDS, 0)
        full_cpu: List[float] = []
        with _Servers(KINDS, "sync", self.material) as servers:

            def loop(target: Target, seconds: float) -> Tuple[float, float]:
                """(connections/s, the server's CPU µs per connection)"""
                server = servers.children[target.kind]
                if target.resume:
                    handshake_loop(target, time.monotonic(), 0.05)  # a ticket in hand
                server.send("cpu")
                before = server.expect("cpu")
                r = handshake_loop(target, time.monotonic(), seconds)
                errors[target.kind] += r.errors
                server.send("cpu")
                after = server.expect("cpu")
                cpu = (after[0] - before[0] + after[1] - before[1]) / max(r.count, 1) * 1e6
                return r.count / (r.ended - r.started), cpu

            resuming = replace(servers.targets["callcp"], resume=True)
            for kind in KINDS:
                loop(resuming if kind == "callcp" else servers.targets[kind], self.sizes.warmup)
            for rep in range(self.sizes.reps):
                for kind in self.interleaved(KINDS, rep):
                    target = resuming if kind == "callcp" else servers.targets[kind]
                    rate, cpu = loop(target, self.sizes.seconds)
                    metric.add(kind, rate)
                    cpu_metric.add(kind, cpu)
                    if kind == "callcp":  # the same server, full handshakes
                        full_cpu.append(loop(servers.targets[kind], self.sizes.seconds)[1])
        full_cpu.sort()
        result.extra["callcp_server_cpu_full_us"] = full_cpu
        result.notes.append(
            "callcp server CPU per full handshake (same runs, no ticket): "
            f"median {full_cpu[len(full_cpu) // 2]:.0f} us"
        )
        _note_errors(result, errors)

    def handshake_2proc(self, result: ScenarioResult) -> None:
        metric = result.metric("rate", "handshake+64 B req/resp, 2 client procs", "conn/s", True)
        pool = self.client_pool()
        errors: Dict[str, int] = dict.fromkeys(KINDS, 0)

        def measure(target: Target, seconds: float) -> float:
            rate, failed = pool.handshakes(target, seconds)
            errors[target.kind] += failed
            return rate

        self.rate_scenario(result, metric, "sync", measure)
        _note_errors(result, errors)

    def workers(self, result: ScenarioResult) -> None:
        flavour = workers_support()
        if flavour is None:
            result.supported = False
            result.extra["note"] = WORKERS_UNSUPPORTED
            return
        result.extra["api"] = f"callcp.{flavour}.serve(workers=N)"
        metric = result.metric(
            "rate",
            "handshakes/s with 2 client procs, callcp workers=1 vs 2",
            "conn/s",
            True,
            ratios=(("workers=2", "workers=1"),),
        )
        pool = self.client_pool()
        impls = ("workers=1", "workers=2")
        children = {
            impl: _Child(
                f"callcp {flavour} server {impl}",
                _server_main,
                ServerSpec("callcp", flavour, self.material, (("workers", int(impl[-1])),)),
            )
            for impl in impls
        }
        errors = 0
        try:
            targets = {
                impl: Target("callcp", child.expect("ready"), self.material)
                for impl, child in children.items()
            }
            for impl in impls:
                pool.handshakes(targets[impl], self.sizes.warmup)
            for rep in range(self.sizes.reps):
                for impl in self.interleaved(impls, rep):
                    rate, failed = pool.handshakes(targets[impl], self.sizes.seconds)
                    metric.add(impl, rate)
                    errors += failed
        except BenchError as exc:
            # workers=N is the newest feature: say how it failed, with no numbers,
            # and go on with the other scenarios.
            result.metrics.clear()
            result.extra["note"] = f"workers: FAILED: {exc}"
        finally:
            for child in children.values():
                child.stop(wait=30.0)
        if errors:
            result.notes.append(f"{errors} failed connection(s), not counted")

    def rtt_sync(self, result: ScenarioResult) -> None:
        metric = result.metric("rate", "64 B round trips, 1 conn, blocking", "req/s", True)
        payload = os.urandom(MESSAGE_SIZE)
        self.rate_scenario(result, metric, "sync", lambda t, s: request_rate(t, payload, s))

    def rtt_aio(self, result: ScenarioResult) -> None:
        metric = result.metric("rate", "64 B round trips, 1 conn, asyncio", "req/s", True)
        payload = os.urandom(MESSAGE_SIZE)
        self.rate_scenario(
            result, metric, "aio", lambda t, s: asyncio.run(arequest_rate(t, payload, s))
        )

    def rtt_cpu(self, result: ScenarioResult) -> None:
        """``rtt_count`` round trips per repetition, blocking then asyncio;
        each side's CPU time is read by that process itself (getrusage)."""
        n = self.sizes.rtt_count
        result.title = (
            f"{n:,} x 64-byte round trips on one connection: rate, and CPU time per round "
            "trip in the client and in the server process"
        )
        runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
        client = _Child("rtt_cpu client", _rtt_cpu_client_main)
        try:
            client.expect("ready")
            for flavour, how in (("sync", "blocking"), ("aio", "asyncio")):
                rate = result.metric(
                    f"{flavour}_rate", f"{n:,} x 64 B round trips, {how}", "rt/s", True
                )
                on_client = result.metric(
                    f"{flavour}_client_cpu", f"{how} round trip: client CPU", "us", False
                )
                on_server = result.metric(
                    f"{flavour}_server_cpu", f"{how} round trip: server CPU", "us", False
                )
                runs[flavour] = {kind: [] for kind in KINDS}
                with _Servers(KINDS, flavour, self.material) as servers:
                    for rep in range(self.sizes.reps):
                        for kind in self.interleaved(KINDS, rep):
                            got = self.rtt_cpu_once(
                                client, servers.children[kind], servers.targets[kind], flavour, n
                            )
                            runs[flavour][kind].append(got)
                            c, s = got["client"], got["server"]
                            rate.add(kind, n / c["seconds"])
                            on_client.add(kind, (c["user"] + c["sys"]) / n * 1e6)
                            on_server.add(kind, (s["user"] + s["sys"]) / n * 1e6)
        finally:
            client.stop()
        result.extra["runs"] = runs
        result.extra["round_trips"] = n

    def pool(self, result: ScenarioResult) -> None:
        """callcp only: ``rtt_count`` round trips per repetition with
        ``pool.request`` on a warm ``callcp.Pool`` and with
        ``Connection.request`` on one bare connection, from one client process
        that holds both and alternates them in blocks, against one server
        process; blocking, then asyncio."""
        n = self.sizes.rtt_count
        base, variant = CALLCP_ONLY["pool"]
        result.title = (
            f"callcp: {n:,} x 64-byte round trips with pool.request on a warm pool and "
            "with Connection.request on one bare connection, alternating in blocks, "
            "against the same server process"
        )
        runs: Dict[str, List[Dict[str, Any]]] = {}
        ratios = ((variant, base),)
        client = _Child("pool client", _pool_client_main)
        try:
            client.expect("ready")
            for flavour, how, api in (
                ("sync", "blocking", "callcp.Pool"),
                ("aio", "asyncio", "callcp.aio.Pool"),
            ):
                rate = result.metric(
                    f"{flavour}_rate",
                    f"{api} vs bare conn: {n:,} x 64 B round trips",
                    "rt/s",
                    True,
                    ratios=ratios,
                )
                on_client = result.metric(
                    f"{flavour}_client_cpu",
                    f"{api} vs bare conn: client CPU per round trip",
                    "us",
                    False,
                    ratios=ratios,
                )
                runs[flavour] = []
                with _Servers(("callcp",), flavour, self.material) as servers:
                    target = servers.targets["callcp"]
                    client.send("pool", target, flavour, _rtt_warmup(n), base)  # (not counted)
                    client.expect("result")
                    for rep in range(self.sizes.reps):
                        first = self.interleaved((base, variant), rep)[0]
                        client.send("pool", target, flavour, n, first)
                        got = client.expect("result")
                        runs[flavour].append(got)
                        for v in (base, variant):
                            c = got[v]
                            rate.add(v, c["n"] / c["seconds"])
                            on_client.add(v, (c["user"] + c["sys"]) / c["n"] * 1e6)
                pairs = _paired_ratios(runs[flavour])
                result.extra.setdefault("paired_ratios", {})[flavour] = pairs
                result.notes.append(_pool_verdict(api, how, rate, on_client, pairs))
        finally:
            client.stop()
        result.extra["runs"] = runs
        result.extra["round_trips"] = n
        result.extra["blocks"] = POOL_BLOCKS
        result.extra["tolerance"] = POOL_TOLERANCE

    @staticmethod
    def rtt_cpu_once(
        client: _Child, server: _Child, target: Target, flavour: str, n: int
    ) -> Dict[str, Any]:
        client.send("rtt", target, flavour, n)
        client.expect("connected")
        server.send("cpu")
        before = server.expect("cpu")
        client.send("go")
        timing = client.expect("result")
        server.send("cpu")
        after = server.expect("cpu")
        client.send("close")
        return {
            "client": timing,
            "server": {"user": after[0] - before[0], "sys": after[1] - before[1]},
        }

    def echo_64k(self, result: ScenarioResult) -> None:
        metric = result.metric("throughput", "64 KiB echo, 1 conn (both directions)", "MB/s", True)
        payload = os.urandom(ECHO_SIZE)
        self.rate_scenario(
            result,
            metric,
            "sync",
            lambda t, s: request_rate(t, payload, s),
            scale=2 * ECHO_SIZE / MB,
        )

    def stream(self, result: ScenarioResult) -> None:
        total = self.sizes.stream_bytes
        size = _size_text(total)
        result.title = f"one-way stream of {size}"
        speed = result.metric("throughput", f"{size} one-way stream", "MB/s", True)
        sender = result.metric("sender_peak_rss", f"{size} stream: sender peak RSS", "MiB", False)
        receiver = result.metric(
            "receiver_peak_rss", f"{size} stream: receiver peak RSS", "MiB", False
        )
        details: Dict[str, List[Dict[str, Any]]] = {k: [] for k in KINDS}
        for rep in range(self.sizes.reps):
            for kind in self.interleaved(KINDS, rep):
                got = self.stream_once(kind, total)
                details[kind].append(got)
                speed.add(kind, total / got["sender"]["seconds"] / MB)
                sender.add(kind, got["sender"]["peak_kib"] / 1024)
                receiver.add(kind, got["receiver"]["peak_kib"] / 1024)
        result.extra["runs"] = details
        if not all(run["sender"]["peak_reset"] for runs in details.values() for run in runs):
            result.notes.append(
                "the kernel did not allow resetting the peak RSS: peaks include process start-up"
            )

    def stream_once(self, kind: str, total: int) -> Dict[str, Any]:
        receiver = _Child(
            f"{kind} stream receiver", _stream_receiver_main, kind, self.material, total
        )
        sender: Optional[_Child] = None
        try:
            port = receiver.expect("ready")
            sender = _Child(
                f"{kind} stream sender",
                _stream_sender_main,
                Target(kind, port, self.material),
                total,
            )
            timeout = 120 + total / (5 * MB)  # slower than 5 MB/s is a failure
            sent = sender.expect("result", timeout)
            received = receiver.expect("result", 60)
            return {"sender": sent, "receiver": received}
        finally:
            if sender is not None:
                sender.stop()
            receiver.stop()

    def concurrency(self, result: ScenarioResult, n: int) -> None:
        k = self.sizes.requests_per_connection
        rate = result.metric("rate", f"{n:,} conns x {k} req: requests/s", "req/s", True)
        p50 = result.metric("p50", f"{n:,} conns: p50 latency", "ms", False)
        p99 = result.metric("p99", f"{n:,} conns: p99 latency", "ms", False)
        per_conn = result.metric(
            "server_rss_per_conn", f"{n:,} conns: server RSS/conn", "KiB", False
        )
        opening = result.metric("open_seconds", f"{n:,} conns: time to open all", "s", False)
        runs: Dict[str, List[Dict[str, Any]]] = {k_: [] for k_ in KINDS}
        errors: Dict[str, int] = dict.fromkeys(KINDS, 0)
        for rep in range(self.sizes.reps):
            for kind in self.interleaved(KINDS, rep):
                got = self.concurrency_once(kind, n, k)
                runs[kind].append(got)
                done = got["done"]
                rate.add(kind, done["requests"] / done["seconds"])
                p50.add(kind, done["p50_s"] * 1000)
                p99.add(kind, done["p99_s"] * 1000)
                per_conn.add(kind, (got["rss_open_kib"] - got["rss_idle_kib"]) / n)
                opening.add(kind, got["opened"]["seconds"])
                errors[kind] += got["opened"]["errors"] + done["errors"]
        result.extra["runs"] = runs
        result.extra["errors"] = errors
        for kind, count in errors.items():
            if count:
                first = next(
                    (r["opened"]["first_error"] for r in runs[kind] if r["opened"]["first_error"]),
                    "",
                )
                result.notes.append(
                    f"{kind}: {count} failed connections or requests"
                    + (f" (first: {first})" if first else "")
                )

    def concurrency_once(self, kind: str, n: int, k: int) -> Dict[str, Any]:
        options: Tuple[Tuple[str, Any], ...] = ()
        if kind == "callcp":
            # Never refuse one of ours: every client comes from one address.
            options = (
                # (twice: the last tenth is kept for other addresses)
                ("max_connections", 2 * n + OPEN_IN_FLIGHT),
                ("max_connections_per_source", 0),
                ("max_handshakes_per_source", 0),
            )
        server = _Child(
            f"{kind} aio server", _server_main, ServerSpec(kind, "aio", self.material, options)
        )
        client: Optional[_Child] = None
        try:
            target = Target(kind, server.expect("ready"), self.material)
            # Warm the server (first-connection allocations are not per connection).
            session = _open_sync(target)
            session.request(b"w" * MESSAGE_SIZE)
            session.close()
            time.sleep(0.1)
            server.send("rss")
            idle = server.expect("rss")
            client = _Child(f"{kind} concurrency client", _concurrency_client_main, target, n, k)
            opened = client.expect("opened", timeout=CHILD_TIMEOUT)
            time.sleep(0.1)  # let the last replies leave the server
            server.send("rss")
            open_rss = server.expect("rss")
            client.send("go")
            done = client.expect("done", timeout=CHILD_TIMEOUT)
            return {"rss_idle_kib": idle, "rss_open_kib": open_rss, "opened": opened, "done": done}
        finally:
            if client is not None:
                client.stop()
            server.stop()


def _paired_ratios(runs: Sequence[Dict[str, Any]]) -> Dict[str, List[float]]:
    """pool/bare within each repetition of the pool scenario, for the round
    trips/s and the client CPU per round trip: less exposed to a machine
    whose speed drifts between repetitions than the ratio of medians."""

    def rate(timing: Dict[str, Any]) -> float:
        return float(timing["n"] / timing["seconds"])

    def cpu(timing: Dict[str, Any]) -> float:
        return float((timing["user"] + timing["sys"]) / timing["n"])

    return {
        "rate": [rate(r["pool"]) / rate(r["bare"]) for r in runs],
        "client_cpu": [cpu(r["pool"]) / cpu(r["bare"]) for r in runs if cpu(r["bare"]) > 0],
    }


def _pool_verdict(
    api: str, how: str, rate: Metric, cpu: Metric, pairs: Dict[str, List[float]]
) -> str:
    """The pool scenario's note for one flavour: the ratios of the medians
    (and the range of the per-repetition pairs), the client CPU a pooled
    request adds, and whether both are within :data:`POOL_TOLERANCE`."""
    base, variant = CALLCP_ONLY["pool"]
    speed, spent = rate.ratio(variant, base), cpu.ratio(variant, base)
    if speed is None or spent is None:  # pragma: no cover - only with a zero median
        return f"{how} {api}: no ratio (a zero median)"
    added_us = (cpu.median(variant) or 0.0) - (cpu.median(base) or 0.0)
    tolerance = f"{POOL_TOLERANCE:.0%}"

    def within(ok: bool) -> str:
        return f"{'within' if ok else 'NOT within'} {tolerance}"

    def spread(values: List[float]) -> str:
        if len(values) < 2:
            return ""
        return f" [reps {min(values):.2f}-{max(values):.2f}]"

    return (
        f"{how} {api}.request on a warm pool / bare Connection.request, same run: "
        f"round trips/s {speed:.2f}x{spread(pairs['rate'])} "
        f"({within(speed >= 1 - POOL_TOLERANCE)}), "
        f"client CPU per request {spent:.2f}x{spread(pairs['client_cpu'])}, "
        f"{added_us:+.1f} us ({within(spent <= 1 + POOL_TOLERANCE)})"
    )


def _note_errors(result: ScenarioResult, errors: Dict[str, int]) -> None:
    result.extra["errors"] = errors
    for kind, count in errors.items():
        if count:
            result.notes.append(f"{kind}: {count} failed connection(s), not counted")


def _size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


_TITLES = {
    "handshake": "new connection + handshake + one 64-byte request/response, sequential client",
    "resume": "new connection + resumed handshake (session ticket) + one 64-byte "
    "request/response, sequential client, against ssl's and raw TCP's full connections; "
    "and the callcp server's CPU time per connection, full vs resumed",
    "handshake_2proc": "new connection + handshake + one 64-byte request/response, "
    "2 client processes",
    "workers": "handshakes/s with 2 client processes, callcp workers=1 vs workers=2",
    "rtt_sync": "64-byte request/response round trips on one connection, blocking",
    "rtt_aio": "64-byte request/response round trips on one connection, asyncio",
    "rtt_cpu": "a fixed number of 64-byte round trips on one connection: rate, and CPU "
    "time per round trip in the client and in the server process",
    "pool": "callcp: 64-byte round trips with pool.request on a warm pool and with "
    "Connection.request on one bare connection, alternating in blocks: rate and client "
    "CPU time per round trip",
    "echo_64k": "64 KiB echo throughput on one connection, both directions counted",
    "stream": "one-way stream",
}


def workers_support() -> Optional[str]:
    """``"sync"`` or ``"aio"``: which ``serve()`` takes ``workers=N``; None if neither."""
    options = getattr(callcp, "ServerOptions", None)  # (the options as one typed object)
    if options is not None and "workers" in {f.name for f in dataclasses.fields(options)}:
        return "sync"
    for flavour, serve, server in (
        ("sync", callcp.serve, callcp.Server),
        ("aio", callcp_aio.serve, callcp_aio.Server),
    ):
        for fn in (serve, server):
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):
                continue
            if "workers" in params:
                return flavour
    return None


# ====================================================================== machine


def machine_info() -> Dict[str, str]:
    """What the numbers came from."""
    info: Dict[str, str] = {}
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in (
            Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
        ):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info["cpu"] = cpu
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    info["cores"] = f"{cores} logical ({usable} usable by this process)"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                info["memory"] = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
                break
    info["kernel"] = f"{platform.system()} {platform.release()} ({platform.machine()})"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                info["os"] = line.split("=", 1)[1].strip().strip('"')
    info["python"] = f"{platform.python_implementation()} {platform.python_version()}"
    info["callcp"] = callcp.__version__ + _source_revision()
    try:
        import cryptography
        from cryptography.hazmat.backends.openssl.backend import backend

        info["cryptography"] = f"{cryptography.__version__} ({backend.openssl_version_text()})"
    except Exception as exc:  # noqa: BLE001 - informational only
        info["cryptography"] = f"unknown ({exc})"
    info["ssl module"] = ssl.OPENSSL_VERSION
    with contextlib.suppress(OSError):
        info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return info


def _source_revision() -> str:
    """`` (git abc1234, with uncommitted changes)`` when the callcp being measured
    runs from a git checkout (changes are looked for in its package directory)."""
    here = Path(callcp.__file__).resolve().parent
    try:
        head = subprocess.run(  # noqa: S603 - fixed arguments
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603 - fixed arguments
            ["git", "-C", str(here), "status", "--porcelain", "--", "."],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {head}{', with uncommitted changes' if dirty else ''})" if head else ""


def _machine_markdown(report: Report, command: str, outputs: Sequence[str]) -> str:
    lines = [
        f"# The machine behind {' and '.join(outputs) or 'these results'}",
        "",
        "| | |",
        "| --- | --- |",
    ]
    lines += [f"| {key} | {value} |" for key, value in report.machine.items()]
    lines += [
        f"| run | `{command}`: sizes '{report.sizes.name}', {report.sizes.reps} repetition(s), "
        f"{report.seconds:.0f} s |",
        "",
    ]
    return "\n".join(lines)


# ====================================================================== chart


_WORKERS_CHART_LABEL = "handshakes/s, 2 client procs: workers=2 / workers=1"


def write_chart(report: Report, path: Path) -> str:
    """A PNG of the ratios; returns "" or why no chart was written."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
        ticker: Any = importlib.import_module("matplotlib.ticker")
    except ImportError:
        return "matplotlib is not installed: no chart (pip install 'callcp[bench]')"

    faster: List[Tuple[str, Dict[str, Optional[float]]]] = []
    leaner: List[Tuple[str, Dict[str, Optional[float]]]] = []
    missing: Dict[str, str] = {}  # row label -> why it has no bar
    for scenario in report.scenarios:
        if scenario.name == "workers" and not scenario.metrics:
            faster.append((_WORKERS_CHART_LABEL, {"workers": None}))
            missing[_WORKERS_CHART_LABEL] = str(scenario.extra.get("note", WORKERS_UNSUPPORTED))
        for m in scenario.metrics:
            if scenario.name == "workers":
                faster.append(
                    (_WORKERS_CHART_LABEL, {"workers": m.ratio("workers=2", "workers=1")})
                )
                continue
            if scenario.name == "pool":
                rows = faster if m.higher_is_better else leaner
                rows.append((f"{m.label} ({m.unit})", {"pool": m.ratio("pool", "bare")}))
                continue
            ratios = {"ssl": m.ratio("callcp", "ssl"), "raw": m.ratio("callcp", "raw")}
            (faster if m.higher_is_better else leaner).append((f"{m.label} ({m.unit})", ratios))
    panels = [
        (faster, "rates and throughput: callcp / other (higher = callcp faster)"),
        (leaner, "latency, memory, time: callcp / other (lower = callcp better)"),
    ]
    panels = [(rows, title) for rows, title in panels if rows]
    if not panels:
        return "nothing to chart"
    heights = [max(1.5, 0.55 * len(rows) + 1.0) for rows, _ in panels]
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(12, sum(heights) + 1.0),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
        layout="constrained",
    )
    colors = {"ssl": "#1f77b4", "raw": "#ff7f0e", "workers": "#2ca02c", "pool": "#9467bd"}
    labels = {
        "ssl": "callcp / ssl (TLS 1.3)",
        "raw": "callcp / raw TCP",
        "workers": "workers=2 / workers=1",
        "pool": "callcp warm pool.request / bare Connection.request",
    }
    used: Dict[str, Any] = {}
    for ax, (rows, title) in zip(axes[:, 0], panels):
        bar_h = 0.38
        values: List[float] = []
        for i, (name, ratios) in enumerate(rows):
            series = [s for s in ("ssl", "raw", "workers", "pool") if s in ratios]
            for j, s in enumerate(series):
                value = ratios[s]
                y = i + (j - (len(series) - 1) / 2) * bar_h
                if value is None:
                    why = missing.get(name, "n/a (no meaningful ratio)")
                    ax.text(1.0, y, f"  {why}", va="center", fontsize=8, color="#555555")
                    continue
                values.append(value)
                bar = ax.barh(y, value, height=bar_h * 0.95, color=colors[s], left=0)
                used[s] = bar
                ax.text(value, y, f" {value:.2f}x", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([name for name, _ in rows], fontsize=9)
        ax.invert_yaxis()
        ax.set_xscale("log")
        low = min([*values, 1.0])
        high = max([*values, 1.0])
        ax.set_xlim(low / 2.5, high * 3.0)
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_title(title, fontsize=10, loc="left")
        ax.grid(axis="x", which="both", alpha=0.3)
    machine = report.machine
    fig.suptitle(
        f"callcp {callcp.__version__} vs Python ssl (TLS 1.3) and raw TCP - medians of "
        f"{report.sizes.reps} rep(s), sizes '{report.sizes.name}'\n"
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')}, {machine.get('python', '')}, "
        f"{machine.get('date', '')[:10]}",
        fontsize=10,
    )
    if used:
        fig.legend(
            [used[s] for s in used],
            [labels[s] for s in used],
            loc="outside lower center",
            ncol=len(used),
            fontsize=9,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


# ====================================================================== entry point


def _selected(only: Optional[Sequence[str]]) -> List[str]:
    if not only:
        return list(SCENARIOS)
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        raise BenchError(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return [s for s in SCENARIOS if s in only]


def run(options: Options, say: Optional[Say] = None) -> Report:
    """Run the benchmarks, write the JSON, the chart and machine.md; return the report.

    ``say(line)`` gets progress lines (default: none).

    Raises:
        BenchError: a scenario could not run.
    """
    tell: Say = say if say is not None else (lambda line: None)
    if options.sizes not in SIZES:
        raise BenchError(f"unknown sizes {options.sizes!r}; choose from {', '.join(SIZES)}")
    sizes = SIZES[options.sizes]
    if options.reps is not None:
        if options.reps < 1:
            raise BenchError("--reps must be at least 1")
        sizes = replace(sizes, reps=options.reps)
    if options.rtt_count is not None:
        if options.rtt_count < 1:
            raise BenchError("--rtt-count must be at least 1")
        sizes = replace(sizes, rtt_count=options.rtt_count)
    chosen = _selected(options.only)
    _raise_nofile()
    started = time.monotonic()
    report = Report(
        sizes,
        [],
        machine_info(),
        datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="callcp-bench-") as tmp:
        tell(f"bench: sizes '{sizes.name}', {sizes.reps} repetition(s); generating keys")
        material = make_material(Path(tmp))
        runner = _Runner(sizes, material, tell)
        try:
            for name in chosen:
                names = (
                    [f"concurrency_{n}" for n in sizes.concurrency]
                    if name == "concurrency"
                    else [name]
                )
                for scenario_name in names:
                    t0 = time.monotonic()
                    if name == "concurrency":
                        n = int(scenario_name.split("_")[1])
                        result = ScenarioResult(
                            scenario_name,
                            f"{n:,} asyncio connections, "
                            f"{sizes.requests_per_connection} x 64-byte requests each",
                        )
                        tell(f"bench: {scenario_name} ...")
                        runner.concurrency(result, n)
                    else:
                        result = ScenarioResult(name, _TITLES[name])
                        tell(f"bench: {name} ...")
                        getattr(runner, name)(result)
                    result.seconds = time.monotonic() - t0
                    report.scenarios.append(result)
                    tell(f"bench: {scenario_name} done in {result.seconds:.1f} s")
        finally:
            runner.close()
            _stop_all()
    report.seconds = time.monotonic() - started
    with contextlib.suppress(OSError):
        report.machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    _write_outputs(report, options)
    return report


def _write_outputs(report: Report, options: Options) -> None:
    command = options.command
    if options.json_path is not None:
        path = Path(options.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = report.to_json()
        data["command"] = command
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        report.files.append(path)
    machine_path = options.machine_path
    if machine_path is None and options.json_path is not None:
        machine_path = Path(options.json_path).parent / "machine.md"
    if machine_path is not None:
        machine_path.parent.mkdir(parents=True, exist_ok=True)
        outputs = [Path(p).name for p in (options.json_path, options.png_path) if p is not None]
        machine_path.write_text(_machine_markdown(report, command, outputs), encoding="utf-8")
        report.files.append(machine_path)
    if options.png_path is not None:
        why = write_chart(report, Path(options.png_path))
        if why:
            report.chart_note = why
        else:
            report.files.append(Path(options.png_path))


# ====================================================================== command line


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line on stderr (exit code 2), as callcp's."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"callcp: error: {message} (see '{self.prog} --help')\n")


def _count(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected an integer >= 1")
    return value


def _scenario(text: str) -> str:
    return text.replace("-", "_")  # rtt-cpu is rtt_cpu


def build_parser(prog: str = "benchmarks/run.py") -> argparse.ArgumentParser:
    """The benchmark's argument parser (``prog``: how it was invoked)."""
    p = _Parser(
        prog=prog,
        description="Benchmark callcp against Python's ssl (TLS 1.3, RSA-2048 certificate\n"
        "verified by the client) and raw TCP in one run, on 127.0.0.1, servers in\n"
        "their own processes: handshakes/s (1 and 2 client processes, and workers=1\n"
        "vs 2 where supported), 64-byte round trips/s (blocking and asyncio), CPU\n"
        "time per 64-byte round trip in the client and the server process\n"
        "(rtt_cpu), callcp's pool.request on a warm pool vs a bare connection's\n"
        "request (pool: rate and CPU per round trip, pool/bare), 64 KiB echo MB/s,\n"
        "one-way stream MB/s with each side's peak RSS, and N asyncio connections\n"
        "(requests/s, p50/p99 latency, server RSS per connection). Prints a table\n"
        "of medians [min-max] over the repetitions with the ratios callcp/ssl and\n"
        "callcp/raw (pool/bare, workers=2/workers=1 for those two), and writes the\n"
        "results as JSON (every sample), a PNG chart (needs matplotlib: pip install\n"
        "'callcp[bench]') and machine.md next to the JSON: into the results\n"
        "directory's local/\n"
        f"({_shown(LOCAL_RESULTS_DIR)}/, ignored by git), or with --save into\n"
        f"{_shown(SAVED_RESULTS_DIR)}/ itself, replacing the committed results.\n"
        "A full run takes several minutes; --quick about one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument(
        "--quick",
        action="store_const",
        const="quick",
        dest="sizes",
        default="full",
        help="smaller sizes and fewer repetitions: a 64 MiB stream, up to 1,000 "
        "connections, 3 repetitions (about a minute)",
    )
    sizes.add_argument(
        "--sizes",
        choices=tuple(SIZES),
        default="full",
        help="full (default: 1 GiB stream, 100/1,000/5,000 connections, 5 repetitions), "
        "quick, or tiny (seconds; for tests)",
    )
    p.add_argument(
        "--reps",
        metavar="N",
        type=_count,
        help="repetitions of each scenario (default: 5; --quick: 3; tiny: 1)",
    )
    p.add_argument(
        "--only",
        metavar="SCENARIO",
        nargs="+",
        type=_scenario,
        choices=SCENARIOS,
        help=f"run only these scenarios: {', '.join(SCENARIOS)}",
    )
    p.add_argument(
        "--rtt-count",
        metavar="N",
        type=_count,
        help="round trips per repetition of rtt_cpu and pool "
        "(default: 20,000; --quick: 10,000; tiny: 200)",
    )
    where = p.add_argument_group("where the results go")
    where.add_argument(
        "--save",
        action="store_true",
        help=f"write into {_shown(SAVED_RESULTS_DIR)}/, replacing the committed results "
        f"(default: {_shown(LOCAL_RESULTS_DIR)}/)",
    )
    where.add_argument(
        "--json",
        metavar="PATH",
        help="where to write the results (default: latest.json in the results directory; "
        "machine.md goes next to it)",
    )
    where.add_argument(
        "--png",
        metavar="PATH",
        help="where to write the chart (default: latest.png in the results directory)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress lines (the table and errors still print)",
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="a failure shows its traceback"
    )
    return p


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def options_for(args: argparse.Namespace, prog: str = "benchmarks/run.py") -> Options:
    """The :class:`Options` for parsed command-line arguments."""
    results = SAVED_RESULTS_DIR if args.save else LOCAL_RESULTS_DIR
    command = [prog, "--sizes", args.sizes]
    if args.reps is not None:
        command += ["--reps", str(args.reps)]
    if args.rtt_count is not None:
        command += ["--rtt-count", str(args.rtt_count)]
    if args.only:
        command += ["--only", *args.only]
    if args.save:
        command.append("--save")
    return Options(
        sizes=args.sizes,
        reps=args.reps,
        rtt_count=args.rtt_count,
        json_path=Path(os.path.expanduser(args.json)) if args.json else results / "latest.json",
        png_path=Path(os.path.expanduser(args.png)) if args.png else results / "latest.png",
        only=args.only,
        command=" ".join(command),
    )


def main(argv: Optional[Sequence[str]] = None, prog: str = "benchmarks/run.py") -> int:
    """Run the benchmark from the command line; returns the exit code
    (0, 1 if it failed, 2 for a usage error, 130 if interrupted)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.save and args.only:
        parser.error("--save replaces all the committed results: not with --only")
    options = options_for(args, prog)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        report = run(options, None if args.quiet else say)
    except KeyboardInterrupt:
        say("callcp: interrupted")
        return 130
    except BenchError as exc:
        if args.verbose:
            traceback.print_exc()
        say(f"callcp: error: the benchmark failed: {' '.join(str(exc).split())}")
        return 1
    print(report.table(), flush=True)
    if report.chart_note:
        say(f"callcp: note: {report.chart_note}")
    if not args.quiet:
        say(f"ran in {report.seconds:.0f} s; wrote " + ", ".join(map(_shown, report.files)))
    return 0
