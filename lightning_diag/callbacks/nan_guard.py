"""NaNGuard: detect, localise and survive NaN/Inf and spikes: warn, skip, roll back or stop, alike on every rank.

The callback gathers (inputs, loss, gradient statistics, parameters), reduces the step's flags across ranks with
one collective, lets :class:`~lightning_diag.core.guard.GuardPolicy` decide, acts, records and logs. Where a
non-finite value began is found by :mod:`lightning_diag.core.nan_trace`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping
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
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._context import StepContext, run_context, step_context
from lightning_diag.core.batches import batch_size, floating
from lightning_diag.core.grad_stats import max_abs, tensor_norms, total_from_norms
from lightning_diag.core.guard import ACTIONS, Action, Decision, GuardPolicy, StepFlags, back_off_lr
from lightning_diag.core.nan_trace import (
    Trace,
    choose_origin,
    deferred_origin,
    observed_origin,
    origin_advice,
    parameter_origin,
    trace_step,
)
from lightning_diag.core.snapshot import Snapshot
from lightning_diag.core.spikes import DEFAULT_SPIKE_RATIO, SpikeDetector
from lightning_diag.core.verdict import Verdict
from lightning_diag.errors import LightningDiagWarning, NonFiniteError
from lightning_diag.findings import Severity

__all__ = ["NaNGuard", "NonFiniteError"]

_CODE_OF_PHASE = {
    "input": "non_finite_input",
    "forward": "non_finite_loss",
    "loss": "non_finite_loss",
    "backward": "non_finite_gradients",
    "optimizer": "non_finite_parameters",
}
_SPIKE_ADVICE = [
    "Lower the learning rate or lengthen the warmup (WarmupCosine).",
    "Clip gradients (GradClip(algorithm='zscore') adapts to the norm's own statistics).",
    "Look for bad or mislabelled samples in the batches of that step (batch_idx in the evidence).",
]
_OVERFLOW_ADVICE = [
    "The learning rate is far too high (or the loss scale is): lower it, add warmup (WarmupCosine).",
    "Clip gradients (GradClip) so one step cannot throw the weights this far.",
]

#: Localisations per fit; after that, findings rely on the flags (a run left broken under "warn" stays cheap).
MAX_TRACES = 20
#: Deferred steps kept before they are judged even without a logging step (bounds memory and latency).
MAX_PENDING = 256


@dataclasses.dataclass
class _Pending:
    """A deferred step: its device values, and what naming the origin later needs (no batch: it is gone)."""

    step: int
    epoch: int
    values: torch.Tensor  # [input sum, parameter norm, loss, gradient norm]
    reduced: bool  # already summed over ranks (a device-side skip needs the same decision everywhere)
    has_loss: bool
    samples: int | None
    names: tuple[str, ...]
    norms: torch.Tensor  # per-tensor gradient norms, to name the first non-finite gradient
    batch_idx: str


_NOT_REPRODUCED = (
    "The replay of the same step was finite: the fault depends on state or chance, not on the step's data alone. "
    "Look for stateful or nondeterministic code (a module that keeps a counter or cache, randomness without a "
    "seed, uninitialised memory such as torch.empty) or a flaky kernel/hardware; run with "
    "torch.use_deterministic_algorithms(True) to tell them apart."
)


def _policies(given: Mapping[str, Any]) -> set[str]:
    return {given["action"]} | ({given["spike_action"]} if given["check_spikes"] else set())


def _policies_text(given: Mapping[str, Any]) -> str:
    names = ("action", "spike_action") if given["check_spikes"] else ("action",)
    return " and ".join(f"`{n}={given[n]!r}`" for n in names)


def _no_rollback_text(given: Mapping[str, Any]) -> str:
    escalate = f" and `escalate_to={given['escalate_to']!r}`" if "skip" in _policies(given) else ""
    return f"{_policies_text(given)}{escalate} (no rollback can happen)"


#: Settings the chosen policies never read (``_validation.check_unused``).
_UNUSED = (
    Unused(
        ("spike_action", "spike_threshold", "spike_ratio", "spike_window", "spike_warmup_steps"),
        lambda a: not a["check_spikes"],
        "`check_spikes=False`",
        "set `check_spikes=True`",
    ),
    Unused(
        ("max_consecutive_skips", "escalate_to"),
        lambda a: "skip" not in _policies(a),
        lambda a: f"{_policies_text(a)} (nothing is ever skipped)",
        "use `action='skip'`",
    ),
    Unused(
        ("snapshot_every_n_steps", "max_rollbacks", "lr_backoff"),
        lambda a: (
            "rollback" not in _policies(a) and not ("skip" in _policies(a) and a["escalate_to"] == "rollback")
        ),
        _no_rollback_text,
        "use `action='rollback'` or `escalate_to='rollback'`",
    ),
)


class NaNGuard(DiagCallback):
    """Catch NaN/Inf (and loss/gradient-norm spikes) before the update; say where they began; survive them.

    Every optimizer step, before the update, NaNGuard checks the loss of each micro-batch, the gradients (shared
    statistics, computed once per step), the float tensors of each input batch and, every ``check_params_every_n_steps``
    steps, the parameters. It also feeds the loss and the total gradient norm to robust spike detectors
    (:class:`~lightning_diag.core.spikes.SpikeDetector`). All of that stays on the device. Then:

    * When something must be decided before the update (``"skip"`` with an ordinary optimizer, ``"rollback"``,
      ``"raise"``, or a spike policy other than ``"warn"``), the flags of all ranks are combined with **one
      all-reduce and one small host read per step**, so every rank takes the same decision (the GradScaler makes
      the same kind of read every step). The all-reduce is left out when nothing in it can differ between ranks
      (no input check, no spike detection, no GradScaler).
    * Otherwise the checks are **deferred**: no host synchronisation on quiet steps. ``"warn"`` keeps each
      step's four values on the device and judges them, in order, at the next logging step (and at the end of
      fit). ``"skip"`` with an optimizer whose fused kernel takes a device-side ``found_inf`` (``fused=True``
      Adam/AdamW/SGD, no GradScaler) withholds a bad update **on the device**, parameters and optimizer state
      untouched, and does the bookkeeping at the next logging step: the finding, the count, the escalation to
      ``"raise"`` and the steps WarmupCosine holds arrive up to ``log_every_n_steps`` steps late. A deferred
      step is not replayed: its finding names the step, the phase its values show (input, loss, gradients,
      parameters) and the last non-finite gradient, not the module where the value began.

    When a non-finite value is found, NaNGuard replays the step's batches with hooks on every module
    (:func:`~lightning_diag.core.nan_trace.trace_step`) to say where it **first appeared**: which input tensor,
    which module's forward output (qualified name and type), the loss, which gradient in the backward pass, or
    the optimizer update (parameters non-finite). The replay logs nothing, leaves gradients, buffers, optimizer
    state and RNG states as they were, and only runs on detection. Then the policy applies:

    * ``"warn"``: record the finding (and warn once per code) and let the step happen.
    * ``"skip"``: a true skip: gradients are set to ``None``, so neither the parameters nor the optimizer state
      (momentum, Adam's step, weight decay) move; with :class:`~lightning_diag.WarmupCosine` the schedule does
      not advance. After ``max_consecutive_skips`` consecutive skips (and whenever the parameters themselves are
      non-finite, which a skip cannot cure) the next one escalates to ``escalate_to``.
    * ``"rollback"``: restore the model and optimizer state from the last in-memory snapshot (a CPU copy taken
      every ``snapshot_every_n_steps`` good steps), multiply the learning rates by ``lr_backoff`` (kept by WarmupCosine
      and by schedulers' ``base_lrs``), and go on with the next batch (the batches since the snapshot are not
      replayed). After ``max_rollbacks`` rollbacks, the next one raises.
    * ``"raise"``: stop with :class:`NonFiniteError`, whose message names the step, the phase and the module.

    Under 16-bit AMP with a GradScaler, non-finite *gradients* are the scaler's business (it skips the step and
    lowers the scale; GradNormMonitor counts those): they are not failures. A non-finite loss, input or
    parameter still is.

    Args:
        action: the policy for non-finite values.
        spike_action: the policy for loss and gradient-norm spikes.
        check_inputs: check the float tensors of every training batch.
        check_params_every_n_steps: check the parameters every this many optimizer steps (``0``: never; they are also
            checked whenever something else is found).
        check_spikes: run the spike detectors.
        spike_window: the EMA window of the spike statistics, in optimizer steps.
        spike_threshold: a spike is this many standard deviations above the EMA mean...
        spike_ratio: ...and also this many times the mean (``1.0`` turns this guard off). A value 100x the mean is a
            spike from the second step on; the short last batch of an epoch is not judged (see
            :class:`~lightning_diag.core.spikes.SpikeDetector`).
        spike_warmup_steps: optimizer steps observed before the standard-deviation rule applies.
        max_consecutive_skips: consecutive skips allowed before escalating.
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
        ``non_finite_input``, ``non_finite_loss`` (phase ``forward`` or ``loss``), ``non_finite_gradients`` (phase
        ``backward``), ``non_finite_parameters`` (phase ``optimizer``): evidence ``phase``, ``module``,
        ``module_type``, ``tensor``, ``kind`` (nan/inf), ``action``, ``rank``, ``reproduced``. ``loss_spike`` and
        ``exploding_gradients`` for spikes, with the value and the running mean/std. A fault the replay does not
        reproduce (stateful or nondeterministic code, hardware) has ``reproduced = 0``, names no module and says
        so; under manual optimization (no replay) a NaN loss is attributed to the loss. The action taken is part
        of the condition: a skip and a later rollback of the same fault are two findings.

    Raises:
        ValueError: (``ArgumentError``, also a ``MisconfigurationException``) at construction for an unknown
            action, a negative window/threshold, ``max_consecutive_skips < 1``, ``snapshot_every_n_steps < 1``,
            ``lr_backoff`` outside ``(0, 1]``, a non-bool flag, or a setting the chosen policies never use (spike
            settings with ``check_spikes=False``, skip settings when nothing is skipped, rollback settings when
            no rollback can happen).
        NonFiniteError: during fit, when the policy (or an escalation) is ``"raise"``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import NaNGuard
        >>> trainer = pl.Trainer(callbacks=[NaNGuard(action="rollback", snapshot_every_n_steps=200, lr_backoff=0.5)])

    Note:
        Rollback memory: one CPU copy of the parameters and buffers plus the optimizer state (about 3x the
        parameter bytes with Adam). The snapshot is not saved in checkpoints; a resumed run takes a fresh one when
        training starts and keeps the saved snapshot schedule. Unlike ``Trainer(detect_anomaly=True)``, which
        runs autograd's anomaly mode on every step, NaNGuard pays for the localisation only on the step that needs
        it. The replay re-runs ``training_step`` (with ``self.log`` silenced): other side effects there (appending
        to a list, counters) happen once more on a replayed step. Manual optimization: detection and the policies
        work; the replay needs automatic optimization.
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
            run_context(trainer).nonfinite_handled = self.action != "warn"

    def _reset_state(self) -> None:
        self.policy.reset()
        self.traces = 0
        self._snapshot: Snapshot | None = None
        self._loss_spikes = SpikeDetector(
            self.spike_window, self.spike_threshold, self.spike_ratio, self.spike_warmup_steps
        )
        self._grad_spikes = SpikeDetector(
            self.spike_window, self.spike_threshold, self.spike_ratio, self.spike_warmup_steps
        )
        self._warned: set[str] = set()
        self._overflow: tuple[float, str] = (math.nan, "")  # (largest |g|, its tensor) of a norm overflow
        self._pending: list[_Pending] = []  # deferred steps not judged yet
        self._found_inf_on: Any = None  # the optimizer given a device-side found_inf for this step
        self._zero: torch.Tensor | None = None
        self._clear_window()

    def _clear_window(self) -> None:
        # The micro-batches of the optimizer step in progress and their device-side flags.
        self._batches: list[tuple[Any, int]] = []
        self._input_sum: torch.Tensor | None = None
        self._step_loss: torch.Tensor | None = None

    # -- gather -----------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clear_window()
        if self.rollback_possible:
            # A resumed run snapshots the checkpoint's state but keeps the saved snapshot schedule.
            self._snapshot = Snapshot(pl_module, trainer.optimizers, trainer.global_step)
            self.policy.snapshot_taken(trainer.global_step, keep_schedule=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % max(int(trainer.accumulate_grad_batches), 1) == 0:
            self._clear_window()  # a new optimizer step begins (also after a window whose steps returned None)
        self._batches.append((batch, batch_idx))
        if not self.check_inputs:
            return
        with torch.no_grad():
            for tensor in floating(batch):
                # The sum of a tensor is non-finite exactly when an element is (float32 accumulation cannot
                # overflow on real data): one cheap reduction per tensor, read with the step's decision.
                total = tensor.sum(dtype=torch.float32)
                self._input_sum = (
                    total if self._input_sum is None else self._input_sum + total.to(self._input_sum.device)
                )

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        value = loss.detach().float().sum()
        scaler = _lightning.amp_scaler(trainer)
        if scaler is not None:  # the hook sees the scaled loss
            value = value * _lightning.loss_scale(scaler).to(value.device).reciprocal()
        # Summed over the micro-batches (Lightning already divided each by accumulate_grad_batches): the step's
        # loss, non-finite if any micro-batch's was.
        self._step_loss = value if self._step_loss is None else self._step_loss + value

    # -- reduce -> decide -> act -> record -> log -------------------------------------------------------------
    @override
    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = step_context(trainer, pl_module, optimizer)
        values = self._gather(trainer, pl_module, optimizer, step)
        if self._deferred(trainer, optimizer):
            self._defer(trainer, pl_module, optimizer, step, values)
        else:
            self._decide_now(trainer, pl_module, optimizer, step, values)
        if _logging.should_log_step(trainer):
            _logging.log_step(
                pl_module,
                {"diag/nan/skipped_steps": self.skipped_steps, "diag/nan/rollbacks": self.rollbacks},
            )
        self._clear_window()

    def _decide_now(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: StepContext,
        values: torch.Tensor,
    ) -> None:
        """The synchronous path: one small read per step, the decision before the update, localisation by replay."""
        row, ranks = self._read(trainer, values)
        flags, host = self._judge(
            trainer, row, has_loss=self._step_loss is not None, samples=self._samples(), ranks=ranks
        )
        if flags.params and not self._confirm_params(trainer, pl_module, optimizer):
            flags = StepFlags(
                **{**vars(flags), "params": False}
            )  # finite, only their float32 norm overflowed
        trace: Trace | None = None
        reproduced, rank = False, 0
        if flags.non_finite:
            trace, reproduced, rank = self._locate(trainer, pl_module, optimizer, step, flags)
            if trace is not None and trace.phase == "optimizer":
                flags = StepFlags(**{**vars(flags), "params": True})
            if trace is None and flags.grads and not (flags.loss or flags.input or flags.params):
                flags = self._norm_overflow(trainer, step, flags)
        decision = self.policy.update(flags, trainer.global_step)
        if decision.snapshot_due:
            self._snapshot = Snapshot(pl_module, trainer.optimizers, trainer.global_step)
        if decision.action is not None:
            code, message = self._record(trainer, pl_module, decision, flags, host, trace, reproduced, rank)
            self._act(trainer, pl_module, optimizer, decision, code, message)
            step.skipped = decision.withholds_update

    def _gather(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, step: StepContext
    ) -> torch.Tensor:
        """``[input sum, parameter norm, loss, gradient norm]`` of the step, a device vector (no sync)."""
        stats = step.grad_stats()  # shared, pre-clip
        device = stats.total_norm.device
        if self._zero is None or self._zero.device != device:
            self._zero = torch.zeros((), device=device)
        zero = self._zero
        every = self.check_params_every_n_steps
        check_params = self.policy.snapshot_due or (every > 0 and trainer.global_step % every == 0)
        params_norm = zero
        if check_params:
            # The L2 norm is non-finite when a parameter is (and ~8x cheaper than the max norm on CPU); the rare
            # finite parameters whose norm overflows float32 are told apart on detection (_confirm_params).
            found = run_context(trainer).param_set(pl_module, optimizer)
            params_norm = total_from_norms(tensor_norms([p.detach() for p in found.params])).to(device)
        return torch.stack(
            [
                self._input_sum.to(device) if self._input_sum is not None else zero,
                params_norm,
                self._step_loss.to(device) if self._step_loss is not None else zero,
                stats.total_norm.float() if stats.norms.numel() else zero,
            ]
        )

    def _read(self, trainer: pl.Trainer, values: torch.Tensor) -> tuple[list[float], int]:
        """One all-reduce (sum: a non-finite value anywhere stays non-finite) and one host read; returns the values
        and the number of ranks they are summed over.

        The all-reduce is skipped when nothing in it can differ between ranks: no input check, no spike detection,
        no GradScaler (under DDP the reduced gradients already carry a NaN from any rank, and a rank's NaN loss
        makes them NaN).
        """
        world = max(int(getattr(trainer, "world_size", 1)), 1)
        rank_local = self.check_inputs or self.check_spikes or _lightning.amp_scaler(trainer) is not None
        if world > 1 and not rank_local:
            return values.tolist(), 1
        return _distributed.reduce(trainer, values, "sum").tolist(), world

    def _judge(
        self,
        trainer: pl.Trainer,
        row: list[float],
        *,
        has_loss: bool,
        has_grads: bool = True,
        samples: int | None = None,
        ranks: int | None = None,
    ) -> tuple[StepFlags, dict[str, float]]:
        """Flags and spike verdicts from one step's reduced values (the same on every rank); ``samples``: the
        step's batch size (a short last batch of an epoch is noisier and is not judged for spikes); ``ranks``: how
        many ranks the values are summed over (all of them by default).
        """
        input_sum, params_norm, loss, grad_norm = row
        if ranks is None:
            ranks = max(int(getattr(trainer, "world_size", 1)), 1)
        loss, grad_norm = loss / ranks, grad_norm / ranks
        loss_spike = grad_spike = False
        if self.check_spikes:
            if has_loss:
                loss_spike = self._loss_spikes.update(loss, samples)
            if has_grads:
                grad_spike = self._grad_spikes.update(grad_norm, samples)
        flags = StepFlags(
            input=not math.isfinite(input_sum),
            loss=not math.isfinite(loss),
            # under a GradScaler, overflowing gradients are its business (it skips the step, lowers the scale)
            grads=not math.isfinite(grad_norm) and _lightning.amp_scaler(trainer) is None,
            params=not math.isfinite(params_norm),
            loss_spike=loss_spike,
            grad_spike=grad_spike,
        )
        return flags, {"loss": loss, "grad_norm": grad_norm}

    def _samples(self) -> int | None:
        """The samples of the optimizer step in progress (all its micro-batches), ``None`` when unknown."""
        return sum(batch_size(b) for b, _ in self._batches) or None

    def _confirm_params(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> bool:
        """Whether a parameter is really non-finite (its L2 norm alone can overflow): the max norm, on detection."""
        found = run_context(trainer).param_set(pl_module, optimizer)
        peaks = max_abs(found.params)
        peak = peaks.max() if peaks.numel() else torch.zeros(())
        return not math.isfinite(float(_distributed.reduce(trainer, peak.reshape(1), "max")[0]))

    # -- deferred: no host read on quiet steps ----------------------------------------------------------------
    def _deferred(self, trainer: pl.Trainer, optimizer: Any) -> bool:
        """Whether this step's checks wait for the next logging step (no host synchronisation per step).

        ``action="warn"`` (nothing to decide before the update), and ``action="skip"`` with an optimizer whose
        fused kernel takes a device-side ``found_inf`` (fused Adam/AdamW/SGD, no GradScaler): the update is
        withheld on the device. Spikes must only be warned about there, and escalation ends in ``raise``.
        """
        if (self.check_spikes and self.spike_action != "warn") or self.rollback_possible:
            return False
        if self.action == "warn":
            return True
        return self._device_skip(trainer, optimizer)

    def _device_skip(self, trainer: pl.Trainer, optimizer: Any) -> bool:
        return (
            self.action == "skip"
            and self.escalate_to == "raise"
            and _lightning.amp_scaler(trainer) is None
            and bool(getattr(optimizer, "defaults", {}).get("fused"))
        )

    def _defer(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Any,
        step: StepContext,
        values: torch.Tensor,
    ) -> None:
        if self._device_skip(trainer, optimizer):
            # The decision must be the same on every rank: reduce on the device (a collective, no host read).
            values = _distributed.reduce(trainer, values, "sum")
            bad = ~torch.isfinite(values).all()
            optimizer.found_inf = bad.float()  # the fused kernel skips the update on 1
            self._found_inf_on = optimizer
            reduced = True
        else:
            reduced = False
        self._pending.append(
            _Pending(
                step=int(trainer.global_step),
                epoch=int(trainer.current_epoch),
                values=values,
                reduced=reduced,
                has_loss=self._step_loss is not None,
                samples=self._samples(),
                names=step.names,
                norms=step.grad_stats().norms,
                batch_idx=",".join(str(i) for _, i in self._batches),
            )
        )
        if _logging.should_log_step(trainer) or len(self._pending) >= MAX_PENDING:
            self._flush(trainer, pl_module)

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Judge the pending steps, in order, from one host transfer (one collective for those not yet reduced)."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        device = pending[-1].values.device
        rows = torch.stack([p.values.to(device) for p in pending])
        local = torch.tensor([not p.reduced for p in pending], device=device)
        if bool(local.any()):  # the rows not summed over ranks yet: one collective for all of them
            rows = torch.where(local[:, None], _distributed.reduce(trainer, rows, "sum"), rows)
        context = run_context(trainer)
        for entry, row in zip(pending, rows.tolist(), strict=True):
            flags, host = self._judge(
                trainer,
                row,
                has_loss=entry.has_loss,
                has_grads=entry.norms.numel() > 0,
                samples=entry.samples,
            )
            decision = self.policy.update(flags, entry.step)
            if decision.action is None:
                continue
            seen = None
            if flags.non_finite:
                values = entry.norms.tolist() if flags.grads else []
                seen = deferred_origin(pl_module, entry.names, values, flags.input, flags.loss, flags.grads)
                if seen is None and flags.params:
                    seen = Trace("optimizer", "", "", "parameters", "")
            code, message = self._record(
                trainer,
                pl_module,
                decision,
                flags,
                host,
                None,
                False,
                0,
                at=(entry.step, entry.epoch),
                batch_idx=entry.batch_idx,
                seen=seen,
            )
            if decision.action == "skip":
                context.hold_schedule(1)  # withheld on the device: the schedule catches up now
            elif decision.action == "raise":
                raise NonFiniteError(message)
            elif code not in self._warned and trainer.is_global_zero:
                self._warned.add(code)
                warnings.warn(message, LightningDiagWarning, stacklevel=2)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._found_inf_on is not None:  # the optimizer step has read it
            with contextlib.suppress(AttributeError):
                del self._found_inf_on.found_inf
            self._found_inf_on = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, pl_module)  # steps after the last logging step still get their say

    def _norm_overflow(self, trainer: pl.Trainer, step: StepContext, flags: StepFlags) -> StepFlags:
        """Finite gradients whose norm overflows float32 are exploding, not NaN: flag them so."""
        if not step.grads:
            return flags
        peaks = _distributed.reduce(trainer, max_abs(step.grads), "max").tolist()
        if not all(math.isfinite(v) for v in peaks):
            return flags  # really non-finite somewhere: the usual path
        worst = max(range(len(peaks)), key=peaks.__getitem__)
        self._overflow = (peaks[worst], step.names[worst])
        return StepFlags(norm_overflow=True)

    def _locate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Any,
        step: StepContext,
        flags: StepFlags,
    ) -> tuple[Trace | None, bool, int]:
        """Where the first non-finite value appeared: this rank's answer, then the first informative one of all."""
        if not self.check_origin or self.traces >= MAX_TRACES:
            return None, False, 0
        self.traces += 1
        named = run_context(trainer).named_params(pl_module, optimizer)
        found = parameter_origin(pl_module, [n for n, _ in named], [p for _, p in named])
        if found is None and pl_module.automatic_optimization:
            for (
                batch,
                batch_idx,
            ) in self._batches:  # every micro-batch, on every rank: sharded models stay in step
                replayed = trace_step(
                    pl_module,
                    batch,
                    functools.partial(_lightning.replay_training_step, trainer, pl_module, batch, batch_idx),
                )
                found = found or replayed
        mine: tuple[dict[str, str] | None, bool] = (vars(found), True) if found is not None else (None, False)
        if found is None:
            observed = observed_origin(
                pl_module,
                [b for b, _ in self._batches],
                step.names,
                step.grads,
                input_bad=flags.input,
                loss_bad=flags.loss,
                grad_bad=flags.grads,
            )
            mine = (vars(observed) if observed is not None else None, False)
        return choose_origin(_distributed.gather_objects(trainer, mine))

    def _record(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        decision: Decision,
        flags: StepFlags,
        values: dict[str, float],
        trace: Trace | None,
        reproduced: bool,
        rank: int,
        *,
        at: tuple[int, int] | None = None,
        batch_idx: str | None = None,
        seen: Trace | None = None,
    ) -> tuple[str, str]:
        """Record the finding(s) of a bad step; returns the code and message of the main one.

        ``at``: ``(step, epoch)`` of a step judged later (deferred to a logging step), whose batches are gone;
        ``seen``: what its own values show then (the phase, a gradient's tensor), which is not where it began.
        """
        assert decision.action is not None
        action = self._describe_action(decision.action)
        # the update went ahead with a non-finite value (warn) or the run stops (raise): an error
        severity: Severity = "warning" if decision.withholds_update else "error"
        if batch_idx is None:
            batch_idx = ",".join(str(i) for _, i in self._batches)
        step, epoch = at if at is not None else (int(trainer.global_step), int(trainer.current_epoch))
        when = {"step": step, "epoch": epoch}
        where = f"at step {step}"
        if flags.norm_overflow:
            peak, name = self._overflow
            message = (
                f"Exploding gradients {where}: every gradient is finite but their norm overflows float32 "
                f"(largest |g| = {peak:.3g} in `{name}`). Action: {action}."
            )
            evidence: dict[str, Any] = {"max_abs_grad": peak, "tensor": name, "action": decision.action}
            self.record(
                trainer,
                Verdict("exploding_gradients", severity, message, evidence=evidence, advice=_OVERFLOW_ADVICE),
                key="norm_overflow",
                **when,
            )
            return "exploding_gradients", message
        if flags.non_finite:
            code = (
                _CODE_OF_PHASE[trace.phase]
                if trace is not None
                else (decision.code or "non_finite_gradients")
            )
            origin = trace.describe() if trace is not None else "its origin was not located"
            replayed = self.check_origin and pl_module.automatic_optimization
            if at is not None:
                gradient = (
                    f" (last non-finite gradient: {seen.tensor})" if seen and seen.phase == "backward" else ""
                )
                origin = (
                    f"seen at the next logging step in the step's own values{gradient}; the step was not replayed, "
                    "so where it began is not known (checks are deferred to keep quiet steps free of host syncs: "
                    "action='skip' or 'raise' locates it)"
                )
            elif trace is not None and not reproduced:
                # Only this step's own values show it: say where it was seen, name no module as its origin.
                trace = Trace(trace.phase, "", "", trace.tensor if trace.phase == "input" else "", trace.kind)
                where_seen = {"input": f"the input batch (`{trace.tensor}`)", "loss": "the loss"}.get(
                    trace.phase, "the gradients"
                )
                origin = f"seen in {where_seen}; " + (
                    "the replay of this step did not reproduce it, so where it began is unknown"
                    if replayed
                    else "where it began was not traced (no replay under manual optimization)"
                )
            message = (
                f"Non-finite {code.removeprefix('non_finite_').replace('_', ' ')} {where} "
                f"(epoch {epoch}): {origin}. Action: {action}."
            )
            evidence = {"action": decision.action, "rank": rank, "reproduced": int(reproduced)}
            if trace is not None:
                evidence.update(vars(trace))
            elif seen is not None:
                evidence.update(phase=seen.phase, tensor=seen.tensor, deferred=1)
            if batch_idx:
                evidence["batch_idx"] = batch_idx
            half = str(getattr(trainer.precision_plugin, "precision", "")).startswith("16")
            advice = origin_advice(trace, pl_module, half_precision=half) if trace is not None else []
            if trace is not None and not reproduced and replayed and at is None:
                advice = [_NOT_REPRODUCED, *advice]
            # the action is part of the condition: a skip and a later rollback of the same fault are two findings
            where_key = f"{trace.phase}:{trace.module}:{trace.tensor}" if trace is not None else code
            key = f"{where_key}:{decision.action}"
            self.record(
                trainer, Verdict(code, severity, message, evidence=evidence, advice=advice), key=key, **when
            )
            return code, message
        main = ("", "")
        for flagged, detector, code, what, value in (
            (flags.loss_spike, self._loss_spikes, "loss_spike", "loss", values["loss"]),
            (
                flags.grad_spike,
                self._grad_spikes,
                "exploding_gradients",
                "gradient norm",
                values["grad_norm"],
            ),
        ):
            if not flagged:
                continue
            other, other_detector, other_what = (
                (values["grad_norm"], self._grad_spikes, "gradient norm")
                if code == "loss_spike"
                else (values["loss"], self._loss_spikes, "loss")
            )
            around = (
                f" The {other_what} at that step: {other:.4g} (running mean {other_detector.mean:.4g})."
                if math.isfinite(other) and other_detector.count
                else ""
            )
            unusual = (
                f" and more than {self.spike_threshold:g} standard deviations above it (std {detector.std:.4g})"
                if detector.count >= detector.warmup
                else f" after {detector.count} step(s)"
            )
            message = (
                f"{what.capitalize()} spike {where}: {value:.4g}, {value / max(detector.mean, 1e-12):.1f}x its running "
                f"mean {detector.mean:.4g}{unusual}.{around} Action: {action}."
            )
            evidence = {
                "value": value,
                "mean": detector.mean,
                "std": detector.std,
                "ratio_to_mean": value / max(detector.mean, 1e-12),
                f"{other_what.replace(' ', '_')}_at_step": other,
                "action": decision.action,
            }
            if batch_idx:
                evidence["batch_idx"] = batch_idx
            self.record(
                trainer,
                Verdict(
                    code,
                    "error" if decision.action == "raise" else "warning",
                    message,
                    evidence=evidence,
                    advice=_SPIKE_ADVICE,
                ),
                key=f"spike:{what}",
                **when,
            )
            main = main if main[0] else (code, message)
        return main

    def _describe_action(self, action: str) -> str:
        return {
            "warn": "none (action='warn'), the update goes ahead",
            "skip": "step skipped (parameters and optimizer state untouched)",
            "rollback": f"rolled back to the snapshot of step {self._snapshot.step if self._snapshot else '?'}",
            "raise": "training stopped",
        }[action]

    def _act(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Any,
        decision: Decision,
        code: str,
        message: str,
    ) -> None:
        if decision.action == "warn":
            if code not in self._warned and trainer.is_global_zero:
                self._warned.add(code)
                warnings.warn(message, LightningDiagWarning, stacklevel=2)
            return
        if decision.action == "raise":
            raise NonFiniteError(message)
        optimizer.zero_grad(set_to_none=True)  # a true skip: no parameter or optimizer-state update
        context = run_context(trainer)
        context.hold_schedule(decision.hold_steps)
        if decision.action == "rollback":
            assert self._snapshot is not None
            self._snapshot.restore(pl_module, trainer.optimizers)
            if self.lr_backoff != 1.0:
                context.scale_lr(self.lr_backoff)
                back_off_lr(
                    trainer.optimizers, [c.scheduler for c in trainer.lr_scheduler_configs], self.lr_backoff
                )

    def report_series(self) -> dict[str, Any]:
        """What NaNGuard did, for the HTML report (rollbacks mark their LR back-off on the schedule)."""
        if not (self.skipped_steps or self.rollbacks):
            return {}
        return {
            "nan_guard": {
                "skipped_steps": self.skipped_steps,
                "rollbacks": self.rollbacks,
                "lr_backoff": self.lr_backoff,
            }
        }

    # -- state ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            **self.policy.state_dict(),
            "traces": self.traces,
            "loss_spikes": self._loss_spikes.state_dict(),
            "grad_spikes": self._grad_spikes.state_dict(),
            "findings": self._findings_state(),
        }
        if self._pending:  # deferred steps not judged yet: saved raw, so a resumed run judges them alike
            state["pending"] = [
                {
                    "step": p.step,
                    "epoch": p.epoch,
                    "values": p.values.detach().cpu(),
                    "reduced": p.reduced,
                    "has_loss": p.has_loss,
                    "samples": p.samples,
                    "names": list(p.names),
                    "norms": p.norms.detach().cpu(),
                    "batch_idx": p.batch_idx,
                }
                for p in self._pending
            ]
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy.load_state_dict(state_dict)
        self.traces = int(state_dict.get("traces", self.traces))
        self._pending = [
            _Pending(
                step=int(p["step"]),
                epoch=int(p["epoch"]),
                values=p["values"],
                reduced=bool(p["reduced"]),
                has_loss=bool(p["has_loss"]),
                samples=None if p.get("samples") is None else int(p["samples"]),
                names=tuple(p["names"]),
                norms=p["norms"],
                batch_idx=str(p["batch_idx"]),
            )
            for p in state_dict.get("pending", [])
        ]
        if "loss_spikes" in state_dict:
            self._loss_spikes.load_state_dict(state_dict["loss_spikes"])
        if "grad_spikes" in state_dict:
            self._grad_spikes.load_state_dict(state_dict["grad_spikes"])
        self._load_findings_state(state_dict)
