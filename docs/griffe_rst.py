"""A griffe extension for the API pages: reads our docstrings' reST bits as Markdown, at build time, offline.

The docstrings are written for ``help()``, Sphinx-style roles and ``--doctest-modules``: simple reST tables
(``====  ====`` borders) for the logged metrics, ``:class:`~a.b.C``` roles, and section titles with a remark
(``Logged metrics (at the logging interval):``). mkdocstrings renders Markdown, so this extension rewrites, in the
docstring text griffe hands to the renderer (the source files are not touched):

- a simple reST table into a Markdown table;
- ``:role:`~a.b.C``` into ``C`` and ``:role:`a.b.C``` into ``a.b.C`` as code (no cross-reference: the targets are
  not all on the site, and an unresolved reference fails ``mkdocs build --strict``);
- a section title with a remark (``Logged metrics (at the logging interval):``) into ``Title: Title (remark)``,
  the form griffe's Google parser reads as a titled section;
- a paragraph ending in ``::`` (a reST literal block follows) into one ending in ``:`` (the indented block is a
  code block in Markdown too);
- ``Example:`` into ``Examples:``, the section griffe renders as code (``>>>`` lines and their output); it reads
  the singular as an admonition, whose ``[...]`` output lines would be taken for cross-references.

Used by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)`")
_TITLED = re.compile(
    r"^(\s*)(Logged metrics|Findings|Args|Raises|Returns|Example|Examples|Note|Notes) (\([^)]*\)):\s*$"
)
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$")
_LITERAL = re.compile(r"(\S)::\s*$")
_BORDER = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")


def _role(match: re.Match[str]) -> str:
    short, path = match.groups()
    return f"`{path.rsplit('.', 1)[-1] if short else path}`"


def _columns(border: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", border)]


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    """The row's cells; a cell whose text runs past its column's border ends at the next run of two spaces."""
    starts = [start for start, _ in spans]
    for i in range(1, len(starts)):
        at = max(starts[i], starts[i - 1])
        if 0 < at < len(line) and line[at - 1] != " ":
            gap = line.find("  ", at)
            at = len(line) if gap < 0 else len(line) - len(line[gap:].lstrip(" "))
        starts[i] = at
    return [line[a:b].strip() for a, b in zip(starts, [*starts[1:], len(line)], strict=True)]


def _tables(lines: list[str]) -> list[str]:
    """Simple reST tables (border, header, border, rows, border) as Markdown tables, indentation kept."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        border = _BORDER.match(lines[i])
        if border is None:
            out.append(lines[i])
            i += 1
            continue
        indent, spans = border.group(1), _columns(lines[i])
        header = _cells(lines[i + 1], spans)
        rows: list[list[str]] = []
        j = i + 3  # past the border under the header
        while j < len(lines) and not _BORDER.match(lines[j]):
            cells = _cells(lines[j], spans)
            if rows and not cells[0]:  # a continuation line of the previous row
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
            elif any(cells):
                rows.append(cells)
            j += 1
        out.append(indent + "| " + " | ".join(header) + " |")
        out.append(indent + "|" + "---|" * len(header))
        out.extend(indent + "| " + " | ".join(row) + " |" for row in rows)
        i = j + 1
    return out


def markdown(text: str) -> str:
    """A docstring's reST tables, roles and remarked section titles, as Markdown griffe's Google parser reads."""
    lines = [
        _LITERAL.sub(r"\1:", _EXAMPLE.sub(r"\1Examples:", _TITLED.sub(r"\1\2: \2 \3", line)))
        for line in text.splitlines()
    ]
    return _ROLE.sub(_role, "\n".join(_tables(lines)))


class ReSTToMarkdown(griffe.Extension):
    """Rewrite every docstring of the loaded package with :func:`markdown`."""

    def on_instance(self, *, obj: griffe.Object, **_kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
