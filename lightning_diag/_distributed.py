"""Rank agreement helpers over ``trainer.strategy`` (public Strategy API only).

Every decision that changes the run (skip, rollback, stop, clip coefficient) goes through one of these so all
ranks act alike. Each function is a collective under a parallel strategy: call it on *every* rank, never inside
``rank_zero_only``. On a single device they return their input unchanged and cost nothing.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

__all__ = ["all_ranks", "any_rank", "broadcast", "gather", "gather_objects", "is_distributed", "reduce"]


def is_distributed(trainer: Any) -> bool:
    """Whether more than one process takes part in the run."""
    return int(getattr(trainer, "world_size", 1)) > 1


def any_rank(trainer: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one rank."""
    if not is_distributed(trainer):
        return bool(flag)
    return bool(trainer.strategy.reduce_boolean_decision(bool(flag), all=False))


def all_ranks(trainer: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on all ranks."""
    if not is_distributed(trainer):
        return bool(flag)
    return bool(trainer.strategy.reduce_boolean_decision(bool(flag), all=True))


def reduce(
    trainer: Any, tensor: torch.Tensor, op: Literal["sum", "mean", "max", "min"] = "sum"
) -> torch.Tensor:
    """All-reduce a tensor across ranks without touching the caller's tensor (Lightning reduces in place)."""
    if not is_distributed(trainer):
        return tensor
    reduce_op = {
        "sum": "sum",
        "mean": "mean",
        "max": torch.distributed.ReduceOp.MAX,
        "min": torch.distributed.ReduceOp.MIN,
    }[op]
    return trainer.strategy.reduce(tensor.detach().clone(), reduce_op=reduce_op)


def gather(trainer: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` stacked in rank order: shape ``[world_size, *tensor.shape]`` (``[1, ...]`` alone)."""
    if not is_distributed(trainer):
        return tensor.unsqueeze(0)
    gathered = trainer.strategy.all_gather(tensor.detach())
    return gathered.reshape(-1, *tensor.shape)


def broadcast(trainer: Any, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed(trainer):
        return obj
    return trainer.strategy.broadcast(obj, src=src)


def gather_objects(trainer: Any, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a single-element list on one process)."""
    if not is_distributed(trainer) or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
