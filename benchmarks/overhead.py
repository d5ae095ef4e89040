"""Per-step overhead of lightning_diag callbacks, as ratios against a bare Trainer in the same process.

    python benchmarks/overhead.py [--steps 200] [--rounds 5] [--workloads mlp12 transformer]

Every configuration trains the same model for ``--steps`` optimizer steps; a timer (first in the callbacks list)
records the wall time between consecutive ``on_train_batch_start`` calls, so everything a step does is inside
(callbacks' ``on_train_batch_end`` and logging flushes included). Configurations are interleaved in a shuffled
order every round, so drift of the machine hits all of them alike. For each configuration the table gives the
median step time (a step that does not log) and the mean (logging steps included, every ``log_every_n_steps=50``),
each as a ratio to the bare Trainer of the same workload. References: Lightning's ``grad_norm`` utility logged
with ``log_dict`` every step (the documented replacement for ``track_grad_norm``) and
``Trainer(gradient_clip_val=1.0)``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import EarlyStop, GradClip, GradNormMonitor, WarmupCosine

warnings.filterwarnings("ignore")


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def step_times(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.starts[skip:], self.starts[skip + 1 :], strict=False)]


class Workload(pl.LightningModule):
    def __init__(self, net: nn.Module, loss: Callable[..., torch.Tensor], log_lightning_grad_norm: bool = False) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss
        self.log_lightning_grad_norm = log_lightning_grad_norm

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.log_lightning_grad_norm:
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def mlp12() -> tuple[nn.Module, Callable[..., torch.Tensor], TensorDataset]:
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(256, 10))
    data = TensorDataset(torch.randn(4096, 256), torch.randint(0, 10, (4096,)))
    return net, nn.functional.cross_entropy, data


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 128, d_model: int = 64, layers: int = 2, seq: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        block = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + self.pos)).flatten(0, 1)


def transformer() -> tuple[nn.Module, Callable[..., torch.Tensor], TensorDataset]:
    tokens = torch.randint(0, 128, (2048, 33))
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:].reshape(len(tokens), -1))
    return TinyTransformer(), lambda out, y: nn.functional.cross_entropy(out, y.flatten()), data


WORKLOADS = {"mlp12": (mlp12, 64), "transformer": (transformer, 16)}

CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "bare": lambda: {},
    "GradNormMonitor": lambda: {"callbacks": [GradNormMonitor()]},
    "GradClip(norm)": lambda: {"callbacks": [GradClip(max_norm=1.0)]},
    "GradNormMonitor+GradClip": lambda: {"callbacks": [GradNormMonitor(), GradClip(max_norm=1.0)]},
    "whole suite": lambda: {
        "callbacks": [
            WarmupCosine(warmup_ratio=0.05),
            GradNormMonitor(),
            GradClip(max_norm=1.0),
            EarlyStop(monitor="train_loss", strict=False),
        ]
    },
    "Lightning grad_norm+log_dict": lambda: {"lightning_grad_norm": True},
    "Trainer(gradient_clip_val=1.0)": lambda: {"gradient_clip_val": 1.0},
}


def run_once(workload: str, config: str, steps: int, warmup: int, root: str) -> list[float]:
    build, batch_size = WORKLOADS[workload]
    torch.manual_seed(0)
    net, loss, data = build()
    options = CONFIGS[config]()
    timer = StepTimer()
    model = Workload(net, loss, log_lightning_grad_norm=options.pop("lightning_grad_norm", False))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + warmup + 1,
        logger=CSVLogger(root, name=f"{workload}-{config}"),
        log_every_n_steps=50,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[timer, *options.pop("callbacks", [])],
        **options,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the end-of-fit diagnosis summary of every run
        trainer.fit(model, DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True))
    return timer.step_times(warmup)


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of every configuration")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    if "bare" not in args.configs:
        args.configs.insert(0, "bare")
    rng = random.Random(0)
    results: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for workload in args.workloads:
            medians: dict[str, list[float]] = {c: [] for c in args.configs}
            means: dict[str, list[float]] = {c: [] for c in args.configs}
            for _ in range(args.rounds):
                order = list(args.configs)
                rng.shuffle(order)
                for config in order:
                    times = run_once(workload, config, args.steps, args.warmup, root)
                    medians[config].append(statistics.median(times))
                    means[config].append(statistics.fmean(times))
            bare_median = statistics.median(medians["bare"])
            bare_mean = statistics.median(means["bare"])
            results[workload] = {
                c: (statistics.median(medians[c]) / bare_median, statistics.median(means[c]) / bare_mean) for c in args.configs
            }
            print(f"\n{workload}: bare step {bare_median * 1e3:.2f} ms (median), {bare_mean * 1e3:.2f} ms (mean)")
            print("| configuration | median step vs bare | mean step vs bare |")
            print("|---|---|---|")
            for config, (median_ratio, mean_ratio) in results[workload].items():
                print(f"| {config} | {median_ratio:.3f}x | {mean_ratio:.3f}x |")
    return results


if __name__ == "__main__":
    main()
