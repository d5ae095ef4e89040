"""The same run twice: without NaNGuard it turns to NaN and never recovers; with it, it finishes and says why.

    python before_after.py [--steps 60]

A small regressor takes ``log`` of its (positive) input features; one sample in the data has a feature equal to
0, so ``log`` gives ``-inf`` on the batch that holds it, the loss becomes NaN, the NaN gradient reaches every
weight and the run is lost. NaNGuard skips that one update and names the module where the first non-finite value
appeared.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import NaNGuard


class LogFeatures(nn.Module):
    """log of positive features (a common transform for counts or prices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(LogFeatures(), nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 1))
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"].detach()))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(512, 4, generator=g) * 10 + 0.1
    y = torch.log(x).sum(dim=1, keepdim=True)
    x[200, 2] = 0.0  # one bad record: batch 6 of every epoch (batch size 32)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def fit(callbacks: list[pl.Callback], steps: int, root: str) -> Regressor:
    torch.manual_seed(0)
    model = Regressor()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    trainer.fit(model, data())
    return model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--root", default="runs/before_after", help="where the diagnosis report goes")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the output to what matters here
    warnings.filterwarnings("ignore", module="lightning")

    print("== without NaNGuard ==")
    before = fit([], args.steps, args.root)
    finite_before = all(bool(torch.isfinite(p).all()) for p in before.parameters())
    first_nan = next(i for i, v in enumerate([*before.losses, float("nan")]) if v != v)
    print(
        f"loss: {before.losses[0]:.3g} at step 0, NaN from step {first_nan} on; last loss {before.losses[-1]:.4g}; "
        f"weights finite: {finite_before}"
    )

    print("\n== with NaNGuard(action='skip') ==")
    guard = NaNGuard(action="skip")
    after = fit([guard], args.steps, args.root)
    finite_after = all(bool(torch.isfinite(p).all()) for p in after.parameters())
    print(
        f"loss: {after.losses[0]:.3g} at step 0, last loss {after.losses[-1]:.4g}; weights finite: {finite_after}; "
        f"skipped steps: {guard.skipped_steps}"
    )
    return {
        "before_last_loss": before.losses[-1],
        "before_finite": finite_before,
        "after_last_loss": after.losses[-1],
        "after_finite": finite_after,
        "skipped": guard.skipped_steps,
        "findings": [f.to_dict() for f in guard.findings],
    }


if __name__ == "__main__":
    main()
