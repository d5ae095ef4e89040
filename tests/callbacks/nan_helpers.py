"""A regression model that produces a NaN/Inf on purpose, at a chosen step and place (for NaNGuard's tests)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import regression_data

#: Where a fault can be injected, and the (code, phase, module, tensor fragment) NaNGuard must report for it.
EXPECTED = {
    "input": ("non_finite_input", "input", "", "batch[0]"),
    "forward": ("non_finite_loss", "forward", "net.2", "output"),
    "loss": ("non_finite_loss", "loss", "", "loss"),
    "gradient": ("non_finite_gradients", "backward", "net.2", "input"),
    "parameter": ("non_finite_parameters", "optimizer", "net.0", "net.0.weight"),
}


class Poison(nn.Module):
    """Identity, except at the steps in ``fire``: NaN in the forward output (``where="forward"``) or in the
    gradient it passes back (``where="gradient"``). ``step`` is set by the model before each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.where = ""
        self.fire: set[int] = set()
        self.ranks: set[int] | None = None
        self.step = -1
        self.rank = 0

    def _on(self, where: str) -> bool:
        return (
            self.where == where and self.step in self.fire and (self.ranks is None or self.rank in self.ranks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._on("forward"):
            x = x.clone()
            x[0, 0] = float("nan")
        if self._on("gradient"):
            return _NaNGrad.apply(x)
        return x


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class Faulty(pl.LightningModule):
    """MLP regressor (Linear, Tanh, Poison, Linear) trained with AdamW; ``inject`` names the fault, ``at`` the
    optimizer steps where it fires, ``ranks`` the ranks that see it (all by default)."""

    def __init__(
        self,
        inject: str = "",
        at: tuple[int, ...] = (),
        ranks: tuple[int, ...] | None = None,
        lr: float = 0.01,
        optimizer: str = "adamw",
    ) -> None:
        super().__init__()
        self.inject, self.at = inject, set(at)
        self.ranks = set(ranks) if ranks is not None else None
        self.lr, self.optimizer_name = lr, optimizer
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), Poison(), nn.Linear(16, 1))
        self.net[2].where = inject
        self.net[2].fire = self.at
        self.net[2].ranks = self.ranks

    def _fires(self) -> bool:
        return self.global_step in self.at and (self.ranks is None or self.global_rank in self.ranks)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.net[2].step, self.net[2].rank = self.global_step, self.global_rank
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        if self.inject == "loss" and self._fires():
            loss = loss + torch.log(torch.zeros((), device=loss.device))  # log(0) in the loss code
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # "parameter": corrupt one weight right after the update of the chosen step (as a bad update would)
        if (
            self.inject == "parameter"
            and self.global_step - 1 in self.at
            and (self.ranks is None or self.global_rank in self.ranks)
        ):
            with torch.no_grad():
                self.net[0].weight[0, 0] = float("nan")

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        fused = self.optimizer_name == "adamw_fused"  # takes a device-side found_inf
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01, fused=fused)


def faulty_loader(inject: str = "", at: tuple[int, ...] = (), batch_size: int = 8, n: int = 64) -> DataLoader:
    """The regression data; with ``inject="input"``, NaN in the first sample of the batches of steps ``at``."""
    data = regression_data(n)
    x, y = data.tensors[0].clone(), data.tensors[1].clone()
    if inject == "input":
        for step in at:
            x[(step * batch_size) % n, 3] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def adam_steps(optimizer: torch.optim.Optimizer) -> int:
    """How many updates AdamW applied (its per-parameter step counter)."""
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert len(steps) == 1, steps
    return steps.pop()


def all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())
