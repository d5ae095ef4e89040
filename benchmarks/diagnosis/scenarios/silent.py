"""Silent bugs (they raise nothing and produce no NaN) and the healthy runs that look like them.

Each failure models one bug SilentBugDetector is built for; each healthy run does on purpose what a naive check
would mistake for one (a frozen backbone in eval mode, frozen BatchNorm statistics, Monte-Carlo dropout,
gradient accumulation, manual optimization, a tiny shuffled dataset, an EMA copy, a warmup from 0). A small
self-contained classification task (Gaussian blobs, an MLP with BatchNorm and dropout) keeps them fast.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from benchmarks.diagnosis.scenario import Run, Scenario

__all__ = ["SCENARIOS"]


def blobs(
    seed: int, n: int = 2048, classes: int = 4, features: int = 16
) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, features, generator=g)
    cut = n * 3 // 4
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


class Task(pl.LightningModule):
    """An MLP classifier with BatchNorm and dropout; logs ``train_loss`` and ``val_loss``."""

    def __init__(self, lr: float = 0.05, features: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.lr = lr
        self.encoder = nn.Sequential(
            nn.Linear(features, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(64, 64),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _run(model: pl.LightningModule, seed: int, epochs: int = 3, batch_size: int = 32, **trainer: Any) -> Run:
    train, val = blobs(seed)
    g = torch.Generator().manual_seed(seed)
    train_dl = trainer.pop("train_dataloader", None) or DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=g
    )
    return Run(model, train_dl, DataLoader(val, batch_size=256), {"max_epochs": epochs, **trainer})


# -- failures -----------------------------------------------------------------------------------------------
class OverACopy(Task):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(copy.deepcopy(self).parameters(), lr=self.lr, momentum=0.9)


class NoZeroGrad(Task):
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        pass  # "saves time"


class Manual(Task):
    def __init__(self, zero_grad: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.zero_grad_each_step = zero_grad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = self.loss(batch)
        if self.zero_grad_each_step:
            opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss.detach(), on_step=True, on_epoch=True)
        return loss.detach()


class EvalEncoder(Task):
    def on_train_start(self) -> None:
        self.encoder.eval()  # left over from a feature-statistics pass before training


class TrainInValidation(Task):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.train()  # "to get the same numbers as training"
        super().validation_step(batch, batch_idx)


class FirstBatchAgain(Sampler):
    """A sampler bug: a fixed slice of indices, re-yielded every batch."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return iter([i % self.batch_size for i in range(self.n)])


def lr_zero(seed: int) -> Run:
    return _run(Task(lr=0.0), seed)


def optimizer_over_copy(seed: int) -> Run:
    return _run(OverACopy(), seed)


def no_zero_grad(seed: int) -> Run:
    return _run(NoZeroGrad(lr=0.005), seed)


def manual_no_zero_grad(seed: int) -> Run:
    return _run(Manual(zero_grad=False, lr=0.005), seed)


def eval_encoder(seed: int) -> Run:
    return _run(EvalEncoder(), seed)


def train_in_validation(seed: int) -> Run:
    return _run(TrainInValidation(), seed)


def same_batch(seed: int) -> Run:
    train, _ = blobs(seed)
    loader = DataLoader(train, batch_size=32, sampler=FirstBatchAgain(len(train), 32))
    return _run(Task(), seed, train_dataloader=loader)


# -- healthy look-alikes ------------------------------------------------------------------------------------
class FrozenEncoder(Task):
    def on_train_start(self) -> None:
        self.encoder.eval().requires_grad_(False)  # a frozen feature extractor: eval mode, no gradients


class FrozenBNStats(Task):
    def on_train_start(self) -> None:
        self.encoder[1].eval()  # BatchNorm statistics fixed, its affine still trains


class MCDropout(Task):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.train()  # Monte-Carlo dropout: only the dropout layers
        super().validation_step(batch, batch_idx)


class WithEMA(Task):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ema = copy.deepcopy(self.encoder)  # requires_grad left on, never in the loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.encoder.parameters(), strict=True):
                e.lerp_(p, 0.01)

    def configure_optimizers(self) -> Any:
        params = [*self.encoder.parameters(), *self.head.parameters()]
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9)


class WarmupFromZero(Task):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 50))  # LR 0 at step 0
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def frozen_encoder(seed: int) -> Run:
    return _run(FrozenEncoder(), seed)


def frozen_bn_stats(seed: int) -> Run:
    return _run(FrozenBNStats(), seed)


def mc_dropout(seed: int) -> Run:
    return _run(MCDropout(), seed)


def accumulation(seed: int) -> Run:
    return _run(Task(), seed, epochs=6, batch_size=16, accumulate_grad_batches=4)


def manual_zero_grad(seed: int) -> Run:
    return _run(Manual(zero_grad=True), seed)


def tiny_dataset_shuffled(seed: int) -> Run:
    train, _ = blobs(seed, n=96)  # 72 samples: 3 batches per epoch, reshuffled every epoch
    loader = DataLoader(train, batch_size=24, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return _run(Task(), seed, epochs=40, train_dataloader=loader)


def ema_copy(seed: int) -> Run:
    return _run(WithEMA(), seed)


def warmup_from_zero(seed: int) -> Run:
    return _run(WarmupFromZero(), seed)


def _failure(name: str, code: str, description: str, build: Any, fast: bool = False) -> Scenario:
    return Scenario(name, "failure", (code,), description, build, fast)


def _healthy(name: str, description: str, build: Any, fast: bool = False) -> Scenario:
    return Scenario(name, "healthy", (), description, build, fast)


SCENARIOS: list[Scenario] = [
    _failure(
        "silent_lr_zero", "optimizer_no_op", "lr=0 from a config: every step is a no-op", lr_zero, fast=True
    ),
    _failure(
        "silent_optimizer_over_copy",
        "optimizer_no_op",
        "configure_optimizers builds the optimizer over copy.deepcopy(self): the trained module is held by none",
        optimizer_over_copy,
    ),
    _failure(
        "silent_no_zero_grad",
        "stale_gradients",
        "optimizer_zero_grad overridden to do nothing: gradients add up over all steps",
        no_zero_grad,
        fast=True,
    ),
    _failure(
        "silent_manual_no_zero_grad",
        "stale_gradients",
        "manual optimization without optimizer.zero_grad()",
        manual_no_zero_grad,
    ),
    _failure(
        "silent_eval_encoder",
        "wrong_mode",
        "encoder.eval() in on_train_start, never switched back: dropout off, BatchNorm frozen while training",
        eval_encoder,
        fast=True,
    ),
    _failure(
        "silent_train_in_validation",
        "wrong_mode",
        "self.train() in validation_step: BatchNorm statistics updated with validation data",
        train_in_validation,
    ),
    _failure(
        "silent_same_batch",
        "repeated_data",
        "a sampler that yields the same indices for every batch",
        same_batch,
        fast=True,
    ),
    _healthy(
        "silent_ok_frozen_encoder",
        "a frozen feature extractor in eval mode (requires_grad off) under a trained head",
        frozen_encoder,
        fast=True,
    ),
    _healthy(
        "silent_ok_frozen_bn_stats",
        "BatchNorm alone in eval mode (statistics fixed on purpose)",
        frozen_bn_stats,
    ),
    _healthy(
        "silent_ok_mc_dropout", "dropout layers switched to train during validation (MC dropout)", mc_dropout
    ),
    _healthy(
        "silent_ok_accumulation",
        "accumulate_grad_batches=4: gradients add up over micro-batches on purpose",
        accumulation,
    ),
    _healthy(
        "silent_ok_manual_zero_grad",
        "manual optimization that zeroes the gradients each step",
        manual_zero_grad,
        fast=True,
    ),
    _healthy(
        "silent_ok_tiny_dataset",
        "72 samples reshuffled every epoch: the same samples come back often",
        tiny_dataset_shuffled,
    ),
    _healthy("silent_ok_ema_copy", "an EMA copy whose parameters require grad but get none", ema_copy),
    _healthy("silent_ok_warmup_from_zero", "an LR warmup that starts at exactly 0", warmup_from_zero),
]
