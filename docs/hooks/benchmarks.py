"""MkDocs hook: the Benchmarks page shows the committed results, never a copy.

- The chart ``benchmarks/results/latest.png`` (outside docs/) is added to
  the site at build time as ``assets/benchmarks/latest.png``: it is not
  duplicated in git, and a new ``make bench BENCH_ARGS=--save`` shows up in
  the next build.
- docs/benchmarks.md holds the marker ``<!-- readme:performance -->``,
  replaced by the README's "Performance" section (the figures of the
  latest run), with the README's repository links turned into plain code
  and its image dropped (the page shows the chart itself).  A README
  without that section fails the build.
- The marker ``<!-- benchmarks:machine -->`` is replaced by the table of
  ``benchmarks/results/machine.md``, the machine behind the chart.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

CHART = Path("benchmarks/results/latest.png")
MACHINE = Path("benchmarks/results/machine.md")
MACHINE_MARKER = "<!-- benchmarks:machine -->"
CHART_URI = "assets/benchmarks/latest.png"
MARKER = "<!-- readme:performance -->"
SECTION = "## Performance"

_IMAGE = re.compile(r"^!\[[^\]]*\]\([^)]*\)\s*$", re.MULTILINE)
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)]+)\)")


def _root(config: Any) -> Path:
    return Path(config["config_file_path"]).resolve().parent


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    chart = _root(config) / CHART
    if not chart.is_file():
        raise PluginError(f"benchmarks hook: {CHART} is missing (the Benchmarks page shows it)")
    files.append(File.generated(config, CHART_URI, abs_src_path=str(chart)))
    return files


def on_serve(server: Any, config: Any, **kwargs: Any) -> Any:
    root = _root(config)
    server.watch(str(root / CHART))
    server.watch(str(root / "README.md"))
    server.watch(str(root / MACHINE))
    return server


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    root = _root(config)
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, performance_section(root / "README.md"))
    if MACHINE_MARKER in markdown:
        markdown = markdown.replace(MACHINE_MARKER, machine_table(root / MACHINE))
    return markdown


def machine_table(path: Path) -> str:
    """machine.md without its title: the table of the machine and the run."""
    if not path.is_file():
        raise PluginError(f"benchmarks hook: {MACHINE} is missing")
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(line for line in lines if not line.startswith("# ")).strip() + "\n"


def performance_section(readme: Path) -> str:
    """The body of the README's Performance section, made fit for this site."""
    text = readme.read_text(encoding="utf-8")
    start = text.find(f"\n{SECTION}\n")
    if start < 0:
        raise PluginError(f"benchmarks hook: README.md has no '{SECTION}' section")
    body = text[start + len(SECTION) + 2 :]
    end = body.find("\n## ")
    body = body[:end] if end >= 0 else body
    body = _IMAGE.sub("", body)

    def link(match: re.Match[str]) -> str:
        label, target = match.group(1), match.group(2)
        if target.startswith(("http://", "https://")):
            return match.group(0)
        return label if target.startswith("#") else f"`{label.strip('`')}`"

    return _LINK.sub(link, body).strip() + "\n"
