"""lightning_diag.testing: each helper passes on a correct model and fails with a message naming the culprit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_diag.testing import (
    assert_batch_independence,
    assert_can_overfit_batch,
    assert_forward_backward,
    assert_gradcheck,
    assert_loss_at_init,
)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


class LogLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(dim=0))  # centring over the batch: sample i depends on all the others


class BadSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return grad * x  # wrong: should be 2 * x


X = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))


def test_forward_backward() -> None:
    assert_forward_backward(mlp(), X, lambda out: nn.functional.cross_entropy(out, Y))
    with pytest.raises(
        AssertionError, match=r"get no gradient from the loss on this batch: spare.weight, spare.bias"
    ):
        assert_forward_backward(Unused(), X)
    with pytest.raises(AssertionError, match=r"forward pass of `0` \(LogLayer\)"):
        assert_forward_backward(nn.Sequential(LogLayer(), nn.Linear(6, 1)), X)  # log of negative inputs


def test_forward_backward_leaves_the_model_alone() -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert_forward_backward(model, X)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_batch_independence() -> None:
    assert_batch_independence(mlp(), X)
    assert_batch_independence(
        nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), X
    )  # BatchNorm in eval for it
    with pytest.raises(AssertionError, match="depends on 7 other sample"):
        assert_batch_independence(Mixer(), X)


def test_gradcheck() -> None:
    assert_gradcheck(lambda x: (x * x).sum(), torch.randn(4))
    assert_gradcheck(nn.Linear(3, 2), torch.randn(2, 3))
    with pytest.raises(AssertionError, match="does not match the numerical one"):
        assert_gradcheck(BadSquare.apply, torch.randn(4))


def test_can_overfit_batch() -> None:
    assert_can_overfit_batch(mlp(), lambda m: nn.functional.cross_entropy(m(X), Y), steps=150)
    frozen = mlp().requires_grad_(False)
    with pytest.raises(AssertionError, match="no trainable parameter"):
        assert_can_overfit_batch(frozen, lambda m: nn.functional.cross_entropy(m(X), Y))
    with pytest.raises(AssertionError, match="less than the 90% drop"):
        assert_can_overfit_batch(mlp(), lambda m: nn.functional.cross_entropy(m(X), Y), steps=3, lr=1e-5)


def test_loss_at_init() -> None:
    assert_loss_at_init(nn.functional.cross_entropy(mlp()(X), Y), num_classes=3)
    with pytest.raises(AssertionError, match="confidently wrong"):
        assert_loss_at_init(5 * math.log(3), num_classes=3)
    with pytest.raises(AssertionError, match="suspiciously close to 0"):
        assert_loss_at_init(0.01, num_classes=3)
    with pytest.raises(AssertionError, match="is nan"):
        assert_loss_at_init(float("nan"), num_classes=3)


def test_host_sync_counter_counts_reads_and_nothing_else() -> None:
    from lightning_diag.testing import HostSyncCounter

    x = torch.randn(4)
    original = torch.Tensor.tolist
    with HostSyncCounter() as quiet:
        y = (x * 2).sum() + x.norm()
        torch.isfinite(y)
    assert quiet.count == 0
    with HostSyncCounter() as reads:
        y.item()
        float(y)
        bool(y > 0)
        x.tolist()
        x.numpy()
    assert reads.count == 5
    assert torch.Tensor.tolist is original  # patched only while active
