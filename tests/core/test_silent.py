"""core.silent: samples, fingerprints, the module-mode rule, replica comparison, the noise-scale estimator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_diag.core.silent import (
    NoiseScale,
    Streak,
    bn_batches_tracked,
    divergent_entries,
    fingerprint,
    flat_sample,
    mode_problems,
    noise_scale_terms,
)


def test_flat_sample_is_evenly_spaced_and_bounded() -> None:
    t = torch.arange(1000.0).reshape(10, 100)
    sample = flat_sample(t, 64)
    assert sample.numel() == 64
    assert torch.equal(sample, torch.arange(0.0, 1000.0, 15.0)[:64])
    assert torch.equal(flat_sample(torch.arange(5.0), 64), torch.arange(5.0))  # small tensors whole
    assert torch.equal(flat_sample(t.t(), 8), flat_sample(t.t().contiguous(), 8))  # non-contiguous alike


def test_fingerprint_equal_batches_alike_and_changes_seen() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    a = fingerprint([x, y])
    assert torch.equal(a, fingerprint([x.clone(), y.clone()]))
    x2 = x.clone()
    x2[0, 0] += 1e-3  # position 0 is always sampled
    assert not torch.equal(a, fingerprint([x2, y]))
    assert not torch.equal(a, fingerprint([x[:16], y[:16]]))  # another shape
    assert not torch.equal(a, fingerprint([torch.randn(32, 8, generator=g), y]))
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert not torch.equal(fingerprint([nan]), fingerprint([nan]))  # a NaN batch is never called a repeat
    assert fingerprint([])[-1] == 0


@pytest.mark.parametrize(
    ("rows", "rtol", "expected"),
    [
        pytest.param([[1.0, 2.0], [1.0, 2.0]], 1e-6, [], id="identical"),
        pytest.param([[1.0, 2.0], [1.0, 2.0 + 1e-3]], 1e-6, [1], id="second-differs"),
        pytest.param([[1.0, 2.0], [1.0 + 1e-9, 2.0]], 1e-6, [], id="within-tolerance"),
        pytest.param([[0.0, 5.0], [0.0, 5.0], [1e-3, 5.0]], 1e-6, [0], id="third-rank-at-zero"),
        pytest.param([[float("nan"), 1.0], [1.0, 1.0]], 1e-6, [0], id="nan-on-one-rank"),
        pytest.param([[float("nan"), 1.0], [float("nan"), 1.0]], 1e-6, [], id="nan-everywhere"),
        pytest.param([[1.0, 2.0]], 1e-6, [], id="one-rank"),
    ],
)
def test_divergent_entries(rows: list[list[float]], rtol: float, expected: list[int]) -> None:
    assert divergent_entries(torch.tensor(rows), rtol) == expected


class Block(nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(dropout)


class Model(nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = Block(dropout)
        self.head = Block(dropout)


def _frozen_backbone(m: Model) -> None:
    m.backbone.eval()
    m.backbone.requires_grad_(False)


def _bn_only_eval(m: Model) -> None:
    for sub in m.modules():
        if isinstance(sub, nn.BatchNorm1d):
            sub.eval()


def _mc_dropout(m: Model) -> None:
    m.eval()
    for sub in m.modules():
        if isinstance(sub, nn.Dropout):
            sub.train()


@pytest.mark.parametrize(
    ("setup", "training", "expected"),
    [
        pytest.param(lambda m: m.train(), True, [], id="train-all-in-train"),
        pytest.param(lambda m: m.backbone.eval(), True, [("backbone", 2)], id="train-backbone-eval"),
        pytest.param(lambda m: m.eval(), True, [("", 4)], id="train-whole-model-eval"),
        pytest.param(_frozen_backbone, True, [], id="train-frozen-backbone-on-purpose"),
        pytest.param(_bn_only_eval, True, [], id="train-bn-stats-frozen-on-purpose"),
        pytest.param(lambda m: m.eval(), False, [], id="val-all-in-eval"),
        pytest.param(lambda m: (m.eval(), m.head.train()), False, [("head", 2)], id="val-head-train"),
        pytest.param(lambda m: m.train(), False, [("", 4)], id="val-whole-model-train"),
        pytest.param(_mc_dropout, False, [], id="val-mc-dropout-on-purpose"),
    ],
)
def test_mode_problems(setup, training: bool, expected: list[tuple[str, int]]) -> None:
    model = Model()
    model.train()
    setup(model)
    assert mode_problems(model, training=training) == expected


def test_mode_problems_ask_which_parameters_are_trained() -> None:
    model = Model()
    model.backbone.eval()  # a teacher: requires_grad left on, but no optimizer holds it
    head = {id(p) for p in model.head.parameters()}
    assert mode_problems(model, True) == [("backbone", 2)]
    assert mode_problems(model, True, lambda p: id(p) in head) == []


def test_mode_problems_ignore_models_whose_mode_changes_nothing() -> None:
    model = Model(dropout=0.0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats = False
    model.eval()
    assert mode_problems(model, training=True) == []
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1)).eval()
    assert mode_problems(plain, training=True) == []


def test_bn_batches_tracked_counts_train_mode_forwards() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    assert int(bn_batches_tracked(model.modules())) == 0
    model(torch.randn(8, 4))
    assert int(bn_batches_tracked(model.modules())) == 2
    model.eval()(torch.randn(8, 4))
    assert int(bn_batches_tracked(model.modules())) == 2
    assert bn_batches_tracked(nn.Linear(2, 2).modules()) is None


@pytest.mark.parametrize(
    ("grad_sq", "trace", "b_small", "b_big"),
    [(1.0, 10.0, 8, 32), (0.01, 50.0, 4, 64), (3.0, 0.5, 1, 2), (2.0, 200.0, 16, 512)],
)
def test_noise_scale_terms_invert_the_expected_norms_exactly(
    grad_sq: float, trace: float, b_small: int, b_big: int
) -> None:
    """E|G_B|^2 = |G|^2 + tr(Sigma)/B: the estimator recovers both terms from the expectations at two sizes."""
    small = grad_sq + trace / b_small
    big = grad_sq + trace / b_big
    got_trace, got_grad_sq = noise_scale_terms(small, big, b_small, b_big)
    assert got_trace == pytest.approx(trace, rel=1e-12)
    assert got_grad_sq == pytest.approx(grad_sq, rel=1e-12)
    with pytest.raises(ValueError, match="batch_big > batch_small > 0"):
        noise_scale_terms(small, big, b_big, b_small)


def test_noise_scale_estimate_matches_a_direct_computation_on_a_small_model() -> None:
    """Per-sample gradients of a small model give tr(Sigma) and |G|^2 directly; the estimator, fed only the norms
    of micro-batch gradients and of their mean, agrees with them on average (it is unbiased) and B_simple follows."""
    torch.manual_seed(0)
    n, features = 256, 6
    x = torch.randn(n, features)
    y = x @ torch.randn(features, 1) + 0.5 * torch.randn(n, 1)
    model = nn.Sequential(nn.Linear(features, 4), nn.Tanh(), nn.Linear(4, 1))
    params = list(model.parameters())

    def grad(idx: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()

    per_sample = torch.stack([grad(torch.tensor([i])) for i in range(n)])
    true_grad = per_sample.mean(0)
    true_grad_sq = float(true_grad.pow(2).sum())
    true_trace = float(((per_sample - true_grad) ** 2).sum(1).mean())  # tr of the per-sample covariance

    b_small, micro = 4, 8
    g = torch.Generator().manual_seed(1)
    traces, grads = [], []
    for _ in range(400):
        # micro-batches drawn with replacement: exactly the model E|G_B|^2 = |G|^2 + tr(Sigma)/B assumes
        smalls = [per_sample[torch.randint(0, n, (b_small,), generator=g)].mean(0) for _ in range(micro)]
        small_sq = float(torch.stack([s.pow(2).sum() for s in smalls]).mean())
        big_sq = float(torch.stack(smalls).mean(0).pow(2).sum())
        trace, grad_sq = noise_scale_terms(small_sq, big_sq, b_small, b_small * micro)
        traces.append(trace)
        grads.append(grad_sq)
    mean_trace, mean_grad_sq = sum(traces) / len(traces), sum(grads) / len(grads)
    assert mean_trace == pytest.approx(true_trace, rel=0.1)
    assert mean_grad_sq == pytest.approx(true_grad_sq, rel=0.15)
    assert mean_trace / mean_grad_sq == pytest.approx(true_trace / true_grad_sq, rel=0.2)
    # the per-micro-batch gradients of the real autograd path are the per-sample means used above
    idx = torch.arange(b_small)
    assert torch.allclose(grad(idx), per_sample[idx].mean(0), atol=1e-6)


def test_noise_scale_running_average_and_state() -> None:
    ns = NoiseScale(decay=0.5)
    assert math.isnan(ns.scale)
    ns.update(10.0, 2.0)
    assert ns.scale == 5.0
    ns.update(30.0, 2.0)
    assert (ns.trace, ns.grad_sq, ns.count) == (20.0, 2.0, 2)
    ns.update(float("nan"), 1.0)  # never enters
    assert ns.count == 2
    ns.update(
        5.0, -10.0
    )  # a negative |G|^2 estimate enters the average (it is unbiased), the ratio guards it
    clone = NoiseScale(decay=0.5)
    clone.load_state_dict(ns.state_dict())
    assert clone.state_dict() == ns.state_dict()
    assert math.isnan(NoiseScale(trace=1.0, grad_sq=-1.0, count=1).scale)  # noise-dominated: no scale yet


def test_streak_needs_consecutive_checks() -> None:
    streak = Streak(patience=2)
    assert [streak.update(s) for s in (True, False, True, True, True, False)] == [
        False,
        False,
        False,
        True,
        True,
        False,
    ]
