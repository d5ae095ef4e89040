"""mkdocs hooks (``hooks:`` in mkdocs.yml): tables computed from the code at build time, so they have no copy.

- ``<!-- codes-table -->``: every finding code of :data:`lightning_diag.findings.CODES` with its kind in the severity
  policy (:data:`lightning_diag.core.consequences.POLICY`) and its meaning.
- ``<!-- overhead: NAME[; NAME...] -->``: the rows of those configurations (and ``bare``) from each workload's table
  in ``docs/generated/overhead.md`` (written by ``python benchmarks/overhead.py --write-docs``).

An unknown configuration name fails the build (``mkdocs build --strict`` then reports the page).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_OVERHEAD = Path(__file__).parent / "generated" / "overhead.md"
_CODES = re.compile(r"<!-- codes-table -->")
_ROWS = re.compile(r"<!-- overhead: (.+?) -->")


def codes_table() -> str:
    """Code, kind, meaning: one row per code of ``CODES``, in its order."""
    from lightning_diag.core.consequences import POLICY
    from lightning_diag.findings import CODES

    rows = ["| code | kind | meaning |", "|---|---|---|"]
    rows += [f"| `{code}` | {POLICY.get(code, 'certain')} | {meaning} |" for code, meaning in CODES.items()]
    return "\n".join(rows)


def overhead_rows(names: list[str]) -> str:
    """The title, header, ``bare`` row and the named configurations' rows of every workload's table."""
    workloads: list[tuple[str, list[str]]] = []
    for line in _OVERHEAD.read_text(encoding="utf-8").splitlines():
        if line.startswith("**"):
            workloads.append((line, []))
        elif line.startswith("|") and workloads:
            workloads[-1][1].append(line)
    out, seen = [], set()
    for title, table in workloads:
        keep = [row for row in table[2:] if row.split("|")[1].strip() in ("bare", *names)]
        seen |= {row.split("|")[1].strip() for row in keep}
        out.append("\n".join([title, "", *table[:2], *keep]))
    missing = set(names) - seen
    if missing:
        raise ValueError(f"docs/generated/overhead.md has no configuration {sorted(missing)}")
    return "\n\n".join(out)


def on_page_markdown(markdown: str, **_kwargs: Any) -> str:
    markdown = _CODES.sub(lambda _: codes_table(), markdown)
    return _ROWS.sub(lambda m: overhead_rows([n.strip() for n in m.group(1).split(";")]), markdown)
