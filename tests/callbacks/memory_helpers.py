"""Small LightningModules that keep memory the ways users do (a list of outputs with their graphs, outputs kept for
the epoch end, a metric never reset, a cache filled once) or die of an OOM, for the MemoryMonitor tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: outputs per sample: a batch of 32 keeps 1 MiB of logits
WIDTH = 8192
BATCH = 32


class Leaky(pl.LightningModule):
    """A linear classifier over ``width`` classes that keeps memory as ``leak`` says.

    ``leak``: ``"step"`` (``self.hist.append(logits)``: logits with their graph, every step), ``"loss"``
    (``self.hist.append(loss)``), ``"epoch"`` (``self.outputs`` of the epoch, with graphs, cleared at its end),
    ``"validation"`` (a CatMetric updated in validation, computed, never reset), ``"cache"`` (detached logits per
    batch index, filled in epoch 0 only). ``oom``: ``(phase, step)`` raises ``torch.OutOfMemoryError`` in that phase
    at that global step; ``oom_above``: raises in ``training_step`` on a batch longer than that.
    """

    def __init__(
        self,
        leak: str | None = None,
        width: int = WIDTH,
        oom: tuple[str, int] | None = None,
        oom_above: int | None = None,
        noise: bool = False,
    ) -> None:
        super().__init__()
        self.leak, self.oom, self.oom_above, self.noise = leak, oom, oom_above, noise
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, width))
        self.hist: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.cache: dict[int, torch.Tensor] = {}
        self.val_preds = torchmetrics.CatMetric()

    def _raise(self, phase: str) -> None:
        if self.oom is not None and self.oom == (phase, self.global_step):
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (in {phase})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # token batches: mean over the sequence
            x = x.mean(1)
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.oom_above is not None and x.ndim == 3 and x.shape[1] > self.oom_above:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.numel() * 4096} bytes")
        self._raise("forward")
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        if self.noise:  # allocator noise: a temporary of a random size every step
            torch.empty(int(torch.randint(1, 4 * 2**20, ())), dtype=torch.uint8).fill_(1)
        if self.leak == "step":
            self.hist.append(logits)
        elif self.leak == "loss":
            self.hist.append(loss)
        elif self.leak == "epoch":
            self.outputs.append(logits)
        elif self.leak == "cache" and self.current_epoch == 0:
            self.cache[batch_idx] = logits.detach().clone()
        return loss

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._raise("backward")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self._raise("optimizer step")

    def on_train_epoch_end(self) -> None:
        self.outputs.clear()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._raise("validation")
        x, y = batch
        logits = self(x)
        if self.leak == "validation":
            self.val_preds.update(logits)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))

    def on_validation_epoch_end(self) -> None:
        if self.leak == "validation":
            self.log("val_pred_mean", self.val_preds.compute().mean())  # computed, never reset

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def data(n: int, width: int = WIDTH, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 16, generator=g), torch.randint(0, width, (n,), generator=g))


def loaders(
    steps: int = 24, val: int = 256, width: int = WIDTH, val_batch: int = 256, **kwargs: Any
) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(data(steps * BATCH, width), batch_size=BATCH, shuffle=True, **kwargs)
    return train, DataLoader(data(val, width, seed=1), batch_size=val_batch, **kwargs)


class Tokens(torch.utils.data.Dataset):
    """Sequences of 16 features with lengths drawn per sample (``long_at``: the index of one sample ``long`` long)."""

    def __init__(
        self, n: int, low: int = 8, high: int = 64, long_at: int | None = None, long: int = 512, seed: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(low, high, (n,), generator=g).tolist()
        if long_at is not None:
            self.lengths[long_at] = long
        self.labels = torch.randint(0, WIDTH, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.randn(self.lengths[i], 16), self.labels[i]


def pad(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of sequences to its longest one (what a variable-length batch costs)."""
    xs = nn.utils.rnn.pad_sequence([x for x, _ in samples], batch_first=True)
    return xs, torch.tensor([y for _, y in samples])
