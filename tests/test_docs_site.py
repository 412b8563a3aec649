"""The documentation site: a reference entry and a docstring for every public
name, and a strict build (``mkdocs build --strict``) that succeeds.

Public names are those in the ``__all__`` of ``callcp`` and of its public
modules (``src/callcp/*.py`` whose name does not start with ``_``).  A name
has a reference entry when a ``::: path`` directive of a page under docs/
renders it: its own path, another public path of the same object
(``::: callcp.connect`` documents ``callcp.sync.connect``), or its module's
directive when that one renders members.  Methods and properties are
documented under their class's directive.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest

import callcp

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: Public members that have no docstring yet (src/ is not this test's to
#: edit).  Each entry must really be missing: once a docstring is added,
#: the test fails until the entry is removed here, so this list only shrinks.
KNOWN_MISSING: frozenset = frozenset()


# ---------------------------------------------------------------- public names


def public_modules() -> List[str]:
    names = ["callcp"]
    for info in pkgutil.iter_modules(callcp.__path__):
        if not info.name.startswith("_"):
            names.append(f"callcp.{info.name}")
    return [name for name in names if hasattr(importlib.import_module(name), "__all__")]


def public_names() -> Iterator[Tuple[str, str, Any]]:
    """(module, name, object) for every name in a public module's __all__."""
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in module.__all__:
            yield module_name, name, getattr(module, name)


def test_public_modules_are_found() -> None:
    modules = public_modules()
    for expected in ("callcp", "callcp.aio", "callcp.hsm", "callcp.keys", "callcp.trust"):
        assert expected in modules
    assert not [m for m in modules if m.rsplit(".", 1)[-1].startswith("_")]


# ---------------------------------------------------------------- (a) entries

_DIRECTIVE = re.compile(r"^::: ([\w.]+)[ \t]*$")


def directives() -> List[Tuple[str, Dict[str, Any], str]]:
    """(path, options, page) for every ``::: path`` in the docs pages."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        if "hooks" in page.relative_to(DOCS).parts:
            continue
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            match = _DIRECTIVE.match(line)
            if match:
                found.append((match.group(1), _options(lines[i + 1 :]), str(page)))
    return found


def _options(rest: List[str]) -> Dict[str, Any]:
    """The directive's YAML block (indented lines right after it), the part
    this test needs: ``members: false`` or ``members: [a, b]``."""
    block = []
    for line in rest:
        if not line.startswith("    "):
            break
        block.append(line)
    text = "\n".join(block)
    match = re.search(r"^\s+members:\s*(.+)$", text, re.MULTILINE)
    if not match:
        return {}
    value = match.group(1).strip()
    if value.lower() == "false":
        return {"members": False}
    if value.startswith("["):
        return {"members": [v.strip() for v in value.strip("[]").split(",") if v.strip()]}
    items = re.findall(r"^\s+- (\w+)\s*$", text[match.end() :], re.MULTILINE)
    return {"members": items}


def resolve(path: str) -> Any:
    """The object a directive path names (ImportError/AttributeError if none)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(path)


def _identity_checkable(obj: Any) -> bool:
    return inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)


def test_every_directive_names_an_object() -> None:
    broken = []
    for path, _, page in directives():
        try:
            resolve(path)
        except (ImportError, AttributeError) as exc:
            broken.append(f"{page}: ::: {path} ({exc})")
    assert not broken, "directives naming nothing:\n" + "\n".join(broken)


def test_every_public_name_has_a_reference_entry() -> None:
    found = directives()
    paths = {path for path, _, _ in found}
    objects = []
    module_members: Dict[str, Optional[Set[str]]] = {}  # module path -> rendered names
    for path, options, _ in found:
        try:
            obj = resolve(path)
        except (ImportError, AttributeError):
            continue  # (test_every_directive_names_an_object reports it)
        if _identity_checkable(obj):
            objects.append(obj)
        if inspect.ismodule(obj):
            members = options.get("members", True)
            if members is False:
                continue
            rendered = set(members) if isinstance(members, list) else None  # None: all
            module_members[path] = rendered
    missing = []
    for module, name, obj in public_names():
        full = f"{module}.{name}"
        if full in paths:
            continue
        if _identity_checkable(obj) and any(obj is other for other in objects):
            continue
        if module in module_members:
            rendered = module_members[module]
            if rendered is None or name in rendered:
                continue
        missing.append(full)
    assert not missing, (
        "public names with no entry in the API reference (add a '::: path' "
        "directive to a page under docs/reference/):\n" + "\n".join(missing)
    )


def test_class_directives_render_their_members() -> None:
    restricted = []
    for path, options, page in directives():
        try:
            obj = resolve(path)
        except (ImportError, AttributeError):
            continue  # (test_every_directive_names_an_object reports it)
        if inspect.isclass(obj) and "members" in options:
            restricted.append(f"{page}: ::: {path}")
    assert not restricted, "class directives must render every public member:\n" + "\n".join(
        restricted
    )


# ---------------------------------------------------------------- (b) docstrings


def _has_doc(obj: Any) -> bool:
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return bool(doc and doc.strip())


def public_members(cls: type) -> Iterator[Tuple[str, Any]]:
    """(name, function or property) of a class's public methods and
    properties, inherited ones included where callcp defines them (a
    builtin base's, such as Exception's, are not callcp's to document)."""
    for name in dir(cls):
        if name.startswith("_"):
            continue
        owner = next((base for base in cls.__mro__ if name in base.__dict__), None)
        if owner is None or not owner.__module__.startswith("callcp"):
            continue
        raw = owner.__dict__[name]
        if isinstance(raw, property):
            yield name, raw.fget
        elif isinstance(raw, (classmethod, staticmethod)):
            yield name, raw.__func__
        elif inspect.isfunction(raw):
            yield name, raw


def missing_docstrings() -> Set[str]:
    missing: Set[str] = set()
    seen: Set[int] = set()
    for module, name, obj in public_names():
        full = f"{module}.{name}"
        if not _identity_checkable(obj):
            continue  # constants: documented by a #: comment and their page
        if not _has_doc(obj):
            missing.add(full)
        if inspect.isclass(obj) and id(obj) not in seen:
            seen.add(id(obj))
            for member, func in public_members(obj):
                if func is None or not (func.__doc__ or "").strip():
                    missing.add(f"{full}.{member}")
    return missing


def _same_object_paths(path: str) -> Set[str]:
    """Every public path of the object ``path`` names, with the member part."""
    parts = path.split(".")
    out = {path}
    for module, name, obj in public_names():
        if not inspect.isclass(obj):
            continue
        for cut in range(1, len(parts)):
            head = ".".join(parts[:cut])
            try:
                if resolve(head) is obj:
                    out.add(".".join([module, name, *parts[cut:]]))
            except (ImportError, AttributeError):
                pass
    return out


def test_every_public_name_has_a_docstring() -> None:
    missing = missing_docstrings()
    known: Set[str] = set()
    for entry in KNOWN_MISSING:
        known |= _same_object_paths(entry)
    new = sorted(missing - known)
    assert not new, "public names without a docstring:\n" + "\n".join(new)


def test_known_missing_docstrings_are_still_missing() -> None:
    missing = missing_docstrings()
    fixed = sorted(entry for entry in KNOWN_MISSING if entry not in missing)
    assert not fixed, (
        "these now have a docstring: remove them from KNOWN_MISSING in "
        "tests/test_docs_site.py:\n" + "\n".join(fixed)
    )


# ---------------------------------------------------------------- (c) the build


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="the docs tools (mkdocs, mkdocstrings) need Python 3.11+"
)
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean"]
        + ["--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output

    # Every directive rendered its object, under the path it was given.
    pages = {p: p.read_text(encoding="utf-8") for p in site.rglob("index.html")}
    everything = "\n".join(pages.values())
    unrendered = [path for path, _, _ in directives() if f'id="{path}"' not in everything]
    assert not unrendered, "directives with no anchor in the built site: " + ", ".join(unrendered)

    # The CLI reference shows every subcommand's --help, generated from the parser.
    from callcp.cli import build_parser

    cli = (site / "cli" / "index.html").read_text(encoding="utf-8")
    assert "callcp-cli-reference" not in cli
    for action in build_parser()._subparsers._group_actions:  # type: ignore[union-attr]
        for name in action.choices:  # type: ignore[union-attr]
            assert f"usage: callcp {name}" in cli, name

    # The benchmarks page: the committed chart, copied in; the README's figures.
    chart = site / "assets" / "benchmarks" / "latest.png"
    assert chart.read_bytes() == (ROOT / "benchmarks/results/latest.png").read_bytes()
    bench = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert "readme:performance" not in bench and "callcp/ssl" in bench
