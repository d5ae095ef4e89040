"""MemoryMonitor on a CUDA device, one case per process (the allocator's settings are per process).

    python tests/scripts/memory_cuda.py leak|fragmentation|fragmentation_expandable|oom OUT.json

* ``leak``: 8 MiB of logits with their graph kept every step, on a device capped with
  ``set_per_process_memory_fraction`` at 2 GiB; the run goes on until the real ``torch.OutOfMemoryError``. Writes the
  growth finding (pattern, holder, projected exhaustion step), the step of the real OOM and the out_of_memory finding.
* ``fragmentation`` / ``fragmentation_expandable`` (run with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``):
  activations of a random size (100-400 MiB) every step while small tensors live for 10 steps, under a 1.5 GiB cap:
  the caching allocator has to free its cache and retry unless segments can grow.
* ``oom``: the batch doubles every 8 steps until it does not fit (1 GiB cap).

Every case runs MemoryMonitor's per-step hooks under ``torch.cuda.set_sync_debug_mode("error")`` on the steps that
do not log (a synchronising call there raises) and counts the synchronising calls of the logging steps ("warn").
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_diag import MemoryMonitor
from lightning_diag.testing.syncs import STEP_HOOKS

LOG_EVERY = 5


class SyncCheck(pl.Callback):
    """Sync debug mode "error" around the monitor's hooks on quiet steps; counts sync warnings on logging steps."""

    def __init__(self, monitor: MemoryMonitor) -> None:
        self.step, self.logging_syncs, self.hook_seconds = 0, 0, 0.0
        for hook in STEP_HOOKS:
            setattr(monitor, hook, self._guarded(getattr(monitor, hook)))

    def _guarded(self, original: Any) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            quiet = (self.step + 1) % LOG_EVERY != 0
            torch.cuda.set_sync_debug_mode("error" if quiet else "warn")
            start = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    return original(*args, **kwargs)
            finally:
                self.hook_seconds += time.perf_counter() - start
                torch.cuda.set_sync_debug_mode(0)
                self.logging_syncs += sum("synchroniz" in str(w.message).lower() for w in seen)

        return guarded

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.step = trainer.global_step


class Model(pl.LightningModule):
    def __init__(self, width: int, keep: bool = False, churn: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, width))
        self.keep, self.churn = keep, churn
        self.hist: list[torch.Tensor] = []
        self.recent: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        if self.keep:
            self.hist.append(logits)
        if self.churn:  # a random-size activation, and small tensors that live for 10 steps
            size = int(torch.randint(100, 400, (1,))) * 2**20 // 4
            loss = loss + torch.ones(size, device=self.device).mean() * 0
            self.recent = [*self.recent[-9:], torch.ones(2**19, device=self.device)]
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Doubling(Dataset):
    """Batches (already batched: ``batch_size=None``) that double in size every 8 steps."""

    def __len__(self) -> int:
        return 400

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = 64 * 2 ** (i // 8)
        return torch.randn(n, 256), torch.randint(0, 4096, (n,))


def fit(model: Model, loader: DataLoader, capacity_gib: float, steps: int) -> dict[str, Any]:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(capacity_gib * 2**30 / total)
    monitor = MemoryMonitor()
    sync = SyncCheck(monitor)
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        max_steps=steps,
        log_every_n_steps=LOG_EVERY,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[sync, monitor],
    )
    real_oom = None
    try:
        trainer.fit(model, loader)
    except torch.OutOfMemoryError:
        real_oom = int(trainer.global_step)
    found = {f.code: f for f in monitor.findings}
    return {
        "codes": sorted(found),
        "growth": dict(found["memory_growth"].evidence, step=found["memory_growth"].step)
        if "memory_growth" in found
        else None,
        "out_of_memory": dict(found["out_of_memory"].evidence) if "out_of_memory" in found else None,
        "real_oom_step": real_oom,
        "steps": int(trainer.global_step),
        "logging_step_syncs": sync.logging_syncs,
        "hook_ms_per_step": 1e3 * sync.hook_seconds / max(int(trainer.global_step), 1),
        "messages": [f"{f.severity} {f.code} @{f.step}: {f.message}" for f in monitor.findings],
    }


def main(case: str, out: str) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64 * 64, 256), torch.randint(0, 32768, (64 * 64,)))
    loader = DataLoader(data, batch_size=64, shuffle=True, pin_memory=True)
    if case == "leak":  # 64 x 32768 float32 logits = 8 MiB a step
        result = fit(Model(32768, keep=True), loader, capacity_gib=2.0, steps=1000)
    elif case.startswith("fragmentation"):
        result = fit(Model(4096, churn=True), loader, capacity_gib=1.5, steps=200)
    else:
        result = fit(Model(4096), DataLoader(Doubling(), batch_size=None), capacity_gib=1.0, steps=400)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
