"""The Callcp 1.0 API (callcp.compat), its root scripts, and the optional display.

Everything runs over 127.0.0.1 (the README examples connect to "localhost"),
every wait is bounded, and every file (keys, known_hosts, HOME) lives under
tmp_path, so ~/.callcp is never touched.

Subprocesses that must prove "works from a checkout without installing" run
``python -S`` with PYTHONPATH set to the venv's site-packages: that keeps the
dependencies (cryptography, rich) importable but skips the editable install's
.pth file, so ``callcp`` is found only through Server.py / Client.py putting
``<repo>/src`` on sys.path.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import cryptography
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from callcp import display as display_mod
from callcp._core.errors import (
    ConnectionClosed,
    HandshakeError,
    KeyManagementError,
    MessageTooLarge,
    SecureTCPClientError,
    SecureTCPServerError,
    ServerKeyChanged,
    TransportError,
)
from callcp.compat import LOG_FORMAT, SecureTCPClient, SecureTCPServer
from callcp.keys import KeyPair

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = Path(__file__).resolve().parent / "callcp1_examples"
SITE_PACKAGES = str(Path(cryptography.__file__).resolve().parent.parent)
MiB = 1024 * 1024
LIMIT = 16 * MiB  # the default max_message_size
WAIT = 30.0  # seconds: the bound on any single wait in this file


# ----------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def key_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One server key for the in-process tests (RSA generation is slow)."""
    d = tmp_path_factory.mktemp("compat-keys")
    private, public = d / "server_private.pem", d / "server_public.pem"
    KeyPair.load_or_generate(private, public)
    return private, public


@contextlib.contextmanager
def running_server(key_files: tuple[Path, Path], **options: Any) -> Iterator[SecureTCPServer]:
    """A SecureTCPServer on 127.0.0.1:<free port>, started in a thread."""
    private, public = key_files
    options.setdefault("use_display", False)
    options.setdefault("logger", logging.getLogger("test.compat.server"))
    server = SecureTCPServer(
        host="127.0.0.1",
        port=0,
        private_key_path=private,
        public_key_path=public,
        **options,
    )
    server.initialize()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.start()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run, name="compat-server", daemon=True)
    thread.start()
    assert server.ready.wait(WAIT), f"server did not start: {errors}"
    assert server.port != 0
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(WAIT)
        assert not thread.is_alive(), "start() did not return after shutdown()"
        assert not errors, errors


def client_for(server: SecureTCPServer, tmp_path: Path, **options: Any) -> SecureTCPClient:
    options.setdefault("use_display", False)
    options.setdefault("known_hosts", tmp_path / "known_hosts")
    options.setdefault("timeout", WAIT)
    options.setdefault("logger", logging.getLogger("test.compat.client"))
    return SecureTCPClient(host="127.0.0.1", port=server.port, **options)


def free_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range: a port the kernel
    hands out (port 0) may be taken by another test's outgoing connection
    before the example binds it (seen with pytest-xdist)."""
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError):
        pass
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, max(10_001, low))
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # (no luck: the kernel's choice)
        s.bind((host, 0))
        chosen: int = s.getsockname()[1]
        return chosen


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def uninstalled_env(home: Path) -> dict[str, str]:
    """Environment for ``python -S``: dependencies importable, callcp not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=SITE_PACKAGES, HOME=str(home), PYTHONUNBUFFERED="1")
    env.pop("CALLCP_KEY_PASSPHRASE", None)
    return env


def _default_sigint() -> None:
    # Python only installs its KeyboardInterrupt handler when SIGINT is not
    # ignored at startup; a runner may start us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Proc:
    """A subprocess whose merged output is collected by a thread."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_default_sigint,  # runs in the child before exec
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.popen.poll() is not None:
                self._reader.join(5)
                if text in self.output:
                    return
                pytest.fail(
                    f"process exited ({self.popen.returncode}) before {text!r}:\n" + self.output
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} within {timeout} s:\n{self.output}")
            time.sleep(0.05)

    def interrupt(self, timeout: float = WAIT) -> int:
        """Ctrl-C; returns the exit code."""
        self.popen.send_signal(signal.SIGINT)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
            pytest.fail(f"no exit within {timeout} s of SIGINT:\n{self.output}")
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


@contextlib.contextmanager
def process(args: list[str], cwd: Path, env: dict[str, str]) -> Iterator[Proc]:
    proc = Proc(args, cwd, env)
    try:
        yield proc
    finally:
        proc.kill()


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A checkout-like directory: Server.py, Client.py and src/, nothing installed."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Server.py", "Client.py"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def example(name: str, port: int) -> str:
    """A README example, verbatim but for the port number."""
    text = (EXAMPLES / name).read_text()
    assert "8436" in text or name == "install_check.py"
    return re.sub(r"\b8436\b", str(port), text)


# ------------------------------------------------ the Callcp 1.0 README examples

MULTI = [f"Sent: Message {i}, Received: Message {i}" for i in (1, 2, 3)]


@pytest.mark.parametrize(
    ("server_example", "client_example", "expected", "secret"),
    [
        ("server_basic.py", "client_basic.py", ["Server response: Hello, Server!"], "Hello"),
        ("server_basic.py", "client_multiple_messages.py", MULTI, "Message"),
        (
            "server_custom_handler.py",
            "client_basic.py",
            ["Server response: Processed: HELLO, SERVER!"],
            "Hello",
        ),
        ("server_logging.py", "client_multiple_messages.py", MULTI, "Message"),
    ],
)
def test_readme_examples_run_unchanged(
    repo_copy: Path,
    tmp_path: Path,
    server_example: str,
    client_example: str,
    expected: list[str],
    secret: str,
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = uninstalled_env(home)
    port = free_port("0.0.0.0")  # noqa: S104 - the examples listen on 0.0.0.0
    (repo_copy / "my_server.py").write_text(example(server_example, port))
    (repo_copy / "my_client.py").write_text(example(client_example, port))

    with process([sys.executable, "-S", "my_server.py"], repo_copy, env) as server:
        # With the display on, its banner stands for the "listening" log line.
        display_on = "use_display=True" in example(server_example, port)
        server.wait_for("Listening on" if display_on else "callcp server listening")
        done = run([sys.executable, "-S", "my_client.py"], repo_copy, env)
        assert done.returncode == 0, done.stdout + done.stderr
        for line in expected:
            assert line in done.stdout.splitlines(), done.stdout
        assert "Traceback" not in done.stdout + done.stderr
        # The client trusted the new server on first use, in HOME (tmp).
        assert f"{port}" in (home / ".callcp" / "known_hosts").read_text()

        code = server.interrupt()
    assert code == 0, server.output
    assert "Received shutdown signal" in server.output
    assert "Traceback" not in server.output
    assert secret not in server.output  # sizes only, never message contents
    # Keys were generated on first run in the working directory.
    private = repo_copy / "server_private.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (repo_copy / "server_public.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY")
    if server_example == "server_logging.py":
        assert re.search(r" - SecureTCPServer - INFO - ", server.output), server.output


def test_readme_install_check_from_a_checkout(repo_copy: Path, tmp_path: Path) -> None:
    code = example("install_check.py", 0).strip()
    env = uninstalled_env(tmp_path)
    done = run([sys.executable, "-S", "-c", code], repo_copy, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Installation successful"
    # ... and callcp really came from the checkout's src/, not an install.
    where = run(
        [sys.executable, "-S", "-c", "import Server, callcp; print(callcp.__file__)"],
        repo_copy,
        env,
    )
    assert where.stdout.strip().startswith(str(repo_copy / "src")), where.stdout + where.stderr


def test_readme_install_check_from_the_repository_root(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HOME"] = str(tmp_path)
    done = run([sys.executable, "-c", example("install_check.py", 0).strip()], REPO, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Installation successful"


def test_root_modules_export_the_callcp1_names(repo_copy: Path, tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        from Server import (SecureTCPServer, SecureTCPServerError, KeyManagementError,
                            HandshakeError, TransportError, CryptoError)
        from Client import (SecureTCPClient, SecureTCPClientError, HandshakeError as H2,
                            TransportError as T2, CryptoError as C2)
        import callcp
        assert SecureTCPServer is callcp.compat.SecureTCPServer
        assert SecureTCPClient is callcp.compat.SecureTCPClient
        assert HandshakeError is H2 is callcp.HandshakeError
        assert issubclass(KeyManagementError, SecureTCPClientError)
        assert issubclass(CryptoError, SecureTCPServerError)
        print("ok")
        """
    )
    done = run([sys.executable, "-S", "-c", code], repo_copy, uninstalled_env(tmp_path))
    assert done.stdout.strip() == "ok", done.stderr


# ------------------------------------------------------ python Server.py / Client.py


@contextlib.contextmanager
def port_8436() -> Iterator[None]:
    """Server.py always listens on 8436: hold a machine-wide lock around its
    use, so parallel runs (pytest-xdist, other checkouts) take turns, and skip
    when something else holds the port."""
    with open(os.path.join(tempfile.gettempdir(), "callcp-tests-port-8436.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not port_is_free("0.0.0.0", 8436):  # noqa: S104
                pytest.skip("port 8436 is in use on this machine; Server.py always listens there")
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def test_server_py_and_client_py_scripts(tmp_path: Path) -> None:
    env = uninstalled_env(tmp_path)
    with (
        port_8436(),
        process([sys.executable, "-S", str(REPO / "Server.py")], tmp_path, env) as server,
    ):
        try:
            server.wait_for("Listening on")  # the display's banner
        except pytest.fail.Exception:
            if "already in use" in server.output:  # taken since port_8436() looked
                pytest.skip("port 8436 was taken by another program meanwhile")
            raise
        done = run(
            [
                sys.executable,
                "-S",
                str(REPO / "Client.py"),
                "localhost",
                "8436",
                "Hello from client",
            ],
            tmp_path,
            env,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Server response: Hello from client" in done.stdout.splitlines()
        code = server.interrupt()
    assert code == 0, server.output
    assert "Hello from client" not in server.output
    assert (tmp_path / "server_private.pem").is_file()
    assert (tmp_path / "server_public.pem").is_file()


def test_client_py_usage_and_errors(tmp_path: Path) -> None:
    env = uninstalled_env(tmp_path)
    client = str(REPO / "Client.py")
    done = run([sys.executable, "-S", client, "localhost", "8436"], tmp_path, env)
    assert done.returncode == 1
    assert done.stderr.startswith("Usage: python Client.py HOST PORT")
    done = run([sys.executable, "-S", client, "localhost", "99999", "x"], tmp_path, env)
    assert done.returncode == 1
    assert "Error: invalid port" in done.stderr
    port = free_port()  # nothing listens there
    done = run([sys.executable, "-S", client, "127.0.0.1", str(port), "x"], tmp_path, env)
    assert done.returncode == 1
    # Reported once, on stderr, by the library's display: not again by Client.py.
    failure = (
        "Failed to connect: nothing is listening (connection refused) while "
        f"connecting to 127.0.0.1:{port}"
    )
    assert f"✖ {failure}\n" in done.stderr
    assert (done.stdout + done.stderr).count(failure) == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------- concurrency


def test_fifty_concurrent_clients_a_hundred_requests_each(
    key_files: tuple[Path, Path], tmp_path: Path
) -> None:
    n_clients, n_requests = 50, 100
    with running_server(key_files) as server:
        start = threading.Barrier(n_clients, timeout=WAIT)
        failures: list[str] = []
        counts = [0] * n_clients

        def work(i: int) -> None:
            client = client_for(server, tmp_path, server_fingerprint=server.fingerprint)
            try:
                client.connect()
                start.wait()
                for j in range(n_requests):
                    msg = f"client {i} request {j} ".encode() * (j % 7 + 1)
                    reply = client.send_message(msg)
                    if reply != msg:
                        failures.append(f"client {i} request {j}: wrong reply")
                        return
                    counts[i] += 1
            except Exception as exc:
                failures.append(f"client {i}: {type(exc).__name__}: {exc}")
            finally:
                client.disconnect()

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "clients hung"
        assert not failures, failures[:5]
        assert counts == [n_requests] * n_clients


# ------------------------------------------------------------------ message sizes


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, MiB, LIMIT])
def test_payload_round_trips(key_files: tuple[Path, Path], tmp_path: Path, size: int) -> None:
    payload = os.urandom(size)
    with running_server(key_files) as server:
        client = client_for(server, tmp_path)
        client.connect()
        try:
            assert client.send_message(payload) == payload
            assert client.send_message(b"after") == b"after"  # boundaries kept
        finally:
            client.disconnect()


def test_message_over_the_limit_is_refused_and_the_server_goes_on(
    key_files: tuple[Path, Path], tmp_path: Path
) -> None:
    with running_server(key_files) as server:
        client = client_for(server, tmp_path)
        client.connect()
        with pytest.raises(SecureTCPClientError) as info:
            client.send_message(b"\0" * (LIMIT + 1))
        assert isinstance(info.value, ConnectionClosed), repr(info.value)
        assert "message too large" in str(info.value)
        assert f"max_message_size ({LIMIT} bytes)" in str(info.value)
        assert not client.is_connected()
        client.disconnect()  # idempotent after the failure

        other = client_for(server, tmp_path)
        other.connect()
        assert other.send_message(b"still serving") == b"still serving"
        other.disconnect()
        # The refused client can reconnect too.
        client.connect()
        assert client.send_message(b"again") == b"again"
        client.disconnect()


def test_client_refuses_a_reply_over_its_own_limit(
    key_files: tuple[Path, Path], tmp_path: Path
) -> None:
    with running_server(key_files) as server:
        client = client_for(server, tmp_path, max_message_size=1000)
        client.connect()
        assert client.send_message(b"x" * 1000) == b"x" * 1000
        with pytest.raises(MessageTooLarge):
            client.send_message(b"x" * 1001)
        assert not client.is_connected()


# --------------------------------------------------------------- key files


def test_callcp1_key_files_load_as_they_are(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private, public = tmp_path / "server_private.pem", tmp_path / "server_public.pem"
    private.write_bytes(private_pem)
    public.write_bytes(public_pem)
    expected = KeyPair(key).fingerprint

    with running_server((private, public)) as server:
        assert server.fingerprint == expected
        client = client_for(server, tmp_path, server_fingerprint=expected)
        client.connect()
        assert client.fingerprint == expected
        assert client.send_message(b"1.0 keys") == b"1.0 keys"
        client.disconnect()
    assert private.read_bytes() == private_pem
    assert public.read_bytes() == public_pem


def test_keys_are_generated_on_first_run_and_reused(tmp_path: Path) -> None:
    private, public = tmp_path / "k" / "server_private.pem", tmp_path / "k" / "server_public.pem"
    first = SecureTCPServer(private_key_path=private, public_key_path=public, use_display=False)
    assert first.fingerprint is None
    first.initialize()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.is_file()
    second = SecureTCPServer(private_key_path=private, public_key_path=public, use_display=False)
    second.initialize()
    assert second.fingerprint == first.fingerprint


def test_bad_key_files_raise_key_management_error(
    key_files: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt = tmp_path / "corrupt.pem"
    corrupt.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    server = SecureTCPServer(
        private_key_path=corrupt,
        public_key_path=None,
        use_display=False,
        logger=logging.getLogger("test.compat.keys"),
    )
    with pytest.raises(KeyManagementError), caplog.at_level(logging.ERROR):
        server.initialize()
    assert "Key management failed" in caplog.text
    assert "not a key" not in caplog.text

    other = tmp_path / "other_public.pem"
    other.write_bytes(KeyPair.generate().public_pem())
    mismatched = SecureTCPServer(
        private_key_path=key_files[0], public_key_path=other, use_display=False
    )
    with pytest.raises(SecureTCPServerError):  # a KeyManagementError, under 1.0's root
        mismatched.initialize()


# ----------------------------------------------------------------- errors


def test_send_message_before_connect() -> None:
    client = SecureTCPClient(use_display=False)
    with pytest.raises(SecureTCPClientError) as info:
        client.send_message(b"x")
    assert str(info.value) == "Not connected to server. Call connect() first."
    assert not client.is_connected()
    client.disconnect()
    client.disconnect()


def test_start_before_initialize() -> None:
    server = SecureTCPServer(use_display=False)
    with pytest.raises(SecureTCPServerError) as info:
        server.start()
    assert str(info.value) == "Server not initialized. Call initialize() first."
    server.shutdown()  # a no-op when not running


@pytest.mark.parametrize(
    "callback",
    [
        pytest.param(
            lambda m: (_ for _ in ()).throw(ValueError(f"cannot parse {m!r}")), id="raises"
        ),
        pytest.param(lambda m: m.decode(), id="returns-str"),
    ],
)
def test_failing_callback_closes_that_connection_only(
    key_files: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    callback: Callable[[bytes], Any],
) -> None:
    def handler(message: bytes) -> bytes:
        if message.startswith(b"boom"):
            result: bytes = callback(message)
            return result
        return message

    caplog.set_level(logging.DEBUG)
    with running_server(key_files, message_callback=handler) as server:
        client = client_for(server, tmp_path)
        client.connect()
        assert client.send_message(b"fine") == b"fine"
        with pytest.raises(SecureTCPClientError) as info:
            client.send_message(b"boom top-secret-plaintext")
        assert isinstance(info.value, ConnectionClosed)
        assert "internal error" in str(info.value)
        assert not client.is_connected()

        other = client_for(server, tmp_path)
        other.connect()
        assert other.send_message(b"still up") == b"still up"
        other.disconnect()

    errors = [
        r for r in caplog.records if r.name == "test.compat.server" and r.levelno >= logging.ERROR
    ]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "message_callback" in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage() and errors[0].exc_info is None
    assert "top-secret-plaintext" not in caplog.text


def test_connect_failures_are_client_errors_with_the_10_prefix(
    key_files: tuple[Path, Path], tmp_path: Path
) -> None:
    client = SecureTCPClient(
        "127.0.0.1", free_port(), use_display=False, timeout=WAIT, known_hosts=tmp_path / "kh"
    )
    with pytest.raises(TransportError) as info:
        client.connect()
    assert isinstance(info.value, SecureTCPClientError)
    assert str(info.value).startswith("Failed to connect: ")
    assert not client.is_connected()

    with running_server(key_files) as server:
        wrong = KeyPair.generate().fingerprint
        pinned = client_for(server, tmp_path, server_fingerprint=wrong)
        with pytest.raises(ServerKeyChanged) as changed:
            pinned.connect()
        assert isinstance(changed.value, HandshakeError)
        assert str(changed.value).startswith("Failed to connect: ")
        assert changed.value.presented == server.fingerprint
        assert not pinned.is_connected()


def test_known_hosts_trust_on_first_use(key_files: tuple[Path, Path], tmp_path: Path) -> None:
    known = tmp_path / "kh"
    with running_server(key_files) as server:
        client = client_for(server, tmp_path, known_hosts=known)
        client.connect()
        assert server.fingerprint is not None
        assert server.fingerprint in known.read_text()
        client.disconnect()
        strict = client_for(
            server, tmp_path, known_hosts=tmp_path / "empty", trust_on_first_use=False
        )
        with pytest.raises(HandshakeError):
            strict.connect()


def test_start_failure_and_restart(key_files: tuple[Path, Path], tmp_path: Path) -> None:
    with running_server(key_files) as busy:
        clash = SecureTCPServer(
            "127.0.0.1",
            busy.port,
            key_files[0],
            key_files[1],
            use_display=False,
            logger=logging.getLogger("test.compat.clash"),
        )
        clash.initialize()
        with pytest.raises(TransportError):
            clash.start()
        assert not clash.running
        with pytest.raises(SecureTCPServerError, match="already running"):
            busy.start()
    # A stopped server can be started again.
    with running_server(key_files) as again:
        client = client_for(again, tmp_path)
        client.connect()
        assert client.send_message(b"x") == b"x"
        client.disconnect()


def test_shutdown_from_another_thread_with_clients_connected(
    key_files: tuple[Path, Path], tmp_path: Path
) -> None:
    server = SecureTCPServer(
        "127.0.0.1",
        0,
        key_files[0],
        key_files[1],
        use_display=False,
        logger=logging.getLogger("test.compat.server"),
    )
    server.initialize()
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    assert server.ready.wait(WAIT)
    client = client_for(server, tmp_path)
    client.connect()
    assert client.send_message(b"x") == b"x"
    server.shutdown()
    thread.join(WAIT)
    assert not thread.is_alive() and not server.running
    with pytest.raises(SecureTCPClientError):
        client.send_message(b"y")
    server.shutdown()  # idempotent


def test_nothing_secret_is_logged(
    key_files: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = b"correct horse battery staple"
    caplog.set_level(logging.DEBUG)
    with running_server(key_files) as server:
        client = client_for(server, tmp_path)
        client.connect()
        assert client.send_message(secret) == secret
        client.disconnect()
    assert "connection from 127.0.0.1" in caplog.text  # logging is on...
    assert secret.decode() not in caplog.text  # ...but never the plaintext
    pem_body = key_files[0].read_text().splitlines()[1]
    assert pem_body not in caplog.text


@contextlib.contextmanager
def no_root_handlers() -> Iterator[None]:
    """As in a program that configured no logging (pytest puts its own
    capturing handlers on the root logger)."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = saved


def test_default_loggers_are_callcp1s() -> None:
    for make, name in (
        (lambda: SecureTCPClient(use_display=False), "callcp.client"),
        (lambda: SecureTCPServer(use_display=False), "callcp.server"),
    ):
        logger = logging.getLogger(name)
        saved = (logger.handlers[:], logger.level)
        logger.handlers.clear()
        try:
            with no_root_handlers():
                obj = make()
                assert obj.logger is logger
                assert logger.level == logging.INFO
                assert len(logger.handlers) == 1
                handler = logger.handlers[0]
                assert isinstance(handler, logging.StreamHandler)
                assert handler.formatter is not None
                assert handler.formatter._fmt == LOG_FORMAT
                make()  # a second instance adds no second handler
                assert len(logger.handlers) == 1
        finally:
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])


def test_default_loggers_print_through_configured_logging_once() -> None:
    """After logging.basicConfig() (here: pytest's root handlers), the default
    loggers add no console handler of their own: each record is printed by
    the root's handlers alone, not a second time by callcp's."""
    for make, name in (
        (lambda: SecureTCPClient(use_display=False), "callcp.client"),
        (lambda: SecureTCPServer(use_display=False), "callcp.server"),
    ):
        logger = logging.getLogger(name)
        saved = (logger.handlers[:], logger.level)
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        try:
            assert logging.getLogger().handlers  # configured (by pytest)
            assert make().logger is logger
            assert logger.handlers == []
            assert logger.level == logging.NOTSET  # the configured level applies
        finally:
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])


# ------------------------------------------------------------------ display


def test_without_rich_use_display_falls_back_to_logging_once(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, threading
        sys.modules["rich"] = None  # as if rich were not installed
        from callcp.compat import SecureTCPServer, SecureTCPClient
        server = SecureTCPServer("127.0.0.1", 0, {str(tmp_path / "k.pem")!r}, None,
                                 use_display=True)
        assert server.display is None
        server.initialize()
        t = threading.Thread(target=server.start)
        t.start()
        assert server.ready.wait(30)
        client = SecureTCPClient("127.0.0.1", server.port, use_display=True,
                                 known_hosts={str(tmp_path / "kh")!r}, timeout=30)
        assert client.display is None
        client.connect()
        print("reply:", client.send_message(b"no rich").decode())
        client.disconnect()
        server.shutdown()
        t.join(30)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HOME"] = str(tmp_path)
    done = run([sys.executable, "-c", code], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reply: no rich"
    assert done.stderr.count(display_mod.RICH_MISSING_WARNING) == 1, done.stderr
    assert "WARNING - " + display_mod.RICH_MISSING_WARNING in done.stderr
    assert "callcp server listening" in done.stderr  # it logs instead


def test_make_display_warns_once_in_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing() -> Any:
        raise ImportError("No module named 'rich'")

    monkeypatch.setattr(display_mod, "_import_rich", missing)
    monkeypatch.setattr(display_mod, "_warned", False)
    logger = logging.getLogger("test.compat.display")
    with caplog.at_level(logging.WARNING):
        assert display_mod.make_display(True, logger) is None
        assert display_mod.make_display(True, logger) is None
        assert display_mod.make_display(False, logger) is None
    assert [r.getMessage() for r in caplog.records] == [display_mod.RICH_MISSING_WARNING]
    assert not display_mod.rich_available()


def test_display_shows_banners_and_escapes_peer_text() -> None:
    pytest.importorskip("rich")
    from rich.console import Console

    out = io.StringIO()
    shown = display_mod.Display(Console(file=out, width=120, color_system=None))
    shown.startup_banner("0.0.0.0", 8436, "SHA256:abc")  # noqa: S104
    shown.connection_banner("127.0.0.1:5000", None)
    shown.handshake_panel("localhost:8436", "SHA256:abc")
    shown.channel_panel()
    with shown.status("Connecting…"):
        shown.print_info("[bold]not markup[/bold]")
    shown.print_warning("w")
    shown.print_error("e")
    shown.print_success("s")
    shown.message("Client →", b"x" * 500)
    text = out.getvalue()
    for needle in (
        "0.0.0.0:8436",
        "SHA256:abc",
        "127.0.0.1:5000",
        "Encrypted channel active",
        "Handshake complete",
        "[bold]not markup[/bold]",
        "(500 bytes)",
    ):
        assert needle in text, needle


def test_server_display_with_rich_does_not_show_messages(
    key_files: tuple[Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("rich")
    from rich.console import Console

    out = io.StringIO()
    with running_server(key_files, use_display=True) as server:
        assert server.display is not None
        server.display.console = Console(file=out, width=120, color_system=None)
        client = client_for(server, tmp_path)
        client.connect()
        assert client.send_message(b"private words") == b"private words"
        client.disconnect()
        deadline = time.monotonic() + WAIT
        while "disconnected" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
    text = out.getvalue()
    assert "received 13 bytes, replied 13 bytes" in text
    assert "private words" not in text
