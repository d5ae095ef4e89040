"""Small real models and data for Trainer-based tests."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "logger": False,
    "enable_checkpointing": False,
}


def trainer(**kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer; keyword arguments override the defaults."""
    return pl.Trainer(**{**QUIET, **kwargs})


def regression_data(n: int = 64, features: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, 1, generator=g)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(n, 1, generator=g))


def loader(n: int = 64, batch_size: int = 8, seed: int = 0, shuffle: bool = False) -> DataLoader:
    return DataLoader(regression_data(n, seed=seed), batch_size=batch_size, shuffle=shuffle)


class Regression(pl.LightningModule):
    """An MLP regressor that logs ``train_loss`` (step and epoch) and ``val_loss``."""

    def __init__(self, lr: float = 0.05, features: int = 8, hidden: int = 16, optimizer: str = "sgd") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        if self.hparams.optimizer == "groups":
            return torch.optim.SGD(
                [
                    {"params": self.net[0].parameters(), "lr": self.hparams.lr},
                    {"params": self.net[2].parameters(), "lr": self.hparams.lr / 10},
                ],
                lr=self.hparams.lr,
            )
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class Scripted(Regression):
    """Logs a scripted ``val_loss``/``score`` per validation run (to drive stopping rules exactly)."""

    def __init__(self, values: list[float], key: str = "val_loss", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.values = list(values)
        self.key = key
        self.validation_runs = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        index = min(self.validation_runs, len(self.values) - 1)
        self.log(self.key, torch.tensor(self.values[index], dtype=torch.float32))
        self.validation_runs += 1


class Stream(IterableDataset):
    """An iterable dataset without ``__len__``."""

    def __iter__(self) -> Any:
        data = regression_data(32)
        for i in range(len(data)):
            yield data[i]


def params_close(a: nn.Module, b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v.detach().cpu(), b[k].detach().cpu()) for k, v in a.state_dict().items())


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}


def isclose(a: float, b: float, rel: float = 1e-9, abs_: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def find(findings: list[Any], code: str) -> Any | None:
    return next((f for f in findings if f.code == code), None)


def shard_linear_layers(module: pl.LightningModule, layers: nn.Module) -> None:
    """FSDP2 for the tests' MLPs: shard every Linear of ``layers``, then the module, over the data-parallel mesh
    (call from ``configure_model`` under ``ModelParallelStrategy``)."""
    from torch.distributed.fsdp import fully_shard

    mesh = module.device_mesh["data_parallel"]
    for layer in layers:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
