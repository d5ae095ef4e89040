"""Early-stopping decision as a small state machine over a monitored value.

``StopTracker.update(value)`` consumes one evaluation and returns a :class:`StopDecision`; the tracker holds only
plain numbers, so its state round-trips through a checkpoint. The rules, first match wins:

1. ``check_finite`` and the value is NaN/Inf: stop (``non_finite``).
2. ``stopping_threshold`` is beaten (strictly): stop (``stopping_threshold``).
3. ``divergence_threshold`` is crossed (strictly, in the bad direction): stop (``divergence_threshold``).
4. The value beats the best by more than ``min_delta``: it becomes the best. The patience counter resets only when
   the value also beats ``baseline`` (when one is set).
5. Otherwise the patience counter grows; reaching ``patience`` stops (``patience``).

Separately, every decision says whether the value is the best *seen* so far (``new_best``: finite and better
than every earlier value, no margin). ``min_delta`` only decides patience; the weights worth keeping are the
best seen ones, also when a threshold stops the run.

These are Lightning ``EarlyStopping``'s rules plus Keras' ``baseline``. ``min_delta`` is a non-negative margin in
both modes (never sign-flipped).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from typing import Any, Literal

from lightning_diag.core.verdict import Severity, Verdict

__all__ = [
    "STOP_ADVICE",
    "StopDecision",
    "StopReason",
    "StopTracker",
    "early_stopped_verdict",
    "missing_metric_verdict",
]

StopReason = Literal["none", "non_finite", "stopping_threshold", "divergence_threshold", "patience"]


@dataclasses.dataclass(frozen=True)
class StopDecision:
    """What one evaluation concluded."""

    stop: bool
    improved: bool
    reason: StopReason
    message: str
    new_best: bool = False


class StopTracker:
    """Tracks the best value and the patience counter of one monitored quantity.

    Args:
        mode: ``"min"`` when lower is better, ``"max"`` when higher is better.
        min_delta: the margin by which a value must beat the best to count as an improvement (``>= 0``).
        patience: evaluations without improvement before stopping.
        check_finite: stop on a NaN/Inf value.
        stopping_threshold: stop as soon as the value is better than this.
        divergence_threshold: stop as soon as the value is worse than this.
        baseline: the patience counter resets only on values that also beat this.
        name: the monitored key, used in messages.
    """

    def __init__(
        self,
        mode: Literal["min", "max"] = "min",
        min_delta: float = 0.0,
        patience: int = 3,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        baseline: float | None = None,
        name: str = "metric",
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}.")
        self.mode = mode
        self.min_delta = min_delta
        self.patience = patience
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.baseline = baseline
        self.name = name
        self.best = math.inf if mode == "min" else -math.inf
        self.best_seen = self.best
        #: where (the ``at`` label given to :meth:`update`, an epoch for EarlyStop) ``best`` and ``best_seen`` were
        self.best_at: int | None = None
        self.best_seen_at: int | None = None
        self.wait_count = 0
        self.num_updates = 0

    def better(self, a: float, b: float, margin: float = 0.0) -> bool:
        """Whether ``a`` beats ``b`` by more than ``margin`` in this mode."""
        return a < b - margin if self.mode == "min" else a > b + margin

    def update(self, value: float, at: int | None = None) -> StopDecision:
        """Consume one evaluation of the monitored value; ``at`` labels it (EarlyStop passes the epoch) so the
        messages can say where the patience reference and the best value were seen.
        """
        self.num_updates += 1
        new_best = math.isfinite(value) and self.better(value, self.best_seen)
        if new_best:
            self.best_seen, self.best_seen_at = value, at
        before = self.best
        decision = self._decide(value)
        if self.best != before:
            self.best_at = at
        return dataclasses.replace(decision, new_best=new_best)

    def _decide(self, value: float) -> StopDecision:
        sign = "<" if self.mode == "min" else ">"
        if self.check_finite and not math.isfinite(value):
            return StopDecision(
                True,
                False,
                "non_finite",
                f"`{self.name}` = {value} is not finite; previous best {self.best:.6g}.",
            )
        if self.stopping_threshold is not None and self.better(value, self.stopping_threshold):
            return StopDecision(
                True,
                False,
                "stopping_threshold",
                f"Stopping threshold reached: `{self.name}` = {value:.6g} {sign} {self.stopping_threshold:.6g}.",
            )
        if self.divergence_threshold is not None and self.better(self.divergence_threshold, value):
            worse = ">" if self.mode == "min" else "<"
            return StopDecision(
                True,
                False,
                "divergence_threshold",
                f"Divergence threshold reached: `{self.name}` = {value:.6g} {worse} {self.divergence_threshold:.6g}.",
            )
        if self.better(value, self.best, self.min_delta):
            self.best = value
            if self.baseline is None or self.better(value, self.baseline):
                self.wait_count = 0
                return StopDecision(False, True, "none", f"`{self.name}` improved to {value:.6g}.")
            self.wait_count += 1
            if self.wait_count >= self.patience:
                return StopDecision(True, True, "patience", self._patience_message())
            return StopDecision(
                False,
                True,
                "none",
                f"`{self.name}` improved to {value:.6g} but not beyond baseline {self.baseline:.6g}.",
            )
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return StopDecision(True, False, "patience", self._patience_message())
        return StopDecision(
            False,
            False,
            "none",
            f"`{self.name}` = {value:.6g} did not beat {self.best:.6g} by more than {self.min_delta}"
            f" ({self.wait_count}/{self.patience}).",
        )

    def _patience_message(self) -> str:
        """Which value the patience counted from (and where), for how long, and the best value seen when it is a
        different one (better than the reference by less than ``min_delta``: it did not reset the patience).
        """
        bar = f" (nor baseline {self.baseline:.6g})" if self.baseline is not None else ""
        where = f" at epoch {self.best_at}" if self.best_at is not None else ""
        message = (
            f"`{self.name}` did not beat {self.best:.6g}{where} by more than {self.min_delta}{bar} for "
            f"{self.wait_count} evaluation(s) (patience {self.patience}, counted from that value)"
        )
        if self.best_seen != self.best:
            seen = f" at epoch {self.best_seen_at}" if self.best_seen_at is not None else ""
            message += (
                f"; the best value seen, {self.best_seen:.6g}{seen}, beat it by less than `min_delta` and did not "
                "reset the patience"
            )
        return message + "."

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": float(self.best),
            "best_seen": float(self.best_seen),
            "wait_count": int(self.wait_count),
            "num_updates": int(self.num_updates),
            "best_at": self.best_at,
            "best_seen_at": self.best_seen_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", self.best))
        self.best_seen = float(state.get("best_seen", self.best_seen))
        self.wait_count = int(state.get("wait_count", self.wait_count))
        self.num_updates = int(state.get("num_updates", self.num_updates))
        for key in ("best_at", "best_seen_at"):
            if state.get(key) is not None:
                setattr(self, key, int(state[key]))


STOP_ADVICE = {
    "patience": [
        "The monitored metric stopped improving: more epochs are unlikely to help with the current settings.",
        "If it stopped too soon, raise `patience` or lower `min_delta`; if the curve was still noisy, smooth it "
        "(evaluate on more data) before trusting the stop.",
    ],
    "stopping_threshold": ["The target set by `stopping_threshold` was reached."],
    "divergence_threshold": [
        "The monitored metric crossed `divergence_threshold`: training was diverging.",
        "Likely causes: learning rate too high, no warmup, exploding gradients. Try a lower learning rate, a "
        "warmup (WarmupCosine) or gradient clipping (GradClip).",
    ],
    "non_finite": [
        "The monitored metric became NaN/Inf: the model or the loss produced non-finite values.",
        "Likely causes: learning rate too high, log of zero or division by zero in the loss, fp16 overflow. "
        "Add NaNGuard to find the first module that produced the non-finite value.",
    ],
}


def early_stopped_verdict(
    decision: StopDecision,
    monitor: str,
    value: float,
    *,
    stopped_epoch: int,
    best_seen: float,
    best_epoch: int | None,
    wait_count: int,
    patience: int,
    restores: bool,
) -> Verdict:
    """Why training stopped, and the best value seen: the one whose weights are kept when ``restores`` (the
    patience reference can differ from it by less than ``min_delta``; the message names both, one number each).
    A stop on divergence or a non-finite value is a warning; the others info.
    """
    kept = ""
    if restores and best_epoch is not None and math.isfinite(best_seen):
        kept = f" Best {best_seen:.6g} at epoch {best_epoch}: the weights restored."
    severity: Severity = "warning" if decision.reason in ("divergence_threshold", "non_finite") else "info"
    return Verdict(
        "early_stopped",
        severity,
        f"Training stopped at epoch {stopped_epoch}: {decision.message}{kept}",
        {
            "monitor": monitor,
            "reason": decision.reason,
            "value": value,
            "best_score": best_seen,
            "best_epoch": -1 if best_epoch is None else best_epoch,
            "stopped_epoch": stopped_epoch,
            "wait_count": wait_count,
            "patience": patience,
        },
        list(STOP_ADVICE[decision.reason]),
    )


def missing_metric_verdict(monitor: str, checks: int, logged: Sequence[str]) -> Verdict:
    """A monitored key that was never logged (non-strict): nothing was judged; a close key is suggested."""
    close = difflib.get_close_matches(monitor, list(logged), n=1)
    return Verdict(
        "missing_metric",
        "info",
        f"EarlyStop monitored `{monitor}`, which was never logged ({checks} checks): "
        f"it never judged the run. Logged: {', '.join(f'`{k}`' for k in logged) or 'nothing'}.",
        {"metric": monitor, "checks": checks, "logged": ", ".join(logged)},
        [f"Did you mean `{close[0]}`?"] if close else [f"Log it with `self.log({monitor!r}, ...)`."],
    )
