"""In-memory snapshots of a model and its optimizers, for rolling a run back after a non-finite step.

A :class:`Snapshot` holds CPU copies of every tensor of ``module.state_dict()`` (parameters and persistent
buffers) and of every optimizer's per-parameter state (Adam's moments and step counters, SGD's momentum), plus
the param groups' hyperparameters. Restoring copies the values back *in place*, so parameters, optimizer state
and anything holding references to them (DDP buckets, FSDP2 shards, the optimizer's param groups) stay valid.

Sharded tensors (FSDP2 DTensors) are copied shard by shard: each rank keeps and restores its own shard.

Memory: the CPU copy costs the model's parameter and buffer bytes plus the optimizer state bytes (about three
times the parameter bytes for Adam/AdamW, twice for SGD with momentum).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_diag.core.grad_stats import local_tensor

__all__ = ["Snapshot"]

#: Param-group keys that belong to the learning-rate schedule, not to the optimizer's state: a rollback leaves
#: them alone (the schedule writes them).
SCHEDULE_KEYS = frozenset({"lr", "initial_lr"})


def _copy_to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return local_tensor(value).detach().to("cpu", copy=True)
    return value


class Snapshot:
    """CPU copies of a module's state and its optimizers' state, taken at optimizer step ``step``."""

    def __init__(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer], step: int) -> None:
        self.step = step
        with torch.no_grad():
            state = module.state_dict()
            #: some tensor was a shard (FSDP2 DTensor): this copy is this rank's alone
            self.sharded = any(type(v).__name__ == "DTensor" for v in state.values())
            self.module_state = {k: _copy_to_cpu(v) for k, v in state.items()}
            self.optimizer_states = [self._capture_optimizer(opt) for opt in optimizers]

    def state_dict(self) -> dict[str, Any]:
        """The snapshot as plain types and CPU tensors (a checkpoint loads it with ``weights_only=True``)."""
        return {
            "step": self.step,
            "module_state": self.module_state,
            "optimizer_states": self.optimizer_states,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Snapshot:
        """A snapshot saved with :meth:`state_dict` (a resumed run rolls back to the same state as the run that
        saved it).
        """
        snapshot = cls.__new__(cls)
        snapshot.step = int(state["step"])
        snapshot.sharded = False
        snapshot.module_state = dict(state["module_state"])
        snapshot.optimizer_states = list(state["optimizer_states"])
        return snapshot

    @staticmethod
    def _params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
        for group in optimizer.param_groups:
            yield from group["params"]

    def _capture_optimizer(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        per_param = []
        for p in self._params(optimizer):
            state = optimizer.state.get(p)
            per_param.append({k: _copy_to_cpu(v) for k, v in state.items()} if state else None)
        groups = [
            {k: v for k, v in g.items() if k != "params" and k not in SCHEDULE_KEYS}
            for g in optimizer.param_groups
        ]
        return {"per_param": per_param, "groups": groups}

    @property
    def nbytes(self) -> int:
        """The bytes this snapshot holds in CPU memory."""
        total = sum(
            v.numel() * v.element_size() for v in self.module_state.values() if isinstance(v, torch.Tensor)
        )
        for opt in self.optimizer_states:
            for state in opt["per_param"]:
                for v in (state or {}).values():
                    if isinstance(v, torch.Tensor):
                        total += v.numel() * v.element_size()
        return total

    @torch.no_grad()
    def restore(self, module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Copy the snapshot back into ``module`` and ``optimizers`` in place."""
        live = module.state_dict()
        missing = sorted(set(self.module_state) ^ set(live))
        if missing:
            raise RuntimeError(
                f"The model's state no longer matches the snapshot (keys differ: {missing[:5]})."
            )
        for key, saved in self.module_state.items():
            target = live[key]
            if isinstance(saved, torch.Tensor) and isinstance(target, torch.Tensor):
                local_tensor(target).copy_(saved)
        if len(optimizers) != len(self.optimizer_states):
            raise RuntimeError("The number of optimizers changed since the snapshot was taken.")
        for optimizer, saved_opt in zip(optimizers, self.optimizer_states, strict=True):
            self._restore_optimizer(optimizer, saved_opt)

    def _restore_optimizer(self, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
        params = list(self._params(optimizer))
        if len(params) != len(saved["per_param"]):
            raise RuntimeError("The optimizer's parameters changed since the snapshot was taken.")
        for p, state in zip(params, saved["per_param"], strict=True):
            if state is None:
                optimizer.state.pop(
                    p, None
                )  # the parameter had no state yet (e.g. Adam before its first step)
                continue
            live = optimizer.state[p]
            for key in [k for k in live if k not in state]:
                del live[key]
            for key, value in state.items():
                current = live.get(key)
                if isinstance(value, torch.Tensor):
                    if isinstance(current, torch.Tensor) and local_tensor(current).shape == value.shape:
                        local_tensor(current).copy_(value)
                    else:
                        device = current.device if isinstance(current, torch.Tensor) else value.device
                        live[key] = value.clone().to(device)
                else:
                    live[key] = value
        for group, saved_group in zip(optimizer.param_groups, saved["groups"], strict=False):
            group.update(saved_group)
