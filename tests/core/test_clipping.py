"""Clipping strategies against torch's clip functions and reference implementations written out here."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from lightning_diag.core.clipping import (
    AutoClip,
    ZScoreClip,
    agc_,
    apply_coefficient_,
    clip_coefficient,
    clip_value_,
    unitwise_norm,
)
from lightning_diag.core.grad_stats import compute_grad_stats


def grads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * 3 for s in [(16, 8), (16,), (4, 16), (4,)]]


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 5.0, 1e6])
def test_norm_clip_equals_clip_grad_norm(max_norm: float) -> None:
    ours, ref = grads(), grads()
    stats = compute_grad_stats(["a"] * 4, ours)
    apply_coefficient_(ours, clip_coefficient(stats.total_norm, max_norm))
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref]
    for p, g in zip(params, ref, strict=True):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    for a, p in zip(ours, params, strict=True):
        torch.testing.assert_close(a, p.grad)


def test_non_finite_norm_leaves_gradients_alone() -> None:
    assert clip_coefficient(torch.tensor(math.nan), 1.0).item() == 1.0
    assert clip_coefficient(torch.tensor(math.inf), 1.0).item() == 1.0
    assert clip_coefficient(torch.tensor(4.0), torch.tensor(math.nan)).item() == 1.0
    assert clip_coefficient(torch.tensor(4.0), 1.0).item() == pytest.approx(0.25, rel=1e-5)


def test_value_clip_equals_clip_grad_value() -> None:
    ours, ref = grads(), grads()
    clip_value_(ours, 0.5)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref]
    for p, g in zip(params, ref, strict=True):
        p.grad = g
    torch.nn.utils.clip_grad_value_(params, 0.5)
    for a, p in zip(ours, params, strict=True):
        torch.testing.assert_close(a, p.grad)
    tensor_bound = grads()
    clip_value_(tensor_bound, torch.tensor(0.5))
    for a, b in zip(tensor_bound, ours, strict=True):
        torch.testing.assert_close(a, b)


def reference_agc(params: list[torch.Tensor], gs: list[torch.Tensor], factor: float, eps: float) -> None:
    """timm.utils.agc.adaptive_clip_grad, written out (norm_type 2)."""
    for p, g in zip(params, gs, strict=True):
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        p_norm = p.norm(dim=dims, keepdim=True) if dims else p.norm()
        g_norm = g.norm(dim=dims, keepdim=True) if dims else g.norm()
        max_norm = p_norm.clamp_(min=eps).mul_(factor)
        clipped = g * (max_norm / g_norm.clamp(min=1e-6))
        g.copy_(torch.where(g_norm < max_norm, g, clipped))


def test_agc_matches_the_reference_and_floors_zero_weights() -> None:
    params = [w * 0.1 for w in grads(1)]
    params[1] = torch.zeros(16)  # a zero-initialised bias can still move thanks to the eps floor
    ours, ref = grads(), grads()
    clipped = agc_(params, ours, factor=0.05, eps=1e-3)
    reference_agc(params, ref, 0.05, 1e-3)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert clipped.item()
    assert (unitwise_norm(ours[1]) > 0).all()
    for p, g in zip(params, ours, strict=True):
        assert (unitwise_norm(g) <= 0.05 * unitwise_norm(p).clamp(min=1e-3) * (1 + 1e-5)).all()


def test_agc_with_scaled_gradients() -> None:
    params = [w * 0.1 for w in grads(1)]
    plain, scaled = grads(), [g * 512 for g in grads()]
    agc_(params, plain, 0.05)
    agc_(params, scaled, 0.05, inv_scale=torch.tensor(1 / 512))
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(a * 512, b)


def autoclip_reference(norms: list[float], percentile: float, history: int) -> list[float]:
    """AutoClip (Seetharaman et al.): the percentile of past finite norms *and* the current one."""
    kept: list[float] = []
    out = []
    for n in norms:
        if math.isfinite(n):
            kept = [*kept, n][-history:]
        out.append(float(np.percentile(kept, percentile)) if kept else math.nan)
    return out


@pytest.mark.parametrize(("percentile", "history"), [(10.0, 1000), (50.0, 5), (90.0, 3), (100.0, 4)])
def test_autoclip_thresholds(percentile: float, history: int) -> None:
    norms = [1.0, 2.0, 0.5, math.nan, 8.0, 3.0, math.inf, 0.2, 4.0, 4.5, 1.5, 9.0]
    clip = AutoClip(percentile, history)
    got = [clip.update(torch.tensor(n)).item() for n in norms]
    for g, r in zip(got, autoclip_reference(norms, percentile, history), strict=True):
        assert g == pytest.approx(r, rel=1e-5)
    assert int(clip.count) == sum(math.isfinite(n) for n in norms)


def zclip_reference(norms: list[float], z: float, alpha: float, warmup: int) -> list[float]:
    """ZClip ('percentile' variant: clip to mean + z*std), EMA fed the clipped norm; NaN/Inf skipped."""
    buf: list[float] = []
    mean = var = 0.0
    out = []
    for n in norms:
        ready = len(buf) >= warmup
        thr = mean + z * math.sqrt(var) if ready else math.inf
        out.append(thr)
        if not math.isfinite(n):
            continue
        if not ready:
            buf.append(n)
            mean, var = float(np.mean(buf)), float(np.var(buf))
        else:
            x = min(n, thr)
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
            buf.append(n)
    return out


def test_zscore_thresholds() -> None:
    rng = np.random.default_rng(0)
    norms = list(rng.lognormal(0.0, 0.3, size=60))
    norms[30] = 50.0  # a spike: clipped, and only its clipped value feeds the EMA
    norms[40] = math.nan
    clip = ZScoreClip(z_thresh=2.0, alpha=0.9, warmup_steps=10)
    got = [clip.update(torch.tensor(n, dtype=torch.float64)).item() for n in norms]
    ref = zclip_reference(norms, 2.0, 0.9, 10)
    assert all(math.isinf(g) for g in got[:10])
    for g, r in zip(got[10:], ref[10:], strict=True):
        assert g == pytest.approx(r, rel=1e-4)
    assert got[31] < 5.0  # the spike did not blow the threshold up


@pytest.mark.parametrize("make", [lambda: AutoClip(25.0, 8), lambda: ZScoreClip(2.0, 0.9, 5)])
def test_state_round_trip_gives_identical_thresholds(make) -> None:
    rng = np.random.default_rng(1)
    norms = [torch.tensor(v) for v in rng.lognormal(0.0, 0.5, size=30)]
    straight = make()
    expected = [straight.update(n).item() for n in norms]
    first = make()
    for n in norms[:12]:
        first.update(n)
    resumed = make()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert [resumed.update(n).item() for n in norms[12:]] == expected[12:]
    make().load_state_dict({})  # tolerates missing keys
