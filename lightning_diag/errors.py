"""Every exception and warning lightning_diag raises that a user may want to catch, in one place.

All of them are also exported from the package root (``from lightning_diag import NonFiniteError``).

Exceptions raised on purpose derive from :class:`Deliberate`: the hook containment
(:mod:`lightning_diag._containment`) lets them through, while an unexpected error inside a lightning_diag hook
becomes an ``internal_error`` finding and the run goes on.

================================  =====================================================================
class                             raised when
================================  =====================================================================
:class:`ArgumentError`            a constructor argument is of the wrong type, out of range, contradicts
                                  another or has no effect (a ``ValueError`` and a Lightning
                                  ``MisconfigurationException``)
:class:`ConfigurationError`       setup refuses the Trainer or model (a strategy a callback cannot serve);
                                  the parent of :class:`ArgumentError`
:class:`MissingMetricError`       a monitored metric is never logged and the callback is ``strict``
:class:`NonFiniteError`           NaNGuard's policy is ``"raise"`` (or an escalation ends there)
:class:`SanityCheckError`         SanityCheck found a fault at or above ``fail_on`` before training
:class:`TrainingHangError`        HangWatchdog's ``action="raise"``: no progress for two budgets in a row
:class:`LightningDiagWarning`     the base of every warning lightning_diag emits
:class:`LightningDiagDeprecationWarning`  an argument or import path that will be removed in the next release
================================  =====================================================================

Example:
    >>> from lightning_diag import ArgumentError, NaNGuard
    >>> try:
    ...     NaNGuard(max_rollbacks=0)
    ... except ArgumentError as error:
    ...     print(error)
    `max_rollbacks` must be >= 1, got 0.
"""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException

__all__ = [
    "ArgumentError",
    "ConfigurationError",
    "Deliberate",
    "LightningDiagDeprecationWarning",
    "LightningDiagWarning",
    "MissingMetricError",
    "NonFiniteError",
    "SanityCheckError",
    "TrainingHangError",
]


class LightningDiagWarning(UserWarning):
    """Base class of the warnings lightning_diag emits (its own test suite turns them into errors)."""


class LightningDiagDeprecationWarning(LightningDiagWarning, FutureWarning):
    """A deprecated argument name: it still works for one release, then it is removed.

    A ``FutureWarning`` (shown by default, unlike ``DeprecationWarning``): the code that uses the old name is the
    user's own configuration, often a LightningCLI YAML file.
    """


class Deliberate(Exception):
    """Mixin of the exceptions lightning_diag raises on purpose (refusals, stops): never contained."""


class ConfigurationError(Deliberate, ValueError, MisconfigurationException):
    """A configuration lightning_diag refuses: an argument at construction, or the Trainer/model at setup."""


class ArgumentError(ConfigurationError):
    """A constructor argument of the wrong type, out of its range, contradicting another, or ignored."""


class MissingMetricError(Deliberate, RuntimeError, MisconfigurationException):
    """A monitored metric is not logged and the callback was asked to be ``strict`` about it."""


class NonFiniteError(Deliberate, RuntimeError):
    """Raised by :class:`~lightning_diag.NaNGuard` when its policy is ``"raise"`` (or an escalation ends there)."""


class SanityCheckError(Deliberate, RuntimeError):
    """Raised by :class:`~lightning_diag.SanityCheck` when a finding reaches ``fail_on``: training does not start."""


class TrainingHangError(Deliberate, RuntimeError):
    """Raised in the training thread by :class:`~lightning_diag.HangWatchdog` with ``action="raise"`` when a phase
    made no progress for two budgets in a row (delivered by a signal: see HangWatchdog's notes for its limits).
    """
