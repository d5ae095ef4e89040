"""The demo runs: generated data, a small MLP, and the callbacks that diagnose each failure (CPU, seconds)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_diag.callbacks import (
    EarlyStop,
    GradNormMonitor,
    NaNGuard,
    OverfitDetector,
    SpeedMonitor,
    WarmupCosine,
)

Build = Callable[[], tuple[pl.LightningModule, DataLoader, DataLoader, list[pl.Callback], dict[str, Any]]]


def regression(n: int, seed: int) -> TensorDataset:
    """A noisy linear target from 8 features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, x @ w + 0.5 * torch.randn(n, 1, generator=g))


def circles(n: int, seed: int) -> TensorDataset:
    """2-D points, label 1 inside the circle that holds half the mass."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return TensorDataset(x, (x.pow(2).sum(dim=1) < 2 * math.log(2)).float().unsqueeze(1))


class SlowDataset(Dataset):
    """Sleeps ``delay`` seconds per item (an expensive decode, a slow disk)."""

    def __init__(self, data: TensorDataset, delay: float) -> None:
        self.data, self.delay = data, delay

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        time.sleep(self.delay)
        return self.data[index]


class DemoNet(pl.LightningModule):
    """An MLP with MSE (regression, 8 features) or BCE-with-logits (circles, 2 features)."""

    def __init__(
        self,
        task: str = "regression",
        hidden: int = 32,
        depth: int = 2,
        activation: str = "relu",
        optimizer: str = "adam",
        lr: float = 1e-2,
    ) -> None:
        super().__init__()
        self.task, self.optimizer_name, self.lr = task, optimizer, lr
        act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
        width = 8 if task == "regression" else 2
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        if self.task == "circles":
            return nn.functional.binary_cross_entropy_with_logits(out, y)
        return nn.functional.mse_loss(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _loaders(train: Dataset, val: Dataset, batch_size: int) -> tuple[DataLoader, DataLoader]:
    return DataLoader(train, batch_size=batch_size), DataLoader(val, batch_size=512)


def lr_too_high() -> Any:
    model = DemoNet(hidden=64, optimizer="sgd", lr=2.0)
    callbacks = [
        GradNormMonitor(depth=2),
        NaNGuard(
            action="skip",
            spike_action="skip",
            escalate_to="rollback",
            snapshot_every_n_steps=20,
            lr_backoff=0.1,
            max_rollbacks=10,
        ),
        WarmupCosine(warmup_steps=0, min_lr_ratio=1.0),
        OverfitDetector(),
    ]
    return model, *_loaders(regression(512, 0), regression(256, 1), 64), callbacks, {"max_epochs": 4}


def overfitting() -> Any:
    model = DemoNet(hidden=256, lr=1e-3)
    callbacks = [
        WarmupCosine(warmup_steps=8, min_lr_ratio=0.1),
        GradNormMonitor(depth=2),
        OverfitDetector(action="stop"),
        EarlyStop(monitor="val_loss", patience=100, restore_best_weights=True),
    ]
    return model, *_loaders(regression(32, 0), regression(256, 1), 8), callbacks, {"max_epochs": 60}


def nan_in_data() -> Any:
    train = circles(1024, 0)
    train.tensors[0][300, 0] = float("nan")
    callbacks = [GradNormMonitor(depth=2), NaNGuard(action="skip"), OverfitDetector()]
    return DemoNet(task="circles"), *_loaders(train, circles(512, 1), 64), callbacks, {"max_epochs": 2}


def vanishing_gradients() -> Any:
    model = DemoNet(task="circles", hidden=32, depth=16, activation="sigmoid", optimizer="sgd", lr=0.01)
    callbacks = [GradNormMonitor(depth=2), OverfitDetector()]
    return model, *_loaders(circles(1024, 0), circles(512, 1), 64), callbacks, {"max_epochs": 2}


def slow_data() -> Any:
    train = SlowDataset(circles(1024, 0), 0.002)
    callbacks = [SpeedMonitor(), GradNormMonitor(depth=2)]
    return (
        DemoNet(task="circles"),
        *_loaders(train, circles(512, 1), 32),
        callbacks,
        {"max_epochs": 1, "limit_train_batches": 24, "limit_val_batches": 1},
    )


def fit(name: str, build: Build, root: str) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    model, train, val, callbacks, trainer_args = build()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        log_every_n_steps=2,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
        logger=CSVLogger(root, name=name),
        callbacks=callbacks,
        **trainer_args,
    )
    with warnings.catch_warnings():
        # Lightning's advice for real projects; the demo loads its generated data in the main process on purpose.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        trainer.fit(model, train, val)
    return trainer
