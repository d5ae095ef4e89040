"""The failure gallery: one small model and one generated dataset, broken on purpose one way per entry.

Every entry of :data:`GALLERY` is a LightningCLI override of ``base.yaml`` (the whole lightning_diag suite on)
that reproduces one failure mode, with the finding code(s) the diagnosis must contain. The data is generated here
(no download): ``circles`` (2-D points, label 1 inside a circle holding half the mass: a non-linear boundary) or
``regression`` (a noisy linear target from 8 features).
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

#: entry -> (what goes wrong, the codes its diagnosis.json must contain, what to change)
GALLERY: dict[str, tuple[str, tuple[str, ...], str]] = {
    "healthy": ("nothing: the baseline", (), "-"),
    "lr_too_high": (
        "SGD at lr=2 on a regression: the gradients explode past float32",
        ("exploding_gradients",),
        "lower the LR, clip (GradClip), warm up; NaNGuard skips those steps, then rolls back with an LR back-off",
    ),
    "lr_too_low": ("SGD at lr=1e-4: the loss barely moves", ("loss_plateau",), "raise the LR 3-10x"),
    "vanishing_gradients": (
        "a 24-layer sigmoid MLP: the first layers get almost no gradient",
        ("vanishing_gradients",),
        "ReLU/GELU, residual connections, normalisation, a better init",
    ),
    "overfitting": (
        "a 256-wide MLP on 32 training samples",
        ("overfitting", "early_stopped"),
        "keep the best weights (EarlyStop), regularise, more data",
    ),
    "underfitting": (
        "a linear model on the (non-linear) circles task",
        ("underfitting",),
        "more capacity or better features",
    ),
    "batch_mixing": (
        "a reshape in forward that mixes the batch dimension",
        ("batch_dependence",),
        "fix the view/reshape so dim 0 stays the batch",
    ),
    "detached_layer": (
        "a layer whose output reaches the loss through .detach(): it never learns",
        ("missing_gradients",),
        "remove the .detach() (or freeze the layer on purpose with requires_grad_(False))",
    ),
    "nan_in_data": (
        "one training sample holds a NaN",
        ("non_finite_input",),
        "clean the data; NaNGuard skips the step and names the sample meanwhile",
    ),
    "slow_data": (
        "a Dataset that takes 1 ms per sample, loaded in the main process",
        ("dataloader_bound",),
        "num_workers > 0, persistent_workers, cache or precompute the samples",
    ),
}


class SlowDataset(Dataset):
    """Wraps a dataset and sleeps ``delay`` seconds per item (an expensive decode, a slow disk)."""

    def __init__(self, data: Dataset, delay: float) -> None:
        self.data, self.delay = data, delay

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        time.sleep(self.delay)
        return self.data[index]


class GalleryData(pl.LightningDataModule):
    """Generated data.

    Args:
        task: ``"circles"`` (binary classification) or ``"regression"``.
        n_train: training samples.
        n_val: validation samples.
        batch_size: samples per batch.
        nan_sample: put a NaN in this training sample (``-1``: none).
        delay_ms: sleep this long per training sample (``0``: none).
    """

    def __init__(
        self,
        task: Literal["circles", "regression"] = "circles",
        n_train: int = 1024,
        n_val: int = 512,
        batch_size: int = 64,
        nan_sample: int = -1,
        delay_ms: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _make(self, n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        if self.hparams.task == "circles":
            x = torch.randn(n, 2, generator=g)
            y = (x.pow(2).sum(dim=1) < 2 * math.log(2)).float().unsqueeze(1)
        else:
            x = torch.randn(n, 8, generator=g)
            w = torch.randn(8, 1, generator=torch.Generator().manual_seed(99))
            y = x @ w + 0.5 * torch.randn(n, 1, generator=g)
        return TensorDataset(x, y)

    def setup(self, stage: str) -> None:
        self.train_set: Dataset = self._make(self.hparams.n_train, 0)
        if self.hparams.nan_sample >= 0:
            self.train_set.tensors[0][self.hparams.nan_sample, 0] = float("nan")  # type: ignore[attr-defined]
        if self.hparams.delay_ms > 0:
            self.train_set = SlowDataset(self.train_set, self.hparams.delay_ms / 1000)
        self.val_set = self._make(self.hparams.n_val, 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)


class GalleryNet(pl.LightningModule):
    """An MLP (``hidden=0``: a linear model) with BCE-with-logits (circles) or MSE (regression).

    Args:
        task: as in :class:`GalleryData`.
        hidden: width of the hidden layers (0: no hidden layer).
        depth: number of hidden layers.
        activation: ``"relu"``, ``"tanh"`` or ``"sigmoid"``.
        optimizer: ``"adam"`` or ``"sgd"``.
        lr: the learning rate.
        bug: ``""``, ``"batch_mixing"`` or ``"detached_layer"``.
    """

    def __init__(
        self,
        task: Literal["circles", "regression"] = "circles",
        hidden: int = 32,
        depth: int = 2,
        activation: Literal["relu", "tanh", "sigmoid"] = "relu",
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-2,
        bug: Literal["", "batch_mixing", "detached_layer"] = "",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        features = 2 if task == "circles" else 8
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
        layers: list[nn.Module] = []
        width = features
        for _ in range(depth if hidden else 0):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.spare = nn.Linear(features, features) if bug == "detached_layer" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.bug == "batch_mixing":
            x = x.t().reshape(x.shape)  # "transpose back" with reshape instead of .t(): scrambles the batch
        if self.spare is not None:
            x = x + self.spare(x).detach()  # a feature "cached" with .detach(): the layer never learns
        return self.net(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.hparams.task == "circles":
            return nn.functional.binary_cross_entropy_with_logits(out, y)
        return nn.functional.mse_loss(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
