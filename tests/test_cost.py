"""Quiet steps cost no host synchronisation: every exported callback at its defaults, audited hook by hook.

The one documented exception is NaNGuard's skip with an ordinary optimizer: one small read per step (the same
kind a GradScaler makes). With a fused optimizer the skip happens on the device and the count is 0.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_diag
from lightning_diag.testing import SyncAudit
from lightning_diag.testing.syncs import STEP_HOOKS
from tests.helpers import Regression, loader, trainer

#: the hooks of a quiet step (an epoch's end reads its means once: not a quiet step)
HOOKS = tuple(h for h in STEP_HOOKS if h != "on_train_epoch_end")
LOG_EVERY = 5


class Fused(Regression):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused)


def suite() -> list[Callback]:
    return [
        lightning_diag.WarmupCosine(warmup_steps=2),
        lightning_diag.GradNormMonitor(),
        lightning_diag.GradClip(max_norm=1.0),
        lightning_diag.NaNGuard(),
        lightning_diag.EarlyStop(monitor="val_loss"),
        lightning_diag.OverfitDetector(),
        lightning_diag.SpeedMonitor(),
        lightning_diag.SanityCheck(),
        lightning_diag.SilentBugDetector(),
        lightning_diag.HangWatchdog(),
        lightning_diag.MemoryMonitor(),
        lightning_diag.ActivationMonitor(),
    ]


@pytest.mark.parametrize(("fused", "expected"), [(True, 0), (False, 1)])
def test_quiet_steps_make_no_host_sync(fused: bool, expected: int) -> None:
    callbacks = suite()
    audit = SyncAudit(callbacks, HOOKS)
    t = trainer(max_epochs=2, log_every_n_steps=LOG_EVERY, callbacks=[audit, *callbacks])
    t.fit(Fused(fused), loader(n=96), loader(n=16))
    # step 0 runs SanityCheck's pre-flight checks; logging steps read their values once
    quiet = {s: n for s, n in audit.per_step.items() if s > 0 and (s + 1) % LOG_EVERY != 0}
    assert len(quiet) >= 15 and all(n == expected for n in quiet.values()), quiet
    assert any(n > 0 for s, n in audit.per_step.items() if (s + 1) % LOG_EVERY == 0)  # the audit sees reads


class SyncDebug(Callback):
    """On quiet steps, turns CUDA's sync debug mode to "error" around every lightning_diag hook."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.step = 0
        for callback in callbacks:
            for hook in HOOKS:
                setattr(callback, hook, self._guarded(getattr(callback, hook)))

    def _guarded(self, original: Any) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            quiet = self.step > 0 and (self.step + 1) % LOG_EVERY != 0
            torch.cuda.set_sync_debug_mode("error" if quiet else 0)
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        return guarded

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.step = trainer.global_step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_quiet_steps_make_no_cuda_sync(precision: str) -> None:
    callbacks = suite()
    guard = SyncDebug(callbacks)
    t = trainer(
        accelerator="cuda",
        max_epochs=2,
        precision=precision,
        log_every_n_steps=LOG_EVERY,
        callbacks=[guard, *callbacks],
    )
    t.fit(Fused(True), loader(n=96), loader(n=16))  # a synchronising call on a quiet step raises
    assert t.state.finished
