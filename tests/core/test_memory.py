"""core/memory: the growth rule on synthetic baselines (patterns, look-alikes, the projected exhaustion step), the
walk that names the holder, pressure, fragmentation and the out-of-memory verdict, without a Trainer."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from lightning_diag.core.diagnosis import diagnose
from lightning_diag.core.memory import (
    MIB,
    BatchInfo,
    Growth,
    Holder,
    MemoryTrend,
    as_sawtooth,
    describe_batch,
    find_holders,
    fragmentation_verdict,
    growth_verdict,
    is_oom,
    oom_verdict,
    pick_holder,
    pressure_verdict,
)
from lightning_diag.findings import Finding

GROWTH = 64 * MIB
CAPACITY = 4096 * MIB


def run(
    epochs: int = 4,
    steps: int = 40,
    every: int = 5,
    per_step: float = 0.0,
    per_epoch_released: float = 0.0,
    per_validation: float = 0.0,
    cache: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
    base: float = 500 * MIB,
) -> MemoryTrend:
    """A fit as MemoryMonitor measures it: epoch/validation boundaries and a point every ``every`` steps.

    ``per_step``: bytes every step keeps; ``per_epoch_released``: bytes every step keeps until its epoch ends;
    ``per_validation``: bytes every validation run keeps; ``cache``: bytes filled evenly over epoch 0, then flat.
    """
    rng = random.Random(seed)
    trend = MemoryTrend()
    kept = 0.0

    def value(step: int, in_epoch: int) -> float:
        filled = cache * min(step / steps, 1.0)
        return base + per_step * step + per_epoch_released * in_epoch + kept + filled + rng.uniform(0, noise)

    for epoch in range(epochs):
        start = epoch * steps
        trend.add("epoch_start", start, epoch, value(start, 0))
        for i in range(0, steps, every):
            trend.add("step", start + i, epoch, value(start + i, i))
        end = start + steps
        trend.add("val_start", end, epoch, value(end, steps))
        kept += per_validation
        trend.add("val_end", end, epoch, value(end, steps))
        trend.add("epoch_end", end, epoch, value(end, steps))
    return trend


def judge(trend: MemoryTrend, **kwargs) -> Growth | None:
    options = {
        "min_growth": GROWTH,
        "capacity": CAPACITY,
        "peak": trend.points[-1].value,
        "total_steps": None,
        "ignore_first_steps": 10,
    }
    return trend.judge(**{**options, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"per_step": 1.0 * MIB}, "per_step"),
        ({"per_step": 1.0 * MIB, "noise": 3 * MIB}, "per_step"),
        ({"per_epoch_released": 2.0 * MIB}, "per_epoch"),
        ({"per_validation": 40 * MIB}, "at_validation"),
        ({"per_validation": 40 * MIB, "noise": 3 * MIB}, "at_validation"),
    ],
    ids=["per-step", "per-step-noisy", "saw-tooth", "validation", "validation-noisy"],
)
def test_patterns_are_found_and_named(kwargs, pattern) -> None:
    growth = judge(run(**kwargs))
    assert growth is not None and growth.pattern == pattern and growth.confirmed
    assert growth.size >= GROWTH


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"noise": 20 * MIB},
        {"cache": 200 * MIB},
        {"cache": 200 * MIB, "noise": 4 * MIB},
        {"per_step": 0.1 * MIB},  # 16 MiB over the run: below min_growth
        {"per_validation": 40 * MIB, "epochs": 2},  # one run after the first: not enough to tell
    ],
    ids=["flat", "noise", "cache-epoch-0", "cache-noisy", "small-growth", "one-validation"],
)
def test_look_alikes_are_not_growth(kwargs) -> None:
    growth = judge(run(**kwargs))
    assert growth is None or not growth.confirmed or growth.size < GROWTH


def test_a_cache_filling_epoch_0_is_only_a_candidate() -> None:
    trend = run(cache=200 * MIB, epochs=1)
    growth = judge(trend)
    assert (
        growth is not None and growth.size >= GROWTH and not growth.confirmed
    )  # the caller looks for a holder
    assert judge(trend, run_died=True).confirmed_by == "run_died"
    assert judge(trend, total_steps=20_000).confirmed_by == "exhaustion_in_run"  # exhaustion near step 3,900


def test_a_one_off_jump_is_not_growth() -> None:
    trend = MemoryTrend()
    for step in range(0, 200, 5):
        trend.add("step", step, step // 50, (500 + (300 if step >= 100 else 0)) * MIB)
    assert judge(trend) is None


def test_warm_up_and_min_points() -> None:
    trend = MemoryTrend()
    for step in range(0, 40, 5):  # 8 points, 1 MiB per step from the start
        trend.add("step", step, 0, (100 + step * 3) * MIB)
    assert judge(trend, ignore_first_steps=0, total_steps=100) is not None
    assert judge(trend, ignore_first_steps=10) is None  # 6 points left
    assert judge(trend, ignore_first_steps=0, min_points=9) is None


@pytest.mark.parametrize("rate_mib", [0.5, 1.0, 3.0])
def test_projected_exhaustion_step_is_exact_on_a_linear_leak(rate_mib) -> None:
    trend = MemoryTrend()
    for step in range(0, 300, 10):
        trend.add("step", step, step // 100, 1000 * MIB + rate_mib * MIB * step)
    last = trend.points[-1]
    growth = judge(trend, peak=last.value + 50 * MIB)
    assert growth is not None and growth.pattern == "per_step"
    truth = math.ceil(
        (CAPACITY - 50 * MIB - 1000 * MIB) / (rate_mib * MIB)
    )  # where the peak reaches capacity
    assert abs(growth.exhaustion_step - truth) <= 1


def test_a_leak_that_starts_inside_the_window_is_projected_at_its_own_rate() -> None:
    trend = MemoryTrend()
    for step in range(0, 300, 10):  # flat until step 100, then 2 MiB a step
        trend.add("step", step, step // 100, 1000 * MIB + 2 * MIB * max(step - 100, 0))
    last = trend.points[-1]
    growth = judge(trend, peak=last.value)
    assert growth is not None and growth.rate == pytest.approx(2 * MIB)
    assert growth.exhaustion_step == last.step + math.ceil((CAPACITY - last.value) / (2 * MIB))


def test_saw_tooth_projection_needs_an_epoch_that_reaches_capacity() -> None:
    growth = judge(run(per_epoch_released=2.0 * MIB))
    assert growth.exhaustion_step is None  # 80 MiB an epoch on a 4 GiB capacity: it fits
    tight = judge(run(per_epoch_released=2.0 * MIB), capacity=560 * MIB)
    assert tight.exhaustion_step is not None and tight.exhaustion_step % 40 < 40


def test_as_sawtooth_keeps_the_rate_and_bounds_the_epoch() -> None:
    growth = Growth("per_step", 1 * MIB, 70 * MIB, 0.9, 10, 10, 80, 570 * MIB, 570 * MIB, 600 * MIB, 110)
    saw = as_sawtooth(growth, steps_per_epoch=100, epoch_start=100)
    assert saw.pattern == "per_epoch" and saw.size == 100 * MIB and saw.exhaustion_step == 100 + 100
    roomy = as_sawtooth(growth, steps_per_epoch=100, epoch_start=100)
    roomy_capacity = as_sawtooth(
        Growth("per_step", 1 * MIB, 70 * MIB, 0.9, 10, 10, 80, 570 * MIB, 570 * MIB, 9e9, None),
        steps_per_epoch=100,
        epoch_start=100,
    )
    assert roomy.rate == growth.rate and roomy_capacity.exhaustion_step is None


def test_points_are_thinned_but_keep_the_span() -> None:
    trend = MemoryTrend(max_points=32)
    for step in range(0, 2000, 5):
        trend.add("step", step, step // 500, (500 + step * 0.2) * MIB)
    assert len(trend.points) <= 32 and trend.points[0].step == 0 and trend.points[-1].step == 1995


# -- the holder ----------------------------------------------------------------------------------------------
class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 4)
        self.hist: list[torch.Tensor] = []
        self.table = torch.zeros(1024, 256)  # a big constant attribute: not a growth
        self.metric = nn.Module()
        self.metric.value = []  # a torchmetrics-style list state on a submodule

    def step(self) -> None:
        self.hist.append(self.net(torch.ones(2, 4)).sum())


def test_find_holders_names_attributes_and_skips_the_weights() -> None:
    model = Model()
    for _ in range(10):
        model.step()
    model.metric.value.extend(torch.ones(100) for _ in range(3))
    found = find_holders(
        {"self": model, "trainer.callback_metrics": {"loss": torch.ones(())}}, skip=model.parameters()
    )
    assert found["self.hist"].tensors == 10 and found["self.hist"].with_history == 10
    assert found["self.metric.value"].tensors == 3 and found["self.metric.value"].nbytes == 3 * 400
    assert found["self.table"].nbytes == 1024 * 256 * 4
    assert found["trainer.callback_metrics['loss']"].tensors == 1
    assert not any(name.startswith("self.net") for name in found)  # parameters are the model, not a holder


def test_pick_holder_prefers_what_grew_over_what_is_big() -> None:
    model = Model()
    before = find_holders({"self": model}, skip=model.parameters())
    for _ in range(20):
        model.step()
    after = find_holders({"self": model}, skip=model.parameters())
    holder, gained = pick_holder(after, before)
    assert holder.name == "self.hist" and gained.with_history == 20
    static = pick_holder(after)  # no earlier walk: the most tensors with autograd history
    assert static[0].name == "self.hist" and static[1] is None
    detached = {
        "self.table": Holder("self.table", 1, 0, 10**6),
        "self.preds": Holder("self.preds", 50, 0, 10**5),
    }
    earlier = {
        "self.table": Holder("self.table", 1, 0, 10**6),
        "self.preds": Holder("self.preds", 10, 0, 2 * 10**4),
    }
    assert pick_holder(detached, earlier)[0].name == "self.preds"
    assert pick_holder({"self.table": Holder("self.table", 1, 0, 10**6)}, min_bytes=10) is None  # one tensor


def test_growth_verdict_words() -> None:
    growth = judge(run(per_step=1.0 * MIB))
    holder = Holder("self.hist", 1200, 1200, 38 * 2**20)
    verdict = growth_verdict(growth, holder, Holder("self.hist", 400, 400, 0), since_step=120)
    assert verdict.code == "memory_growth" and verdict.severity == "warning"
    assert "`self.hist` holds 1,200 tensors with autograd history, 38.0 MiB" in verdict.message
    assert "since step 120" in verdict.message and "runs out" in verdict.message
    assert verdict.evidence["holder"] == "self.hist" and verdict.evidence["pattern"] == "per_step"
    assert ".detach()" in verdict.advice[0]
    elsewhere = growth_verdict(growth, None)
    assert "elsewhere" in elsewhere.message and "tracemalloc" in elsewhere.advice[0]


# -- pressure, fragmentation, OOM ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("peak", "severity"), [(0.5, None), (0.91, None), (0.93, "info"), (0.97, "warning"), (1.0, "warning")]
)
def test_pressure_thresholds(peak, severity) -> None:
    verdict = pressure_verdict(peak * 1000, 1000)
    assert (verdict.severity if verdict else None) == severity


@pytest.mark.parametrize(
    ("retries", "reserved", "allocated", "severity"),
    [(0, 50, 45, None), (1, 50, 45, "warning"), (0, 80, 45, "info"), (0, 70, 45, None)],
    ids=["quiet", "retries", "gap", "gap-below"],
)
def test_fragmentation_rule(retries, reserved, allocated, severity) -> None:
    verdict = fragmentation_verdict(
        new_retries=retries,
        retries=retries,
        since_step=0,
        reserved_peak=reserved * MIB,
        allocated_peak=allocated * MIB,
        capacity=100 * MIB,
        expandable=False,
    )
    assert (verdict.severity if verdict else None) == severity
    if verdict is not None:
        on = fragmentation_verdict(
            new_retries=retries,
            retries=retries,
            since_step=0,
            reserved_peak=reserved * MIB,
            allocated_peak=allocated * MIB,
            capacity=100 * MIB,
            expandable=True,
        )
        assert "already on" in on.advice[0] and "expandable_segments:True" in verdict.advice[0]


@pytest.mark.parametrize(
    ("error", "oom"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (MemoryError(), True),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
            True,
        ),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_oom(error, oom) -> None:
    assert is_oom(error) is oom


def oom(**kwargs):
    options = {
        "phase": "forward",
        "error": "OutOfMemoryError: CUDA out of memory",
        "batch": BatchInfo("batch[0]: 8x4096", 8 * 4096, 8 * 4096 * 8),
        "median_numel": 8 * 512.0,
        "device": "cuda",
        "current": 70e9,
        "peak": 79e9,
        "capacity": 80e9,
        "reserved": 79.5e9,
        "retries": 0,
    }
    return oom_verdict(**{**options, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "first"),
    [
        ({}, "This batch is 8.0x the median one"),
        ({"median_numel": 8 * 4096.0}, "If the step's peak itself does not fit"),
        (
            {"median_numel": 8 * 4096.0, "growth": judge(run(per_step=1.0 * MIB)), "holder": "self.hist"},
            "The memory that survives a step grew",
        ),
        ({"median_numel": 8 * 4096.0, "fragmented": True}, "The cache was fragmented"),
    ],
    ids=["long-batch", "steady-peak", "growth", "fragmentation"],
)
def test_oom_advice_follows_the_evidence(kwargs, first) -> None:
    verdict = oom(**kwargs)
    assert verdict.code == "out_of_memory" and verdict.severity == "error"
    assert verdict.advice[0].startswith(first)
    assert verdict.evidence["phase"] == "forward" and "the forward pass" in verdict.message


def test_oom_names_phase_and_batch_ratio() -> None:
    verdict = oom(phase="backward")
    assert "the backward pass" in verdict.message and "8.0x the median batch" in verdict.message
    assert verdict.evidence["batch_ratio"] == 8.0 and verdict.evidence["batch_shapes"] == "batch[0]: 8x4096"
    assert "first batch of its kind" in oom(median_numel=0.0).message


def test_describe_batch_counts_each_storage_once() -> None:
    x = torch.zeros(4, 8)
    info = describe_batch({"x": x, "view": x[:2], "y": torch.zeros(4, dtype=torch.long)})
    assert info.numel == 32 + 16 + 4 and info.nbytes == 32 * 4 + 4 * 8
    assert describe_batch((x,), device_type="cuda").nbytes == 0


@pytest.mark.parametrize(
    ("cause", "effect"),
    [
        ("memory_growth", "out_of_memory"),
        ("memory_fragmentation", "out_of_memory"),
        ("memory_growth", "memory_pressure"),
    ],
)
def test_the_diagnosis_links_memory_findings(cause, effect) -> None:
    severity = "info" if effect == "memory_pressure" else "error"
    findings = [
        Finding(cause, "warning", "m", step=50, epoch=1).to_dict(),
        Finding(effect, severity, "m", step=90, epoch=2).to_dict(),
    ]
    result = diagnose(findings)
    assert result.caused_by == {f"{effect}@90": f"{cause}@50"}
    assert result.primary == f"{cause}@50"
