"""Shared pieces for the gradient-health callback tests."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch.utils._python_dispatch import TorchDispatchMode

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


class SyncCounter(TorchDispatchMode):
    """Counts what forces a device-to-host synchronisation: the dispatched ops (``.item()``, ``float(t)``,
    ``bool(t)``, ``torch.equal``, ``nonzero``) and, since on CPU they read memory without dispatching an op,
    ``Tensor.tolist()`` and ``Tensor.numpy()`` calls made while the counter is active (patched for that time)."""

    SYNCS: ClassVar[frozenset[str]] = frozenset({"_local_scalar_dense", "is_nonzero", "equal", "nonzero"})
    READS: ClassVar[tuple[str, ...]] = ("tolist", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._saved: dict[str, Any] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.__name__.split(".")[0] in self.SYNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> Any:
        for name in self.READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.count += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}
        return super().__exit__(*exc)


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
