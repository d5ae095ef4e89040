"""Per-step overhead of lightning_diag callbacks, as ratios against a bare Trainer in the same process.

    python benchmarks/overhead.py [--steps 100] [--rounds 10] [--threads 1] [--workloads mlp12 transformer]

Every configuration trains the same model for ``--steps`` optimizer steps; a timer (first in the callbacks list)
records the wall time between consecutive ``on_train_batch_start`` calls, so everything a step does is inside
(callbacks' ``on_train_batch_end`` and logging flushes included). Every round runs each configuration once, in a
shuffled order, and divides its median step time (a step that does not log) and its mean step time (logging steps
included, every ``log_every_n_steps=50``) by those of the bare run *of the same round*: pairing cancels the slow
drift of a shared machine, which is larger than the effects measured here. The table gives the median of the
per-round ratios and, in brackets, their lowest and highest value. The last column is steadier: the wall time
spent inside the lightning_diag callbacks' per-step hooks (logging steps included), per optimizer step, also
written as a share of the bare step time; for the references, the time inside the LightningModule hook that
does their work (``on_before_optimizer_step``, ``configure_gradient_clipping``). It leaves out second-order effects (caches), which the end-to-end
ratios include. References: Lightning's ``grad_norm`` utility logged
with ``log_dict`` every step (the documented replacement for ``track_grad_norm``),
``Trainer(gradient_clip_val=1.0)`` and ``Trainer(detect_anomaly=True)`` (autograd's anomaly mode, the built-in
way to locate a NaN, which NaNGuard replaces).
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

from lightning_diag import (
    EarlyStop,
    GradClip,
    GradNormMonitor,
    NaNGuard,
    SilentBugDetector,
    SpeedMonitor,
    WarmupCosine,
)

warnings.filterwarnings("ignore")


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def step_times(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.starts[skip:], self.starts[skip + 1 :], strict=False)]


HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
)


def time_hooks(callbacks: list[pl.Callback], spent: list[float]) -> None:
    """Wrap the per-step hooks of ``callbacks`` (on the instances) so their wall time adds up in ``spent[0]``."""
    for callback in callbacks:
        for hook in HOOKS:
            _time_method(callback, hook, spent)


def _time_method(obj: Any, name: str, spent: list[float]) -> None:
    original = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    setattr(obj, name, timed)


class Workload(pl.LightningModule):
    def __init__(
        self, net: nn.Module, loss: Callable[..., torch.Tensor], log_lightning_grad_norm: bool = False
    ) -> None:
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
    "SpeedMonitor": lambda: {"callbacks": [SpeedMonitor()]},
    "NaNGuard": lambda: {"callbacks": [NaNGuard()]},
    "NaNGuard(rollback, snapshot_every=100)": lambda: {"callbacks": [NaNGuard(action="rollback")]},
    "SilentBugDetector": lambda: {"callbacks": [SilentBugDetector()]},
    "whole suite": lambda: {
        "callbacks": [
            WarmupCosine(warmup_ratio=0.05),
            GradNormMonitor(),
            GradClip(max_norm=1.0),
            NaNGuard(),
            EarlyStop(monitor="train_loss", strict=False),
            SpeedMonitor(),
            SilentBugDetector(),
        ]
    },
    "Lightning grad_norm+log_dict": lambda: {"lightning_grad_norm": True},
    "Trainer(gradient_clip_val=1.0)": lambda: {"gradient_clip_val": 1.0},
    "Trainer(detect_anomaly=True)": lambda: {"detect_anomaly": True},
}


def run_once(workload: str, config: str, steps: int, warmup: int, root: str) -> tuple[list[float], float]:
    """Step times after warm-up, and the seconds spent inside the lightning_diag hooks per step."""
    build, batch_size = WORKLOADS[workload]
    torch.manual_seed(0)
    net, loss, data = build()
    options = CONFIGS[config]()
    timer = StepTimer()
    spent = [0.0]
    time_hooks(options.get("callbacks", []), spent)
    model = Workload(net, loss, log_lightning_grad_norm=options.pop("lightning_grad_norm", False))
    # The references do their work in LightningModule hooks: time those the same way.
    if model.log_lightning_grad_norm:
        _time_method(model, "on_before_optimizer_step", spent)
    if options.get("gradient_clip_val"):
        _time_method(model, "configure_gradient_clipping", spent)
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
    return timer.step_times(warmup), spent[0] / max(trainer.global_step, 1)


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps at the start of each run")
    parser.add_argument(
        "--rounds", type=int, default=10, help="interleaved repetitions of every configuration"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 by default: on a small shared machine, a second thread makes the timings "
        "swing by tens of percent from one run to the next)",
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    if "bare" not in args.configs:
        args.configs.insert(0, "bare")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(previous_threads)


def _measure(args: argparse.Namespace) -> dict[str, dict[str, tuple[float, float]]]:
    rng = random.Random(0)
    results: dict[str, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for workload in args.workloads:
            median_ratios: dict[str, list[float]] = {c: [] for c in args.configs}
            mean_ratios: dict[str, list[float]] = {c: [] for c in args.configs}
            in_hooks: dict[str, list[float]] = {c: [] for c in args.configs}
            bare_steps: list[float] = []
            for _ in range(args.rounds):
                order = list(args.configs)
                rng.shuffle(order)
                runs = {config: run_once(workload, config, args.steps, args.warmup, root) for config in order}
                bare_median = statistics.median(runs["bare"][0])
                bare_mean = statistics.fmean(runs["bare"][0])
                bare_steps.append(bare_median)
                for config, (times, hook_seconds) in runs.items():
                    median_ratios[config].append(statistics.median(times) / bare_median)
                    mean_ratios[config].append(statistics.fmean(times) / bare_mean)
                    in_hooks[config].append(hook_seconds)
            bare_step = statistics.median(bare_steps)
            results[workload] = {
                c: (statistics.median(median_ratios[c]), statistics.median(mean_ratios[c]))
                for c in args.configs
            }
            print(f"\n{workload}: bare step {bare_step * 1e3:.2f} ms (median over rounds)")
            print(
                "| configuration | median step vs bare [min, max] | mean step vs bare [min, max] "
                "| in lightning_diag hooks per step |"
            )
            print("|---|---|---|---|")
            for config in args.configs:
                med, mean = median_ratios[config], mean_ratios[config]
                hooks = statistics.median(in_hooks[config])
                hook_cell = f"{hooks * 1e6:.0f} µs = 1 + {hooks / bare_step:.3f}" if hooks else "-"
                print(
                    f"| {config} | {statistics.median(med):.3f}x [{min(med):.2f}, {max(med):.2f}] "
                    f"| {statistics.median(mean):.3f}x [{min(mean):.2f}, {max(mean):.2f}] | {hook_cell} |"
                )
    return results


if __name__ == "__main__":
    main()
