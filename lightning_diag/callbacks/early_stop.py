"""EarlyStop: Lightning's EarlyStopping plus best-weight restoration, warm-up epochs and a baseline."""

from __future__ import annotations

import difflib
import logging
import math
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_diag import _lightning, _logging
from lightning_diag._distributed import broadcast
from lightning_diag._validation import (
    ConfigurationError,
    MissingMetricError,
    Unused,
    check_bool,
    check_choice,
    check_int,
    check_key,
    check_number,
    check_order,
    check_positive,
    check_unused,
)
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.core.stopping import StopTracker, early_stopped_verdict, missing_metric_verdict
from lightning_diag.core.verdict import non_finite_metric

__all__ = ["EarlyStop"]

log = logging.getLogger("lightning.pytorch.callbacks.early_stopping")

_REASONS = {
    "none": EarlyStoppingReason.NOT_STOPPED,
    "non_finite": EarlyStoppingReason.NON_FINITE_METRIC,
    "stopping_threshold": EarlyStoppingReason.STOPPING_THRESHOLD,
    "divergence_threshold": EarlyStoppingReason.DIVERGENCE_THRESHOLD,
    "patience": EarlyStoppingReason.PATIENCE_EXHAUSTED,
}

#: Settings that have no effect (``_validation.check_unused``).
_UNUSED = (
    Unused(
        ("restore_from",),
        lambda a: not a["restore_best_weights"],
        "`restore_best_weights=False`",
        "set `restore_best_weights=True`",
    ),
)


class EarlyStop(EarlyStopping, DiagCallback):
    """Stop training when a monitored metric stops improving, and restore the best weights.

    A superset of Lightning's :class:`~lightning.pytorch.callbacks.EarlyStopping` (same arguments and rules, and
    an instance of it, so it runs after ``LightningModule.on_train_epoch_end`` and Lightning sees it as an
    early-stopping callback) with Keras' ``restore_best_weights``, ``start_from_epoch`` and ``baseline``.
    The check runs in ``on_train_epoch_end`` when validation runs once per epoch, else in ``on_validation_end``.

    Decision rules (first match wins): non-finite value (``check_finite``) → stop; ``stopping_threshold``
    beaten → stop; ``divergence_threshold`` crossed → stop; better than the best by more than ``min_delta`` →
    new best (patience resets only if it also beats ``baseline``); otherwise one more check without improvement,
    and ``patience`` of them stop. See :mod:`lightning_diag.core.stopping`.

    Args:
        monitor: the key in ``trainer.callback_metrics`` to watch (e.g. ``"val_loss"``).
        min_delta: an improvement must beat the best by more than this (``>= 0`` in both modes).
        patience: checks without improvement before stopping (checks, not epochs, when validating more than once
            per epoch).
        verbose: log every decision.
        mode: ``"min"`` (lower is better) or ``"max"``.
        strict: raise when ``monitor`` is missing (the message lists the available keys); else skip the check.
        check_finite: stop when the metric becomes NaN/Inf.
        stopping_threshold: stop once the metric is better than this.
        divergence_threshold: stop once the metric is worse than this.
        check_on_train_epoch_end: force the check to ``on_train_epoch_end`` (True) or ``on_validation_end``
            (False); by default chosen from the validation schedule as Lightning does.
        log_rank_zero_only: write ``verbose`` messages from global rank 0 only.
        restore_best_weights: load the best weights back into the model when training ends, whatever ended it
            (this callback, ``max_epochs``/``max_steps`` or another callback). "Best" is the best value seen, the
            same one ``ModelCheckpoint`` keeps: ``min_delta`` only decides patience.
        restore_from: where the best weights come from: ``"memory"`` (a CPU copy taken at each improvement),
            ``"checkpoint"`` (the best file of a ``ModelCheckpoint`` monitoring the same key and mode), or
            ``"auto"`` (the checkpoint when such a ``ModelCheckpoint`` exists, else memory).
        start_from_epoch: ignore epochs before this one (no best, no patience counting): lets a warm-up settle.
        baseline: patience resets only on values that also beat this; the run stops after ``patience`` checks
            that do not.

    Logged metrics:
        None (it reads metrics).

    Findings:
        ``early_stopped`` (info; warning for the divergence and non-finite stops): why training stopped, with the
        best score, best epoch and the epoch whose weights were restored.

    Raises:
        ValueError: (``ArgumentError``, also a ``MisconfigurationException``) at construction for a negative
            ``min_delta``/``patience``/``start_from_epoch``, a NaN threshold, an unknown ``mode``/``restore_from``, a
            non-bool flag, ``stopping_threshold`` on the wrong side of ``divergence_threshold``, or ``restore_from``
            with ``restore_best_weights=False``; at ``setup`` for ``restore_from="checkpoint"`` without a matching
            ``ModelCheckpoint``.
        RuntimeError: (``MissingMetricError``) at the first check when ``strict`` and ``monitor`` is missing,
            listing available keys. With ``strict=False`` a monitor never seen is a ``missing_metric`` info
            finding at the end of the fit; a NaN/Inf value is a ``non_finite_metric`` finding.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import EarlyStop
        >>> trainer = pl.Trainer(max_epochs=50, callbacks=[EarlyStop(monitor="val_loss", patience=5)])

    Note:
        With ``restore_from="memory"`` the best weights are kept on the CPU (one copy of the model's state dict)
        and saved in the callback's checkpoint state, so a resumed run restores the same weights; a
        ``ModelCheckpoint`` on the same key avoids both copies. Decisions are identical on every rank: rank 0's
        value of the metric is broadcast before deciding (one collective per check). A stop is not latched while
        ``min_epochs``/``min_steps`` forbid it: the run goes on and the rules are applied again at the next check.
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: Literal["min", "max"] = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = True,
        restore_best_weights: bool = True,
        restore_from: Literal["auto", "memory", "checkpoint"] = "auto",
        start_from_epoch: int = 0,
        baseline: float | None = None,
    ) -> None:
        DiagCallback.__init__(
            self
        )  # EarlyStopping.__init__ would sign-flip min_delta; we set every attribute here
        check_key("monitor", monitor)
        for name, flag in (
            ("verbose", verbose),
            ("strict", strict),
            ("check_finite", check_finite),
            ("log_rank_zero_only", log_rank_zero_only),
            ("restore_best_weights", restore_best_weights),
        ):
            check_bool(name, flag)
        check_bool("check_on_train_epoch_end", check_on_train_epoch_end, optional=True)
        check_positive("min_delta", min_delta, strict=False)
        check_int("patience", patience, minimum=0)
        check_choice("mode", mode, ("min", "max"))
        check_choice("restore_from", restore_from, ("auto", "memory", "checkpoint"))
        check_int("start_from_epoch", start_from_epoch, minimum=0)
        for name, value in (
            ("stopping_threshold", stopping_threshold),
            ("divergence_threshold", divergence_threshold),
            ("baseline", baseline),
        ):
            if value is not None:
                check_number(name, value, allow_inf=True)
        if mode == "min":  # stop when good enough (below), give up when far worse (above)
            check_order(
                "stopping_threshold", stopping_threshold, "divergence_threshold", divergence_threshold
            )
        else:
            check_order(
                "divergence_threshold", divergence_threshold, "stopping_threshold", stopping_threshold
            )
        check_unused(EarlyStop.__init__, locals(), _UNUSED)

        self.monitor = monitor
        self.min_delta = float(min_delta)
        self.patience = patience
        self.verbose = verbose
        self.mode = mode
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self._check_on_train_epoch_end = check_on_train_epoch_end
        self.log_rank_zero_only = log_rank_zero_only
        self.restore_best_weights = restore_best_weights
        self.restore_from = restore_from
        self.start_from_epoch = start_from_epoch
        self.baseline = baseline

        self._checkpoint_callback: ModelCheckpoint | None = None
        self._reset_state()

    def _new_tracker(self) -> StopTracker:
        return StopTracker(
            mode=cast(Literal["min", "max"], self.mode),
            min_delta=self.min_delta,
            patience=self.patience,
            check_finite=self.check_finite,
            stopping_threshold=self.stopping_threshold,
            divergence_threshold=self.divergence_threshold,
            baseline=self.baseline,
            name=self.monitor,
        )

    # -- Lightning EarlyStopping-compatible attributes ----------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @property
    def wait_count(self) -> int:
        """Checks since the last improvement."""
        return self._tracker.wait_count

    @wait_count.setter
    def wait_count(self, value: int) -> None:
        self._tracker.wait_count = int(value)

    @property
    def best_score(self) -> torch.Tensor:
        """The best value seen (a tensor, as in Lightning's ``EarlyStopping``)."""
        return torch.tensor(self._tracker.best)

    @best_score.setter
    def best_score(self, value: Any) -> None:
        self._tracker.best = float(value)

    # -- hooks ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        DiagCallback.setup(self, trainer, pl_module, stage)
        if stage != "fit":
            return
        if self._check_on_train_epoch_end is None:
            self._check_on_train_epoch_end = (
                trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
            )
        self._checkpoint_callback = self._find_checkpoint_callback(trainer)
        if self.restore_from == "checkpoint" and self._checkpoint_callback is None:
            raise ConfigurationError(
                f"EarlyStop(restore_from='checkpoint') needs a `ModelCheckpoint(monitor={self.monitor!r}, "
                f"mode={self.mode!r})` among the callbacks (with `save_top_k != 0`). Add one, or use "
                "`restore_from='memory'`."
            )

    def _reset_state(self) -> None:
        # A new fit starts from scratch; a resumed fit gets its state back from load_state_dict (called later).
        self._tracker = self._new_tracker()
        self.stopped_epoch = 0
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        self.stopping_reason_message: str | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self.restored_epoch: int | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._monitor_seen = False
        self._missing_checks = 0  # checks that found no `monitor` (strict=False)

    def _find_checkpoint_callback(self, trainer: pl.Trainer) -> ModelCheckpoint | None:
        if self.restore_from == "memory":
            return None
        for callback in _lightning.trainer_callbacks(trainer):
            if (
                _lightning.is_a(callback, "callbacks.ModelCheckpoint")
                and callback.monitor == self.monitor
                and callback.mode == self.mode
                and callback.save_top_k != 0
            ):
                return callback
        return None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._check_on_train_epoch_end and not _skip_check(trainer):
            self._run_early_stopping_check(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._check_on_train_epoch_end and not _skip_check(trainer):
            self._run_early_stopping_check(trainer)

    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if getattr(trainer, "fast_dev_run", False) or trainer.current_epoch < self.start_from_epoch:
            return
        logs = trainer.callback_metrics
        value = logs.get(self.monitor)
        # Every rank decides on rank 0's value: one collective, identical decisions, replicas never diverge.
        current = broadcast(trainer, None if value is None else float(torch.as_tensor(value).float().mean()))
        if current is None:
            if 0 < trainer.max_steps <= trainer.global_step:
                return  # `max_steps` ended the epoch before its validation ran: nothing to judge, nothing wrong
            self._missing_checks += 1
            self._missing_monitor(sorted(logs))
            return
        self._monitor_seen = True
        if not math.isfinite(current):
            self.record(trainer, non_finite_metric(self.monitor, current, "EarlyStop"), key=self.monitor)

        decision = self._tracker.update(current, at=int(trainer.current_epoch))
        if decision.new_best:
            self.best_epoch = int(trainer.current_epoch)
            self.best_step = int(trainer.global_step)
            if self.restore_best_weights and self._checkpoint_callback is None:
                self._best_weights = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in trainer.lightning_module.state_dict().items()
                }
        if self.verbose:
            self._say(trainer, decision.message)
        if not decision.stop:
            return
        if not self._can_stop(trainer):
            if self.verbose:
                self._say(
                    trainer, f"{decision.message} Not stopping yet: `min_epochs`/`min_steps` not reached."
                )
            return
        trainer.should_stop = True
        self.stopped_epoch = int(trainer.current_epoch)
        self.stopping_reason = _REASONS[decision.reason]
        self.stopping_reason_message = decision.message
        verdict = early_stopped_verdict(
            decision,
            self.monitor,
            current,
            stopped_epoch=self.stopped_epoch,
            best_seen=self._tracker.best_seen,
            best_epoch=self.best_epoch,
            wait_count=self._tracker.wait_count,
            patience=self.patience,
            restores=self.restore_best_weights,
        )
        self.record(trainer, verdict)

    @staticmethod
    def _can_stop(trainer: pl.Trainer) -> bool:
        """Whether the trainer would honour ``should_stop`` now (the ``min_epochs``/``min_steps`` rule)."""
        loop = trainer.fit_loop
        met_epochs = not loop.min_epochs or _lightning.epochs_processed(trainer) >= loop.min_epochs
        met_steps = not loop.min_steps or trainer.global_step >= loop.min_steps
        return bool(met_epochs and met_steps)

    def _missing_monitor(self, available: list[str]) -> None:
        close = difflib.get_close_matches(self.monitor, available, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        listed = ", ".join(f"`{k}`" for k in available) or "none (nothing was logged yet)"
        message = (
            f"EarlyStop is monitoring `{self.monitor}`, which is not in `trainer.callback_metrics`.{hint} "
            f"Available keys: {listed}. Log it with `self.log({self.monitor!r}, ...)` or change `monitor`."
        )
        if self.strict:
            raise MissingMetricError(message)
        if self.verbose:
            rank_zero_info(message)

    def _say(self, trainer: pl.Trainer, message: str) -> None:
        if trainer.world_size > 1:
            if self.log_rank_zero_only and trainer.global_rank != 0:
                return
            message = f"[rank: {trainer.global_rank}] {message}"
        log.info(f"EarlyStop: {message}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._missing_checks and not self._monitor_seen:
            verdict = missing_metric_verdict(
                self.monitor, self._missing_checks, sorted(trainer.callback_metrics)
            )
            self.record(trainer, verdict, key=self.monitor)
        if not self.restore_best_weights or self.best_step is None or self.best_step == trainer.global_step:
            return  # nothing to restore: no best yet, or the model still holds the best weights
        if self._checkpoint_callback is not None and self._checkpoint_callback.best_model_path:
            checkpoint = trainer.strategy.load_checkpoint(self._checkpoint_callback.best_model_path)
            trainer.strategy.load_model_state_dict(checkpoint)
            source = self._checkpoint_callback.best_model_path
            self.restored_epoch = int(checkpoint.get("epoch", -1))
        elif self._best_weights is not None:
            pl_module.load_state_dict(self._best_weights)
            source = "memory"
            self.restored_epoch = self.best_epoch
        else:
            return
        _logging.console(
            trainer,
            f"EarlyStop: restored the best weights (`{self.monitor}` = {self._tracker.best_seen:.6g} at epoch "
            f"{self.best_epoch}) from {source}.",
        )
        for finding in self.findings:
            if finding.code == "early_stopped":
                finding.evidence["restored_epoch"] = (
                    -1 if self.restored_epoch is None else self.restored_epoch
                )

    # -- state ----------------------------------------------------------------------------------------------
    def report_series(self) -> dict[str, Any]:
        """Where the run stopped and which epoch was best (``*_x`` counted in epochs done, like the curve), and the
        best value: the one whose weights were restored.
        """
        if self.best_epoch is None:
            return {}
        return {
            "early_stop": {
                "best_x": self.best_epoch + 1,
                "best_value": self._tracker.best_seen,
                "monitor": self.monitor,
                "mode": self.mode,
                "restored": self.restored_epoch is not None,
                "stopped_x": self.stopped_epoch + 1 if self.stopped_epoch else None,
            }
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self._tracker.state_dict(),
            "stopped_epoch": self.stopped_epoch,
            "stopping_reason": self.stopping_reason.value,
            "stopping_reason_message": self.stopping_reason_message,
            "best_epoch": self.best_epoch,
            "best_step": self.best_step,
            "best_weights": self._best_weights,
            "monitor_seen": self._monitor_seen,
            "missing_checks": self._missing_checks,
            "findings": self._findings_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # `patience` and the other settings are the constructor's, never the checkpoint's.
        self._tracker.load_state_dict(state_dict)
        self.stopped_epoch = int(state_dict.get("stopped_epoch", self.stopped_epoch))
        self.stopping_reason = EarlyStoppingReason(
            state_dict.get("stopping_reason", self.stopping_reason.value)
        )
        self.stopping_reason_message = state_dict.get("stopping_reason_message", self.stopping_reason_message)
        self.best_epoch = state_dict.get("best_epoch", self.best_epoch)
        self.best_step = state_dict.get("best_step", self.best_step)
        self._best_weights = state_dict.get("best_weights", self._best_weights)
        self._monitor_seen = bool(state_dict.get("monitor_seen", self._monitor_seen))
        self._missing_checks = int(state_dict.get("missing_checks", self._missing_checks))
        self._load_findings_state(state_dict)


def _skip_check(trainer: pl.Trainer) -> bool:
    """No early-stopping check outside ``fit`` or during the sanity-check validation (public trainer state)."""
    return trainer.state.fn != "fit" or bool(trainer.sanity_checking)
