"""Memory: runs that keep memory the ways users do (or die of an OOM), and healthy runs whose memory moves.

The models are MLPs on sklearn's digits with a wide hidden layer (16-24k units), so that what a leak keeps per
step (the hidden activations of a batch, 2-3 MiB, with their autograd graph) passes MemoryMonitor's default
``min_growth_mib=64`` within a few epochs, and token models on stdlib text for the variable-length runs. Every run
logs every 4 steps (a Trainer setting: MemoryMonitor's rule needs 8 measurement points after warm-up).

The runner fits every scenario in one process, so each ``build`` first gives the memory earlier runs freed back to
the OS (``malloc_trim``), as a fresh process would start: RSS does not grow into memory the C allocator already
holds, so a leak right after a larger run would show late.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from benchmarks.diagnosis import kit
from benchmarks.diagnosis.scenario import Run, Scenario

LOG_EVERY = 4


def rss_mib() -> float:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Wide(pl.LightningModule):
    """A digits classifier with one wide hidden layer; ``keep`` says what it keeps of each step.

    ``"hidden"``: the batch's hidden activations with their graph, every step (``self.hist.append(h)``);
    ``"loss"``: the loss tensor, every step (``self.losses.append(loss)``); ``"epoch"``: the hidden activations
    for an epoch-end summary, cleared at the epoch end (``self.training_step_outputs``); ``"validation"``: a
    CatMetric of validation features, computed at each validation end and never reset; ``"cache"``: detached
    hidden activations per batch index, filled in epoch 0. ``oom_after_mib``: raise an OOM once the process grew
    that much since the fit started (a device of that size). ``noise``: a temporary of a random size per step.
    ``keep_from``: the global step the leak starts at.
    """

    def __init__(
        self,
        hidden: int = 16384,
        keep: str | None = None,
        oom_after_mib: float | None = None,
        noise: bool = False,
        keep_from: int = 0,
    ) -> None:
        super().__init__()
        self.keep_from = keep_from
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 10))
        self.keep, self.oom_after_mib, self.noise = keep, oom_after_mib, noise
        self.hist: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.training_step_outputs: list[torch.Tensor] = []
        self.features: dict[int, torch.Tensor] = {}
        self.val_features = torchmetrics.CatMetric()
        self._start_mib: float | None = None

    def on_train_start(self) -> None:
        self._start_mib = rss_mib()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.oom_after_mib is not None and self._start_mib is not None:
            grown = rss_mib() - self._start_mib
            if grown > self.oom_after_mib:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate 20.00 MiB ({grown:.0f} MiB in use)"
                )
        x, y = batch
        h = self.net[1](self.net[0](x))
        loss = nn.functional.cross_entropy(self.net[3](self.net[2](h)), y)
        if self.noise:
            torch.empty(int(torch.randint(1, 8 * 2**20, ())), dtype=torch.uint8).fill_(1)
        if self.global_step < self.keep_from:
            pass
        elif self.keep == "hidden":
            self.hist.append(h)
        elif self.keep == "loss":
            self.losses.append(loss)
        elif self.keep == "epoch":
            self.training_step_outputs.append(h)
        elif self.keep == "cache" and self.current_epoch == 0:
            self.features[batch_idx] = h.detach().clone()
        self.log("train_loss", loss)
        return loss

    def on_train_epoch_end(self) -> None:
        if self.training_step_outputs:
            self.log("train_feature_mean", torch.stack([o.mean() for o in self.training_step_outputs]).mean())
            self.training_step_outputs.clear()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        h = self.net[1](self.net[0](x))
        if self.keep == "validation" and self.global_step >= self.keep_from:
            self.val_features.update(h)
        self.log("val_loss", nn.functional.cross_entropy(self.net[3](h), y))

    def on_validation_epoch_end(self) -> None:
        if self.keep == "validation":
            self.log("val_feature_mean", self.val_features.compute().mean())  # never reset

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-4, weight_decay=1e-4)


def _wide(seed: int, epochs: int = 4, batch_size: int = 32, val_batch: int = 256, **kwargs: Any) -> Run:
    kit.fresh_heap()
    hidden = kwargs.pop("hidden", 16384)
    extra = kwargs.pop("callbacks", [])
    trainer = {"max_epochs": epochs, "log_every_n_steps": LOG_EVERY, **kwargs.pop("trainer", {})}
    workers = kwargs.pop("num_workers", 0)
    train, val = kit.digits(seed)
    g = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(train, batch_size=batch_size, shuffle=True, generator=g, num_workers=workers)
    val_dl = DataLoader(val, batch_size=val_batch, num_workers=workers)
    return Run(Wide(hidden=hidden, **kwargs), train_dl, val_dl, trainer, extra_callbacks=extra)


# -- variable-length token batches ---------------------------------------------------------------------------
class Windows(Dataset):
    """Next-character windows over stdlib text with lengths drawn in ``[low, high)``; ``long``: one window of that
    length at index ``long_at``."""

    def __init__(
        self, n: int, low: int, high: int, seed: int, long: int | None = None, long_at: int = 0
    ) -> None:
        text = kit._corpus_text()
        vocab = sorted(set(text))
        self.vocab = len(vocab)
        index = {c: i for i, c in enumerate(vocab)}
        self.ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        g = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(low, high, (n,), generator=g).tolist()
        if long is not None:
            self.lengths[long_at] = long
        self.starts = torch.randint(0, len(self.ids) - max(self.lengths) - 1, (n,), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, n = self.starts[i], self.lengths[i]
        return self.ids[s : s + n], self.ids[s + 1 : s + n + 1]


def pad(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    xs = nn.utils.rnn.pad_sequence([x for x, _ in samples], batch_first=True)
    ys = nn.utils.rnn.pad_sequence([y for _, y in samples], batch_first=True, padding_value=-100)
    return xs, ys


class TokenGRU(pl.LightningModule):
    """A GRU language model over padded batches; ``max_tokens``: raise an OOM on a batch with more padded tokens
    than that (a device that fits the usual batches, not a much longer one)."""

    def __init__(self, vocab: int, max_tokens: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.rnn = nn.GRU(32, 64, batch_first=True)
        self.head = nn.Linear(64, vocab)
        self.max_tokens = max_tokens

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        out, _ = self.rnn(self.embed(x))
        return nn.functional.cross_entropy(self.head(out).flatten(0, 1), y.flatten(), ignore_index=-100)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.max_tokens is not None and batch[0].numel() > self.max_tokens:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {batch[0].numel() * 2**14 / 2**20:.2f} MiB"
            )
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=5e-3)


def _tokens(seed: int, low: int, high: int, epochs: int = 3, **kwargs: Any) -> Run:
    kit.fresh_heap()
    long = kwargs.pop("long", None)
    train = Windows(480, low, high, seed, long=long, long_at=200)
    val = Windows(128, low, high, seed + 100)
    g = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(train, batch_size=16, shuffle=True, generator=g, collate_fn=pad)
    val_dl = DataLoader(val, batch_size=64, collate_fn=pad)
    trainer = {"max_epochs": epochs, "log_every_n_steps": LOG_EVERY}
    return Run(TokenGRU(train.vocab, **kwargs), train_dl, val_dl, trainer)


# -- the scenarios -------------------------------------------------------------------------------------------
def leak_hidden_per_step(seed: int) -> Run:
    return _wide(seed, keep="hidden")


def leak_loss_per_step(seed: int) -> Run:
    # (24k hidden units: with 16k the graphs it keeps added up to 65-75 MiB over the run, against MemoryMonitor's
    # 64 MiB `min_growth_mib`, so whether it was found was a coin toss that said nothing about the detection)
    return _wide(seed, keep="loss", hidden=24576, epochs=7)


def outputs_kept_per_epoch(seed: int) -> Run:
    return _wide(seed, keep="epoch", hidden=24576, epochs=3)


def metric_never_reset(seed: int) -> Run:
    return _wide(seed, keep="validation", epochs=5)


def oom_at_a_long_batch(seed: int) -> Run:
    return _tokens(seed, 12, 40, long=400, max_tokens=16 * 64)


def leak_until_oom(seed: int) -> Run:
    return _wide(seed, keep="hidden", oom_after_mib=200.0, epochs=6)


def ok_variable_lengths(seed: int) -> Run:
    return _tokens(seed, 8, 160)


def ok_cache_in_epoch_0(seed: int) -> Run:
    return _wide(seed, keep="cache", hidden=24576, epochs=4)


def ok_workers_restarting(seed: int) -> Run:
    return _wide(seed, num_workers=2, hidden=4096, epochs=4)


def ok_checkpoint_every_epoch(seed: int) -> Run:
    import tempfile

    directory = tempfile.mkdtemp(prefix="ld_memory_ckpt_")
    checkpoint = ModelCheckpoint(dirpath=directory, every_n_epochs=1, save_top_k=-1)
    return _wide(seed, callbacks=[checkpoint], trainer={"enable_checkpointing": True}, epochs=4)


def ok_large_validation(seed: int) -> Run:
    return _wide(seed, val_batch=450, hidden=24576, epochs=4)


def ok_allocator_noise(seed: int) -> Run:
    return _wide(seed, noise=True, epochs=4)


def _failure(name: str, code: str, description: str, build: Any, fast: bool = False) -> Scenario:
    return Scenario(name, "failure", (code,), description, build, fast, isolated=True)


def _healthy(name: str, description: str, build: Any, fast: bool = False) -> Scenario:
    return Scenario(name, "healthy", (), description, build, fast, isolated=True)


SCENARIOS: list[Scenario] = [
    _failure(
        "memory_leak_hidden_per_step",
        "memory_growth",
        "`self.hist.append(h)`: every step's hidden activations kept with their autograd graph (2 MiB a step)",
        leak_hidden_per_step,
    ),
    _failure(
        "memory_leak_loss_per_step",
        "memory_growth",
        "`self.losses.append(loss)` without `.detach()`: each step's graph stays alive (the RSS grows by what "
        "it pins)",
        leak_loss_per_step,
    ),
    _failure(
        "memory_outputs_per_epoch",
        "memory_growth",
        "`self.training_step_outputs.append(h)` cleared at the epoch end: a saw-tooth of 3 MiB a step",
        outputs_kept_per_epoch,
    ),
    _failure(
        "memory_metric_never_reset",
        "memory_growth",
        "a CatMetric of validation features computed at each validation end and never reset",
        metric_never_reset,
    ),
    _failure(
        "memory_oom_long_batch",
        "out_of_memory",
        "variable-length text batches; one window is 10x longer and its batch does not fit",
        oom_at_a_long_batch,
    ),
    _failure(
        "memory_leak_until_oom",
        "memory_growth",
        "a per-step leak on a device that runs out 200 MiB later: the OOM is its consequence",
        leak_until_oom,
    ),
    _healthy(
        "memory_ok_variable_lengths",
        "text batches padded to lengths from 8 to 160: the memory of a step goes up and down",
        ok_variable_lengths,
    ),
    _healthy(
        "memory_ok_cache_in_epoch_0",
        "features cached once per batch in epoch 0 (130 MiB, detached), then reused",
        ok_cache_in_epoch_0,
    ),
    _healthy(
        "memory_ok_workers_restarting",
        "two DataLoader workers per loader, restarted at every epoch and validation",
        ok_workers_restarting,
    ),
    _healthy(
        "memory_ok_checkpoint_every_epoch",
        "a checkpoint saved at every epoch end (a 6 MiB model)",
        ok_checkpoint_every_epoch,
    ),
    _healthy(
        "memory_ok_large_validation",
        "validation in one batch of 450 samples through a 24k-unit layer: its own 40 MiB of activations",
        ok_large_validation,
    ),
    _healthy(
        "memory_ok_allocator_noise",
        "a temporary of a random size (up to 8 MiB) at every step",
        ok_allocator_noise,
    ),
]
