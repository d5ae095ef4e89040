"""Tasks whose learning-curve truth is known: each makes a real Trainer run that is healthy or fails one way."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def circles(n: int, seed: int) -> TensorDataset:
    """2-D points, label 1 inside the circle of radius sqrt(2 ln 2) (half the mass of a standard normal)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x.pow(2).sum(dim=1) < 2 * math.log(2)).float().unsqueeze(1)
    return TensorDataset(x, y)


def noisy_regression(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, x @ w + 0.5 * torch.randn(n, 1, generator=g))


class Net(pl.LightningModule):
    """An MLP (``hidden=0``: a linear model) trained on BCE-with-logits (``task="circles"``) or MSE."""

    def __init__(
        self,
        task: str = "circles",
        hidden: int = 32,
        layers: int = 2,
        lr: float = 1e-2,
        optimizer: str = "adam",
        features: int = 2,
    ) -> None:
        super().__init__()
        self.task, self.lr, self.optimizer_name = task, lr, optimizer
        torch.manual_seed(0)
        if hidden == 0:
            self.net: nn.Module = nn.Linear(features, 1)
        else:
            blocks: list[nn.Module] = [nn.Linear(features, hidden), nn.ReLU()]
            for _ in range(layers - 1):
                blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
            self.net = nn.Sequential(*blocks, nn.Linear(hidden, 1))

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        if self.task == "circles":
            return nn.functional.binary_cross_entropy_with_logits(out, y)
        return nn.functional.mse_loss(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


#: name -> (model kwargs, train data, val data, epochs, the codes OverfitDetector must report)
SCENARIOS: dict[str, tuple[dict[str, Any], Any, Any, int, set[str]]] = {
    "healthy": ({"hidden": 32}, lambda: circles(1024, 0), lambda: circles(512, 1), 12, set()),
    "overfitting": (
        {"task": "regression", "hidden": 256, "features": 8, "lr": 1e-3},
        lambda: noisy_regression(32, 0),
        lambda: noisy_regression(256, 1),
        60,
        {"overfitting"},
    ),
    "underfitting": ({"hidden": 0}, lambda: circles(1024, 0), lambda: circles(512, 1), 15, {"underfitting"}),
    "lr_too_low": (
        {"hidden": 32, "optimizer": "sgd", "lr": 1e-4},
        lambda: circles(1024, 0),
        lambda: circles(512, 1),
        10,
        {"loss_plateau"},
    ),
    "diverging": (
        {"task": "regression", "hidden": 64, "features": 8, "optimizer": "sgd", "lr": 0.6},
        lambda: noisy_regression(512, 0),
        lambda: noisy_regression(128, 1),
        8,
        {"divergence"},
    ),
}


def loaders(name: str) -> tuple[DataLoader, DataLoader]:
    _, train, val, _, _ = SCENARIOS[name]
    batch_size = 8 if name == "overfitting" else 64  # the tiny training set: several steps per epoch
    return DataLoader(train(), batch_size=batch_size), DataLoader(val(), batch_size=256)
