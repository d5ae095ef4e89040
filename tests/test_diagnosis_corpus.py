"""The diagnosis corpus: its shape, the runner's scores, the fast subset at the issue's targets, the docs' tables."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.diagnosis import run as runner  # noqa: E402
from lightning_diag.findings import CODES  # noqa: E402

#: codes planned by the silent-bug work (DESIGN.md section 3) that corpus labels may already name
PLANNED = {"optimizer_no_op", "stale_gradients", "wrong_mode", "replica_divergence", "repeated_data"}


def test_corpus_has_the_size_and_coverage_the_issue_asks_for() -> None:
    scenarios = runner.load_scenarios()
    failures = [s for s in scenarios if s.kind == "failure"]
    healthy = [s for s in scenarios if s.kind == "healthy"]
    assert len(failures) >= 45 and len(healthy) >= 25
    for s in scenarios:
        assert s.description and s.kind in ("failure", "healthy")
        assert bool(s.expected) == (s.kind == "failure"), s.name
        assert set(s.expected) <= set(CODES) | PLANNED, s.name
    fast = [s for s in scenarios if s.fast]
    assert len(fast) >= 12
    fast_codes = {c for s in fast for c in s.expected}
    assert len(fast_codes) >= 10 and any(s.kind == "healthy" for s in fast)


def _result(
    name: str, kind: str, seed: int, expected: tuple[str, ...], found: list[str], **kw
) -> runner.Result:
    return runner.Result(
        name,
        kind,
        seed,
        list(expected),
        found,
        [],
        kw.pop("primary", None),
        kw.pop("status", "finished"),
        None,
        1.0,
        **kw,
    )


def test_scores_count_what_the_issue_defines() -> None:
    results = [
        _result(
            "a", "failure", 0, ("overfitting",), ["overfitting", "dataloader_bound"], primary="overfitting"
        ),
        _result("b", "failure", 0, ("divergence",), ["non_finite_loss"], linked=[]),
        _result(
            "c",
            "failure",
            0,
            ("non_finite_input",),
            ["non_finite_input", "non_finite_loss"],
            linked=["non_finite_loss"],
        ),
        _result("d", "healthy", 0, (), ["exploding_gradients"], primary="exploding_gradients"),
        _result("e", "healthy", 0, (), []),
        _result("f", "healthy", 0, (), [], status="crashed"),
    ]
    s = runner.score(results)
    assert (s["detected"], s["failures"]) == (2, 3)
    assert s["false_alarms"] == 1 and s["false_alarm_rate"] == pytest.approx(1 / 3)
    assert (
        s["unexpected"] == 2
    )  # dataloader_bound on "a", non_finite_loss on "b"; the linked symptom of "c" is not
    assert s["linked"] == 1 and s["crashes"] == 1
    assert s["primary_ok"] == 3  # a, e, f
    assert not runner.meets_targets(s)
    table = runner.confusion(results)
    assert table["overfitting"] == {"expected": 1, "hit": 1, "noise": 0, "false_alarm": 0}
    assert table["exploding_gradients"]["false_alarm"] == 1 and table["divergence"]["hit"] == 0


@pytest.mark.slow
def test_fast_subset_meets_the_targets() -> None:
    scenarios = runner.load_scenarios(fast=True)
    results = [runner.run_one(s, seed=0) for s in scenarios]
    s = runner.score(results)
    misses = [
        f"{r.name}: found {r.found}, unexpected {r.unexpected}, {r.status} {r.error or ''}"
        for r in results
        if not r.ok or r.unexpected
    ]
    assert runner.meets_targets(s), (s, misses)


@pytest.mark.slow
def test_an_isolated_scenario_runs_in_a_fresh_process_with_the_same_result() -> None:
    memory = [s for s in runner.load_scenarios() if s.name.startswith("memory_")]
    assert memory and all(s.isolated for s in memory)  # they read the RSS: a fresh process each
    scenario = runner.load_scenarios(["kaiming_relu_mlp"])[0]
    here, child = runner.run_scenario(scenario, seed=0), runner.run_isolated(scenario, seed=0)
    assert child.status == here.status == "finished"
    # (info findings are left out: the throughput ones depend on how busy the machine is at that moment)
    assert (child.found, child.primary, child.kind, child.seed) == (here.found, here.primary, "healthy", 0)
    assert child.seconds > 0 and child.error is None


def _blocks() -> list[str]:
    """The runner's tables where they are written: ``docs/generated/corpus.md`` (``--write-docs``), and the README
    while it still holds a copy between its diagnosis-corpus markers."""
    generated = Path(runner.DOCS_TABLE).read_text(encoding="utf-8")
    assert generated.startswith("<!-- ") and "--write-docs" in generated.splitlines()[0]
    blocks = ["\n".join(generated.splitlines()[1:])]
    readme = Path(ROOT, "README.md").read_text(encoding="utf-8")
    found = re.search(
        r"<!-- diagnosis-corpus:start -->\n(.*?)\n<!-- diagnosis-corpus:end -->", readme, flags=re.S
    )
    return blocks + ([found.group(1)] if found else [])


@pytest.mark.parametrize("copy", [0, 1], ids=["docs", "readme"])
def test_docs_table_is_the_runners_output(copy: int) -> None:
    blocks = _blocks()
    if copy >= len(blocks):
        pytest.skip("the README no longer holds a copy of the corpus tables")
    block = blocks[copy]
    fresh = runner.markdown(
        [_result("a", "failure", 0, ("overfitting",), ["overfitting"]), _result("b", "healthy", 0, (), [])]
    )
    seeds_part, codes_part = block.split("\n\n")
    fresh_seeds, fresh_codes = fresh.split("\n\n")
    assert seeds_part.splitlines()[:2] == fresh_seeds.splitlines()[:2]  # same header
    assert codes_part.splitlines()[:2] == fresh_codes.splitlines()[:2]
    seed_row = re.compile(
        r"\| (\d+) \| \d+ \| \d+% \(\d+/\d+\) \| \d+ \| \d+% \(\d+/\d+\) \| \d+\.\d\d \(\d+\) \| \d+/\d+ \| \d+ \| \d+ s \|"
    )
    seeds = [int(seed_row.fullmatch(line).group(1)) for line in seeds_part.splitlines()[2:]]  # type: ignore[union-attr]
    assert seeds == [0, 1, 2]
    code_row = re.compile(r"\| `([a-z_]+)` \| \d+ \| \d+ \| \d+ \| \d+ \|")
    codes = [code_row.fullmatch(line).group(1) for line in codes_part.splitlines()[2:]]  # type: ignore[union-attr]
    assert codes == sorted(codes) and set(codes) <= set(CODES) | PLANNED
