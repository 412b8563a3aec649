"""MkDocs hook: the CLI reference, generated from the argparse parser.

docs/cli.md holds the marker ``<!-- callcp-cli-reference -->``; at build
time it is replaced by the ``--help`` of ``callcp`` and of every
subcommand (nested ones too: ``callcp known-hosts add``), exactly as
``callcp.cli.build_parser()`` prints it.  The page cannot drift from the
command: there is nothing to keep in step by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterator, List, Tuple

MARKER = "<!-- callcp-cli-reference -->"
#: The help is wrapped for this terminal width, whatever the build machine's.
COLUMNS = "78"


def on_config(config: Any, **kwargs: Any) -> Any:
    # The checkout's code, as mkdocstrings reads it (paths: [src]).
    src = str(Path(config["config_file_path"]).resolve().parent / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    return config


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())


def render() -> str:
    """The reference: a table of the commands, then each one's --help."""
    from callcp.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    try:
        parser = build_parser()
        commands = list(_walk(parser, ["callcp"]))
        parts: List[str] = ["| command | what it does |", "| --- | --- |"]
        for words, _, summary in commands:
            name = " ".join(words)
            parts.append(f"| [`{name}`](#{_slug(name)}) | {summary} |")
        for words, sub, _ in commands:
            name = " ".join(words)
            level = "#" * min(len(words) + 1, 4)
            parts += ["", f"{level} `{name}` {{ #{_slug(name)} }}", "", "```text"]
            parts.append(sub.format_help().rstrip())
            parts.append("```")
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(parts) + "\n"


def _walk(
    parser: argparse.ArgumentParser, words: List[str], summary: str = ""
) -> Iterator[Tuple[List[str], argparse.ArgumentParser, str]]:
    """(words, parser, one-line help) for the parser and its subcommands, depth first."""
    yield words, parser, summary or (parser.description or "").split("\n")[0]
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
        seen = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # (an alias of a command already listed)
                continue
            seen.add(id(sub))
            yield from _walk(sub, [*words, name], helps.get(name, ""))


def _slug(name: str) -> str:
    return name.replace(" ", "-")
