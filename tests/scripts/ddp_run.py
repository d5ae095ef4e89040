"""A 2-process DDP fit on CPU (gloo) for tests/test_distributed.py: `python ddp_run.py OUT_DIR`.

Rank 1 sees a different `val_loss` than rank 0 (logged without sync_dist), so a callback that decided on its
local value would stop the ranks at different epochs and hang or desynchronise the replicas. Each rank writes
what it decided to OUT_DIR/rank<r>.json; only rank 0's root directory may receive diagnosis.json.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lightning_diag import EarlyStop, WarmupCosine
from lightning_diag._distributed import all_ranks, any_rank, broadcast, reduce
from tests.helpers import Regression, loader

RANK0 = [5.0, 4.0, 3.0, 3.1, 3.2, 3.3, 3.4, 3.5, 3.6, 3.7]  # plateaus: stop at epoch 4 with patience 2
RANK1 = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1]  # keeps improving: would never stop


class RankDependent(Regression):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            values = RANK0 if self.global_rank == 0 else RANK1
            self.log("val_loss", torch.tensor(values[self.current_epoch]))


class Record(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.collectives: dict[str, Any] = {}

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch != 0:
            return
        rank = trainer.global_rank
        local = torch.tensor([rank + 1.0])
        self.collectives = {
            "any": any_rank(trainer, rank == 1),  # only rank 1 sees the condition
            "all": all_ranks(trainer, rank == 1),
            "all_true": all_ranks(trainer, True),
            "sum": reduce(trainer, local, "sum").item(),
            "mean": reduce(trainer, local, "mean").item(),
            "max": reduce(trainer, local, "max").item(),
            "min": reduce(trainer, local, "min").item(),
            "input_untouched": local.item() == rank + 1.0,
            "broadcast": broadcast(trainer, f"from rank {rank}"),
        }

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def main(out: str) -> None:
    rank_hint = int(os.environ.get("LOCAL_RANK", 0))
    stop = EarlyStop("val_loss", patience=2)
    record = Record()
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=len(RANK0),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=os.path.join(out, f"root{rank_hint}"),
        callbacks=[WarmupCosine(warmup_steps=3), stop, record],
    )
    model = RankDependent()
    trainer.fit(model, loader(n=64, batch_size=8), loader(n=16))
    result = {
        "rank": trainer.global_rank,
        "stopped_epoch": stop.stopped_epoch,
        "best_epoch": stop.best_epoch,
        "restored_epoch": stop.restored_epoch,
        "epochs_run": trainer.current_epoch,
        "global_step": trainer.global_step,
        "lrs": record.lrs,
        "weights": [float(p.detach().sum()) for p in model.parameters()],
        "collectives": record.collectives,
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
