"""NaNGuard: detect, localise and survive NaN/Inf and spikes: warn, skip, roll back or stop, alike on every rank."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal

import torch

from lightning_diag import _distributed, _logging
from lightning_diag._validation import check_choice, check_fraction, check_int, check_number, check_positive
from lightning_diag.callbacks._base import DiagCallback
from lightning_diag.callbacks._shared import (
    amp_scaler,
    check_strategy,
    named_optimizer_params,
    params_with_grads,
    scale_tensor,
    step_grad_stats,
    training_step_loss,
)
from lightning_diag.core.grad_stats import local_tensor
from lightning_diag.core.nan_trace import (
    Trace,
    first_non_finite,
    iter_tensors,
    non_finite_tensors,
    trace_step,
)
from lightning_diag.core.snapshot import Snapshot
from lightning_diag.core.spikes import SpikeDetector
from lightning_diag.findings import LightningDiagWarning, Severity

__all__ = ["NaNGuard", "NonFiniteError"]

Action = Literal["warn", "skip", "rollback", "raise"]
ACTIONS = ("warn", "skip", "rollback", "raise")

_CODE_OF_PHASE = {
    "input": "non_finite_input",
    "forward": "non_finite_loss",
    "loss": "non_finite_loss",
    "backward": "non_finite_gradients",
    "optimizer": "non_finite_parameters",
}

_FUNCTIONAL = (
    "Functional code in or around this module (log, sqrt, division, exp, pow) met an out-of-domain value: add an "
    "epsilon or clamp its input (e.g. log(x.clamp_min(1e-8)))."
)
_FP16 = "In float16 anything above 65504 is Inf: prefer bf16-mixed, or add normalisation before this module."
_WEIGHTS = (
    "Weights grown too large: lower the learning rate, clip gradients (GradClip), add warmup (WarmupCosine)."
)

_ADVICE: dict[str, list[str]] = {
    "input": [
        "The data holds NaN/Inf: find the sample (batch and sample index are in the evidence), clean the dataset or "
        "drop such samples in the Dataset/collate_fn.",
        "Check preprocessing that divides by a per-sample statistic (std, max) that can be 0.",
    ],
    "loss": [
        "The loss took a log of 0 or divided by 0: use the fused, stable forms (cross_entropy on logits, "
        "binary_cross_entropy_with_logits) or add an epsilon.",
        "The predictions are huge and their squared error overflowed: the weights are blowing up (learning rate too "
        "high: lower it, clip gradients, add warmup).",
        "Targets out of the loss's domain (class index out of range, labels outside [0, 1]), or an empty mask "
        "averaged over zero elements.",
    ],
    "backward": [
        "The derivative of sqrt/log/pow/norm at 0 is infinite: add an epsilon inside the function "
        "(e.g. sqrt(x + eps), norm with eps).",
        "A custom autograd Function's backward can produce it: check it with torch.autograd.gradcheck.",
    ],
    "optimizer": [
        "The update itself made the parameters non-finite: the learning rate is too high for this step; lower it, "
        "add warmup (WarmupCosine) or clip gradients (GradClip).",
        "With Adam/AdamW in low precision, a tiny `eps` can divide by ~0: raise `eps` (e.g. 1e-6) or keep optimizer "
        "state in float32.",
    ],
}


def _advice(trace: Trace, pl_module: Any, trainer: Any) -> list[str]:
    """Advice for where the value appeared, narrowed by what the module is and the run's precision."""
    half = str(getattr(trainer.precision_plugin, "precision", "")).startswith("16")
    if trace.phase != "forward":
        advice = list(_ADVICE.get(trace.phase, []))
        if trace.phase == "backward" and half:
            advice.append("Under float16, gradients overflow easily: prefer bf16-mixed.")
        return advice
    try:
        module = pl_module.get_submodule("" if trace.module == "(root)" else trace.module)
        has_weights = any(True for _ in module.parameters(recurse=False))
    except AttributeError:
        has_weights = False
    advice = (
        [_WEIGHTS, _FUNCTIONAL] if has_weights and not trace.tensor.startswith("input of") else [_FUNCTIONAL]
    )
    if half:
        advice.append(_FP16)
    return advice


class NonFiniteError(RuntimeError):
    """Raised by :class:`NaNGuard` when its policy is ``"raise"`` (or an escalation ends there)."""


#: Localisations per fit; after that, findings rely on the flags (a run left broken under "warn" stays cheap).
MAX_TRACES = 20


def _floating(batch: Any) -> list[torch.Tensor]:
    return [t for _, t in iter_tensors(batch) if t.is_floating_point() and t.numel()]


class NaNGuard(DiagCallback):
    """Catch NaN/Inf (and loss/gradient-norm spikes) before the update; say where they began; survive them.

    Every optimizer step, before the update, NaNGuard checks the loss of each micro-batch, the gradients (shared
    statistics, computed once per step), the float tensors of each input batch and, every ``check_params_every``
    steps, the parameters. It also feeds the loss and the total gradient norm to robust spike detectors
    (:class:`~lightning_diag.core.spikes.SpikeDetector`). All of that stays on the device; the flags of all ranks
    are then combined with **one all-reduce and one small host read per step**, so every rank takes the same
    decision (the GradScaler makes the same kind of read every step).

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
      every ``snapshot_every`` good steps), multiply the learning rates by ``lr_backoff`` (kept by WarmupCosine
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
        check_params_every: check the parameters every this many optimizer steps (``0``: never; they are also
            checked whenever something else is found).
        detect_spikes: run the spike detectors.
        spike_window: the EMA window of the spike statistics, in optimizer steps.
        spike_threshold: a spike is this many standard deviations above the EMA mean...
        spike_min_ratio: ...and also this many times the mean (``1.0`` turns this guard off).
        spike_warmup: optimizer steps observed before spikes can be flagged.
        max_consecutive_skips: consecutive skips allowed before escalating.
        escalate_to: the policy after ``max_consecutive_skips``: ``"rollback"`` or ``"raise"``.
        snapshot_every: good optimizer steps between two rollback snapshots (taken only when a rollback can
            happen: a policy or ``escalate_to`` is ``"rollback"``).
        max_rollbacks: rollbacks allowed in one fit before the next one raises.
        lr_backoff: on each rollback, multiply the learning rates by this factor in ``(0, 1]``.
        localize: replay the step to find where the first non-finite value appeared.

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
        ``exploding_gradients`` for spikes, with the value and the running mean/std.

    Raises:
        ValueError: at construction for an unknown action, a negative window/threshold, ``max_consecutive_skips <
            1``, ``snapshot_every < 1``, ``lr_backoff`` outside ``(0, 1]``.
        NonFiniteError: during fit, when the policy (or an escalation) is ``"raise"``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_diag import NaNGuard
        >>> trainer = pl.Trainer(callbacks=[NaNGuard(action="rollback", snapshot_every=200, lr_backoff=0.5)])

    Note:
        Rollback memory: one CPU copy of the parameters and buffers plus the optimizer state (about 3x the
        parameter bytes with Adam). The snapshot is not saved in checkpoints; a resumed run takes a fresh one when
        training starts and keeps the saved snapshot schedule. Unlike ``Trainer(detect_anomaly=True)``, which
        runs autograd's anomaly mode on every step, NaNGuard pays for the localisation only on the step that needs
        it. The replay re-runs ``training_step`` (with ``self.log`` silenced): other side effects there (appending
        to a list, counters) happen once more on a replayed step. Manual optimization: detection and the policies
        work; the replay needs automatic optimization.
    """

    def __init__(
        self,
        action: Action = "skip",
        spike_action: Action = "warn",
        check_inputs: bool = True,
        check_params_every: int = 50,
        detect_spikes: bool = True,
        spike_window: int = 100,
        spike_threshold: float = 6.0,
        spike_min_ratio: float = 1.5,
        spike_warmup: int = 20,
        max_consecutive_skips: int = 5,
        escalate_to: Literal["rollback", "raise"] = "raise",
        snapshot_every: int = 100,
        max_rollbacks: int = 3,
        lr_backoff: float = 1.0,
        localize: bool = True,
    ) -> None:
        super().__init__()
        check_choice("action", action, ACTIONS)
        check_choice("spike_action", spike_action, ACTIONS)
        check_int("check_params_every", check_params_every, minimum=0)
        check_int("spike_window", spike_window, minimum=1)
        check_positive("spike_threshold", spike_threshold)
        if check_number("spike_min_ratio", spike_min_ratio) < 1.0:
            raise ValueError(f"`spike_min_ratio` must be >= 1, got {spike_min_ratio!r}.")
        check_int("spike_warmup", spike_warmup, minimum=0)
        check_int("max_consecutive_skips", max_consecutive_skips, minimum=1)
        check_choice("escalate_to", escalate_to, ("rollback", "raise"))
        check_int("snapshot_every", snapshot_every, minimum=1)
        check_int("max_rollbacks", max_rollbacks, minimum=1)
        check_fraction("lr_backoff", lr_backoff, low_open=True)
        self.action = action
        self.spike_action = spike_action
        self.check_inputs = check_inputs
        self.check_params_every = check_params_every
        self.detect_spikes = detect_spikes
        self.spike_window = spike_window
        self.spike_threshold = float(spike_threshold)
        self.spike_min_ratio = float(spike_min_ratio)
        self.spike_warmup = spike_warmup
        self.max_consecutive_skips = max_consecutive_skips
        self.escalate_to = escalate_to
        self.snapshot_every = snapshot_every
        self.max_rollbacks = max_rollbacks
        self.lr_backoff = float(lr_backoff)
        self.localize = localize
        self._reset_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action, spike_action=self.spike_action)

    @property
    def rollback_possible(self) -> bool:
        """Whether a rollback can happen (then snapshots are taken)."""
        policies = {self.action, self.spike_action}
        return "rollback" in policies or ("skip" in policies and self.escalate_to == "rollback")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            # Under FSDP1 each rank checks its own shards and the flags are combined: detection and skip are
            # correct; a rollback (snapshots of flat parameters) is not supported there.
            check_strategy(trainer, "NaNGuard", fsdp1=not self.rollback_possible)

    def _reset_state(self) -> None:
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.traces = 0
        self.good_since_snapshot = 0
        self.snapshot_step: int | None = None
        self._snapshot: Snapshot | None = None
        # Steps since the model was last at the snapshot's state whose update went ahead (the schedule advanced).
        self._advanced = 0
        self._loss_spikes = SpikeDetector(
            self.spike_window, self.spike_threshold, self.spike_min_ratio, self.spike_warmup
        )
        self._grad_spikes = SpikeDetector(
            self.spike_window, self.spike_threshold, self.spike_min_ratio, self.spike_warmup
        )
        self._warned: set[str] = set()
        self._zero: torch.Tensor | None = None
        self._last_values = (math.nan, math.nan)  # the step's (loss, gradient norm) as the detectors saw them
        self._clear_window()

    def _clear_window(self) -> None:
        # The micro-batches of the optimizer step in progress and their device-side flags.
        self._batches: list[tuple[Any, int]] = []
        self._input_sum: torch.Tensor | None = None
        self._step_loss: torch.Tensor | None = None

    # -- hooks: gather ----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._clear_window()
        if self.rollback_possible:
            # A resumed run snapshots the checkpoint's state but keeps the saved snapshot schedule.
            self._snapshot = Snapshot(pl_module, trainer.optimizers, trainer.global_step)
            self._advanced = 0
            if self.snapshot_step is None:
                self.snapshot_step = trainer.global_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx % max(int(trainer.accumulate_grad_batches), 1) == 0:
            self._clear_window()  # a new optimizer step begins (also after a window whose steps returned None)
        self._batches.append((batch, batch_idx))
        if not self.check_inputs:
            return
        with torch.no_grad():
            for tensor in _floating(batch):
                # The sum of a tensor is non-finite exactly when an element is (float32 accumulation cannot
                # overflow on real data): one cheap reduction per tensor, read with the step's decision.
                total = tensor.sum(dtype=torch.float32)
                self._input_sum = (
                    total if self._input_sum is None else self._input_sum + total.to(self._input_sum.device)
                )

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        value = loss.detach().float().sum()
        scaler = amp_scaler(trainer)
        if scaler is not None:  # the hook sees the scaled loss
            value = value * scale_tensor(scaler).to(value.device).reciprocal()
        # Summed over the micro-batches (Lightning already divided each by accumulate_grad_batches): the step's
        # loss, non-finite if any micro-batch's was.
        self._step_loss = value if self._step_loss is None else self._step_loss + value

    # -- hooks: decide ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        stats = step_grad_stats(trainer, pl_module, optimizer)  # shared, pre-clip
        device = stats.total_norm.device
        if self._zero is None or self._zero.device != device:
            self._zero = torch.zeros((), device=device)
        zero = self._zero
        snapshot_due = self.rollback_possible and self.good_since_snapshot >= self.snapshot_every
        check_params = snapshot_due or (
            self.check_params_every > 0 and trainer.global_step % self.check_params_every == 0
        )
        values = torch.stack(
            [
                self._input_sum.to(device) if self._input_sum is not None else zero,
                self._params_peak(trainer, pl_module, optimizer, device) if check_params else zero,
                self._step_loss.to(device) if self._step_loss is not None else zero,
                stats.total_norm.float() if stats.norms.numel() else zero,
            ]
        )
        # One all-reduce (sum: a non-finite value anywhere stays non-finite) and one host read per step; every rank
        # then holds the same numbers and takes the same decision.
        world = max(int(getattr(trainer, "world_size", 1)), 1)
        input_sum, params_peak, loss, grad_norm = _distributed.reduce(trainer, values, "sum").tolist()
        input_bad = not math.isfinite(input_sum)
        params_bad = not math.isfinite(params_peak)
        loss_bad = not math.isfinite(loss)
        # under a GradScaler, overflowing gradients are its business (it skips the step and lowers the scale)
        grad_bad = not math.isfinite(grad_norm) and amp_scaler(trainer) is None
        loss_spike = grad_spike = False
        if self.detect_spikes:
            self._last_values = (loss / world, grad_norm / world)
            if self._step_loss is not None:
                loss_spike = self._loss_spikes.update(loss / world)
            if stats.norms.numel():
                grad_spike = self._grad_spikes.update(grad_norm / world)

        if loss_bad or grad_bad or input_bad or params_bad:
            self._on_non_finite(trainer, pl_module, optimizer, loss_bad, grad_bad, input_bad, params_bad)
        elif loss_spike or grad_spike:
            self._on_spike(trainer, pl_module, optimizer, loss_spike, grad_spike)
        else:
            self.consecutive_skips = 0
            if snapshot_due:
                self._take_snapshot(trainer, pl_module)
            if self.rollback_possible:
                self.good_since_snapshot += 1
            self._advanced += 1
        if _logging.should_log_step(trainer):
            _logging.log_step(
                pl_module,
                {"diag/nan/skipped_steps": self.skipped_steps, "diag/nan/rollbacks": self.rollbacks},
            )
        self._clear_window()

    @staticmethod
    def _params_peak(trainer: Any, pl_module: Any, optimizer: Any, device: torch.device) -> torch.Tensor:
        """The largest ``|parameter|`` (this rank's shards): NaN/Inf when a parameter is non-finite."""
        params = [p for _, p in named_optimizer_params(trainer, pl_module, optimizer)]
        local = [local_tensor(p).detach() for p in params]
        local = [p for p in local if p.numel()]
        if not local:
            return torch.zeros((), device=device)
        peaks = torch._foreach_norm(local, math.inf)  # max |x| never overflows, and NaN propagates
        return torch.stack([p.float().to(device) for p in peaks]).max()

    # -- non-finite -------------------------------------------------------------------------------------------
    def _on_non_finite(
        self,
        trainer: Any,
        pl_module: Any,
        optimizer: Any,
        loss_bad: bool,
        grad_bad: bool,
        input_bad: bool,
        params_bad: bool,
    ) -> None:
        trace, reproduced, rank = self._locate(trainer, pl_module, optimizer, loss_bad, grad_bad, input_bad)
        overflow_only = trace is None and grad_bad and not (loss_bad or input_bad or params_bad)
        if overflow_only and self._on_norm_overflow(trainer, pl_module, optimizer):
            return
        if trace is not None and trace.phase == "optimizer":
            params_bad = True
        action = self._resolve(self.action, cannot_skip=params_bad)
        code = (
            _CODE_OF_PHASE[trace.phase]
            if trace is not None
            else self._code_from_flags(loss_bad, grad_bad, input_bad, params_bad)
        )
        where = trace.describe() if trace is not None else "its origin was not located"
        if trace is not None and not reproduced:
            where += " (seen in this step's values; the replay did not reproduce it)"
        message = (
            f"Non-finite {code.removeprefix('non_finite_').replace('_', ' ')} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}): {where}. Action: {self._describe_action(action)}."
        )
        evidence: dict[str, Any] = {"action": action, "rank": rank, "reproduced": int(reproduced)}
        if trace is not None:
            evidence.update(
                phase=trace.phase,
                module=trace.module,
                module_type=trace.module_type,
                tensor=trace.tensor,
                kind=trace.kind,
            )
        batch_indices = [idx for _, idx in self._batches]
        if batch_indices:
            evidence["batch_idx"] = ",".join(str(i) for i in batch_indices)
        severity: Severity = "warning" if action in ("skip", "rollback") else "error"
        key = f"{trace.phase}:{trace.module}:{trace.tensor}" if trace is not None else code
        advice = _advice(trace, pl_module, trainer) if trace is not None else []
        self.record(trainer, code, severity, message, evidence=evidence, advice=advice, key=key)
        self._act(trainer, pl_module, optimizer, action, code, message)

    def _on_norm_overflow(self, trainer: Any, pl_module: Any, optimizer: Any) -> bool:
        """Finite gradients whose norm overflows float32: exploding, not NaN. Act on it like a non-finite step."""
        names, _, grads = params_with_grads(trainer, pl_module, optimizer)
        if not grads:
            return False
        peaks = torch.stack([p.float() for p in torch._foreach_norm([g.detach() for g in grads], math.inf)])
        peak_values = _distributed.reduce(trainer, peaks, "max").tolist()
        if not all(math.isfinite(v) for v in peak_values):
            return False  # really non-finite somewhere: the usual path
        worst = max(range(len(peak_values)), key=peak_values.__getitem__)
        action = self._resolve(self.action, cannot_skip=False)
        message = (
            f"Exploding gradients at step {trainer.global_step}: every gradient is finite but their norm overflows "
            f"float32 (largest |g| = {peak_values[worst]:.3g} in `{names[worst]}`). Action: "
            f"{self._describe_action(action)}."
        )
        self.record(
            trainer,
            "exploding_gradients",
            "warning" if action in ("skip", "rollback") else "error",
            message,
            evidence={"max_abs_grad": peak_values[worst], "tensor": names[worst], "action": action},
            advice=[
                "The learning rate is far too high (or the loss scale is): lower it, add warmup (WarmupCosine).",
                "Clip gradients (GradClip) so one step cannot throw the weights this far.",
            ],
            key="norm_overflow",
        )
        self._act(trainer, pl_module, optimizer, action, "exploding_gradients", message)
        return True

    def _code_from_flags(self, loss_bad: bool, grad_bad: bool, input_bad: bool, params_bad: bool) -> str:
        if input_bad:
            return "non_finite_input"
        if params_bad:
            return "non_finite_parameters"
        if loss_bad:
            return "non_finite_loss"
        return "non_finite_gradients"

    def _locate(
        self, trainer: Any, pl_module: Any, optimizer: Any, loss_bad: bool, grad_bad: bool, input_bad: bool
    ) -> tuple[Trace | None, bool, int]:
        """Where the first non-finite value appeared: this rank's answer, then the first informative one of all."""
        if not self.localize or self.traces >= MAX_TRACES:
            return None, False, 0
        self.traces += 1
        mine: tuple[dict[str, str] | None, bool] = (None, False)
        params = named_optimizer_params(trainer, pl_module, optimizer)
        bad_params = non_finite_tensors([n for n, _ in params], [p for _, p in params])
        if bad_params:
            name, kind = bad_params[0]
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            module = pl_module.get_submodule(owner) if owner else pl_module
            found: Trace | None = Trace("optimizer", owner or "(root)", type(module).__name__, name, kind)
            mine = (vars(found), True)
        else:
            found = self._replay(trainer, pl_module)
            if found is not None:
                mine = (vars(found), True)
            elif input_bad or loss_bad or grad_bad:
                mine = (self._observed(trainer, pl_module, optimizer, input_bad, loss_bad, grad_bad), False)
        answers = _distributed.gather_objects(trainer, mine)
        for reproduced in (True, False):
            for rank, (trace, was_reproduced) in enumerate(answers):
                if trace is not None and was_reproduced == reproduced:
                    return Trace(**trace), reproduced, rank
        return None, False, 0

    def _replay(self, trainer: Any, pl_module: Any) -> Trace | None:
        """Replay every micro-batch of the step (all of them, on every rank, so sharded models stay in step)."""
        if not pl_module.automatic_optimization:
            return None
        first: Trace | None = None
        for batch, batch_idx in self._batches:
            trace = trace_step(
                pl_module, batch, functools.partial(training_step_loss, trainer, pl_module, batch, batch_idx)
            )
            if first is None and trace is not None:
                first = trace
        return first

    def _observed(
        self, trainer: Any, pl_module: Any, optimizer: Any, input_bad: bool, loss_bad: bool, grad_bad: bool
    ) -> dict[str, str] | None:
        """What this step's own values show, when the replay did not reproduce the problem."""
        if input_bad:
            for batch, _ in self._batches:
                found = first_non_finite(batch)
                if found:
                    return vars(Trace("input", "", "", found[0], found[1]))
        if grad_bad:
            names, _, grads = params_with_grads(trainer, pl_module, optimizer)
            bad = non_finite_tensors(names, grads)
            if bad:
                name, kind = bad[-1]  # backward runs from the last layer: its non-finite gradient came first
                owner = name.rsplit(".", 1)[0] if "." in name else ""
                module = pl_module.get_submodule(owner) if owner else pl_module
                return vars(
                    Trace("backward", owner or "(root)", type(module).__name__, f"parameter `{name}`", kind)
                )
        if loss_bad:
            return vars(Trace("loss", "", "", "loss", ""))
        return None

    # -- spikes -----------------------------------------------------------------------------------------------
    def _on_spike(
        self, trainer: Any, pl_module: Any, optimizer: Any, loss_spike: bool, grad_spike: bool
    ) -> None:
        action = self._resolve(self.spike_action, cannot_skip=False)
        last_message = ""
        loss, grad_norm = self._last_values
        for flagged, detector, code, what, value in (
            (loss_spike, self._loss_spikes, "loss_spike", "loss", loss),
            (grad_spike, self._grad_spikes, "exploding_gradients", "gradient norm", grad_norm),
        ):
            if not flagged:
                continue
            mean, std = detector.mean, detector.std
            message = (
                f"{what.capitalize()} spike at step {trainer.global_step}: {value:.4g}, more than "
                f"{self.spike_threshold:g} standard deviations above its running mean {mean:.4g} (std {std:.4g}). "
                f"Action: {self._describe_action(action)}."
            )
            advice = [
                "Lower the learning rate or lengthen the warmup (WarmupCosine).",
                "Clip gradients (GradClip(mode='zscore') adapts to the norm's own statistics).",
                "Look for bad or mislabelled samples in the batches of that step (batch_idx in the evidence).",
            ]
            evidence: dict[str, Any] = {"value": value, "mean": mean, "std": std, "action": action}
            if self._batches:
                evidence["batch_idx"] = ",".join(str(i) for _, i in self._batches)
            severity: Severity = "warning" if action != "raise" else "error"
            self.record(
                trainer, code, severity, message, evidence=evidence, advice=advice, key=f"spike:{what}"
            )
            last_message = message
        self._act(
            trainer,
            pl_module,
            optimizer,
            action,
            "loss_spike" if loss_spike else "exploding_gradients",
            last_message,
        )

    # -- policies ---------------------------------------------------------------------------------------------
    def _resolve(self, action: str, *, cannot_skip: bool) -> str:
        """The policy that applies now, after escalation."""
        if action == "skip" and (cannot_skip or self.consecutive_skips >= self.max_consecutive_skips):
            action = self.escalate_to
        if action == "rollback" and (self._snapshot is None or self.rollbacks >= self.max_rollbacks):
            action = "raise"
        return action

    def _describe_action(self, action: str) -> str:
        return {
            "warn": "none (action='warn'), the update goes ahead",
            "skip": "step skipped (parameters and optimizer state untouched)",
            "rollback": f"rolled back to the snapshot of step {self._snapshot.step if self._snapshot else '?'}",
            "raise": "training stopped",
        }[action]

    def _act(
        self, trainer: Any, pl_module: Any, optimizer: Any, action: str, code: str, message: str
    ) -> None:
        if action == "warn":
            self.consecutive_skips = 0
            self._advanced += 1
            if code not in self._warned and trainer.is_global_zero:
                self._warned.add(code)
                warnings.warn(message, LightningDiagWarning, stacklevel=2)
            return
        if action == "raise":
            raise NonFiniteError(message)
        optimizer.zero_grad(set_to_none=True)  # a true skip: no parameter or optimizer-state update
        self.skipped_steps += 1
        if action == "skip":
            self.consecutive_skips += 1
            self._hold_schedule(trainer, 1)
            return
        assert self._snapshot is not None
        self._snapshot.restore(pl_module, trainer.optimizers)
        self.rollbacks += 1
        self.consecutive_skips = 0
        self.good_since_snapshot = 0
        # The schedule goes back to where it was at the snapshot: hold the steps it advanced since then, and this one.
        self._hold_schedule(trainer, self._advanced + 1)
        self._advanced = 0
        if self.lr_backoff != 1.0:
            self._back_off_lr(trainer)

    def _hold_schedule(self, trainer: Any, steps: int) -> None:
        from lightning_diag.callbacks.warmup_cosine import WarmupCosine

        for callback in trainer.callbacks:
            if isinstance(callback, WarmupCosine):
                callback.hold(steps)

    def _back_off_lr(self, trainer: Any) -> None:
        from lightning_diag.callbacks.warmup_cosine import WarmupCosine

        for callback in trainer.callbacks:
            if isinstance(callback, WarmupCosine):
                callback.scale_lr(self.lr_backoff)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= self.lr_backoff
                if "initial_lr" in group:
                    group["initial_lr"] *= self.lr_backoff
        for config in trainer.lr_scheduler_configs:
            base_lrs = getattr(config.scheduler, "base_lrs", None)
            if isinstance(base_lrs, list):
                config.scheduler.base_lrs = [lr * self.lr_backoff for lr in base_lrs]

    def _take_snapshot(self, trainer: Any, pl_module: Any) -> None:
        self._snapshot = Snapshot(pl_module, trainer.optimizers, trainer.global_step)
        self.snapshot_step = trainer.global_step
        self.good_since_snapshot = 0
        self._advanced = 0

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
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "rollbacks": self.rollbacks,
            "traces": self.traces,
            "good_since_snapshot": self.good_since_snapshot,
            "snapshot_step": self.snapshot_step,
            "loss_spikes": self._loss_spikes.state_dict(),
            "grad_spikes": self._grad_spikes.state_dict(),
            "findings": self._findings_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("skipped_steps", "consecutive_skips", "rollbacks", "traces", "good_since_snapshot"):
            if key in state_dict:
                setattr(self, key, int(state_dict[key]))
        if state_dict.get("snapshot_step") is not None:
            self.snapshot_step = int(state_dict["snapshot_step"])
        if "loss_spikes" in state_dict:
            self._loss_spikes.load_state_dict(state_dict["loss_spikes"])
        if "grad_spikes" in state_dict:
            self._grad_spikes.load_state_dict(state_dict["grad_spikes"])
        self._load_findings_state(state_dict)
