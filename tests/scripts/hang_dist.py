"""HangWatchdog under 2-process DDP on CPU (gloo): `python hang_dist.py hang|checks OUT`.

``hang``: rank 1 sleeps in `training_step` at step 6 while rank 0 waits for it in the gradient all-reduce; both
ranks must dump their stacks into rank 0's log directory and rank 0's report (written while they are stuck) must
name rank 1. ``checks``: one fit per scenario: uneven dataloader lengths (refused before the first step, on both
ranks), rank 1 slower in forward ("compute"), rank 1 slower to load its data ("input"), balanced ranks (quiet).
Each rank writes what it saw to OUT/<mode>-rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lightning_diag import ConfigurationError, HangWatchdog, collect_findings
from tests.helpers import Regression, regression_data

HANG_STEP, HANG_S = 6, 8.0
WORK_S, SLOW_S = 0.02, 0.04  # every rank's forward "computes" 20 ms; the slow rank 40 ms more


class RankData(Dataset):
    """Rank ``rank``'s shard; ``delay_s`` per sample on the slow rank (num_workers=0: the main thread waits)."""

    def __init__(self, rank: int, n: int, delay_s: float = 0.0) -> None:
        x, y = regression_data(2 * n).tensors
        self.x, self.y = x[rank::2][:n], y[rank::2][:n]
        self.delay_s = delay_s

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.x[i], self.y[i]


class Model(Regression):
    def __init__(self, scenario: str) -> None:
        super().__init__()
        self.scenario = scenario

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        rank = self.global_rank
        if self.scenario == "hang" and rank == 1 and self.global_step == HANG_STEP:
            time.sleep(HANG_S)
        if self.scenario in ("compute", "input", "balanced"):
            time.sleep(WORK_S + (SLOW_S if self.scenario == "compute" and rank == 1 else 0.0))
        return super().training_step(batch, batch_idx)


def fit(scenario: str, out: str, rank_hint: int) -> dict[str, Any]:
    torch.manual_seed(0)
    watchdog = HangWatchdog(min_timeout_s=1.5, first_step_timeout_s=60.0, check_step_time=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        max_steps=12 if scenario == "hang" else -1,
        log_every_n_steps=5,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=os.path.join(out, f"{scenario}-root{rank_hint}"),
        callbacks=[watchdog],
    )
    rank = rank_hint
    n = {"uneven": 64 + 8 * rank}.get(scenario, 160)  # uneven: 8 batches on rank 0, 9 on rank 1
    delay = 0.005 if scenario == "input" and rank == 1 else 0.0  # 8 samples x 5 ms = 40 ms per batch
    result: dict[str, Any] = {"scenario": scenario, "raised": None}
    start = time.monotonic()
    try:
        trainer.fit(Model(scenario), DataLoader(RankData(rank, n, delay), batch_size=8))
    except ConfigurationError as error:
        result["raised"] = str(error)
    result["seconds"] = time.monotonic() - start
    result["global_step"] = trainer.global_step
    result["findings"] = [f.to_dict() for f in collect_findings(trainer)]
    return result


def main(mode: str, out: str) -> None:
    rank = int(os.environ.get("LOCAL_RANK", 0))
    scenarios = ["hang"] if mode == "hang" else ["compute", "input", "balanced", "uneven"]
    results = {scenario: fit(scenario, out, rank) for scenario in scenarios}
    with open(os.path.join(out, f"{mode}-rank{rank}.json"), "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
