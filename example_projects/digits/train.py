"""The same recipe in plain Python: `python example_projects/digits/train.py [--max-epochs N] [--root DIR]`."""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import (
    EarlyStop,
    GradClip,
    GradNormMonitor,
    NaNGuard,
    SanityCheck,
    SpeedMonitor,
    WarmupCosine,
    collect_findings,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits import DigitsClassifier, DigitsDataModule


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--root", default="runs/digits")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        log_every_n_steps=5,
        default_root_dir=args.root,
        logger=TensorBoardLogger(args.root, name="tb"),
        callbacks=[
            SanityCheck(overfit_batch_steps=30),
            WarmupCosine(warmup_ratio=0.05, min_lr_ratio=0.01),
            GradNormMonitor(depth=2, exploding_threshold=100.0),
            GradClip(algorithm="norm", max_norm=5.0),
            NaNGuard(action="skip"),
            SpeedMonitor(),
            EarlyStop(monitor="val_loss", patience=5, min_delta=0.001),
            ModelCheckpoint(monitor="val_loss", mode="min", save_top_k=1),
        ],
    )
    trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
    print(
        f"{len(collect_findings(trainer))} finding(s); val_acc = {float(trainer.callback_metrics['val_acc']):.3f}"
    )
    return trainer


if __name__ == "__main__":
    main()
