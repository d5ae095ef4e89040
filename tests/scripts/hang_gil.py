"""A fit whose training step blocks inside a C call that holds the GIL: `python hang_gil.py OUT SECONDS`.

At step 6 `training_step` calls libc's `sleep` through `ctypes.PyDLL` (PyDLL keeps the GIL during the call), so
no Python thread of the process runs, HangWatchdog's own watchdog thread included. Before the call it writes
OUT/stuck_at (wall time). tests/callbacks/test_hang_watchdog.py waits for OUT/root/hang_rank0.txt, then kills it.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lightning_diag import HangWatchdog
from tests.helpers import Regression, loader, trainer

STEP = 6


class HoldsTheGil(Regression):
    def __init__(self, out: str, seconds: int) -> None:
        super().__init__()
        self.out, self.seconds = out, seconds

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == STEP:
            with open(os.path.join(self.out, "stuck_at"), "w") as handle:
                handle.write(repr(time.time()))
            ctypes.PyDLL(None).sleep(self.seconds)  # libc sleep(), GIL held
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    out, seconds = sys.argv[1], int(sys.argv[2])
    t = trainer(
        max_epochs=1, default_root_dir=os.path.join(out, "root"), callbacks=[HangWatchdog(min_timeout_s=1.0)]
    )
    t.fit(HoldsTheGil(out, seconds), loader(n=128))
