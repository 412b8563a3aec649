"""A Griffe extension for the API reference: callcp's docstrings as mkdocstrings renders them.

callcp's docstrings are Google style ("Args:", "Raises:"), the style the
python handler parses, with a few reStructuredText habits this extension
turns into Markdown before they are rendered (nothing in src/ changes):

- Sphinx roles (:func:`connect`, :meth:`shutdown`, :class:`~callcp.Retry`)
  become cross-references.  The name is resolved the way a reader would:
  in the class, then the module, then callcp's top level.  The link is
  optional: a name that no reference page renders (a private helper) shows
  as code, without a warning; a name that cannot be resolved at all shows
  as code too.
- "text::" before an indented block (a reStructuredText literal block)
  becomes "text:".
- ``#:`` comments right above a module or class attribute (the Sphinx way
  to document a constant, e.g. ``callcp.hsm.PIN_ENV``) become its docstring
  when it has none.
- A reStructuredText definition list ("Files" on a line of its own, its
  text indented below it) becomes a bold term and a paragraph.
- A "Raises:" item with no exception name ("Whatever reading ``source``
  raises ...") is read as ``Exception: ...`` instead of being dropped with a
  warning.

Loaded by mkdocstrings (mkdocs.yml: handlers.python.options.extensions).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterator, List, Optional

import griffe

_ROLE = re.compile(
    r":(?:py:)?(func|meth|class|attr|data|mod|exc|obj|const):`(~?)([^`<>]+?)(?:\(\))?`"
)
_LITERAL = re.compile(r"::\n(\n[ \t]+\S)")
_SECTION = re.compile(r"^(\s*)(Raises|Raise|Exceptions|Except):\s*$")
_ITEM = re.compile(r"^\s*[\w.]+(?:\s*\([^)]*\))?(?:\s*,\s*[\w.]+(?:\s*\([^)]*\))?)*\s*:")


class CallcpDocstrings(griffe.Extension):
    """Rewrite docstrings once the whole package is loaded (names resolve then)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is None and obj.is_attribute:
                text = _comment_doc(obj)
                if text:
                    obj.docstring = griffe.Docstring(text, lineno=obj.lineno, parent=obj)
            if obj.docstring is None:
                continue
            value = obj.docstring.value
            new = _ROLE.sub(functools.partial(_xref, obj), value)
            new = _LITERAL.sub(r":\n\1", new)
            new = _definition_lists(new)
            new = _raises_without_type(new)
            if new != value:
                obj.docstring.value = new


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield from _walk(member)  # type: ignore[arg-type]


def _comment_doc(attr: griffe.Object) -> str:
    """The ``#:`` lines right above an attribute's assignment."""
    path = attr.filepath
    if isinstance(path, list) or path not in attr.lines_collection or not attr.lineno:
        return ""
    lines = attr.lines_collection[path]
    if not lines:
        return ""
    found = []
    index = attr.lineno - 2  # the line above (lines are 1-based)
    while index >= 0 and lines[index].strip().startswith("#:"):
        found.append(lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(reversed(found)).strip()


def _xref(obj: griffe.Object, match: re.Match[str]) -> str:
    role, tilde, name = match.group(1), match.group(2), match.group(3).strip()
    shown = name.rsplit(".", 1)[-1] if tilde else name
    if role in ("func", "meth"):
        shown += "()"
    target = _resolve(obj, name)
    if target is None:
        return f"`{shown}`"
    return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'


def _resolve(obj: griffe.Object, name: str) -> Optional[str]:
    """The path of ``name`` as seen from ``obj``'s docstring, if it exists."""
    root = obj.package
    if name.split(".", 1)[0] == root.name:
        return name if _exists(root, name) else None
    scope: Optional[griffe.Object] = obj if (obj.is_class or obj.is_module) else obj.parent
    while scope is not None:
        candidate = f"{scope.path}.{name}"
        if _exists(root, candidate):
            return candidate
        try:
            resolved = scope.resolve(name.split(".", 1)[0])
        except Exception:  # noqa: BLE001 - griffe's NameResolutionError and friends
            resolved = None
        if resolved:
            rest = name.split(".", 1)[1:] if "." in name else []
            full = ".".join([resolved, *rest])
            if _exists(root, full):
                return full
        scope = scope.parent
    candidate = f"{root.name}.{name}"
    return candidate if _exists(root, candidate) else None


def _exists(root: griffe.Object, path: str) -> bool:
    parts = path.split(".")
    if parts[0] != root.name:
        return path.split(".", 1)[0] in ("cryptography", "asyncio", "logging", "socket")
    try:
        node: Any = root
        for part in parts[1:]:
            node = node.members[part]
        return True
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False


def _raises_without_type(text: str) -> str:
    """In a Raises section, an item that names no exception gets ``Exception:``."""
    out = []
    section: Optional[int] = None  # the section header's indentation, inside one
    item_indent: Optional[int] = None
    for line in text.split("\n"):
        header = _SECTION.match(line)
        if header:
            section, item_indent = len(header.group(1)), None
            out.append(line)
            continue
        if section is not None and line.strip():
            indent = len(line) - len(line.lstrip())
            if indent <= section:
                section = None  # the section ended
            else:
                if item_indent is None:
                    item_indent = indent
                if indent == item_indent and not _ITEM.match(line):
                    stripped = line.strip()
                    line = f"{' ' * indent}Exception: {stripped[0].lower()}{stripped[1:]}"
        out.append(line)
    return "\n".join(out)


def _definition_lists(text: str) -> str:
    """``Term`` alone on a line after a blank one, at the docstring's left
    margin, its definition indented below it: ``**Term**`` and the
    definition as a paragraph of its own.  (Google-style sections and their
    items have a ":", and are left alone.)"""
    lines = text.split("\n")
    out: List[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        term = line.strip()
        indent = len(line) - len(line.lstrip())
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        nxt_indent = len(nxt) - len(nxt.lstrip())
        if (
            term
            and indent == 0
            and ":" not in term
            and len(term) <= 40
            and (i == 0 or not lines[i - 1].strip())
            and nxt.strip()
            and nxt_indent > indent
        ):
            out += [f"{' ' * indent}**{term}**", ""]
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
                body = lines[i]
                out.append(" " * indent + body[nxt_indent:] if body.strip() else "")
                i += 1
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())
