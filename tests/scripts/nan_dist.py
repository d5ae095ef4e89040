"""NaNGuard under 2-process DDP or FSDP2 on CPU, where only rank 1 sees the fault: `python nan_dist.py ddp|fsdp2 OUT`.

Each scenario (policy, fault) is one fit; rank 1 alone gets a NaN (in its input batch, a module's output, its
gradient or its loss) at step 3. Both ranks must take the same decision (skip / roll back / raise), end with the
same finite weights, and rank 0's findings must name rank 1's fault. Results go to OUT/<kind>-rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lightning_diag import NaNGuard, NonFiniteError
from tests.callbacks.nan_helpers import Faulty, all_finite
from tests.helpers import regression_data, shard_linear_layers

SCENARIOS = [("skip", "input"), ("rollback", "forward"), ("skip", "gradient"), ("raise", "loss")]
AT = 3


class Sharded(Faulty):
    def configure_model(self) -> None:
        shard_linear_layers(self, self.net)


def rank_loader(rank: int, inject: str) -> DataLoader:
    x, y = (t[rank::2].clone() for t in regression_data(128).tensors)
    if inject == "input" and rank == 1:
        x[AT * 8, 2] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=8)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(kind: str, out: str) -> None:
    results: dict[str, Any] = {}
    rank = int(os.environ.get("LOCAL_RANK", 0))
    for policy, inject in SCENARIOS:
        torch.manual_seed(0)
        rollback = {"snapshot_every_n_steps": 2} if policy == "rollback" else {}
        guard = NaNGuard(action=policy, check_spikes=False, **rollback)
        if kind == "ddp":
            strategy: Any = "ddp"
            model: Faulty = Faulty(inject, (AT,), ranks=(1,))
        else:
            from lightning.pytorch.strategies import ModelParallelStrategy

            strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
            model = Sharded(inject, (AT,), ranks=(1,))
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_steps=8,
            use_distributed_sampler=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=False,
            default_root_dir=os.path.join(out, f"{kind}-{policy}-{inject}"),
            callbacks=[guard],
        )
        raised = ""
        try:
            trainer.fit(model, rank_loader(trainer.global_rank, inject))
        except NonFiniteError as error:
            raised = str(error)
        optimizer = trainer.optimizers[0]
        steps = sorted({int(s["step"]) for s in optimizer.state.values()})
        results[f"{policy}-{inject}"] = {
            "raised": raised,
            "skipped": guard.skipped_steps,
            "rollbacks": guard.rollbacks,
            "adam_steps": steps,
            "finite": all_finite(model),
            "weights": [round(float(full(p.detach()).double().sum()), 10) for p in model.parameters()],
            "findings": [{"code": f.code, **f.evidence} for f in guard.findings],
            "step": trainer.global_step,
        }
    with open(os.path.join(out, f"{kind}-rank{rank}.json"), "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
