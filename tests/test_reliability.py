"""The reliability matrix of ``benchmarks/reliability.py`` as tests: one test per cell, the same cell definitions.

Pattern cells: every callback x legal Lightning pattern on a real tiny Trainer works (or declines cleanly).
Resume cells: every callback alone, a bare run and the whole suite, resumed mid-epoch and at an epoch boundary,
with no fault, a skip or a rollback before the checkpoint, equal the uninterrupted run bit for bit.
Argument cells: bad constructor arguments are refused with a ``ValueError`` + ``MisconfigurationException`` that
names them; good ones are accepted silently. Containment cells: a bug in any hook of any callback is contained.
The support matrix (docs/generated/support_matrix.md, and the README while it holds a copy) must say, for each
pattern cell, what the cell does (works or declines).

Cells listed in ``KNOWN_FAILURES`` are expected to fail (strict xfail: fixing one makes its test fail until it is
removed from the list, so the list stays true).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    name = "reliability"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", "reliability.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


reliability = _load()

#: Cells that still fail on this branch (see the module docstring).
KNOWN_FAILURES: frozenset[str] = frozenset()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return str(tmp_path_factory.mktemp("reliability"))


def _params(part: str) -> list:
    return [
        pytest.param(
            cell,
            id=cell.name,
            marks=[pytest.mark.xfail(strict=True, reason="known failure")]
            if cell.name in KNOWN_FAILURES
            else [],
        )
        for cell in reliability.PARTS[part][0]()
    ]


#: the support matrix's one copy (``--write-docs``), and the README while it still holds one
MATRICES = [Path(reliability.DOCS_TABLE).read_text(encoding="utf-8")]
_README = Path(ROOT, "README.md").read_text(encoding="utf-8")
if "| pattern | GradNormMonitor" in _README:
    MATRICES.append(_README)


def _matrix_symbols(cell) -> list[str]:
    """Each copy of the support matrix's entry for a pattern cell."""
    symbols = []
    for text in MATRICES:
        header = next(line for line in text.splitlines() if line.startswith("| pattern | GradNormMonitor"))
        columns = [c.strip() for c in header.strip("|").split("|")]
        title = reliability.PATTERN_TITLES[cell.pattern]
        row = next(line for line in text.splitlines() if line.startswith(f"| {title} |"))
        symbols.append([c.strip() for c in row.strip("|").split("|")][columns.index(cell.callback)])
    return symbols


@pytest.mark.parametrize("cell", _params("pattern"))
def test_pattern(cell, scratch) -> None:
    problems = reliability.check(cell, scratch)
    assert problems == []
    expected = reliability.SYMBOLS[reliability.cell_status(cell.name, problems)]
    assert _matrix_symbols(cell) == [expected] * len(MATRICES)


@pytest.mark.parametrize("cell", _params("resume"))
def test_resume(cell, scratch) -> None:
    assert reliability.check(cell, scratch) == []


@pytest.mark.parametrize("cell", _params("args"))
def test_arguments(cell, scratch) -> None:
    assert reliability.check(cell, scratch) == []


@pytest.mark.parametrize("cell", _params("contain"))
def test_containment(cell, scratch) -> None:
    assert reliability.check(cell, scratch) == []


def test_the_harness_sees_a_broken_resume(scratch) -> None:
    """The resume check can fail: a loader that restarts the epoch on resume is caught (bare run, mid-epoch)."""
    original = reliability.ResumableLoader.load_state_dict
    try:
        reliability.ResumableLoader.load_state_dict = lambda self, state: None
        reliability._STRAIGHT.clear()
        cell = reliability.Cell("resume", "resume-bare-mid-none-broken", "bare", "mid", "none")
        problems = reliability.check(cell, scratch)
    finally:
        reliability.ResumableLoader.load_state_dict = original
        reliability._STRAIGHT.clear()
    assert any("same batches" in p for p in problems)
    assert any("weights" in p for p in problems)


def test_support_matrix_lists_every_callback_and_pattern() -> None:
    results = {cell.name: [] for cell in reliability.pattern_cells()}
    results["GradClip-complex"] = ["broken"]
    table = reliability.support_matrix(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(reliability.PATTERNS)
    assert all(name in lines[0] for name in reliability.CALLBACKS)
    complex_row = next(line for line in lines if line.startswith("| complex parameters"))
    assert complex_row.count("✗") == 1 and complex_row.count("✓") == len(reliability.CALLBACKS) - 1
