"""HangWatchdog's rules without a Trainer: budgets, the hang finding's words, the rank behind, uneven batches,
stragglers and step-time outliers, as tables."""

from __future__ import annotations

import math
import random

import pytest

from lightning_diag.core.hangs import (
    PHASES,
    BudgetSettings,
    HangEvent,
    PhaseBudgets,
    RankBeat,
    StepOutliers,
    StragglerRule,
    rank_behind,
    training_hang,
    uneven_batches,
)
from lightning_diag.findings import CODES

S = BudgetSettings(safety_factor=5.0, min_timeout_s=10.0, max_timeout_s=100.0, first_step_timeout_s=300.0)


@pytest.mark.parametrize(
    ("settings", "warm", "seen", "phase", "expected", "words"),
    [
        (S, False, {"step": 1.0}, "step", 300.0, "first training batch had not completed"),
        (S, True, {}, "step", 300.0, "had not been seen yet"),
        (S, True, {"step": 1.0}, "step", 10.0, "5 x the longest `training step`"),  # clamped up to min
        (S, True, {"step": 4.0}, "step", 20.0, "5 x the longest"),
        (S, True, {"step": 4.0, "backward": 1.0}, "step", 20.0, ""),  # per phase
        (S, True, {"step": 60.0}, "step", 100.0, "`max_timeout_s`=100"),  # clamped down to max
        (S, True, {"step": 1.0}, "startup", 300.0, "`first_step_timeout_s`"),
        (S, True, {"teardown": 99.0}, "teardown", 300.0, "`first_step_timeout_s`"),  # never learned
        (
            S,
            False,
            {"val": 3.0},
            "val",
            15.0,
            "",
        ),  # validation is learned before the first step (sanity check)
        (S, False, {"checkpoint": 30.0}, "checkpoint", 100.0, ""),
        (S, False, {"data_first": 30.0}, "data_first", 300.0, "first training batch"),  # worker start-up
        (S, True, {"data_first": 30.0}, "data_first", 100.0, ""),  # learned across epochs
        (BudgetSettings(step_timeout_s=42.0), True, {"step": 100.0}, "data", 42.0, "`step_timeout_s`"),
        (
            BudgetSettings(validation_timeout_s=7.0),
            True,
            {"val": 100.0},
            "val_first",
            7.0,
            "`validation_timeout_s`",
        ),
        (BudgetSettings(checkpoint_timeout_s=9.0), False, {}, "checkpoint", 9.0, "`checkpoint_timeout_s`"),
        (
            BudgetSettings(step_timeout_s=42.0),
            False,
            {},
            "step",
            600.0,
            "first training batch",
        ),  # first step wins
        (
            S,
            True,
            {"epoch_end": 1.0},
            "epoch_end",
            300.0,
            "`first_step_timeout_s`",
        ),  # epoch ends: never learned
        (
            S,
            True,
            {"val_end": 1.0},
            "val_end",
            300.0,
            "`first_step_timeout_s`",
        ),  # the sanity check saw 2 batches
        (
            BudgetSettings(validation_timeout_s=7.0),
            True,
            {"val_end": 1.0},
            "val_end",
            7.0,
            "`validation_timeout_s`",
        ),
    ],
    ids=lambda v: None,
)
def test_phase_budgets(settings, warm, seen, phase, expected, words) -> None:
    budgets = PhaseBudgets(settings)
    if warm:
        budgets.start_training()
    for key, seconds in seen.items():
        budgets.observe(key, seconds / 2)
        budgets.observe(key, seconds)
        budgets.observe(key, seconds / 3)  # the longest counts
    assert budgets.budget(phase) == pytest.approx(expected)
    assert words in budgets.explain(phase)


def test_training_intervals_before_the_first_batch_are_not_learned() -> None:
    budgets = PhaseBudgets(S)
    budgets.observe("step", 90.0)  # a compiling first step
    budgets.start_training()
    budgets.observe("step", 1.0)
    assert budgets.budget("step") == 10.0 and budgets.argument_for("step") == "step_timeout_s"
    assert (
        budgets.argument_for("val") == "validation_timeout_s"
        and budgets.argument_for("startup") == "first_step_timeout_s"
    )


def test_every_phase_has_a_budget_and_advice() -> None:
    budgets = PhaseBudgets(S)
    for phase in PHASES:
        assert budgets.budget(phase) > 0
        event = HangEvent(
            phase, 3, 12.0, 10.0, "rule", "step_timeout_s", "a.py:1 in f", "", "/d/hang_rank0.txt"
        )
        assert training_hang(event).advice


def event(**kw) -> HangEvent:
    base = {
        "phase": "step",
        "step": 12,
        "waited_s": 31.0,
        "budget_s": 30.0,
        "budget_rule": "5 x the longest",
        "budget_argument": "step_timeout_s",
        "main_frame": "train.py:9 in training_step: `time.sleep(100)`",
        "user_frame": "train.py:9 in training_step: `time.sleep(100)`",
        "dump": "/logs/hang_rank0.txt",
    }
    return HangEvent(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "severity", "starts", "contains", "first_advice"),
    [
        (
            {},
            "error",
            "No progress for 31.0 s in `training step` at step 12",
            ["train.py:9", "/logs/hang_rank0.txt"],
            "host-device",
        ),
        ({"resumed_after_s": 45.0}, "warning", "No progress", ["resumed after 45.0 s"], "host-device"),
        ({"action": "raise"}, "error", "No progress", ["raises TrainingHangError"], "host-device"),
        (
            {"detected_by": "faulthandler timer", "blocked_s": 40.0},
            "error",
            "No progress",
            ["could not run for 40.0 s (a C call held the GIL)"],
            "host-device",
        ),
        (
            {
                "phase": "backward",
                "world_size": 2,
                "rank": 0,
                "rank_behind": 1,
                "ranks": "rank 0: ...; rank 1: ...",
            },
            "error",
            "Rank 1 is behind: rank 0 has waited for it for 31.0 s in `backward`",
            ["Where each rank is: rank 0"],
            "Look at rank 1's stacks (hang_rank1.txt)",
        ),
        (
            {"world_size": 2, "rank": 1, "rank_behind": 1, "ranks": "r"},
            "error",
            "No progress on rank 1",
            ["This rank is behind the others"],
            "host-device",
        ),
        (
            {"world_size": 2, "rank_behind": None, "ranks": "r"},
            "error",
            "No progress on rank 0",
            ["No single rank"],
            "host-device",
        ),
        (
            {"phase": "data", "worker_pids": (11, 12)},
            "error",
            "No progress",
            ["worker processes: 11, 12"],
            "DataLoader(timeout",
        ),
        ({"phase": "checkpoint"}, "error", "No progress", ["`checkpoint save`"], "slow or full filesystem"),
    ],
    ids=[
        "stuck",
        "resumed",
        "raise",
        "gil",
        "other-rank-behind",
        "this-rank-behind",
        "level",
        "data",
        "checkpoint",
    ],
)
def test_training_hang_words(kw, severity, starts, contains, first_advice) -> None:
    verdict = training_hang(event(**kw))
    assert verdict.code == "training_hang" and verdict.code in CODES and verdict.severity == severity
    assert verdict.message.startswith(starts), verdict.message
    for text in contains:
        assert text in verdict.message, (text, verdict.message)
    assert first_advice in verdict.advice[0]
    assert "HangWatchdog(step_timeout_s=...)" in verdict.advice[-1] or kw.get("phase") == "checkpoint"
    assert verdict.evidence["waited_s"] == 31.0 and verdict.evidence["budget_s"] == 30.0
    assert ("resumed_after_s" in verdict.evidence) == ("resumed_after_s" in kw)


@pytest.mark.parametrize(
    ("beats", "world", "behind", "contains"),
    [
        (
            [RankBeat(0, 40, 6, "backward", 31.0), RankBeat(1, 39, 6, "step", 31.2, 0.5)],
            2,
            1,
            "rank 1: step 6, `training step`",
        ),
        (
            [RankBeat(0, 40, 6, "backward", 31.0), RankBeat(1, 40, 6, "backward", 31.2)],
            2,
            None,
            "rank 0: step 6",
        ),
        ([RankBeat(0, 40, 6, "backward", 31.0)], 2, None, "rank 1: no heartbeat file"),
        (
            [RankBeat(0, 40, 6, "backward", 1.0), RankBeat(1, 39, 6, "step", 30.0, 29.0)],
            2,
            1,
            "silent for 29 s",
        ),
        (
            [
                RankBeat(0, 9, 2, "step", 1.0),
                RankBeat(1, 10, 2, "backward", 1.0),
                RankBeat(2, 10, 2, "backward", 1.0),
            ],
            3,
            0,
            "rank 2",
        ),
    ],
    ids=["one-behind", "level", "missing-file", "blocked-interpreter", "three-ranks"],
)
def test_rank_behind(beats, world, behind, contains) -> None:
    found, text = rank_behind(beats, world)
    assert found == behind and contains in text


@pytest.mark.parametrize(
    ("counts", "limits", "severity", "contains"),
    [
        ([8, 8], {}, None, ""),
        ([math.inf, math.inf], {}, None, ""),  # streams cannot be compared
        ([8, 9], {}, "error", "rank 0: 8, rank 1: 9"),
        ([9, 8, 9], {}, "error", "ranks with more (0, 2)"),
        ([8, 9], {"max_steps": 8}, "warning", "does not hang"),
        ([8, 9], {"max_steps": 4, "accumulate": 2}, "warning", "does not hang"),
        ([8, 9], {"max_steps": 5, "accumulate": 2}, "error", "would run a step"),
        ([math.inf, 8], {}, "error", "rank 0: inf"),
    ],
)
def test_uneven_batches(counts, limits, severity, contains) -> None:
    verdict = uneven_batches(counts, **limits)
    if severity is None:
        assert verdict is None
        return
    assert verdict.severity == severity and contains in verdict.message
    assert "limit_train_batches=8" in verdict.advice[1]


def straggler_run(rule: StragglerRule, checks: list[tuple[list[float], list[float]]], step_ms: float = 50.0):
    out = []
    for i, (data, compute) in enumerate(checks):
        out.append(rule.update(data, compute, step_ms, 10 * (i + 1)))
    return out


@pytest.mark.parametrize(
    ("checks", "severities", "rank", "cause"),
    [
        ([([1, 1], [10, 40])] * 4, [None, "info", "warning", "warning"], 1, "compute"),
        ([([1, 31], [10, 10])] * 3, [None, "info", "warning"], 1, "input"),
        ([([1, 16], [10, 25])] * 3, [None, "info", "warning"], 1, "input and compute"),
        ([([1, 1], [10, 11])] * 4, [None] * 4, None, None),  # 1 ms: below 10% of the step and the 2 ms floor
        (
            [([1, 1], [40, 10]), ([1, 1], [10, 40]), ([1, 1], [40, 10])],
            [None, None, None],
            None,
            None,
        ),  # alternating
        (
            [([1, 1], [10, 40]), ([1, 1], [10, 10]), ([1, 1], [10, 40])],
            [None, None, None],
            None,
            None,
        ),  # interrupted
        ([([1, 1, 1, 1], [10, 10, 40, 10])] * 3, [None, "info", "warning"], 2, "compute"),  # 4 ranks
    ],
    ids=["compute", "input", "both", "balanced", "alternating", "interrupted", "four-ranks"],
)
def test_straggler_rule(checks, severities, rank, cause) -> None:
    verdicts = straggler_run(StragglerRule(threshold=0.1, patience=3), checks)
    assert [v.severity if v else None for v in verdicts] == severities
    if rank is not None:
        last = verdicts[-1]
        assert last.evidence["rank"] == rank and last.evidence["cause"] == cause
        assert (
            f"Rank {rank} is a straggler" in last.message and f"The difference is in {cause}." in last.message
        )
        assert last.evidence["score"] == pytest.approx(30 / 50, rel=0.01)


def test_straggler_patience_one_warns_at_once() -> None:
    (verdict,) = straggler_run(StragglerRule(patience=1), [([1, 1], [10, 40])])
    assert verdict is not None and verdict.severity == "warning"


def steps(n: int, seed: int = 0, base: float = 0.05) -> list[float]:
    rng = random.Random(seed)
    return [base * (1 + 0.05 * rng.random()) for _ in range(n)]


@pytest.mark.parametrize(
    ("spikes", "kind", "expected"),
    [
        ({}, "", None),
        ({i: 0.5 for i in range(110, 200, 20)}, "gc", "garbage collection: 5"),
        ({i: 0.5 for i in range(110, 200, 20)}, "data", "waiting for data: 5"),
        ({i: 0.5 for i in range(110, 200, 20)}, "validation", "right after validation: 5"),
        ({i: 0.5 for i in range(110, 200, 20)}, "", "compute: 5"),
        ({i: 0.5 for i in range(110, 200, 25)}, "gc", None),  # only 4: not reported
        ({i: 0.03 for i in range(110, 200, 10)}, "gc", None),  # 1.6x the median: not an outlier
        (
            {i: 0.5 for i in range(10, 60, 10)},
            "gc",
            "garbage collection: 5",
        ),  # early ones judged once 100 are known
    ],
    ids=["uniform", "gc", "data", "after-validation", "compute", "too-few", "too-small", "early"],
)
def test_step_outliers(spikes, kind, expected) -> None:
    rule = StepOutliers(min_steps=100, warmup=0)
    verdict = None
    for i, seconds in enumerate(steps(200)):
        extra = spikes.get(i, 0.0)
        rule.add(
            i,
            seconds + extra,
            data_s=0.001 + (extra if kind == "data" else 0.0),
            gc_s=extra if kind == "gc" else 0.0,
            after="validation" if kind == "validation" and extra else "",
        )
        if i % 50 == 49:
            verdict = rule.judge() or verdict
    if expected is None:
        assert verdict is None
        return
    assert verdict.severity == "info" and verdict.code == "step_time_outlier" and verdict.code in CODES
    assert verdict.evidence["causes"] == expected and verdict.evidence["outliers"] == 5
    assert 2.4 < verdict.evidence["excess_s"] < 2.6


def test_step_outliers_skip_the_warmup_and_wait_for_enough_steps() -> None:
    rule = StepOutliers(min_steps=100, warmup=5)
    for i in range(5):
        rule.add(i, 10.0, 0.0, 0.0)  # compilation
    for i, seconds in enumerate(steps(99)):
        rule.add(i + 5, seconds, 0.0, 0.0)
    assert rule.judge() is None and rule.seen == 99


@pytest.mark.parametrize(
    ("settings", "smallest"),
    [
        (BudgetSettings(), 120.0),
        (BudgetSettings(first_step_timeout_s=30.0), 30.0),
        (BudgetSettings(checkpoint_timeout_s=5.0, step_timeout_s=500.0), 5.0),
        (BudgetSettings(min_timeout_s=1.0, validation_timeout_s=2.0), 1.0),
    ],
)
def test_the_smallest_budget_bounds_the_watchdog_poll(settings: BudgetSettings, smallest: float) -> None:
    assert settings.smallest_s == smallest
