"""Runs one documentation page's snippets (tests/test_snippets.py starts it).

``python snippet_runner.py BLOCKS.json`` runs the page's blocks in order, in
this process, with the current directory and ``$HOME`` as the test made
them (fresh and empty):

- ``python`` blocks share one namespace, top to bottom, as a reader who
  pastes them in turn into one interpreter would;
- ``bash`` / ``sh`` / ``console`` blocks run their commands with bash:
  a ``console`` block's lines starting with ``$ `` are commands and the lines
  after one are its expected output (``...`` matches anything; fingerprints,
  ports and timestamps may differ; ``[exit N]`` last means it fails with N);
  a ``bash`` block is one script that must succeed.

The host name ``server.example`` (any port) reaches an echo server this
process runs: this file's directory holds a ``sitecustomize`` that maps the
name for every Python process the snippets start (the ``callcp`` command
included), through ``$CALLCP_SNIPPET_SERVER``.

A block marked ``<!-- run: until-sigterm -->`` serves until a signal: once
it has installed its SIGTERM handler (``serve_forever(handle_signals=True)``
does), this process sends itself SIGTERM, as an operator's ``kill`` would.

Prints one JSON line per block: ``{"line": N, "ok": true}`` or the error.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Dict, List

SERVER_NAME = "server.example"


def _start_echo_server(home: str) -> int:
    import callcp

    def echo(conn: callcp.Connection) -> None:
        # Echo, and close cleanly after a second without a message (so that
        # a snippet's `for message in conn:` ends).
        while True:
            try:
                message = conn.recv(timeout=1.0)
            except callcp.CallcpTimeout:
                return
            conn.send(message)

    key = os.path.join(home, ".snippet-server-key.pem")
    server = callcp.serve(echo, "127.0.0.1", 0, key=key)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port: int = server.port
    return port


def _sigterm_once_handled() -> None:
    """(a thread) SIGTERM to this process once a handler other than the
    default is installed (the snippet's server is serving)."""
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            time.sleep(0.2)  # (let it accept a moment)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.02)


_VARYING = re.compile(
    r"SHA256:[A-Za-z0-9+/]{43}"
    r"|\b\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\b"
    r"|(?<=:)\d{2,5}\b"
    r"|\d+(\.\d+)? ?(s|ms|MiB/s|MB/s)\b"
)


def _norm(text: str) -> str:
    return _VARYING.sub("X", text.rstrip())


def _same(expected: str, actual: str) -> bool:
    """An expected output line matches a printed one: ``...`` matches
    anything, and fingerprints, ports, times and timestamps may differ."""
    expected = re.sub(r"SHA256:\.\.\.", "SHA256:" + "A" * 43, expected)  # (any fingerprint)
    parts = [re.escape(_norm(part)) for part in expected.split("...")]
    return re.fullmatch(".*".join(parts), _norm(actual)) is not None


def _run_console(code: str) -> None:
    commands: List[List[str]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            commands.append([line[2:]])
        elif commands:
            commands[-1].append(line)
    for command, *expected in commands:
        want_exit = 0
        if expected and re.fullmatch(r"\[exit (\d+)\]", expected[-1].strip()):
            want_exit = int(expected.pop()[6:-1])
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
        if done.returncode != want_exit:
            raise AssertionError(
                f"`{command}` exited {done.returncode}, not {want_exit}: "
                f"{(done.stderr or done.stdout).strip()[-600:]}"
            )
        got = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        want = [line for line in expected if line.strip()]
        if want and not _matches(want, got):
            raise AssertionError(
                f"`{command}` printed:\n" + "\n".join(got) + "\nnot:\n" + "\n".join(want)
            )


def _matches(want: List[str], got: List[str]) -> bool:
    """Every expected line matches a printed one, in order."""
    i = 0
    for line in want:
        while i < len(got) and not _same(line, got[i]):
            i += 1
        if i == len(got):
            return False
        i += 1
    return True


def main(path: str) -> int:
    with open(path) as f:
        blocks: List[Dict[str, Any]] = json.load(f)
    os.environ["CALLCP_SNIPPET_SERVER"] = str(_start_echo_server(os.environ["HOME"]))
    namespace: Dict[str, Any] = {"__name__": "__snippet__"}
    for block in blocks:
        result: Dict[str, Any] = {"line": block["line"], "ok": True}
        signal.alarm(90)  # (a block that hangs fails; SIGALRM's default ends this process)
        try:
            if block["lang"] == "python":
                if block.get("until_sigterm"):
                    threading.Thread(target=_sigterm_once_handled, daemon=True).start()
                code = compile(block["code"], f"{block['page']}:{block['line']}", "exec")
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(code, namespace)  # noqa: S102 - the documentation's own code
            elif block["lang"] == "console":
                _run_console(block["code"])
            else:
                subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", block["code"]],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
        except BaseException as exc:  # reported, then the page stops
            detail = traceback.format_exc(limit=-3)
            if isinstance(exc, subprocess.CalledProcessError):
                detail = f"exit {exc.returncode}: {(exc.stderr or exc.stdout)[-600:]}"
            result = {"line": block["line"], "ok": False, "error": detail}
        signal.alarm(0)
        print(json.dumps(result), flush=True)
        if not result["ok"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
