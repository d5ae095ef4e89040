"""Per-step overhead of lightning_diag callbacks, as ratios against a bare Trainer in the same process.

    python benchmarks/overhead.py [--steps 100] [--rounds 10] [--threads 1] [--workloads mlp12 transformer gpt]
                                  [--write-docs]

``--write-docs`` also writes the tables, with the settings and versions they were measured with, into
``docs/generated/overhead.md``, the one copy the documentation includes (every workload and configuration only).

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

Also per configuration: the host time inside the lightning_diag hooks split into quiet steps and logging steps
(median µs), the host-device synchronisations our hooks make on a quiet step (a separate short audit run,
each hook under :class:`lightning_diag.testing.HostSyncCounter`), and the end-of-fit
cost (``on_train_end`` + ``on_fit_end``: the report, plots) that a short run pays once. ``gpt`` is a GPT-style
decoder with 102 parameter tensors, the size where per-tensor Python work would show.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import platform
import random
import statistics
import sys
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
    ActivationMonitor,
    EarlyStop,
    GradClip,
    GradNormMonitor,
    HangWatchdog,
    MemoryMonitor,
    NaNGuard,
    SilentBugDetector,
    SpeedMonitor,
    WarmupCosine,
)
from lightning_diag.testing import SyncAudit
from lightning_diag.testing.syncs import STEP_HOOKS

warnings.filterwarnings("ignore")


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []
        self.spent: Spent | None = None

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.starts.append(time.perf_counter())
        if self.spent is not None:
            self.spent.index = trainer.global_step

    def step_times(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.starts[skip:], self.starts[skip + 1 :], strict=False)]


HOOKS = STEP_HOOKS
END_HOOKS = ("on_train_end", "on_fit_end")


class Spent:
    """Seconds inside timed hooks, per optimizer step (``index`` is set by the step timer) and at fit end."""

    def __init__(self) -> None:
        self.index = 0
        self.by_step: dict[int, float] = {}
        self.end = 0.0

    def add(self, seconds: float) -> None:
        self.by_step[self.index] = self.by_step.get(self.index, 0.0) + seconds

    @property
    def total(self) -> float:
        return sum(self.by_step.values())


def time_hooks(callbacks: list[pl.Callback], spent: Spent) -> None:
    """Wrap the hooks of ``callbacks`` (on the instances) so their wall time adds up in ``spent``."""
    for callback in callbacks:
        for hook in HOOKS:
            _time_method(callback, hook, spent.add)
        for hook in END_HOOKS:
            _time_method(callback, hook, lambda seconds: setattr(spent, "end", spent.end + seconds))


def _time_method(obj: Any, name: str, add: Callable[[float], None]) -> None:
    original = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            add(time.perf_counter() - start)

    setattr(obj, name, timed)


class Workload(pl.LightningModule):
    def __init__(
        self,
        net: nn.Module,
        loss: Callable[..., torch.Tensor],
        log_lightning_grad_norm: bool = False,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss
        self.log_lightning_grad_norm = log_lightning_grad_norm
        self.fused = fused

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.log_lightning_grad_norm:
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=self.fused)


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


class TinyGPT(nn.Module):
    """A pre-norm decoder (causal self-attention), GPT-style: 8 blocks, 102 parameter tensors."""

    def __init__(self, vocab: int = 256, d_model: int = 64, layers: int = 8, seq: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        block = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True, norm_first=True, dropout=0.0
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.tok(x) + self.pos, mask=self.mask, is_causal=True)
        return self.head(self.ln(h)).flatten(0, 1)


def gpt() -> tuple[nn.Module, Callable[..., torch.Tensor], TensorDataset]:
    tokens = torch.randint(0, 256, (2048, 33))
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:].reshape(len(tokens), -1))
    return TinyGPT(), lambda out, y: nn.functional.cross_entropy(out, y.flatten()), data


WORKLOADS = {"mlp12": (mlp12, 64), "transformer": (transformer, 16), "gpt": (gpt, 8)}

CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "bare": lambda: {},
    "GradNormMonitor": lambda: {"callbacks": [GradNormMonitor()]},
    "GradClip(norm)": lambda: {"callbacks": [GradClip(max_norm=1.0)]},
    "GradNormMonitor+GradClip": lambda: {"callbacks": [GradNormMonitor(), GradClip(max_norm=1.0)]},
    "SpeedMonitor": lambda: {"callbacks": [SpeedMonitor()]},
    "NaNGuard": lambda: {"callbacks": [NaNGuard()]},
    "NaNGuard(rollback, snapshot_every_n_steps=100)": lambda: {"callbacks": [NaNGuard(action="rollback")]},
    "SilentBugDetector": lambda: {"callbacks": [SilentBugDetector()]},
    "HangWatchdog": lambda: {"callbacks": [HangWatchdog()]},
    "MemoryMonitor": lambda: {"callbacks": [MemoryMonitor()]},
    # quiet steps: the gradient rows; logging (= check) steps: the forward hooks and the one read
    "ActivationMonitor": lambda: {"callbacks": [ActivationMonitor()]},
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
    "bare, fused AdamW": lambda: {"fused": True},  # the reference of the fused configuration
    "whole suite, fused AdamW": lambda: {
        "fused": True,
        "callbacks": [
            WarmupCosine(warmup_ratio=0.05),
            GradNormMonitor(),
            GradClip(max_norm=1.0),
            NaNGuard(),  # skip, withheld on the device: no host read per step
            EarlyStop(monitor="train_loss", strict=False),
            SpeedMonitor(),
        ],
    },
    "NaNGuard(warn)": lambda: {"callbacks": [NaNGuard(action="warn")]},
    "Lightning grad_norm+log_dict": lambda: {"lightning_grad_norm": True},
    "Trainer(gradient_clip_val=1.0)": lambda: {"gradient_clip_val": 1.0},
    "Trainer(detect_anomaly=True)": lambda: {"detect_anomaly": True},
}


LOG_EVERY = 50


@dataclasses.dataclass
class Run:
    """One fit of one configuration."""

    step_times: list[float]  # wall time per step after warm-up
    hook_quiet: float  # median seconds in lightning_diag hooks on a step that does not log
    hook_logging: float  # the same on logging steps
    hook_mean: float  # mean seconds in hooks per step (logging steps included)
    end: float  # seconds in on_train_end + on_fit_end


def build_run(
    workload: str, config: str, max_steps: int, root: str, extra: list[pl.Callback]
) -> tuple[pl.Trainer, Workload, DataLoader, Spent]:
    build, batch_size = WORKLOADS[workload]
    torch.manual_seed(0)
    net, loss, data = build()
    options = CONFIGS[config]()
    spent = Spent()
    time_hooks(options.get("callbacks", []), spent)
    model = Workload(
        net,
        loss,
        log_lightning_grad_norm=options.pop("lightning_grad_norm", False),
        fused=options.pop("fused", False),
    )
    # The references do their work in LightningModule hooks: time those the same way.
    if model.log_lightning_grad_norm:
        _time_method(model, "on_before_optimizer_step", spent.add)
    if options.get("gradient_clip_val"):
        _time_method(model, "configure_gradient_clipping", spent.add)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=CSVLogger(root, name=f"{workload}-{config}"),
        log_every_n_steps=LOG_EVERY,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[extra[0], *options.pop("callbacks", []), *extra[1:]],
        **options,
    )
    return trainer, model, DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True), spent


def run_once(workload: str, config: str, steps: int, warmup: int, root: str) -> Run:
    """Step times after warm-up, and the seconds spent inside the lightning_diag hooks."""
    timer = StepTimer()
    trainer, model, loader, spent = build_run(workload, config, steps + warmup + 1, root, [timer])
    timer.spent = spent
    with contextlib.redirect_stdout(io.StringIO()):  # the end-of-fit diagnosis summary of every run
        trainer.fit(model, loader)
    timed = {k: v for k, v in spent.by_step.items() if k >= warmup}
    quiet = [v for k, v in timed.items() if (k + 1) % LOG_EVERY != 0]
    logging = [v for k, v in timed.items() if (k + 1) % LOG_EVERY == 0]
    return Run(
        step_times=timer.step_times(warmup),
        hook_quiet=statistics.median(quiet) if quiet else 0.0,
        hook_logging=statistics.median(logging) if logging else 0.0,
        hook_mean=spent.total / max(trainer.global_step, 1),
        end=spent.end,
    )


def syncs_per_quiet_step(workload: str, config: str, root: str, steps: int = 12) -> float:
    """Host syncs on a quiet step (median over the quiet steps of a short audited run)."""
    audit = SyncAudit()
    trainer, model, loader, _ = build_run(workload, config, steps, root, [audit])
    audit.watch([c for c in trainer.callbacks if c.__module__.startswith("lightning_diag")])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(model, loader)
    quiet = [n for k, n in audit.per_step.items() if k >= 2 and (k + 1) % LOG_EVERY != 0]
    return statistics.median(quiet) if quiet else 0.0


#: the documentation's copy of the tables (``--write-docs``)
DOCS_TABLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "generated", "overhead.md"
)


def write_docs(tables: list[str], args: argparse.Namespace, argv: list[str], path: str = DOCS_TABLE) -> None:
    """Write the tables to the documentation's generated file, with the command, settings and versions."""
    command = " ".join(["python", "benchmarks/overhead.py", *argv])
    day = time.strftime("%Y-%m-%d")
    header = f"<!-- generated by `{command}` on {day}: rerun it, do not edit by hand -->"
    settings = (
        f"Measured on {day} with `{command}`: {args.rounds} rounds of {args.steps} steps (after {args.warmup} "
        f"untimed), {args.threads} torch thread(s), `log_every_n_steps={LOG_EVERY}`, {os.cpu_count()} CPUs "
        f"({platform.machine()}), torch {torch.__version__}, lightning {pl.__version__}, no GPU."
    )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n\n".join([header + "\n" + settings, *tables]) + "\n")


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
    parser.add_argument(
        "--no-syncs", dest="syncs", action="store_false", help="skip the host-sync audit runs"
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="write the tables to docs/generated/overhead.md"
    )
    args = parser.parse_args(argv)
    if args.write_docs and (set(args.workloads) != set(WORKLOADS) or set(args.configs) != set(CONFIGS)):
        parser.error("--write-docs needs every workload and configuration (no --workloads, no --configs)")
    if "bare" not in args.configs:
        args.configs.insert(0, "bare")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results, tables = _measure(args)
    finally:
        torch.set_num_threads(previous_threads)
    if args.write_docs:
        write_docs(tables, args, sys.argv[1:] if argv is None else list(argv))
        print(f"wrote {DOCS_TABLE}")
    return results


def _measure(args: argparse.Namespace) -> tuple[dict[str, dict[str, tuple[float, float]]], list[str]]:
    """The ratios per workload and configuration, and one Markdown table per workload (also printed)."""
    rng = random.Random(0)
    results: dict[str, dict[str, tuple[float, float]]] = {}
    tables: list[str] = []
    with tempfile.TemporaryDirectory() as root:
        for workload in args.workloads:
            median_ratios: dict[str, list[float]] = {c: [] for c in args.configs}
            mean_ratios: dict[str, list[float]] = {c: [] for c in args.configs}
            quiet: dict[str, list[float]] = {c: [] for c in args.configs}
            logging_steps: dict[str, list[float]] = {c: [] for c in args.configs}
            ends: dict[str, list[float]] = {c: [] for c in args.configs}
            bare_steps: list[float] = []
            for _ in range(args.rounds):
                order = list(args.configs)
                rng.shuffle(order)
                runs = {config: run_once(workload, config, args.steps, args.warmup, root) for config in order}
                bare_median = statistics.median(runs["bare"].step_times)
                bare_mean = statistics.fmean(runs["bare"].step_times)
                bare_steps.append(bare_median)
                for config, run in runs.items():
                    median_ratios[config].append(statistics.median(run.step_times) / bare_median)
                    mean_ratios[config].append(statistics.fmean(run.step_times) / bare_mean)
                    quiet[config].append(run.hook_quiet)
                    logging_steps[config].append(run.hook_logging)
                    ends[config].append(run.end)
            syncs = {c: syncs_per_quiet_step(workload, c, root) for c in args.configs} if args.syncs else {}
            bare_step = statistics.median(bare_steps)
            results[workload] = {
                c: (statistics.median(median_ratios[c]), statistics.median(mean_ratios[c]))
                for c in args.configs
            }
            lines = [
                f"**{workload}** (bare step {bare_step * 1e3:.2f} ms, median over rounds):",
                "",
                "| configuration | median step vs bare [min, max] | mean step vs bare [min, max] "
                "| in hooks, quiet step | in hooks, logging step | host syncs per quiet step | end of fit |",
                "|---|---|---|---|---|---|---|",
            ]
            for config in args.configs:
                med, mean = median_ratios[config], mean_ratios[config]
                q, lg = statistics.median(quiet[config]), statistics.median(logging_steps[config])
                quiet_cell = f"{q * 1e6:.0f} µs = {q / bare_step:.1%}" if q else "-"
                logging_cell = f"{lg * 1e6:.0f} µs" if lg else "-"
                sync_cell = f"{syncs[config]:g}" if syncs else "not measured"
                end = statistics.median(ends[config])
                end_cell = f"{end * 1e3:.0f} ms" if end else "-"
                lines.append(
                    f"| {config} | {statistics.median(med):.3f}x [{min(med):.2f}, {max(med):.2f}] "
                    f"| {statistics.median(mean):.3f}x [{min(mean):.2f}, {max(mean):.2f}] | {quiet_cell} "
                    f"| {logging_cell} | {sync_cell} | {end_cell} |"
                )
            tables.append("\n".join(lines))
            print("\n" + tables[-1], flush=True)
    return results, tables


if __name__ == "__main__":
    main()
