"""MemoryMonitor's rules and their words: memory that grows, the step that will run out, pressure, fragmentation, and
why an out-of-memory error happened.

Everything here works on plain numbers (bytes, steps) and host-side tensor metadata; nothing reads a device value.

**The between-step baseline.** :class:`MemoryTrend` holds the memory that survives a training step, measured at
the start of logging steps (without the new batch's own bytes) and at the training loop's boundaries: the start and
end of each training epoch and of each validation run. The boundaries cut the measurements into *segments* (the
training steps between two boundaries), and make three records: the growth inside segments (what training steps
keep), the jump across each validation run (what validation keeps) and what each epoch end gives back.

**memory_growth** (:meth:`MemoryTrend.judge`, warning). After warm-up (the first ``ignore_first_steps`` steps, and the
first validation run's jump), over at least ``min_points`` points:

* *per step*: the Theil-Sen slope over pairs of points of the same segment is positive and at least
  :data:`RISING_SHARE` of those pairs rise by more than :data:`NOISE_SHARE` of ``min_growth``; the slope times the
  window's steps is ``min_growth`` or more, at least half of it is still there at the end (median of the last three
  points minus median of the first three) and the epoch ends give back less than :data:`RELEASE_SHARE` of an epoch's
  growth;
* *per epoch* (a saw-tooth): the same rise inside epochs, but each epoch end gives back at least
  :data:`RELEASE_SHARE` of it; the growth of one epoch (slope x steps per epoch) is ``min_growth`` or more;
* *at each validation*: at least 2 validation runs after the first, :data:`RISING_SHARE` of them and the last two
  leave more memory than they found, together ``min_growth`` or more, explaining at least half of the growth since,
  and the training steps after them do not give it back.

A rise over the window that fits none of the three (most pairs of points rising across segments too, the median
of the last three points ``min_growth`` above the first three) is *unattributed*: a candidate only.

Growth seen only in the first epoch may be a cache filling once; it is reported only when it is *confirmed*: it went
on in a later epoch (4 points or more after that epoch's first step, rising at half the rate or more), or the projected exhaustion falls within the run (not for an unattributed rise), or the caller
found the holder of the growth
and it keeps tensors with autograd history (never needed after a step: a certain leak), or the run died of an OOM
(``Growth.confirmed_by``: ``later_epoch``, ``exhaustion_in_run``, ``holder_with_history``, ``run_died``).

**The projected exhaustion step**: per step, ``last step + (capacity - peak) / rate``, the rate being the Theil-Sen
slope over all pairs of the later half of the window (at least 8 points: what accumulates now, the boundaries'
share included); per epoch, the step inside an
epoch where the epoch's growth reaches the capacity (none when an epoch's peak stays below it); at each validation,
the validation run at which the jumps reach it.

**Localisation** (:func:`find_holders`, :func:`pick_holder`), only when growth is found: walk the LightningModule's
attributes (and its submodules', torchmetrics states included), ``trainer.callback_metrics`` and the containers
reachable from them; count the tensors, those with autograd history and their bytes per attribute. Between two
walks the holder is the attribute that gained the most tensors with autograd history, else the most bytes.

**memory_pressure** (info from :data:`PRESSURE_INFO` of the capacity at a step's peak, warning from
:data:`PRESSURE_WARNING`), **memory_fragmentation** (CUDA: allocation retries rose, warning; reserved minus allocated
at peak above :data:`FRAGMENTED_SHARE` of the capacity, info) and **out_of_memory** (error, :func:`oom_verdict`: the
phase, the batch against the median batch, the memory, and advice ordered by the evidence).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch

from lightning_diag.core.batches import iter_tensors
from lightning_diag.core.verdict import Severity, Verdict

__all__ = [
    "FRAGMENTED_SHARE",
    "LONG_BATCH_RATIO",
    "MIB",
    "NOISE_SHARE",
    "PRESSURE_INFO",
    "PRESSURE_WARNING",
    "RELEASE_SHARE",
    "RISING_SHARE",
    "BatchInfo",
    "Growth",
    "Holder",
    "MemoryTrend",
    "as_per_step",
    "as_sawtooth",
    "describe_batch",
    "find_holders",
    "fmt_bytes",
    "fragmentation_verdict",
    "growth_verdict",
    "is_oom",
    "oom_verdict",
    "pick_holder",
    "pressure_verdict",
]

MIB = float(1 << 20)
#: Share of the point pairs (or validation runs) that must rise for a trend.
RISING_SHARE = 0.75
#: A rise (between two points, or across a validation run) must exceed this share of ``min_growth`` to count: RSS
#: creeps by a few pages all the time (Python objects, logging), which is not growth.
NOISE_SHARE = 1 / 64
#: An epoch end that gives back at least this share of the epoch's growth makes the pattern a saw-tooth.
RELEASE_SHARE = 0.5
#: A step's peak at this share of the capacity is ``memory_pressure`` (info)...
PRESSURE_INFO = 0.92
#: ...and at this share a warning: the next longer batch or a fragmented cache may not fit.
PRESSURE_WARNING = 0.97
#: Reserved minus allocated memory at peak, as a share of the capacity, above which the cache is fragmented (info).
FRAGMENTED_SHARE = 0.30
#: A batch this many times the median batch (in elements) is a long batch.
LONG_BATCH_RATIO = 1.5
#: Points kept by :class:`MemoryTrend` (older ones are thinned, so a long run keeps its whole span).
MAX_POINTS = 128

Pattern = Literal["per_step", "per_epoch", "at_validation"]
Kind = Literal["step", "epoch_start", "epoch_end", "val_start", "val_end"]


def fmt_bytes(value: float) -> str:
    """``512 B``, ``12.0 KiB``, ``38.2 MiB``, ``2.14 GiB`` (signed values keep their sign).

    Example:
        >>> fmt_bytes(40 * 2**20), fmt_bytes(3 * 2**30 / 2), fmt_bytes(-2048)
        ('40.0 MiB', '1.50 GiB', '-2.0 KiB')
    """
    sign, size = ("-" if value < 0 else ""), abs(float(value))
    if size >= 1 << 30:
        return f"{sign}{size / (1 << 30):.2f} GiB"
    if size >= 1 << 20:
        return f"{sign}{size / MIB:.1f} MiB"
    if size >= 1 << 10:
        return f"{sign}{size / 1024:.1f} KiB"
    return f"{sign}{size:.0f} B"


# -- the baseline and its growth ----------------------------------------------------------------------------
@dataclasses.dataclass
class Point:
    """One measurement of the baseline (bytes) and the segment of training steps it belongs to."""

    step: int
    epoch: int
    segment: int
    value: float


@dataclasses.dataclass
class Boundary:
    """What one validation run kept (``value`` > 0) or one epoch end gave back (``value`` > 0), in bytes."""

    step: int
    epoch: int
    value: float
    #: steps in the epoch that ended (epoch ends only)
    steps: int = 0


@dataclasses.dataclass
class Growth:
    """A rising baseline, as :meth:`MemoryTrend.judge` found it (bytes and steps)."""

    pattern: Pattern
    #: bytes added per training step (per step, per epoch), or per validation run (at validation)
    rate: float
    #: the growth that makes it worth reporting: over the window (per step), per epoch, or over the validation runs
    size: float
    rising_share: float
    points: int
    first_step: int
    last_step: int
    baseline: float
    peak: float
    capacity: float
    #: the projected step at which the peak reaches the capacity (``None``: not at this pattern's bound)
    exhaustion_step: int | None
    #: why it is certain: "later_epoch", "exhaustion_in_run", "holder_with_history", "run_died" ("": not yet)
    confirmed_by: str = ""
    steps_per_epoch: int = 0
    validations: int = 0
    #: per epoch: the peak an epoch reaches at its end (its start's peak plus an epoch's growth)
    epoch_peak: float = 0.0
    #: a rise over the whole window that neither training steps nor validation runs explain: a candidate that only
    #: a holder with autograd history (or the run dying of an OOM) confirms
    unattributed: bool = False

    @property
    def confirmed(self) -> bool:
        return bool(self.confirmed_by)


def _window(points: Sequence[Point], peak: float, capacity: float) -> dict[str, Any]:
    """The :class:`Growth` fields every pattern fills the same way from the window it judged."""
    return {
        "points": len(points),
        "first_step": points[0].step,
        "last_step": points[-1].step,
        "baseline": points[-1].value,
        "peak": peak,
        "capacity": capacity,
    }


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


class MemoryTrend:
    """The between-step baseline of one fit: points, validation jumps and epoch releases (see the module docstring).

    Example:
        >>> trend = MemoryTrend()
        >>> for step in range(0, 100, 5):  # 1 MiB kept by every step of a first epoch
        ...     trend.add("step", step, epoch=0, value=(100 + step) * MIB)
        >>> growth = trend.judge(min_growth=64 * MIB, capacity=400 * MIB, peak=200 * MIB, total_steps=1000)
        >>> growth.pattern, growth.rate / MIB, growth.exhaustion_step, growth.confirmed_by
        ('per_step', 1.0, 295, 'exhaustion_in_run')
    """

    def __init__(self, max_points: int = MAX_POINTS) -> None:
        self.max_points = max(int(max_points), 16)
        self.points: list[Point] = []
        self.jumps: list[Boundary] = []
        self.releases: list[Boundary] = []
        self._segment = 0
        self._open: tuple[str, int, float] | None = None
        self._epoch_start: int | None = None

    def add(self, kind: Kind, step: int, epoch: int, value: float) -> None:
        """One measurement: ``"step"`` (a logging step), or a boundary: ``"epoch_start"``, ``"epoch_end"``,
        ``"val_start"``, ``"val_end"``.
        """
        step, epoch, value = int(step), int(epoch), float(value)
        opened = self._open
        if kind in ("val_end", "epoch_start"):
            if kind == "val_end" and opened is not None and opened[0] == "val":
                self.jumps.append(Boundary(step, epoch, value - opened[2]))
            if kind == "epoch_start":
                if opened is not None and opened[0] == "epoch":
                    length = opened[1] - (self._epoch_start if self._epoch_start is not None else opened[1])
                    self.releases.append(Boundary(step, epoch, opened[2] - value, max(length, 0)))
                self._epoch_start = step
            self._open = None
            self._segment += 1
        self.points.append(Point(step, epoch, self._segment, value))
        if kind == "val_start":
            self._open = ("val", step, value)
        elif kind == "epoch_end":
            self._open = ("epoch", step, value)
        self._thin()
        del self.jumps[:-64], self.releases[:-64]

    def _thin(self) -> None:
        """Keep at most ``max_points``: drop every other point of the older half (not a segment's first or last)."""
        if len(self.points) <= self.max_points:
            return
        half = len(self.points) // 2
        older, newer = self.points[:half], self.points[half:]
        kept = []
        for i, p in enumerate(older):
            first = i == 0 or older[i - 1].segment != p.segment
            last = i + 1 >= len(older) or older[i + 1].segment != p.segment
            if first or last or i % 2 == 0:
                kept.append(p)
        if len(kept) == len(older):  # every point is a segment's end: drop the oldest instead
            kept = older[len(older) // 4 :]
        self.points = kept + newer

    # -- judgement ----------------------------------------------------------------------------------------
    def judge(
        self,
        *,
        min_growth: float,
        capacity: float,
        peak: float,
        total_steps: float | None = None,
        min_points: int = 8,
        ignore_first_steps: int = 0,
        run_died: bool = False,
    ) -> Growth | None:
        """The growth of the baseline, or ``None`` (see the module docstring for the rules).

        A returned :class:`Growth` whose ``size`` is below ``min_growth`` or that is not ``confirmed`` is a
        candidate: the caller may look for its holder (a holder with autograd history confirms it) but does not
        report it as it is.
        """
        points = [p for p in self.points if p.step >= ignore_first_steps]
        if len(points) < min_points:
            return None
        values = [p.value for p in points]
        if (
            max(values) - min(values) < 0.5 * min_growth
        ):  # the cheap test that keeps a healthy run at O(points)
            return None
        tolerance = min_growth * NOISE_SHARE
        # A rise that goes on through the training steps once each segment has settled (its first points dropped)
        # is growth in training, whatever the validation runs add. Otherwise validation first: on CPU the RSS of the
        # steps right after a validation run often rises with it (pages touched late), which must not turn "at each
        # validation" into "per step".
        settled = _settled(points)
        growth = self._in_training(settled, capacity, peak, tolerance) if len(settled) >= min_points else None
        if growth is None:
            growth = self._at_validation(points, capacity, peak, ignore_first_steps, tolerance)
        if growth is None:
            growth = self._in_training(points, capacity, peak, tolerance)
        if growth is None:
            growth = _unattributed(points, capacity, peak, tolerance)
        if growth is None:
            return None
        if not growth.confirmed_by:
            if run_died:
                growth.confirmed_by = "run_died"
            elif (
                not growth.unattributed
                and growth.exhaustion_step is not None
                and total_steps is not None
                and math.isfinite(total_steps)
                and growth.exhaustion_step <= total_steps
            ):
                growth.confirmed_by = "exhaustion_in_run"
        return growth

    def _in_training(
        self, points: list[Point], capacity: float, peak: float, tolerance: float
    ) -> Growth | None:
        slope, share, pairs = _segment_trend(points, tolerance)
        if pairs < 4 or share < RISING_SHARE or slope <= 0:
            return None
        last = points[-1]
        lengths = [r.steps for r in self.releases if r.steps > 0]
        steps_per_epoch = int(_median(lengths)) if lengths else 0
        releases = [r.value for r in self.releases if r.step > points[0].step]
        per_epoch = slope * steps_per_epoch
        sawtooth = bool(releases) and per_epoch > 0 and _median(releases) >= RELEASE_SHARE * per_epoch
        still_rising = _still_rising(points, slope, tolerance)
        if sawtooth:
            started = self._epoch_start if self._epoch_start is not None else last.step
            peak_at_start = peak - slope * max(last.step - started, 0)
            exhaustion = (
                started + math.ceil(max(capacity - peak_at_start, 0.0) / slope)
                if peak_at_start + per_epoch >= capacity
                else None
            )
            return Growth(
                "per_epoch",
                rate=slope,
                size=per_epoch,
                rising_share=share,
                **_window(points, peak, capacity),
                exhaustion_step=exhaustion,
                confirmed_by="later_epoch" if still_rising else "",
                steps_per_epoch=steps_per_epoch,
                epoch_peak=peak_at_start + per_epoch,
            )
        size = slope * (last.step - points[0].step)
        kept = _median(_tail(points, 3)) - _median([p.value for p in points[:3]])
        if kept < 0.5 * size:  # it rises inside segments but is given back somewhere: not an accumulation
            return None
        # The rate now, for the projection: the later half of the window (a leak that started inside the window
        # has flat pairs before it, which pull the whole window's median slope down), over all its pairs (what
        # accumulates, the boundaries' share included).
        recent = points[-max(8, len(points) // 2) :]
        recent_slope, _, recent_pairs = _segment_trend(recent, tolerance, same_segment=False)
        rate = recent_slope if recent_pairs >= 4 and recent_slope > 0 else slope
        exhaustion = last.step + math.ceil(max(capacity - peak, 0.0) / rate)
        return Growth(
            "per_step",
            rate=rate,
            size=size,
            rising_share=share,
            **_window(points, peak, capacity),
            exhaustion_step=exhaustion,
            confirmed_by="later_epoch" if still_rising else "",
            steps_per_epoch=steps_per_epoch,
        )

    def _at_validation(
        self, points: list[Point], capacity: float, peak: float, ignore_first_steps: int, tolerance: float
    ) -> Growth | None:
        jumps = [j for j in self.jumps[1:] if j.step >= ignore_first_steps]  # the first run allocates its own
        if len(jumps) < 2:
            return None
        rising = sum(j.value > tolerance for j in jumps) / len(jumps)
        if not all(j.value > tolerance for j in jumps[-2:]):  # still growing at the last two runs
            return None
        total = sum(j.value for j in jumps)
        before = [p.value for p in points if p.step < jumps[0].step] or [points[0].value]
        net = points[-1].value - before[-1]
        # the runs explain at least half of the growth since, and training does not give half of it back
        if rising < RISING_SHARE or total <= 0 or not 0.5 * net <= total <= 2.0 * net:
            return None
        per_run = _median([j.value for j in jumps])
        gaps = [b.step - a.step for a, b in zip(self.jumps, self.jumps[1:], strict=False) if b.step > a.step]
        every = _median(gaps) if gaps else 0.0
        exhaustion = None
        if per_run > 0 and every > 0:
            runs_left = math.ceil(max(capacity - peak, 0.0) / per_run)
            exhaustion = jumps[-1].step + int(runs_left * every)
        return Growth(
            "at_validation",
            rate=per_run,
            size=total,
            rising_share=rising,
            **_window(points, peak, capacity),
            exhaustion_step=exhaustion,
            confirmed_by="later_epoch",  # two runs after the first one: it went on after the first epoch
            validations=len(jumps),
        )


def as_sawtooth(growth: Growth, *, steps_per_epoch: int, epoch_start: int) -> Growth:
    """A growth seen inside one epoch whose holder was emptied at the epoch's end: the per-epoch saw-tooth of the
    same rate (on CPU the RSS does not show the release: the C allocator keeps the memory for the next epoch).
    ``epoch_start``: the step the next epoch started at; the exhaustion step is inside it, when an epoch's growth
    reaches the capacity.
    """
    per_epoch = max(growth.rate * steps_per_epoch, growth.size)
    floor = growth.peak - growth.size  # the peak at the start of the epoch that grew
    exhaustion = None
    if growth.rate > 0 and floor + per_epoch >= growth.capacity:
        exhaustion = epoch_start + math.ceil(max(growth.capacity - floor, 0.0) / growth.rate)
    return dataclasses.replace(
        growth,
        pattern="per_epoch",
        size=per_epoch,
        steps_per_epoch=steps_per_epoch,
        exhaustion_step=exhaustion,
        epoch_peak=floor + per_epoch,
    )


def as_per_step(growth: Growth) -> Growth:
    """A growth whose holder keeps tensors with autograd history, which validation (no grad) cannot make: the
    training steps keep them, whatever the moments the RSS showed it (on CPU the RSS of a leak that pins small
    blocks may rise when validation allocates). The rate is the window's growth per step.
    """
    steps = max(growth.last_step - growth.first_step, 1)
    rate = growth.size / steps
    return dataclasses.replace(
        growth,
        pattern="per_step",
        rate=rate,
        exhaustion_step=growth.last_step + math.ceil(max(growth.capacity - growth.peak, 0.0) / rate)
        if rate > 0
        else None,
    )


def _settled(points: Sequence[Point], skip: int = 2) -> list[Point]:
    """``points`` without the first ``skip`` of each segment after the first (where the RSS still takes in what a
    validation run or an epoch boundary touched).
    """
    out: list[Point] = []
    seen: dict[int, int] = {}
    first = points[0].segment if points else 0
    for p in points:
        n = seen.get(p.segment, 0)
        seen[p.segment] = n + 1
        if p.segment == first or n >= skip:
            out.append(p)
    return out


def _tail(points: Sequence[Point], n: int) -> list[float]:
    return [p.value for p in points[-n:]]


def _still_rising(points: list[Point], slope: float, tolerance: float) -> bool:
    """The latest epoch of the window (a later one than the first) rises too, at a similar rate: 4 points or more
    after its first step (the RSS often rises for a few steps after a boundary, then settles), most pairs rising,
    at least half the window's slope.
    """
    epochs = sorted({p.epoch for p in points})
    if len(epochs) < 2:
        return False
    later = [p for p in points if p.epoch == epochs[-1]]
    later = [p for p in later if p.step > later[0].step]
    latest_slope, share, _ = _segment_trend(later, tolerance)
    return len(later) >= 4 and share >= RISING_SHARE and latest_slope >= 0.5 * slope


def _unattributed(points: list[Point], capacity: float, peak: float, tolerance: float) -> Growth | None:
    """The baseline rose over the window (most pairs of points, across segments too) without a pattern: on CPU the
    RSS of a leak of small blocks (a list of losses and their graphs) can rise in steps at validation runs.
    """
    _, share, pairs = _segment_trend(points, tolerance, same_segment=False)
    size = _median(_tail(points, 3)) - _median([p.value for p in points[:3]])
    steps = points[-1].step - points[0].step
    if pairs < 4 or share < RISING_SHARE or size <= 0 or steps <= 0:
        return None
    rate = size / steps
    return Growth(
        "per_step",
        rate=rate,
        size=size,
        rising_share=share,
        **_window(points, peak, capacity),
        exhaustion_step=points[-1].step + math.ceil(max(capacity - peak, 0.0) / rate),
        unattributed=True,
    )


def _segment_trend(
    points: Sequence[Point], tolerance: float = 0.0, *, same_segment: bool = True
) -> tuple[float, float, int]:
    """Theil-Sen slope (bytes per step), share of pairs rising by more than ``tolerance`` bytes, and number of pairs,
    over the pairs of points that belong to the same segment (all pairs: ``same_segment=False``); host tensors: a
    few hundred pairs cost microseconds.
    """
    if len(points) < 2:
        return 0.0, 0.0, 0
    steps = torch.tensor([p.step for p in points], dtype=torch.float64)
    values = torch.tensor([p.value for p in points], dtype=torch.float64)
    segments = torch.tensor([p.segment for p in points])
    ds = steps[None, :] - steps[:, None]
    dv = values[None, :] - values[:, None]
    mask = ds > 0
    if same_segment:
        mask &= segments[None, :] == segments[:, None]
    count = int(mask.sum())
    if count == 0:
        return 0.0, 0.0, 0
    slopes = dv[mask] / ds[mask]
    rising = float((dv[mask] > tolerance).sum()) / count
    return float(slopes.median()), rising, count


def growth_verdict(
    growth: Growth,
    holder: Holder | None = None,
    gained: Holder | None = None,
    *,
    since_step: int | None = None,
    device: str = "cpu",
) -> Verdict:
    """The ``memory_growth`` finding (warning) for a confirmed growth, with the holder when one was found."""
    what = "GPU memory" if device == "cuda" else "process memory (RSS)"
    if growth.unattributed:
        head = (
            f"The {what} that survives a training step rose by {fmt_bytes(growth.size)} from step "
            f"{growth.first_step} to {growth.last_step} ({fmt_bytes(growth.rate)} per step on average, "
            f"{growth.rising_share:.0%} of pairs of its {growth.points} points rising), in jumps rather than at a "
            "steady rate."
        )
    elif growth.pattern == "per_step":
        head = (
            f"The {what} that survives a training step grows by {fmt_bytes(growth.rate)} per step: "
            f"+{fmt_bytes(growth.size)} from step {growth.first_step} to {growth.last_step} "
            f"({growth.rising_share:.0%} of pairs of its {growth.points} points rising, between boundaries of the loop), "
            "and epoch ends do not give it back."
        )
    elif growth.pattern == "per_epoch":
        head = (
            f"The {what} that survives a training step grows by {fmt_bytes(growth.rate)} per step inside each epoch "
            f"and is given back at the epoch end (a saw-tooth): each epoch of {growth.steps_per_epoch} steps holds "
            f"{fmt_bytes(growth.size)} more at its end than at its start."
        )
    else:
        head = (
            f"The {what} that survives a training step grows by {fmt_bytes(growth.rate)} at each validation run "
            f"({growth.rising_share:.0%} of the {growth.validations} runs after the first, "
            f"+{fmt_bytes(growth.size)} in all), not during training steps: validation keeps something."
        )
    cap = f"{fmt_bytes(growth.capacity)} capacity, peak {fmt_bytes(growth.peak)}"
    if growth.exhaustion_step is not None:
        head += f" At this rate it runs out ({cap}) at about step {growth.exhaustion_step}."
    elif growth.pattern == "per_epoch":
        share = growth.epoch_peak / growth.capacity if growth.capacity else 0.0
        head += (
            f" An epoch's end peak reaches about {fmt_bytes(growth.epoch_peak)}, {share:.0%} of the capacity "
            f"({fmt_bytes(growth.capacity)}): it fits at this epoch length."
        )
    evidence: dict[str, Any] = {
        "pattern": growth.pattern,
        "growth_mib": round(growth.size / MIB, 3),
        "rising_share": round(growth.rising_share, 3),
        "points": growth.points,
        "first_step": growth.first_step,
        "baseline_mib": round(growth.baseline / MIB, 3),
        "peak_mib": round(growth.peak / MIB, 3),
        "capacity_mib": round(growth.capacity / MIB, 3),
        "projected_exhaustion_step": -1 if growth.exhaustion_step is None else growth.exhaustion_step,
        "confirmed_by": growth.confirmed_by,
    }
    rate_key = "mib_per_validation" if growth.pattern == "at_validation" else "mib_per_step"
    evidence[rate_key] = round(growth.rate / MIB, 4)
    if growth.pattern == "per_epoch":
        evidence["mib_per_epoch"] = round(growth.size / MIB, 3)
    advice: list[str] = []
    if holder is not None:
        head += " " + _holder_sentence(holder, gained, since_step)
        evidence.update(
            holder=holder.name,
            holder_tensors=holder.tensors,
            holder_with_history=holder.with_history,
            holder_mib=round(holder.nbytes / MIB, 3),
        )
        if gained is not None and since_step is not None:
            evidence.update(
                holder_new_tensors=gained.tensors,
                holder_new_mib=round(gained.nbytes / MIB, 3),
                holder_since_step=since_step,
            )
        if holder.with_history:
            advice.append(
                f"Keep `.detach()`ed values in `{holder.name}` (or plain numbers, read at the logging interval): "
                "a tensor with autograd history keeps the graph of the step that made it alive."
            )
        elif growth.pattern == "at_validation":
            advice.append(
                f"`{holder.name}` grows at every validation run: `reset()` the metric (or clear the list) after "
                "`compute()` in `on_validation_epoch_end`; `self.log(name, metric)` with the metric object resets it "
                "for you."
            )
        else:
            advice.append(f"Clear or bound `{holder.name}` (keep a running value instead of every tensor).")
    else:
        head += " No attribute of the LightningModule or `trainer.callback_metrics` holds the growth: it is elsewhere."
        advice.append(
            "Look at globals, module-level caches, caches of the Dataset (with `num_workers=0` they live in this "
            "process), hooks that keep their inputs, and C extensions; "
            + (
                "`torch.cuda.memory._record_memory_history()` and a snapshot name the allocating lines."
                if device == "cuda"
                else "`tracemalloc` names the allocating lines of Python objects."
            )
        )
    if growth.pattern == "per_epoch":
        advice.append(
            "Outputs collected for the epoch end should be detached and reduced (a running sum, or a torchmetrics "
            "metric updated per step) rather than every step's tensor."
        )
    elif growth.pattern == "per_step":
        advice.append(
            "Classic causes: `total += loss` or a list of losses/outputs without `.detach()`, "
            "a history kept in `self`, tensors logged with their graph."
        )
    return Verdict("memory_growth", "warning", head, evidence, advice)


def _holder_sentence(holder: Holder, gained: Holder | None, since_step: int | None) -> str:
    kind = " with autograd history" if holder.with_history else ""
    count = holder.with_history if holder.with_history else holder.tensors
    text = f"`{holder.name}` holds {count:,} tensors{kind}, {fmt_bytes(holder.nbytes)} of their own data"
    if holder.with_history:
        text += " (each keeps the autograd graph of the step that made it alive)"
    if gained is not None and since_step is not None and (gained.tensors or gained.nbytes):
        text += f"; +{gained.tensors:,} tensors, +{fmt_bytes(gained.nbytes)} since step {since_step}"
    return text + "."


# -- localisation ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Holder:
    """What one attribute holds: tensors reachable from it, those with autograd history, their unique bytes."""

    name: str
    tensors: int = 0
    with_history: int = 0
    nbytes: int = 0


#: nn.Module / LightningModule attributes never walked: the model's own weights, hooks, and back references.
_SKIP_ATTRIBUTES = frozenset(
    {"_parameters", "_buffers", "_trainer", "_fabric", "_device_mesh", "_compiler_ctx", "_fabric_optimizers"}
)
_MAX_DEPTH = 8


def _storage(t: torch.Tensor) -> tuple[tuple[str, int], int]:
    try:
        storage = t.untyped_storage()
        return (str(t.device), int(storage.data_ptr())), int(storage.nbytes())
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested or wrapper tensors
        return (str(t.device), id(t)), int(t.numel() * t.element_size())


def _skipped_object(obj: Any) -> bool:
    if isinstance(obj, (type, types.ModuleType, types.FunctionType, types.MethodType, str, bytes)):
        return True
    module = type(obj).__module__ or ""
    return module.startswith(("lightning", "pytorch_lightning", "torch.utils.data", "torch.optim"))


def _children(obj: Any) -> Iterable[Any]:
    if isinstance(obj, Mapping):
        return obj.values()
    if isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        return obj
    if isinstance(obj, torch.nn.Module):
        attrs = [v for k, v in vars(obj).items() if k not in _SKIP_ATTRIBUTES and k != "_modules"]
        return [*obj.parameters(recurse=False), *obj.buffers(recurse=False), *attrs, *obj.children()]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    if hasattr(obj, "__dict__") and not _skipped_object(obj):
        return list(vars(obj).values())
    return ()


def _count(holder: Holder, value: Any, skip: frozenset[tuple[str, int]], budget: list[int]) -> None:
    seen_objects: set[int] = set()
    seen_storages: set[tuple[str, int]] = set()
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and budget[0] > 0:
        obj, depth = stack.pop()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        budget[0] -= 1
        if isinstance(obj, torch.Tensor):
            key, nbytes = _storage(obj)
            if key in skip:
                continue
            holder.tensors += 1
            holder.with_history += obj.grad_fn is not None
            if key not in seen_storages:
                seen_storages.add(key)
                holder.nbytes += nbytes
            continue
        if depth < _MAX_DEPTH and not isinstance(obj, (str, bytes, int, float, bool, type(None))):
            stack.extend((child, depth + 1) for child in _children(obj))


def find_holders(
    roots: Mapping[str, Any], *, skip: Iterable[torch.Tensor] = (), max_objects: int = 200_000
) -> dict[str, Holder]:
    """What each attribute holds, by name: a module root (``{"self": pl_module}``) gives one holder per attribute
    of it and of its submodules (``self.metric.value``); a mapping root one per key (``trainer.callback_metrics['k']``).

    Tensors sharing a storage with a tensor of ``skip`` (the model's parameters and buffers) are not counted; at most
    ``max_objects`` objects are visited in all.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> net.hist = [net(torch.ones(1, 2)).sum() for _ in range(3)]
        >>> found = find_holders({"self": net}, skip=net.parameters())
        >>> found["self.hist"].tensors, found["self.hist"].with_history
        (3, 3)
    """
    excluded = frozenset(_storage(t)[0] for t in skip)
    budget = [int(max_objects)]
    found: dict[str, Holder] = {}
    modules: list[tuple[str, Any]] = []
    seen_modules: set[int] = set()
    for name, root in roots.items():
        if isinstance(root, torch.nn.Module):
            modules.append((name, root))
        elif isinstance(root, Mapping):
            for key, value in root.items():
                holder = found.setdefault(f"{name}[{key!r}]", Holder(f"{name}[{key!r}]"))
                _count(holder, value, excluded, budget)
    while modules:
        prefix, module = modules.pop()
        if id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        for attr, value in vars(module).items():
            if attr in _SKIP_ATTRIBUTES:
                continue
            if attr == "_modules":
                modules.extend((f"{prefix}.{child}", m) for child, m in value.items() if m is not None)
                continue
            if isinstance(value, (str, bytes, int, float, bool, type(None))) or callable(value):
                continue
            holder = Holder(f"{prefix}.{attr}")
            _count(holder, value, excluded, budget)
            if holder.tensors:
                found[holder.name] = holder
    return {name: h for name, h in found.items() if h.tensors}


def pick_holder(
    after: Mapping[str, Holder], before: Mapping[str, Holder] | None = None, *, min_bytes: float = 0.0
) -> tuple[Holder, Holder | None] | None:
    """The holder of a growth and what it gained (a :class:`Holder` of differences), or ``None``.

    With an earlier walk: the attribute that gained the most tensors with autograd history (2 or more), else the most
    bytes (``min_bytes`` or more; a container that gained tensors before one that did not). Without one: the attribute holding the most tensors with autograd history (8 or
    more), else the container holding the most bytes (``min_bytes`` or more, 2 tensors or more).
    """
    if before is not None:
        gains = {
            name: Holder(
                name,
                h.tensors - before.get(name, Holder(name)).tensors,
                h.with_history - before.get(name, Holder(name)).with_history,
                h.nbytes - before.get(name, Holder(name)).nbytes,
            )
            for name, h in after.items()
        }
        history = [g for g in gains.values() if g.with_history >= 2]
        if history:
            best = max(history, key=lambda g: (g.with_history, g.nbytes))
            return after[best.name], best
        grown = [g for g in gains.values() if g.nbytes >= max(min_bytes, 1.0)]
        if grown:  # a container that gained tensors before a cached result that was replaced by a larger one
            best = max(grown, key=lambda g: (g.tensors > 0, g.nbytes))
            return after[best.name], best
        return None
    history = [h for h in after.values() if h.with_history >= 8]
    if history:
        return max(history, key=lambda h: (h.with_history, h.nbytes)), None
    large = [h for h in after.values() if h.tensors >= 2 and h.nbytes >= max(min_bytes, 1.0)]
    return (max(large, key=lambda h: h.nbytes), None) if large else None


# -- pressure, fragmentation -----------------------------------------------------------------------------------
def pressure_verdict(peak: float, capacity: float, *, device: str = "cpu") -> Verdict | None:
    """``memory_pressure``: a step's peak at :data:`PRESSURE_INFO` of the capacity (info) or
    :data:`PRESSURE_WARNING` (warning); ``None`` below.

    Example:
        >>> pressure_verdict(95.0, 100.0).severity, pressure_verdict(98.0, 100.0).severity, pressure_verdict(50, 100)
        ('info', 'warning', None)
    """
    if capacity <= 0:
        return None
    share = peak / capacity
    if share < PRESSURE_INFO:
        return None
    severity: Severity = "warning" if share >= PRESSURE_WARNING else "info"
    what = "GPU memory" if device == "cuda" else "process memory (RSS)"
    return Verdict(
        "memory_pressure",
        severity,
        f"The {what} peaks at {share:.0%} of the capacity ({fmt_bytes(peak)} of {fmt_bytes(capacity)}): "
        + (
            "a longer batch or a fragmented cache may not fit."
            if severity == "warning"
            else "little room is left for longer batches."
        ),
        {
            "peak_mib": round(peak / MIB, 3),
            "capacity_mib": round(capacity / MIB, 3),
            "share": round(share, 4),
        },
        [
            "A smaller batch with `accumulate_grad_batches` (same effective batch), `precision='bf16-mixed'`, or "
            "activation checkpointing lowers the peak.",
        ],
    )


def fragmentation_verdict(
    *,
    new_retries: int,
    retries: int,
    since_step: int,
    reserved_peak: float,
    allocated_peak: float,
    capacity: float,
    expandable: bool,
) -> Verdict | None:
    """``memory_fragmentation`` (CUDA): allocation retries rose (warning: each one frees the cache and waits for the
    device), or reserved minus allocated at peak above :data:`FRAGMENTED_SHARE` of the capacity (info).

    Example:
        >>> v = fragmentation_verdict(new_retries=3, retries=3, since_step=40, reserved_peak=70e9,
        ...     allocated_peak=50e9, capacity=80e9, expandable=False)
        >>> v.severity, "expandable_segments:True" in v.advice[0]
        ('warning', True)
    """
    gap = max(reserved_peak - allocated_peak, 0.0)
    share = gap / capacity if capacity > 0 else 0.0
    if new_retries <= 0 and share < FRAGMENTED_SHARE:
        return None
    severity: Severity = "warning" if new_retries > 0 else "info"
    if new_retries > 0:
        message = (
            f"The CUDA caching allocator failed to find a block {new_retries} time(s) since step {since_step} "
            f"({retries} in all) and had to free its cache and retry (a slow, synchronising path): reserved "
            f"{fmt_bytes(reserved_peak)} vs allocated {fmt_bytes(allocated_peak)} at peak."
        )
    else:
        message = (
            f"Reserved memory is {fmt_bytes(gap)} ({share:.0%} of the capacity) above allocated memory at peak "
            f"({fmt_bytes(reserved_peak)} vs {fmt_bytes(allocated_peak)}): the cache holds blocks it cannot reuse "
            "for these sizes."
        )
    advice = (
        [
            "`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (set before the first CUDA allocation) lets the "
            "allocator grow segments instead of fragmenting them."
        ]
        if not expandable
        else [
            "`expandable_segments` is already on: the batch shapes vary too much for the cache; lower the peak instead."
        ]
    )
    advice.append(
        "Variable lengths fragment the cache: bucket samples by length or pad to a few fixed lengths."
    )
    evidence = {
        "new_retries": int(new_retries),
        "alloc_retries": int(retries),
        "reserved_peak_mib": round(reserved_peak / MIB, 3),
        "allocated_peak_mib": round(allocated_peak / MIB, 3),
        "capacity_mib": round(capacity / MIB, 3),
        "expandable_segments": int(expandable),
    }
    return Verdict("memory_fragmentation", severity, message, evidence, advice)


# -- out of memory -------------------------------------------------------------------------------------------
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_oom(exception: BaseException) -> bool:
    """An out-of-memory error: ``torch.OutOfMemoryError`` (CUDA), Python's ``MemoryError``, or a ``RuntimeError``
    whose text says so (``DefaultCPUAllocator: can't allocate memory``, ``CUDA error: out of memory``).

    Example:
        >>> is_oom(torch.OutOfMemoryError("CUDA out of memory.")), is_oom(RuntimeError("shape mismatch"))
        (True, False)
    """
    if isinstance(exception, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exception, RuntimeError) and any(t in str(exception).lower() for t in _OOM_TEXT)


@dataclasses.dataclass
class BatchInfo:
    """A batch described from its tensors' metadata (no value is read)."""

    shapes: str
    numel: int
    nbytes: int


def describe_batch(batch: Any, *, limit: int = 8, device_type: str | None = None) -> BatchInfo:
    """Shapes (``batch[0]: 32x512``, at most ``limit`` tensors named), elements and unique bytes of a batch
    (``device_type``: count only the bytes of tensors on that kind of device).

    Example:
        >>> describe_batch((torch.zeros(4, 16), torch.zeros(4, dtype=torch.long)))
        BatchInfo(shapes='batch[0]: 4x16, batch[1]: 4', numel=68, nbytes=288)
    """
    names, numel, nbytes = [], 0, 0
    seen: set[tuple[str, int]] = set()
    for i, (path, t) in enumerate(iter_tensors(batch)):
        if i < limit:
            names.append(f"{path}: {'x'.join(str(d) for d in t.shape) or 'scalar'}")
        numel += int(t.numel())
        if device_type is not None and t.device.type != device_type:
            continue
        key, size = _storage(t)
        if key not in seen:
            seen.add(key)
            nbytes += size
    return BatchInfo(", ".join(names), numel, nbytes)


_PHASES = {
    "forward": "the forward pass (`training_step`)",
    "backward": "the backward pass",
    "optimizer step": "the optimizer step (gradient clipping, `optimizer.step()`, the scheduler)",
    "validation": "validation",
    "between steps": "between training steps (fetching and moving a batch, callbacks, logging)",
}


def oom_verdict(
    *,
    phase: str,
    error: str,
    batch: BatchInfo | None,
    median_numel: float,
    device: str,
    current: float,
    peak: float,
    capacity: float,
    reserved: float | None = None,
    retries: int | None = None,
    growth: Growth | None = None,
    holder: str = "",
    fragmented: bool = False,
    expandable: bool = False,
) -> Verdict:
    """``out_of_memory`` (error): where the run died, with what batch, and advice ordered by the evidence (a longer
    batch than usual, then the growth or the fragmentation found before, then how to lower a steady peak).
    """
    where = _PHASES.get(phase, phase)
    ratio = batch.numel / median_numel if batch is not None and median_numel > 0 else 0.0
    long_batch = ratio >= LONG_BATCH_RATIO
    what = "GPU" if device == "cuda" else "host"
    message = f"The run died of an out-of-memory error ({what}) in {where}"
    evidence: dict[str, Any] = {
        "phase": phase,
        "error": error[:300],
        "current_mib": round(current / MIB, 3),
        "peak_mib": round(peak / MIB, 3),
        "capacity_mib": round(capacity / MIB, 3),
    }
    if batch is not None:
        evidence.update(batch_shapes=batch.shapes, batch_numel=batch.numel)
        if median_numel > 0:
            evidence.update(median_batch_numel=round(median_numel, 1), batch_ratio=round(ratio, 3))
            message += f", on a batch {ratio:.1f}x the median batch so far ({batch.shapes})"
        else:
            message += f", on the first batch of its kind ({batch.shapes})"
    message += f"; peak {fmt_bytes(peak)} of {fmt_bytes(capacity)}"
    if reserved is not None:
        evidence["reserved_mib"] = round(reserved / MIB, 3)
        message += f", reserved {fmt_bytes(reserved)}"
    if retries is not None:
        evidence["alloc_retries"] = int(retries)
        message += f", {retries} allocation retries"
    message += "."
    advice: list[str] = []
    if long_batch:
        advice.append(
            f"This batch is {ratio:.1f}x the median one: cap the length (truncation, `max_length`), bucket samples by "
            "length, or bound the tokens per batch rather than the samples."
        )
    if growth is not None:
        held = f" (`{holder}`)" if holder else ""
        advice.append(
            f"The memory that survives a step grew by {fmt_bytes(growth.rate)} "
            f"{'per validation run' if growth.pattern == 'at_validation' else 'per step'} before the error: fix the "
            f"leak{held} first (see `memory_growth`)."
        )
    if fragmented:
        advice.append(
            "The cache was fragmented (see `memory_fragmentation`): "
            + (
                "bucket lengths; `expandable_segments` is already on."
                if expandable
                else "`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`, and bucket lengths."
            )
        )
    advice.append(
        "If the step's peak itself does not fit: a smaller batch with `accumulate_grad_batches` (same effective "
        "batch), `precision='bf16-mixed'`, activation checkpointing"
        + (
            ", or an optimizer with less state (Adam keeps two copies of the weights)"
            if phase == "optimizer step"
            else ""
        )
        + "."
    )
    return Verdict("out_of_memory", "error", message, evidence, advice)
