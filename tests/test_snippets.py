"""Every snippet of README.md and docs/ runs: the docs cannot drift from the code.

Fenced blocks tagged ``python``, ``console``, ``bash`` or ``sh`` are
executed (tests/snippet_runner.py says how: one namespace per page, a fresh
directory and HOME, ``server.example`` reaching an echo server); blocks with
another tag, or none, are text.  A block is left out only by the line
``<!-- skip: REASON -->`` right before it, and the reason is required.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "snippet_runner.py"
SITE = Path(__file__).resolve().parent / "snippet_site"
EXECUTED = ("python", "console", "bash", "sh")
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(skip|run):\s*(.*?)\s*-->$")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip: Optional[str] = None
    until_sigterm: bool = False


def pages() -> List[Path]:
    found = [ROOT / "README.md"]
    found += sorted(p for p in (ROOT / "docs").rglob("*.md") if "hooks" not in p.parts)
    return found


def blocks_of(path: Path) -> List[Block]:
    """The fenced blocks of a Markdown page (at the start of a line), with
    the marker on the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: List[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        start, lang = i, opening[1].lower()
        i += 1
        body: List[str] = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1  # (the closing fence)
        block = Block(str(path.relative_to(ROOT)), start + 1, lang, "\n".join(body) + "\n")
        marker = MARKER.match(lines[start - 1].strip()) if start > 0 else None
        if marker is not None and marker[1] == "skip":
            block.skip = marker[2]
        elif marker is not None and marker[2] == "until-sigterm":
            block.until_sigterm = True
        found.append(block)
    return found


def executed(path: Path) -> List[Block]:
    return [b for b in blocks_of(path) if b.lang in EXECUTED and b.skip is None]


RUNNABLE = [p for p in pages() if executed(p)]


def test_every_skip_has_a_reason_and_markers_are_known() -> None:
    bad: List[str] = []
    for path in pages():
        for block in blocks_of(path):
            if block.skip is not None and len(block.skip) < 10:
                bad.append(f"{block.page}:{block.line}: skip needs a real reason")
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"<!--\s*(skip|run):\s*(.*?)\s*-->", text):
            if match[1] == "run" and match[2] != "until-sigterm":
                bad.append(f"{path.name}: unknown marker {match[0]!r}")
    assert not bad, bad


def test_the_docs_have_snippets_to_run() -> None:
    """(So that a broken extraction cannot pass by running nothing.)"""
    counts: Dict[str, int] = {p.name: len(executed(p)) for p in pages()}
    assert counts["README.md"] >= 8, counts
    assert sum(counts.values()) >= 10, counts


def test_skipped_examples_are_the_ones_run_elsewhere() -> None:
    """A block skipped because another test runs it "as tests/callcp1_examples/
    NAME" must be that file's text, so what is run is what the reader sees."""
    checked = 0
    for path in pages():
        for block in blocks_of(path):
            named = re.search(r"tests/callcp1_examples/(\S+\.py)", block.skip or "")
            if named is None:
                continue
            example = (ROOT / "tests" / "callcp1_examples" / named[1]).read_text()
            code = block.code
            if block.lang == "bash":  # (python -c "..." in the README)
                code = re.fullmatch(r'python -c "(.*)"\n', code, re.S)[1] + "\n"  # type: ignore[index]
            assert code == example, f"{block.page}:{block.line} differs from {named[1]}"
            checked += 1
    assert checked >= 6


@contextlib.contextmanager
def port_8436_lock() -> Iterator[None]:
    """Pages whose servers listen on a fixed port (8436, 8437) run one at a
    time on this machine, under tests/test_compat.py's lock for Server.py."""
    path = os.path.join(tempfile.gettempdir(), "callcp-tests-port-8436.lock")
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_page_snippets_run(page: Path, tmp_path: Path) -> None:
    blocks = executed(page)
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([b.__dict__ for b in blocks]))
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CALLCP_", "SOFTHSM2_", "PYTEST_", "COV_"))
    }
    env.update(
        HOME=str(home),
        PYTHONPATH=str(SITE),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        COLUMNS="100",
    )
    fixed_port = any(re.search(r"\b843[67]\b", b.code) for b in blocks)
    with port_8436_lock() if fixed_port else contextlib.nullcontext():
        done = subprocess.run(
            [sys.executable, str(RUNNER), str(spec)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=280,
        )
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if not r["ok"]]
    assert not failed, f"{page.name}:{failed[0]['line']}: {failed[0]['error']}"
    assert done.returncode == 0 and len(results) == len(blocks), (
        f"{page.name}: ran {len(results)} of {len(blocks)} blocks; stderr: {done.stderr[-2000:]}"
    )
