"""Every exported callback at once, under one strategy: `python matrix.py single|ddp|fsdp2 OUT [RESUME_CKPT]`.

The run is built so that ranks disagree unless the callbacks agree for them: rank 1 alone sees a NaN input at
step 3 (NaNGuard must skip on both ranks), rank 1 logs a different `val_loss` (EarlyStop and OverfitDetector must
follow rank 0's), rank 1's first batch has an unnormalised feature (SanityCheck's decision is collective). Each rank
writes what it decided to OUT/<kind>-rank<r>.json; reports go to OUT/root<r>, so only root0 may hold one.
With RESUME_CKPT the run resumes from that checkpoint (a file for single/ddp, a directory for fsdp2).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import lightning_diag
from lightning_diag import (
    ActivationMonitor,
    EarlyStop,
    GradClip,
    GradNormMonitor,
    HangWatchdog,
    MemoryMonitor,
    NaNGuard,
    OverfitDetector,
    SanityCheck,
    SilentBugDetector,
    SpeedMonitor,
    WarmupCosine,
)
from tests.helpers import regression_data, shard_linear_layers

VAL = {0: [2.0, 1.5, 1.2, 1.25, 1.3, 1.35, 1.4, 1.45], 1: [2.0, 1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2]}


class Model(pl.LightningModule):
    def __init__(self, fsdp: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        self.fsdp = fsdp

    def configure_model(self) -> None:
        if self.fsdp:
            shard_linear_layers(self, self.net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        values = VAL[self.global_rank % 2]
        self.log("val_loss", torch.tensor(values[min(self.current_epoch, len(values) - 1)]))  # no sync_dist

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}
        self.applied: dict[int, bool] = {}
        self._before: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._before:
            moved = any(
                not torch.equal(a, p.detach())
                for a, p in zip(self._before, pl_module.parameters(), strict=True)
            )
            self.applied[trainer.global_step - 1] = moved


def rank_data(rank: int, world: int) -> DataLoader:
    x, y = (t[rank::world].clone() for t in regression_data(256).tensors)
    if rank == 1 or world == 1:
        x[3 * 8, 1] = float("nan")  # step 3's batch on rank 1 (on the single process, its own step 3)
    if rank == 1:
        x[0, 0] = 500.0  # unnormalised-looking first batch, on rank 1 only
    return DataLoader(TensorDataset(x, y), batch_size=8)


def main(kind: str, out: str, resume: str | None = None) -> None:
    rank = int(os.environ.get("LOCAL_RANK", 0))
    world = 1 if kind == "single" else 2
    record = Record()
    nan_guard = NaNGuard(action="skip", check_spikes=False)
    overfit = OverfitDetector(action="warn", patience=2)
    early = EarlyStop(monitor="val_loss", patience=2)
    save = ModelCheckpoint(
        dirpath=os.path.join(out, f"ckpt-{kind}"), every_n_epochs=1, save_top_k=-1, filename="{epoch}"
    )
    callbacks = [
        record,
        SanityCheck(fail_on="never"),
        WarmupCosine(warmup_steps=4),
        GradNormMonitor(depth=2),
        GradClip(max_norm=0.5),
        nan_guard,
        overfit,
        early,
        SpeedMonitor(window=4, ignore_first_steps=1),
        SilentBugDetector(check_every_n_steps=3),
        HangWatchdog(),
        MemoryMonitor(),
        ActivationMonitor(),
        save,
    ]
    exported = {n for n in lightning_diag.__all__ if isinstance(getattr(lightning_diag, n), type)}
    used = {type(c).__name__ for c in callbacks}
    missing = sorted(
        n
        for n in exported
        if issubclass(getattr(lightning_diag, n), pl.Callback) and n != "DiagCallback" and n not in used
    )
    assert not missing, f"the matrix misses {missing}"
    strategy: Any = "auto"
    if kind == "ddp":
        strategy = "ddp"
    elif kind == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_epochs=8,
        log_every_n_steps=2,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=os.path.join(out, f"root{rank}"),
        callbacks=callbacks,
    )
    trainer.fit(
        Model(fsdp=kind == "fsdp2"),
        rank_data(trainer.global_rank, world),
        rank_data(0, world),
        ckpt_path=resume,
    )
    result = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "lrs": record.lrs,
        "applied": record.applied,
        "skipped": nan_guard.skipped_steps,
        "stopped_epoch": early.stopped_epoch,
        "best_epoch": early.best_epoch,
        "curve": [[p.x, p.train, p.val] for p in overfit.points],
        "findings": sorted(
            {
                f.code
                for cb in trainer.callbacks
                if isinstance(cb, lightning_diag.DiagCallback)
                for f in cb.findings
            }
        ),
    }
    name = f"{kind}{'-resumed' if resume else ''}-rank{trainer.global_rank}.json"
    with open(os.path.join(out, name), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
