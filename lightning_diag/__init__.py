"""lightning_diag: PyTorch Lightning callbacks that make training runs debug themselves.

``import lightning_diag`` imports the callbacks (so LightningCLI resolves their short names, ``class_path:
EarlyStop``), except inside the ``lightning-diag`` command, which imports them (and torch) only when a subcommand
needs them: ``lightning-diag --help`` and ``lightning-diag codes`` start without torch.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from lightning_diag.__about__ import __version__
from lightning_diag.findings import CODES, Finding, Report, load_report

#: the names that import Lightning (and torch): imported lazily inside the ``lightning-diag`` command
_CALLBACK_NAMES = (
    "ActivationMonitor",
    "ArgumentError",
    "ConfigurationError",
    "DiagCallback",
    "EarlyStop",
    "GradClip",
    "GradNormMonitor",
    "HangWatchdog",
    "LightningDiagDeprecationWarning",
    "LightningDiagWarning",
    "MemoryMonitor",
    "MissingMetricError",
    "NaNGuard",
    "NonFiniteError",
    "OverfitDetector",
    "SanityCheck",
    "SanityCheckError",
    "SilentBugDetector",
    "SpeedMonitor",
    "TrainingHangError",
    "WarmupCosine",
    "collect_findings",
)


def _in_cli_process() -> bool:
    """Whether this process is the ``lightning-diag`` console script (or ``python -m lightning_diag...``)."""
    argv = getattr(sys, "argv", None) or [""]
    name = os.path.basename(str(argv[0]))
    return name.removesuffix(".exe") == "lightning-diag" or name == "-m"


if TYPE_CHECKING or not _in_cli_process():
    from lightning_diag.callbacks import (
        ActivationMonitor,
        DiagCallback,
        EarlyStop,
        GradClip,
        GradNormMonitor,
        HangWatchdog,
        MemoryMonitor,
        NaNGuard,
        OverfitDetector,
        SanityCheck,
        SilentBugDetector,
        SpeedMonitor,
        WarmupCosine,
        collect_findings,
    )
    from lightning_diag.errors import (
        ArgumentError,
        ConfigurationError,
        LightningDiagDeprecationWarning,
        LightningDiagWarning,
        MissingMetricError,
        NonFiniteError,
        SanityCheckError,
        TrainingHangError,
    )
else:

    def __getattr__(name: str) -> Any:
        if name in _CALLBACK_NAMES:
            from lightning_diag import callbacks, errors

            return getattr(errors, name, None) or getattr(callbacks, name)
        raise AttributeError(f"module 'lightning_diag' has no attribute {name!r}")


__all__ = [
    "CODES",
    "ActivationMonitor",
    "ArgumentError",
    "ConfigurationError",
    "DiagCallback",
    "EarlyStop",
    "Finding",
    "GradClip",
    "GradNormMonitor",
    "HangWatchdog",
    "LightningDiagDeprecationWarning",
    "LightningDiagWarning",
    "MemoryMonitor",
    "MissingMetricError",
    "NaNGuard",
    "NonFiniteError",
    "OverfitDetector",
    "Report",
    "SanityCheck",
    "SanityCheckError",
    "SilentBugDetector",
    "SpeedMonitor",
    "TrainingHangError",
    "WarmupCosine",
    "__version__",
    "collect_findings",
    "load_report",
]
