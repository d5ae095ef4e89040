"""lightning_diag: PyTorch Lightning callbacks that make training runs debug themselves."""

from lightning_diag.__about__ import __version__
from lightning_diag.callbacks import (
    DiagCallback,
    EarlyStop,
    GradClip,
    GradNormMonitor,
    NaNGuard,
    NonFiniteError,
    OverfitDetector,
    SanityCheck,
    SanityCheckError,
    SilentBugDetector,
    SpeedMonitor,
    WarmupCosine,
    collect_findings,
)
from lightning_diag.findings import CODES, Finding, LightningDiagWarning

__all__ = [
    "CODES",
    "DiagCallback",
    "EarlyStop",
    "Finding",
    "GradClip",
    "GradNormMonitor",
    "LightningDiagWarning",
    "NaNGuard",
    "NonFiniteError",
    "OverfitDetector",
    "SanityCheck",
    "SanityCheckError",
    "SilentBugDetector",
    "SpeedMonitor",
    "WarmupCosine",
    "__version__",
    "collect_findings",
]
