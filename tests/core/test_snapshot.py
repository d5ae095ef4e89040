"""Snapshot: a CPU copy of model + optimizer state restored in place, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_diag.core.snapshot import Snapshot


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    ],
)
def test_restore_is_exact(make) -> None:
    net = model()
    opt = make(net.parameters())
    train(net, opt, 3)
    snap = Snapshot(net, [opt], step=3)
    expected_model = {k: v.clone() for k, v in net.state_dict().items()}
    expected_opt = opt.state_dict()
    expected_opt = {
        "state": {
            k: {n: t.clone() if isinstance(t, torch.Tensor) else t for n, t in s.items()}
            for k, s in expected_opt["state"].items()
        }
    }
    params = [p for p in net.parameters()]
    train(net, opt, 4)
    snap.restore(net, [opt])
    assert all(torch.equal(v, expected_model[k]) for k, v in net.state_dict().items())
    for k, s in opt.state_dict()["state"].items():
        for n, t in s.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(expected_opt["state"][k][n])), (k, n)
    assert [p for p in net.parameters()] == params  # the same Parameter objects, updated in place
    # and training continues exactly as from the snapshot point
    torch.manual_seed(5)
    train(net, opt, 2)
    other = model()
    other_opt = make(other.parameters())
    train(other, other_opt, 0)
    snap.restore(other, [other_opt])
    torch.manual_seed(5)
    train(other, other_opt, 2)
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True)
    )


def test_state_created_after_the_snapshot_is_dropped() -> None:
    net = model()
    opt = torch.optim.Adam(net.parameters())
    snap = Snapshot(net, [opt], step=0)  # before Adam's first step: no state yet
    train(net, opt, 2)
    assert len(opt.state) > 0
    snap.restore(net, [opt])
    assert len(opt.state) == 0


def test_hyperparameters_restored_but_not_the_learning_rate() -> None:
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    snap = Snapshot(net, [opt], step=0)
    opt.param_groups[0]["momentum"] = 0.5
    opt.param_groups[0]["lr"] = 0.01
    snap.restore(net, [opt])
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == 0.01


def test_size_and_mismatch_errors() -> None:
    net = model()
    opt = torch.optim.Adam(net.parameters())
    train(net, opt, 1)
    snap = Snapshot(net, [opt], step=1)
    n_params = sum(p.numel() for p in net.parameters())
    n_buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    assert snap.nbytes == 4 * n_params + n_buffers + 2 * 4 * n_params + 4 * len(list(net.parameters()))
    with pytest.raises(RuntimeError, match="keys differ"):
        snap.restore(nn.Linear(4, 2), [opt])
    with pytest.raises(RuntimeError, match="number of optimizers"):
        snap.restore(net, [])
