"""warmup_cosine against reference formulas (HuggingFace, timm) written out here, plus edge cases and properties."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_diag.core.schedules import cycle_lengths, warmup_cosine


def hf_cosine_with_warmup(step: int, warmup: int, total: int, num_cycles: float = 0.5) -> float:
    """transformers.optimization.get_cosine_schedule_with_warmup's lr_lambda (multiplier of the base rate)."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def hf_hard_restarts(step: int, warmup: int, total: int, num_cycles: int) -> float:
    """transformers' get_cosine_with_hard_restarts_schedule_with_warmup lr_lambda."""
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def timm_cosine(
    t: int,
    base: float,
    t_initial: float,
    lr_min: float,
    warmup_t: int,
    warmup_lr_init: float,
    cycle_mul: float,
    cycle_decay: float,
    cycle_limit: int,
) -> float:
    """timm.scheduler.CosineLRScheduler._get_lr with warmup_prefix=True, k_decay=1."""
    if t < warmup_t:
        return warmup_lr_init + t * (base - warmup_lr_init) / warmup_t
    t = t - warmup_t
    if cycle_mul != 1:
        i = math.floor(math.log(1 - t / t_initial * (1 - cycle_mul), cycle_mul))
        t_i = cycle_mul**i * t_initial
        t_curr = t - (1 - cycle_mul**i) / (1 - cycle_mul) * t_initial
    else:
        i = t // t_initial
        t_i = t_initial
        t_curr = t - (t_initial * i)
    lr_max = base * cycle_decay**i
    if i < cycle_limit:
        return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_curr / t_i))
    return lr_min


@pytest.mark.parametrize(
    ("warmup", "total"),
    [(0, 10), (1, 10), (3, 10), (10, 100), (99, 100), (0, 1)],
    ids=["no-warmup", "1-step-warmup", "short", "10pct", "warmup-total-minus-1", "single-step"],
)
def test_matches_huggingface_cosine_with_warmup(warmup: int, total: int) -> None:
    base = 0.3
    for step in range(total + 3):
        ours = warmup_cosine(step, base_lr=base, total_steps=total, warmup_steps=warmup, warmup_start_lr=0.0)
        ref = base * hf_cosine_with_warmup(min(step, total), warmup, total)
        assert ours == pytest.approx(ref, abs=1e-12), f"step {step}"


@pytest.mark.parametrize("cycles", [1, 2, 3, 5])
def test_matches_huggingface_hard_restarts(cycles: int) -> None:
    base, warmup, total = 1.0, 5, 65
    for step in range(total + 2):
        ours = warmup_cosine(
            step, base_lr=base, total_steps=total, warmup_steps=warmup, warmup_start_lr=0.0, num_cycles=cycles
        )
        assert ours == pytest.approx(base * hf_hard_restarts(step, warmup, total, cycles), abs=1e-12), (
            f"step {step}"
        )


@pytest.mark.parametrize(
    ("warmup", "total", "start", "floor", "cycles", "mul", "decay"),
    [
        (5, 105, 1e-4, 1e-5, 1, 1.0, 1.0),
        (0, 60, 0.0, 0.0, 3, 1.0, 0.5),
        (4, 74, 0.01, 1e-3, 3, 2.0, 1.0),
        (2, 152, 0.0, 0.0, 4, 2.0, 0.7),
        (1, 31, 0.05, 0.0, 2, 0.5, 1.0),
    ],
    ids=["plain", "restarts-decay", "mul2", "mul2-decay", "mul-half"],
)
def test_matches_timm_cosine(warmup, total, start, floor, cycles, mul, decay) -> None:
    base = 0.1
    first = cycle_lengths(total - warmup, cycles, mul)[0]
    for step in range(total + 3):
        ours = warmup_cosine(
            step,
            base_lr=base,
            total_steps=total,
            warmup_steps=warmup,
            warmup_start_lr=start,
            min_lr=floor,
            num_cycles=cycles,
            cycle_mul=mul,
            cycle_decay=decay,
        )
        ref = timm_cosine(step, base, first, floor, warmup, start, mul, decay, cycles)
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12), f"step {step}"


def test_cycle_lengths_span_the_decay() -> None:
    lengths = cycle_lengths(70, 3, 2.0)
    assert lengths == pytest.approx([10, 20, 40])
    assert sum(cycle_lengths(97, 4, 1.7)) == pytest.approx(97)


def test_edges() -> None:
    # 1-step warmup: step 0 is the start, step 1 the peak.
    assert warmup_cosine(0, base_lr=1.0, total_steps=5, warmup_steps=1, warmup_start_lr=0.2) == pytest.approx(
        0.2
    )
    assert warmup_cosine(1, base_lr=1.0, total_steps=5, warmup_steps=1, warmup_start_lr=0.2) == pytest.approx(
        1.0
    )
    # 0 warmup: the very first step already trains at the peak.
    assert warmup_cosine(0, base_lr=0.5, total_steps=5) == pytest.approx(0.5)
    # past the end: the floor, forever.
    assert warmup_cosine(10_000, base_lr=0.5, total_steps=5, min_lr=0.01) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": 10, "total_steps": 10}, r"`warmup_steps` must be in \[0, total_steps=10\), got 10"),
        ({"warmup_steps": 11, "total_steps": 10}, r"`warmup_steps` must be in"),
        ({"warmup_steps": -1, "total_steps": 10}, r"`warmup_steps` must be in"),
        ({"total_steps": 0}, r"`total_steps` must be >= 1, got 0"),
        ({"total_steps": 10, "num_cycles": 0}, r"`num_cycles` must be >= 1, got 0"),
        ({"total_steps": 10, "cycle_mul": 0.0}, r"`cycle_mul` must be > 0"),
        ({"total_steps": 10, "cycle_decay": -1.0}, r"`cycle_decay` must be > 0"),
    ],
    ids=[
        "warmup==total",
        "warmup>total",
        "negative-warmup",
        "zero-total",
        "zero-cycles",
        "zero-mul",
        "neg-decay",
    ],
)
def test_rejects_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        warmup_cosine(0, base_lr=1.0, **kwargs)


def test_rejects_negative_step() -> None:
    with pytest.raises(ValueError, match=r"`step` must be >= 0, got -1"):
        warmup_cosine(-1, base_lr=1.0, total_steps=3)


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(1, 400),
    warmup_frac=st.floats(0, 0.99),
    base=st.floats(1e-6, 10),
    start_frac=st.floats(0, 1),
    floor_frac=st.floats(0, 1),
    cycles=st.integers(1, 5),
    mul=st.sampled_from([0.5, 1.0, 1.5, 2.0]),
    decay=st.floats(0.1, 1.0),
)
def test_properties(total, warmup_frac, base, start_frac, floor_frac, cycles, mul, decay) -> None:
    warmup = min(int(warmup_frac * total), total - 1)
    start, floor = start_frac * base, floor_frac * base
    lrs = [
        warmup_cosine(
            s,
            base_lr=base,
            total_steps=total,
            warmup_steps=warmup,
            warmup_start_lr=start,
            min_lr=floor,
            num_cycles=cycles,
            cycle_mul=mul,
            cycle_decay=decay,
        )
        for s in range(total + 2)
    ]
    tol = 1e-9 * base
    # bounded by the floor, the start and the peak
    assert all(min(floor, start) - tol <= lr <= base + tol for lr in lrs)
    # warmup never decreases, and the decay phase never goes below the floor; the end is the floor
    assert all(b >= a - tol for a, b in itertools.pairwise(lrs[: warmup + 1]))
    assert lrs[total] == pytest.approx(floor) and lrs[total + 1] == pytest.approx(floor)
    # within one cycle (no restarts) the decay is monotone
    if cycles == 1:
        decay_phase = lrs[warmup:total]
        assert all(b <= a + tol for a, b in itertools.pairwise(decay_phase))
