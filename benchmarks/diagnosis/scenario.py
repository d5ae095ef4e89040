"""The shape of one scenario of the diagnosis corpus (see ``run.py``).

A scenario is a small, real Lightning run that either models one training bug (``kind="failure"``) or is healthy
but looks unusual (``kind="healthy"``). ``build(seed)`` returns a :class:`Run`; the runner adds the lightning_diag
suite at default settings (nothing tuned per scenario), fits, and compares the warning/error findings with
``expected``: a failure counts as detected when at least one of its ``expected`` codes is found at warning or
error severity; a healthy run must have no warning/error finding at all.

Scenario modules live in ``scenarios/`` and export ``SCENARIOS: list[Scenario]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["Run", "Scenario"]


@dataclasses.dataclass
class Run:
    """What one scenario hands the runner: the model, its data and the Trainer arguments it needs."""

    model: Any  # a LightningModule
    train_dataloaders: Any
    val_dataloaders: Any = None
    #: ``max_epochs``/``max_steps``/``precision``/``accumulate_grad_batches``/``plugins``/... (the runner adds
    #: its own quiet defaults: no progress bar, no checkpointing, a CSV logger in a temporary directory)
    trainer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the key of the validation loss the model logs ("val_loss"), or None when there is no validation loop
    monitor: str | None = "val_loss"
    #: callbacks that are part of the user's run (not lightning_diag's)
    extra_callbacks: list[Any] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One labelled run of the corpus."""

    name: str
    kind: Literal["failure", "healthy"]
    #: codes that count as a correct detection of the *primary* cause (empty for healthy runs)
    expected: tuple[str, ...]
    #: one line: the bug it models (or why the healthy run looks unusual) and where people hit it
    description: str
    build: Callable[[int], Run]
    #: part of the fast subset that runs inside the test suite
    fast: bool = False
    #: run in a fresh Python process of its own: a process-wide measure (the RSS MemoryMonitor reads) must not carry
    #: what earlier scenarios of the same process left in the allocator
    isolated: bool = False
