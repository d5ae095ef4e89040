"""One diagnosis per run: pick the ``primary`` finding and link the others to their cause (``caused_by``).

The findings of a run are often symptoms of one cause: a learning rate far too high makes the gradient norm
explode, then the loss turns non-finite, then the gradients collapse to zero and the loss plateaus. This module
turns that list into one diagnosis with a documented rule table, :data:`RULES`. Each rule reads: *a finding
with a code in* ``cause`` *explains a finding with a code in* ``effect`` *when* ``order`` *holds between their
first steps*. Rules are tried in table order; a finding gets the first cause that matches (the earliest one
when several findings of the cause codes match), and never a cause that it (transitively) explains itself.

| rule | cause | explains | when |
|---|---|---|---|
| ``silent_bug`` | ``stale_gradients``, ``optimizer_no_op``, ``wrong_mode``, ``repeated_data`` | exploding/vanishing gradients, loss spike, divergence, non-finite values and metrics, plateau, underfitting, overfitting, early stop | any |
| ``bad_input`` | ``non_finite_input`` | non-finite loss/gradients/parameters, divergence, early stop | same step or later |
| ``input_scale`` | ``input_scale`` | exploding/vanishing gradients, loss spike, divergence, non-finite values, loss at init, dead/saturated units | same step or later |
| ``fp16_overflow`` | ``amp_overflow`` | non-finite loss/gradients/parameters, loss spike, divergence | same step or later |
| ``one_spike`` | ``exploding_gradients`` | loss spike | within 10 steps |
| ``lr_too_high`` | ``exploding_gradients``, ``loss_spike`` | vanishing gradients (a collapse to 0), plateau, underfitting, divergence, non-finite values, dead/saturated units | same step or later |
| ``init_scale`` | ``activation_scale`` | exploding/vanishing gradients, loss spike, divergence, non-finite values, loss at init, dead/saturated units, plateau, underfitting | same step or later |
| ``diverged`` | ``divergence`` | non-finite values, vanishing gradients, plateau, underfitting, early stop | same step or later |
| ``non_finite_chain`` | ``non_finite_loss`` | non-finite gradients/parameters/metrics, divergence, early stop, plateau | same step or later |
| ``non_finite_grads`` | ``non_finite_gradients`` | non-finite parameters/loss/metrics, divergence, early stop | same step or later |
| ``dead_layer`` | ``dead_units``, ``saturated_activations`` | vanishing gradients, plateau, underfitting | any |
| ``no_gradient`` | ``missing_gradients`` | vanishing gradients, plateau, underfitting | any |
| ``vanished`` | ``vanishing_gradients`` (not when the weights themselves shrank: a weight decay far too strong) | plateau, underfitting | same step or later |
| ``sorted_labels`` | ``label_distribution`` (the data ordered by label: a fact) | loss spike, exploding gradients, plateau, underfitting | any |
| ``squashed_twice`` | ``loss_at_init`` (softmax/sigmoid applied twice: a fact) | plateau, underfitting, vanishing gradients | same step or later |
| ``stopped_by_overfitting`` | ``overfitting`` | early stop | any |
| ``stopped_by_plateau`` | ``loss_plateau``, ``underfitting`` | early stop | any |
| ``memory_leak`` | ``memory_growth`` | out of memory, memory pressure | same step or later |
| ``fragmented_cache`` | ``memory_fragmentation`` | out of memory | same step or later |

A rule marked *a fact* links only a cause whose evidence says ``certain`` (its rule established it, rather than
guessed it from one batch): a first batch that happens to hold one class explains nothing.

The ``primary`` finding is the root of the warning/error findings (following causes up while they are
warning/error findings themselves: an info finding is never primary) that explains the most of them; ties go to the higher-ranked code of :data:`PRIORITY` (correctness before speed, causes before
symptoms), then to the earlier finding. A run without warning/error findings has no primary (``None``).

Advice never contradicts the evidence (:func:`consistent_advice`): once a finding shows the learning rate is too
high rather than too low (an exploding or spiking gradient norm, a loss spike, divergence, a non-finite value, an
fp16 overflow, or gradients that collapsed to exactly 0), no finding advises raising the learning rate or
training longer at it; such a line is replaced by one that points at the evidence.

Everything here works on plain dicts (``Finding.to_dict()``): stdlib only, testable without a Trainer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "LR_TOO_HIGH_CODES",
    "PRIORITY",
    "RULES",
    "Diagnosis",
    "Rule",
    "consistent_advice",
    "diagnose",
    "explains",
    "finding_ids",
]

_NON_FINITE = ("non_finite_loss", "non_finite_gradients", "non_finite_parameters")
#: how close (in steps) two findings must be for a ``"near"`` rule
NEAR_STEPS = 10
_CURVE = ("loss_plateau", "underfitting")
_ACTIVATIONS = ("dead_units", "saturated_activations")


@dataclasses.dataclass(frozen=True)
class Rule:
    """A finding with a code in ``cause`` explains one with a code in ``effect`` (see the module docstring).

    ``order`` is ``"after"`` (the effect was first seen at the cause's first step or later), ``"near"`` (within
    :data:`NEAR_STEPS` steps either way) or ``"any"``.
    """

    name: str
    cause: tuple[str, ...]
    effect: tuple[str, ...]
    order: str
    why: str
    #: the cause links only when its rule marked it a fact (``evidence["certain"]``), not a guess
    cause_needs_certain: bool = False


RULES: tuple[Rule, ...] = (
    Rule(
        "silent_bug",
        ("stale_gradients", "optimizer_no_op", "wrong_mode", "repeated_data"),
        (
            "exploding_gradients",
            "loss_spike",
            "divergence",
            *_NON_FINITE,
            "vanishing_gradients",
            "non_finite_metric",
            *_CURVE,
            "overfitting",
            "early_stopped",
        ),
        "any",
        "a silent bug (gradients never zeroed, an update that changes nothing, a module in the wrong mode, the same "
        "batch again) makes the curves and norms misbehave: they are its symptoms",
    ),
    Rule(
        "bad_input",
        ("non_finite_input",),
        (*_NON_FINITE, "divergence", "early_stopped", "loss_spike"),
        "after",
        "a NaN/Inf in the batch propagates into the loss, the gradients and the weights",
    ),
    Rule(
        "input_scale",
        ("input_scale",),
        (
            "exploding_gradients",
            "loss_spike",
            "divergence",
            *_NON_FINITE,
            "loss_at_init",
            "vanishing_gradients",
            *_ACTIVATIONS,
        ),
        "after",
        "unnormalised inputs make the first layer's gradients and the initial loss huge",
    ),
    Rule(
        "fp16_overflow",
        ("amp_overflow",),
        (*_NON_FINITE, "loss_spike", "divergence", "exploding_gradients"),
        "after",
        "values overflowed float16 first; the non-finite loss/gradients follow from the overflow",
    ),
    Rule(
        "one_spike",
        ("exploding_gradients",),
        ("loss_spike",),
        "near",
        "a gradient-norm spike and a loss spike within a few steps are one event, seen twice",
    ),
    Rule(
        "lr_too_high",
        ("exploding_gradients", "loss_spike"),
        (
            "vanishing_gradients",
            *_CURVE,
            "divergence",
            *_NON_FINITE,
            "early_stopped",
            "missing_gradients",
            *_ACTIVATIONS,
        ),
        "after",
        "an exploding/spiking norm before a collapse or a blow-up: the learning rate is too high",
    ),
    Rule(
        "init_scale",
        ("activation_scale",),
        (
            "exploding_gradients",
            "vanishing_gradients",
            "loss_spike",
            "divergence",
            *_NON_FINITE,
            "loss_at_init",
            *_ACTIVATIONS,
            *_CURVE,
        ),
        "after",
        "an initialisation that shrinks or grows the activations layer by layer shrinks or grows the gradients alike",
    ),
    Rule(
        "diverged",
        ("divergence",),
        (*_NON_FINITE, "vanishing_gradients", *_CURVE, "early_stopped"),
        "after",
        "once training diverged, what follows (non-finite values, dead gradients, a flat loss) is its consequence",
    ),
    Rule(
        "non_finite_chain",
        ("non_finite_loss",),
        (
            "non_finite_gradients",
            "non_finite_parameters",
            "divergence",
            "early_stopped",
            "non_finite_metric",
            *_CURVE,
        ),
        "after",
        "a non-finite loss makes the gradients and then the weights (and so the validation metrics) non-finite",
    ),
    Rule(
        "non_finite_grads",
        ("non_finite_gradients",),
        ("non_finite_parameters", "non_finite_loss", "divergence", "early_stopped", "non_finite_metric"),
        "after",
        "a non-finite gradient step makes the weights (and so the loss) non-finite",
    ),
    Rule(
        "dead_layer",
        _ACTIVATIONS,
        ("vanishing_gradients", *_CURVE),
        "any",
        "units that never fire (or sit saturated) pass no gradient: the layers before them and the loss stall",
    ),
    Rule(
        "no_gradient",
        ("missing_gradients",),
        ("vanishing_gradients", *_CURVE),
        "any",
        "parameters that get no gradient never learn: small norms and a flat loss follow",
    ),
    Rule(
        "vanished",
        ("vanishing_gradients",),
        _CURVE,
        "after",
        "layers with ~0 gradient do not learn, so the loss stops improving",
    ),
    Rule(
        "sorted_labels",
        ("label_distribution",),
        ("loss_spike", "exploding_gradients", *_CURVE),
        "any",
        "single-class batches make the loss and the gradient jump at each class boundary",
        cause_needs_certain=True,
    ),
    Rule(
        "squashed_twice",
        ("loss_at_init",),
        (*_CURVE, "vanishing_gradients"),
        "after",
        "softmax (or sigmoid) applied before a loss that applies it again: the loss cannot go below its floor and "
        "the gradients are squashed",
        cause_needs_certain=True,
    ),
    Rule(
        "stopped_by_overfitting",
        ("overfitting",),
        ("early_stopped",),
        "any",
        "the validation loss stopped improving because the model overfits",
    ),
    Rule(
        "stopped_by_plateau",
        _CURVE,
        ("early_stopped",),
        "any",
        "the validation loss stopped improving because training did",
    ),
    Rule(
        "memory_leak",
        ("memory_growth",),
        ("out_of_memory", "memory_pressure"),
        "after",
        "memory that grows every step (or epoch, or validation) runs out in the end",
    ),
    Rule(
        "fragmented_cache",
        ("memory_fragmentation",),
        ("out_of_memory",),
        "after",
        "a fragmented cache cannot serve an allocation that would fit in the free memory",
    ),
)

#: Rank of the codes when two roots explain as many findings (first = preferred primary).
PRIORITY: tuple[str, ...] = (
    "uneven_batches",  # the run was refused before it could hang
    "training_hang",  # a stuck run is the run's problem, whatever else was seen before it
    "stale_gradients",
    "optimizer_no_op",
    "wrong_mode",
    "repeated_data",
    "replica_divergence",
    "non_finite_input",
    "input_scale",
    "activation_scale",
    "batch_dependence",
    "missing_gradients",
    "label_distribution",
    "amp_overflow",
    "exploding_gradients",
    "loss_spike",
    "divergence",
    "non_finite_loss",
    "non_finite_gradients",
    "non_finite_parameters",
    "loss_at_init",
    "dead_units",
    "saturated_activations",
    "vanishing_gradients",
    "cannot_overfit_batch",
    "overfitting",
    "underfitting",
    "loss_plateau",
    "straggler",
    "dataloader_bound",
    "host_sync",
    "dataloader_config",
    "non_finite_metric",
    "early_stopped",
)

#: Codes whose presence shows the learning rate is (at least sometimes) too high, never too low.
LR_TOO_HIGH_CODES: frozenset[str] = frozenset(
    {"exploding_gradients", "loss_spike", "divergence", "amp_overflow", *_NON_FINITE}
)

_LOUD = ("warning", "error")
#: advice that says "go faster": a higher/raised/larger learning rate, "the learning rate is too low", "raise it"
_RAISE_LR = re.compile(
    r"(higher|raise|raising|increase|increasing|larger|bigger)\b[^.;]*\b(learning rate|lr)\b"
    r"|\b(learning rate|lr)\b[^.;]*\b(higher|raise it|increase it|too low|too small)\b",
    re.IGNORECASE,
)


@dataclasses.dataclass
class Diagnosis:
    """The diagnosis of one run.

    ``primary``: the id of the primary finding (``None`` without warning/error findings); ``caused_by``: id -> id
    of the finding that explains it; ``rules``: id -> name of the rule that linked it; ``advice``: id -> the advice
    after :func:`consistent_advice` (only for findings whose advice changed).
    """

    primary: str | None
    caused_by: dict[str, str]
    rules: dict[str, str]
    advice: dict[str, list[str]]


def finding_ids(findings: Sequence[Mapping[str, Any]]) -> list[str]:
    """Stable ids in report order: ``"<code>@<step>"``, with ``#2``, ``#3``... for repeats of the same pair."""
    seen: dict[str, int] = {}
    ids = []
    for f in findings:
        base = f"{f['code']}@{int(f.get('step', 0))}"
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return ids


def _collapsed_to_zero(finding: Mapping[str, Any]) -> bool:
    """A vanishing finding whose evidence shows gradients of exactly 0 (dead, not small)."""
    if finding.get("code") != "vanishing_gradients":
        return False
    evidence = finding.get("evidence") or {}
    for key in ("smallest_norm", "worst_norm", "norm", "total_norm"):
        value = evidence.get(key)
        if isinstance(value, (int, float)) and value == 0:
            return True
    return bool(evidence.get("exactly_zero"))


def explains(rule: Rule, cause: Mapping[str, Any], effect: Mapping[str, Any]) -> bool:
    """Whether ``rule`` links ``cause`` to ``effect`` (codes and the order of their first steps)."""
    if cause.get("code") not in rule.cause or effect.get("code") not in rule.effect:
        return False
    if (
        rule.name == "lr_too_high"
        and effect.get("code") == "vanishing_gradients"
        and cause.get("code") == "loss_spike"
    ):
        return _collapsed_to_zero(effect)
    if rule.cause_needs_certain and not (cause.get("evidence") or {}).get("certain"):
        return False  # a guess (one single-class batch, an odd loss at init) explains nothing
    if rule.name == "vanished" and (cause.get("evidence") or {}).get("weights_shrunk"):
        return (
            False  # the weights collapsed (weight decay): the vanishing gradients are a symptom of that too
        )
    if rule.order == "after":
        return int(effect.get("step", 0)) >= int(cause.get("step", 0))
    if rule.order == "near":
        return abs(int(effect.get("step", 0)) - int(cause.get("step", 0))) <= NEAR_STEPS
    return True


def diagnose(findings: Sequence[Mapping[str, Any]], ids: Sequence[str] | None = None) -> Diagnosis:
    """Apply :data:`RULES` to ``findings`` (dicts in report order) and pick the primary finding."""
    ids = list(ids) if ids is not None else finding_ids(findings)
    caused_by: dict[str, str] = {}
    rules: dict[str, str] = {}

    def root(i: str) -> str:
        seen = set()
        while i in caused_by and i not in seen:
            seen.add(i)
            i = caused_by[i]
        return i

    by_id = dict(zip(ids, findings, strict=True))
    for rule in RULES:
        for eid, effect in zip(ids, findings, strict=True):
            if eid in caused_by:
                continue
            candidates = [
                (int(c.get("step", 0)), cid)
                for cid, c in zip(ids, findings, strict=True)
                if cid != eid and explains(rule, c, effect) and root(cid) != eid
            ]
            if candidates:
                caused_by[eid] = min(candidates)[1]
                rules[eid] = rule.name

    def loud_root(i: str) -> str:
        """Follow the causes up while they are warning/error findings (an info cause is not a diagnosis)."""
        seen = {i}
        while i in caused_by and by_id[caused_by[i]].get("severity") in _LOUD and caused_by[i] not in seen:
            i = caused_by[i]
            seen.add(i)
        return i

    explained: dict[str, int] = {}
    for i in ids:
        if by_id[i].get("severity") in _LOUD:
            r = loud_root(i)
            explained[r] = explained.get(r, 0) + 1
    primary: str | None = None
    if explained:
        rank = {code: n for n, code in enumerate(PRIORITY)}
        order = {i: n for n, i in enumerate(ids)}
        primary = min(
            explained,
            key=lambda i: (-explained[i], rank.get(str(by_id[i]["code"]), len(rank)), order[i]),
        )
    advice = consistent_advice(findings, ids)
    return Diagnosis(primary=primary, caused_by=caused_by, rules=rules, advice=advice)


def lr_too_high_evidence(findings: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The first finding showing the learning rate is too high rather than too low, or ``None``."""
    for f in findings:
        if f.get("severity") in _LOUD and (f.get("code") in LR_TOO_HIGH_CODES or _collapsed_to_zero(f)):
            return f
    return None


def consistent_advice(
    findings: Sequence[Mapping[str, Any]], ids: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Advice lines that contradict the evidence, replaced: id -> the corrected advice (changed findings only).

    With evidence that the learning rate is too high (:func:`lr_too_high_evidence`), a line advising a higher
    learning rate becomes a pointer to that evidence; a repeated pointer within one finding is dropped.
    """
    ids = list(ids) if ids is not None else finding_ids(findings)
    evidence = lr_too_high_evidence(findings)
    if evidence is None:
        return {}
    pointer = (
        f"Do not raise the learning rate: `{evidence['code']}` at step {int(evidence.get('step', 0))} shows it is "
        "already too high; lower it (3-10x) or add a warmup instead."
    )
    changed: dict[str, list[str]] = {}
    for fid, f in zip(ids, findings, strict=True):
        lines = [str(a) for a in f.get("advice", [])]
        fixed: list[str] = []
        for line in lines:
            new = pointer if _RAISE_LR.search(line) else line
            if new not in fixed:
                fixed.append(new)
        if fixed != lines:
            changed[fid] = fixed
    return changed
