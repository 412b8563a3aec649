"""The ``callcp`` command.

Most cases run ``callcp.cli.main(argv)`` in this process: stdout and stderr
are captured, HOME points at a per-test directory (so ``~/.callcp`` is
per-test), and the exit code is main()'s return value or its SystemExit.
Servers run in this process too, in a thread: the server ``callcp serve``
would run for the same arguments (:func:`callcp.cli.make_server`), whose logs
are kept apart from the client's output as a separate process's would be.

A few cases need a real process and keep one: the console script, ``serve``
stopping on SIGTERM, ``serve --workers`` and the progress bar on a
pseudo-terminal.  Those get HOME=<per-test directory> and a timeout;
servers there are started with ``--port 0`` and report their port on their
first line of output.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pty
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

import callcp
from callcp import cli
from callcp.cli import safe_file_name
from callcp.keys import load_public_key
from tests.cli_support import (
    LISTENING,
    RUN_TIMEOUT,
    CliServer,
    Result,
    cli_env,
    err,
    error_line,
    out,
)
from tests.sock_support import wait_until

pytestmark = pytest.mark.timeout(120)

EXIT_NETWORK, EXIT_UNTRUSTED, EXIT_HANDSHAKE, EXIT_PROTOCOL, EXIT_LOCAL = 3, 4, 5, 6, 7
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_random(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their SHA-256 hex."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ServerLog(logging.Handler):
    """The log lines of this process's servers, kept away from the root logger
    (where a client's ``main()`` would print them as its own)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        self.lines: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # list.append is atomic

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def server_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerLog]:
    """Route the logs of servers made in this test to a :class:`ServerLog`:
    the library's (``callcp.serve(logger=...)``) and the CLI handler's own
    (the ``callcp.cli`` logger, which only ``serve`` uses)."""
    handler = ServerLog()
    library = logging.getLogger("test_cli.server")
    library.propagate = False
    library.setLevel(logging.INFO)
    library.addHandler(handler)
    monkeypatch.setattr(callcp, "serve", functools.partial(callcp.serve, logger=library))
    own = logging.getLogger("callcp.cli")
    saved_level = own.level
    monkeypatch.setattr(own, "propagate", False)
    own.setLevel(logging.INFO)  # as `callcp serve` has it
    own.addHandler(handler)
    yield handler
    own.removeHandler(handler)
    own.setLevel(saved_level)
    library.removeHandler(handler)


class InProcessServer:
    """A callcp server served by a thread of this process until :meth:`stop`."""

    def __init__(self, server: callcp.Server, log: ServerLog) -> None:
        self.server = server
        self._log = log
        self.host, self.port = server.server_address[:2]
        self.fingerprint = server.fingerprint
        self.thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.stopped = False

    @property
    def address(self) -> List[str]:
        return [self.host, str(self.port)]

    def log(self) -> str:
        return self._log.text()

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.shutdown()
            self.thread.join(RUN_TIMEOUT)
            assert not self.thread.is_alive(), "serve_forever() did not return"


@pytest.fixture
def serve(
    home: Path, key_file: Path, server_log: ServerLog
) -> Iterator[Callable[..., InProcessServer]]:
    """``serve(*args)``: the server of ``callcp serve --port 0 --key <session key> ARGS``,
    running in this process."""
    servers: List[InProcessServer] = []

    def start(*args: str, key: Optional[Path] = key_file, port: int = 0) -> InProcessServer:
        argv = ["serve", "--port", str(port), *args]
        if key is not None:
            argv += ["--key", str(key)]
        server = InProcessServer(cli.make_server(cli.build_parser().parse_args(argv)), server_log)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def key_file(tmp_path: Path, server_key: rsa.RSAPrivateKey) -> Path:
    """The session's server key as a PEM file (generating one per server is slow)."""
    path = tmp_path / "keys" / "server.pem"
    callcp.KeyPair(server_key).save(path)
    return path


@pytest.fixture
def other_key_file(tmp_path: Path, other_key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "keys" / "other.pem"
    callcp.KeyPair(other_key).save(path)
    return path


@pytest.fixture
def serve_process(home: Path, tmp_path: Path, key_file: Path) -> Iterator[Callable[..., CliServer]]:
    """``serve_process(*args)``: a running ``callcp serve --port 0 --key <session key>``
    subprocess."""
    servers: List[CliServer] = []

    def start(*args: str) -> CliServer:
        argv = ["--port", "0", *args, "--key", str(key_file)]
        server = CliServer(home, argv, tmp_path / f"server{len(servers)}.log")
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.returncode is None:
            assert server.stop() == 0, server.log()


# ---------------------------------------------------------------- help, version, bench


def test_help_for_every_command(run: Callable[..., Result]) -> None:
    main = run("--help")
    assert main.returncode == 0
    text = out(main)
    for word in ("serve", "send-file", "keygen", "fingerprint", "bench", "exit codes", "130"):
        assert word in text
    for command in ("serve", "send", "send-file", "keygen", "fingerprint", "known-hosts", "bench"):
        result = run(command, "--help")
        assert result.returncode == 0, err(result)
        assert f"usage: callcp {command}" in out(result)
    assert "CALLCP_KEY_PASSPHRASE" in out(run("keygen", "--help"))
    assert ".pub.pem" in out(run("keygen", "--help"))


def test_version(run: Callable[..., Result]) -> None:
    result = run("--version")
    assert result.returncode == 0
    assert callcp.__version__ in out(result)


def test_console_script_is_installed(home: Path) -> None:
    script = Path(sys.executable).parent / "callcp"
    if not script.exists():
        pytest.skip("the callcp console script is not installed in this environment")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, env=cli_env(home), timeout=RUN_TIMEOUT
    )
    assert result.returncode == 0
    assert callcp.__version__ in result.stdout.decode()


def test_bench_hands_its_arguments_to_the_harness(
    run: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: List[Any] = []

    def fake_main(argv: List[str], prog: str) -> int:
        calls.append((argv, prog))
        return 0

    monkeypatch.setitem(sys.modules, cli.BENCH_MODULE, types.SimpleNamespace(main=fake_main))
    assert run("-q", "bench", "--sizes", "tiny", "--only", "rtt-cpu").returncode == 0
    assert calls == [(["--quiet", "--sizes", "tiny", "--only", "rtt-cpu"], "callcp bench")]
    assert cli.benchmarks_dir() == Path(__file__).resolve().parent.parent / "benchmarks"


def test_bench_outside_a_checkout(
    run: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: None)
    for args in (["bench"], ["bench", "--quick"], ["bench", "--help"]):
        line = error_line(run(*args), 2)
        assert "the benchmarks live in the source repository's benchmarks/ directory" in line


# ---------------------------------------------------------------- serve + send


def test_send_echo_trusts_on_first_use(
    home: Path, run: Callable[..., Result], serve: Callable[..., InProcessServer]
) -> None:
    server = serve()
    first = run("send", *server.address, "hello wörld")
    assert first.returncode == 0, err(first)
    assert out(first) == "hello wörld\n"
    assert "permanently added" in err(first)  # trust on first use is announced
    known = (home / ".callcp" / "known_hosts").read_text()
    assert f"127.0.0.1:{server.port} {server.fingerprint}" in known
    again = run("send", *server.address, "again")
    assert (again.returncode, out(again), err(again)) == (0, "again\n", "")


def test_send_upper(run: Callable[..., Result], serve: Callable[..., InProcessServer]) -> None:
    server = serve("--upper")
    result = run("send", *server.address, "hello, wörld", "--fingerprint", server.fingerprint)
    assert result.returncode == 0, err(result)
    assert out(result) == "HELLO, WÖRLD\n"


def test_serve_with_workers(
    run: Callable[..., Result], serve_process: Callable[..., CliServer]
) -> None:
    """--workers 2: two processes answer on one port; SIGTERM stops them all."""
    server = serve_process("--upper", "--workers", "2")
    for i in range(4):
        result = run("send", *server.address, f"w{i}", "--fingerprint", server.fingerprint)
        assert result.returncode == 0, err(result)
        assert out(result) == f"W{i}\n"
    assert server.stop(signal.SIGTERM) == 0


def test_send_raw_and_stdin(
    run: Callable[..., Result], serve: Callable[..., InProcessServer]
) -> None:
    server = serve()
    payload = bytes(range(256)) * 4
    result = run(
        "send", *server.address, "-", "--raw", "--fingerprint", server.fingerprint, stdin=payload
    )
    assert result.returncode == 0, err(result)
    assert result.stdout == payload


def test_serve_stops_gracefully_on_sigterm(serve_process: Callable[..., CliServer]) -> None:
    server = serve_process()
    assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.log()


def test_serve_command_in_process(
    run: Callable[..., Result], tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole ``callcp serve`` command in this process's main thread, until
    SIGTERM: its output, its answers, and the SIGTERM handler put back."""
    started: queue.Queue[callcp.Server] = queue.Queue()
    make_server = cli.make_server

    def spy(args: Any) -> callcp.Server:
        server = make_server(args)
        started.put(server)
        return server

    monkeypatch.setattr(cli, "make_server", spy)
    late: List[int] = []

    def on_term(signum: int, frame: Any) -> None:  # SIGTERM outside the command
        late.append(signum)

    outer = signal.signal(signal.SIGTERM, on_term)
    replies: List[bytes] = []
    failures: List[BaseException] = []

    def client() -> None:
        server: Optional[callcp.Server] = None
        try:
            server = started.get(timeout=RUN_TIMEOUT)
            with callcp.connect(
                "127.0.0.1", server.port, server_fingerprint=server.fingerprint
            ) as conn:
                replies.append(conn.request(b"hello"))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            if replies:  # it is serving: stop it the way `kill` would
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
            elif server is not None:  # something went wrong: stop it anyway
                server.shutdown()

    helper = threading.Thread(target=client)
    helper.start()
    try:
        inbox = tmp_path / "inbox"
        argv = ["--port", "0", "--key", str(key_file), "--upper", "--receive-dir", str(inbox)]
        result = run("serve", *argv)
        helper.join(RUN_TIMEOUT)
        handler = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert not failures, failures
    assert replies == [b"HELLO"]
    assert result.returncode == 0, err(result)
    match = LISTENING.fullmatch(out(result).strip())
    assert match is not None, out(result)
    assert match[3] == callcp.KeyPair.load(key_file).fingerprint
    assert f"INFO storing received files in {inbox}" in err(result)
    assert "INFO shutting down" in err(result)
    assert "Traceback" not in err(result)
    assert inbox.is_dir()
    assert handler is on_term and late == []  # the handler before the command, put back


# ---------------------------------------------------------------- files


def test_send_file_arrives_byte_identical(
    run: Callable[..., Result], tmp_path: Path, serve: Callable[..., InProcessServer]
) -> None:
    inbox = tmp_path / "inbox"
    server = serve("--receive-dir", str(inbox))
    source = tmp_path / "data.bin"
    size = 5 * 1024 * 1024 + 123
    digest = write_random(source, size)
    pin = ["--fingerprint", server.fingerprint]

    result = run("send-file", *server.address, str(source), *pin)
    assert result.returncode == 0, err(result)
    text = out(result)
    assert f"remote SHA-256 matches: {digest}" in text
    assert f"sent {size}/{size} bytes (100%)" in text  # the plain progress's final line
    assert sha256_file(inbox / "data.bin") == digest
    assert (inbox / "data.bin").stat().st_size == size

    # A second file of the same name never overwrites the first.
    again = run("send-file", *server.address, str(source), *pin)
    assert again.returncode == 0, err(again)
    assert "'data (1).bin'" in out(again)
    assert sha256_file(inbox / "data (1).bin") == digest
    assert sorted(p.name for p in inbox.iterdir()) == ["data (1).bin", "data.bin"]

    server.stop()
    log = server.log()
    assert f"received 'data.bin' ({size} bytes, sha256 {digest}) from 127.0.0.1:" in log
    assert "received 'data (1).bin'" in log


def test_send_file_names_are_sanitised(
    run: Callable[..., Result], tmp_path: Path, serve: Callable[..., InProcessServer]
) -> None:
    inbox = tmp_path / "inbox"
    server = serve("--receive-dir", str(inbox))
    source = tmp_path / "x.txt"
    source.write_bytes(b"payload\n")
    pin = ["--fingerprint", server.fingerprint]
    for name, stored in (
        ("../../escape.txt", "escape.txt"),
        ("..\\..\\windows.txt", "windows.txt"),
        ("/etc/passwd", "passwd"),
    ):
        result = run("send-file", *server.address, str(source), "--name", name, *pin)
        assert result.returncode == 0, err(result)
        assert f"stored as {stored!r}" in out(result)
    assert sorted(p.name for p in inbox.iterdir()) == ["escape.txt", "passwd", "windows.txt"]
    assert not (tmp_path / "escape.txt").exists()
    for name in ("..", ".", "dir/", ""):
        result = run("send-file", *server.address, str(source), "--name", name, *pin)
        line = error_line(result, EXIT_PROTOCOL)
        assert "refused the file: unsafe file name" in line
    for name in ("bad\nname", "x" * 256):  # callcp/2 cannot carry these: refused locally
        result = run("send-file", *server.address, str(source), "--name", name, *pin)
        assert "invalid name" in error_line(result, 2)
    assert sorted(p.name for p in inbox.iterdir()) == ["escape.txt", "passwd", "windows.txt"]


@pytest.mark.parametrize("size", [6, 20 * 1024 * 1024])
def test_server_without_receive_dir_refuses_files(
    run: Callable[..., Result], tmp_path: Path, serve: Callable[..., InProcessServer], size: int
) -> None:
    """Small or large (still uploading when refused), the sender sees the refusal."""
    server = serve()
    source = tmp_path / "small.txt"
    source.write_bytes(os.urandom(size))
    result = run("send-file", *server.address, str(source), "--fingerprint", server.fingerprint)
    line = error_line(result, EXIT_PROTOCOL)
    assert "refused the file" in line
    assert "--receive-dir" in line
    server.stop()
    assert "refused a file from 127.0.0.1:" in server.log()


def test_send_file_missing_path(run: Callable[..., Result], tmp_path: Path) -> None:
    # The file is opened before connecting: no server is needed to see this error.
    missing = tmp_path / "no-such-file.bin"
    result = run("send-file", "127.0.0.1", "9", str(missing))
    line = error_line(result, EXIT_LOCAL)
    assert str(missing) in line
    assert "no such file" in line


def test_send_file_directory_path(run: Callable[..., Result], tmp_path: Path) -> None:
    line = error_line(run("send-file", "127.0.0.1", "9", str(tmp_path)), EXIT_LOCAL)
    assert "directory" in line


def test_receive_dir_that_is_a_file(
    run: Callable[..., Result], tmp_path: Path, key_file: Path
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = run("serve", "--port", "0", "--key", str(key_file), "--receive-dir", str(not_a_dir))
    assert "not a directory" in error_line(result, EXIT_LOCAL)


def _stored_reply_server(
    server_key: rsa.RSAPrivateKey, reply: Callable[[callcp.StreamInfo], bytes], log: ServerLog
) -> InProcessServer:
    """An in-process server that receives a stream and answers ``reply(info)``."""

    def handler(conn: callcp.Connection) -> None:
        try:
            conn.recv()
        except callcp.StreamPending:
            info = conn.recv_stream(open(os.devnull, "wb"))  # noqa: SIM115
            conn.send(reply(info))

    return InProcessServer(callcp.serve(handler, "127.0.0.1", 0, key=server_key), log)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (lambda info: f"stored x {info.length} {'0' * 64}".encode(), "INTEGRITY ERROR"),
        (lambda info: f"stored x {info.length + 1} {info.sha256}".encode(), "INTEGRITY ERROR"),
        (lambda info: b"thanks!", "unexpected reply from the server"),
    ],
)
def test_send_file_checks_the_servers_confirmation(
    run: Callable[..., Result],
    tmp_path: Path,
    server_key: rsa.RSAPrivateKey,
    server_log: ServerLog,
    reply: Callable[[callcp.StreamInfo], bytes],
    expected: str,
) -> None:
    server = _stored_reply_server(server_key, reply, server_log)
    try:
        source = tmp_path / "f.bin"
        write_random(source, 100_000)
        result = run(
            "send-file", "127.0.0.1", str(server.port), str(source),
            "--fingerprint", server.fingerprint,
        )  # fmt: skip
        assert expected in error_line(result, EXIT_PROTOCOL)
    finally:
        server.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
@pytest.mark.parametrize("mode", ["rich", "no-display", "rich-missing"])
def test_send_file_progress_on_a_terminal(
    home: Path, tmp_path: Path, serve: Callable[..., InProcessServer], mode: str
) -> None:
    server = serve("--receive-dir", str(tmp_path / "inbox"))
    source = tmp_path / "tty.bin"
    digest = write_random(source, 2 * 1024 * 1024)
    extra: Dict[str, str] = {"TERM": "xterm-256color"}
    args = ["send-file", *server.address, str(source), "--fingerprint", server.fingerprint]
    if mode == "no-display":
        args.insert(0, "--no-display")
    if mode == "rich-missing":
        fake = tmp_path / "fake-site" / "rich"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ImportError('rich is hidden for this test')\n")
        extra["PYTHONPATH"] = str(fake.parent)
    text, returncode = run_in_pty(args, cli_env(home, **extra))
    assert returncode == 0, text
    assert f"remote SHA-256 matches: {digest}" in text
    if mode == "rich":
        assert "━" in text and "MB" in text  # rich's bar and byte counts
        assert "sent 2097152/2097152" not in text
    else:
        assert "━" not in text
        assert "sent 2097152/2097152 bytes (100%)" in text


def run_in_pty(args: List[str], env: Dict[str, str]) -> tuple[str, int]:
    """Run the CLI with stdout on a pseudo-terminal; return (output, exit code)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "callcp", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.STDOUT,
        env=env,
    )
    os.close(slave)
    chunks: List[bytes] = []
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        returncode = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return b"".join(chunks).decode("utf-8", "replace"), returncode


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("CALLCP_SLOW") != "1", reason="slow (200 MiB transfer): set CALLCP_SLOW=1"
)
def test_send_file_200_mib(
    run: Callable[..., Result], tmp_path: Path, serve: Callable[..., InProcessServer]
) -> None:
    inbox = tmp_path / "inbox"
    server = serve("--receive-dir", str(inbox))
    source = tmp_path / "big.bin"
    size = 200 * 1024 * 1024
    digest = write_random(source, size)
    started = time.monotonic()
    result = run("send-file", *server.address, str(source), "--fingerprint", server.fingerprint)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, err(result)
    assert f"remote SHA-256 matches: {digest}" in out(result)
    assert (inbox / "big.bin").stat().st_size == size
    assert sha256_file(inbox / "big.bin") == digest
    print(f"\n200 MiB send-file took {elapsed:.2f} s ({size / elapsed / 2**20:.0f} MiB/s)")


# ---------------------------------------------------------------- keys


def test_keygen_default_path_refuses_overwrite_and_force(
    home: Path, run: Callable[..., Result]
) -> None:
    first = run("keygen")
    assert first.returncode == 0, err(first)
    private = home / ".callcp" / "server_key.pem"
    public = home / ".callcp" / "server_key.pub.pem"
    assert private.stat().st_mode & 0o777 == 0o600
    fingerprint = FINGERPRINT.findall(out(first))[-1]
    assert fingerprint == callcp.KeyPair.load(private).fingerprint

    # fingerprint: default path, the private key, the public key
    for args in ([], [str(private)], [str(public)]):
        result = run("fingerprint", *args)
        assert (result.returncode, out(result)) == (0, fingerprint + "\n"), err(result)

    again = run("keygen")
    assert "already exists" in error_line(again, EXIT_LOCAL)
    assert callcp.KeyPair.load(private).fingerprint == fingerprint  # untouched

    forced = run("keygen", "--force")
    assert forced.returncode == 0, err(forced)
    assert FINGERPRINT.findall(out(forced))[-1] != fingerprint


def test_keygen_bits_and_output(run: Callable[..., Result], tmp_path: Path) -> None:
    path = tmp_path / "k" / "client.pem"
    result = run("keygen", "-o", str(path), "--bits", "3072", "-q")
    assert result.returncode == 0, err(result)
    assert callcp.KeyPair.load(path).key_size == 3072
    assert out(result).strip() == callcp.KeyPair.load(path).fingerprint
    assert (tmp_path / "k" / "client.pub.pem").exists()
    bad = run("keygen", "-o", str(tmp_path / "x.pem"), "--bits", "1024")
    assert "invalid choice" in error_line(bad, 2)


def test_keygen_with_passphrase(run: Callable[..., Result], tmp_path: Path) -> None:
    path = tmp_path / "enc.pem"
    env = {"CALLCP_KEY_PASSPHRASE": "correct horse"}
    assert run("keygen", "-o", str(path), env=env).returncode == 0
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")  # (bcrypt-pbkdf)
    with_passphrase = run("fingerprint", str(path), env=env)
    assert with_passphrase.returncode == 0
    # Without the passphrase: the public key beside it answers, and says so...
    beside = run("fingerprint", str(path))
    assert beside.stdout == with_passphrase.stdout
    assert f"{path} is encrypted: this is {tmp_path / 'enc.pub.pem'}'s key" in err(beside)
    # ...and without that either: how to give the passphrase, in the command's terms.
    (tmp_path / "enc.pub.pem").unlink()
    line = error_line(run("fingerprint", str(path)), EXIT_LOCAL)
    assert "set CALLCP_KEY_PASSPHRASE to its passphrase" in line and "password=" not in line


def test_fingerprint_remote(
    home: Path, run: Callable[..., Result], serve: Callable[..., InProcessServer]
) -> None:
    server = serve()
    result = run("fingerprint", "--remote", *server.address)
    assert result.returncode == 0, err(result)
    assert out(result) == server.fingerprint + "\n"
    assert "NOT verified" in err(result)
    assert not (home / ".callcp" / "known_hosts").exists()  # nothing was trusted


def test_fingerprint_errors(run: Callable[..., Result], tmp_path: Path) -> None:
    line = error_line(run("fingerprint"), EXIT_LOCAL)
    assert "callcp keygen" in line  # no key yet: say how to make one
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is not a key\n")
    assert "not a PEM file" in error_line(run("fingerprint", str(garbage)), EXIT_LOCAL)
    assert "directory" in error_line(run("fingerprint", str(tmp_path)), EXIT_LOCAL)
    error_line(run("fingerprint", "--remote", "127.0.0.1", "70000"), 2)


# ---------------------------------------------------------------- errors a new user hits


def test_nothing_listening(run: Callable[..., Result]) -> None:
    port = free_port()
    line = error_line(run("send", "127.0.0.1", str(port), "hi"), EXIT_NETWORK)
    assert f"nothing is listening on 127.0.0.1:{port}" in line
    assert "is the server running" in line


def test_verbose_shows_the_traceback(run: Callable[..., Result]) -> None:
    result = run("-v", "send", "127.0.0.1", str(free_port()), "hi")
    assert result.returncode == EXIT_NETWORK
    assert "Traceback (most recent call last)" in err(result)
    assert err(result).splitlines()[-1].startswith("callcp: error: nothing is listening")
    # -v is accepted after the command name too
    assert "Traceback" in err(run("send", "-v", "127.0.0.1", str(free_port()), "hi"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["send", "127.0.0.1", "70000", "hi"], "invalid port '70000'"),
        (["send", "127.0.0.1", "abc", "hi"], "invalid port 'abc'"),
        (["send", "127.0.0.1", "0", "hi"], "invalid port '0'"),
        (["serve", "--port", "65536"], "invalid port '65536'"),
        (["send", "127.0.0.1"], "the following arguments are required: PORT, MESSAGE"),
        (["send-file", "127.0.0.1", "1"], "required: PATH"),
        ([], "required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["bench", "--only", "nope"], "invalid choice: 'nope'"),
        (["bench", "--reps", "0"], "invalid number '0'"),
        (["send", "--fingerprint", "SHA256:nope", "h", "1", "m"], "invalid fingerprint"),
        (["send", "--fingerprint", "abc", "--insecure", "h", "1", "m"], "invalid fingerprint"),
        (
            ["send", "--fingerprint", "SHA256:" + "A" * 43, "--insecure", "h", "1", "m"],
            "not allowed with argument",
        ),
        (["serve", "--max-message-size", "lots"], "invalid size 'lots'"),
        (["serve", "--idle-timeout", "-1"], "invalid duration '-1'"),
        (["send", "--timeout", "soon", "h", "1", "m"], "invalid duration 'soon'"),
    ],
)
def test_usage_errors(run: Callable[..., Result], args: List[str], expected: str) -> None:
    line = error_line(run(*args), 2)
    assert expected in line
    assert "--help" in line


def test_unreadable_key_files(run: Callable[..., Result], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n"
    )
    line = error_line(run("serve", "--port", "0", "--key", str(tmp_path)), EXIT_LOCAL)
    assert f"{tmp_path}: it is a directory" in line
    line = error_line(run("serve", "--port", "0", "--key", str(garbage)), EXIT_LOCAL)
    assert str(garbage) in line and "corrupted" in line
    # The client key is loaded before connecting: no server needed.
    line = error_line(run("send", "127.0.0.1", "9", "hi", "--client-key", str(garbage)), EXIT_LOCAL)
    assert str(garbage) in line
    line = error_line(
        run("serve", "--port", "0", "--authorized-keys", str(tmp_path / "nope")), EXIT_LOCAL
    )
    assert "no such file" in line


def test_changed_server_key(
    home: Path,
    run: Callable[..., Result],
    serve: Callable[..., InProcessServer],
    other_key_file: Path,
) -> None:
    first = serve()
    assert run("send", *first.address, "hi").returncode == 0  # trusted on first use
    port, old = first.port, first.fingerprint
    first.stop()
    second = serve(key=other_key_file, port=port)
    assert second.port == port and second.fingerprint != old
    line = error_line(run("send", *second.address, "hi"), EXIT_UNTRUSTED)
    known_hosts = str(home / ".callcp" / "known_hosts")
    assert "CHANGED" in line
    assert old in line and second.fingerprint in line  # both fingerprints
    assert f"run `callcp known-hosts remove 127.0.0.1:{port}` (file: {known_hosts})" in line
    assert f"--fingerprint {second.fingerprint}" in line
    # pinning the new key is a documented way out
    pinned = run("send", *second.address, "hi", "--fingerprint", second.fingerprint)
    assert (pinned.returncode, out(pinned)) == (0, "hi\n")
    # and so is the advice: remove the entry, trust on first use again
    removed = run("known-hosts", "remove", f"127.0.0.1:{port}")
    assert out(removed) == f"removed 127.0.0.1:{port} {old}\n"
    again = run("send", *second.address, "hi")
    assert (again.returncode, out(again)) == (0, "hi\n")


def test_wrong_pin_and_no_tofu(
    run: Callable[..., Result], serve: Callable[..., InProcessServer]
) -> None:
    server = serve()
    wrong = "SHA256:" + "A" * 43
    line = error_line(run("send", *server.address, "hi", "--fingerprint", wrong), EXIT_UNTRUSTED)
    assert wrong in line and server.fingerprint in line
    line = error_line(run("send", *server.address, "hi", "--no-tofu"), EXIT_UNTRUSTED)
    assert "not in the known hosts file" in line and server.fingerprint in line


def test_insecure_warns_loudly(
    home: Path, run: Callable[..., Result], serve: Callable[..., InProcessServer]
) -> None:
    server = serve()
    result = run("send", *server.address, "hi", "--insecure")
    assert (result.returncode, out(result)) == (0, "hi\n")
    lines = err(result).splitlines()
    assert len(lines) == 1  # the CLI's warning, not repeated by the library
    assert lines[0].startswith("callcp: WARNING: --insecure")
    assert "NOT checked" in lines[0]
    assert not (home / ".callcp" / "known_hosts").exists()


def test_client_authentication(
    run: Callable[..., Result], tmp_path: Path, serve: Callable[..., InProcessServer]
) -> None:
    client_key = tmp_path / "client.pem"
    made = run("keygen", "-o", str(client_key), "-q")
    assert made.returncode == 0, err(made)
    allowed = tmp_path / "authorized"
    allowed.write_text(out(made))
    server = serve("--authorized-keys", str(allowed))
    pin = ["--fingerprint", server.fingerprint]
    ok = run("send", *server.address, "hi", "--client-key", str(client_key), *pin)
    assert (ok.returncode, out(ok)) == (0, "hi\n"), err(ok)
    line = error_line(run("send", *server.address, "hi", *pin), EXIT_HANDSHAKE)
    assert "requires client authentication" in line and "--client-key" in line


def test_address_in_use(
    run: Callable[..., Result], serve: Callable[..., InProcessServer], key_file: Path
) -> None:
    server = serve()
    result = run("serve", "--port", str(server.port), "--key", str(key_file))
    assert "already in use" in error_line(result, EXIT_NETWORK)


def test_main_leaves_logging_as_it_found_it(run: Callable[..., Result], key_file: Path) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("callcp.cli").level)
    assert run("-v", "send", "127.0.0.1", str(free_port()), "hi").returncode == EXIT_NETWORK
    assert run("-q", "fingerprint", str(key_file)).returncode == 0
    after = (list(root.handlers), root.level, logging.getLogger("callcp.cli").level)
    assert after == before


# ---------------------------------------------------------------- file naming (in process)


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\x\\evil.exe", "evil.exe"),
        (".hidden", None),
        ("-rf", None),
        ("   ", None),
        ("x.part", None),
        ("evil\u202etxt.exe", None),  # (a bidi override: the name would read backwards)
        (" leading", None),
        ("trailing ", None),
        ("dot.", None),
        ("\u3164", None),  # (a Hangul filler: printable, and invisible)
        ("~", None),
        ("x.PART", None),
        ("CON", None),
        ("nul.txt", None),
        ("console.txt", "console.txt"),
        ("zero\u200bwidth", None),
        ("c1\x9bcontrol", None),
        ("e\u0301t\u00e9.txt", "\u00e9t\u00e9.txt"),  # (NFC: one name for both spellings)
        ("name with spaces.txt", "name with spaces.txt"),
        ("", None),
        (".", None),
        ("..", None),
        ("a/..", None),
        ("dir/", None),
        ("nul\x00byte", None),
        ("new\nline", None),
        ("x" * 201, None),
    ],
)
def test_safe_file_name(sent: str, stored: Optional[str]) -> None:
    assert safe_file_name(sent) == stored


def test_received_files_never_take_a_name_in_use(tmp_path: Path) -> None:
    """A verified upload is linked under a free name (never replacing one,
    nor following a link planted there); after nine numbered twins, names
    take a random suffix (the thousandth file of a name costs what the first
    does)."""
    from callcp._inbox import Inbox

    inbox = Inbox.open(tmp_path)

    def store(name: str) -> str:
        slot = inbox.admit(name, 4, "test")
        slot.file.write(b"data")
        return slot.commit(4).name

    assert store("a.tar.gz") == "a.tar.gz"
    assert store("a.tar.gz") == "a.tar (1).gz"
    os.symlink(tmp_path / "victim", tmp_path / "c.txt")  # a planted link
    assert store("c.txt") == "c (1).txt"
    assert not (tmp_path / "victim").exists()
    assert store("noext") == "noext"
    assert store("noext") == "noext (1)"
    names = [store("many.bin") for _ in range(30)]
    assert names[:10] == ["many.bin"] + [f"many ({n}).bin" for n in range(1, 10)]
    assert all(re.fullmatch(r"many \([0-9a-f]{8}\)\.bin", n) for n in names[10:]), names
    assert len(set(names)) == 30
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_receive_dir_limits(
    run: Callable[..., Result], tmp_path: Path, serve: Callable[..., InProcessServer]
) -> None:
    """--max-file-size, --max-files, --max-total-size and --min-free-space:
    refused with the reason before a byte is stored, and nothing is left."""
    inbox = tmp_path / "inbox"
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(os.urandom(1000))
    big.write_bytes(os.urandom(5000))

    def send(server: InProcessServer, path: Path) -> Result:
        return run("send-file", *server.address, str(path), "--fingerprint", server.fingerprint)

    server = serve(
        "--receive-dir",
        str(inbox),
        "--max-file-size",
        "4K",
        "--max-files",
        "2",
        "--max-total-size",
        "1500",
    )
    line = error_line(send(server, big), EXIT_PROTOCOL)
    assert "refused the file: the file is larger than this server's limit of 4 KiB" in line
    assert send(server, small).returncode == 0
    line = error_line(send(server, small), EXIT_PROTOCOL)
    assert "would take this server over its total of 1500 bytes" in line
    assert sorted(p.name for p in inbox.iterdir()) == ["small.bin"]
    server.stop()

    server = serve("--receive-dir", str(inbox), "--max-files", "1")
    line = error_line(send(server, small), EXIT_PROTOCOL)
    assert "this server holds its maximum of 1 files" in line
    server.stop()

    server = serve("--receive-dir", str(inbox), "--min-free-space", "1000000000G")
    line = error_line(send(server, small), EXIT_PROTOCOL)
    assert "this server's disk is too full to store the file" in line
    server.stop()
    assert sorted(p.name for p in inbox.iterdir()) == ["small.bin"]
    assert "refused a file from 127.0.0.1:" in server.log()


def test_receive_dir_limit_on_a_stream_of_unannounced_size(
    tmp_path: Path, serve: Callable[..., InProcessServer]
) -> None:
    """A stream that announced no size is cut off, REFUSED, as soon as it
    goes over --max-file-size; nothing of it is kept."""
    inbox = tmp_path / "inbox"
    server = serve("--receive-dir", str(inbox), "--max-file-size", "64K")
    chunks = iter([os.urandom(50_000), os.urandom(50_000), os.urandom(50_000)])
    conn = callcp.connect(server.host, server.port, server_fingerprint=server.fingerprint)
    with conn, pytest.raises(callcp.ConnectionClosed) as refused:
        conn.send_stream(chunks, name="unsized.bin")
        conn.recv()
    assert refused.value.code == callcp.CloseCode.REFUSED
    assert refused.value.reason == "the stream is larger than 65536 bytes"
    assert wait_until(lambda: list(inbox.iterdir()) == []), list(inbox.iterdir())


def test_receive_dir_must_be_writable_at_start(
    run: Callable[..., Result], tmp_path: Path, key_file: Path
) -> None:
    """A receive directory this user cannot write is refused when the
    server starts, not at the first upload (/sys refuses even root)."""
    result = run("serve", "--port", "0", "--key", str(key_file), "--receive-dir", "/sys/kernel")
    line = error_line(result, EXIT_LOCAL)
    assert "cannot store files in --receive-dir /sys/kernel" in line
    assert "give a directory this user can write" in line


def test_keygen_next_and_serve_next_key_announce_the_next_key(
    home: Path, run: Callable[..., Result], serve: Callable[..., Any], tmp_path: Path
) -> None:
    """`callcp keygen --next` makes the next key beside the current one;
    `callcp serve --next-key` announces it, and a TOFU client records it."""
    made = run("keygen", "--next")
    assert made.returncode == 0, err(made)
    next_key = home / ".callcp" / "server_key.next.pem"
    next_fp = FINGERPRINT.findall(out(made))[-1]
    assert callcp.KeyPair.load(next_key).fingerprint == next_fp
    server = serve("--next-key", str(next_key))
    known = tmp_path / "known_hosts"
    with callcp.connect("127.0.0.1", server.port, known_hosts=known) as conn:
        assert conn.request(b"hi") == b"hi"
    assert next_fp in known.read_text().split()


def test_the_quick_start_demo_runs(tmp_path: Path) -> None:
    """`make demo` runs examples/demo.py: it must work as the README says."""
    demo = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [sys.executable, str(demo)], capture_output=True, timeout=120, env=env, check=False
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert re.search(r"server key verified: SHA256:\S+", out), out
    assert "got b'HELLO, CALLCP'" in out and "server shut down cleanly" in out


def test_known_hosts_command(run: Callable[..., Result], home: Path, tmp_path: Path) -> None:
    """list / add / remove / revoke, with IP addresses in one canonical form
    (the six spellings of 127.0.0.1 are one entry) and host names as given."""
    fp_a = callcp.KeyPair.generate().fingerprint
    fp_b = callcp.KeyPair.generate().fingerprint
    known = home / ".callcp" / "known_hosts"
    assert run("known-hosts", "list").stdout == b""
    assert "no known hosts" in err(run("known-hosts", "list"))
    assert out(run("known-hosts", "add", "127.1:9000", fp_a)) == f"added 127.0.0.1:9000 {fp_a}\n"
    for spelling in ("0x7f.0.0.1:9000", "2130706433:9000", "[::ffff:127.0.0.1]:9000"):
        result = run("known-hosts", "add", spelling, fp_b)
        assert out(result) == f"added 127.0.0.1:9000 {fp_b} (replacing {fp_a})\n"
        run("known-hosts", "add", "127.000.000.001:9000", fp_a)
    assert out(run("known-hosts", "add", "LOCALHOST", fp_b)) == f"added localhost:8436 {fp_b}\n"
    assert out(run("known-hosts", "add", "[::1]:7", fp_b)) == f"added [::1]:7 {fp_b}\n"
    listing = out(run("known-hosts", "list")).splitlines()
    assert listing == [f"127.0.0.1:9000 {fp_a}", f"localhost:8436 {fp_b}", f"[::1]:7 {fp_b}"]
    # revoke: for every server, once
    assert out(run("known-hosts", "revoke", fp_b)) == f"revoked {fp_b} for every server\n"
    assert "(it already was)" in out(run("known-hosts", "revoke", fp_b))
    assert f"@revoked * {fp_b}" in out(run("known-hosts", "list"))
    # remove: 127.0.0.1 (any spelling) is not localhost, and says what went
    assert out(run("known-hosts", "remove", "127.1")) == f"removed 127.0.0.1:9000 {fp_a}\n"
    assert out(run("known-hosts", "remove", "localhost")) == f"removed localhost:8436 {fp_b}\n"
    nothing = run("known-hosts", "remove", "localhost")
    assert nothing.returncode == 0 and "no entry for localhost" in err(nothing)
    assert out(run("known-hosts", "remove", "::1")) == f"removed [::1]:7 {fp_b}\n"
    # a malformed line is reported (escaped), never fatal
    with known.open("a") as f:
        f.write("bad\x1b[31m line\n")
    listing_run = run("known-hosts", "list")
    assert out(listing_run) == f"@revoked * {fp_b}\n"
    assert "malformed" in err(listing_run) and "\x1b" not in err(listing_run)
    # a separate file, and errors
    other = tmp_path / "kh"
    run("known-hosts", "--known-hosts", str(other), "add", "example.org:1", fp_a)
    assert other.read_text() == f"example.org:1 {fp_a}\n"
    error_line(run("known-hosts", "add", "host:99999", fp_a), 2)
    error_line(run("known-hosts", "add", "host", "SHA256:nope"), 2)


def test_serve_rereads_its_authorized_keys_on_sighup(
    serve_process: Callable[..., CliServer], tmp_path: Path
) -> None:
    allowed = tmp_path / "authorized"
    first, second = callcp.KeyPair.generate(), callcp.KeyPair.generate()
    allowed.write_text(f"{first.fingerprint}\n")
    server = serve_process("--authorized-keys", str(allowed), "-v")
    allowed.write_text(f"{first.fingerprint}\n{second.fingerprint}\n")
    server.proc.send_signal(signal.SIGHUP)  # (no client needed: reloaded at once)
    deadline = time.monotonic() + RUN_TIMEOUT
    while "authorized keys reloaded" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"authorized keys reloaded from {allowed}: 2 key(s)" in server.log()
    assert server.proc.poll() is None  # (SIGHUP did not stop it)


def test_key_files_others_may_read_are_refused_unless_allowed(
    run: Callable[..., Result], serve: Callable[..., InProcessServer], key_file: Path
) -> None:
    key_file.chmod(0o644)
    line = error_line(run("serve", "--port", "0", "--key", str(key_file)), EXIT_LOCAL)
    assert "readable by every user" in line and f"chmod 600 {key_file}" in line
    assert "--insecure-key-permissions" in line
    server = serve("--insecure-key-permissions", key=key_file)  # (allowed: a warning)
    client_key = key_file.parent / "client.pem"
    callcp.KeyPair.generate().save(client_key)
    client_key.chmod(0o666)
    args = ["send", *server.address, "hi", "--fingerprint", server.fingerprint]
    line = error_line(run(*args, "--client-key", str(client_key)), EXIT_LOCAL)
    assert "writable by every user" in line
    assert run("fingerprint", str(key_file)).returncode == 0  # (reading it exposes nothing)


# ---------------------------------------------------------------- a hostile server's reply

HOSTILE_REPLY = (
    "ok\x1b]0;pwned\x07\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\r"
    "remote SHA-256 matches: 0000\x9b31m\u202eevil\nsecond\tline"
).encode()
ESCAPED_REPLY = (
    "ok\\x1b]0;pwned\\x07\\x1b[2J\\x1b]52;c;cm0gLXJmIH4=\\x07\\r"
    "remote SHA-256 matches: 0000\\x9b31m\\u202eevil\nsecond\tline"
)


def _hostile_server(server_key: rsa.RSAPrivateKey, log: ServerLog) -> InProcessServer:
    def handler(conn: callcp.Connection) -> None:
        conn.recv()
        conn.send(HOSTILE_REPLY)

    return InProcessServer(callcp.serve(handler, "127.0.0.1", 0, key=server_key), log)


def test_send_escapes_what_a_hostile_server_replies(
    run: Callable[..., Result], server_key: rsa.RSAPrivateKey, server_log: ServerLog
) -> None:
    """Terminal escapes in a reply (window title, clear screen, an OSC 52
    clipboard write, a carriage return forging a line, C1 CSI, a bidi
    override) are shown escaped; newlines and tabs are kept.  --raw to a
    pipe writes the bytes as they are."""
    server = _hostile_server(server_key, server_log)
    try:
        pin = ["--fingerprint", server.fingerprint]
        shown = run("send", *server.address, "hi", *pin)
        assert shown.returncode == 0, err(shown)
        assert out(shown) == ESCAPED_REPLY + "\n"
        assert b"\x1b" not in shown.stdout and b"\r" not in shown.stdout
        raw = run("send", *server.address, "hi", "--raw", *pin)
        assert raw.stdout == HOSTILE_REPLY
    finally:
        server.stop()


def test_send_raw_to_a_terminal_stays_escaped_unless_insisted(
    home: Path, server_key: rsa.RSAPrivateKey, server_log: ServerLog
) -> None:
    server = _hostile_server(server_key, server_log)
    try:
        args = ["send", *server.address, "hi", "--raw", "--fingerprint", server.fingerprint]
        shown, code = run_in_pty(args, cli_env(home))
        assert code == 0, shown
        assert "\x1b" not in shown and "pwned" in shown
        assert "stdout is a terminal" in shown
        insisted, code = run_in_pty([*args, "--raw-terminal"], cli_env(home))
        assert code == 0 and "\x1b]0;pwned\x07" in insisted
    finally:
        server.stop()


# ---------------------------------------------------------------- a newcomer's frictions


def test_tofu_with_an_unwritable_known_hosts_says_so_once(
    run: Callable[..., Result], serve: Callable[..., InProcessServer], tmp_path: Path
) -> None:
    """The key could not be recorded: the client says it is trusted for
    this connection only, and does not also claim "permanently added"."""
    server = serve()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    result = run("send", *server.address, "hi", "--known-hosts", str(blocker / "known_hosts"))
    assert result.returncode == 0, err(result)
    assert "trusted for this connection only" in err(result)
    assert "permanently added" not in err(result)


def test_serve_says_when_it_makes_its_key_and_writes_the_public_half(
    home: Path, run: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    made: List[callcp.Server] = []
    make_server = cli.make_server

    def make_and_stop(args: Any) -> callcp.Server:
        server = make_server(args)
        made.append(server)
        server.shutdown()
        return server

    monkeypatch.setattr(cli, "make_server", make_and_stop)
    monkeypatch.setattr(callcp.Server, "serve_forever", lambda self, **kw: None)
    result = run("serve", "--port", "0")
    assert result.returncode == 0, err(result)
    key, public = home / ".callcp" / "server_key.pem", home / ".callcp" / "server_key.pub.pem"
    assert key.exists() and public.exists()
    fingerprint = made[0].fingerprint
    assert f"generated a new server key {fingerprint} in {key} (public key: {public})" in err(
        result
    )
    assert callcp.fingerprint(load_public_key(public)) == fingerprint
    again = run("serve", "--port", "0")
    assert "generated" not in err(again)


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["send", "127.0.0.1:8437", "hi"], "give them as two, 'callcp send 127.0.0.1 8437 ...'"),
        (["send-file", "[::1]:8437", "f"], "give them as two, 'callcp send-file ::1 8437 ...'"),
        (["sned", "x"], "did you mean 'send'?"),
        (["fingreprint"], "did you mean 'fingerprint'?"),
    ],
)
def test_usage_errors_hint_at_what_was_meant(
    run: Callable[..., Result], argv: List[str], hint: str
) -> None:
    assert hint in error_line(run(*argv), 2)


def test_an_oversized_message_points_to_send_file(
    run: Callable[..., Result], serve: Callable[..., InProcessServer]
) -> None:
    server = serve("--max-message-size", "1K")
    result = run(
        "send", *server.address, "-", "--fingerprint", server.fingerprint, stdin=b"x" * 5000
    )
    line = error_line(result, EXIT_PROTOCOL)
    assert "message too large" in line and "callcp send-file" in line
    assert "--max-message-size" in line


def _stalled_upload(server: InProcessServer, release: threading.Event) -> threading.Thread:
    """An upload of unannounced size that sends one byte, then stalls until ``release``."""
    sent = threading.Event()

    def chunks() -> Iterator[bytes]:
        yield b"x"
        sent.set()
        release.wait(30)

    def upload() -> None:
        try:
            with callcp.connect(
                server.host, server.port, server_fingerprint=server.fingerprint
            ) as conn:
                conn.send_stream(chunks(), name="stalled.bin")
        except callcp.CallcpError:
            pass

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    assert sent.wait(10)
    return thread


def test_stalled_uploads_hold_only_what_they_sent(
    run: Callable[..., Result], tmp_path: Path, serve: Callable[..., InProcessServer]
) -> None:
    """Uploads that send a byte and stall take a byte of room each, not a
    whole file's: an honest upload beside them is stored; while they are
    under way, the directory shows no file under its name (only a hidden
    temporary one); released, they end and are stored."""
    inbox = tmp_path / "inbox"
    server = serve("--receive-dir", str(inbox), "--max-file-size", "1M", "--max-total-size", "2M")
    release = threading.Event()
    stalled = [_stalled_upload(server, release) for _ in range(3)]
    assert wait_until(lambda: len(list(inbox.iterdir())) == 3)
    assert all(p.name.startswith(".callcp-") and p.name.endswith(".part") for p in inbox.iterdir())
    honest = tmp_path / "honest.bin"
    honest.write_bytes(os.urandom(100_000))
    result = run("send-file", *server.address, str(honest), "--fingerprint", server.fingerprint)
    assert result.returncode == 0, err(result)
    release.set()
    for thread in stalled:
        thread.join(30)
    server.stop()
    stored = sorted(p.name for p in inbox.iterdir())
    assert stored == ["honest.bin", "stalled (1).bin", "stalled (2).bin", "stalled.bin"]


def test_one_address_has_a_few_uploads_at_once(
    tmp_path: Path, serve: Callable[..., InProcessServer]
) -> None:
    inbox = tmp_path / "inbox"
    server = serve("--receive-dir", str(inbox))
    release = threading.Event()
    stalled = [_stalled_upload(server, release) for _ in range(4)]
    assert wait_until(lambda: len(list(inbox.iterdir())) == 4)  # (all four admitted)
    conn = callcp.connect(server.host, server.port, server_fingerprint=server.fingerprint)
    with conn, pytest.raises(callcp.ConnectionClosed) as refused:
        conn.send_stream(b"fifth", name="fifth.bin")
        conn.recv()
    assert refused.value.reason == "this server takes at most 4 uploads at once from one address"
    release.set()
    for thread in stalled:
        thread.join(30)


def test_files_taken_away_free_their_room(
    run: Callable[..., Result],
    tmp_path: Path,
    serve: Callable[..., InProcessServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The directory is counted again before a limit refuses, so a consumer
    that moves files out keeps the inbox open."""
    from callcp import _inbox

    monkeypatch.setattr(_inbox.Inbox, "RESCAN_EVERY", 0.0)
    inbox = tmp_path / "inbox"
    server = serve("--receive-dir", str(inbox), "--max-files", "2")
    source = tmp_path / "f.bin"
    source.write_bytes(b"data")
    pin = ["--fingerprint", server.fingerprint]
    for _ in range(2):
        assert run("send-file", *server.address, str(source), *pin).returncode == 0
    assert "maximum of 2 files" in error_line(
        run("send-file", *server.address, str(source), *pin), EXIT_PROTOCOL
    )
    for stored in inbox.iterdir():
        stored.unlink()
    assert run("send-file", *server.address, str(source), *pin).returncode == 0


def test_the_receive_dir_swapped_for_a_link_later_changes_nothing(
    run: Callable[..., Result], tmp_path: Path, serve: Callable[..., InProcessServer]
) -> None:
    """Files go where the directory was when the server started: swapping
    the path for a link to elsewhere does not send uploads there."""
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = serve("--receive-dir", str(inbox))
    inbox.rename(tmp_path / "inbox.old")
    os.symlink(elsewhere, inbox)
    source = tmp_path / "f.bin"
    source.write_bytes(b"data")
    result = run("send-file", *server.address, str(source), "--fingerprint", server.fingerprint)
    assert result.returncode == 0, err(result)
    assert list(elsewhere.iterdir()) == []
    assert [p.name for p in (tmp_path / "inbox.old").iterdir()] == ["f.bin"]


# ============================================== --protocol callcp1 (issue 12)


def test_serve_and_send_with_protocol_callcp1(
    run: Callable[..., Result], serve: Callable[..., InProcessServer]
) -> None:
    """A legacy listener answers Callcp 1.0's own client and ``send
    --protocol callcp1``, which warns on stderr; plain ``send`` is told the
    option; a message over 4,068 bytes is refused before it is sent."""
    from tests.callcp1_peer import callcp1_request

    server = serve("--protocol", "callcp1")
    assert callcp1_request(server.port, [b"old client"]) == [b"old client"]
    result = run(
        "send",
        *server.address,
        "hello",
        "--protocol",
        "callcp1",
        "--fingerprint",
        server.fingerprint,
    )
    assert result.returncode == 0 and out(result) == "hello\n"
    assert "with CALLCP 1.0's wire format (protocol='callcp1'): no server authentication" in err(
        result
    )
    line = error_line(
        run("send", *server.address, "hello", "--fingerprint", server.fingerprint), EXIT_HANDSHAKE
    )
    assert "(callcp send --protocol callcp1)" in line
    result = run(
        "send",
        *server.address,
        "-",
        "--protocol",
        "callcp1",
        "--fingerprint",
        server.fingerprint,
        stdin=b"x" * 4069,
    )
    assert result.returncode == EXIT_PROTOCOL
    assert "at most 4068 bytes; this one has 4069 (nothing was sent" in err(result)
    assert "Traceback" not in err(result)
    assert "Callcp 1.0 connection from" in server.log()


def test_send_with_protocol_callcp1_to_a_callcp1_server(
    run: Callable[..., Result], server_key: rsa.RSAPrivateKey
) -> None:
    from tests.callcp1_peer import Callcp1Server

    old = Callcp1Server(server_key)
    try:
        fingerprint = callcp.KeyPair(server_key).fingerprint
        result = run(
            "send",
            "127.0.0.1",
            str(old.port),
            "hi",
            "--protocol",
            "callcp1",
            "--fingerprint",
            fingerprint,
        )
        assert result.returncode == 0 and out(result) == "hi\n"
        assert old.dropped == 0 and old.served == 1
    finally:
        old.close()


@pytest.mark.parametrize(
    ("option", "lacks"),
    [
        (["--receive-dir", "inbox"], "no streams"),
        (["--authorized-keys", "keys.txt"], "no client keys"),
        (["--next-key", "next.pem"], "no way to announce a key"),
    ],
)
def test_serve_protocol_callcp1_refuses_what_callcp1_lacks(
    run: Callable[..., Result], option: List[str], lacks: str
) -> None:
    line = error_line(run("serve", "--port", "0", "--protocol", "callcp1", *option), 2)
    assert f"{option[0]} needs callcp/2: Callcp 1.0 has {lacks}" in line


def test_serve_per_source_limits_and_shutdown_timeout(
    serve: Callable[..., InProcessServer], run: Callable[..., Result]
) -> None:
    server = serve(
        "--max-connections-per-source",
        "0",
        "--max-handshakes-per-source",
        "0",
        "--shutdown-timeout",
        "2.5",
        "--keepalive-interval",
        "20",
        "--ticket-lifetime",
        "0",
    )
    options = server.server.options
    assert options.max_connections_per_source == 0
    assert options.max_handshakes_per_source == 0
    assert options.shutdown_timeout == 2.5
    assert options.keepalive_interval == 20
    assert options.ticket_lifetime == 0
    line = error_line(run("serve", "--port", "0", "--shutdown-timeout", "0"), 2)
    assert "--shutdown-timeout must be" in line
