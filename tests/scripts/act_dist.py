"""ActivationMonitor across data-parallel ranks, for tests/test_distributed.py.

`python act_dist.py ddp|fsdp2 OUT_DIR` trains a ReLU MLP whose second layer is dead (bias -10) on two CPU
processes, each on its own half of the data, and writes per rank what ActivationMonitor found and the per-layer
values it logged (the hooks' sums are added over ranks before they are judged, so both ranks log the same numbers).
Under DDP dead units come from the gradient rows; under FSDP2 the gradients are sharded DTensors and the on-rate of
the check batch stands in.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lightning_diag import ActivationMonitor, _logging, collect_findings
from tests.helpers import shard_linear_layers

LOGGED: dict[str, float] = {}
_direct = _logging.log_direct


def capture(trainer: Any, metrics: Any, step: int) -> None:
    """What every rank computed for the loggers (only rank 0 writes them)."""
    LOGGED.update({k: float(v) for k, v in metrics.items() if k.startswith("diag/activations/")})
    _direct(trainer, metrics, step)


_logging.log_direct = capture


class MLP(pl.LightningModule):
    def __init__(self, fsdp: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        with torch.no_grad():
            self.net[2].bias.fill_(-10.0)
        self.fsdp = fsdp

    def configure_model(self) -> None:
        if self.fsdp:
            shard_linear_layers(self, self.net)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main(kind: str, out: str) -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (256,), generator=g)
    x = torch.randn(4, 16, generator=g)[y] * 2 + torch.randn(256, 16, generator=g)
    data = TensorDataset(x, y)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    train = DataLoader(data, batch_size=16, sampler=DistributedSampler(data, num_replicas=2, rank=rank))
    if kind == "ddp":
        strategy: Any = "ddp"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        use_distributed_sampler=False,
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[ActivationMonitor(check_every_n_steps=4, patience=2)],
    )
    trainer.fit(MLP(fsdp=kind == "fsdp2"), train)
    result = {
        "findings": [
            {"code": f.code, "severity": f.severity, "message": f.message, **f.evidence}
            for f in collect_findings(trainer)
        ],
        "logged": LOGGED,
    }
    with open(os.path.join(out, f"act-{kind}-rank{trainer.global_rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
