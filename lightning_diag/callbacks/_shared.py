"""Gradient statistics computed once per optimizer step and shared by every lightning_diag callback.

Whichever callback asks first in ``on_before_optimizer_step`` pays for the foreach pass; the others get the
same :class:`~lightning_diag.core.grad_stats.GradStats`. Because the first asker computes them before it acts,
the statistics are always *pre-clip*, whatever the order of the callbacks list (DESIGN.md section 2).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from lightning_diag.core.grad_stats import GradStats, compute_grad_stats

__all__ = [
    "amp_scaler",
    "check_strategy",
    "named_optimizer_params",
    "params_with_grads",
    "scale_tensor",
    "step_grad_stats",
    "training_step_loss",
]

# trainer -> {"params": {id(optimizer): [(name, param)]}, "stats": {(step, id(optimizer), norm_type): GradStats}}
_CACHE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def amp_scaler(trainer: Any) -> Any | None:
    """The GradScaler of a 16-bit mixed-precision run, else ``None``."""
    return getattr(trainer.precision_plugin, "scaler", None)


def scale_tensor(scaler: Any) -> torch.Tensor:
    """The scaler's current scale as a device tensor (no host sync when the scaler keeps it as a tensor)."""
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.detach().float().reshape(())
    return torch.tensor(float(scaler.get_scale()))


def named_optimizer_params(trainer: Any, pl_module: Any, optimizer: Any) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` for every parameter the optimizer updates, named as in ``pl_module``."""
    entry = _CACHE.setdefault(trainer, {"params": {}, "stats": {}})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params:
        return []
    cached = entry["params"].get(id(optimizer))
    if (
        cached is None
        or len(cached) != len(params)
        or cached[0][1] is not params[0]
        or cached[-1][1] is not params[-1]
    ):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        cached = [(names.get(id(p), f"param{i}"), p) for i, p in enumerate(params)]
        entry["params"][id(optimizer)] = cached
    return cached


def params_with_grads(
    trainer: Any, pl_module: Any, optimizer: Any
) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Names, parameters and gradients of the optimizer's parameters that have a gradient this step.

    Built once per optimizer step and shared, like the statistics.
    """
    entry = _CACHE.setdefault(trainer, {"params": {}, "stats": {}})
    key = (trainer.global_step, id(optimizer), "grads")
    found = entry["stats"].get(key)
    if found is not None:
        return found
    with_grad = [
        (n, p, p.grad) for n, p in named_optimizer_params(trainer, pl_module, optimizer) if p.grad is not None
    ]
    found = ([n for n, _, _ in with_grad], [p for _, p, _ in with_grad], [g for _, _, g in with_grad])
    _remember(entry, key, found)
    return found


def _remember(entry: dict[str, Any], key: tuple[Any, ...], value: Any) -> None:
    if entry.get("step") != key[0]:
        entry["stats"] = {}  # only the current step is ever needed
        entry["step"] = key[0]
    entry["stats"][key] = value


def step_grad_stats(trainer: Any, pl_module: Any, optimizer: Any, norm_type: float = 2.0) -> GradStats:
    """The gradient statistics of the optimizer step in progress (computed on first request, then shared)."""
    entry = _CACHE.setdefault(trainer, {"params": {}, "stats": {}})
    key = (trainer.global_step, id(optimizer), float(norm_type))
    stats = entry["stats"].get(key)
    if stats is not None:
        return stats
    names, _, grads = params_with_grads(trainer, pl_module, optimizer)
    inv_scale = None
    scaler = amp_scaler(trainer)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        # Fused optimizers unscale inside step(): the gradients we see are still multiplied by the scale.
        inv_scale = scale_tensor(scaler).reciprocal()
    stats = compute_grad_stats(names, grads, norm_type, inv_scale)
    _remember(entry, key, stats)
    return stats


def training_step_loss(trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> torch.Tensor | None:
    """Run ``pl_module.training_step`` outside the loop (under the run's precision context, ``self.log`` silenced)
    and return its loss (``None`` if it returned none)."""

    def silent(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.log, pl_module.log_dict = silent, silent  # a replay or a check must not log
    context = (
        trainer.precision_plugin.train_step_context() if trainer is not None else contextlib.nullcontext()
    )
    try:
        with context:
            out = pl_module.training_step(batch, batch_idx)
    finally:
        del pl_module.log, pl_module.log_dict
    if isinstance(out, Mapping):
        out = out.get("loss")
    return out if isinstance(out, torch.Tensor) else None


def check_strategy(trainer: Any, who: str, *, fsdp1: bool = False) -> None:
    """Refuse, at setup, strategies whose gradients these callbacks cannot read correctly yet.

    ``strategy="fsdp"`` (FSDP1) keeps each rank's shard of flat parameters: per-rank norms are not the global norm
    and a clip coefficient computed from them would differ between ranks. DeepSpeed owns the optimizer step (and
    its own clipping and loss scaling). Both need a GPU, where they have not been tested; FSDP2
    (``ModelParallelStrategy``) and DDP are supported and tested. ``fsdp1=True`` lets a callback that only needs
    per-rank non-finite checks through under FSDP1.
    """
    name = type(getattr(trainer, "strategy", None)).__name__
    if name.startswith("DeepSpeed") or (name == "FSDPStrategy" and not fsdp1):
        raise ValueError(
            f"{who} does not support `{name}` yet: its gradients are sharded or managed outside Lightning's "
            "optimizer step, so norms, clipping and skips would not be correct. Use DDP or FSDP2 "
            "(`ModelParallelStrategy`), or remove the callback."
        )
