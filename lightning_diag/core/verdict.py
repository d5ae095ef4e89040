"""The one result type of lightning_diag's rules: what a check concluded, before it becomes a Finding.

Every rule in ``core/`` (learning curves, pre-flight checks, ...) returns :class:`Verdict` objects; a callback
records one with ``DiagCallback.record(trainer, verdict)``, which stamps it with the step, epoch and source and
turns it into a :class:`~lightning_diag.Finding`. :func:`fails` is the one ``fail_on`` rule (SanityCheck,
``lightning-diag report/doctor --fail-on``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["SEVERITIES", "FailOn", "Severity", "Verdict", "fails", "non_finite_metric"]

Severity = Literal["info", "warning", "error"]
FailOn = Literal["never", "info", "warning", "error"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error")


@dataclasses.dataclass
class Verdict:
    """One conclusion: a finding code, its severity, a message, evidence and advice.

    Attributes:
        x: where on a learning curve the rule saw it, in the rule's unit (epochs or steps), when that applies.
    """

    code: str
    severity: Severity
    message: str
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    advice: list[str] = dataclasses.field(default_factory=list)
    x: float | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}, got {self.severity!r}.")


def fails(severity: str, fail_on: str) -> bool:
    """Whether a result of ``severity`` reaches the ``fail_on`` threshold (``"never"``: nothing does).

    Example:
        >>> fails("warning", "error"), fails("error", "warning"), fails("error", "never")
        (False, True, False)
    """
    if fail_on == "never":
        return False
    order: dict[str, int] = {name: i for i, name in enumerate(SEVERITIES)}
    return order[severity] >= order[fail_on]


def non_finite_metric(key: str, value: float, who: str) -> Verdict:
    """The finding for a monitored metric that is NaN/Inf (recorded once per key, then counted)."""
    return Verdict(
        "non_finite_metric",
        "warning",
        f"`{key}` is {value} ({who} cannot judge the run from it). A NaN/Inf loss usually means the model "
        "diverged or the metric divides by zero (an empty validation set, a mask with no element).",
        {"metric": key, "value": str(value)},
        [
            "Check the metric's computation on the validation data (empty batches, log of 0, division by 0).",
            "If the training loss is non-finite too, the model diverged: add NaNGuard, lower the learning rate.",
        ],
    )
