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
import math
from typing import Any, Literal

__all__ = ["StopDecision", "StopReason", "StopTracker"]

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
        self.wait_count = 0
        self.num_updates = 0

    def better(self, a: float, b: float, margin: float = 0.0) -> bool:
        """Whether ``a`` beats ``b`` by more than ``margin`` in this mode."""
        return a < b - margin if self.mode == "min" else a > b + margin

    def update(self, value: float) -> StopDecision:
        """Consume one evaluation of the monitored value."""
        self.num_updates += 1
        new_best = math.isfinite(value) and self.better(value, self.best_seen)
        if new_best:
            self.best_seen = value
        return dataclasses.replace(self._decide(value), new_best=new_best)

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
        bar = f" and baseline {self.baseline:.6g}" if self.baseline is not None else ""
        return (
            f"`{self.name}` did not improve by more than {self.min_delta} over its best{bar} for "
            f"{self.wait_count} evaluation(s) (patience {self.patience}); best {self.best:.6g}."
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": float(self.best),
            "best_seen": float(self.best_seen),
            "wait_count": int(self.wait_count),
            "num_updates": int(self.num_updates),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state.get("best", self.best))
        self.best_seen = float(state.get("best_seen", self.best_seen))
        self.wait_count = int(state.get("wait_count", self.wait_count))
        self.num_updates = int(state.get("num_updates", self.num_updates))
