"""A warning needs a consequence or a certainty: the severity policy of every finding code, and the gate that applies
it at the end of a run.

Every code is one of three kinds (:data:`POLICY`):

================  ==========================================================================================
kind              its severity
================  ==========================================================================================
``certain``       as its rule says: a fact that harms the run by itself or cannot be by design (a NaN/Inf,
                  no gradient path at all, a refused setting, a gradient that is never cleared, an update that
                  changes nothing, a hang, an out-of-memory stop)
``measured``      as its rule says: the rule itself measures a harm to the loss, a monitored metric, time or
                  memory (overfitting, a plateau, divergence, the time spent waiting for data, memory that will run
                  out)
``symptom``       ``warning`` only with a measured consequence, ``info`` otherwise: something unusual that
                  may or may not hurt (a gradient-norm surge, a loss spike, inputs far from unit scale, dead or
                  saturated units)
================  ==========================================================================================

A symptom has a consequence when (:func:`gate`):

* it explains (:data:`lightning_diag.core.diagnosis.RULES`, transitively) a warning/error finding that is
  ``certain`` or ``measured`` (a loss spike that led to divergence, vanishing gradients behind a plateau), or
* the training loss got worse after it and stayed worse: the median of the :data:`WINDOW` steps after its last
  occurrence is above the median of the (up to) :data:`WINDOW` steps before its first one by more than
  :data:`WORSE_BY` (relative) and more than 3 median absolute deviations, or a loss after it is NaN/Inf. A spike
  the loss recovers from within the window moves neither median; or
* the run died of an exception within :data:`WINDOW` steps of it (a library's solver that failed on the values
  it produced); or
* the run ends worse than a uniform guess, for a finding that names that chance level (:func:`above_chance`: the
  loss at initialisation against ln(C)); or
* the run learned (almost) nothing: its training loss moved less than :data:`MIN_PROGRESS` from its first steps to
  its last (:func:`stalled`); then any symptom in it may be why.

A plateau (or underfitting) reported during the run is ``info`` after all when it ended: the training loss fell again
after it, by more than :data:`MIN_PROGRESS` of the plateau's level (:func:`ended`; a slow stretch of a run that
went on learning harmed nothing lasting).

A plateau (or underfitting) far below where the loss started is recorded as ``info`` with
``evidence["floor_possible"]`` (it may be the task's floor, :mod:`lightning_diag.core.curves`): it becomes a
``warning`` when a loud finding explains it (its cause in the diagnosis table).

A finding of a symptom code can be a fact after all (:func:`kind`): the run was stopped for it, gradients that are
exactly 0, a rule that marked it ``certain``; those keep their severity.

Otherwise the symptom becomes ``info`` and says so in ``evidence["harm"]``. A symptom seen before any consequence
could be (SanityCheck's pre-flight checks) is recorded as ``info`` with ``evidence["pending"] = 1``: it becomes a
``warning`` at the end of fit if a consequence followed (so a pre-flight ``fail_on="warning"`` never stops a run for
something that may be by design). Nothing here touches a Trainer: the callbacks record, and the last lightning_diag
callback of the run applies the gate at the end of fit.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Literal

from lightning_diag.core.diagnosis import RULES, explains, finding_ids

__all__ = [
    "MIN_PROGRESS",
    "POLICY",
    "WINDOW",
    "WORSE_BY",
    "Kind",
    "above_chance",
    "ended",
    "gate",
    "kind",
    "loss_harm",
    "stalled",
]

Kind = Literal["certain", "measured", "symptom"]

#: The kind of every finding code (see the module docstring). A code missing here is ``certain``.
POLICY: dict[str, Kind] = {
    # certain: facts
    "non_finite_loss": "certain",
    "non_finite_gradients": "certain",
    "non_finite_parameters": "certain",
    "non_finite_input": "certain",
    "non_finite_metric": "certain",
    "missing_gradients": "certain",
    "batch_dependence": "certain",
    "internal_error": "certain",
    "declined": "certain",
    "missing_metric": "certain",
    "optimizer_no_op": "certain",
    "stale_gradients": "certain",
    "wrong_mode": "certain",
    "replica_divergence": "certain",
    "repeated_data": "certain",
    "grad_noise_scale": "certain",
    "dataloader_config": "certain",
    "training_hang": "certain",
    "uneven_batches": "certain",
    "out_of_memory": "certain",
    # measured: the rule measures the harm itself
    "overfitting": "measured",
    "underfitting": "measured",
    "loss_plateau": "measured",
    "divergence": "measured",
    "early_stopped": "measured",
    "cannot_overfit_batch": "measured",
    "amp_overflow": "measured",
    "dataloader_bound": "measured",
    "host_sync": "measured",
    "straggler": "measured",
    "step_time_outlier": "measured",
    "memory_growth": "measured",
    "memory_pressure": "measured",
    "memory_fragmentation": "measured",
    # symptoms: a warning only with a consequence
    "exploding_gradients": "symptom",
    "vanishing_gradients": "symptom",
    "loss_spike": "symptom",
    "input_scale": "symptom",
    "label_distribution": "symptom",
    "loss_at_init": "symptom",
    "dead_units": "symptom",
    "saturated_activations": "symptom",
    "activation_scale": "symptom",
}

#: Steps of training loss on each side of a symptom that :func:`loss_harm` compares.
WINDOW = 20
#: How much worse (relative) the median loss after a symptom must be than before it.
WORSE_BY = 0.25
#: The least relative progress of the training loss over a run that still counts as learning.
MIN_PROGRESS = 0.1
_LOUD = ("warning", "error")
#: The codes of a plateau: a run that leaves it afterwards was not harmed by it (:func:`ended`).
_PLATEAUS = ("loss_plateau", "underfitting")


def loss_harm(first: int, last: int, losses: Sequence[tuple[int, float]]) -> str:
    """What the training loss did after a symptom seen from step ``first`` to step ``last``: a sentence when it got
    worse and stayed worse (or went non-finite), ``""`` otherwise (including when too few steps were seen).

    ``losses``: ``(step, loss)`` in step order.

    Example:
        >>> steady = [(s, 1.0 - 0.01 * s) for s in range(60)]
        >>> loss_harm(30, 30, steady)
        ''
        >>> worse = [(s, 1.0 if s < 30 else 3.0) for s in range(60)]
        >>> loss_harm(30, 30, worse)
        'the training loss rose from a median of 1 over the 20 steps before to 3 over the 20 after'
    """
    steps = [s for s, _ in losses]
    start = bisect.bisect_left(steps, first)
    end = bisect.bisect_right(steps, last)
    before = [v for _, v in losses[max(0, start - WINDOW) : start] if math.isfinite(v)]
    after = [v for _, v in losses[end : end + WINDOW]]
    if any(not math.isfinite(v) for v in after):
        bad = next(s for s, v in losses[end : end + WINDOW] if not math.isfinite(v))
        return f"the training loss became non-finite at step {bad}"
    if not before or len(after) < 3:
        return ""
    pre, post = statistics.median(before), statistics.median(after)
    spread = statistics.median(abs(v - pre) for v in before)
    if post > pre + WORSE_BY * abs(pre) and post > pre + 3 * spread:
        return (
            f"the training loss rose from a median of {pre:.4g} over the {len(before)} steps before to {post:.4g} "
            f"over the {len(after)} after"
        )
    return ""


def stalled(losses: Sequence[tuple[int, float]]) -> str:
    """A sentence when the training loss barely moved over the whole run: the median of its last :data:`WINDOW`
    steps (a third of the run, for a short one) is above ``1 - MIN_PROGRESS`` of the median of its first ones (a
    run that learns nothing: any symptom in it may be why); ``""`` otherwise, or for a run too short to tell
    (fewer than 15 steps).

    Example:
        >>> stalled([(s, 2.30 - 0.0001 * s) for s in range(100)]).startswith("the training loss barely moved")
        True
        >>> stalled([(s, 2.30 * 0.98**s) for s in range(100)])
        ''
    """
    finite = [v for _, v in losses if math.isfinite(v)]
    window = min(WINDOW, len(finite) // 3)
    if window < 5:
        return ""
    first, last = statistics.median(finite[:window]), statistics.median(finite[-window:])
    if first <= 0 or last < (1 - MIN_PROGRESS) * first:
        return ""
    return f"the training loss barely moved over the run: a median of {first:.4g} at the start, {last:.4g} at the end"


def above_chance(finding: Mapping[str, Any], losses: Sequence[tuple[int, float]]) -> str:
    """A sentence when the run ends with a training loss above the chance level its finding names (``expected``:
    ln(C) for a C-class cross-entropy, the loss of a uniform guess), ``""`` otherwise: a model that ends worse than
    guessing was harmed by whatever made it start there.
    """
    evidence = finding.get("evidence") or {}
    chance = evidence.get("expected")
    what = str(evidence.get("expected_is", "the loss of a uniform guess"))
    finite = [v for _, v in losses if math.isfinite(v)]
    if not isinstance(chance, (int, float)) or len(finite) < 5:
        return ""
    final = statistics.median(finite[-min(WINDOW, len(finite)) :])
    if final <= chance:
        return ""
    return f"the training loss still ends at {final:.4g}, above {chance:.4g}, {what}"


def ended(finding: Mapping[str, Any], losses: Sequence[tuple[int, float]]) -> str:
    """A sentence when a plateau finding (``loss_plateau``/``underfitting``, at the training loss
    ``evidence["train_loss"]``) did not last: the median of the last :data:`WINDOW` training losses after its last
    occurrence is below ``1 - MIN_PROGRESS`` of its level; ``""`` otherwise (or with fewer than :data:`WINDOW`
    steps after it).

    Example:
        >>> flat_then_falling = [(s, 1.0 if s < 100 else 1.0 - 0.004 * (s - 100)) for s in range(200)]
        >>> ended({"code": "loss_plateau", "step": 90, "evidence": {"train_loss": 1.0}}, flat_then_falling)
        'none lasting: the training loss fell again after it, from 1 to a median of 0.642 over the last 20 steps'
        >>> ended({"code": "loss_plateau", "step": 90, "evidence": {"train_loss": 1.0}}, flat_then_falling[:110])
        ''
    """
    level = (finding.get("evidence") or {}).get("train_loss")
    if finding.get("code") not in _PLATEAUS or not isinstance(level, (int, float)) or not level > 0:
        return ""
    last = int(finding.get("last_step") or finding.get("step", 0))
    after = [v for s, v in losses if s > last and math.isfinite(v)]
    if len(after) < WINDOW:
        return ""
    final = statistics.median(after[-WINDOW:])
    if final >= (1 - MIN_PROGRESS) * level:
        return ""
    return (
        f"none lasting: the training loss fell again after it, from {level:.4g} to a median of {final:.4g} over the "
        f"last {WINDOW} steps"
    )


def kind(finding: Mapping[str, Any]) -> Kind:
    """The kind of one finding: its code's (:data:`POLICY`), made ``certain`` by its evidence when the finding is
    a fact after all: the run was stopped for it (``action="raise"``), gradients that are exactly 0 (no gradient
    reaches those layers at all), or a rule that marked it ``certain`` (softmax applied twice before a loss).
    """
    evidence = finding.get("evidence") or {}
    if evidence.get("action") == "raise" or evidence.get("certain"):
        return "certain"
    if finding.get("code") == "vanishing_gradients" and evidence.get("smallest_norm") == 0:
        return "certain"
    return POLICY.get(str(finding.get("code")), "certain")


def _effects(findings: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> dict[str, list[str]]:
    """Id -> the ids of the findings it explains directly by some rule of the diagnosis table (any severity)."""
    found: dict[str, list[str]] = {i: [] for i in ids}
    for rule in RULES:
        for cid, cause in zip(ids, findings, strict=True):
            for eid, effect in zip(ids, findings, strict=True):
                if cid != eid and explains(rule, cause, effect):
                    found[cid].append(eid)
    return found


def gate(
    findings: Sequence[MutableMapping[str, Any]],
    losses: Sequence[tuple[int, float]] = (),
    *,
    died_at: int | None = None,
    error: str = "",
) -> list[tuple[int, str]]:
    """Apply the severity policy to a run's findings (dicts, as ``Finding.to_dict()`` or ``Finding.__dict__``):
    every loud ``symptom`` without a consequence becomes ``info``, every pending one with a consequence a
    ``warning``; each gets ``evidence["harm"]`` saying what was (or was not) measured. Returns ``(index, new
    severity)`` for the findings it changed. ``died_at``: the step at which the run died of an exception (``error``):
    a symptom seen within :data:`WINDOW` steps before it is a consequence's cause candidate too.

    Example:
        >>> spike = {"code": "exploding_gradients", "severity": "warning", "step": 30, "last_step": 30, "evidence": {}}
        >>> gate([spike], [(s, 1.0 - 0.01 * s) for s in range(60)])
        [(0, 'info')]
        >>> spike["severity"], spike["evidence"]["harm"]
        ('info', 'none measured: the training loss kept its course after it')
    """
    ids = finding_ids(findings)
    effects = _effects(findings, ids)
    by_id = dict(zip(ids, findings, strict=True))

    def consequence(start: str) -> Mapping[str, Any] | None:
        seen, todo = {start}, list(effects[start])
        while todo:
            i = todo.pop(0)
            if i in seen:
                continue
            seen.add(i)
            effect = by_id[i]
            if effect.get("severity") in _LOUD and kind(effect) != "symptom":
                return effect
            todo += effects[i]
        return None

    whole_run = stalled(losses)
    changed: list[tuple[int, str]] = []
    # A plateau the run went on to leave is no lasting harm: judged first, so it is no consequence of a symptom.
    for index, finding in enumerate(findings):
        over = ended(finding, losses) if finding.get("severity") == "warning" else ""
        if over:
            finding.setdefault("evidence", {})["harm"] = over
            finding["severity"] = "info"
            changed.append((index, "info"))
    for index, (fid, finding) in enumerate(zip(ids, findings, strict=True)):
        evidence = finding.setdefault("evidence", {})
        pending = bool(evidence.pop("pending", 0))
        if kind(finding) != "symptom":
            continue
        if finding.get("severity") not in _LOUD and not pending:
            continue
        effect = consequence(fid)
        first = int(finding.get("step", 0))
        last = int(finding.get("last_step") or first)
        died = died_at is not None and first <= died_at <= last + WINDOW
        harm = (
            f"led to {effect['code']} at step {int(effect.get('step', 0))}"
            if effect is not None
            else (f"the run died of {error or 'an exception'} at step {died_at}" if died else "")
            or loss_harm(first, last, losses)
            or above_chance(finding, losses)
            or whole_run
        )
        if not harm:
            harm = (
                "none measured: the training loss kept its course after it"
                if losses
                else "none measured: no training loss was observed and no other finding followed from it"
            )
        evidence["harm"] = harm
        severity = "info" if harm.startswith("none measured") else "warning"
        if finding.get("severity") not in (severity, "error"):
            finding["severity"] = severity
            changed.append((index, severity))
    # A plateau far below where the loss started may be the task's floor: a warning only when a loud finding explains
    # it (its cause, by the diagnosis table).
    for index, (fid, finding) in enumerate(zip(ids, findings, strict=True)):
        evidence = finding.get("evidence") or {}
        if not evidence.get("floor_possible") or finding.get("severity") in _LOUD or ended(finding, losses):
            continue
        cause = next(
            (by_id[c] for c in ids if fid in effects[c] and by_id[c].get("severity") in _LOUD),
            None,
        )
        if cause is not None:
            evidence["cause"] = f"{cause['code']} at step {int(cause.get('step', 0))}"
            finding["severity"] = "warning"
            changed.append((index, "warning"))
    return changed
