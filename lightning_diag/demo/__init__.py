"""``lightning-diag demo``: small training runs broken on purpose, shipped with the package (no download, no extra).

Each scenario trains a small model on generated data for a few seconds on the CPU with the lightning_diag
callbacks that catch its failure, then prints the diagnosis and writes ``diagnosis.json`` and ``diagnosis.html``
into ``<root>/<name>/version_*/``::

    lightning-diag demo --list
    lightning-diag demo lr_too_high            # then open the diagnosis.html it names

From Python: ``lightning_diag.demo.run("overfitting", root="demo_runs")`` returns the trainer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__all__ = ["SCENARIOS", "Scenario", "run"]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One failure on purpose: what is broken, the codes its diagnosis holds, and how to build the run."""

    description: str
    codes: tuple[str, ...]
    build: str  # name of the builder in lightning_diag.demo._scenarios (imported only when the demo runs)


#: name -> scenario (the builders import torch and Lightning; this table does not).
SCENARIOS: dict[str, Scenario] = {
    "lr_too_high": Scenario(
        "SGD at lr=2 on a regression: the loss and gradient norm spike by orders of magnitude within two "
        "steps; NaNGuard skips the spiking steps (and would roll back with an LR back-off on NaN)",
        ("exploding_gradients",),
        "lr_too_high",
    ),
    "overfitting": Scenario(
        "a 256-wide MLP on 32 training samples: the validation loss turns up; OverfitDetector stops the run, "
        "EarlyStop restores the best epoch",
        ("overfitting", "early_stopped"),
        "overfitting",
    ),
    "nan_in_data": Scenario(
        "one training sample holds a NaN: NaNGuard skips the step and names the input and the sample",
        ("non_finite_input",),
        "nan_in_data",
    ),
    "vanishing_gradients": Scenario(
        "a 16-layer sigmoid MLP: the first layers get almost no gradient",
        ("vanishing_gradients",),
        "vanishing_gradients",
    ),
    "slow_data": Scenario(
        "a Dataset that sleeps 2 ms per sample, loaded in the main process: the step waits for data",
        ("dataloader_bound",),
        "slow_data",
    ),
}


def run(name: str, root: str | os.PathLike[str] = "lightning_diag_demo") -> Any:
    """Train scenario ``name`` with its logs and report under ``root/name``; return the finished ``Trainer``."""
    if name not in SCENARIOS:
        raise ValueError(f"`name` must be one of {sorted(SCENARIOS)}, got {name!r}.")
    from lightning_diag.demo import _scenarios

    builder = getattr(_scenarios, SCENARIOS[name].build)
    return _scenarios.fit(name, builder, os.fspath(root))
