"""The deployment guide's configurations are valid for the tools that read them.

docs/guides/deployment.md gives an HAProxy configuration (```haproxy), a
systemd unit (```ini) and Kubernetes objects (```yaml).  tests/test_snippets.py
runs the page's Python and shell blocks but not these; here:

- each ``haproxy`` block passes the real HAProxy's own check (``haproxy -c``),
  has the directives that the live test (tests/test_haproxy.py, its CONFIG in
  tests/haproxy_support.py) proves with three backends, and keeps HAProxy's
  idle timeouts above the servers' ``idle_timeout``;
- each ``yaml`` block parses;
- every ``callcp serve`` command line in the unit and the YAML uses options
  that ``callcp serve`` has.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator, List

import pytest

import callcp
import callcp.cli
from tests.haproxy_support import CONFIG as LIVE_CONFIG
from tests.test_snippets import Block, blocks_of

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guides" / "deployment.md"

#: What tests/test_haproxy.py proves with a real HAProxy in front of three
#: callcp servers: the guide's configuration must say each of them.
PROVEN = (
    "mode tcp",
    "option tcp-check",
    "tcp-check connect default",
    "tcp-check expect binary 43414c4c4350",  # "CALLCP", the ServerHello's magic
    "send-proxy-v2",
    "check-send-proxy",
    "retries 3",
    "option redispatch 1",
)


def blocks(lang: str) -> List[Block]:
    found = [b for b in blocks_of(GUIDE) if b.lang == lang]
    assert found, f"{GUIDE.relative_to(ROOT)} has no ```{lang} block"
    return found


def directives(config: str) -> List[str]:
    """The configuration's lines, without comments and extra blanks."""
    lines = (re.sub(r"\s+", " ", line.split("#", 1)[0]).strip() for line in config.splitlines())
    return [line for line in lines if line]


def haproxy_seconds(value: str) -> float:
    """An HAProxy time ("330s", "2m", "500ms"; a bare number is ms)."""
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, f"not an HAProxy time: {value!r}"
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    return int(match[1]) * unit[match[2] or "ms"]


def test_the_live_test_proves_what_the_guide_relies_on() -> None:
    """(If tests/haproxy_support.py's CONFIG changes, this says which
    directive the guide would then claim without proof.)"""
    live = " ".join(directives(LIVE_CONFIG))
    assert [d for d in PROVEN if d not in live] == []


def test_haproxy_blocks_pass_haproxys_own_check(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
    )
    if haproxy is None:
        pytest.fail(
            "HAProxy is not installed, and the guide's configuration must be checked by it: "
            "run scripts/system-deps.sh (Debian/Ubuntu: apt-get install haproxy)"
        )
    for block in blocks("haproxy"):
        config = tmp_path / f"line{block.line}.cfg"
        config.write_text(block.code)
        done = subprocess.run(
            [haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (
            f"{block.page}:{block.line}: haproxy -c exited {done.returncode}:\n"
            f"{(done.stdout + done.stderr).strip()}"
        )


@pytest.mark.parametrize("directive", PROVEN)
def test_haproxy_blocks_have_the_proven_directives(directive: str) -> None:
    for block in blocks("haproxy"):
        text = " ".join(directives(block.code))
        assert re.search(rf"(^| ){re.escape(directive)}( |$)", text), (
            f"{block.page}:{block.line}: the HAProxy configuration lacks {directive!r}, "
            "which tests/test_haproxy.py proves"
        )


def test_haproxy_idle_timeouts_outlast_the_servers_idle_timeout() -> None:
    """HAProxy must not cut a connection callcp still keeps: its timeout
    client / server exceed the default idle_timeout (300 s)."""
    idle = callcp.ServerOptions().idle_timeout
    assert idle is not None
    for block in blocks("haproxy"):
        timeouts = {
            parts[1]: haproxy_seconds(parts[2])
            for parts in (line.split() for line in directives(block.code))
            if parts[0] == "timeout" and len(parts) == 3
        }
        for side in ("client", "server"):
            assert side in timeouts, f"{block.page}:{block.line}: no 'timeout {side}'"
            assert timeouts[side] > idle, (
                f"{block.page}:{block.line}: timeout {side} {timeouts[side]:g} s is not "
                f"longer than the servers' idle_timeout ({idle:g} s)"
            )


def test_yaml_blocks_parse() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with the docs tools (Python 3.11+)")
    for block in blocks("yaml"):
        try:
            documents = [d for d in yaml.safe_load_all(block.code) if d is not None]
        except yaml.YAMLError as exc:
            pytest.fail(f"{block.page}:{block.line}: not valid YAML: {exc}")
        assert documents, f"{block.page}:{block.line}: an empty YAML block"
        for document in documents:
            assert {"apiVersion", "kind"} <= set(document), (
                f"{block.page}:{block.line}: a Kubernetes object needs apiVersion and kind"
            )


def _containers(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        if "image" in node and ("command" in node or "args" in node):
            yield node
        for value in node.values():
            yield from _containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _containers(value)


def serve_command_lines() -> List[List[str]]:
    """Every ``callcp serve`` command line of the guide's unit and YAML, as
    the arguments after ``callcp``."""
    found = []
    for block in blocks("ini"):
        joined = block.code.replace("\\\n", " ")
        for line in joined.splitlines():
            if line.startswith("ExecStart="):
                found.append(shlex.split(line[len("ExecStart=") :]))
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with the docs tools (Python 3.11+)")
    for block in blocks("yaml"):
        for document in yaml.safe_load_all(block.code):
            for container in _containers(document):
                found.append([*container.get("command", []), *container.get("args", [])])
    commands = []
    for words in found:
        assert words and Path(words[0]).name == "callcp", words
        commands.append([str(word) for word in words[1:]])
    return commands


def test_serve_command_lines_use_real_options() -> None:
    commands = serve_command_lines()
    assert len(commands) >= 2 and all(c[0] == "serve" for c in commands), commands
    parser = callcp.cli.build_parser()
    for words in commands:
        try:
            args = parser.parse_args(words)
        except SystemExit:
            pytest.fail(f"`callcp {' '.join(words)}`: callcp serve refuses these arguments")
        assert args.proxy_protocol and args.trusted_proxy and args.ticket_key, words
