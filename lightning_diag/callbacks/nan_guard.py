"""NaNGuard: detect, localise and survive NaN/Inf and spikes: warn, skip, roll back or stop, alike on every rank.

The callback gathers (inputs, loss, gradient statistics, parameters), reduces the step's numbers across ranks
with one collective, lets its core partner judge and decide (:mod:`lightning_diag.core.guard`: the judge, the
policy and the words of the findings), acts, records and logs. Where a non-finite value began is found by
:mod:`lightning_diag.core.nan_trace`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_diag import _distributed, _lightning, _logging
from lightning_diag._validation import (
    Unused,
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_positive,
    check_range,
    check_unused,
    renamed,
)
from lightning_diag.callbacks import _compat
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import StepContext, run_context, step_context
from lightning_diag.callbacks._deferred import DeferredQueue
from lightning_diag.callbacks._nan_reads import confirm_params, localise, read_row, step_row
from lightning_diag.core.consequences import POLICY
from lightning_diag.core.guard import (
    ACTIONS,
    Action,
    Decision,
    GuardPolicy,
    Origin,
    StepFlags,
    StepJudge,
    StepWindow,
    back_off_lr,
    bad_step,
    crashed_on_input_verdict,
    never_rolls_back,
    never_skips,
    no_rollback_text,
    no_skip_text,
    step_verdicts,
)
from lightning_diag.core.snapshot import Snapshot
from lightning_diag.core.spikes import DEFAULT_SPIKE_RATIO
from lightning_diag.core.verdict import Verdict
from lightning_diag.errors import LightningDiagWarning, NonFiniteError

__all__ = ["NaNGuard", "NonFiniteError"]

#: Localisations (replays) per fit; after that, findings rely on the flags (a run left broken under "warn" stays cheap).
MAX_TRACES = 20


#: Settings the chosen policies never read (``_validation.check_unused``; the rules and words are core.guard's).
_UNUSED = (
    Unused(
        ("spike_action", "spike_threshold", "spike_ratio", "spike_window", "spike_warmup_steps"),
        lambda a: not a["check_spikes"],
        "`check_spikes=False`",
        "set `check_spikes=True`",
    ),
    Unused(("max_consecutive_skips", "escalate_to"), never_skips, no_skip_text, "use `action='skip'`"),
    Unused(
        ("snapshot_every_n_steps", "max_rollbacks", "lr_backoff"),
        never_rolls_back,
        no_rollback_text,
        "use `action='rollback'` or `escalate_to='rollback'`",
    ),
)


class NaNGuard(DiagCallback):
    """Catch NaN/Inf (and loss/gradient-norm spikes) before the update; say where they began; survive them.

    In ``on_before_optimizer_step`` NaNGuard checks the step's losses, gradients, input batches and, every
    ``check_params_every_n_steps`` steps, parameters, and feeds the loss and the gradient norm to spike detectors,
    all on the device. A step that must be decided before the update costs one all-reduce and one small host read,
    so every rank decides alike; otherwise the checks wait for the next logging step (no host sync on quiet steps).
    A non-finite value is traced to where it first appeared (input, module, loss, backward, optimizer update) by a
    replay of the step, then the policy applies: ``"warn"``; ``"skip"`` (a true skip: parameters, optimizer state
    and the WarmupCosine schedule do not move); ``"rollback"`` to an in-memory snapshot; ``"raise"``.

    Args:
        action: the policy for non-finite values.
        spike_action: the policy for loss and gradient-norm spikes.
        check_inputs: check the float tensors of every training batch.
        check_params_every_n_steps: check the parameters every this many optimizer steps (``0``: never; they are also
            checked whenever something else is found).
        check_spikes: run the spike detectors.
        spike_window: the EMA window of the spike statistics, in optimizer steps.
        spike_threshold: a spike is this many standard deviations above the EMA mean...
        spike_ratio: ...and also this many times the mean (``1.0`` turns this guard off).
        spike_warmup_steps: optimizer steps observed before the standard-deviation rule applies.
        max_consecutive_skips: consecutive skips allowed before escalating (non-finite parameters escalate at once).
        escalate_to: the policy after ``max_consecutive_skips``: ``"rollback"`` or ``"raise"``.
        snapshot_every_n_steps: good optimizer steps between two rollback snapshots (taken only when a rollback can
            happen: a policy or ``escalate_to`` is ``"rollback"``).
        max_rollbacks: rollbacks allowed in one fit before the next one raises.
        lr_backoff: on each rollback, multiply the learning rates by this factor in ``(0, 1]``.
        check_origin: replay the step to find where the first non-finite value appeared.
        detect_spikes: deprecated name of ``check_spikes`` (until the next release).
        localize: deprecated name of ``check_origin`` (until the next release).

    Logged metrics (at the logging interval):
        ============================  =============================================================
        key                           value
        ============================  =============================================================
        ``diag/nan/skipped_steps``    optimizer steps whose update was withheld (skips and rollbacks)
        ``diag/nan/rollbacks``        rollbacks so far
        ============================  =============================================================

    Findings:
        ``non_finite_input``, ``non_finite_loss``, ``non_finite_gradients``, ``non_finite_parameters``: evidence
        ``phase``, ``module``, ``module_type``, ``tensor``, ``kind`` (nan/inf), ``action``, ``rank``,
        ``reproduced``. ``loss_spike`` and ``exploding_gradients`` for spikes, with the value and the running
        mean/std. The action taken is part of the condition: a skip and a later rollback are two findings.

    Raises:
        ValueError: (``ArgumentError``, also a ``MisconfigurationException``) at construction for an unknown
            action, a negative window/threshold, ``max_consecutive_skips``, ``snapshot_every_n_steps`` or
            ``max_rollbacks`` below 1, ``lr_backoff`` outside ``(0, 1]``, a non-bool flag, or a setting the chosen
            policies never use (spike settings with ``check_spikes=False``, skip or rollback settings no policy reads).
        NonFiniteError: during fit, when the policy (or an escalation) is ``"raise"``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import NaNGuard
        >>> trainer = pl.Trainer(callbacks=[NaNGuard(action="rollback", snapshot_every_n_steps=200, lr_backoff=0.5)])

    Note:
        Under 16-bit AMP a GradScaler's overflowing gradients are not failures (the scaler skips the step). The
        replay re-runs ``training_step``: side effects there other than ``self.log`` happen once more. Deferred
        steps, localisation, the policies, rollback memory and checkpoints, manual optimization:
        <https://lightning-diag.readthedocs.io/callbacks/nan-guard/>.
    """

    renamed_arguments: ClassVar[dict[str, str]] = {
        "detect_spikes": "check_spikes",
        "localize": "check_origin",
    }

    def __init__(
        self,
        action: Action = "skip",
        spike_action: Action = "warn",
        check_inputs: bool = True,
        check_params_every_n_steps: int = 50,
        check_spikes: bool = True,
        spike_window: int = 100,
        spike_threshold: float = 6.0,
        spike_ratio: float = DEFAULT_SPIKE_RATIO,
        spike_warmup_steps: int = 20,
        max_consecutive_skips: int = 5,
        escalate_to: Literal["rollback", "raise"] = "raise",
        snapshot_every_n_steps: int = 100,
        max_rollbacks: int = 3,
        lr_backoff: float = 1.0,
        check_origin: bool = True,
        detect_spikes: bool | None = None,
        localize: bool | None = None,
    ) -> None:
        super().__init__()
        check_spikes = renamed(NaNGuard.__init__, locals(), "detect_spikes", "check_spikes")
        check_origin = renamed(NaNGuard.__init__, locals(), "localize", "check_origin")
        check_choice("action", action, ACTIONS)
        check_choice("spike_action", spike_action, ACTIONS)
        check_bool("check_inputs", check_inputs)
        check_bool("check_spikes", check_spikes)
        check_bool("check_origin", check_origin)
        check_int("check_params_every_n_steps", check_params_every_n_steps, minimum=0)
        check_int("spike_window", spike_window, minimum=1)
        check_positive("spike_threshold", spike_threshold)
        check_range("spike_ratio", spike_ratio, 1.0)
        check_int("spike_warmup_steps", spike_warmup_steps, minimum=0)
        check_int("max_consecutive_skips", max_consecutive_skips, minimum=1)
        check_choice("escalate_to", escalate_to, ("rollback", "raise"))
        check_int("snapshot_every_n_steps", snapshot_every_n_steps, minimum=1)
        check_int("max_rollbacks", max_rollbacks, minimum=1)
        check_fraction("lr_backoff", lr_backoff, low_open=True)
        check_unused(NaNGuard.__init__, locals(), _UNUSED)
        self.action = action
        self.spike_action = spike_action
        self.check_inputs = check_inputs
        self.check_params_every_n_steps = check_params_every_n_steps
        self.check_spikes = check_spikes
        self.spike_window = spike_window
        self.spike_threshold = float(spike_threshold)
        self.spike_ratio = float(spike_ratio)
        self.spike_warmup_steps = spike_warmup_steps
        self.max_consecutive_skips = max_consecutive_skips
        self.escalate_to = escalate_to
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.max_rollbacks = max_rollbacks
        self.lr_backoff = float(lr_backoff)
        self.check_origin = check_origin
        self.policy = GuardPolicy(
            action, spike_action, max_consecutive_skips, escalate_to, snapshot_every_n_steps, max_rollbacks
        )
        spike_settings = (spike_window, self.spike_threshold, self.spike_ratio, spike_warmup_steps)
        self.judge = StepJudge(*spike_settings, check_spikes=check_spikes)
        self._reset_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action, spike_action=self.spike_action)

    @property
    def rollback_possible(self) -> bool:
        """Whether a rollback can happen (then snapshots are taken)."""
        return self.policy.rollback_possible

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps whose update was withheld (skips and rollbacks) in this fit."""
        return self.policy.skipped_steps

    @property
    def rollbacks(self) -> int:
        """Rollbacks in this fit."""
        return self.policy.rollbacks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            # Under FSDP1 each rank checks its own shards and the flags are combined: detection and skip are
            # correct; a rollback (snapshots of flat parameters) is not supported there.
            _lightning.check_strategy(trainer, "NaNGuard", fsdp1=not self.rollback_possible)
            context = run_context(trainer)
            context.nonfinite_handled = self.action != "warn"
            context.grad_spikes_owned = self.check_spikes  # one owner of `exploding_gradients` spikes

    def _reset_state(self) -> None:
        self.policy.reset()
        self.judge.reset()
        self.traces = 0
        self._snapshot: Snapshot | None = None
        self._snapshot_loaded = False  # the snapshot came with the checkpoint: a resumed run keeps it
        self._warned: set[str] = set()
        self._queue = DeferredQueue()  # deferred steps not judged yet
        self._found_inf_on: Any = None  # the optimizer given a device-side found_inf for this step
        self._window = StepWindow()  # the micro-batches of the step in progress

    # -- gather -----------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._window.clear()
        if self.rollback_possible and not self._snapshot_loaded:
            # A fresh run snapshots its start; a run resumed from a checkpoint without a snapshot (a sharded
            # model's) snapshots the checkpoint's state but keeps the saved snapshot schedule.
            self._snapshot = Snapshot(pl_module, trainer.optimizers, trainer.global_step)
            self.policy.snapshot_taken(trainer.global_step, keep_schedule=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % max(int(trainer.accumulate_grad_batches), 1) == 0:
            self._window.clear()  # a new optimizer step begins (also after a window whose steps returned None)
        self._window.add_batch(batch, batch_idx, check_inputs=self.check_inputs)

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        scaler = _lightning.amp_scaler(trainer)  # the hook sees the scaled loss
        self._window.add_loss(
            loss, _lightning.loss_scale(scaler).reciprocal() if scaler is not None else None
        )

    # -- reduce -> decide -> act -> record -> log -------------------------------------------------------------
    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = step_context(trainer, pl_module, optimizer)
        every = self.check_params_every_n_steps
        check_params = self.policy.snapshot_due or (every > 0 and trainer.global_step % every == 0)
        values = step_row(trainer, pl_module, optimizer, step, self._window, check_params=check_params)
        if self._deferral(trainer, optimizer) is not None:
            self._defer(trainer, pl_module, optimizer, step, values)
        else:
            self._decide_now(trainer, pl_module, optimizer, step, values)
        if _logging.should_log_step(trainer):
            _logging.log_step(
                pl_module,
                {"diag/nan/skipped_steps": self.skipped_steps, "diag/nan/rollbacks": self.rollbacks},
            )
        self._window.clear()

    def _decide_now(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepContext,
        values: torch.Tensor,
    ) -> None:
        """The synchronous path: one small read per step, the decision before the update, localisation by replay."""
        window, scaled = self._window, self._scaled(trainer)
        row, ranks = read_row(trainer, values, rank_local=self.check_inputs or self.check_spikes or scaled)
        has_loss = window.loss is not None
        flags, host = self.judge.judge(
            row, ranks=ranks, scaled=scaled, has_loss=has_loss, samples=window.samples
        )
        if has_loss:
            run_context(trainer).record_loss(trainer.global_step, host["loss"])
        if flags.params and not confirm_params(trainer, pl_module, optimizer):
            flags = dataclasses.replace(flags, params=False)  # finite, only their float32 norm overflowed
        origin = Origin()
        if flags.non_finite:  # where it began (a replay, once per fit up to MAX_TRACES)
            trace = self.check_origin and self.traces < MAX_TRACES
            self.traces += int(trace)
            replay = self.check_origin and pl_module.automatic_optimization
            flags, origin = localise(
                trainer, pl_module, optimizer, step, window, flags, trace=trace, replay=replay
            )
        at = (trainer.global_step, trainer.current_epoch, window.batch_idx)
        if self._conclude(trainer, pl_module, flags, host, origin, at, optimizer).withholds_update:
            step.skipped = True

    def _scaled(self, trainer: pl.Trainer) -> bool:
        """A GradScaler handles overflowing gradients in this run (they are its business, not failures)."""
        return _lightning.amp_scaler(trainer) is not None

    # -- deferred: no host read on quiet steps ----------------------------------------------------------------
    def _deferral(self, trainer: pl.Trainer, optimizer: Any) -> str | None:
        """How this step's checks can wait for the next logging step (see ``GuardPolicy.deferral``)."""
        fused = bool(getattr(optimizer, "defaults", {}).get("fused"))
        return self.policy.deferral(
            spikes_checked=self.check_spikes, fused=fused, scaled=self._scaled(trainer)
        )

    def _defer(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Any,
        step: StepContext,
        values: torch.Tensor,
    ) -> None:
        reduced = self._deferral(trainer, optimizer) == "device"
        if reduced:
            # The decision must be the same on every rank: reduce on the device (a collective, no host read).
            values = _distributed.reduce(trainer, values, "sum")
            _lightning.set_found_inf(optimizer, (~torch.isfinite(values).all()).float())  # skipped on 1
            self._found_inf_on = optimizer
        info = self._window.info(trainer.current_epoch, step.names)
        full = self._queue.add(
            trainer.global_step, values, reduced=reduced, info=info, kept={"norms": step.grad_stats().norms}
        )
        if _logging.should_log_step(trainer) or full:
            self._flush(trainer, pl_module)

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Judge the pending steps, in order, from one host transfer (one collective for those not yet reduced)."""
        entries, _ = self._queue.take(trainer)
        ranks, scaled = max(int(getattr(trainer, "world_size", 1)), 1), self._scaled(trainer)
        for entry in entries:
            info, norms = entry.info, entry.kept["norms"]
            has_loss, has_grads = info["has_loss"], norms.numel() > 0
            flags, host = self.judge.judge(
                entry.host,
                ranks=ranks,
                scaled=scaled,
                has_loss=has_loss,
                has_grads=has_grads,
                samples=info["samples"],
            )
            if has_loss:
                run_context(trainer).record_loss(entry.step, host["loss"])
            origin = (
                Origin.of_deferred(pl_module, info["names"], norms, flags) if flags.non_finite else Origin()
            )
            at = (entry.step, info["epoch"], info["batch_idx"])
            self._conclude(trainer, pl_module, flags, host, origin, at, deferred=True)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._found_inf_on is not None:  # the optimizer step has read it
            _lightning.clear_found_inf(self._found_inf_on)
            self._found_inf_on = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, pl_module)  # steps after the last logging step still get their say

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A forward that raises on NaN data never reaches on_before_optimizer_step: the batch is still here.
        if self.check_inputs and not isinstance(exception, (NonFiniteError, KeyboardInterrupt)):
            bad = self._window.first_non_finite()
            if bad is not None:
                error = f"{type(exception).__name__}: {str(exception)[:200]}"
                verdict, key = crashed_on_input_verdict(
                    trainer.global_step, trainer.current_epoch, *bad, error
                )
                self.record(trainer, verdict, key=key)
        super().on_exception(trainer, pl_module, exception)

    # -- record -> act ----------------------------------------------------------------------------------------
    def _conclude(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        flags: StepFlags,
        values: dict[str, float],
        origin: Origin,
        at: tuple[int, int, str],
        optimizer: Any = None,
        *,
        deferred: bool = False,
    ) -> Decision:
        """Decide on a judged step (``at``: its step, epoch and batch indices), then record and act on it."""
        decision = self.policy.update(flags, at[0])
        if decision.snapshot_due:
            self._snapshot = Snapshot(pl_module, trainer.optimizers, at[0])
        if decision.action is None:
            return decision
        snapshot = self._snapshot.step if self._snapshot is not None else None
        bad = bad_step(decision, self.policy, at, snapshot, deferred=deferred, lr_backoff=self.lr_backoff)
        half = str(getattr(trainer.precision_plugin, "precision", "")).startswith("16")
        found = step_verdicts(
            bad, decision, flags, values, self.judge, origin, model=pl_module, half_precision=half
        )
        for verdict, key in found:  # their words are core's; the first is the main one
            self.record(trainer, verdict, key=key, step=bad.step, epoch=bad.epoch)
        self._act(trainer, pl_module, decision, found[0][0], None if deferred else optimizer)
        return decision

    def _act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        decision: Decision,
        verdict: Verdict,
        optimizer: Any = None,
    ) -> None:
        """Carry out the decision. ``optimizer=None``: a deferred step, whose skip was withheld on the device."""
        if decision.action == "warn":
            # A NaN/Inf is certain: say it now. A spike is a symptom: the report says whether anything followed.
            certain = POLICY.get(verdict.code) != "symptom"
            if certain and verdict.code not in self._warned and trainer.is_global_zero:
                self._warned.add(verdict.code)
                warnings.warn(verdict.message, LightningDiagWarning, stacklevel=2)
            return
        if decision.action == "raise":
            raise NonFiniteError(verdict.message)
        context = run_context(trainer)
        context.hold_schedule(decision.hold_steps)
        if optimizer is None:
            return
        optimizer.zero_grad(set_to_none=True)  # a true skip: no parameter or optimizer-state update
        if decision.action == "rollback":
            assert self._snapshot is not None
            self._snapshot.restore(pl_module, trainer.optimizers)
            if self.lr_backoff != 1.0:
                context.scale_lr(self.lr_backoff)
                schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
                back_off_lr(trainer.optimizers, schedulers, self.lr_backoff)

    def report_series(self) -> dict[str, Any]:
        """What NaNGuard did, for the HTML report (rollbacks mark their LR back-off on the schedule)."""
        return self.policy.report_series(self.lr_backoff)

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {**self.policy.state_dict(), "traces": self.traces, **self.judge.state_dict()}
        state["findings"] = self._findings_state()
        if self._queue:  # deferred steps not judged yet: saved raw, so a resumed run judges them alike
            state["queue"] = self._queue.state_dict()
        if self._snapshot is not None and self.rollback_possible and not self._snapshot.sharded:
            state["snapshot"] = self._snapshot.state_dict()  # a resumed run rolls back to the same weights
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy.load_state_dict(state_dict)
        self.traces = int(state_dict.get("traces", self.traces))
        self._queue.load_state_dict(state_dict.get("queue") or _compat.nan_guard_queue_0_1(state_dict))
        self.judge.load_state_dict(state_dict)
        if state_dict.get("snapshot") is not None and self.rollback_possible:
            self._snapshot = Snapshot.from_state_dict(state_dict["snapshot"])
            self.policy.has_snapshot = self._snapshot_loaded = True
        self._load_findings_state(state_dict)
