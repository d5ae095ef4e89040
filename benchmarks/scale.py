"""How the suite's per-step cost grows with the number of parameter tensors and with model size.

    python benchmarks/scale.py [--steps 40] [--rounds 3] [--ddp]

An MLP of ``layers`` Linear layers of width ``width`` (``2 * layers`` parameter tensors) trains with and without
the gradient-path callbacks (GradNormMonitor + GradClip + NaNGuard + WarmupCosine: the ones that touch every
tensor each step). Each round runs both configurations back to back; the table gives the median over rounds of
the ratio of median step times, and the time spent inside the lightning_diag hooks per step (steady on a noisy
machine), per tensor where it helps. ``--ddp`` runs the same on 2 CPU processes (gloo); rank 0 prints.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import Spent, StepTimer, time_hooks

from lightning_diag import GradClip, GradNormMonitor, NaNGuard, WarmupCosine

warnings.filterwarnings("ignore")

#: (label, layers, width): 10 -> 1,000 tensors at a small width, then a growing width at 16 tensors.
SHAPES = [
    ("10 tensors, width 64", 5, 64),
    ("100 tensors, width 64", 50, 64),
    ("1000 tensors, width 64", 500, 64),
    ("16 tensors, width 256", 8, 256),
    ("16 tensors, width 1024", 8, 1024),
]


class MLP(pl.LightningModule):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        blocks: list[nn.Module] = []
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, width), nn.Tanh()]
        self.net = nn.Sequential(*blocks, nn.Linear(width, width))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def suite() -> list[pl.Callback]:
    return [WarmupCosine(warmup_steps=5), GradNormMonitor(depth=2), GradClip(max_norm=1.0), NaNGuard()]


def run(layers: int, width: int, steps: int, with_suite: bool, ddp: bool) -> tuple[float, float]:
    callbacks = suite() if with_suite else []
    spent = Spent()
    time_hooks(callbacks, spent)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_steps=steps + 6,
        logger=False,
        log_every_n_steps=50,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[timer, *callbacks],
    )
    data = TensorDataset(torch.randn(32 * (steps + 6), width))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(MLP(layers, width), DataLoader(data, batch_size=32))
    return statistics.median(timer.step_times(5)), spent.total / max(trainer.global_step, 1)


def main(argv: list[str] | None = None) -> list[tuple[str, float, float, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ddp", action="store_true", help="2 CPU processes over gloo")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="run the first N shapes only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for label, layers, width in SHAPES[: args.shapes]:
        ratios, hooks, bare_steps = [], [], []
        for _ in range(args.rounds):
            bare, _ = run(layers, width, args.steps, False, args.ddp)
            with_suite, in_hooks = run(layers, width, args.steps, True, args.ddp)
            ratios.append(with_suite / bare)
            hooks.append(in_hooks)
            bare_steps.append(bare)
        rows.append(
            (label, statistics.median(bare_steps), statistics.median(ratios), statistics.median(hooks))
        )
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(
            f"\n{'2-process DDP' if args.ddp else 'single process'}, {args.steps} steps, {args.rounds} rounds"
        )
        print("| model | bare step | suite vs bare | in hooks per step | in hooks per tensor |")
        print("|---|---|---|---|---|")
        for (label, bare, ratio, hook), (_, layers, _) in zip(rows, SHAPES, strict=False):
            print(
                f"| {label} | {bare * 1e3:.2f} ms | {ratio:.3f}x | {hook * 1e6:.0f} µs | {hook * 1e6 / (2 * layers):.1f} µs |"
            )
    return rows


if __name__ == "__main__":
    main()
