"""What the Callcp 1.0 API and its scripts print (issue 11, items 2-6).

- peer-controlled text reaches the terminal escaped (Client.py, the display);
- with ``use_display=True`` each event is on the console once (not a panel
  plus a log line), while configured log handlers still get every record;
- the first run says the server key was generated, later runs loaded;
- the rich-missing warning names an install that works (callcp is on no index);
- the default key files are the working directory's.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

import callcp
from callcp import display as display_mod
from callcp._core.errors import ServerKeyChanged
from callcp.compat import DISPLAYED, SecureTCPClient, SecureTCPServer
from callcp.keys import KeyPair
from tests.test_compat import REPO, WAIT, free_port, run, uninstalled_env

#: What a hostile server may send to a terminal: a window title (OSC 0), a
#: screen clear (CSI 2J), a clipboard write (OSC 52), a bell, a carriage
#: return and a line break that forge a line, a C1 CSI (U+009B, in UTF-8).
HOSTILE = (
    b"\x1b]0;pwned\x07\x1b[2J\x1b]52;c;ZXZpbA==\x07"
    b"\rError: forged\nsecond line\x9b\xc2\x9b31mred\x1b[0m"
)
CONTROLS = ("\x1b", "\x07", "\r", "\x9b", "\x85")


def assert_escaped(text: str) -> None:
    for c in CONTROLS:
        assert c not in text, (c, text)


@contextlib.contextmanager
def serving(handler: Any, key: KeyPair) -> Iterator[callcp.Server]:
    server = callcp.serve(handler, "127.0.0.1", 0, key=key)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(WAIT)


# ------------------------------------------------------- item 2: escaping


def test_client_py_escapes_a_hostile_reply(tmp_path: Path) -> None:
    def hostile(conn: callcp.Connection) -> None:
        for _ in conn:
            conn.send(HOSTILE)

    with serving(hostile, KeyPair.generate()) as server:
        done = run(
            [sys.executable, "-S", str(REPO / "Client.py"), "127.0.0.1", str(server.port), "hi"],
            tmp_path,
            uninstalled_env(tmp_path),
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert_escaped(done.stdout + done.stderr)
    replies = [line for line in done.stdout.splitlines() if line.startswith("Server response:")]
    assert replies == [
        "Server response: \\x1b]0;pwned\\x07\\x1b[2J\\x1b]52;c;ZXZpbA==\\x07"
        "\\rError: forged\\nsecond line\ufffd\\x9b31mred\\x1b[0m"
    ]
    assert not any(line.startswith("Error: forged") for line in done.stdout.splitlines())


def test_display_escapes_control_characters() -> None:
    pytest.importorskip("rich")
    from rich.console import Console

    out = io.StringIO()
    text = HOSTILE.decode("utf-8", "replace")
    shown = display_mod.Display(Console(file=out, width=300, color_system=None))
    shown.print_info(text)
    shown.print_success(text)
    shown.print_warning(text)
    shown.print_error(f"Request failed: {text}")
    shown.message("Client →", HOSTILE)
    shown.connection_banner(text, text)
    shown.handshake_panel(text, text)
    shown.startup_banner(text, 1, text)
    with shown.status(text):
        pass
    printed = out.getvalue()
    assert_escaped(printed)
    assert printed.count("\\x1b]52;c;ZXZpbA==") >= 8
    # One event, one line: the forged line break is escaped, not wrapped.
    assert not any(line.startswith("Error: forged") for line in printed.splitlines())


def test_display_sends_warnings_and_errors_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rich")
    shown = display_mod.Display()
    shown.print_info("note")
    shown.print_warning("careful")
    shown.print_error("broken " + "x" * 200)  # long: still one line
    captured = capsys.readouterr()
    assert "note" in captured.out and "careful" not in captured.out
    assert "⚠ careful\n" in captured.err
    assert "✖ broken " + "x" * 200 + "\n" in captured.err


# ---------------------------------------------- item 3: each event once

ONCE_SCRIPT = textwrap.dedent(
    """
    import logging, sys, threading
    from callcp.compat import SecureTCPServer, SecureTCPClient

    server = SecureTCPServer("127.0.0.1", 0)   # the defaults: display on, 1.0's logger
    assert server.display is not None
    server.initialize()
    ended = threading.Event()

    class Ended(logging.Handler):
        def emit(self, record):
            if "disconnected after" in record.getMessage():
                ended.set()

    logging.getLogger("callcp.server").addHandler(Ended())
    thread = threading.Thread(target=server.start)
    thread.start()
    assert server.ready.wait(30)
    client = SecureTCPClient("127.0.0.1", server.port, timeout=30)
    client.connect()
    assert client.send_message(b"hello") == b"hello"
    client.disconnect()
    assert ended.wait(30)
    server.shutdown()
    thread.join(30)
    """
)


def test_with_the_display_each_event_is_on_the_console_once(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HOME"] = str(tmp_path)
    done = run([sys.executable, "-c", ONCE_SCRIPT], tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    console = done.stdout + done.stderr
    for needle, count in {
        # each event: once, on the display (standard output) ...
        "Server key generated: SHA256:": 1,
        "Listening on  127.0.0.1:": 1,
        "New connection": 1,
        "Handshake complete": 1,
        "received 5 bytes, replied 5 bytes": 1,
        "Server replied (5 bytes)": 1,
        "ℹ Disconnected\n": 1,
        "disconnected (1 messages)": 1,
        "Server stopped": 1,
        # ... and not again as the log line saying the same
        "Server key generated: SHA256:" + "x": 0,
        "callcp server listening": 0,
        "Connected to 127.0.0.1": 0,
        "Disconnected from": 0,
        "disconnected after": 0,
        "Shutting down server": 0,
        "callcp server stopped": 0,
        # what the display does not show is logged, once
        "WARNING - permanently added 127.0.0.1:": 1,
    }.items():
        assert console.count(needle) == count, (needle, console)
    assert " - INFO - " not in done.stderr, done.stderr


def test_with_the_display_configured_handlers_still_get_every_record(
    tmp_path: Path,
) -> None:
    pytest.importorskip("rich")
    from rich.console import Console

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.compat.console.configured")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    out = io.StringIO()
    try:
        server = SecureTCPServer(
            "127.0.0.1", 0, tmp_path / "k.pem", None, logger=logger, use_display=True
        )
        assert server.display is not None
        server.display.console = server.display.err_console = Console(file=out, width=200)
        server.initialize()
        thread = threading.Thread(target=server.start, daemon=True)
        thread.start()
        assert server.ready.wait(WAIT)
        server.shutdown()
        thread.join(WAIT)
    finally:
        logger.handlers.clear()
    messages = [r.getMessage() for r in records]
    for needle in ("Server key generated", "callcp server listening", "callcp server stopped"):
        assert any(needle in m for m in messages), (needle, messages)
    assert "Listening on" in out.getvalue()
    shown = [r.getMessage() for r in records if getattr(r, DISPLAYED, False)]
    assert any(m.startswith("Server key generated") for m in shown), shown


# -------------------------------------------- item 4: generated or loaded


def test_first_run_says_generated_later_runs_say_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("rich")
    from rich.console import Console

    logger = logging.getLogger("test.compat.console.keys")
    private, public = tmp_path / "server_private.pem", tmp_path / "server_public.pem"
    said = []
    for _ in range(2):
        out = io.StringIO()
        server = SecureTCPServer(
            private_key_path=private, public_key_path=public, logger=logger, use_display=True
        )
        assert server.display is not None
        server.display.console = Console(file=out, width=200, color_system=None)
        with caplog.at_level(logging.INFO, logger=logger.name):
            caplog.clear()
            server.initialize()
        said.append((out.getvalue(), caplog.text))
    fp = server.fingerprint
    assert f"✔ Server key generated: {fp} ({private})" in said[0][0]
    assert f"Server key generated: {fp} ({private})" in said[0][1]
    assert f"✔ Server key loaded: {fp} ({private})" in said[1][0]
    assert f"Server key loaded: {fp} ({private})" in said[1][1]
    assert "key generated" not in said[1][0] + said[1][1]


# ------------------------------------ item 5: an install that exists


def test_install_hints_name_installs_that_work() -> None:
    warning = display_mod.RICH_MISSING_WARNING
    assert "pip install rich" in warning
    assert "pip install '.[display]'" in warning
    for module in (display_mod, callcp.compat):
        source = Path(str(module.__file__)).read_text()
        assert not re.search(r"callcp\[\w+\]", source), module.__name__


# ---------------------------- item 6: the default key files' directory


def _serve_from(directory: Path, port: int, monkeypatch: pytest.MonkeyPatch) -> SecureTCPServer:
    monkeypatch.chdir(directory)
    server = SecureTCPServer("127.0.0.1", port, use_display=False)  # default key paths
    server.initialize()
    return server


@contextlib.contextmanager
def started(server: SecureTCPServer) -> Iterator[None]:
    thread = threading.Thread(target=server.start, daemon=True)
    thread.start()
    assert server.ready.wait(WAIT)
    try:
        yield
    finally:
        server.shutdown()
        thread.join(WAIT)


def test_default_key_files_are_the_working_directorys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As documented ("keys in the working directory"): run from another
    directory, the same program on the same port has another key, and a
    client that trusted the first refuses it."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    port = free_port()
    first = _serve_from(a, port, monkeypatch)
    assert (a / "server_private.pem").is_file() and (a / "server_public.pem").is_file()
    client = SecureTCPClient(
        "127.0.0.1", port, use_display=False, known_hosts=tmp_path / "kh", timeout=WAIT
    )
    with started(first):
        client.connect()
        client.disconnect()

    second = _serve_from(b, port, monkeypatch)
    assert (b / "server_private.pem").is_file()
    assert second.fingerprint != first.fingerprint  # one port, two keys
    with started(second), pytest.raises(ServerKeyChanged):
        client.connect()

    # The same directory again: the same key.  The path is resolved when
    # initialize() runs, not when the object is made.
    again = SecureTCPServer("127.0.0.1", port, use_display=False)
    monkeypatch.chdir(a)
    again.initialize()
    assert again.fingerprint == first.fingerprint
