"""Gradient norms and clipping across strategies, for tests/test_distributed.py.

`python grad_dist.py single|ddp|fsdp2 OUT_DIR` trains the same MLP on the same global batches (16 samples per
optimizer step) and writes, per rank, the reference norms computed in `on_before_optimizer_step` (full tensors for
DTensor gradients), the norms after GradClip, and (rank 0) what GradNormMonitor logged to metrics.csv.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lightning_diag import GradClip, GradNormMonitor
from tests.helpers import regression_data, shard_linear_layers


class MLP(pl.LightningModule):
    def __init__(self, fsdp: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        self.fsdp = fsdp

    def configure_model(self) -> None:
        if self.fsdp:
            shard_linear_layers(self, self.net)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def full_norm(grads: list[torch.Tensor]) -> float:
    norm = torch.nn.utils.get_total_norm(grads)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class Reference(pl.Callback):
    def __init__(self) -> None:
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.norms[trainer.global_step] = full_norm(
            [p.grad for p in pl_module.parameters() if p.grad is not None]
        )


def main(kind: str, out: str) -> None:
    before, after = Reference(), Reference()
    common: dict[str, Any] = {
        "accelerator": "cpu",
        "max_epochs": 2,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": CSVLogger(out, name=kind),
        "callbacks": [
            before,
            GradClip(max_norm=0.5),
            GradNormMonitor(depth=2, log_update_ratio=False),
            after,
        ],
    }
    data = regression_data(64)
    if kind == "single":
        trainer = pl.Trainer(devices=1, **common)
        train = DataLoader(data, batch_size=16)
    else:
        # Each rank takes every other sample, unshuffled: step k of both ranks together is samples 16k..16k+15,
        # the single-process batch k (Lightning's own distributed sampler would shuffle).
        rank = int(os.environ.get("LOCAL_RANK", 0))
        train = DataLoader(
            data, batch_size=8, sampler=DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
        )
        if kind == "ddp":
            strategy: Any = "ddp"
        else:
            from lightning.pytorch.strategies import ModelParallelStrategy

            strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        trainer = pl.Trainer(devices=2, strategy=strategy, use_distributed_sampler=False, **common)
    trainer.fit(MLP(fsdp=kind == "fsdp2"), train)
    result = {
        "rank": trainer.global_rank,
        "before": before.norms,
        "after": after.norms,
        "log_dir": trainer.logger.log_dir if trainer.is_global_zero else None,
        "grad_types": sorted({type(p).__name__ for p in trainer.lightning_module.parameters()}),
    }
    with open(os.path.join(out, f"{kind}-rank{trainer.global_rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
