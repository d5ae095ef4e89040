"""HangWatchdog: a run that stops moving says where it is stuck, on which rank, and why."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import weakref
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag import _lightning, _logging
from lightning_diag._distributed import broadcast, gather, gather_objects, is_distributed
from lightning_diag._validation import (
    ConfigurationError,
    Unused,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_order,
    check_positive,
    check_range,
    check_unused,
)
from lightning_diag.callbacks._base import DiagCallback, run_report
from lightning_diag.callbacks._hang_readings import StepTimer
from lightning_diag.callbacks._hang_watch import Heartbeat, RaiseOnHang, Watch, poll_seconds
from lightning_diag.core.hangs import (
    FOREIGN_TIMER,
    BudgetSettings,
    HangEvent,
    PhaseBudgets,
    StepOutliers,
    StragglerRule,
    hang_error_message,
    training_hang,
    uneven_batches,
)
from lightning_diag.core.verdict import Verdict
from lightning_diag.findings import Finding, write_report

__all__ = ["HangWatchdog"]

#: Settings that have no effect (``_validation.check_unused``).
_UNUSED = (
    Unused(
        ("patience", "straggler_threshold"),
        lambda a: not a["check_stragglers"],
        "`check_stragglers=False`",
        "set `check_stragglers=True`",
    ),
)


class HangWatchdog(DiagCallback):
    """Notice a training run that stopped moving, dump every thread's stack, and say where, on which rank and why.

    Every hook of the fit is a heartbeat naming the phase the run enters (waiting for data, training step, backward,
    optimizer step, validation, checkpoint save, ...): about a microsecond, no host sync. A phase that outlasts its
    budget is a hang: a watchdog thread writes every thread's stack to ``<log dir>/hang_rank<r>.txt``, records
    ``training_hang`` and, on global rank 0, writes ``diagnosis.json`` with ``status: "hung"`` while the run is
    still stuck (faulthandler's C timer writes the dump when a C call holds the GIL). Under DDP the ranks' heartbeat
    files name the rank that is behind, without a collective.

    Args:
        action: ``"warn"``: record, dump and report, and let the run go on (if it ever does). ``"raise"``: also raise
            :class:`~lightning_diag.TrainingHangError` in the training thread if it is still stuck after a second
            budget.
        safety_factor: a learned budget is this multiple of the longest interval seen in its phase.
        min_timeout_s: the smallest learned budget (absorbs a loaded machine's pauses in short phases).
        max_timeout_s: the largest learned budget.
        first_step_timeout_s: the budget until the first training batch completed, of a phase not seen yet, of
            start-up and of teardown.
        step_timeout_s: a fixed budget for waiting for data, the training step, backward and the optimizer step
            (``None``: learned).
        validation_timeout_s: a fixed budget for each validation batch and its data (``None``: learned).
        checkpoint_timeout_s: a fixed budget for a checkpoint save (``None``: learned).
        check_step_time: record ``step_time_outlier`` (info) for steps far above the median, with what coincided.
        check_stragglers: under DDP, record ``straggler`` for a rank that is consistently slower.
        check_uneven_batches: under DDP, refuse to start when the ranks have different numbers of training batches.
        patience: consecutive logging steps at which a rank is slower before ``straggler`` becomes a warning.
        straggler_threshold: the share of a step the other ranks must spend waiting for the slowest one.

    Logged metrics (at the logging interval):
        ================================  ==============================================================
        key                               value
        ================================  ==============================================================
        ``diag/hang/budget_s``            the current budget of the training step phase, seconds
        ``diag/hang/outlier_steps``       step-time outliers found so far (``check_step_time``)
        ``diag/straggler/gap_ms``         DDP: the slowest rank's data + forward time minus the others'
        ``diag/straggler/rank``           DDP: the slowest rank
        ================================  ==============================================================

    Findings:
        ``training_hang`` (error while stuck, warning once the run resumed): the phase, the step, the seconds waited,
        the budget and its rule, the innermost frames (the training thread's and your code's), the dump file, under
        DDP the rank that is behind. ``uneven_batches`` (error, a warning when ``max_steps`` ends training first).
        ``straggler`` (info, a warning after ``patience``): the rank, the cause and the share of each step lost.
        ``step_time_outlier`` (info). ``declined`` (info): a faulthandler timer armed by other code (left alone),
        or ``action="raise"`` unavailable (fit not in the main thread, SIGUSR2 taken).

    Raises:
        ValueError: (``ArgumentError``) at construction for an unknown ``action``, a non-positive budget,
            ``min_timeout_s > max_timeout_s``, a ``safety_factor`` below 1 or a threshold outside ``(0, 1)``.
        ConfigurationError: at the start of training under DDP when the ranks' numbers of training batches differ
            (on every rank alike: the run would hang at the end of the shortest epoch).
        TrainingHangError: with ``action="raise"``, in the training thread, after two budgets without progress.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import HangWatchdog
        >>> trainer = pl.Trainer(callbacks=[HangWatchdog(min_timeout_s=60.0, checkpoint_timeout_s=900.0)])

    Note:
        How budgets are learned, what a dump holds, the straggler and outlier rules, ``action="raise"``'s limits
        (a C call that never returns to Python raises only when it returns) and faulthandler's one timer per process
        are on the HangWatchdog page: <https://lightning-diag.readthedocs.io/callbacks/hang-watchdog/>.
        Budgets are not checkpointed: a resumed run learns them again.
    """

    def __init__(
        self,
        action: Literal["warn", "raise"] = "warn",
        safety_factor: float = 5.0,
        min_timeout_s: float = 120.0,
        max_timeout_s: float = 1800.0,
        first_step_timeout_s: float = 600.0,
        step_timeout_s: float | None = None,
        validation_timeout_s: float | None = None,
        checkpoint_timeout_s: float | None = None,
        check_step_time: bool = True,
        check_stragglers: bool = True,
        check_uneven_batches: bool = True,
        patience: int = 3,
        straggler_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        check_choice("action", action, ("warn", "raise"))
        check_range("safety_factor", safety_factor, 1.0)
        for name, value in (
            ("min_timeout_s", min_timeout_s),
            ("max_timeout_s", max_timeout_s),
            ("first_step_timeout_s", first_step_timeout_s),
        ):
            check_positive(name, value)
        for name, optional in (
            ("step_timeout_s", step_timeout_s),
            ("validation_timeout_s", validation_timeout_s),
            ("checkpoint_timeout_s", checkpoint_timeout_s),
        ):
            if optional is not None:
                check_positive(name, optional)
        check_order("min_timeout_s", min_timeout_s, "max_timeout_s", max_timeout_s, strict=False)
        for name, flag in (
            ("check_step_time", check_step_time),
            ("check_stragglers", check_stragglers),
            ("check_uneven_batches", check_uneven_batches),
        ):
            check_bool(name, flag)
        check_int("patience", patience, minimum=1)
        check_fraction("straggler_threshold", straggler_threshold, low_open=True, high_open=True)
        check_unused(HangWatchdog.__init__, locals(), _UNUSED)
        self.action = action
        self.safety_factor = float(safety_factor)
        self.min_timeout_s = float(min_timeout_s)
        self.max_timeout_s = float(max_timeout_s)
        self.first_step_timeout_s = float(first_step_timeout_s)
        self.step_timeout_s = step_timeout_s
        self.validation_timeout_s = validation_timeout_s
        self.checkpoint_timeout_s = checkpoint_timeout_s
        self.check_step_time = check_step_time
        self.check_stragglers = check_stragglers
        self.check_uneven_batches = check_uneven_batches
        self.patience = patience
        self.straggler_threshold = float(straggler_threshold)
        self._settings = BudgetSettings(
            self.safety_factor,
            self.min_timeout_s,
            self.max_timeout_s,
            self.first_step_timeout_s,
            step_timeout_s,
            validation_timeout_s,
            checkpoint_timeout_s,
        )
        self._reset_state()

    def _reset_state(self) -> None:
        self._watch: Watch | None = None
        self._raiser = RaiseOnHang()
        self._raise_tried = False
        self._trainer_ref: Any = None
        self._budgets = PhaseBudgets(self._settings)
        self._outliers = StepOutliers()
        self._straggler = StragglerRule(self.straggler_threshold, self.patience)
        self._timer = StepTimer(self._outliers if self.check_step_time else None, False)
        self._collectives = False
        self._directory = ""
        self._last_logged = -1
        self._kept: dict[str, Finding] = {}
        self._events: dict[int, tuple[HangEvent, Finding]] = {}

    @property
    def state_key(self) -> str:
        # action, then the budget arguments in signature order (the key of checkpoints written before)
        return self._generate_state_key(action=self.action, **dataclasses.asdict(self._settings))

    # -- start and stop -------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            # Every rank writes its dump and heartbeat next to rank 0's report (one broadcast, once per fit).
            self._directory = str(broadcast(trainer, _logging.log_dir(trainer)))
            watchers = [c for c in _lightning.trainer_callbacks(trainer) if isinstance(c, HangWatchdog)]
            self._collectives = is_distributed(trainer) and watchers[0] is self
            self._timer.stragglers = self._collectives and self.check_stragglers

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        watch = Watch(
            self._budgets,
            directory=self._directory,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            poll_s=poll_seconds(self._settings.smallest_s),
            on_hang=self._on_hang,
            on_resumed=self._on_resumed,
            on_second_timeout=self._on_second_timeout if self.action == "raise" else None,
            on_displaced=self._on_displaced,
        )
        try:
            timer = watch.start(use_timer=True)
        except OSError as error:
            self.decline(
                trainer,
                f"HangWatchdog cannot write to {self._directory!r} ({error}): it is off.",
                "directory",
            )
            return
        # "held": another HangWatchdog's watch has the timer; its dump covers this process's threads too.
        self._watch, self._trainer_ref = watch, weakref.ref(trainer)
        if timer == "foreign":
            self.decline(trainer, FOREIGN_TIMER, "faulthandler_timer")
        self._timer.install()

    def _stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        self._raiser.restore()
        self._trainer_ref = None
        self._timer.uninstall()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()  # before the end-of-run report: the watchdog thread must not write a "hung" one after it
        super().on_fit_end(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._stop()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop()
        super().on_exception(trainer, pl_module, exception)

    # -- heartbeats -----------------------------------------------------------------------------------------
    def _beat(self, phase: str, trainer: pl.Trainer) -> None:
        if self._watch is not None:
            self._watch.beat(phase, trainer.global_step)  # the step the run is about to take

    def _install_raise(self, trainer: pl.Trainer) -> None:
        # Not earlier: Lightning saves every signal handler after `on_fit_start` and puts them back at its teardown.
        if self.action == "raise" and self._watch is not None and not self._raise_tried:
            self._raise_tried = True
            why = self._raiser.install()
            if why is not None:
                self.decline(
                    trainer,
                    f"HangWatchdog(action='raise') cannot raise here: {why}. It warns instead.",
                    "raise",
                )

    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_raise(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_raise(trainer)
        if self._collectives and self.check_uneven_batches:
            self._check_uneven_batches(trainer)
        self._beat("data_first", trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timer.first_in_epoch = True
        self._beat("data_first", trainer)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        watch = self._watch
        if watch is None:
            return
        before = watch.hb.phase
        self._timer.batch_start(watch, before, watch.beat("step", trainer.global_step))

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        watch = self._watch
        if watch is None:
            return
        before = watch.hb.phase
        self._timer.forward(before, watch.beat("backward"))

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._watch is not None:
            self._watch.beat("optimizer")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _logging.should_log_step(trainer, step_done=True) and trainer.global_step != self._last_logged:
            self._last_logged = trainer.global_step
            self._at_logging_step(trainer, pl_module)
        if self._watch is not None:
            self._budgets.start_training()
            self._watch.beat("data", trainer.global_step)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat("val_first", trainer)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._beat("val", trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat("val_end", trainer)  # the LightningModule's own epoch end runs after the callbacks'

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat("data", trainer)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._beat("checkpoint", trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat("epoch_end", trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_step_time:
            self._keep(trainer, self._outliers.judge(), "outliers")
        if self._watch is not None and self._watch.displaced:
            self._on_displaced()
        self._beat("teardown", trainer)

    # -- logging steps: outliers and stragglers -----------------------------------------------------------
    def _at_logging_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics: dict[str, float] = {}
        if self._collectives and self.check_stragglers:
            self._judge_stragglers(trainer, pl_module, metrics)
        if self.check_step_time:
            self._keep(trainer, self._outliers.judge(), "outliers")
            metrics["diag/hang/outlier_steps"] = float(len(self._outliers.outliers))
        if self._watch is not None:
            metrics["diag/hang/budget_s"] = self._budgets.budget("step")
        _logging.log_step(pl_module, metrics)

    def _judge_stragglers(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float]
    ) -> None:
        """One all-gather of every rank's medians (the same logging steps on every rank), then the rule."""
        local = torch.tensor(self._timer.medians(), dtype=torch.float32, device=pl_module.device)
        rows = gather(trainer, local).tolist()
        if any(r[3] < 3 for r in rows):
            return
        verdict = self._straggler.update(
            [r[0] for r in rows],
            [r[1] for r in rows],
            statistics.median(r[2] for r in rows),
            trainer.global_step,
        )
        metrics["diag/straggler/gap_ms"] = self._straggler.gap_ms
        metrics["diag/straggler/rank"] = float(self._straggler.slowest)
        if verdict is not None:
            self._keep(trainer, verdict, f"straggler:rank{verdict.evidence['rank']}")

    def _keep(self, trainer: pl.Trainer, verdict: Verdict | None, key: str) -> None:
        """Record ``verdict`` once; later verdicts for the same ``key`` update that finding (counts grow, info
        becomes a warning) instead of adding one per check.
        """
        if verdict is None:
            return
        kept = self._kept.get(key)
        if kept is None:
            self._kept[key] = self.record(trainer, verdict, key=key)
            return
        _update(kept, verdict)
        kept.last_step = int(trainer.global_step)

    # -- uneven batches -------------------------------------------------------------------------------------
    def _check_uneven_batches(self, trainer: pl.Trainer) -> None:
        counts = [float(c) for c in gather_objects(trainer, float(trainer.num_training_batches))]
        verdict = uneven_batches(
            counts, max_steps=int(trainer.max_steps), accumulate=int(trainer.accumulate_grad_batches)
        )
        if verdict is None:
            return
        self.record(trainer, verdict, key="uneven_batches")
        if verdict.severity == "error":  # every rank has the same counts: every rank stops here alike
            raise ConfigurationError(f"HangWatchdog: {verdict.message}")

    # -- what the watchdog thread reports -------------------------------------------------------------------
    def _on_hang(
        self,
        hb: Heartbeat,
        waited: float,
        detected_by: str,
        frames: list[tuple[str, int, str, str]],
        blocked_s: float,
    ) -> None:
        """Called from the watchdog thread: record ``training_hang``, write ``diagnosis.json`` (``"hung"``)."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        watch = self._watch
        if trainer is None or watch is None:
            return
        action = self.action if self._raiser.signum is not None else "warn"
        event = watch.hang_event(hb, waited, detected_by, frames, blocked_s, action)
        verdict = training_hang(event)
        self._events[hb.beat] = (event, self.record(trainer, verdict, key=hb.phase, step=hb.step))
        where = ""
        if trainer.is_global_zero:
            where = f" Report: {write_report(run_report(trainer, 'hung'), _logging.log_dir(trainer))} (status hung)."
        sys.stderr.write(f"lightning_diag HangWatchdog (rank {watch.rank}): {verdict.message}{where}\n")
        sys.stderr.flush()

    def _on_resumed(self, hb: Heartbeat, after_s: float) -> None:
        """Called from the training thread at the first heartbeat after a reported hang."""
        self._raiser.withdraw()
        entry = self._events.pop(hb.beat, None)
        if entry is not None:
            event, finding = entry
            event.resumed_after_s = after_s
            _update(finding, training_hang(event))

    def _on_displaced(self) -> None:
        """Other code armed or cancelled faulthandler's timer during the fit: it is theirs; say so once."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is not None:
            self.decline(trainer, FOREIGN_TIMER, "faulthandler_timer")

    def _on_second_timeout(self, hb: Heartbeat, waited: float) -> None:
        dump = self._watch.dump_path if self._watch is not None else "?"
        self._raiser.fire(hang_error_message(hb.phase, hb.step, waited, hb.budget, dump))

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"findings": self._findings_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_findings_state(state_dict)


def _update(finding: Finding, verdict: Verdict) -> None:
    """Give a recorded finding a newer verdict's words (same code)."""
    finding.severity = verdict.severity
    finding.message = verdict.message
    finding.evidence = dict(verdict.evidence)
    finding.advice = list(verdict.advice)
