"""OverfitDetector: reads the learning curves live and says what it sees (and what to try)."""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag import _distributed, _lightning, _logging
from lightning_diag._validation import (
    ArgumentError,
    MissingMetricError,
    check_bool,
    check_choice,
    check_int,
    check_key,
    check_positive,
    check_range,
    renamed,
)
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import run_context
from lightning_diag.core.curves import CurvePoint, CurveRules, comparable, diagnose, stopped_verdict
from lightning_diag.core.verdict import Verdict, non_finite_metric
from lightning_diag.errors import LightningDiagWarning

__all__ = ["OverfitDetector"]

#: Detections that ``action="stop"`` stops on (the others cannot be cured by stopping).
STOP_CODES = ("overfitting", "divergence")


#: Training steps whose mean loss is the initial loss (the divergence reference): one batch can be unusually easy.
INITIAL_STEPS = 4


class OverfitDetector(DiagCallback):
    """Turn the train/validation curves into findings: overfitting, underfitting, loss plateau, divergence.

    After every validation run (also several per epoch with ``val_check_interval < 1``), one point is added to
    the curve: the validation loss (``monitor`` from ``trainer.callback_metrics``) and the mean training loss since
    the previous validation. The training loss is the loss ``training_step`` returned, summed on the device batch
    by batch and read once per evaluation (non-finite step losses, e.g. steps NaNGuard skipped, are left out of
    the mean; if every one was non-finite the point is NaN, a divergence); with ``train_monitor`` set, the logged epoch value of that key is used
    instead at end-of-epoch evaluations (read in ``on_train_epoch_end``, when Lightning has reduced it). Then the
    rules of :mod:`lightning_diag.core.curves` run on the whole history (thresholds below) and each conclusion is
    recorded once, with repeats counted. Under DDP rank 0's values are broadcast first, so every rank keeps the
    same curve and takes the same decision.

    Args:
        monitor: the validation loss key (``RuntimeError`` listing the logged keys when it is missing and
            ``strict``).
        train_monitor: a logged training-loss key to use at end-of-epoch evaluations (``None``: the returned loss).
        action: ``"warn"`` records findings; ``"stop"`` also stops training on ``overfitting`` (the rising-loss
            kind) or ``divergence`` (with EarlyStop(restore_best_weights=True) in the callbacks, you get the best
            weights back).
        patience: consecutive evaluations a trend must hold before a rule fires.
        rise_tolerance: how far above its best (relative) the validation loss must rise to count as overfitting.
        plateau_threshold: relative improvement over ``patience`` evaluations below which the training loss is flat.
        high_ratio: a flat loss is "high" above this fraction of the reference loss.
        close_ratio: validation and training losses are "close" within this relative distance.
        divergence_ratio: a rising training loss diverges above this multiple of its lowest value.
        chance_loss: the reference loss for "high" (e.g. ``ln(num_classes)`` or the loss of the best constant
            predictor); ``None``: the first evaluation's training loss.
        strict: raise when ``monitor`` is missing; otherwise warn once and only watch the training loss.
        window: deprecated name of ``patience`` (until the next release).

    Logged metrics (at each evaluation, written directly to the loggers at the global step):
        ============================  =============================================================
        key                           value
        ============================  =============================================================
        ``diag/overfit/gap``          validation loss - training loss (only when they are on one scale)
        ``diag/overfit/train_loss``   the training loss of the curve (mean since the last evaluation)
        ============================  =============================================================

    Findings:
        ``overfitting`` (warning; info for an early widening gap, a warning again when another callback such as
        EarlyStop stopped the run while the gap was widening), ``underfitting``, ``loss_plateau``, ``divergence``
        (also when the mean training loss is ``divergence_ratio`` times the initial loss, the mean of the first
        ``INITIAL_STEPS`` steps' losses, read with the first evaluation's mean: one step's batch can be much easier
        than the average); ``early_stopped`` (info) when ``action="stop"`` stopped the run;
        ``non_finite_metric`` (warning, once per key with a count) when the validation loss (or ``train_monitor``)
        is NaN/Inf.

    Raises:
        ValueError: (``ArgumentError``, also a ``MisconfigurationException``) at construction for an unknown
            action, an out-of-range threshold, ``train_monitor == monitor`` or a non-bool ``strict``.
        RuntimeError: (``MissingMetricError``) at the first validation when ``monitor`` is missing and ``strict``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import EarlyStop, OverfitDetector
        >>> trainer = pl.Trainer(callbacks=[OverfitDetector(action="stop"), EarlyStop(monitor="val_loss")])
    """

    renamed_arguments: ClassVar[dict[str, str]] = {"window": "patience"}

    def __init__(
        self,
        monitor: str = "val_loss",
        train_monitor: str | None = None,
        action: Literal["warn", "stop"] = "warn",
        patience: int = 3,
        rise_tolerance: float = 0.02,
        plateau_threshold: float = 0.01,
        high_ratio: float = 0.5,
        close_ratio: float = 0.15,
        divergence_ratio: float = 1.5,
        chance_loss: float | None = None,
        strict: bool = True,
        window: int | None = None,
    ) -> None:
        super().__init__()
        patience = renamed(OverfitDetector.__init__, locals(), "window", "patience")
        check_key("monitor", monitor)
        if train_monitor is not None:
            check_key("train_monitor", train_monitor)
            if train_monitor == monitor:
                raise ArgumentError(
                    f"`train_monitor` and `monitor` must be different keys, got {monitor!r} for both: the curve needs "
                    "a training loss and a validation loss. Leave `train_monitor=None` to use the loss training_step "
                    "returns."
                )
        check_choice("action", action, ("warn", "stop"))
        check_int("patience", patience, minimum=2)
        check_positive("rise_tolerance", rise_tolerance, strict=False)
        check_range("plateau_threshold", plateau_threshold, 0.0, 1.0, high_open=True)
        check_positive("high_ratio", high_ratio)
        check_range("close_ratio", close_ratio, 0.0, 1.0)
        check_range("divergence_ratio", divergence_ratio, 1.0, low_open=True)
        if chance_loss is not None:
            check_positive("chance_loss", chance_loss)
        check_bool("strict", strict)
        self.rules = CurveRules(
            patience=patience,
            rise_tolerance=rise_tolerance,
            plateau_threshold=plateau_threshold,
            high_ratio=high_ratio,
            close_ratio=close_ratio,
            divergence_ratio=divergence_ratio,
        )
        self.monitor = monitor
        self.train_monitor = train_monitor
        self.action = action
        self.patience = patience
        self.rise_tolerance = rise_tolerance
        self.plateau_threshold = plateau_threshold
        self.high_ratio = high_ratio
        self.close_ratio = close_ratio
        self.divergence_ratio = divergence_ratio
        self.chance_loss = chance_loss
        self.strict = strict
        self._reset_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor, train_monitor=self.train_monitor, action=self.action
        )

    def _reset_state(self) -> None:
        self.points: list[CurvePoint] = []
        self.steps: list[int] = []
        self.stopped_at: float | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._pending: tuple[float, float, float | None] | None = (
            None  # (x, train mean, val) awaiting epoch end
        )
        self._missing_warned = False
        # (sum, finite count) of the first INITIAL_STEPS training losses: the initial loss, read with the first mean
        self._first: torch.Tensor | None = None
        self._first_steps = 0
        # the last INITIAL_STEPS (loss, finite) pairs, compared with the initial loss at each evaluation
        self._recent: collections.deque[torch.Tensor] = collections.deque(maxlen=INITIAL_STEPS)
        self.recent_loss: float | None = None
        self.initial_loss: float | None = None

    # -- gather ---------------------------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            value = loss.detach().float().sum()
            if pl_module.automatic_optimization:
                # Lightning hands this hook the loss divided by accumulate_grad_batches: the curve needs the loss
                # itself, on the validation loss's scale
                value = value * max(int(trainer.accumulate_grad_batches), 1)
            finite = torch.isfinite(value)
            # Non-finite step losses (a step NaNGuard skipped) stay out of the mean; all of them non-finite -> NaN.
            pair = torch.stack([torch.where(finite, value, torch.zeros_like(value)), finite.float()])
            if self._sum is not None and self._sum.device != pair.device:
                self._sum = self._sum.to(pair.device)  # restored from a checkpoint, on the CPU
            self._sum = pair if self._sum is None else self._sum + pair
            self._count += 1
            self._recent.append(pair)
            if self.initial_loss is None and self._first_steps < INITIAL_STEPS:
                self._first = pair if self._first is None else self._first.to(pair.device) + pair
                self._first_steps += 1

    def _take_train_mean(self) -> float | None:
        if self._sum is None or self._count == 0:
            return None
        device = self._sum.device
        parts = [self._sum]  # one host read per evaluation: the mean, the recent steps, the initial loss once
        recent = torch.stack([p.to(device) for p in self._recent]).sum(0) if self._recent else None
        if recent is not None:
            parts.append(recent)
        if self._first is not None:
            parts.append(self._first.to(device))
        values = torch.cat(parts).tolist()
        total, finite = values[0], values[1]
        if recent is not None:
            recent_total, recent_finite = values[2], values[3]
            self.recent_loss = recent_total / recent_finite if recent_finite > 0 else None
        if self._first is not None:
            first_total, first_finite = values[-2], values[-1]
            self.initial_loss = first_total / first_finite if first_finite > 0 else None
            self._first = None
        self._sum, self._count = None, 0
        return total / finite if finite > 0 else math.nan

    def _val_value(self, trainer: pl.Trainer) -> float | None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            keys = sorted(trainer.callback_metrics)
            message = (
                f"OverfitDetector: `monitor={self.monitor!r}` is not among the logged metrics {keys}. Log it in "
                "`validation_step` (self.log(...)) or pass the right `monitor`."
            )
            if self.strict:
                raise MissingMetricError(message)
            if not self._missing_warned and trainer.is_global_zero:
                warnings.warn(message, LightningDiagWarning, stacklevel=2)
            self._missing_warned = True
            return None
        return float(value)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        val = self._val_value(trainer)
        train = self._take_train_mean()
        if train is None:
            return  # no training batch since the last evaluation
        end_of_epoch = _lightning.is_last_batch(trainer)
        batches = trainer.num_training_batches
        if end_of_epoch or not isinstance(batches, int) or batches <= 0:
            x = float(trainer.current_epoch + 1)  # x counts epochs done
        else:
            x = trainer.current_epoch + (_lightning.train_batch_idx(trainer) + 1) / batches
        if end_of_epoch and self.train_monitor is not None:
            self._pending = (
                x,
                train,
                val,
            )  # the logged epoch value of train_monitor is ready in on_train_epoch_end
            return
        self._add(trainer, x, train, val)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        x, _, val = self._pending
        self._pending = None
        key = self.train_monitor or ""
        logged = trainer.callback_metrics.get(f"{key}_epoch", trainer.callback_metrics.get(key))
        if logged is None:
            keys = sorted(trainer.callback_metrics)
            raise MissingMetricError(
                f"OverfitDetector: `train_monitor={self.train_monitor!r}` is not among the logged metrics {keys}. Log it "
                "with on_epoch=True, or leave `train_monitor=None` to use the loss training_step returns."
            )
        if not math.isfinite(float(logged)):
            self.record(trainer, non_finite_metric(key, float(logged), "OverfitDetector"), key=key)
        self._add(trainer, x, float(logged), val)

    # -- decide ---------------------------------------------------------------------------------------------
    def _add(self, trainer: pl.Trainer, x: float, train: float, val: float | None) -> None:
        x, train, val = _distributed.broadcast(trainer, (x, train, val))  # rank 0's curve for everyone
        if val is not None and not math.isfinite(val):
            self.record(trainer, non_finite_metric(self.monitor, val, "OverfitDetector"), key=self.monitor)
        self.points.append(CurvePoint(x, train, val))
        self.steps.append(int(trainer.global_step))
        metrics = {"diag/overfit/train_loss": train}
        if (
            val is not None
            and math.isfinite(val)
            and math.isfinite(train)
            and comparable(self.points, self.rules)
        ):
            metrics["diag/overfit/gap"] = val - train  # a gap only between losses on the same scale
        _logging.log_direct(trainer, metrics, step=trainer.global_step)
        stop_reason: Verdict | None = None
        for detection in diagnose(
            self.points,
            self.rules,
            self.chance_loss,
            unit="epoch",
            initial=self.initial_loss,
            recent=self.recent_loss,
            frozen_share=_frozen_share(trainer.lightning_module),
            chance=self._chance(trainer),
        ):
            self.record(trainer, detection, key=f"{detection.code}:{detection.severity}")
            if detection.code in STOP_CODES and detection.severity != "info":
                stop_reason = stop_reason or detection
        if self.action == "stop" and stop_reason is not None and not trainer.should_stop:
            trainer.should_stop = True
            self.stopped_at = x
            self.record(trainer, stopped_verdict(stop_reason.code, x))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Stopped early by another callback (EarlyStop): a gap that was widening at the stop is the reason.
        if not self.points or not trainer.should_stop or self.stopped_at is not None:
            return
        for detection in diagnose(
            self.points,
            self.rules,
            self.chance_loss,
            unit="epoch",
            initial=self.initial_loss,
            stopped=True,
            chance=self._chance(trainer),
        ):
            if detection.code == "overfitting" and detection.severity == "warning":
                self.record(trainer, detection, key=f"{detection.code}:{detection.severity}")

    def _chance(self, trainer: pl.Trainer) -> float | None:
        """A uniform guess's loss: ``chance_loss`` when given, else what SanityCheck saw of the loss."""
        return self.chance_loss if self.chance_loss is not None else run_context(trainer).chance_loss

    # -- report ---------------------------------------------------------------------------------------------
    def report_series(self) -> dict[str, Any]:
        """The learning curve for the end-of-run plots."""
        return {
            "curve": [(p.x, p.train, p.val) for p in self.points],
            "curve_steps": list(self.steps),
            "unit": "epoch",
            "val_key": self.monitor,
            "stopped_at": self.stopped_at,
        }

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "points": [[p.x, p.train, p.val] for p in self.points],
            "steps": list(self.steps),
            "stopped_at": self.stopped_at,
            # the partial mean since the last evaluation (a mid-epoch checkpoint), as saved bits: exact on resume
            "train_sum": self._sum.detach().cpu() if self._sum is not None else None,
            "train_count": self._count,
            "pending": list(self._pending) if self._pending is not None else None,
            "initial_loss": self.initial_loss,
            "recent_loss": self.recent_loss,
            # the steps the initial and recent losses are still being read from (a checkpoint mid-epoch)
            "recent": [p.detach().cpu() for p in self._recent],
            "first": self._first.detach().cpu() if self._first is not None else None,
            "first_steps": self._first_steps,
            "findings": self._findings_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "points" in state_dict:
            self.points = [
                CurvePoint(float(x), float(t), None if v is None else float(v))
                for x, t, v in state_dict["points"]
            ]
        self.steps = [int(s) for s in state_dict.get("steps", self.steps)]
        self.stopped_at = state_dict.get("stopped_at", self.stopped_at)
        if isinstance(state_dict.get("train_sum"), torch.Tensor):
            self._sum = state_dict["train_sum"].clone()
            self._count = int(state_dict.get("train_count", 0))
        pending = state_dict.get("pending")
        if pending is not None:
            x, train, val = pending
            self._pending = (float(x), float(train), None if val is None else float(val))
        self.initial_loss = state_dict.get("initial_loss", self.initial_loss)
        self.recent_loss = state_dict.get("recent_loss", self.recent_loss)
        self._recent = collections.deque(
            (p.clone() for p in state_dict.get("recent", [])), maxlen=INITIAL_STEPS
        )
        if isinstance(state_dict.get("first"), torch.Tensor):
            self._first = state_dict["first"].clone()
        self._first_steps = int(state_dict.get("first_steps", self._first_steps))
        self._load_findings_state(state_dict)


def _frozen_share(pl_module: pl.LightningModule) -> float:
    """The share of the model's parameter elements that do not train (``requires_grad=False``)."""
    total = frozen = 0
    for p in pl_module.parameters():
        total += p.numel()
        frozen += 0 if p.requires_grad else p.numel()
    return frozen / total if total else 0.0
