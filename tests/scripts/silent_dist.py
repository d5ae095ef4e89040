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


class Direct(pl.Callback):
    """The noise scale of step 0 computed directly: each rank's gradient on a plain copy of the network (no DDP),
    gathered, against the norm of their mean; then what the detector measured for that step."""

    def __init__(self, detector: SilentBugDetector) -> None:
        self.detector = detector
        self.direct = math.nan
        self.measured = math.nan

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != 0:
            return
        from lightning_diag.core.silent import noise_scale_terms

        x, y = batch
        copy = __import__("copy").deepcopy(pl_module.net)
        grads = torch.autograd.grad(nn.functional.mse_loss(copy(x), y), list(copy.parameters()))
        local = torch.cat([g.reshape(-1) for g in grads]).double()
        every = [torch.zeros_like(local) for _ in range(2)]
        torch.distributed.all_gather(every, local)
        small_sq = float(torch.stack([g.pow(2).sum() for g in every]).mean())
        big_sq = float(torch.stack(every).mean(0).pow(2).sum())
        trace, grad_sq = noise_scale_terms(small_sq, big_sq, x.shape[0], 2 * x.shape[0])
        self.direct = trace / grad_sq

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == 1:
            self.measured = self.detector.noise_scale()


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
        direct = Direct(detector)
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
            callbacks=[detector, direct],
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
            "step0_direct": direct.direct,
            "step0_measured": direct.measured if math.isfinite(direct.measured) else None,
        }
    with open(os.path.join(out, f"silent-rank{rank}.json"), "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1])
