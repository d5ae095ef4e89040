"""WarmupCosine: per-step linear warmup then cosine decay (with optional warm restarts), exact on resume."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag import _logging
from lightning_diag._validation import (
    ArgumentError,
    ConfigurationError,
    Unused,
    check_bool,
    check_choice,
    check_exclusive,
    check_fraction,
    check_int,
    check_positive,
    check_unused,
)
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import run_context
from lightning_diag.core.schedules import warmup_cosine

__all__ = ["WarmupCosine"]


def _no_warmup(given: Mapping[str, Any]) -> str:
    if given["warmup_steps"] == 0:
        return "`warmup_steps=0`"
    return "`warmup_ratio=0`" if given["warmup_ratio"] == 0 else "no `warmup_steps`/`warmup_ratio`"


#: Settings that have no effect (``_validation.check_unused``).
_UNUSED = (
    Unused(
        ("cycle_mul", "cycle_decay"), lambda a: a["num_cycles"] == 1, "`num_cycles=1`", "set `num_cycles` > 1"
    ),
    Unused(
        ("warmup_start_lr", "warmup_start_factor"),
        lambda a: (a["warmup_steps"] or 0) == 0 and (a["warmup_ratio"] or 0) == 0,
        _no_warmup,
        "give the warmup a length",
    ),
)


class WarmupCosine(DiagCallback):
    """Linear warmup followed by cosine decay, applied to every param group from its own base learning rate.

    The rate for step ``s`` is :func:`lightning_diag.core.schedules.warmup_cosine` of ``s``, a pure function, so
    a run resumed from a checkpoint gets exactly the rates of an uninterrupted run. With ``interval="step"``
    (default) ``s`` counts optimizer steps (``trainer.global_step``: gradient accumulation is accounted for) and
    the rate is written in ``on_train_batch_start``; with ``interval="epoch"`` ``s`` is the epoch and the rate is
    written in ``on_train_epoch_start``. The base rates are the ones ``configure_optimizers`` set, captured at
    ``on_fit_start``, so no scheduler is needed in ``configure_optimizers``.

    Args:
        warmup_steps: length of the linear warmup, in optimizer steps (epochs with ``interval="epoch"``).
        warmup_ratio: the warmup as a fraction of the total schedule, instead of ``warmup_steps``.
        total_steps: length of the whole schedule; by default ``trainer.estimated_stepping_batches``
            (``max_epochs`` with ``interval="epoch"``). From ``total_steps`` on the rate stays at the minimum.
        warmup_start_lr: the rate at the first warmup step, the same for every param group.
        warmup_start_factor: the first warmup rate as a fraction of each group's base rate, instead of
            ``warmup_start_lr``. With neither, the warmup starts at ``base_lr / (warmup + 1)`` and grows by the
            same amount each step, so the first step never trains at rate 0 (pass ``warmup_start_lr=0.0`` for
            HuggingFace's ramp from 0).
        min_lr: the floor of the cosine decay, the same for every param group.
        min_lr_ratio: the floor as a fraction of each group's base rate, instead of ``min_lr`` (default 0).
        num_cycles: cosine cycles after warmup (``> 1`` gives SGDR warm restarts).
        cycle_mul: each cycle is this many times as long as the previous one.
        cycle_decay: each cycle's peak rate is this many times the previous one's.
        interval: ``"step"`` or ``"epoch"``.
        log_lr: log the rate of every param group (at the logging interval, ``Trainer(log_every_n_steps)``).

    Logged metrics:
        ============================  =============================================================
        key                           value
        ============================  =============================================================
        ``diag/lr/group<i>``          rate of param group ``i`` (groups numbered across optimizers)
        ============================  =============================================================

    Findings:
        ``declined`` (info, with a LightningDiagWarning) when it leaves the rates as configured: under
        ``fast_dev_run``, and under manual optimization with several optimizers when the run is bounded by
        ``max_steps`` and ``total_steps`` is not given. Other misconfigurations raise (see Raises).

    Raises:
        ValueError: at construction for a negative or non-integer ``warmup_steps``, a ratio outside its range,
            two mutually exclusive arguments, ``warmup_steps >= total_steps``; at ``on_fit_start`` when a
            scheduler is configured in ``configure_optimizers`` (the two schedules would overwrite each other),
            when the schedule length cannot be derived (an iterable dataset without ``max_steps``) or when the
            warmup does not fit in it.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import WarmupCosine
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[WarmupCosine(warmup_ratio=0.05, min_lr_ratio=0.1)])

    Note:
        The resolved schedule length and the base rates are saved in the checkpoint; a resumed run keeps them
        (so changing ``max_epochs`` on resume does not stretch a schedule already under way). Under DDP every rank
        computes the same rate from the same step, so no communication is needed.

        With :class:`~lightning_diag.NaNGuard` in the same Trainer, a skipped step does not advance the schedule
        (``interval="step"``): the schedule step is ``global_step - held_steps``. NaNGuard asks for one held step
        per skipped step and for the number of discarded steps on a rollback, and a rollback's LR back-off
        multiplies every rate by ``lr_scale``; the requests travel through the run's shared context
        (``callbacks/_context.py``) and are taken at the next batch boundary. Both are saved in the checkpoint.

        Manual optimization with several optimizers (a GAN's generator and discriminator): ``global_step`` counts
        the steps of every optimizer, so the schedule step is the number of training batches done instead (saved
        in the checkpoint), and every optimizer follows the progress of training whether it steps in every
        batch or not; ``total_steps`` is then in training batches. Skipped steps do not hold that schedule.
    """

    # The schedule as resolved for the current fit (see ``_reset_state`` and ``on_fit_start``).
    base_lrs: list[list[float]] | None
    resolved_total_steps: int | None
    resolved_warmup_steps: int | None
    held_steps: int
    lr_scale: float

    def __init__(
        self,
        warmup_steps: int | None = None,
        warmup_ratio: float | None = None,
        total_steps: int | None = None,
        warmup_start_lr: float | None = None,
        warmup_start_factor: float | None = None,
        min_lr: float | None = None,
        min_lr_ratio: float | None = None,
        num_cycles: int = 1,
        cycle_mul: float = 1.0,
        cycle_decay: float = 1.0,
        interval: Literal["step", "epoch"] = "step",
        log_lr: bool = True,
    ) -> None:
        super().__init__()
        check_exclusive(warmup_steps=warmup_steps, warmup_ratio=warmup_ratio)
        check_exclusive(warmup_start_lr=warmup_start_lr, warmup_start_factor=warmup_start_factor)
        check_exclusive(min_lr=min_lr, min_lr_ratio=min_lr_ratio)
        if warmup_steps is not None:
            check_int("warmup_steps", warmup_steps, minimum=0)
        if warmup_ratio is not None:
            check_fraction("warmup_ratio", warmup_ratio, high_open=True)
        if total_steps is not None:
            check_int("total_steps", total_steps, minimum=1)
            if warmup_steps is not None and warmup_steps >= total_steps:
                raise ArgumentError(
                    f"`warmup_steps` must be < `total_steps` ({total_steps}), got {warmup_steps!r}: "
                    "the warmup must leave at least one step for the cosine decay."
                )
        if warmup_start_lr is not None:
            check_positive("warmup_start_lr", warmup_start_lr, strict=False)
        if warmup_start_factor is not None:
            check_fraction("warmup_start_factor", warmup_start_factor)
        if min_lr is not None:
            check_positive("min_lr", min_lr, strict=False)
        if min_lr_ratio is not None:
            check_fraction("min_lr_ratio", min_lr_ratio)
        check_int("num_cycles", num_cycles, minimum=1)
        check_positive("cycle_mul", cycle_mul)
        check_positive("cycle_decay", cycle_decay)
        check_choice("interval", interval, ("step", "epoch"))
        check_bool("log_lr", log_lr)
        check_unused(WarmupCosine.__init__, locals(), _UNUSED)

        self.warmup_steps = warmup_steps
        self.warmup_ratio = warmup_ratio
        self.total_steps = total_steps
        self.warmup_start_lr = warmup_start_lr
        self.warmup_start_factor = warmup_start_factor
        self.min_lr = min_lr
        self.min_lr_ratio = min_lr_ratio
        self.num_cycles = num_cycles
        self.cycle_mul = float(cycle_mul)
        self.cycle_decay = float(cycle_decay)
        self.interval = interval
        self.log_lr = log_lr

        self._reset_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            warmup_steps=self.warmup_steps,
            warmup_ratio=self.warmup_ratio,
            total_steps=self.total_steps,
            num_cycles=self.num_cycles,
            interval=self.interval,
        )

    # -- the schedule ---------------------------------------------------------------------------------------
    def _resolve(self, trainer: pl.Trainer) -> None:
        if self.resolved_total_steps is None:
            self.resolved_total_steps = (
                self.total_steps if self.total_steps is not None else self._derive_total(trainer)
            )
        total = self.resolved_total_steps
        if self.resolved_warmup_steps is None:
            if self.warmup_steps is not None:
                self.resolved_warmup_steps = self.warmup_steps
            elif self.warmup_ratio is not None:
                self.resolved_warmup_steps = round(self.warmup_ratio * total)
            else:
                self.resolved_warmup_steps = 0
        if self.resolved_warmup_steps >= total:
            unit = "steps" if self.interval == "step" else "epochs"
            raise ConfigurationError(
                f"WarmupCosine: the warmup ({self.resolved_warmup_steps} {unit}) must be shorter than the schedule "
                f"({total} {unit}). Lower `warmup_steps`/`warmup_ratio` or train longer."
            )

    def _derive_total(self, trainer: pl.Trainer) -> int:
        if self.interval == "epoch":
            epochs = trainer.max_epochs
            if epochs is None or epochs < 1:
                raise ConfigurationError(
                    f"WarmupCosine(interval='epoch') cannot derive the schedule length: `Trainer(max_epochs={epochs})`."
                    " Pass `WarmupCosine(total_steps=...)` (in epochs) or set `max_epochs`."
                )
            return int(epochs)
        estimated = trainer.estimated_stepping_batches
        if estimated is None or not math.isfinite(estimated) or estimated < 1:
            raise ConfigurationError(
                "WarmupCosine cannot derive the schedule length: `trainer.estimated_stepping_batches` is "
                f"{estimated!r} (an IterableDataset without a length, or `max_epochs=-1`). Pass "
                "`WarmupCosine(total_steps=...)` or set `Trainer(max_steps=...)`."
            )
        return int(estimated)

    def lr_at(self, step: int, base_lr: float) -> float:
        """The rate for a param group whose base rate is ``base_lr`` at schedule step ``step``."""
        if self.resolved_total_steps is None or self.resolved_warmup_steps is None:
            raise RuntimeError(
                "WarmupCosine.lr_at() needs the schedule length: it is resolved at `on_fit_start`."
            )
        warmup = self.resolved_warmup_steps
        if self.warmup_start_lr is not None:
            start = self.warmup_start_lr
        elif self.warmup_start_factor is not None:
            start = self.warmup_start_factor * base_lr
        else:
            start = base_lr / (warmup + 1)
        floor = self.min_lr if self.min_lr is not None else (self.min_lr_ratio or 0.0) * base_lr
        return warmup_cosine(
            step,
            base_lr=base_lr,
            total_steps=self.resolved_total_steps,
            warmup_steps=warmup,
            warmup_start_lr=start,
            min_lr=floor,
            num_cycles=self.num_cycles,
            cycle_mul=self.cycle_mul,
            cycle_decay=self.cycle_decay,
        )

    def _apply(self, trainer: pl.Trainer, step: int) -> None:
        for optimizer, base_lrs in zip(trainer.optimizers, self.base_lrs or [], strict=False):
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=False):
                group["lr"] = self.lr_at(step, base_lr) * self.lr_scale

    def hold(self, steps: int) -> None:
        """Keep the schedule where it is for ``steps`` optimizer steps that did not update the model."""
        if self.interval == "step":
            self.held_steps += int(steps)

    def scale_lr(self, factor: float) -> None:
        """Multiply every rate from now on by ``factor`` (an LR back-off that the schedule keeps)."""
        self.lr_scale *= float(factor)

    # -- hooks ----------------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        # Resolved at on_fit_start: a new fit resolves its own schedule, a resumed one gets it back from
        # load_state_dict (called after setup, before on_fit_start).
        self.base_lrs = None
        self.resolved_total_steps = None
        self.resolved_warmup_steps = None
        self.held_steps = 0
        self.lr_scale = 1.0
        self.lr_history: list[tuple[int, float]] = []  # (global step, rate of group 0) at the logging steps
        # Manual optimization with several optimizers: the schedule follows the training batches (one step each)
        self.by_batch = False
        self.batches_done = 0
        self.declined = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer, "fast_dev_run", False):  # set by the Trainer's __init__
            self.declined = True
            self.decline(
                trainer,
                "WarmupCosine leaves the learning rates as configured under `fast_dev_run` (a smoke test of a few "
                "steps has no schedule to follow).",
                "fast_dev_run",
            )
            return
        self.by_batch = (
            self.interval == "step" and not pl_module.automatic_optimization and len(trainer.optimizers) > 1
        )
        if (
            self.by_batch
            and self.total_steps is None
            and trainer.max_steps != -1
            and self.resolved_total_steps is None
        ):
            # global_step counts every optimizer's steps: how many training batches max_steps allows is unknown
            self.declined = True
            self.decline(
                trainer,
                f"WarmupCosine cannot derive the schedule length under manual optimization with "
                f"{len(trainer.optimizers)} optimizers and `Trainer(max_steps={trainer.max_steps})` (global_step "
                "counts the steps of every optimizer). The learning rates are left as configured: pass "
                "`WarmupCosine(total_steps=...)` in training batches, or bound the run with `max_epochs`.",
                "manual_max_steps",
            )
            return
        if trainer.lr_scheduler_configs:
            names = ", ".join(type(cfg.scheduler).__name__ for cfg in trainer.lr_scheduler_configs)
            raise ConfigurationError(
                f"WarmupCosine found a learning-rate scheduler configured in `configure_optimizers` ({names}). Both "
                "would write the learning rate every step. Return only the optimizer(s) from `configure_optimizers`, "
                "or remove WarmupCosine from the callbacks."
            )
        groups = [
            [float(group["lr"]) for group in optimizer.param_groups] for optimizer in trainer.optimizers
        ]
        if self.base_lrs is None:
            # Fresh run: the configured rates are the base rates. A resumed run restored them in load_state_dict
            # (the optimizer's rates at this point of a resume are the freshly configured ones, not the decayed).
            self.base_lrs = groups
        elif [len(g) for g in self.base_lrs] != [len(g) for g in groups]:
            raise ConfigurationError(
                "WarmupCosine: the checkpoint's param groups per optimizer "
                f"{[len(g) for g in self.base_lrs]} do not match the model's {[len(g) for g in groups]}."
            )
        self._resolve(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch" and not self.declined:
            self._apply(trainer, trainer.current_epoch)

    def _take_requests(self, trainer: pl.Trainer) -> None:
        """Apply what a guard asked of the schedule owner (steps to hold, an LR back-off), once."""
        held, scale = run_context(trainer).take_schedule_requests()
        if held:
            self.hold(held)
        if scale != 1.0:
            self.scale_lr(scale)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._take_requests(trainer)
        if self.declined or self.interval != "step":
            return
        if self.by_batch:
            # One schedule step per training batch, whichever optimizers step in it (a GAN's generator and
            # discriminator each follow the progress of training, not the sum of their steps).
            self._apply(trainer, self.batches_done)
        else:
            # Idempotent within an accumulation window: global_step only moves on a real optimizer step.
            self._apply(trainer, max(trainer.global_step - self.held_steps, 0))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Taken before checkpoint callbacks run (Lightning calls them last), so a checkpoint holds the requests.
        self._take_requests(trainer)
        if self.by_batch:
            self.batches_done += 1

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.log_lr or optimizer is not trainer.optimizers[0] or not _logging.should_log_step(trainer):
            return  # Lightning writes step metrics only at the logging interval: other steps would be wasted work
        metrics: dict[str, float] = {}
        index = 0
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                metrics[f"diag/lr/group{index}"] = float(group["lr"])
                index += 1
        _logging.log_step(pl_module, metrics)
        self.lr_history.append((int(trainer.global_step), metrics["diag/lr/group0"]))
        if len(self.lr_history) > 4000:
            del self.lr_history[::2]

    def report_series(self) -> dict[str, Any]:
        """The learning rate of param group 0 over time (logging steps), for the end-of-run plots."""
        return {"lr": list(self.lr_history)} if self.lr_history else {}

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lrs": [list(g) for g in self.base_lrs] if self.base_lrs is not None else None,
            "total_steps": self.resolved_total_steps,
            "warmup_steps": self.resolved_warmup_steps,
            "held_steps": self.held_steps,
            "lr_scale": self.lr_scale,
            "batches_done": self.batches_done,
            "findings": self._findings_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base_lrs = state_dict.get("base_lrs")
        self.base_lrs = [[float(lr) for lr in g] for g in base_lrs] if base_lrs is not None else None
        if state_dict.get("total_steps") is not None:
            self.resolved_total_steps = int(state_dict["total_steps"])
        if state_dict.get("warmup_steps") is not None:
            self.resolved_warmup_steps = int(state_dict["warmup_steps"])
        self.held_steps = int(state_dict.get("held_steps", 0))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))
        self.batches_done = int(state_dict.get("batches_done", 0))
        self._load_findings_state(state_dict)
