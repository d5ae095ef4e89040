"""Learning-curve diagnosis: overfitting, underfitting, loss plateau and divergence, from loss series alone.

The input is one point per evaluation: ``(x, train, val)`` where ``x`` is the number of epochs completed (1.0 at the
end of Lightning's epoch 0, 0.5 half-way through it; or a step count), ``train`` the mean
training loss since the previous evaluation and ``val`` the validation loss (``None`` where there was none).
Epoch-level means are already smooth; the rules below compare them over ``patience`` evaluations and measure
"noise" as the median absolute difference between successive values (robust to one outlier).
:func:`diagnose` applies every rule to the history so far, so the same code serves the live callback (called
after each evaluation) and the post-hoc report (called once on a whole run).

Rules (thresholds are :class:`CurveRules` fields):

* **overfitting** (warning): the validation loss has not improved for ``patience`` evaluations and now stands
  above its best by more than ``rise_tolerance`` (relative) and twice its noise, while the training loss kept
  falling and the gap val - train is more than ``rise_tolerance`` of the validation loss (a gap of ~0 is both
  curves moving together around a plateau). Evidence: the best evaluation, the onset (the first evaluation after the best), the generalisation gap
  (val - train) and ratio at the best and now.
* **gap widening** (an ``overfitting`` finding with severity info): no new best validation loss for ``patience``
  evaluations while the gap grew at each of them and training kept falling: the early sign of the above.
* **divergence** (error): the training loss is non-finite, or it rose over the last ``patience`` evaluations to
  more than ``divergence_ratio`` times its lowest value, or (with ``initial``, the loss of the first training
  steps) both the steps just before the evaluation and the mean since the last one are more than
  ``divergence_ratio`` times that initial loss: the model does worse than where it started.
* **loss_plateau** (warning): the training loss improved by less than ``plateau_threshold`` (relative) over the
  last ``patience`` evaluations while still above ``high_ratio`` of the reference loss (a given ``baseline``, e.g.
  the loss of the best constant predictor, else the initial loss). Reported when it is still creeping down at
  every evaluation (a learning rate too low), or when the validation loss is not close to it.
* **underfitting** (warning): the same flat, high training loss, no longer moving (not creeping down), with the
  validation loss within ``close_ratio`` of it. The rule cannot know the task's loss floor (label noise, Bayes
  error), so the finding states the plateau and its evidence and names that possibility next to too little
  capacity; it is a prompt to compare with a known floor, not a verdict.
* **validation never improved** (a ``loss_plateau`` warning): after more than ``patience`` evaluations the best
  validation loss is within ``plateau_threshold`` of the first one while it and the training loss are still above
  ``high_ratio`` of the reference: whatever the training loss does, nothing that generalises is being learned (regularisation so
  strong the model cannot learn, labels unrelated to the inputs).
* **stopped while overfitting** (``stopped=True``, an early stop decided elsewhere): a training loss that fell to
  half or less of its value at the best evaluation while the gap grew to half the validation loss or more (the
  model memorised; the stop near the best hid the rise), or a widening gap, with a real gap and a validation loss
  more than ``stop_rise`` (relative) above its best, is an ``overfitting`` warning, not an early sign (a stop within a few percent of the best is ordinary early stopping): the run ended because the validation loss stopped improving while
  the training loss kept falling.

Oscillation (the noise relative to the loss level above ``oscillation_ratio``) is added to the evidence of a
divergence or a plateau as a hint of a learning rate too high.

**Floors.** A plateau (or underfitting, or a validation loss that never improved) far below where the loss started
(``floor_progress``, 20%, of the reference already gone) may be the task's floor (label noise, overlapping classes,
an ELBO's entropy term): it is recorded as ``info`` with ``evidence["floor_possible"]``, and the end-of-fit gate
(:mod:`lightning_diag.core.consequences`) makes it a warning only when another finding explains it (vanishing
gradients, a loss spike, a silent bug...). A plateau while the validation loss still improves by more than its
noise is no plateau at all.

**Scales.** A gap or a ratio between the two losses is computed only when they are on the same scale
(:func:`comparable`: within ``scale_ratio`` of each other at the first evaluation). Otherwise each curve is judged
on its own: overfitting is the validation loss rising from its best while the training loss falls (no gap
condition), the underfitting rule (which needs the two close) and "validation never improved" (which measures the
validation loss against the training loss's reference) do not apply.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Sequence
from typing import Any

from lightning_diag.core.verdict import Severity, Verdict

__all__ = [
    "FIT_GAIN",
    "CurvePoint",
    "CurveRules",
    "comparable",
    "diagnose",
    "noise",
    "stopped_verdict",
]

#: Overfitting that early stopping cut short: the training loss fell below this share of its value at the best
#: evaluation (a tiny regression whose training loss merely halves while a noisy validation stalls is not it).
MEMORIZED_DROP = 0.4
#: ...or the training loss is below this share of the validation loss and still fell by a quarter since the best
#: evaluation (a big model that memorised a tiny training set: the training loss is ~0 from early on, so it cannot
#: drop much further; a converged model whose training loss stays put is not it).
MEMORIZED_GAP = 0.05
#: A validation loss below this share of the first evaluation's training loss leaves nothing to generalise: a
#: training loss that keeps falling under it is not "overfitting cut short" (a tiny dataset fitted to 5e-4).
NEGLIGIBLE = 0.01
#: A loss at this share of a uniform guess's loss (``ln(C)``) or above is at chance level: the model has learned
#: nothing that generalises, so a plateau there is not the task's floor. (A binary task with 30% label noise has its
#: floor at 0.88 of ln(2): below this.)
AT_CHANCE = 0.97
#: Overfitting is a model that goes on fitting its training data: the training loss fell by at least this share of
#: its value at the best evaluation. A validation loss that rises while the training loss barely moves (a VAE at a
#: constant SGD rate: 2.5% lower, validation 11% up, then a new best three epochs later) is the noise of the iterate
#: or a drift: reported as a widening gap (info), not as overfitting.
FIT_GAIN = 0.1


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """One evaluation: ``x`` (epoch or step), mean training loss since the last one, validation loss."""

    x: float
    train: float
    val: float | None = None


@dataclasses.dataclass(frozen=True)
class CurveRules:
    """Thresholds of the curve rules (see the module docstring)."""

    patience: int = 3
    rise_tolerance: float = 0.02
    plateau_threshold: float = 0.01
    high_ratio: float = 0.5
    close_ratio: float = 0.15
    divergence_ratio: float = 1.5
    oscillation_ratio: float = 0.1
    stop_rise: float = 0.05
    scale_ratio: float = 4.0
    floor_progress: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.patience, int) or isinstance(self.patience, bool) or self.patience < 2:
            raise ValueError(f"`patience` must be an int >= 2, got {self.patience!r}.")
        for name in (
            "rise_tolerance",
            "plateau_threshold",
            "high_ratio",
            "close_ratio",
            "oscillation_ratio",
            "stop_rise",
            "floor_progress",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"`{name}` must be >= 0, got {value!r}.")
        if not (isinstance(self.divergence_ratio, (int, float)) and self.divergence_ratio > 1):
            raise ValueError(f"`divergence_ratio` must be > 1, got {self.divergence_ratio!r}.")
        if not (isinstance(self.scale_ratio, (int, float)) and self.scale_ratio > 1):
            raise ValueError(f"`scale_ratio` must be > 1, got {self.scale_ratio!r}.")


def _verdict(
    code: str, severity: Severity, message: str, x: float, evidence: dict[str, Any], advice: list[str]
) -> Verdict:
    return Verdict(code, severity, message, dict(evidence), list(advice), x=x)


def noise(values: Sequence[float]) -> float:
    """The median absolute difference between successive values (0 for fewer than two).

    Example:
        >>> noise([1.0, 1.1, 1.0, 1.2])
        0.1
    """
    diffs = [abs(b - a) for a, b in itertools.pairwise(values)]
    return round(statistics.median(diffs), 12) if diffs else 0.0


def comparable(points: Sequence[CurvePoint], rules: CurveRules | None = None) -> bool:
    """Whether the training and validation losses are on the same scale, judged at the first evaluation (before
    either could have moved far from the other): within ``scale_ratio`` of each other. A training loss scaled or
    summed differently (a weighted sum of terms, a target normalised only in training) is compared with nothing.

    Example:
        >>> comparable([CurvePoint(1.0, 0.9, 1.0)]), comparable([CurvePoint(1.0, 0.05, 16.9)])
        (True, False)
    """
    rules = rules or CurveRules()
    first = next(
        (p for p in points if p.val is not None and math.isfinite(p.val) and math.isfinite(p.train)), None
    )
    if first is None or first.val is None:
        return True
    if first.train <= 0 or first.val <= 0:
        return first.train == first.val or abs(first.val - first.train) <= abs(first.train)
    ratio = first.val / first.train
    return 1 / rules.scale_ratio <= ratio <= rules.scale_ratio


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def diagnose(
    points: Sequence[CurvePoint],
    rules: CurveRules | None = None,
    baseline: float | None = None,
    unit: str = "epoch",
    initial: float | None = None,
    stopped: bool = False,
    recent: float | None = None,
    frozen_share: float = 0.0,
    chance: float | None = None,
) -> list[Verdict]:
    """Apply every rule to the history ``points`` (in evaluation order); return what holds at its end.

    ``unit`` names what ``x`` counts in the messages (``"epoch"`` or ``"step"``); ``initial`` is the mean loss of
    the first few training steps when known and ``recent`` the mean loss of as many steps just before the last
    evaluation (compared with each other: like with like, as one batch can be much easier than the average);
    ``stopped`` says the run was stopped early (by EarlyStop) after the last point; ``frozen_share`` is the share
    of the parameters that do not train (a plateau then names a frozen, possibly never loaded, backbone first);
    ``chance`` is the loss of a uniform guess when known (``ln(C)`` for a C-class cross-entropy): a plateau at it
    (:data:`AT_CHANCE`) is no task's floor, whatever the start was.
    """
    rules = rules or CurveRules()
    if not points:
        return []

    found: list[Verdict] = []
    divergence = _divergence(points, rules, unit, initial, recent)
    if divergence is not None:
        return [divergence]  # the other rules read a loss that is still meaningful
    same_scale = comparable(points, rules)
    overfit = _overfitting(points, rules, unit, stopped, same_scale)
    if overfit is not None:
        found.append(overfit)
    plateau = _plateau_or_underfitting(points, rules, baseline, same_scale, initial, chance)
    if plateau is not None and overfit is None:
        found.append(plateau)
    flat = (
        _validation_never_improved(points, rules, baseline, unit, same_scale, initial, chance)
        if plateau is None
        else None
    )
    if flat is not None and (overfit is None or overfit.severity == "info"):
        # a gap that "widens" because only the training loss moves is not the early sign of overfitting
        found = [flat]
    if frozen_share >= FROZEN_SHARE:
        found = [_frozen(v, frozen_share) if v.code in ("loss_plateau", "underfitting") else v for v in found]
    return found


#: A plateau with at least this share of the parameters frozen names the frozen part first.
FROZEN_SHARE = 0.5


def _frozen(verdict: Verdict, share: float) -> Verdict:
    """A plateau of a model that is mostly frozen: the frozen part is the first suspect, not the learning rate."""
    advice = [
        f"{share:.0%} of the parameters are frozen: features from a backbone whose pretrained weights were never "
        "loaded (random), or that do not suit this data, leave the trainable part little to learn. Check the "
        "weights were loaded, or unfreeze the last blocks.",
        *(a for a in verdict.advice if "raise it" not in a and "too low" not in a),
    ]
    return dataclasses.replace(
        verdict, evidence={**verdict.evidence, "frozen_share": round(share, 4)}, advice=advice
    )


def _oscillation(train: Sequence[float], rules: CurveRules) -> dict[str, Any]:
    level = abs(statistics.fmean(train)) if train else 0.0
    ratio = noise(train) / level if level > 0 else 0.0
    return {"oscillation": round(ratio, 4)} if ratio > rules.oscillation_ratio else {}


def _divergence(
    points: Sequence[CurvePoint],
    rules: CurveRules,
    unit: str,
    initial: float | None = None,
    recent: float | None = None,
) -> Verdict | None:
    train = [p.train for p in points]
    last = points[-1]
    if not math.isfinite(last.train):
        finite = [t for t in train if math.isfinite(t)]
        return _verdict(
            "divergence",
            "error",
            f"The training loss became non-finite ({last.train}) at {_x(last, unit)}.",
            last.x,
            {"train_loss": str(last.train), "best_train_loss": min(finite) if finite else "n/a"},
            _DIVERGENCE_ADVICE,
        )
    current = recent if recent is not None and math.isfinite(recent) else last.train
    if (
        initial is not None
        and math.isfinite(initial)
        and initial > 0
        and current > rules.divergence_ratio * initial
        # the mean since the last evaluation too: a few hard steps after an unusually easy start are not divergence
        and last.train > rules.divergence_ratio * initial
    ):
        where = "over the last steps before" if recent is not None else "on average up to"
        return _verdict(
            "divergence",
            "error",
            f"The training loss is {current / initial:.3g}x its value at the start: {_fmt(current)} {where} "
            f"{_x(last, unit)}, against {_fmt(initial)} over the first steps. The model does worse than where it started.",
            last.x,
            {"train_loss": current, "initial_loss": initial, "ratio": round(current / initial, 4)},
            _DIVERGENCE_ADVICE,
        )
    w = rules.patience
    if len(points) <= w:
        return None
    lowest = min(train)
    window = train[-w - 1 :]
    rising = all(b >= a for a, b in itertools.pairwise(window)) and window[-1] > window[0]
    if lowest > 0 and rising and last.train > rules.divergence_ratio * lowest:
        best_at = points[train.index(lowest)]
        evidence: dict[str, Any] = {
            "train_loss": last.train,
            "best_train_loss": lowest,
            "best_x": best_at.x,
            "ratio": round(last.train / lowest, 4),
            **_oscillation(train, rules),
        }
        return _verdict(
            "divergence",
            "error",
            f"The training loss is rising: {_fmt(last.train)} at {_x(last, unit)}, {last.train / lowest:.2f}x its lowest "
            f"({_fmt(lowest)} at {_x(best_at, unit)}), and it went up at each of the last {w} evaluations.",
            last.x,
            evidence,
            _DIVERGENCE_ADVICE,
        )
    return None


def _overfitting(
    points: Sequence[CurvePoint],
    rules: CurveRules,
    unit: str,
    stopped: bool = False,
    same_scale: bool = True,
) -> Verdict | None:
    evaluated = [p for p in points if p.val is not None and math.isfinite(p.val)]
    w = rules.patience
    if len(evaluated) <= w:
        return None
    vals = [p.val for p in evaluated if p.val is not None]
    best_index = min(range(len(vals)), key=vals.__getitem__)
    if len(evaluated) - 1 - best_index < w:
        return None  # the validation loss improved within the window
    best, last = evaluated[best_index], evaluated[-1]
    assert best.val is not None and last.val is not None
    onset = evaluated[best_index + 1]
    train_fell = last.train < best.train
    fitting = _still_fitting(best, last)
    gap_best, gap_now = best.val - best.train, last.val - last.train
    evidence: dict[str, Any] = {
        "best_x": best.x,
        "onset_x": onset.x,
        **(
            {"best_epoch": _epoch_index(best.x), "onset_epoch": _epoch_index(onset.x)}
            if unit == "epoch"
            else {}
        ),
        "best_val_loss": best.val,
        "val_loss": last.val,
        "train_loss": last.train,
        "gap_at_best": round(gap_best, 6),
        "gap": round(gap_now, 6),
        "gap_ratio": round(last.val / last.train, 4) if last.train > 0 else "n/a",
    }
    rise = last.val - best.val
    if not same_scale:
        return _overfitting_alone(evaluated, best_index, rules, unit, evidence)
    # a gap that is still ~0 is validation and training moving together (noise around a plateau), not overfitting
    real_gap = gap_now > rules.rise_tolerance * abs(last.val)
    if fitting and real_gap and rise > max(rules.rise_tolerance * abs(best.val), 2 * noise(vals)):
        return _verdict(
            "overfitting",
            "warning",
            f"Overfitting since {_x(onset, unit)}: the validation loss rose from its best {_fmt(best.val)} ({_x(best, unit)}) to "
            f"{_fmt(last.val)} while the training loss kept falling ({_fmt(best.train)} -> {_fmt(last.train)}); "
            f"the gap val - train grew from {_fmt(gap_best)} to {_fmt(gap_now)}.",
            last.x,
            evidence,
            _OVERFIT_ADVICE,
        )
    recent = evaluated[-w - 1 :]
    gaps = [(p.val or 0.0) - p.train for p in recent]
    widening = all(b > a for a, b in itertools.pairwise(gaps))
    grew = gap_now - gap_best > max(rules.rise_tolerance * abs(best.val), 2 * noise(vals))
    risen = rise > rules.stop_rise * abs(best.val)
    # stopped early while the training loss kept plunging and now fits far better than anything generalises: the
    # overfitting early stopping cut short (a stop near the best hides it from the rise rules above)
    # (not when the validation loss is already negligible next to where training started: nothing left to generalise)
    negligible = abs(best.val) < NEGLIGIBLE * abs(evaluated[0].train)
    memorized = (
        stopped
        and not negligible
        and gap_now >= 0.5 * abs(last.val)
        # the training loss plunged since the best evaluation, or it is ~0 next to the validation loss (memorised)
        and (
            last.train <= MEMORIZED_DROP * best.train
            or (last.train <= MEMORIZED_GAP * abs(last.val) and last.train <= 0.75 * best.train)
        )
    )
    if train_fell and memorized:
        return _verdict(
            "overfitting",
            "warning",
            f"Overfitting, cut short by early stopping: since the best validation loss {_fmt(best.val)} "
            f"({_x(best, unit)}) the training loss fell from {_fmt(best.train)} to {_fmt(last.train)} while the "
            f"validation loss did not improve; the model now fits the training data far better than it generalises "
            f"(gap {_fmt(gap_now)}, {gap_now / abs(last.val):.0%} of the validation loss).",
            last.x,
            evidence,
            _OVERFIT_ADVICE,
        )
    if fitting and widening and grew and stopped and real_gap and risen:
        return _verdict(
            "overfitting",
            "warning",
            f"Overfitting: training was stopped after {len(evaluated) - 1 - best_index} evaluations without a better "
            f"validation loss than {_fmt(best.val)} ({_x(best, unit)}) while the training loss kept falling "
            f"({_fmt(best.train)} -> {_fmt(last.train)}) and the gap val - train widened at each of the last {w} "
            f"evaluations, to {_fmt(gap_now)}.",
            last.x,
            evidence,
            _OVERFIT_ADVICE,
        )
    if train_fell and widening and grew:
        return _verdict(
            "overfitting",
            "info",
            f"The generalisation gap is widening: no better validation loss than {_fmt(best.val)} ({_x(best, unit)}) for "
            f"{len(evaluated) - 1 - best_index} evaluations while the training loss kept falling; the gap grew at "
            f"each of the last {w} to {_fmt(gap_now)}.",
            last.x,
            evidence,
            _OVERFIT_ADVICE,
        )
    return None


def _still_fitting(best: CurvePoint, last: CurvePoint) -> bool:
    """The training loss fell by :data:`FIT_GAIN` or more since the best evaluation: the model goes on fitting."""
    return best.train - last.train >= FIT_GAIN * abs(best.train)


def _overfitting_alone(
    evaluated: Sequence[CurvePoint],
    best_index: int,
    rules: CurveRules,
    unit: str,
    evidence: dict[str, Any],
) -> Verdict | None:
    """Overfitting judged on each curve alone (training and validation losses on different scales): the validation
    loss rose from its best by more than ``rise_tolerance`` and twice its noise while the training loss fell by
    :data:`FIT_GAIN` or more. No gap is computed: a difference of two scales means nothing.
    """
    best, last = evaluated[best_index], evaluated[-1]
    assert best.val is not None and last.val is not None
    vals = [p.val for p in evaluated if p.val is not None]
    rise = last.val - best.val
    for key in ("gap_at_best", "gap", "gap_ratio"):
        evidence.pop(key, None)
    evidence["scales"] = "different"
    fitting = _still_fitting(best, last)
    if not (fitting and rise > max(rules.rise_tolerance * abs(best.val), 2 * noise(vals))):
        return None
    onset = evaluated[best_index + 1]
    return _verdict(
        "overfitting",
        "warning",
        f"Overfitting since {_x(onset, unit)}: the validation loss rose from its best {_fmt(best.val)} ({_x(best, unit)}) "
        f"to {_fmt(last.val)} while the training loss kept falling ({_fmt(best.train)} -> {_fmt(last.train)}); the "
        "two losses are on different scales, so no gap between them is computed.",
        last.x,
        evidence,
        _OVERFIT_ADVICE,
    )


def _at_chance(value: float, chance: float | None, evidence: dict[str, Any]) -> bool:
    """Whether ``value`` is no better than a uniform guess (:data:`AT_CHANCE` of ``chance`` or above); says so in
    ``evidence``.
    """
    if chance is None or not math.isfinite(chance) or chance <= 0 or value < AT_CHANCE * chance:
        return False
    evidence["chance_loss"] = round(chance, 6)
    return True


def _progress(value: float, reference: float, initial: float | None) -> float:
    """How far ``value`` is below where the loss started: the first steps' loss when known, else ``reference``."""
    start = initial if initial is not None and math.isfinite(initial) and initial > 0 else reference
    return 1 - value / start if start > 0 else 0.0


def _plateau_or_underfitting(
    points: Sequence[CurvePoint],
    rules: CurveRules,
    baseline: float | None,
    same_scale: bool = True,
    initial: float | None = None,
    chance: float | None = None,
) -> Verdict | None:
    w = rules.patience
    if len(points) <= w:
        return None
    train = [p.train for p in points]
    reference = baseline if baseline is not None else train[0]
    last = points[-1]
    start = train[-w - 1]
    if reference <= 0 or start <= 0:
        return None
    improvement = (start - last.train) / abs(start)
    high = last.train > rules.high_ratio * reference
    if improvement >= rules.plateau_threshold or not high:
        return None
    # Saturated: the curve has flattened after real progress (the average rate of improvement so far is many
    # times the current one). A loss still falling at its usual slow rate (or never moving) is not saturated.
    overall = (train[0] - last.train) / abs(train[0]) if train[0] else 0.0
    rate_overall = overall / (len(train) - 1)
    rate_now = improvement / w
    saturated = overall >= rules.plateau_threshold and rate_overall >= 5 * max(rate_now, 0.0)
    steady = overall < rules.plateau_threshold or rate_overall <= 2 * rate_now
    if not (saturated or steady):
        return None  # still decelerating: too early to tell a plateau from convergence
    creeping = steady and improvement > 0
    close = (
        same_scale
        and last.val is not None
        and math.isfinite(last.val)
        and abs(last.val - last.train) <= rules.close_ratio * abs(last.train)
    )
    evidence: dict[str, Any] = {
        "train_loss": last.train,
        "reference_loss": reference,
        "reference": "baseline" if baseline is not None else "initial",
        "improvement_over_window": round(improvement, 6),
        "window": w,
        **_oscillation(train, rules),
    }
    if last.val is not None:
        evidence["val_loss"] = last.val
    evidence["improvement_overall"] = round(overall, 6)
    falling_val = _validation_still_falling(points, rules)
    if falling_val:
        return None  # the validation loss still improves by more than its noise: nothing has stopped
    # How far the model got: the lower of the two losses when they are on one scale (a training loss inflated by
    # dropout, noise or augmentation understates it).
    lowest = min(last.train, last.val) if last.val is not None and same_scale else last.train
    progress = _progress(lowest, reference, initial)
    # ...or the validation loss's own fall since the first evaluation: held-out evidence of learning, on its own
    # scale (an N-BEATS whose first steps' loss was below what it rose to in epoch 0: 17% below the first steps,
    # but validation 43% below its first value). A validation loss that never moved adds nothing.
    vals = [p.val for p in points if p.val is not None and math.isfinite(p.val)]
    if len(vals) >= 2 and vals[0] > 0:
        learned = 1 - min(vals) / vals[0]
        if learned > max(progress, 0.0):
            progress = learned
            evidence["progress_from"] = "validation"
    evidence["progress"] = round(progress, 4)
    # Far from where it started, the loss may sit at the task's floor (label noise, Bayes error): a plateau there is
    # info unless another finding explains it (the end-of-fit gate then makes it a warning). Not at chance level.
    floor = progress >= rules.floor_progress and not _at_chance(lowest, chance, evidence)
    severity: Severity = "info" if floor else "warning"
    if floor:
        evidence["floor_possible"] = 1
    if close and saturated:
        return _verdict(
            "underfitting",
            severity,
            f"Plateau at a high loss: the training loss has stopped improving at {_fmt(last.train)} "
            f"({last.train / reference:.0%} of the {evidence['reference']} loss {_fmt(reference)}) and the "
            f"validation loss ({_fmt(last.val or 0.0)}) follows it closely: either the task's floor (label noise, "
            "overlapping classes) or a model that cannot fit the training data (underfitting).",
            last.x,
            evidence,
            _UNDERFIT_ADVICE,
        )
    how = "is still falling at its usual slow rate, by less than" if creeping else "improved by less than"
    return _verdict(
        "loss_plateau",
        severity,
        f"The training loss {how} {rules.plateau_threshold:.0%} over the last {w} evaluations, at {_fmt(last.train)} "
        f"({last.train / reference:.0%} of the {evidence['reference']} loss {_fmt(reference)}).",
        last.x,
        evidence,
        _PLATEAU_ADVICE_CREEPING if creeping else _PLATEAU_ADVICE,
    )


def _validation_still_falling(points: Sequence[CurvePoint], rules: CurveRules) -> bool:
    """Whether the validation loss improved over the last ``patience`` evaluations by more than its noise."""
    vals = [p.val for p in points if p.val is not None and math.isfinite(p.val)]
    if len(vals) <= rules.patience:
        return False
    return vals[-rules.patience - 1] - vals[-1] > max(
        2 * noise(vals), rules.plateau_threshold * abs(vals[-1])
    )


def _validation_never_improved(
    points: Sequence[CurvePoint],
    rules: CurveRules,
    baseline: float | None,
    unit: str,
    same_scale: bool = True,
    initial: float | None = None,
    chance: float | None = None,
) -> Verdict | None:
    vals = [p.val for p in points if p.val is not None and math.isfinite(p.val)]
    if len(vals) <= rules.patience or not math.isfinite(points[0].train):
        return None
    if not same_scale:
        return None  # "high" is measured against the training loss's reference: meaningless on another scale
    reference = baseline if baseline is not None else points[0].train
    first, best, last = vals[0], min(vals), vals[-1]
    if reference <= 0 or first <= 0:
        return None
    if (first - best) / first >= rules.plateau_threshold or last <= rules.high_ratio * reference:
        return None
    if points[-1].train <= rules.high_ratio * reference:
        return None  # training fell far while validation did not move: the overfitting rules' case
    progress = _progress(best, reference, initial)
    at_chance: dict[str, Any] = {}
    # learned a lot by the first evaluation: maybe at the task's floor (not when that is a uniform guess's loss)
    floor = progress >= rules.floor_progress and not _at_chance(best, chance, at_chance)
    return _verdict(
        "loss_plateau",
        "info" if floor else "warning",
        f"The validation loss has not improved in {len(vals)} evaluations: {_fmt(first)} at the first, {_fmt(best)} "
        f"at best, {_fmt(last)} at {_x(points[-1], unit)} (training loss {_fmt(points[-1].train)}): nothing the model "
        "learns carries over to the validation data.",
        points[-1].x,
        {
            "val_loss": last,
            "first_val_loss": first,
            "best_val_loss": best,
            "train_loss": points[-1].train,
            "reference_loss": reference,
            "evaluations": len(vals),
            "progress": round(progress, 4),
            **at_chance,
            **({"floor_possible": 1} if floor else {}),
        },
        _VAL_FLAT_ADVICE,
    )


def _x(point: CurvePoint, unit: str) -> str:
    """Where an evaluation happened, in the words of Lightning (0-based epoch index) when ``x`` counts epochs."""
    if unit != "epoch":
        return f"{unit} {point.x:g}"
    return f"epoch {_epoch_index(point.x)}" + (
        "" if float(point.x).is_integer() else f", {point.x % 1:.0%} through"
    )


def _epoch_index(x: float) -> int:
    """The 0-based index of the epoch an evaluation at ``x`` epochs completed belongs to."""
    return max(math.ceil(x) - 1, 0)


_DIVERGENCE_ADVICE = [
    "The learning rate is likely too high: lower it (by 3-10x), or add/lengthen a warmup (WarmupCosine).",
    "Clip gradients (GradClip) to keep single bad steps from throwing the weights off.",
    "Under float16 AMP, prefer bf16-mixed; NaNGuard can skip or roll back the steps that blow up.",
]
_OVERFIT_ADVICE = [
    "Keep the weights of the best evaluation (EarlyStop(restore_best_weights=True)) and stop around the onset.",
    "Regularise: weight decay, dropout, data augmentation; or reduce the model's capacity.",
    "Get more training data, or check that train and validation come from the same distribution.",
]
_UNDERFIT_ADVICE = [
    "Compare the plateau with the task's floor: label noise or overlapping classes set a loss no model beats.",
    "Below that floor: increase capacity (width, depth) or use a better-suited architecture or features.",
    "Check the regularisation (weight decay, dropout) is not so strong that the weights cannot grow.",
    "If the loss never moved from its initial value, check that gradients reach the weights (GradNormMonitor).",
]
_VAL_FLAT_ADVICE = [
    "Check the regularisation: weight decay or dropout so strong the model cannot learn keeps it at chance.",
    "Check the labels and inputs of the validation data match the training data (same preprocessing, order).",
    "Check that gradients reach the weights and that the learning rate is not far too low or too high.",
]
_PLATEAU_ADVICE_CREEPING = [
    "The loss keeps falling slowly at every evaluation: the learning rate is probably too low; raise it 3-10x.",
    "Check the schedule: a warmup that is too long or a decay that starts too early has the same effect.",
]
_PLATEAU_ADVICE = [
    "Check the learning rate with a short range test: too low creeps, too high (or no warmup) stalls at a high loss.",
    "Check capacity and the data (labels, normalisation); the model may have learned all it can from them.",
]


def stopped_verdict(reason: str, x: float) -> Verdict:
    """OverfitDetector stopped the run (``action="stop"``) at curve position ``x`` (epochs done) for ``reason``."""
    epoch = max(math.ceil(x) - 1, 0)
    return Verdict(
        "early_stopped",
        "info",
        f"OverfitDetector stopped training at epoch {epoch}: {reason}.",
        {"reason": reason, "x": x, "stopped_epoch": epoch},
        ["Keep the best weights with EarlyStop(restore_best_weights=True) in the same Trainer."],
    )
