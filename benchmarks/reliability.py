"""Reliability matrix: every callback on every legal Lightning pattern, exact resume, bad arguments.

    python benchmarks/reliability.py [--part pattern resume args contain] [-k SUBSTRING] [--markdown] [-v]

Four parts, each a list of *cells* defined here and shared with ``tests/test_reliability.py`` (one definition):

* **pattern**: each callback x pattern (automatic/manual optimization with one or two optimizers, ``training_step``
  returning ``None`` or a dict or reading ``self.trainer``, frozen modules, sparse and complex gradients,
  ``fast_dev_run``, ``overfit_batches``, ``limit_train_batches``, no validation loop, ``validate``/``test`` only,
  one instance used for two fits and by two Trainers) on a real, tiny, healthy Trainer run. A cell passes when
  the run completes, records no warning/error finding (a false alarm on a healthy model), no ``internal_error``,
  every LightningDiagWarning comes with an info finding of the same callback (a clean decline), the observers
  leave the final weights bit-identical to a run without them, and the callback's own job is done right
  (gradient norms equal a reference, clipped norms under the cap, the learning rate follows the schedule of
  each optimizer...).
* **resume**: each callback alone, a bare run (the control) and the whole suite, resumed from a checkpoint taken
  mid-epoch or at an epoch boundary, with no fault, or with a step skipped or rolled back (NaNGuard) before the
  checkpoint. The resumed run must give the uninterrupted run's batches, learning-rate sequence, callback state
  (decisions and findings) and final weights, bit for bit (CPU).
* **args**: bad constructor arguments (wrong types, out of range, contradictions, arguments the chosen mode
  ignores) must raise an error that is both a ``ValueError`` and Lightning's ``MisconfigurationException`` and
  names the argument(s); good ones must construct silently.
* **contain**: a bug injected into each hook each callback implements: the run goes on to the end, one
  ``internal_error`` finding names the hook with the exception and traceback, a LightningDiagWarning says the
  callback disabled itself, the checkpoint and ``diagnosis.json`` are still written and its summary says so.

The last line is ``N passed, M failed``. ``--markdown`` prints the support matrix from the pattern cells;
``--write-docs`` writes it into ``docs/generated/support_matrix.md``, the one copy the documentation includes
(``python benchmarks/reliability.py --part pattern --write-docs`` regenerates it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_diag
from lightning_diag import (
    EarlyStop,
    GradClip,
    GradNormMonitor,
    LightningDiagWarning,
    NaNGuard,
    OverfitDetector,
    SanityCheck,
    SilentBugDetector,
    SpeedMonitor,
    WarmupCosine,
    collect_findings,
)

CALLBACKS = (
    "GradNormMonitor",
    "NaNGuard",
    "OverfitDetector",
    "EarlyStop",
    "WarmupCosine",
    "GradClip",
    "SpeedMonitor",
    "SanityCheck",
    "SilentBugDetector",
)
CLASSES: dict[str, type] = {
    "GradNormMonitor": GradNormMonitor,
    "NaNGuard": NaNGuard,
    "OverfitDetector": OverfitDetector,
    "EarlyStop": EarlyStop,
    "WarmupCosine": WarmupCosine,
    "SilentBugDetector": SilentBugDetector,
    "GradClip": GradClip,
    "SpeedMonitor": SpeedMonitor,
    "SanityCheck": SanityCheck,
}
#: Callbacks that only watch: with them the final weights must equal those of a run without them.
OBSERVERS = (
    "GradNormMonitor",
    "NaNGuard",
    "OverfitDetector",
    "SpeedMonitor",
    "SanityCheck",
    "SilentBugDetector",
)

PATTERNS = (
    "auto",
    "manual1",
    "manual2",
    "manual2_every_k",
    "none_some",
    "none_first",
    "dict",
    "reads_trainer",
    "frozen",
    "sparse_sgd",
    "sparse_adam",
    "complex",
    "fast_dev_run",
    "overfit_batches",
    "limit_train_batches",
    "no_val",
    "validate_only",
    "test_only",
    "two_fits",
    "two_trainers",
)
PATTERN_TITLES = {
    "auto": "automatic optimization",
    "manual1": "manual, 1 optimizer",
    "manual2": "manual, 2 optimizers every batch",
    "manual2_every_k": "manual, 2 optimizers, one every 2 batches",
    "none_some": "`training_step` returns None (some batches)",
    "none_first": "`training_step` returns None (first batch)",
    "dict": "`training_step` returns a dict",
    "reads_trainer": "`training_step` reads `self.trainer`",
    "frozen": "frozen sub-module",
    "sparse_sgd": "sparse gradients (SGD)",
    "sparse_adam": "sparse gradients (SparseAdam)",
    "complex": "complex parameters",
    "fast_dev_run": "`fast_dev_run`",
    "overfit_batches": "`overfit_batches`",
    "limit_train_batches": "`limit_train_batches`",
    "no_val": "no validation loop",
    "validate_only": "`validate` only",
    "test_only": "`test` only",
    "two_fits": "one instance, two fits",
    "two_trainers": "one instance, two Trainers",
}
MANUAL = ("manual1", "manual2", "manual2_every_k")
TWO_OPTIMIZERS = ("manual2", "manual2_every_k")
SPARSE = ("sparse_sgd", "sparse_adam")
VOCAB = 24
FEATURES = 8


def parameters(cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__init__).parameters)


def arg(cls: type, name: str) -> str:
    """``name``, checked against the constructor (a renamed argument is a harness error, not a silent pass)."""
    if name not in parameters(cls):
        raise KeyError(f"{cls.__name__} takes no argument `{name}`")
    return name


# ---------------------------------------------------------------------------------------------------------------
# data and models
# ---------------------------------------------------------------------------------------------------------------
class ResumableLoader(DataLoader):
    """A DataLoader that resumes mid-epoch (Lightning's ``state_dict``/``load_state_dict`` loader protocol).

    At a checkpoint taken in ``on_train_batch_end`` the batches drawn are the batches trained on (Lightning 2.6
    draws the next one later), so a resumed epoch skips that many.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drawn = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        self._drawn = 0
        for index, batch in enumerate(super().__iter__()):
            self._drawn = index + 1
            if index < skip:
                continue
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self._drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        drawn = int(state.get("drawn", 0))
        self._skip = 0 if drawn >= len(self) else drawn


def dataset(pattern: str, n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y_noise = 0.1 * torch.randn(n, 1, generator=g)
    if pattern in SPARSE:
        x = torch.randint(0, VOCAB, (n, 3), generator=g)
        table = torch.randn(VOCAB, generator=g)
        return TensorDataset(x, table[x].sum(1, keepdim=True) + y_noise)
    x = torch.randn(n, FEATURES, generator=g)
    w = torch.randn(FEATURES, 1, generator=g)
    return TensorDataset(x, torch.tanh(x @ w) + y_noise)


def loader(pattern: str, n: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return ResumableLoader(dataset(pattern, n, seed), batch_size=batch_size, shuffle=False)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))


class Net(pl.LightningModule):
    """One small regressor whose training code follows ``pattern``; ``fault_steps``: global steps with a NaN loss."""

    def __init__(self, pattern: str = "auto", fault_steps: tuple[int, ...] = (), lr: float = 0.05) -> None:
        super().__init__()
        self.pattern = pattern
        self.fault_steps = tuple(fault_steps)
        self.lr = lr
        self.automatic_optimization = pattern not in MANUAL
        if pattern in TWO_OPTIMIZERS:
            self.gen = mlp()
            self.disc = mlp()
        elif pattern in SPARSE:
            self.emb = nn.Embedding(VOCAB, 4, sparse=True)
            if pattern == "sparse_sgd":
                self.head = nn.Linear(4, 1)
            else:  # SparseAdam takes sparse gradients only: no dense parameter
                self.register_buffer("proj", torch.ones(4, 1) / 2)
        elif pattern == "complex":
            self.w = nn.Parameter(torch.randn(FEATURES, 4, dtype=torch.cfloat) * 0.3)
            self.head = nn.Linear(4, 1)
        else:
            self.net = mlp()
            if pattern == "frozen":
                self.net[0].requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern in TWO_OPTIMIZERS:
            return self.gen(x)
        if self.pattern == "sparse_sgd":
            return self.head(self.emb(x).mean(1))
        if self.pattern == "sparse_adam":
            return self.emb(x).mean(1) @ self.proj
        if self.pattern == "complex":
            return self.head((x.to(torch.cfloat) @ self.w).abs())
        return self.net(x)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(out, y)
        if self.global_step in self.fault_steps:
            loss = loss * torch.tensor(float("nan"))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        if self.pattern == "reads_trainer" and self.trainer.training:
            self.log("epoch_seen", float(self.trainer.current_epoch))
        if self.pattern in MANUAL:
            return self._manual_step(x, y, batch_idx)
        loss = self._loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        if self.pattern == "none_some" and batch_idx % 3 == 1:
            return None
        if self.pattern == "none_first" and batch_idx in (0, 2):
            return None
        if self.pattern == "dict":
            return {"loss": loss, "out_mean": loss.detach()}
        return loss

    def _manual_step(self, x: torch.Tensor, y: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.pattern == "manual1":
            opt = self.optimizers()
            loss = self._loss(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            return loss.detach()
        opt_g, opt_d = self.optimizers()
        loss_g = self._loss(self.gen(x), y)
        if self.pattern == "manual2" or batch_idx % 2 == 0:
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            opt_g.step()
        loss_d = nn.functional.mse_loss(self.disc(x), y)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss = (loss_g + loss_d).detach()
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        if self.pattern in TWO_OPTIMIZERS:
            return [
                torch.optim.SGD(self.gen.parameters(), lr=self.lr, momentum=0.9),
                torch.optim.SGD(self.disc.parameters(), lr=self.lr, momentum=0.9),
            ]
        if self.pattern == "sparse_adam":
            return torch.optim.SparseAdam(self.parameters(), lr=self.lr)
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=self.lr, momentum=0.9)


# ---------------------------------------------------------------------------------------------------------------
# probes: what the run did, read from outside the callbacks under test
# ---------------------------------------------------------------------------------------------------------------
def grad_norm(optimizer: torch.optim.Optimizer) -> float:
    """The 2-norm of the optimizer's gradients in float64 (sparse gradients coalesced, complex by modulus)."""
    total = 0.0
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                g = g.coalesce().values()
            total += float(g.detach().abs().double().pow(2).sum())
    return math.sqrt(total)


class Probe(pl.Callback):
    """Records, per optimizer step: global step, optimizer index, batch number, learning rates, gradient norm."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.batches: list[float] = []
        self.validations = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batches.append(float(batch[0].double().sum()))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        index = next(i for i, opt in enumerate(trainer.optimizers) if opt is optimizer)
        self.steps.append(
            {
                "step": int(trainer.global_step),
                "opt": index,
                "batch": len(self.batches) - 1,
                "lrs": [float(g["lr"]) for g in optimizer.param_groups],
                "norm": grad_norm(optimizer),
            }
        )

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.validations += 1


class SaveAt(pl.Callback):
    """Saves ``mid-<step>.ckpt`` after the training batch that reaches ``step``s and ``epoch-<e>.ckpt`` at the
    end of each epoch in ``epochs`` (as ModelCheckpoint does, after the other callbacks' hooks)."""

    def __init__(self, directory: str, steps: tuple[int, ...] = (), epochs: tuple[int, ...] = ()) -> None:
        self.directory = directory
        self.at_steps = steps
        self.at_epochs = epochs

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step in self.at_steps:
            trainer.save_checkpoint(os.path.join(self.directory, f"mid-{trainer.global_step}.ckpt"))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch in self.at_epochs:
            trainer.save_checkpoint(os.path.join(self.directory, f"epoch-{trainer.current_epoch}.ckpt"))


# ---------------------------------------------------------------------------------------------------------------
# running one fit
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Outcome:
    error: BaseException | None = None
    trace: str = ""
    warnings: list[str] = dataclasses.field(default_factory=list)
    findings: list[Any] = dataclasses.field(default_factory=list)
    trainer: Any = None
    model: Any = None
    probe: Probe | None = None
    post: Probe | None = None
    callbacks: list[Any] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No Lightning banners, no printed summaries (the outcome is checked, not read)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def trainer_kwargs(pattern: str, root: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
        "deterministic": True,
    }
    if pattern == "fast_dev_run":
        kwargs["fast_dev_run"] = True
    elif pattern == "overfit_batches":
        kwargs["overfit_batches"] = 2
    elif pattern == "limit_train_batches":
        kwargs["limit_train_batches"] = 2
    return kwargs


def run(
    pattern: str,
    callbacks: list[Any],
    *,
    root: str,
    fault_steps: tuple[int, ...] = (),
    trainer_args: dict[str, Any] | None = None,
    ckpt_path: str | None = None,
    extra: list[Any] | None = None,
    n: int = 32,
    stage: str = "fit",
) -> Outcome:
    """One real run; exceptions and LightningDiagWarnings are captured in the outcome."""
    torch.manual_seed(0)
    outcome = Outcome(probe=Probe(), post=Probe(), callbacks=list(callbacks))
    model = Net(pattern, fault_steps=fault_steps)
    kwargs = {**trainer_kwargs(pattern, root), **(trainer_args or {})}
    all_callbacks = [outcome.probe, *callbacks, outcome.post, *(extra or [])]
    with warnings.catch_warnings(record=True) as caught, quiet():
        warnings.simplefilter("always")
        try:
            trainer = pl.Trainer(callbacks=all_callbacks, **kwargs)
            outcome.trainer = trainer
            train, val = loader(pattern, n=n), loader(pattern, n=16, seed=1)
            if stage == "validate":
                trainer.validate(model, val)
            elif stage == "test":
                trainer.test(model, val)
            else:
                trainer.fit(model, train, None if pattern == "no_val" else val, ckpt_path=ckpt_path)
        except BaseException as exc:
            outcome.error = exc
            outcome.trace = traceback.format_exc()
    outcome.warnings = [str(w.message) for w in caught if issubclass(w.category, LightningDiagWarning)]
    outcome.model = model
    if outcome.trainer is not None:
        outcome.findings = collect_findings(outcome.trainer)
    return outcome


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    if a.keys() != b.keys():
        return [f"different parameter names: {sorted(a)} vs {sorted(b)}"]
    return [f"weights of `{k}` differ" for k in a if not torch.equal(a[k], b[k])]


def equal(a: Any, b: Any, path: str = "") -> list[str]:
    """Deep, exact comparison of plain-type/tensor structures (NaN equals NaN); the differences found."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: {a!r} vs {b!r}"]
        if a.shape != b.shape or not torch.equal(a.nan_to_num(1.5e300), b.nan_to_num(1.5e300)):
            return [f"{path}: tensors differ"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one" for k in set(a) ^ set(b)]
        for k in a:
            if k in b:
                out += equal(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += equal(x, y, f"{path}[{i}]")
        return out
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return equal(dataclasses.asdict(a), dataclasses.asdict(b), path)  # type: ignore[arg-type]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


# ---------------------------------------------------------------------------------------------------------------
# pattern cells
# ---------------------------------------------------------------------------------------------------------------
def pattern_callback(name: str, pattern: str) -> Any:
    """The callback under test, configured for a tiny healthy run (defaults wherever they make sense)."""
    if name == "GradNormMonitor":
        return GradNormMonitor()
    if name == "NaNGuard":
        return NaNGuard()
    if name == "OverfitDetector":
        return OverfitDetector()
    if name == "EarlyStop":
        return EarlyStop(monitor="train_loss" if pattern == "no_val" else "val_loss")
    if name == "WarmupCosine":
        return WarmupCosine(warmup_steps=2)
    if name == "GradClip":
        return GradClip(max_norm=0.05)
    if name == "SpeedMonitor":
        return SpeedMonitor()
    if name == "SanityCheck":
        return SanityCheck(overfit_batch_steps=3, overfit_lr=0.05, min_drop=0.01)
    if name == "SilentBugDetector":
        return SilentBugDetector()
    raise KeyError(name)


@dataclasses.dataclass(frozen=True)
class Cell:
    part: str
    name: str
    callback: str
    pattern: str = ""
    detail: str = ""

    @property
    def id(self) -> str:
        return self.name


def pattern_cells() -> list[Cell]:
    return [Cell("pattern", f"{cb}-{p}", cb, p) for cb in CALLBACKS for p in PATTERNS]


_BARE: dict[tuple[str, str], Outcome] = {}


def bare(pattern: str, root: str, stage: str = "fit", second: bool = False) -> Outcome:
    """The run without any lightning_diag callback (cached per pattern)."""
    key = (pattern, stage + ("2" if second else ""))
    if key not in _BARE:
        _BARE[key] = run(pattern, [], root=os.path.join(root, f"bare-{pattern}"), stage=stage)
    return _BARE[key]


def _fit_pattern(cell: Cell, root: str) -> tuple[list[Outcome], list[str]]:
    """Runs the cell's pattern; returns the outcomes (one per fit) and structural problems."""
    pattern = cell.pattern
    callback = pattern_callback(cell.callback, pattern)
    if pattern == "validate_only":
        return [run("auto", [callback], root=root, stage="validate")], []
    if pattern == "test_only":
        return [run("auto", [callback], root=root, stage="test")], []
    if pattern in ("two_fits", "two_trainers"):
        # two_fits: one instance, fit after fit; two_trainers: two Trainers built before either fits
        first = run("auto", [callback], root=os.path.join(root, "a"))
        second = run("auto", [callback], root=os.path.join(root, "b"))
        if pattern == "two_trainers":
            with quiet():
                other = pl.Trainer(callbacks=[callback], **trainer_kwargs("auto", os.path.join(root, "c")))
            third = run("auto", [callback], root=os.path.join(root, "d"))
            del other
            return [first, second, third], []
        return [first, second], []
    return [run(pattern, [callback], root=root)], []


def check_pattern_cell(cell: Cell, root: str) -> list[str]:
    """The problems of one callback x pattern cell ([] = pass)."""
    outcomes, problems = _fit_pattern(cell, root)
    fit_pattern = cell.pattern if cell.pattern not in ("two_fits", "two_trainers") else "auto"
    stage = {"validate_only": "validate", "test_only": "test"}.get(cell.pattern, "fit")
    reference = bare(fit_pattern if stage == "fit" else "auto", os.path.dirname(root), stage=stage)
    if reference.error is not None:
        return [f"harness: the bare run failed: {reference.error!r}"]
    for number, out in enumerate(outcomes, start=1):
        label = f"fit {number}: " if len(outcomes) > 1 else ""
        problems += [label + p for p in check_outcome(cell, out, reference, stage)]
    return problems


#: How each pattern cell that passed did it: "works" or "declined" (filled by check_pattern_cell).
STATUS: dict[str, str] = {}
SYMBOLS = {"works": "✓", "declined": "declines", "fails": "✗"}


def declined(out: Outcome, name: str) -> bool:
    """The callback declined (an info finding from it that says so, with a LightningDiagWarning)."""
    return bool(out.warnings) and any(f.source == name and f.severity == "info" for f in out.findings)


def check_outcome(cell: Cell, out: Outcome, reference: Outcome, stage: str) -> list[str]:
    name = cell.callback
    if out.error is not None:
        return [f"run raised {type(out.error).__name__}: {str(out.error)[:300]}"]
    problems = []
    for f in out.findings:
        if f.code == "internal_error":
            problems.append(f"internal_error in {f.evidence.get('hook')}: {f.evidence.get('exception')}")
        elif f.severity != "info":
            problems.append(f"false alarm on a healthy run: {f.code} ({f.severity}): {f.message[:200]}")
    is_declined = declined(out, name)
    if out.warnings and not is_declined:
        problems.append(f"LightningDiagWarning without an info finding: {out.warnings[0][:200]}")
    if is_declined and not problems:
        STATUS[cell.name] = "declined"
    if problems or is_declined:
        return problems
    if stage != "fit":
        if equal(dict(out.trainer.callback_metrics), dict(reference.trainer.callback_metrics)):
            problems.append("metrics of the evaluation differ from the run without the callback")
        STATUS.setdefault(cell.name, "works")
        return problems
    if name in OBSERVERS:
        problems += same_weights(weights(out.model), weights(reference.model))
    problems += SPECIFIC[name](cell, out, reference)
    STATUS.setdefault(cell.name, "works")
    return problems


def _check_grad_norm_monitor(cell: Cell, out: Outcome, reference: Outcome) -> list[str]:
    assert out.probe is not None
    if not out.probe.steps:
        return []
    logged = out.trainer.callback_metrics.get("diag/grad_norm/total")
    if logged is None:
        return ["diag/grad_norm/total was never logged"]
    value = float(logged)
    last = out.probe.steps[-1]["step"]
    candidates = [s["norm"] for s in out.probe.steps if s["step"] in (last, last - 1)]
    if not math.isfinite(value) or not any(math.isclose(value, c, rel_tol=1e-4) for c in candidates):
        return [f"logged total norm {value!r} differs from the reference {candidates}"]
    return []


def _check_grad_clip(cell: Cell, out: Outcome, reference: Outcome) -> list[str]:
    assert out.probe is not None and out.post is not None
    cap = 0.05
    problems = []
    for before, after in zip(out.probe.steps, out.post.steps, strict=False):
        if before["norm"] == 0:
            continue
        if not after["norm"] <= cap * (1 + 1e-4):
            problems.append(f"step {after['step']}: norm after clipping {after['norm']:.4g} > max_norm {cap}")
            break
    if out.probe.steps and not any(s["norm"] > cap for s in out.probe.steps):
        problems.append("harness: no step needed clipping")
    return problems


def _check_warmup_cosine(cell: Cell, out: Outcome, reference: Outcome) -> list[str]:
    """Every rate used is the schedule's: at the optimizer step (automatic optimization) or, under manual
    optimization, at the training batch (one schedule per optimizer, all following the progress of training)."""
    assert out.probe is not None
    callback = out.callbacks[0]
    manual = cell.pattern in MANUAL
    for index, base in enumerate(_base_lrs(out)):
        for row in (s for s in out.probe.steps if s["opt"] == index):
            at = row["batch"] if manual else row["step"]
            expected = callback.lr_at(at, base)
            if not math.isclose(row["lrs"][0], expected, rel_tol=1e-9, abs_tol=1e-15):
                unit = "batch" if manual else "step"
                return [
                    f"optimizer {index} at {unit} {at}: rate {row['lrs'][0]:.6g}, the schedule says {expected:.6g} "
                    f"(of {callback.resolved_total_steps} {unit}{'es' if manual else 's'})"
                ]
    return []


def _base_lrs(out: Outcome) -> list[float]:
    return [float(opt.defaults["lr"]) for opt in out.trainer.optimizers]


def _check_nan_guard(cell: Cell, out: Outcome, reference: Outcome) -> list[str]:
    guard = out.callbacks[0]
    return [f"{guard.skipped_steps} step(s) skipped on a healthy run"] if guard.skipped_steps else []


def _check_overfit_detector(cell: Cell, out: Outcome, reference: Outcome) -> list[str]:
    detector = out.callbacks[0]
    assert out.probe is not None
    expected = out.probe.validations if cell.pattern != "no_val" else 0
    if cell.pattern in ("none_first",):
        expected = out.probe.validations  # every validation follows some batch with a loss
    problems = []
    if len(detector.points) != expected:
        problems.append(f"{len(detector.points)} curve point(s) for {expected} validation run(s)")
    for p in detector.points:
        if not math.isfinite(p.train) or (p.val is not None and not math.isfinite(p.val)):
            problems.append(f"a non-finite curve point {p}")
            break
    return problems


def _check_early_stop(cell: Cell, out: Outcome, reference: Outcome) -> list[str]:
    stop = out.callbacks[0]
    return ["stopped a 2-epoch healthy run"] if stop.stopped_epoch else []


def _check_speed_monitor(cell: Cell, out: Outcome, reference: Outcome) -> list[str]:
    return []


def _check_sanity_check(cell: Cell, out: Outcome, reference: Outcome) -> list[str]:
    check = out.callbacks[0]
    return [] if check.done else ["the checks never ran"]


def _check_silent_bug_detector(cell: Cell, out: Outcome, reference: Outcome) -> list[str]:
    return []  # an observer: same weights as without it, and no warning on the healthy run (checked above)


SPECIFIC: dict[str, Callable[[Cell, Outcome, Outcome], list[str]]] = {
    "GradNormMonitor": _check_grad_norm_monitor,
    "NaNGuard": _check_nan_guard,
    "OverfitDetector": _check_overfit_detector,
    "EarlyStop": _check_early_stop,
    "WarmupCosine": _check_warmup_cosine,
    "GradClip": _check_grad_clip,
    "SpeedMonitor": _check_speed_monitor,
    "SanityCheck": _check_sanity_check,
    "SilentBugDetector": _check_silent_bug_detector,
}


# ---------------------------------------------------------------------------------------------------------------
# resume cells
# ---------------------------------------------------------------------------------------------------------------
RESUME_CONFIGS = ("bare", *CALLBACKS, "suite")
RESUME_POINTS = ("mid", "epoch")
RESUME_FAULTS = ("none", "skip", "rollback")
#: The resume runs: 6 batches per epoch, 3 epochs, validation every 3 batches.
RESUME_N = 48
RESUME_EPOCHS = 3
MID_STEP = 8  # epoch 1, after its second batch (inside a validation interval)
EPOCH_END = 0  # checkpoint at the end of epoch 0 (step 6)
FAULT_STEPS = (2, 11)  # one fault before both checkpoints, one after


def resume_callbacks(config: str, fault: str) -> list[Any]:
    """Fresh instances for one resume run (the uninterrupted and the resumed run each get their own)."""

    def one(name: str) -> Any:
        if name == "GradNormMonitor":
            return GradNormMonitor(spike_warmup_steps=3)
        if name == "NaNGuard":
            action = {"rollback": "rollback"}.get(fault, "skip")
            kwargs: dict[str, Any] = {"action": action}
            if action == "rollback":
                kwargs["snapshot_every_n_steps"] = 3  # not aligned with the checkpoint at step 8
                kwargs["lr_backoff"] = 0.5
            return NaNGuard(**kwargs)
        if name == "OverfitDetector":
            return OverfitDetector(patience=2)
        if name == "EarlyStop":
            return EarlyStop(monitor="val_loss", patience=2)
        if name == "WarmupCosine":
            return WarmupCosine(warmup_steps=3, min_lr_ratio=0.1)
        if name == "GradClip":
            return GradClip(algorithm="zscore", zscore_warmup_steps=3)
        if name == "SpeedMonitor":
            return SpeedMonitor(window=4)
        if name == "SanityCheck":
            return SanityCheck()
        if name == "SilentBugDetector":
            return SilentBugDetector(check_every_n_steps=2, patience=1)
        raise KeyError(name)

    if config == "bare":
        names: list[str] = []
    elif config == "suite":
        names = list(CALLBACKS)
    else:
        names = [config]
    if fault != "none" and "NaNGuard" not in names:
        names.append("NaNGuard")
    return [one(n) for n in names]


def resume_cells() -> list[Cell]:
    cells = []
    for config in RESUME_CONFIGS:
        for fault in RESUME_FAULTS:
            for point in RESUME_POINTS:
                cells.append(Cell("resume", f"resume-{config}-{point}-{fault}", config, point, fault))
    return cells


_STRAIGHT: dict[tuple[str, str], tuple[Outcome, str]] = {}


def _resume_trainer_args() -> dict[str, Any]:
    return {"max_epochs": RESUME_EPOCHS, "val_check_interval": 0.5}


def _straight(config: str, fault: str, root: str) -> tuple[Outcome, str]:
    """The uninterrupted run, saving the checkpoints the resumed runs start from (cached per config x fault)."""
    key = (config, fault)
    if key not in _STRAIGHT:
        directory = os.path.join(root, f"straight-{config}-{fault}")
        os.makedirs(directory, exist_ok=True)
        saver = SaveAt(directory, steps=(MID_STEP,), epochs=(EPOCH_END,))
        out = run(
            "auto",
            resume_callbacks(config, fault),
            root=directory,
            fault_steps=FAULT_STEPS if fault != "none" else (),
            trainer_args=_resume_trainer_args(),
            extra=[saver],
            n=RESUME_N,
        )
        _STRAIGHT[key] = (out, directory)
    return _STRAIGHT[key]


def check_resume_cell(cell: Cell, root: str) -> list[str]:
    config, point, fault = cell.callback, cell.pattern, cell.detail
    straight, directory = _straight(config, fault, os.path.dirname(root))
    if straight.error is not None:
        return [f"the uninterrupted run raised {type(straight.error).__name__}: {straight.error}"]
    path = os.path.join(directory, f"mid-{MID_STEP}.ckpt" if point == "mid" else f"epoch-{EPOCH_END}.ckpt")
    if not os.path.exists(path):
        return [f"harness: no checkpoint at {os.path.basename(path)}"]
    resumed = run(
        "auto",
        resume_callbacks(config, fault),
        root=root,
        fault_steps=FAULT_STEPS if fault != "none" else (),
        trainer_args=_resume_trainer_args(),
        ckpt_path=path,
        n=RESUME_N,
    )
    if resumed.error is not None:
        return [f"the resumed run raised {type(resumed.error).__name__}: {str(resumed.error)[:300]}"]
    assert straight.probe is not None and resumed.probe is not None
    problems = []
    start = len(straight.probe.batches) - len(resumed.probe.batches)
    if straight.probe.batches[start:] != resumed.probe.batches:
        problems.append("harness: the resumed run did not see the same batches")
    resumed_from = resumed.probe.steps[0]["step"] if resumed.probe.steps else None
    tail = [s for s in straight.probe.steps if resumed_from is not None and s["step"] >= resumed_from]
    lr_a = [(s["step"], s["lrs"]) for s in tail]
    lr_b = [(s["step"], s["lrs"]) for s in resumed.probe.steps]
    if lr_a != lr_b:
        first = next((i for i, (a, b) in enumerate(zip(lr_a, lr_b, strict=False)) if a != b), None)
        where = (
            f"first at {lr_a[first]} vs {lr_b[first]}" if first is not None else f"{len(lr_a)} vs {len(lr_b)}"
        )
        problems.append(f"learning-rate sequence differs ({where})")
    ta, tb = straight.trainer, resumed.trainer
    if (ta.global_step, ta.current_epoch) != (tb.global_step, tb.current_epoch):
        problems.append(
            f"ended at step {tb.global_step} (epoch {tb.current_epoch}), uninterrupted at step {ta.global_step} "
            f"(epoch {ta.current_epoch})"
        )
    for a, b in zip(straight.callbacks, resumed.callbacks, strict=True):
        diffs = equal(_comparable_state(a), _comparable_state(b))
        if diffs:
            problems.append(f"{type(a).__name__} state differs: {'; '.join(diffs[:3])}")
    fa = _comparable_findings(straight.findings)
    fb = _comparable_findings(resumed.findings)
    if fa != fb:
        problems.append(f"findings differ: {fa} vs {fb}")
    problems += same_weights(weights(straight.model), weights(resumed.model))
    return problems


def _comparable_state(callback: Any) -> Any:
    state = callback.state_dict()
    if isinstance(callback, SpeedMonitor):
        return {}  # wall-clock timings: never identical
    return {k: v for k, v in state.items() if k != "findings"}


def _comparable_findings(findings: list[Any]) -> list[tuple[Any, ...]]:
    # SpeedMonitor's findings come from wall-clock timings: never reproducible
    return [_finding_key(f) for f in findings if f.source != "SpeedMonitor"]


def _finding_key(f: Any) -> tuple[Any, ...]:
    return (f.source, f.code, f.severity, f.step, f.last_step, f.count)


# ---------------------------------------------------------------------------------------------------------------
# bad-argument cells
# ---------------------------------------------------------------------------------------------------------------
REQUIRED: dict[str, dict[str, Any]] = {"EarlyStop": {"monitor": "val_loss"}, "GradClip": {"max_norm": 1.0}}


def _bool_params(cls: type) -> list[str]:
    return [
        name
        for name, p in parameters(cls).items()
        if str(p.annotation).replace(" ", "") in ("bool", "bool|None", "Optional[bool]")
        and name not in getattr(cls, "renamed_arguments", {})  # old names: tests/test_renamed.py
    ]


#: (callback, kwargs, the argument names the message must cite; () = a good configuration that must pass)
ARG_CASES: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    # ranges
    ("GradNormMonitor", {"vanishing_ratio": 2.0}, ("vanishing_ratio",)),
    ("GradNormMonitor", {"depth": 0}, ("depth",)),
    ("GradNormMonitor", {"norm_type": 0.5}, ("norm_type",)),
    ("GradClip", {"norm_type": 0.5}, ("norm_type",)),
    ("GradClip", {"algorithm": "autoclip", "percentile": True}, ("percentile",)),
    ("GradClip", {"algorithm": "autoclip", "percentile": 0}, ("percentile",)),
    ("GradClip", {"algorithm": "value", "clip_value": 0.0}, ("clip_value",)),
    ("NaNGuard", {"spike_threshold": float("nan")}, ("spike_threshold",)),
    ("NaNGuard", {"lr_backoff": 0.0, "action": "rollback"}, ("lr_backoff",)),
    ("OverfitDetector", {"patience": 0}, ("patience",)),
    ("OverfitDetector", {"rise_tolerance": -0.1}, ("rise_tolerance",)),
    ("OverfitDetector", {"close_ratio": 1.5}, ("close_ratio",)),
    ("OverfitDetector", {"divergence_ratio": 0.5}, ("divergence_ratio",)),
    ("OverfitDetector", {"chance_loss": 0.0}, ("chance_loss",)),
    ("EarlyStop", {"patience": True}, ("patience",)),
    ("EarlyStop", {"min_delta": -1.0}, ("min_delta",)),
    ("EarlyStop", {"monitor": ""}, ("monitor",)),
    ("SpeedMonitor", {"data_share": 1.5}, ("data_share",)),
    ("SpeedMonitor", {"window": 1}, ("window",)),
    ("WarmupCosine", {"warmup_ratio": 1.0}, ("warmup_ratio",)),
    ("WarmupCosine", {"cycle_mul": 0.0, "num_cycles": 2}, ("cycle_mul",)),
    ("SanityCheck", {"num_batches": 0}, ("num_batches",)),
    ("SanityCheck", {"min_drop": 1.0, "overfit_batch_steps": 5}, ("min_drop",)),
    # contradictions
    (
        "EarlyStop",
        {"mode": "min", "stopping_threshold": 2.0, "divergence_threshold": 1.0},
        ("stopping_threshold", "divergence_threshold"),
    ),
    (
        "EarlyStop",
        {"mode": "max", "stopping_threshold": 0.1, "divergence_threshold": 0.9},
        ("stopping_threshold", "divergence_threshold"),
    ),
    (
        "OverfitDetector",
        {"monitor": "loss", "train_monitor": "loss"},
        ("monitor", "train_monitor"),
    ),
    (
        "GradNormMonitor",
        {"exploding_threshold": 1e-9, "vanishing_threshold": 1e-8},
        ("exploding_threshold", "vanishing_threshold"),
    ),
    ("WarmupCosine", {"warmup_steps": 10, "total_steps": 10}, ("warmup_steps", "total_steps")),
    # arguments the chosen mode ignores
    ("NaNGuard", {"check_spikes": False, "spike_action": "skip"}, ("spike_action", "check_spikes")),
    ("NaNGuard", {"action": "warn", "lr_backoff": 0.5}, ("lr_backoff", "action")),
    ("NaNGuard", {"action": "raise", "escalate_to": "rollback"}, ("escalate_to", "action")),
    ("NaNGuard", {"action": "skip", "max_rollbacks": 5}, ("max_rollbacks", "action")),
    (
        "NaNGuard",
        {"action": "skip", "snapshot_every_n_steps": 10},
        ("snapshot_every_n_steps", "action"),
    ),
    ("GradClip", {"algorithm": "norm", "agc_exclude": ["head"]}, ("agc_exclude", "algorithm")),
    ("GradClip", {"algorithm": "norm", "percentile": 50.0}, ("percentile", "algorithm")),
    ("GradClip", {"algorithm": "norm", "zscore_threshold": 3.0}, ("zscore_threshold", "algorithm")),
    ("GradClip", {"algorithm": "value", "max_norm": 1.0}, ("max_norm", "algorithm")),
    ("GradNormMonitor", {"group_by": "total", "depth": 3}, ("depth", "group_by")),
    (
        "EarlyStop",
        {"restore_best_weights": False, "restore_from": "memory"},
        ("restore_from", "restore_best_weights"),
    ),
    ("WarmupCosine", {"num_cycles": 1, "cycle_mul": 2.0}, ("cycle_mul", "num_cycles")),
    ("WarmupCosine", {"num_cycles": 1, "cycle_decay": 0.5}, ("cycle_decay", "num_cycles")),
    ("WarmupCosine", {"warmup_steps": 0, "warmup_start_lr": 0.1}, ("warmup_start_lr", "warmup_steps")),
    ("SanityCheck", {"overfit_batch_steps": 0, "overfit_lr": 0.1}, ("overfit_lr", "overfit_batch_steps")),
    ("SanityCheck", {"check_data": False, "num_batches": 3}, ("num_batches", "check_data")),
    (
        "SpeedMonitor",
        {"check_host_syncs": False, "sync_check_steps": 10},
        ("sync_check_steps", "check_host_syncs"),
    ),
    # good arguments that must be accepted silently
    ("NaNGuard", {"action": "rollback", "lr_backoff": 0.5, "snapshot_every_n_steps": 10}, ()),
    ("NaNGuard", {"action": "skip", "escalate_to": "rollback", "max_rollbacks": 2}, ()),
    ("GradClip", {"algorithm": "agc", "max_norm": None, "agc_exclude": []}, ()),
    ("GradClip", {"algorithm": "zscore", "max_norm": 5.0, "zscore_threshold": 3.0}, ()),
    ("EarlyStop", {"mode": "max", "stopping_threshold": 0.9, "divergence_threshold": 0.1}, ()),
    ("EarlyStop", {"mode": "min", "stopping_threshold": 0.1, "divergence_threshold": 5.0}, ()),
    ("WarmupCosine", {"num_cycles": 3, "cycle_mul": 2.0, "cycle_decay": 0.5}, ()),
    ("OverfitDetector", {"train_monitor": "train_loss"}, ()),
    ("SanityCheck", {"overfit_batch_steps": 20, "overfit_lr": 0.01, "min_drop": 0.3}, ()),
    ("GradNormMonitor", {"group_by": "parameter"}, ()),
]


def arg_cells() -> list[Cell]:
    cells = []
    for name in CALLBACKS:
        for param in _bool_params(CLASSES[name]):
            for bad in ("no", 1):
                cells.append(Cell("args", f"args-{name}-{param}={bad!r}", name, param, repr(bad)))
    for index, (name, kwargs, _) in enumerate(ARG_CASES):
        shown = ",".join(f"{k}={v!r}" for k, v in kwargs.items())
        cells.append(Cell("args", f"args-{name}({shown})", name, "", str(index)))
    return cells


def check_arg_cell(cell: Cell, root: str) -> list[str]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    cls = CLASSES[cell.callback]
    if cell.pattern:  # a boolean given a non-bool
        kwargs: dict[str, Any] = {**REQUIRED.get(cell.callback, {}), cell.pattern: eval(cell.detail)}
        cites: tuple[str, ...] = (cell.pattern,)
    else:
        _, raw, raw_cites = ARG_CASES[int(cell.detail)]
        try:
            kwargs = {
                **REQUIRED.get(cell.callback, {}),
                **{arg(cls, k): v for k, v in raw.items()},
            }
            cites = tuple(arg(cls, c) for c in raw_cites)
        except KeyError as exc:
            return [f"harness: {exc}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cls(**kwargs)
            error: BaseException | None = None
        except Exception as exc:
            error = exc
    ours = [w for w in caught if issubclass(w.category, LightningDiagWarning)]
    if not cites:
        if error is not None:
            return [f"a good configuration was refused: {type(error).__name__}: {error}"]
        return [f"a good configuration warned: {ours[0].message}"] if ours else []
    if error is None:
        return ["accepted silently"]
    problems = []
    if not (isinstance(error, ValueError) and isinstance(error, MisconfigurationException)):
        problems.append(f"raised {type(error).__name__}, not a ValueError + MisconfigurationException")
    missing = [c for c in cites if not re.search(rf"`{c}[`=]", str(error))]
    if missing:
        problems.append(f"the message does not name {missing}: {error}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# containment cells
# ---------------------------------------------------------------------------------------------------------------
#: The hooks a bug is injected into (each callback: those it implements).
CONTAIN_HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_validation_end",
    "on_train_epoch_end",
    "on_train_end",
    "on_fit_end",
    "state_dict",
)


def contain_cells() -> list[Cell]:
    cells = []
    for name in CALLBACKS:
        cls = CLASSES[name]
        for hook in CONTAIN_HOOKS:
            if getattr(cls, hook) is not getattr(pl.Callback, hook):
                cells.append(Cell("contain", f"contain-{name}-{hook}", name, hook))
    return cells


class InjectedBug(RuntimeError):
    pass


def check_contain_cell(cell: Cell, root: str) -> list[str]:
    """A bug in one hook of one callback: the run finishes, the finding says where, the report is written."""
    callback = pattern_callback(cell.callback, "auto")
    hook = cell.pattern

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise InjectedBug(f"injected bug in {hook}")

    callback.__class__ = type(f"Broken{cell.callback}", (type(callback),), {hook: broken})
    saved = os.environ.get("LIGHTNING_DIAG_STRICT")
    os.environ["LIGHTNING_DIAG_STRICT"] = "0"
    try:
        out = run("auto", [callback], root=root)
        path = os.path.join(root, "after.ckpt")
        if out.error is None:
            with warnings.catch_warnings(record=True) as caught, quiet():
                warnings.simplefilter("always")
                out.trainer.save_checkpoint(path)
            out.warnings += [str(w.message) for w in caught if issubclass(w.category, LightningDiagWarning)]
    finally:
        if saved is None:
            del os.environ["LIGHTNING_DIAG_STRICT"]
        else:
            os.environ["LIGHTNING_DIAG_STRICT"] = saved
    if out.error is not None:
        return [f"the run raised {type(out.error).__name__}: {str(out.error)[:300]}"]
    problems = []
    found = [f for f in collect_findings(out.trainer) if f.code == "internal_error"]
    if [f.evidence.get("hook") for f in found] != [hook]:
        problems.append(
            f"internal_error findings for hooks {[f.evidence.get('hook') for f in found]}, not [{hook!r}]"
        )
    elif "InjectedBug: injected bug" not in str(found[0].evidence.get("exception")) or "broken" not in str(
        found[0].evidence.get("traceback")
    ):
        problems.append(f"the finding's evidence lacks the exception or traceback: {found[0].evidence}")
    if not any("disabled itself" in w for w in out.warnings):
        problems.append("no LightningDiagWarning said the callback disabled itself")
    if not os.path.exists(path):
        problems.append("the checkpoint was not written")
    report = os.path.join(root, "diagnosis.json")
    if hook != "state_dict":
        if not os.path.exists(report):
            problems.append("diagnosis.json was not written")
        else:
            with open(report, encoding="utf-8") as handle:
                summary = json.load(handle)["summary"]
            if summary.get("disabled") != [
                f"{cell.callback} ({hook})".replace(cell.callback, f"Broken{cell.callback}", 1)
            ]:
                problems.append(f"the report's summary does not say so: {summary.get('disabled')}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------------
PARTS: dict[str, tuple[Callable[[], list[Cell]], Callable[[Cell, str], list[str]]]] = {
    "pattern": (pattern_cells, check_pattern_cell),
    "resume": (resume_cells, check_resume_cell),
    "args": (arg_cells, check_arg_cell),
    "contain": (contain_cells, check_contain_cell),
}


def all_cells(parts: tuple[str, ...] = tuple(PARTS)) -> list[Cell]:
    return [cell for part in parts for cell in PARTS[part][0]()]


def check(cell: Cell, root: str) -> list[str]:
    """The problems of one cell ([] = pass); ``root`` is a scratch directory shared by the cells of a session."""
    directory = os.path.join(root, cell.name.replace("/", "_").replace(" ", "")[:120])
    os.makedirs(directory, exist_ok=True)
    try:
        return PARTS[cell.part][1](cell, directory)
    except Exception as exc:
        return [f"harness error {type(exc).__name__}: {exc}\n{traceback.format_exc()}"]


def cell_status(name: str, problems: list[str] | None) -> str:
    """``works``, ``declined`` or ``fails`` for a pattern cell that was checked (``?`` if it was not)."""
    if problems is None:
        return "?"
    return "fails" if problems else STATUS.get(name, "works")


def support_matrix(results: dict[str, list[str]]) -> str:
    """The README table: callback x pattern, ✓ (works), declines (a LightningDiagWarning and an info finding
    ``declined``, then stays out of the way), ✗ (fails)."""
    header = "| pattern | " + " | ".join(CALLBACKS) + " |"
    lines = [header, "|" + "---|" * (len(CALLBACKS) + 1)]
    for pattern in PATTERNS:
        row = []
        for cb in CALLBACKS:
            name = f"{cb}-{pattern}"
            status = cell_status(name, results.get(name))
            row.append(SYMBOLS.get(status, status))
        lines.append(f"| {PATTERN_TITLES[pattern]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


#: the documentation's copy of :func:`support_matrix` (``--write-docs``)
DOCS_TABLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "generated", "support_matrix.md"
)


def write_docs(table: str, argv: list[str], path: str = DOCS_TABLE) -> None:
    """Write ``table`` to the documentation's generated file, headed by the command that regenerates it."""
    command = " ".join(["python", "benchmarks/reliability.py", *argv])
    header = (
        f"<!-- generated by `{command}` on {time.strftime('%Y-%m-%d')}: rerun it, do not edit by hand -->"
    )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(f"{header}\n{table}\n")


def main(argv: list[str] | None = None) -> dict[str, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", nargs="*", choices=tuple(PARTS), default=list(PARTS))
    parser.add_argument("-k", default="", help="only the cells whose name contains this")
    parser.add_argument("--markdown", action="store_true", help="print the support matrix (Markdown)")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="write the support matrix to docs/generated/support_matrix.md",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print every cell, not only failures")
    args = parser.parse_args(argv)
    if args.write_docs and ("pattern" not in args.part or args.k):
        parser.error("--write-docs needs every pattern cell (--part pattern, no -k)")
    os.environ.setdefault("LIGHTNING_DIAG_STRICT", "0")
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="reliability-")
    results: dict[str, list[str]] = {}
    start = time.perf_counter()
    try:
        for cell in all_cells(tuple(args.part)):
            if args.k and args.k not in cell.name:
                continue
            problems = check(cell, root)
            results[cell.name] = problems
            if problems or args.verbose:
                status = "FAIL" if problems else "ok"
                print(f"{status:4} {cell.name}" + (f": {problems[0]}" if problems else ""), flush=True)
                for extra in problems[1:4]:
                    print(f"       {extra}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.markdown:
        print(support_matrix(results))
    if args.write_docs:
        write_docs(support_matrix(results), sys.argv[1:] if argv is None else list(argv))
        print(f"wrote {DOCS_TABLE}")
    failed = sum(1 for p in results.values() if p)
    print(f"({time.perf_counter() - start:.0f} s, lightning_diag {lightning_diag.__version__})")
    print(f"{len(results) - failed} passed, {failed} failed")
    return results


if __name__ == "__main__":
    sys.exit(1 if any(main().values()) else 0)
