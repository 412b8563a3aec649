"""The ``callcp`` command run in tests: in this process through
``cli.main(argv)`` (the ``run`` fixture, in a per-test ``home``), or as a
``callcp serve`` subprocess (:class:`CliServer`).  A plugin (conftest's
``pytest_plugins``), so every suite that drives the CLI shares it."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest

from callcp import cli

RUN_TIMEOUT = 60.0
LISTENING = re.compile(r"listening on (\S+):(\d+) \(server key (SHA256:[A-Za-z0-9+/]{43})\)")


@dataclass
class Result:
    """What one run of the command did."""

    returncode: int
    stdout: bytes
    stderr: bytes


def out(result: Result) -> str:
    return result.stdout.decode("utf-8", "replace")


def err(result: Result) -> str:
    return result.stderr.decode("utf-8", "replace")


def error_line(result: Result, code: int) -> str:
    """Assert a failure: the exit code, ONE line on stderr, no traceback."""
    stderr = err(result)
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("callcp: error: "), stderr
    assert result.returncode == code, (result.returncode, stderr)
    return lines[0]


def exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A per-test HOME, for this process and for the subprocesses it starts."""
    path = tmp_path / "home"
    path.mkdir()
    for name in list(os.environ):
        if name.startswith("CALLCP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.setenv("COLUMNS", "100")  # argparse's help layout
    old = os.umask(0o077)  # (key files the tests write are private, as an operator's are)
    yield path
    os.umask(old)


@pytest.fixture
def run(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> Callable[..., Result]:
    """``run(*args, stdin=b"", env={})``: ``callcp ARGS`` in this process."""

    def run(*args: str, stdin: bytes = b"", env: Optional[Dict[str, str]] = None) -> Result:
        capsysbinary.readouterr()  # only this run's output
        with monkeypatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            patch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
            try:
                code = cli.main(list(args))
            except SystemExit as exc:  # argparse: usage errors, --help, --version
                code = exit_code(exc)
        captured = capsysbinary.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def cli_env(home: Path, **extra: str) -> Dict[str, str]:
    """The environment of a ``callcp`` subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLCP_")}
    env.update(HOME=str(home), PYTHONIOENCODING="utf-8", COLUMNS="100", **extra)
    if "PYTHONPATH" not in extra:
        env.pop("PYTHONPATH", None)
    return env


class CliServer:
    """``callcp serve --port 0 ...`` in a subprocess; stderr goes to a log file."""

    def __init__(self, home: Path, args: List[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "callcp", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            env=cli_env(home),
        )
        lines: queue.Queue[bytes] = queue.Queue()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            first = lines.get(timeout=RUN_TIMEOUT).decode("utf-8", "replace")
        except queue.Empty:
            self.stop()
            raise AssertionError(f"the server printed nothing: {self.log()}") from None
        match = LISTENING.search(first)
        if match is None:
            self.stop()
            raise AssertionError(f"unexpected first line {first!r}; log: {self.log()}")
        self.host, self.port, self.fingerprint = match[1], int(match[2]), match[3]
        self.returncode: Optional[int] = None

    @property
    def address(self) -> List[str]:
        return [self.host, str(self.port)]

    def log(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._log_file.close()
        self.returncode = self.proc.returncode
        return self.proc.returncode
