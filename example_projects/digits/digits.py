"""A digits classifier on scikit-learn's bundled 8x8 digits (1,797 images, no download)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(pl.LightningDataModule):
    """sklearn's digits, standardised, split 70/15/15 with a fixed seed.

    Args:
        batch_size: samples per batch.
        train_fraction: the share of images used for training (the rest is split between val and test).
        seed: the split's seed.
    """

    def __init__(self, batch_size: int = 64, train_fraction: float = 0.7, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32)
        y = torch.tensor(labels, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.hparams.seed))
        x, y = x[order], y[order]
        n_train = int(self.hparams.train_fraction * len(x))
        n_val = (len(x) - n_train) // 2
        mean, std = x[:n_train].mean(), x[:n_train].std()
        x = (x - mean) / std
        self.train_set = TensorDataset(x[:n_train], y[:n_train])
        self.val_set = TensorDataset(x[n_train : n_train + n_val], y[n_train : n_train + n_val])
        self.test_set = TensorDataset(x[n_train + n_val :], y[n_train + n_val :])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class DigitsClassifier(pl.LightningModule):
    """An MLP on the flattened 8x8 images; logs `train_loss`, `val_loss`, `val_acc`.

    Args:
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        lr: the base learning rate (WarmupCosine schedules it).
        weight_decay: AdamW weight decay.
        dropout: dropout after each hidden layer.
    """

    def __init__(
        self,
        hidden: int = 128,
        depth: int = 2,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True)
        self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        # No scheduler here: WarmupCosine (a callback, configured in YAML) owns the learning rate.
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
