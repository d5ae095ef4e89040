"""Overfitting on purpose, diagnosed live and plotted: `python overfit.py [--epochs 60] [--root runs/overfit]`.

A 256-wide MLP learns a noisy linear regression from only 32 samples and is validated on 256 others. The
training loss keeps falling towards 0 while the validation loss turns back up after ~10 epochs. OverfitDetector
reads the curves after every epoch, reports the onset with the gap numbers and stops the run
(`action="stop"`); EarlyStop then restores the best epoch's weights. The report lands in
`<root>/tb/version_*/` with `diagnosis.html`, `learning_curves.png`, `lr_schedule.png` and `grad_norms.png` (the
PNGs also in TensorBoard's Images tab).

The same diagnosis works post-hoc on any run's logs: `lightning-diag report <root>`.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import EarlyStop, GradNormMonitor, OverfitDetector, WarmupCosine


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, x @ w + 0.5 * torch.randn(n, 1, generator=g))


class WideMLP(pl.LightningModule):
    def __init__(self, hidden: int = 256, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--root", default="runs/overfit")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        log_every_n_steps=2,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=args.root,
        logger=TensorBoardLogger(args.root, name="tb"),
        callbacks=[
            WarmupCosine(warmup_steps=8, min_lr_ratio=0.1),
            GradNormMonitor(depth=2),
            OverfitDetector(action="stop"),
            EarlyStop(
                monitor="val_loss", patience=100, restore_best_weights=True
            ),  # restores; the detector stops
        ],
    )
    torch.manual_seed(0)
    trainer.fit(
        WideMLP(),
        DataLoader(data(32, 0), batch_size=8),
        DataLoader(data(256, 1), batch_size=256),
    )
    return trainer


if __name__ == "__main__":
    main()
