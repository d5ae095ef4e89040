"""Lightning adapters: one callback per module (the module name is the class name in snake_case)."""

from lightning_diag.callbacks._base import DiagCallback, collect_findings
from lightning_diag.callbacks.activation_monitor import ActivationMonitor
from lightning_diag.callbacks.early_stop import EarlyStop
from lightning_diag.callbacks.grad_clip import GradClip
from lightning_diag.callbacks.grad_norm_monitor import GradNormMonitor
from lightning_diag.callbacks.hang_watchdog import HangWatchdog
from lightning_diag.callbacks.memory_monitor import MemoryMonitor
from lightning_diag.callbacks.nan_guard import NaNGuard
from lightning_diag.callbacks.overfit_detector import OverfitDetector
from lightning_diag.callbacks.sanity_check import SanityCheck
from lightning_diag.callbacks.silent_bug_detector import SilentBugDetector
from lightning_diag.callbacks.speed_monitor import SpeedMonitor
from lightning_diag.callbacks.warmup_cosine import WarmupCosine
from lightning_diag.errors import NonFiniteError, SanityCheckError  # their old import path (until 0.3)

__all__ = [
    "ActivationMonitor",
    "DiagCallback",
    "EarlyStop",
    "GradClip",
    "GradNormMonitor",
    "HangWatchdog",
    "MemoryMonitor",
    "NaNGuard",
    "NonFiniteError",
    "OverfitDetector",
    "SanityCheck",
    "SanityCheckError",
    "SilentBugDetector",
    "SpeedMonitor",
    "WarmupCosine",
    "collect_findings",
]
