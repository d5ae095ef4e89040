"""trace_step: where a non-finite value first appeared, and a replay that leaves no trace (no Trainer here)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_diag.core.nan_trace import first_non_finite, non_finite_kind, non_finite_tensors, trace_step


class LogThenLinear(nn.Module):
    """Functional code between two submodules: log() of a value that can be 0."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.log(self.a(x).relu()))  # relu -> 0 -> log -> -inf


class SqrtNorm(nn.Module):
    """Finite forward, infinite gradient: d sqrt(x)/dx at 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.pow(2).sum(dim=1, keepdim=True).sqrt()


def loss_of(model: nn.Module, x: torch.Tensor) -> Any:
    return lambda: model(x).sum()


def test_input() -> None:
    model = nn.Linear(2, 1)
    x = torch.ones(4, 2)
    x[2, 1] = float("inf")
    trace = trace_step(model, (x, torch.ones(4)), loss_of(model, x))
    assert (trace.phase, trace.tensor, trace.kind) == ("input", "batch[0] (sample 2)", "inf")


def test_forward_names_the_innermost_module() -> None:
    model = nn.Sequential(
        nn.Linear(2, 4), nn.Sequential(nn.Linear(4, 4), nn.Softplus(beta=1e6)), nn.Linear(4, 1)
    )
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1][0].weight.fill_(3e38)  # overflows float32 inside `1.0`
    x = torch.ones(3, 2)
    trace = trace_step(model, x, loss_of(model, x))
    assert (trace.phase, trace.module, trace.module_type, trace.tensor) == (
        "forward",
        "1.0",
        "Linear",
        "output",
    )


def test_forward_functional_code_names_the_running_module() -> None:
    model = nn.Sequential(nn.Linear(3, 3), LogThenLinear())
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # positive inputs to `1.a`, whatever the random init
        model[0].bias.fill_(0.0)
        model[1].a.weight.fill_(-1.0)  # so `1.a` is negative, relu makes it 0 and log gives -inf
        model[1].a.bias.fill_(0.0)
    x = torch.ones(2, 3)
    trace = trace_step(model, x, loss_of(model, x))
    assert trace.phase == "forward" and trace.module == "1" and trace.module_type == "LogThenLinear"
    assert trace.tensor == "input of `1.b`" and trace.kind == "inf"


def test_loss() -> None:
    model = nn.Linear(2, 1)
    x = torch.ones(3, 2)
    trace = trace_step(model, x, lambda: torch.log(model(x).sum() * 0.0))
    assert (trace.phase, trace.tensor, trace.kind) == ("loss", "loss", "inf")


def test_backward() -> None:
    model = nn.Sequential(nn.Linear(2, 2), SqrtNorm(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    x = torch.ones(3, 2)
    trace = trace_step(model, x, loss_of(model, x))
    assert (trace.phase, trace.module, trace.module_type, trace.tensor) == (
        "backward",
        "1",
        "SqrtNorm",
        "its input",
    )


def test_clean_replay_returns_none_and_leaves_no_trace() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))
    x = torch.randn(8, 2)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    random.seed(1)
    np.random.seed(1)
    rng = torch.get_rng_state()
    states = (random.getstate(), np.random.get_state()[1].copy())
    assert trace_step(model, x, loss_of(model, x)) is None
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    # no hooks left behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not p._backward_hooks for p in model.parameters() if p._backward_hooks is not None)


def test_hooks_are_removed_when_the_forward_raises() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(RuntimeError):
        trace_step(model, None, lambda: model(torch.ones(3, 5)))
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_helpers() -> None:
    assert non_finite_kind(torch.tensor([1.0, float("nan"), float("inf")])) == "nan+inf"
    assert non_finite_kind(torch.tensor([1, 2])) == ""
    assert first_non_finite({"a": torch.ones(2)}) is None
    assert non_finite_tensors(["a", "b"], [torch.ones(1), torch.tensor([float("-inf")])]) == [("b", "inf")]
