"""HangWatchdog's rules and their words: phase budgets, hangs, uneven batches, stragglers, step-time outliers.

**Phases.** A training run moves through phases, each started by a heartbeat (a Lightning hook): start-up, waiting
for data, training step (forward and loss), backward, optimizer step, validation, checkpoint save, end of epoch,
teardown. :data:`PHASES` maps the internal keys to the names users read; the first batch of an epoch (worker
start-up), the first batch of a validation run and its epoch end have keys of their own, with the same names.
Validation has a heartbeat per batch: its budget bounds one batch (its data and its step), not the whole run.

**Budgets** (:class:`PhaseBudgets`). A phase that lasts longer than its budget is a hang. Budgets are learned from
the run, per phase: ``clamp(safety_factor x the longest interval seen in that phase, min_timeout_s,
max_timeout_s)`` (NVIDIA's resiliency extension uses 5x the longest observed heartbeat interval). Until the first
training batch has completed, the training phases get ``first_step_timeout_s`` (compilation, caches, worker
start-up, process-group start: torchtitan gives 300 s to the first step, then 100 s) and the first step is not
learned from. A phase not seen yet (the first validation run, the first checkpoint) gets ``first_step_timeout_s``
too. Explicit overrides replace the learned budget of their phases: ``step_timeout_s`` (waiting for data, training
step, backward, optimizer step), ``validation_timeout_s``, ``checkpoint_timeout_s``. Start-up, teardown and the
epoch-end hooks (training's, validation's: ``validation_timeout_s`` when given) are never learned: they get
``first_step_timeout_s``.

**Findings.** :func:`training_hang` (error while stuck; a warning once the run resumed: the stall cost that much
time), :func:`uneven_batches` (error: DDP would hang at the end of the shortest epoch; a warning when ``max_steps``
ends training first), :class:`StragglerRule` (``straggler``: info after 2 consecutive checks, warning after
``patience``), :class:`StepOutliers` (``step_time_outlier``, info).

Everything here is stdlib only: the callback measures, this module decides and words.

Example:
    >>> budgets = PhaseBudgets(BudgetSettings(min_timeout_s=10.0, first_step_timeout_s=300.0))
    >>> budgets.budget("step")  # before the first training batch completed
    300.0
    >>> budgets.start_training()
    >>> budgets.observe("step", 0.5); budgets.budget("step")  # 5 x 0.5 s, clamped to at least 10 s
    10.0
    >>> budgets.observe("step", 4.0); budgets.budget("step")
    20.0
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_diag.core.verdict import Verdict

__all__ = [
    "CHECKPOINT_PHASES",
    "FIXED_PHASES",
    "FOREIGN_TIMER",
    "PHASES",
    "TRAINING_PHASES",
    "VALIDATION_PHASES",
    "BudgetSettings",
    "HangEvent",
    "PhaseBudgets",
    "RankBeat",
    "StepOutliers",
    "StragglerRule",
    "hang_error_message",
    "rank_behind",
    "training_hang",
    "uneven_batches",
]

#: internal phase key -> the name a user reads
PHASES: dict[str, str] = {
    "startup": "start-up",
    "data_first": "waiting for data",
    "data": "waiting for data",
    "step": "training step",
    "backward": "backward",
    "optimizer": "optimizer step",
    "val_first": "validation",
    "val": "validation",
    "val_end": "validation",
    "epoch_end": "end of epoch",
    "checkpoint": "checkpoint save",
    "teardown": "teardown",
}
TRAINING_PHASES = ("data", "step", "backward", "optimizer")
VALIDATION_PHASES = ("val_first", "val", "val_end")
CHECKPOINT_PHASES = ("checkpoint",)
#: never learned: once per run or per epoch, and free to take far longer than anything seen before (an epoch-end
#: hook that computes a metric over the whole validation set; the sanity check's epoch end saw two batches)
FIXED_PHASES = ("startup", "teardown", "epoch_end", "val_end")
_WARMUP_PHASES = (*TRAINING_PHASES, "data_first")


@dataclasses.dataclass(frozen=True)
class BudgetSettings:
    """The arguments of the budget rule (HangWatchdog's constructor arguments of the same names)."""

    safety_factor: float = 5.0
    min_timeout_s: float = 120.0
    max_timeout_s: float = 1800.0
    first_step_timeout_s: float = 600.0
    step_timeout_s: float | None = None
    validation_timeout_s: float | None = None
    checkpoint_timeout_s: float | None = None

    def override(self, phase: str) -> tuple[str, float] | None:
        """The explicit override that applies to ``phase``, as ``(argument name, seconds)``, or ``None``."""
        if phase in TRAINING_PHASES and self.step_timeout_s is not None:
            return "step_timeout_s", self.step_timeout_s
        if phase in VALIDATION_PHASES and self.validation_timeout_s is not None:
            return "validation_timeout_s", self.validation_timeout_s
        if phase in CHECKPOINT_PHASES and self.checkpoint_timeout_s is not None:
            return "checkpoint_timeout_s", self.checkpoint_timeout_s
        return None

    @property
    def smallest_s(self) -> float:
        """The smallest budget any phase can get (the watchdog thread polls at a fraction of it)."""
        given = (self.step_timeout_s, self.validation_timeout_s, self.checkpoint_timeout_s)
        return min(self.min_timeout_s, self.first_step_timeout_s, *(g for g in given if g is not None))


class PhaseBudgets:
    """The budget of every phase, learned from the intervals observed (the rule is in the module docstring).

    :meth:`observe` and :meth:`budget` are the per-heartbeat path: a dict read and a comparison.
    """

    def __init__(self, settings: BudgetSettings) -> None:
        self.settings = settings
        self.longest: dict[str, float] = {}
        self.warm = False
        self._budgets: dict[str, float] = {}
        self._refresh()

    def observe(self, phase: str, seconds: float) -> None:
        """Learn from one interval spent in ``phase`` (training phases only once the first batch completed)."""
        if seconds > self.longest.get(phase, 0.0) and (self.warm or phase not in TRAINING_PHASES):
            self.longest[phase] = seconds
            self._budgets[phase] = self._compute(phase)

    def budget(self, phase: str) -> float:
        """Seconds ``phase`` may last before it is a hang."""
        return self._budgets[phase]

    def start_training(self) -> None:
        """The first training batch completed: training phases get learned budgets from now on."""
        if not self.warm:
            self.warm = True
            self._refresh()

    def _refresh(self) -> None:
        self._budgets = {phase: self._compute(phase) for phase in PHASES}

    def _compute(self, phase: str) -> float:
        s = self.settings
        if not self.warm and phase in _WARMUP_PHASES:
            return s.first_step_timeout_s
        override = s.override(phase)
        if override is not None:
            return override[1]
        longest = None if phase in FIXED_PHASES else self.longest.get(phase)
        if longest is None:
            return s.first_step_timeout_s
        return min(max(s.safety_factor * longest, s.min_timeout_s), s.max_timeout_s)

    def explain(self, phase: str) -> str:
        """How the budget of ``phase`` was set, in words (for the finding)."""
        s = self.settings
        if not self.warm and phase in _WARMUP_PHASES:
            return "`first_step_timeout_s`: the first training batch had not completed"
        override = s.override(phase)
        if override is not None:
            return f"`{override[0]}`"
        if phase in FIXED_PHASES:
            return "`first_step_timeout_s`"
        longest = self.longest.get(phase)
        if longest is None:
            return "`first_step_timeout_s`: this phase had not been seen yet"
        return (
            f"{s.safety_factor:g} x the longest `{PHASES[phase]}` interval seen ({longest:.3g} s), clamped to "
            f"[`min_timeout_s`={s.min_timeout_s:g}, `max_timeout_s`={s.max_timeout_s:g}]"
        )

    def argument_for(self, phase: str) -> str:
        """The constructor argument that raises the budget of ``phase``."""
        if (not self.warm and phase in _WARMUP_PHASES) or phase in ("startup", "teardown", "epoch_end"):
            return "first_step_timeout_s"
        if phase in VALIDATION_PHASES:
            return "validation_timeout_s"
        if phase in CHECKPOINT_PHASES:
            return "checkpoint_timeout_s"
        return "step_timeout_s" if phase in TRAINING_PHASES else "min_timeout_s"


# -- hangs ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RankBeat:
    """What one rank's heartbeat file said when a hang fired (``age_s``: since that rank's last heartbeat)."""

    rank: int
    beats: int
    step: int
    phase: str
    age_s: float
    #: seconds since the file itself was last written (its watchdog thread writes it every poll: a large value
    #: means that rank's interpreter is blocked, e.g. a C call holding the GIL); ``nan`` when unknown
    stale_s: float = math.nan


def rank_behind(beats: Sequence[RankBeat], world_size: int) -> tuple[int | None, str]:
    """The rank that is behind (fewest heartbeats: every rank passes the same phases in the same order), or
    ``None`` when the ranks are level or some rank left no heartbeat; and every rank's position, in words.
    """
    seen = {b.rank: b for b in beats}
    parts = []
    for rank in range(world_size):
        b = seen.get(rank)
        if b is None:
            parts.append(f"rank {rank}: no heartbeat file")
            continue
        text = f"rank {rank}: step {b.step}, `{PHASES.get(b.phase, b.phase)}` for {b.age_s:.1f} s"
        if math.isfinite(b.stale_s) and b.stale_s > 2.0:
            text += f" (its watchdog thread silent for {b.stale_s:.0f} s: interpreter blocked)"
        parts.append(text)
    if len(seen) < world_size or len(seen) < 2:
        return None, "; ".join(parts)
    fewest = min(b.beats for b in beats)
    behind = [b.rank for b in beats if b.beats == fewest]
    return (behind[0] if len(behind) == 1 else None), "; ".join(parts)


@dataclasses.dataclass
class HangEvent:
    """What the watchdog saw when a phase overran its budget (plain values; the callback fills them in)."""

    phase: str  # internal key (:data:`PHASES`)
    step: int
    waited_s: float
    budget_s: float
    budget_rule: str
    budget_argument: str
    main_frame: str  # innermost frame of the main thread ("file:line in function: code")
    user_frame: str  # innermost frame outside Python's, torch's, Lightning's and lightning_diag's own files
    dump: str  # path of the stack dump
    rank: int = 0
    world_size: int = 1
    rank_behind: int | None = None
    ranks: str = ""
    detected_by: str = "watchdog thread"  # or "faulthandler timer"
    worker_pids: tuple[int, ...] = ()
    action: str = "warn"
    resumed_after_s: float | None = None
    #: seconds the watchdog thread itself could not run before it saw the dump (the GIL was held)
    blocked_s: float = 0.0


_PHASE_ADVICE: dict[str, str] = {
    "startup": "Start-up waits for the process group (every rank must start, MASTER_ADDR/MASTER_PORT reachable), "
    "for the data set to load, or for compilation.",
    "data": "A DataLoader worker is stuck or died (a deadlock or a network read without timeout in `__getitem__`, "
    "a worker killed for memory): pass `DataLoader(timeout=...)` so a stuck worker raises, and dump the workers' "
    "stacks with `py-spy dump --pid <pid>`.",
    "step": "The main thread's frame above is where it waits: a host-device synchronisation (`.item()`, `.cpu()`, "
    "`print(tensor)`) behind a kernel that never ends, a lock, a read without timeout.",
    "backward": "Under DDP the backward pass ends in the gradient all-reduce: a rank waits there for the rank that "
    "never reached it (fewer batches, a branch only some ranks take, an exception swallowed on that rank). "
    "`TORCH_DISTRIBUTED_DEBUG=DETAIL` reports mismatched collectives.",
    "optimizer": "The optimizer step (and gradient clipping, LR schedulers, callbacks' `on_before_optimizer_step`) "
    "waits: a collective only some ranks reach, or a host-device synchronisation.",
    "val": "Validation waits: a metric synced across ranks (`self.log(..., sync_dist=True)`, torchmetrics' "
    "`compute()`) inside a branch only some ranks take, or validation sets of different lengths per rank.",
    "epoch_end": "An end-of-epoch hook waits (`on_train_epoch_end` of the LightningModule or a callback, an "
    "epoch-interval LR scheduler): a collective inside a branch only some ranks take, or heavy work on one rank.",
    "checkpoint": "The checkpoint write waits: a slow or full filesystem, or a rank that does not reach the "
    "barrier after the save.",
    "teardown": "Teardown waits: DataLoader workers or logger processes that do not exit, or a rank stuck in "
    "the process group's shutdown.",
}


def _advice_key(phase: str) -> str:
    return {"data_first": "data", "val_first": "val", "val_end": "val"}.get(phase, phase)


def training_hang(event: HangEvent) -> Verdict:
    """``training_hang``: error while the run is stuck; a warning once it resumed (the stall cost that time)."""
    name = PHASES.get(event.phase, event.phase)
    resumed = event.resumed_after_s is not None
    waiting = f"{event.waited_s:.1f} s in `{name}` at step {event.step} (budget {event.budget_s:.3g} s: {event.budget_rule})"
    other = event.rank_behind is not None and event.rank_behind != event.rank
    if event.world_size > 1 and other:
        message = f"Rank {event.rank_behind} is behind: rank {event.rank} has waited for it for {waiting}"
    elif event.world_size > 1:
        message = f"No progress on rank {event.rank} for {waiting}"
    else:
        message = f"No progress for {waiting}"
    message += _hang_details(event, other)
    evidence: dict[str, Any] = {
        "phase": name,
        "step": event.step,
        "waited_s": round(event.waited_s, 3),
        "budget_s": round(event.budget_s, 3),
        "budget_rule": event.budget_rule,
        "main_frame": event.main_frame,
        "user_frame": event.user_frame,
        "dump": event.dump,
        "detected_by": event.detected_by,
        "rank": event.rank,
    }
    if event.blocked_s > 1.0:
        evidence["interpreter_blocked_s"] = round(event.blocked_s, 3)
    if event.world_size > 1:
        evidence["rank_behind"] = -1 if event.rank_behind is None else event.rank_behind
        evidence["ranks"] = event.ranks
    if event.worker_pids:
        evidence["worker_pids"] = ", ".join(map(str, event.worker_pids))
    if resumed:
        evidence["resumed_after_s"] = round(float(event.resumed_after_s or 0.0), 3)
    advice = [_PHASE_ADVICE[_advice_key(event.phase)]]
    if other:
        advice.insert(
            0, f"Look at rank {event.rank_behind}'s stacks (hang_rank{event.rank_behind}.txt): it is behind."
        )
    advice.append(
        f"If `{name}` is legitimately this slow, raise its budget: `HangWatchdog({event.budget_argument}=...)`."
    )
    return Verdict("training_hang", "warning" if resumed else "error", message, evidence, advice)


def _hang_details(event: HangEvent, other: bool) -> str:
    """The rest of the hang's message: where the training thread waits, who dumped, the ranks, the outcome."""
    message = f"; the training thread waits at {event.main_frame}"
    if event.user_frame and event.user_frame != event.main_frame:
        message += f", called from {event.user_frame}"
    message += f". Every thread's stack: {event.dump}."
    if event.detected_by == "faulthandler timer":
        if event.blocked_s > 1.0:
            message += (
                f" The watchdog thread could not run for {event.blocked_s:.1f} s (a C call held the GIL): "
                "faulthandler's timer wrote the stacks."
            )
        else:
            message += " faulthandler's timer wrote the stacks."
    if event.world_size > 1:
        if event.rank_behind is None:
            message += f" No single rank is behind ({event.ranks})."
        elif not other:
            message += f" This rank is behind the others ({event.ranks})."
        else:
            message += f" Where each rank is: {event.ranks}."
    if event.worker_pids:
        message += f" DataLoader worker processes: {', '.join(map(str, event.worker_pids))}."
    if event.resumed_after_s is not None:
        message += f" The run resumed after {event.resumed_after_s:.1f} s."
    elif event.action == "raise":
        message += " HangWatchdog raises TrainingHangError if it is still stuck after a second budget."
    return message


def hang_error_message(phase: str, step: int, waited_s: float, budget_s: float, dump: str) -> str:
    """The message of the ``TrainingHangError`` raised after a second budget without progress."""
    return (
        f"HangWatchdog: no progress for {waited_s:.1f} s in `{PHASES.get(phase, phase)}` at step {step} (two budgets "
        f"of {budget_s:.3g} s); every thread's stack: {dump}."
    )


#: the ``declined`` message when faulthandler's one timer is armed by other code (HangWatchdog leaves it alone)
FOREIGN_TIMER = (
    "HangWatchdog: a faulthandler timer armed by other code (e.g. pytest's `faulthandler_timeout`) is active; a "
    "process has only one, and HangWatchdog leaves it alone. Hangs are still reported by its watchdog thread, but a "
    "hang inside a C call that holds the GIL leaves no stack dump."
)


# -- uneven batches -------------------------------------------------------------------------------------------


def uneven_batches(counts: Sequence[float], *, max_steps: int = -1, accumulate: int = 1) -> Verdict | None:
    """``uneven_batches`` when the ranks' numbers of training batches per epoch differ (``None`` when equal).

    Error: the ranks with more batches would run steps the others never join, and the gradient all-reduce of the
    first such step waits forever. A warning when ``max_steps`` (with ``accumulate`` batches per step) ends training
    before the shortest rank's epoch does. Ranks that all stream (infinite length) cannot be compared: ``None``.

    Example:
        >>> uneven_batches([8, 8]) is None
        True
        >>> uneven_batches([8, 9]).severity, uneven_batches([8, 9], max_steps=4).severity
        ('error', 'warning')
    """
    if len(counts) < 2 or len(set(counts)) == 1:
        return None
    stops_first = max_steps >= 0 and max_steps * max(accumulate, 1) <= min(counts)
    shown = ", ".join(f"rank {r}: {_count(c)}" for r, c in enumerate(counts))
    longer = [r for r, c in enumerate(counts) if c > min(counts)]
    shortest = min(counts)
    if stops_first:
        consequence = "`max_steps` ends training before the shortest epoch does, so this run does not hang"
    else:
        consequence = (
            f"after {_count(shortest)} batches the ranks with more ({', '.join(map(str, longer))}) would run a step "
            "the others never join and wait forever in its gradient all-reduce (the classic silent DDP hang). "
            "Training was stopped before its first step on every rank"
        )
    return Verdict(
        "uneven_batches",
        "warning" if stops_first else "error",
        f"The ranks have different numbers of training batches per epoch ({shown}): {consequence}.",
        {
            "batches": ", ".join(_count(c) for c in counts),
            "min_batches": _count(shortest),
            "max_batches": _count(max(counts)),
            "ranks_with_more": ", ".join(map(str, longer)),
        },
        [
            "Let Lightning shard the data (`Trainer(use_distributed_sampler=True)`, the default): its "
            "DistributedSampler gives every rank the same number of samples.",
            "With your own sampler or an IterableDataset, give every rank the same number of batches (drop or pad "
            f"the remainder), or cap them: `Trainer(limit_train_batches={_count(shortest)})`.",
        ],
    )


def _count(value: float) -> str:
    return "inf" if math.isinf(value) else str(int(value))


# -- stragglers -----------------------------------------------------------------------------------------------


class StragglerRule:
    """A rank that arrives late at the gradient all-reduce, step after step (``straggler``).

    At each check every rank gives the medians, over the steps since the last check, of its data wait and of its
    training step (forward and loss): the time *before* the synchronising all-reduce. Backward time cannot be
    compared (the all-reduce levels it: the fast ranks wait inside it). The culprit is the rank with the longest
    data + forward time; its ``gap`` is that minus the median of the other ranks, and ``score = gap / step`` is the
    share of each step every other rank spends waiting for it. A check counts when ``score >= threshold`` and
    ``gap >= min_gap_ms``; ``straggler`` is info after 2 consecutive checks naming the same rank and a warning
    after ``patience`` (the other ranks lose ``score`` of their time: a measured harm). The cause is ``"input"``
    or ``"compute"`` when that part holds at least 80% of the gap, else ``"input and compute"``.
    """

    def __init__(self, threshold: float = 0.1, patience: int = 3, min_gap_ms: float = 2.0) -> None:
        self.threshold = threshold
        self.patience = patience
        self.min_gap_ms = min_gap_ms
        self.rank: int | None = None
        self.streak = 0
        self.first_step = 0
        self.slowest, self.gap_ms = 0, 0.0

    def update(
        self, data_ms: Sequence[float], compute_ms: Sequence[float], step_ms: float, step: int
    ) -> Verdict | None:
        """One check: per-rank medians (index = rank) and the median step time; returns the finding or ``None``."""
        if len(data_ms) < 2 or step_ms <= 0:
            return None
        before = [d + c for d, c in zip(data_ms, compute_ms, strict=True)]
        culprit = max(range(len(before)), key=lambda r: before[r])
        others = [r for r in range(len(before)) if r != culprit]
        gap = before[culprit] - statistics.median(before[r] for r in others)
        self.slowest, self.gap_ms = culprit, gap  # logged at every check
        score = gap / step_ms
        if score < self.threshold or gap < self.min_gap_ms:
            self.rank, self.streak = None, 0
            return None
        if culprit != self.rank:
            self.rank, self.streak, self.first_step = culprit, 0, step
        self.streak += 1
        if self.streak < min(2, self.patience):
            return None
        data_gap = data_ms[culprit] - statistics.median(data_ms[r] for r in others)
        compute_gap = compute_ms[culprit] - statistics.median(compute_ms[r] for r in others)
        return self._verdict(culprit, others, data_ms, compute_ms, gap, score, data_gap, compute_gap, step)

    def _verdict(
        self,
        rank: int,
        others: list[int],
        data_ms: Sequence[float],
        compute_ms: Sequence[float],
        gap: float,
        score: float,
        data_gap: float,
        compute_gap: float,
        step: int,
    ) -> Verdict:
        cause = (
            "input"
            if data_gap >= 0.8 * gap
            else "compute"
            if compute_gap >= 0.8 * gap
            else "input and compute"
        )
        warning = self.streak >= self.patience
        other_data = statistics.median(data_ms[r] for r in others)
        other_compute = statistics.median(compute_ms[r] for r in others)
        message = (
            f"Rank {rank} is {'a straggler' if warning else 'slower than the others'}: before the gradient all-reduce "
            f"it spends {gap:.1f} ms more per step than the other ranks (waiting for data {data_ms[rank]:.1f} vs "
            f"{other_data:.1f} ms, training step {compute_ms[rank]:.1f} vs {other_compute:.1f} ms), so the others wait "
            f"for it: {score:.0%} of every step, at {self.streak} consecutive checks (steps {self.first_step}-{step}). "
            f"The difference is in {cause}."
        )
        advice = {
            "input": f"Rank {rank} waits longer for its batches: fewer or slower DataLoader workers on its node (a "
            "busier machine, a slower disk or network mount), or its shard holds larger samples.",
            "compute": f"Rank {rank}'s forward pass is slower: a slower or throttled device (clocks, temperature: "
            "`nvidia-smi -q -d PERFORMANCE`), another process on its device or CPUs, or larger inputs on that rank "
            "(bucket sequence lengths the same way on every rank).",
        }
        lines = [advice[c] for c in ("input", "compute") if c in cause]
        lines.append(
            "SpeedMonitor on every rank, or the logged `diag/straggler/*` values, show the split over time."
        )
        return Verdict(
            "straggler",
            "warning" if warning else "info",
            message,
            {
                "rank": rank,
                "cause": cause,
                "gap_ms": round(gap, 3),
                "score": round(score, 4),
                "data_wait_ms": round(data_ms[rank], 3),
                "others_data_wait_ms": round(other_data, 3),
                "training_step_ms": round(compute_ms[rank], 3),
                "others_training_step_ms": round(other_compute, 3),
                "checks": self.streak,
            },
            lines,
        )


# -- step-time outliers ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Outlier:
    step: int
    seconds: float
    cause: str


class StepOutliers:
    """``step_time_outlier`` (info): steps far above the median step time, and what coincided with them.

    A step's time runs from one training batch's start to the next one's, minus the time spent in validation and
    checkpoint saves (they have budgets of their own); the first batch of each epoch (worker start-up) is left
    out, and so are the first ``warmup`` steps (compilation, caches). Once ``min_steps`` steps are known, a step is an outlier when it exceeds the median of the last ``window``
    steps by more than ``threshold`` scaled MADs (1.4826 x the median absolute deviation), by at least
    ``min_ratio`` x the median and by at least ``min_excess_s`` (smdebug's StepOutlier uses mean + 3 sigma after
    100 steps; medians are robust to the outliers themselves). Reported once ``min_outliers`` are found. The cause
    of each outlier is what explains at least half of its excess: garbage collection (the collector's pauses during
    the step), waiting for data (its data wait above the median data wait), else the validation run or checkpoint
    save just before it, else compute.
    """

    def __init__(
        self,
        min_steps: int = 100,
        window: int = 1000,
        threshold: float = 6.0,
        min_ratio: float = 2.0,
        min_excess_s: float = 0.02,
        min_outliers: int = 5,
        warmup: int = 5,
    ) -> None:
        self.min_steps = min_steps
        self.warmup = warmup
        self._skipped = 0
        self.threshold = threshold
        self.min_ratio = min_ratio
        self.min_excess_s = min_excess_s
        self.min_outliers = min_outliers
        self._times: deque[float] = deque(maxlen=window)
        self._waits: deque[float] = deque(maxlen=window)
        self._pending: list[tuple[int, float, float, float, str]] = []
        self.seen = 0
        self.outliers: list[_Outlier] = []
        self.excess_s = 0.0
        self.total_s = 0.0

    def add(self, step: int, seconds: float, data_s: float, gc_s: float, after: str = "") -> None:
        """One step (``after``: ``"validation"`` or ``"a checkpoint save"`` when one ran just before it)."""
        if self._skipped < self.warmup:
            self._skipped += 1
            return
        self._times.append(seconds)
        self._waits.append(data_s)
        self._pending.append((step, seconds, data_s, gc_s, after))
        self.seen += 1
        self.total_s += seconds

    def judge(self) -> Verdict | None:
        """Judge the steps added since the last call; the finding once enough outliers are known."""
        if self.seen < self.min_steps:
            return None
        median = statistics.median(self._times)
        mad = 1.4826 * statistics.median(abs(t - median) for t in self._times)
        wait = statistics.median(self._waits)
        bar = max(median + self.threshold * mad, self.min_ratio * median, median + self.min_excess_s)
        for step, seconds, data_s, gc_s, after in self._pending:
            if seconds > bar:
                excess = seconds - median
                self.excess_s += excess
                self.outliers.append(_Outlier(step, seconds, self._cause(excess, data_s - wait, gc_s, after)))
        self._pending = []
        if len(self.outliers) < self.min_outliers:
            return None
        return self._verdict(median)

    @staticmethod
    def _cause(excess: float, extra_wait: float, gc_s: float, after: str) -> str:
        if gc_s >= 0.5 * excess:
            return "garbage collection"
        if extra_wait >= 0.5 * excess:
            return "waiting for data"
        if after:
            return f"right after {after}"
        return "compute"

    def _verdict(self, median: float) -> Verdict:
        causes: dict[str, int] = {}
        for o in self.outliers:
            causes[o.cause] = causes.get(o.cause, 0) + 1
        ranked = sorted(causes.items(), key=lambda kv: -kv[1])
        worst = max(self.outliers, key=lambda o: o.seconds)
        share = self.excess_s / self.total_s if self.total_s > 0 else 0.0
        message = (
            f"{len(self.outliers)} of {self.seen} steps took far longer than the median step ({median * 1e3:.1f} ms; the "
            f"slowest {worst.seconds * 1e3:.0f} ms at step {worst.step}); they cost {self.excess_s:.1f} s ({share:.1%} "
            f"of the training time). Coinciding with: {', '.join(f'{c} ({n})' for c, n in ranked)}."
        )
        advice = [_OUTLIER_ADVICE[c.split(" after ")[0] if c.startswith("right") else c] for c, _ in ranked]
        return Verdict(
            "step_time_outlier",
            "info",
            message,
            {
                "outliers": len(self.outliers),
                "steps": self.seen,
                "median_step_ms": round(median * 1e3, 3),
                "slowest_step_ms": round(worst.seconds * 1e3, 3),
                "slowest_step": worst.step,
                "excess_s": round(self.excess_s, 3),
                "excess_share": round(share, 4),
                "causes": ", ".join(f"{c}: {n}" for c, n in ranked),
                "outlier_steps": ", ".join(str(o.step) for o in self.outliers[:20]),
            },
            list(dict.fromkeys(advice)),
        )

    def state(self) -> Mapping[str, Any]:
        """What the report shows (plain values)."""
        return {"outliers": len(self.outliers), "steps": self.seen, "excess_s": self.excess_s}


_OUTLIER_ADVICE = {
    "garbage collection": "Python's garbage collector pauses the step: call `gc.freeze()` after setup, or disable "
    "automatic collection and collect on a schedule (`gc.disable()` then `gc.collect()` every N steps, outside the "
    "step); avoid reference cycles in the step.",
    "waiting for data": "Some batches take much longer to load: slow files on a network mount, a worker restarting, "
    "a few huge samples; more `num_workers` or a larger `prefetch_factor` absorb occasional slow batches.",
    "right": "The step after a validation run or a checkpoint save is slow: the data pipeline refills its queue "
    "after the pause (`persistent_workers=True`, larger `prefetch_factor`), or the save is still flushing to disk.",
    "compute": "Compute itself is irregular: batches of very different sizes (bucket sequence lengths), "
    "recompilation (`torch.compile` on new shapes), or other processes competing for the CPU or device.",
}
