"""SilentBugDetector under 2-process DDP on CPU (gloo): `python silent_dist.py OUT_DIR`.

Scenarios, each one fit: two healthy runs (one with BatchNorm, whose running statistics differ across ranks by
design), rank 1 alone changing a weight in place, rank 1 alone changing a buffer (with `broadcast_buffers=False`),
and every rank reading the same batches (`use_distributed_sampler=False`). Each rank writes its findings to
OUT_DIR/silent-rank<r>.json; both ranks must judge alike.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lightning_diag import SilentBugDetector
from tests.helpers import Regression, loader


class WithBatchNorm(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1)
        )


class RankLocalWeight(Regression):
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_rank == 1 and batch_idx == 3:
            with torch.no_grad():
                self.net[2].weight[0, 0] += 0.5  # e.g. a rank-guarded re-initialisation or checkpoint load


class RankLocalBuffer(Regression):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.offset

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_rank == 1 and batch_idx == 3:
            self.offset += 1.0


SCENARIOS: dict[str, dict[str, Any]] = {
    "healthy": {"model": Regression},
    "healthy-batchnorm": {"model": WithBatchNorm},
    "rank-local-weight": {"model": RankLocalWeight},
    "rank-local-buffer": {"model": RankLocalBuffer, "strategy": DDPStrategy(broadcast_buffers=False)},
    "no-distributed-sampler": {"model": Regression, "use_distributed_sampler": False, "shuffle": False},
}


def main(out: str) -> None:
    results: dict[str, Any] = {}
    rank = int(os.environ.get("LOCAL_RANK", 0))
    for name, spec in SCENARIOS.items():
        torch.manual_seed(0)
        detector = SilentBugDetector(check_every_n_steps=2)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=spec.get("strategy", "ddp"),
            max_steps=10,
            use_distributed_sampler=spec.get("use_distributed_sampler", True),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=False,
            default_root_dir=os.path.join(out, name),
            callbacks=[detector],
        )
        trainer.fit(spec["model"](), loader(n=128, batch_size=8, shuffle=spec.get("shuffle", True)))
        alarms = [[f.code, f.severity] for f in detector.findings if f.severity != "info"]
        evidence = next((f.evidence for f in detector.findings if f.code == "replica_divergence"), {})
        scale = detector.noise_scale()
        results[name] = {
            "alarms": alarms,
            "evidence": evidence,
            "step": trainer.global_step,
            "noise_scale": scale if math.isfinite(scale) else None,
        }
    with open(os.path.join(out, f"silent-rank{rank}.json"), "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1])
