"""NaNGuard's escalation policy: what to do with a bad optimizer step, as a small checkpointable state machine.

:meth:`GuardPolicy.update` takes the step's :class:`StepFlags` (already agreed by every rank) and returns a
:class:`Decision`; it keeps the counters that escalation depends on. Nothing here touches a model: the callback
acts on the decision (zeroes the gradients, restores the snapshot, raises), so the rules can be tested as plain
decision tables (``tests/core/test_guard.py``).

Rules, for a step whose flags show a non-finite value (policy ``action``) or a spike (policy ``spike_action``):

* ``"skip"`` escalates to ``escalate_to`` when the parameters themselves are non-finite (a skip cannot cure
  them) or after ``max_consecutive_skips`` consecutive skips;
* ``"rollback"`` escalates to ``"raise"`` when there is no snapshot yet or ``max_rollbacks`` were used;
* a good step resets the run of skips, and is the moment to take a snapshot every ``snapshot_every_n_steps``
  good steps (only when a rollback can happen at all).

``hold_steps`` in a decision is how many optimizer steps the learning-rate schedule must not count: 1 for a skip,
and for a rollback every step that advanced since the snapshot plus this one (the schedule goes back with the
weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal

__all__ = [
    "ACTIONS",
    "Action",
    "Decision",
    "GuardPolicy",
    "StepFlags",
    "back_off_lr",
    "never_rolls_back",
    "never_skips",
    "no_rollback_text",
    "no_skip_text",
]

Action = Literal["warn", "skip", "rollback", "raise"]
ACTIONS: tuple[Action, ...] = ("warn", "skip", "rollback", "raise")


@dataclasses.dataclass(frozen=True)
class StepFlags:
    """What one optimizer step showed (the same on every rank)."""

    input: bool = False
    loss: bool = False
    grads: bool = False
    params: bool = False
    #: finite gradients whose total norm overflows float32: handled like a non-finite step
    norm_overflow: bool = False
    loss_spike: bool = False
    grad_spike: bool = False

    @property
    def non_finite(self) -> bool:
        return self.input or self.loss or self.grads or self.params or self.norm_overflow

    @property
    def spike(self) -> bool:
        return self.loss_spike or self.grad_spike

    @property
    def code(self) -> str | None:
        """The finding code the flags alone imply (a located origin may refine it)."""
        if self.input:
            return "non_finite_input"
        if self.params:
            return "non_finite_parameters"
        if self.loss:
            return "non_finite_loss"
        if self.grads:
            return "non_finite_gradients"
        if self.norm_overflow or self.grad_spike:
            return "exploding_gradients"
        if self.loss_spike:
            return "loss_spike"
        return None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do with the step: ``action`` is ``None`` for a good step."""

    action: Action | None
    code: str | None = None
    #: the policy asked for something else (a skip that became a rollback or a raise, ...)
    escalated: bool = False
    #: take a rollback snapshot now, before the update (good steps only)
    snapshot_due: bool = False
    #: optimizer steps the LR schedule must not count
    hold_steps: int = 0
    #: the policy asked for before escalation, and why it could not be followed: ``"params"`` (non-finite
    #: parameters: a skip cannot cure them), ``"skips"`` (``max_consecutive_skips`` reached), ``"no_snapshot"``,
    #: ``"rollbacks"`` (``max_rollbacks`` used up)
    requested: Action | None = None
    why: str = ""

    @property
    def withholds_update(self) -> bool:
        return self.action in ("skip", "rollback")


class GuardPolicy:
    """The escalation rules of NaNGuard (see the module docstring); its counters are its ``state_dict``."""

    def __init__(
        self,
        action: Action = "skip",
        spike_action: Action = "warn",
        max_consecutive_skips: int = 5,
        escalate_to: Literal["rollback", "raise"] = "raise",
        snapshot_every_n_steps: int = 100,
        max_rollbacks: int = 3,
    ) -> None:
        self.action = action
        self.spike_action = spike_action
        self.max_consecutive_skips = max_consecutive_skips
        self.escalate_to = escalate_to
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.max_rollbacks = max_rollbacks
        self.reset()

    def reset(self) -> None:
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.good_since_snapshot = 0
        self.snapshot_step: int | None = None
        self.has_snapshot = False
        # steps since the model was last at the snapshot's state whose update went ahead (the schedule advanced)
        self.advanced = 0

    @property
    def rollback_possible(self) -> bool:
        """Whether a rollback can happen at all (then snapshots are taken)."""
        policies = {self.action, self.spike_action}
        return "rollback" in policies or ("skip" in policies and self.escalate_to == "rollback")

    @property
    def snapshot_due(self) -> bool:
        """Whether the next good step takes a snapshot (known before the step is judged)."""
        return self.rollback_possible and self.good_since_snapshot >= self.snapshot_every_n_steps

    def deferral(
        self, *, spikes_checked: bool, fused: bool, scaled: bool
    ) -> Literal["warn", "device"] | None:
        """Whether a step's checks can wait for the next logging step (no host synchronisation per step):
        ``"warn"`` when nothing has to be decided before the update; ``"device"`` when a skip can be decided on the
        device (``action="skip"`` escalating only to ``"raise"``, an optimizer whose fused kernel takes a
        device-side ``found_inf``, no GradScaler); ``None`` when the decision needs a host read first (a spike
        policy other than ``"warn"``, a possible rollback).
        """
        if (spikes_checked and self.spike_action != "warn") or self.rollback_possible:
            return None
        if self.action == "warn":
            return "warn"
        if self.action == "skip" and self.escalate_to == "raise" and fused and not scaled:
            return "device"
        return None

    def snapshot_taken(self, step: int, *, keep_schedule: bool = False) -> None:
        """A snapshot of the model at ``step`` exists now. ``keep_schedule``: a resumed run's fresh snapshot keeps
        the saved snapshot schedule (``snapshot_step`` and the count of good steps since).
        """
        self.has_snapshot = True
        self.advanced = 0
        if not keep_schedule:
            self.good_since_snapshot = 0
            self.snapshot_step = step
        elif self.snapshot_step is None:
            self.snapshot_step = step

    def resolve(self, requested: Action, *, cannot_skip: bool = False) -> Action:
        """The policy that applies now to ``requested``, after escalation (does not change any counter)."""
        return self._escalate(requested, cannot_skip=cannot_skip)[0]

    def _escalate(self, requested: Action, *, cannot_skip: bool = False) -> tuple[Action, str]:
        action, why = requested, ""
        if action == "skip" and (cannot_skip or self.consecutive_skips >= self.max_consecutive_skips):
            action, why = self.escalate_to, "params" if cannot_skip else "skips"
        if action == "rollback" and (not self.has_snapshot or self.rollbacks >= self.max_rollbacks):
            action, why = "raise", "no_snapshot" if not self.has_snapshot else "rollbacks"
        return action, why

    def update(self, flags: StepFlags, step: int) -> Decision:
        """Judge one optimizer step and keep the counters; ``step`` is the global step (for snapshots)."""
        if not (flags.non_finite or flags.spike):
            due = self.snapshot_due
            self.consecutive_skips = 0
            if due:
                self.snapshot_taken(step)
            if self.rollback_possible:
                self.good_since_snapshot += 1
            self.advanced += 1
            return Decision(None, snapshot_due=due)
        requested = self.action if flags.non_finite else self.spike_action
        action, why = self._escalate(requested, cannot_skip=flags.non_finite and flags.params)
        hold = self._apply(action)
        return Decision(
            action, flags.code, action != requested, hold_steps=hold, requested=requested, why=why
        )

    def _apply(self, action: Action) -> int:
        """Update the counters for ``action``; returns the steps the schedule must hold."""
        if action == "warn":
            self.consecutive_skips = 0
            self.advanced += 1
            return 0
        if action == "raise":
            return 0
        self.skipped_steps += 1
        if action == "skip":
            self.consecutive_skips += 1
            return 1
        hold = self.advanced + 1  # back to the snapshot: the steps it advanced since, and this one
        self.rollbacks += 1
        self.consecutive_skips = 0
        self.good_since_snapshot = 0
        self.advanced = 0
        return hold

    def report_series(self, lr_backoff: float) -> dict[str, Any]:
        """What the policy did in this fit, for the HTML report (rollbacks mark their LR back-off on the
        schedule); empty when it never withheld an update.
        """
        if not (self.skipped_steps or self.rollbacks):
            return {}
        return {
            "nan_guard": {
                "skipped_steps": self.skipped_steps,
                "rollbacks": self.rollbacks,
                "lr_backoff": lr_backoff,
            }
        }

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "rollbacks": self.rollbacks,
            "good_since_snapshot": self.good_since_snapshot,
            "snapshot_step": self.snapshot_step,
            "advanced": self.advanced,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("skipped_steps", "consecutive_skips", "rollbacks", "good_since_snapshot", "advanced"):
            if key in state:
                setattr(self, key, int(state[key]))
        if state.get("snapshot_step") is not None:
            self.snapshot_step = int(state["snapshot_step"])


def back_off_lr(optimizers: Iterable[Any], schedulers: Iterable[Any], factor: float) -> None:
    """Multiply the learning rates by ``factor`` in a way the schedules keep.

    Every param group's ``lr`` (and ``initial_lr``, which torch schedulers restart from) and every scheduler's
    ``base_lrs`` are scaled, so the back-off survives the scheduler's next step.
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
    for scheduler in schedulers:
        base_lrs = getattr(scheduler, "base_lrs", None)
        if isinstance(base_lrs, list):
            scheduler.base_lrs = [lr * factor for lr in base_lrs]


# -- the settings a NaNGuard's policies never read (its ``check_unused`` table: the rule and its words) -----------
def _policies(given: Mapping[str, Any]) -> set[str]:
    return {given["action"]} | ({given["spike_action"]} if given["check_spikes"] else set())


def _policies_text(given: Mapping[str, Any]) -> str:
    names = ("action", "spike_action") if given["check_spikes"] else ("action",)
    return " and ".join(f"`{n}={given[n]!r}`" for n in names)


def never_skips(given: Mapping[str, Any]) -> bool:
    """No policy of the NaNGuard arguments ``given`` skips a step (``spike_action`` counts when spikes are checked)."""
    return "skip" not in _policies(given)


def never_rolls_back(given: Mapping[str, Any]) -> bool:
    """No policy of the NaNGuard arguments ``given`` rolls back, nor escalates a skip to a rollback."""
    policies = _policies(given)
    return "rollback" not in policies and not ("skip" in policies and given["escalate_to"] == "rollback")


def no_skip_text(given: Mapping[str, Any]) -> str:
    """Why the skip settings have no effect, e.g. "`action='warn'` (nothing is ever skipped)"."""
    return f"{_policies_text(given)} (nothing is ever skipped)"


def no_rollback_text(given: Mapping[str, Any]) -> str:
    """Why the rollback settings have no effect, with ``escalate_to`` when a skip could have escalated."""
    escalate = f" and `escalate_to={given['escalate_to']!r}`" if "skip" in _policies(given) else ""
    return f"{_policies_text(given)}{escalate} (no rollback can happen)"
