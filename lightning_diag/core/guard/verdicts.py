"""The words of NaNGuard's findings: what a bad step was, where it began, what was done, what to try.

Every function returns a :class:`~lightning_diag.core.verdict.Verdict` and the key that folds repeats of the same
condition into one finding (``DiagCallback.record(..., key=...)``). The action taken is part of the condition: a
skip and a later rollback of the same fault are two findings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from lightning_diag.core.guard.judge import StepJudge
from lightning_diag.core.guard.policy import Decision, GuardPolicy, StepFlags
from lightning_diag.core.nan_trace import Trace, deferred_origin, origin_advice
from lightning_diag.core.spikes import SpikeDetector
from lightning_diag.core.verdict import Severity, Verdict

__all__ = [
    "CODE_OF_PHASE",
    "BadStep",
    "Origin",
    "bad_step",
    "crashed_on_input_verdict",
    "describe_action",
    "escalation",
    "non_finite_verdict",
    "overflow_verdict",
    "spike_verdict",
    "step_verdicts",
]

#: The finding code of a non-finite value by the phase where it first appeared.
CODE_OF_PHASE = {
    "input": "non_finite_input",
    "forward": "non_finite_loss",
    "loss": "non_finite_loss",
    "backward": "non_finite_gradients",
    "optimizer": "non_finite_parameters",
}
SPIKE_ADVICE = [
    "Lower the learning rate or lengthen the warmup (WarmupCosine).",
    "Clip gradients (GradClip(algorithm='zscore') adapts to the norm's own statistics).",
    "Look for bad or mislabelled samples in the batches of that step (batch_idx in the evidence).",
]
OVERFLOW_ADVICE = [
    "The learning rate is far too high (or the loss scale is): lower it, add warmup (WarmupCosine).",
    "Clip gradients (GradClip) so one step cannot throw the weights this far.",
]
NOT_REPRODUCED = (
    "The replay of the same step was finite: the fault depends on state or chance, not on the step's data alone. "
    "Look for stateful or nondeterministic code (a module that keeps a counter or cache, randomness without a "
    "seed, uninitialised memory such as torch.empty) or a flaky kernel/hardware; run with "
    "torch.use_deterministic_algorithms(True) to tell them apart."
)


@dataclasses.dataclass(frozen=True)
class BadStep:
    """A step the policy acted on, as its findings describe it."""

    step: int
    epoch: int
    #: the policy applied (after escalation): ``warn``, ``skip``, ``rollback`` or ``raise``
    action: str
    #: the step number of the snapshot a rollback restores (``None``: unknown)
    snapshot_step: int | None = None
    #: the batch indices of the step's micro-batches (``"3,4"``), ``""`` when unknown
    batch_idx: str = ""
    #: judged at a later logging step from the step's own values (checks deferred: no replay possible)
    deferred: bool = False
    #: why the requested policy could not be followed (see :func:`escalation`): a sentence, and advice first
    escalation: tuple[str, tuple[str, ...]] = ("", ())

    @property
    def severity(self) -> Severity:
        """A withheld update is a warning; an update that went ahead with a non-finite value, or a stop, an error."""
        return "warning" if self.action in ("skip", "rollback") else "error"

    @property
    def action_text(self) -> str:
        text = describe_action(self.action, self.snapshot_step)
        return f"{text} ({self.escalation[0]})" if self.escalation[0] else text

    def advice(self, advice: list[str]) -> list[str]:
        """``advice`` with what to change about an exhausted policy first."""
        return [*self.escalation[1], *advice]

    def evidence(self, **values: Any) -> dict[str, Any]:
        evidence = {**values, "action": self.action}
        if self.batch_idx:
            evidence["batch_idx"] = self.batch_idx
        return evidence


def escalation(
    decision: Decision, *, skips: int, rollbacks: int, lr_backoff: float
) -> tuple[str, tuple[str, ...]]:
    """Why the policy asked for could not be followed, and what to change: ``("", ())`` when it was followed.

    Example:
        >>> from lightning_diag.core.guard.policy import Decision
        >>> text, advice = escalation(Decision("raise", requested="rollback", why="rollbacks"), skips=0, rollbacks=3,
        ...                           lr_backoff=1.0)
        >>> text.startswith("the fault came back after 3 rollback(s)"), "`lr_backoff=1.0`" in text
        (True, True)
    """
    if decision.why == "rollbacks":
        same = (
            f": with `lr_backoff={lr_backoff:.1f}` every rollback resumed at the same learning rate, which diverged again"
            if lr_backoff == 1.0
            else f", each at a learning rate {lr_backoff:g}x the one before"
        )
        advice = (
            "The same fault recurred after every rollback: rolling back again would repeat it. "
            + (
                "Set `lr_backoff=0.5` so each rollback lowers the learning rate, "
                if lr_backoff == 1.0
                else ""
            )
            + "lower the base learning rate or lengthen the warmup, and clip gradients (GradClip); raise "
            "`max_rollbacks` only if the fault is rare.",
        )
        return (
            f"the fault came back after {rollbacks} rollback(s), the most `max_rollbacks` allows{same}",
            advice,
        )
    if decision.why == "skips":
        return (
            f"{skips} consecutive step(s) were skipped, the most `max_consecutive_skips` allows: the fault is not "
            "one bad batch",
            (
                "Every step fails now: skipping cannot help. Find the origin (the module named in the message), "
                "or use `action='rollback'` with `lr_backoff<1` to return to a good state.",
            ),
        )
    if decision.why == "params":
        return "the parameters themselves are non-finite: skipping a step cannot repair them", ()
    if decision.why == "no_snapshot":
        return "no rollback snapshot had been taken yet", ()
    return "", ()


def bad_step(
    decision: Decision,
    policy: GuardPolicy,
    at: tuple[int, int, str],
    snapshot_step: int | None,
    *,
    deferred: bool,
    lr_backoff: float,
) -> BadStep:
    """The step ``decision`` acts on (``at``: its step, epoch and batch indices), with why the policy escalated."""
    assert decision.action is not None, "a good step is not a bad step"
    why = escalation(
        decision, skips=policy.consecutive_skips, rollbacks=policy.rollbacks, lr_backoff=lr_backoff
    )
    return BadStep(int(at[0]), int(at[1]), decision.action, snapshot_step, at[2], deferred, why)


def describe_action(action: str, snapshot_step: int | None = None) -> str:
    """The action taken, in words (the end of every NaNGuard message)."""
    return {
        "warn": "none (action='warn'), the update goes ahead",
        "skip": "step skipped (parameters and optimizer state untouched)",
        "rollback": f"rolled back to the snapshot of step {snapshot_step if snapshot_step is not None else '?'}",
        "raise": "training stopped",
    }[action]


def overflow_verdict(bad: BadStep, peak: float, tensor: str) -> tuple[Verdict, str]:
    """Finite gradients whose total norm overflows float32: exploding, not NaN."""
    message = (
        f"Exploding gradients at step {bad.step}: every gradient is finite but their norm overflows float32 "
        f"(largest |g| = {peak:.3g} in `{tensor}`). Action: {bad.action_text}."
    )
    evidence = {"max_abs_grad": peak, "tensor": tensor, "action": bad.action}
    verdict = Verdict("exploding_gradients", bad.severity, message, evidence, bad.advice(OVERFLOW_ADVICE))
    return verdict, f"norm_overflow:{bad.action}"  # the action is part of the condition (a skip, then a stop)


def non_finite_verdict(
    bad: BadStep,
    code: str,
    trace: Trace | None,
    *,
    reproduced: bool,
    rank: int,
    replayed: bool,
    seen: Trace | None,
    model: nn.Module,
    half_precision: bool,
) -> tuple[Verdict, str]:
    """A NaN/Inf in the input, loss, gradients or parameters, and where it first appeared.

    ``trace``: the origin found (by replay, or observed in the step's values); ``reproduced``: the replay showed it
    again; ``replayed``: a replay was possible (automatic optimization, origin search on); ``seen``: for a deferred
    step, what its own values show (the phase, a gradient's tensor), which is not where it began.
    """
    origin = trace.describe() if trace is not None else "its origin was not located"
    if bad.deferred:
        gradient = f" (last non-finite gradient: {seen.tensor})" if seen and seen.phase == "backward" else ""
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
        f"Non-finite {code.removeprefix('non_finite_').replace('_', ' ')} at step {bad.step} "
        f"(epoch {bad.epoch}): {origin}. Action: {bad.action_text}."
    )
    evidence: dict[str, Any] = {"action": bad.action, "rank": rank, "reproduced": int(reproduced)}
    if trace is not None:
        evidence.update(vars(trace))
    elif seen is not None:
        evidence.update(phase=seen.phase, tensor=seen.tensor, deferred=1)
    if bad.batch_idx:
        evidence["batch_idx"] = bad.batch_idx
    advice = origin_advice(trace, model, half_precision=half_precision) if trace is not None else []
    if trace is not None and not reproduced and replayed and not bad.deferred:
        advice = [NOT_REPRODUCED, *advice]
    where_key = f"{trace.phase}:{trace.module}:{trace.tensor}" if trace is not None else code
    return Verdict(code, bad.severity, message, evidence, bad.advice(advice)), f"{where_key}:{bad.action}"


def spike_verdict(
    bad: BadStep,
    what: str,
    value: float,
    detector: SpikeDetector,
    threshold: float,
    other: tuple[str, float, SpikeDetector],
) -> tuple[Verdict, str]:
    """A loss or gradient-norm spike: ``what`` is ``"loss"`` or ``"gradient norm"``; ``other`` the other quantity's
    ``(name, value at the step, detector)``.
    """
    other_what, other_value, other_detector = other
    around = (
        f" The {other_what} at that step: {other_value:.4g} (running mean {other_detector.mean:.4g})."
        if math.isfinite(other_value) and other_detector.count
        else ""
    )
    unusual = (
        f" and more than {threshold:g} standard deviations above it (std {detector.std:.4g})"
        if detector.count >= detector.warmup
        else f" after {detector.count} step(s)"
    )
    ratio = value / max(detector.mean, 1e-12)
    message = (
        f"{what.capitalize()} spike at step {bad.step}: {value:.4g}, {ratio:.1f}x its running "
        f"mean {detector.mean:.4g}{unusual}.{around} Action: {bad.action_text}."
    )
    evidence = bad.evidence(
        value=value,
        mean=detector.mean,
        std=detector.std,
        ratio_to_mean=ratio,
        **{f"{other_what.replace(' ', '_')}_at_step": other_value},
    )
    code = "loss_spike" if what == "loss" else "exploding_gradients"
    severity: Severity = "error" if bad.action == "raise" else "warning"
    return Verdict(code, severity, message, evidence, bad.advice(SPIKE_ADVICE)), f"spike:{what}"


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a bad step's non-finite value was looked for and what was found (see :func:`non_finite_verdict`)."""

    trace: Trace | None = None
    reproduced: bool = False
    rank: int = 0
    #: a replay was possible (automatic optimization, origin search on)
    replayed: bool = False
    #: for a deferred step: what its own values show
    seen: Trace | None = None
    #: ``(largest |g|, its tensor)`` when finite gradients overflowed float32
    overflow: tuple[float, str] | None = None

    @classmethod
    def of_deferred(cls, model: nn.Module, names: list[str], norms: torch.Tensor, flags: StepFlags) -> Origin:
        """A deferred step's origin (it is not replayed): what its own values show, the last non-finite gradient
        from its per-tensor gradient ``norms`` (read to the host here: on detection only).
        """
        values = norms.tolist() if flags.grads else []
        return cls(
            seen=deferred_origin(model, names, values, flags.input, flags.loss, flags.grads, flags.params)
        )


def step_verdicts(
    bad: BadStep,
    decision: Decision,
    flags: StepFlags,
    values: dict[str, float],
    judge: StepJudge,
    origin: Origin,
    *,
    model: nn.Module,
    half_precision: bool,
) -> list[tuple[Verdict, str]]:
    """Every finding of a step the policy acted on, the main one first: a float32 overflow, or a non-finite value
    (its code from the phase where it began, else from the flags), or the loss and gradient-norm spikes.
    """
    if flags.norm_overflow and origin.overflow is not None:
        return [overflow_verdict(bad, *origin.overflow)]
    if flags.non_finite:
        trace = origin.trace
        code = CODE_OF_PHASE[trace.phase] if trace is not None else (decision.code or "non_finite_gradients")
        return [
            non_finite_verdict(
                bad,
                code,
                trace,
                reproduced=origin.reproduced,
                rank=origin.rank,
                replayed=origin.replayed,
                seen=origin.seen,
                model=model,
                half_precision=half_precision,
            )
        ]
    threshold = judge.settings[1]
    found = []
    if flags.loss_spike:
        other = ("gradient norm", values["grad_norm"], judge.grad_spikes)
        found.append(spike_verdict(bad, "loss", values["loss"], judge.loss_spikes, threshold, other))
    if flags.grad_spike:
        other = ("loss", values["loss"], judge.loss_spikes)
        found.append(
            spike_verdict(bad, "gradient norm", values["grad_norm"], judge.grad_spikes, threshold, other)
        )
    return found


def crashed_on_input_verdict(
    step: int, epoch: int, tensor: str, kind: str, error: str
) -> tuple[Verdict, str]:
    """The run died of an exception in a step whose batch held NaN/Inf: the data, not the exception, is the cause
    to fix first (a forward that raises on it, an index computed from it).
    """
    names = {"nan": "NaN", "inf": "Inf", "nan+inf": "NaN and Inf"}
    message = (
        f"Non-finite input at step {step} (epoch {epoch}): the batch held {names.get(kind, 'NaN/Inf')} in `{tensor}` "
        f"when the run died of `{error}`; the exception came from that batch before any check could act."
    )
    evidence = {"phase": "input", "tensor": tensor, "kind": kind, "action": "raise", "error": error}
    advice = [
        "Clean the data or drop such samples in the Dataset/collate_fn; the sample index is in `tensor`.",
        "To keep training through rare bad batches, filter them in `training_step` (return None) or in the loader.",
    ]
    return Verdict("non_finite_input", "error", message, evidence, advice), f"input:{tensor}:crash"
