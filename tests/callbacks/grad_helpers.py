"""Shared pieces for the gradient-health callback tests."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from lightning_diag.testing.syncs import HostSyncCounter

PRECISIONS = ["32-true", "bf16-mixed", "16-mixed-scaler"]


def precision_kwargs(precision: str, init_scale: float = 2.0**8) -> dict[str, Any]:
    """Trainer arguments for a precision; "16-mixed-scaler" is the real fp16 + GradScaler path on CPU."""
    if precision == "16-mixed-scaler":
        return {
            "plugins": [
                MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))
            ]
        }
    return {"precision": precision}


class GradRecorder(Callback):
    """At on_before_optimizer_step, the reference total norm of the (unscaled) gradients, per global step."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}
        self.max_abs: dict[int, float] = {}
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        inv = (
            1.0 / scaler.get_scale()
            if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
            else 1.0
        )
        self.norms[trainer.global_step] = float(torch.nn.utils.get_total_norm(list(grads.values()))) * inv
        self.max_abs[trainer.global_step] = max(float(g.abs().max()) for g in grads.values()) * inv
        self.grads[trainer.global_step] = grads


#: Counts host syncs, also ``tolist()`` on CPU (see lightning_diag.testing.syncs).
SyncCounter = HostSyncCounter


class Enter(Callback):
    def __init__(self, mode: SyncCounter) -> None:
        self.mode = mode

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.mode.__enter__()


class Exit(Callback):
    def __init__(self, mode: SyncCounter, per_step: dict[int, int]) -> None:
        self.mode = mode
        self.per_step = per_step
        self.seen = 0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.mode.__exit__(None, None, None)
        self.per_step[trainer.global_step] = self.mode.count - self.seen
        self.seen = self.mode.count
