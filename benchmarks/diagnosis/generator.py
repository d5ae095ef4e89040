"""The healthy-run generator: procedurally varied, sensibly tuned healthy runs, each checked for false alarms.

    python -m benchmarks.diagnosis.generator --count 200 --seed 0 [--json out.json] [--bare] [--only 3 17 ...]

A configuration is drawn from ``(seed, index)`` alone (the same index gives the same run whatever ``--count``):

- model family: ``mlp`` (digits / blobs / moons / a regression), ``cnn`` (digits as 8x8 images), ``rnn`` (an
  LSTM or GRU character language model), ``transformer`` (a small causal LM), ``vae`` (digits), ``nbeats`` (an
  N-BEATS-like stack of residual MLP blocks on synthetic seasonal series; as in N-BEATS, the last block's backcast
  head feeds nothing the loss reads, so it gets no gradient by design), ``embedding`` (categorical columns through
  ``nn.Embedding`` tables, or a bag of token embeddings);
- optimizer ``sgd``, ``momentum`` (SGD, 0.9), ``adam``, ``adamw``, ``rmsprop``, at a learning rate from a range
  known to work for that family and optimizer (scaled down for batches below 32);
- schedule ``constant``, ``cosine``, ``onecycle``, ``step``, ``plateau`` (ReduceLROnPlateau on ``val_loss``),
  ``warmup`` (linear warmup, then constant); transformers always warm up (``warmup``/``onecycle``) or stay at a
  modest constant rate;
- batch size 2-256 (small batches draw a fixed number of fresh batches per epoch, and every run sees a minimum
  number of samples, so a run takes ~80-900 steps), label noise
  0-30% on classification tasks, precision ``32``, ``bf16-mixed`` or ``16-mixed`` with the real GradScaler on CPU
  (``MixedPrecision("16-mixed", "cpu")``; not for RNNs, which oneDNN cannot run in float16 on CPU), optional
  dropout / BatchNorm / weight decay / gradient clipping / gradient accumulation, and about a third of the models
  wrapped in one container module (``Task.net.model.<layers>``).

Each configuration is a :class:`~benchmarks.diagnosis.scenario.Scenario` (``kind="healthy"``) fitted by the
runner's :func:`~benchmarks.diagnosis.run.run_scenario` (the suite attached the same way as in the corpus). The run
records its own per-step training loss and per-evaluation validation loss; a configuration counts as healthy only
if it **learned** (the mean loss of the last fifth of the steps at most ``LEARN_RATIO`` times the mean of the first
steps) and did not overfit (not both of the last two validation losses above its best by ``OVERFIT_TOLERANCE``); the
others are reported as "not healthy" and are not scored (the sampler is tuned so that there are none at seed 0). A
run the suite stopped (blocked) or that crashed is scored as such: ``--bare`` fits without the suite and shows that
every configuration of seed 0 learns on its own. ``--rescore out.json`` scores a saved sweep again.

Output: one line per run, then the false alarms (runs with any warning/error finding, by code), blocked runs
(``SanityCheckError``/``NonFiniteError``), crashes, configurations that did not learn, and the time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if __package__ in (None, ""):  # run as a script: make `benchmarks.diagnosis` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

from benchmarks.diagnosis import kit  # noqa: E402
from benchmarks.diagnosis.run import Result, _quiet_lightning, run_scenario  # noqa: E402
from benchmarks.diagnosis.scenario import Run, Scenario  # noqa: E402

__all__ = [
    "FAMILIES",
    "LEARN_RATIO",
    "OPTIMIZERS",
    "SCHEDULES",
    "Config",
    "GenResult",
    "generate",
    "run_config",
    "sample",
    "scenario_of",
]

FAMILIES = ("mlp", "cnn", "rnn", "transformer", "vae", "nbeats", "embedding")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "onecycle", "step", "plateau", "warmup")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
_BATCH_WEIGHTS = (1, 2, 3, 3, 3, 3, 2, 2)
#: samples a run must see at least (small batches get more steps), per family
_MIN_SAMPLES = {"vae": 20000, "nbeats": 4000, "embedding": 4000}
_DEFAULT_MIN_SAMPLES = 2000
#: at most this many optimizer steps per run
_MAX_STEPS = 900

#: learned: mean loss over the last fifth of the steps <= LEARN_RATIO x the mean of the first steps
LEARN_RATIO = 0.8
#: did not overfit: not both of the last two validation losses above best x (1 + OVERFIT_TOLERANCE) (+ a small slack)
OVERFIT_TOLERANCE = 0.1

#: learning-rate ranges (low, high; drawn log-uniformly) per family and optimizer, at batch size 32
LR_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "mlp": {
        "sgd": (0.05, 0.2),
        "momentum": (0.01, 0.05),
        "adam": (1e-3, 3e-3),
        "adamw": (1e-3, 3e-3),
        "rmsprop": (5e-4, 2e-3),
    },
    "cnn": {
        "sgd": (0.05, 0.1),
        "momentum": (0.01, 0.03),
        "adam": (1e-3, 2e-3),
        "adamw": (1e-3, 2e-3),
        "rmsprop": (3e-4, 1e-3),
    },
    "rnn": {
        "sgd": (0.5, 1.0),
        "momentum": (0.1, 0.3),
        "adam": (3e-3, 1e-2),
        "adamw": (3e-3, 1e-2),
        "rmsprop": (1e-3, 3e-3),
    },
    "transformer": {
        "sgd": (0.1, 0.3),
        "momentum": (0.03, 0.1),
        "adam": (1e-3, 2e-3),
        "adamw": (1e-3, 2e-3),
        "rmsprop": (3e-4, 6e-4),
    },
    "vae": {
        "sgd": (8e-3, 1.5e-2),
        "momentum": (2e-3, 4e-3),
        "adam": (1e-3, 3e-3),
        "adamw": (1e-3, 3e-3),
        "rmsprop": (5e-4, 1e-3),
    },
    "nbeats": {
        "sgd": (0.1, 0.2),
        "momentum": (0.02, 0.04),
        "adam": (1e-3, 3e-3),
        "adamw": (1e-3, 3e-3),
        "rmsprop": (5e-4, 1e-3),
    },
    "embedding": {
        "sgd": (0.1, 0.3),
        "momentum": (0.02, 0.05),
        "adam": (2e-3, 6e-3),
        "adamw": (2e-3, 6e-3),
        "rmsprop": (1e-3, 3e-3),
    },
}


# -- configurations -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    """One generated healthy run."""

    index: int
    seed: int
    family: str
    variant: str  # the data set / cell / model flavour inside the family
    optimizer: str
    lr: float
    schedule: str
    batch_size: int
    label_noise: float
    precision: str
    wrapped: bool
    width: int
    depth: int
    dropout: float
    batchnorm: bool
    weight_decay: float
    clip: float | None
    accumulate: int
    limit_batches: int | None  # training batches per epoch (small batches keep a run short); None: all
    epochs: int

    @property
    def name(self) -> str:
        parts = [
            f"g{self.index:03d}",
            self.family,
            self.variant,
            self.optimizer,
            self.schedule,
            f"b{self.batch_size}",
            {"32": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}[self.precision],
        ]
        if self.label_noise:
            parts.append(f"noise{round(self.label_noise * 100)}")
        if self.wrapped:
            parts.append("wrapped")
        return "_".join(parts)


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def sample(seed: int, index: int) -> Config:
    """The configuration ``index`` of generator ``seed`` (deterministic, independent of the other indices)."""
    rng = random.Random(seed * 1_000_003 + index * 7_919 + 17)
    family = FAMILIES[index % len(FAMILIES)] if index < 2 * len(FAMILIES) else rng.choice(FAMILIES)
    variant = {
        "mlp": rng.choice(("digits", "digits", "blobs", "moons", "regression")),
        "cnn": rng.choice(("plain", "batchnorm")),
        "rnn": rng.choice(("lstm", "gru")),
        "transformer": rng.choice(("postln", "preln")),
        "vae": "digits",
        "nbeats": "seasonal",
        "embedding": rng.choice(("tabular", "bag")),
    }[family]
    optimizer = rng.choice(OPTIMIZERS)
    schedule = rng.choice(SCHEDULES)
    if family == "transformer" and schedule in ("step", "plateau", "cosine"):
        schedule = rng.choice(("warmup", "onecycle", "constant"))
    batch_size = rng.choices(BATCH_SIZES, weights=_BATCH_WEIGHTS)[0]
    if family in ("rnn", "transformer"):
        batch_size = min(max(batch_size, 4), 64)  # LM windows: 450 training sequences
    if family == "vae":
        # a 2-sample ELBO is too noisy to learn in a short run; with plain SGD a small-batch VAE collapses to the
        # mean image (measured: batch 8, lr 5e-3, 800 steps: 36.0 -> 33.7 and flat)
        batch_size = max(batch_size, 32 if optimizer in ("sgd", "momentum") else 8)
    classification = (family in ("mlp", "cnn", "embedding") and variant != "regression") or (
        family == "mlp" and variant in ("digits", "blobs", "moons")
    )
    label_noise = rng.choice((0.0, 0.0, 0.0, 0.1, 0.2, 0.3)) if classification else 0.0
    precisions = ("32", "bf16-mixed") if family == "rnn" else PRECISIONS
    precision = rng.choices(precisions, weights=(3, 1, 1)[: len(precisions)])[0]
    low, high = LR_RANGES[family][optimizer]
    lr = _log_uniform(rng, low, high)
    if batch_size < 32:  # smaller, noisier batches: a smaller step (less so for adaptive optimizers)
        lr *= (batch_size / 32) ** (0.5 if optimizer in ("sgd", "momentum") else 0.25)
    if schedule == "onecycle" and not (family == "transformer" and optimizer in ("sgd", "momentum")):
        lr *= 2.0  # OneCycle's peak rate is usually set above a constant rate
    if family == "transformer" and schedule == "constant":
        lr *= 0.5
    width = rng.choice((32, 64, 128, 256)) if family != "transformer" else rng.choice((32, 64))
    depth = rng.choice((1, 2, 3))
    dropout = rng.choice((0.0, 0.0, 0.1, 0.2)) if family in ("mlp", "cnn", "embedding", "nbeats") else 0.0
    batchnorm = (
        (variant == "batchnorm")
        if family == "cnn"
        else (family == "mlp" and batch_size >= 16 and rng.random() < 0.3)
    )
    weight_decay = rng.choice((0.0, 0.0, 1e-4, 1e-2 if optimizer == "adamw" else 1e-4))
    clip = rng.choice((None, None, None, 1.0, 5.0))
    accumulate = rng.choice((1, 1, 1, 1, 2, 4)) if batch_size <= 64 else 1
    steps_per_epoch_target = rng.choice((20, 30, 40))
    # small batches: every epoch draws `limit` fresh batches from the whole (shuffled) training set, so a run stays
    # short without shrinking the data (a cut training set overfits within a few epochs)
    limit = steps_per_epoch_target * accumulate if batch_size * accumulate < 32 else None
    epochs = 0  # filled from the data size below
    cfg = Config(
        index=index,
        seed=seed,
        family=family,
        variant=variant,
        optimizer=optimizer,
        lr=lr,
        schedule=schedule,
        batch_size=batch_size,
        label_noise=label_noise,
        precision=precision,
        wrapped=rng.random() < 0.35,
        width=width,
        depth=depth,
        dropout=dropout,
        batchnorm=batchnorm,
        weight_decay=weight_decay,
        clip=clip,
        accumulate=accumulate,
        limit_batches=limit,
        epochs=epochs,
    )
    steps_per_epoch = _steps_per_epoch(cfg)
    target_steps = rng.choice((120, 160, 200)) if family in ("vae", "nbeats") else rng.choice((80, 120, 160))
    min_samples = _MIN_SAMPLES.get(family, _DEFAULT_MIN_SAMPLES)
    target_steps = min(_MAX_STEPS, max(target_steps, math.ceil(min_samples / (batch_size * accumulate))))
    epochs = max(3, min(40, math.ceil(target_steps / steps_per_epoch)))
    return dataclasses.replace(cfg, epochs=epochs)


def generate(count: int, seed: int = 0) -> list[Config]:
    """The first ``count`` configurations of generator ``seed``."""
    return [sample(seed, i) for i in range(count)]


#: rough milliseconds per optimizer step on one CPU thread, per family (for picking a fast sample)
_STEP_MS = {"mlp": 3, "cnn": 10, "rnn": 20, "transformer": 20, "vae": 3, "nbeats": 4, "embedding": 3}


def estimated_seconds(cfg: Config) -> float:
    """A rough cost of one run with the suite (fixed Trainer + suite cost, plus the steps)."""
    steps = cfg.epochs * _steps_per_epoch(cfg) * cfg.accumulate
    per_step = (
        _STEP_MS[cfg.family] * (1.0 + cfg.batch_size / 128) * (1.5 if cfg.precision == "16-mixed" else 1.0)
    )
    return 0.8 + steps * per_step / 1000


def fast_sample(seed: int = 0, count: int = 24, per_family: int = 4, budget: float = 2.6) -> list[Config]:
    """``count`` configurations of generator ``seed`` estimated to run in ``budget`` seconds each (language models:
    a larger budget, at most one of each), at most ``per_family`` of a family, the first ones in index order: the
    fixed sample of the test suite."""
    budgets = {"rnn": 4.0, "transformer": 4.5}
    caps = {"rnn": 1, "transformer": 1}
    picked: list[Config] = []
    families: collections.Counter[str] = collections.Counter()
    index = 0
    while len(picked) < count and index < 2000:
        cfg = sample(seed, index)
        index += 1
        cap = caps.get(cfg.family, per_family)
        if families[cfg.family] < cap and estimated_seconds(cfg) <= budgets.get(cfg.family, budget):
            picked.append(cfg)
            families[cfg.family] += 1
    return picked


# -- data -----------------------------------------------------------------------------------------------------------
_SIZES = {
    ("mlp", "digits"): 1347,
    ("mlp", "blobs"): 1200,
    ("mlp", "moons"): 900,
    ("mlp", "regression"): 1200,
    ("cnn", "plain"): 1347,
    ("cnn", "batchnorm"): 1347,
    ("rnn", "lstm"): 450,
    ("rnn", "gru"): 450,
    ("transformer", "postln"): 450,
    ("transformer", "preln"): 450,
    ("vae", "digits"): 1347,
    ("nbeats", "seasonal"): 3000,
    ("embedding", "tabular"): 3000,
    ("embedding", "bag"): 3000,
}


def _steps_per_epoch(cfg: Config) -> int:
    batches = math.ceil(_SIZES[(cfg.family, cfg.variant)] / cfg.batch_size)
    if cfg.limit_batches is not None:
        batches = min(batches, cfg.limit_batches)
    return max(1, math.ceil(batches / cfg.accumulate))  # Lightning steps on an epoch's last batch too


def _cut(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= len(ds):  # type: ignore[arg-type]
        return ds
    assert isinstance(ds, TensorDataset)
    return TensorDataset(*(t[:n] for t in ds.tensors))


def _cut_val(ds: Dataset, n: int = 384) -> Dataset:
    return _cut(ds, n)


def _seasonal(seed: int, n: int, window: int = 32, horizon: int = 8) -> tuple[TensorDataset, TensorDataset]:
    """Windows of synthetic seasonal series (two sines, a trend, noise), each window standardised by its input."""
    g = torch.Generator().manual_seed(seed)
    total = n + 400
    t = torch.arange(window + horizon, dtype=torch.float32)
    period1 = torch.randint(6, 20, (total, 1), generator=g).float()
    period2 = torch.randint(20, 60, (total, 1), generator=g).float()
    phase = torch.rand(total, 2, generator=g) * 6.28
    amp = 0.5 + torch.rand(total, 2, generator=g)
    trend = 0.02 * torch.randn(total, 1, generator=g)
    series = (
        amp[:, :1] * torch.sin(2 * math.pi * t / period1 + phase[:, :1])
        + amp[:, 1:] * torch.sin(2 * math.pi * t / period2 + phase[:, 1:])
        + trend * t
        + 0.1 * torch.randn(total, window + horizon, generator=g)
    )
    x, y = series[:, :window], series[:, window:]
    mean, std = x.mean(1, keepdim=True), x.std(1, keepdim=True) + 1e-3
    x, y = (x - mean) / std, (y - mean) / std
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


def _categorical(seed: int, n: int, noise: float) -> tuple[TensorDataset, TensorDataset]:
    """Three categorical columns (10, 20, 50 levels) and four continuous ones; 4 classes from a hidden linear rule."""
    g = torch.Generator().manual_seed(seed)
    total = n + 400
    cards = (10, 20, 50)
    cats = torch.stack([torch.randint(0, c, (total,), generator=g) for c in cards], 1)
    conts = torch.randn(total, 4, generator=g)
    score = sum(
        torch.randn(c, 4, generator=g)[cats[:, i]] for i, c in enumerate(cards)
    ) + conts @ torch.randn(4, 4, generator=g)
    y = score.argmax(1)
    if noise:
        flip = torch.rand(total, generator=g) < noise
        y[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
    return TensorDataset(cats[:n], conts[:n], y[:n]), TensorDataset(cats[n:], conts[n:], y[n:])


def _bag(
    seed: int, n: int, noise: float, vocab: int = 200, length: int = 16
) -> tuple[TensorDataset, TensorDataset]:
    """Token sequences whose words are drawn from a class-specific distribution (4 classes)."""
    g = torch.Generator().manual_seed(seed)
    total = n + 400
    prefs = torch.softmax(2.0 * torch.randn(4, vocab, generator=g), 1)
    y = torch.randint(0, 4, (total,), generator=g)
    x = torch.multinomial(prefs[y], length, replacement=True, generator=g)
    if noise:
        flip = torch.rand(total, generator=g) < noise
        y[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
    return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])


def _tabular_collate(
    samples: Sequence[tuple[torch.Tensor, ...]],
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    cats = torch.stack([s[0] for s in samples])
    conts = torch.stack([s[1] for s in samples])
    y = torch.stack([s[2] for s in samples])
    return (cats, conts), y


# -- models ---------------------------------------------------------------------------------------------------------
class Container(nn.Module):
    """One container module around the whole network (as libraries wrap theirs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        return self.model(x)


class NBeatsBlock(nn.Module):
    def __init__(self, window: int, horizon: int, width: int, layers: int) -> None:
        super().__init__()
        body: list[nn.Module] = []
        for i in range(layers):
            body += [nn.Linear(window if i == 0 else width, width), nn.ReLU()]
        self.body = nn.Sequential(*body)
        self.backcast = nn.Linear(width, window)
        self.forecast = nn.Linear(width, horizon)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.backcast(h), self.forecast(h)


class NBeatsLike(nn.Module):
    """A stack of residual MLP blocks: each removes its backcast from the input and adds its forecast."""

    def __init__(
        self, window: int = 32, horizon: int = 8, width: int = 64, blocks: int = 3, layers: int = 2
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(NBeatsBlock(window, horizon, width, layers) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        forecast = 0.0
        for block in self.blocks:
            back, fore = block(x)
            x = x - back
            forecast = forecast + fore
        return forecast  # type: ignore[return-value]


class TabularEmbedding(nn.Module):
    def __init__(self, cards: Sequence[int], conts: int, width: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(c, 8) for c in cards)
        self.mlp = kit.mlp([8 * len(cards) + conts, width, width, classes], dropout=dropout)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cats, conts = x
        parts = [table(cats[:, i]) for i, table in enumerate(self.tables)]
        return self.mlp(torch.cat([*parts, conts], 1))


class BagOfEmbeddings(nn.Module):
    def __init__(self, vocab: int, width: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.head = kit.mlp([32, width, classes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(1))


class VAE(nn.Module):
    def __init__(self, features: int = 64, width: int = 128, latent: int = 8) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, width), nn.ReLU())
        self.mu = nn.Linear(width, latent)
        self.logvar = nn.Linear(width, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, width), nn.ReLU(), nn.Linear(width, features))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        mu, logvar = self.mu(h), self.logvar(h).clamp(-8.0, 8.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


class GenTask(kit.Task):
    """``kit.Task`` with RMSprop, every schedule of the generator, a VAE loss, and its own loss record."""

    def __init__(self, net: nn.Module, cfg: Config, loss: str, total_steps: int) -> None:
        optimizer = {"sgd": "sgd", "momentum": "sgd", "adam": "adam", "adamw": "adamw", "rmsprop": "rmsprop"}[
            cfg.optimizer
        ]
        super().__init__(
            net,
            loss=loss,
            optimizer=optimizer,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=0.9 if cfg.optimizer == "momentum" else 0.0,
            total_steps=total_steps,
            warmup_steps=max(5, total_steps // 10),
        )
        self.cfg = cfg
        self.step_losses: list[float] = []
        self.val_losses: list[float] = []
        self._val_sum, self._val_n = 0.0, 0

    def _vae_loss(
        self, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        recon, mu, logvar = out
        rec = (recon.float() - x.float()).pow(2).sum(1).mean()
        kl = (-0.5 * (1 + logvar.float() - mu.float().pow(2) - logvar.float().exp()).sum(1)).mean()
        return rec + kl

    def _step_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        if self.loss_kind == "vae":
            return self._vae_loss(self(x), x)
        return self._loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._step_loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=False)
        self.step_losses.append(float(loss.detach().float()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss = self._step_loss(batch)
        self.log("val_loss", loss, prog_bar=False)
        self._val_sum += float(loss.detach().float()) * len(batch[1])
        self._val_n += len(batch[1])

    def on_validation_epoch_end(self) -> None:
        if self._val_n and not self.trainer.sanity_checking:
            self.val_losses.append(self._val_sum / self._val_n)
        self._val_sum, self._val_n = 0.0, 0

    def configure_optimizers(self) -> Any:
        cfg = self.cfg
        params = [p for p in self.parameters() if p.requires_grad]
        if cfg.optimizer in ("sgd", "momentum"):
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=cfg.lr, momentum=self.momentum, weight_decay=cfg.weight_decay
            )
        elif cfg.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = self.total_steps
        if cfg.schedule == "constant":
            return opt
        if cfg.schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "interval": "epoch", "monitor": "val_loss"},
            }
        if cfg.schedule == "cosine":
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        elif cfg.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps + 10)
        elif cfg.schedule == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, steps // 3), gamma=0.3)
        else:  # warmup
            w = self.warmup_steps
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / w))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _net_and_data(cfg: Config) -> tuple[nn.Module, str, Dataset, Dataset, Any]:
    """The network, its loss kind, the training/validation sets and the collate function."""
    seed, noise = cfg.seed * 1000 + cfg.index, cfg.label_noise
    collate = None
    if cfg.family == "mlp":
        hidden = [cfg.width] * cfg.depth
        if cfg.variant == "digits":
            train, val = kit.digits(seed, label_noise=noise)
            net, loss = kit.mlp([64, *hidden, 10], dropout=cfg.dropout, batchnorm=cfg.batchnorm), "ce"
        elif cfg.variant == "blobs":
            train, val = kit.blobs(seed, n=1600)
            train, val = _noisy(train, noise, 4, seed), _noisy(val, noise, 4, seed + 1)
            net, loss = kit.mlp([16, *hidden, 4], dropout=cfg.dropout, batchnorm=cfg.batchnorm), "ce"
        elif cfg.variant == "moons":
            train, val = kit.moons(seed, n=1200, noise=0.2)
            train, val = _noisy(train, noise, 2, seed), _noisy(val, noise, 2, seed + 1)
            net, loss = kit.mlp([2, *hidden, 2], dropout=cfg.dropout, batchnorm=cfg.batchnorm), "ce"
        else:
            train, val = kit.regression(seed, n=1600)
            net, loss = kit.mlp([8, *hidden, 1], dropout=cfg.dropout, batchnorm=cfg.batchnorm), "mse"
    elif cfg.family == "cnn":
        train, val = kit.digits(seed, label_noise=noise)
        to_img = lambda ds: TensorDataset(ds.tensors[0].view(-1, 1, 8, 8), ds.tensors[1])  # noqa: E731
        train, val = to_img(train), to_img(val)
        net, loss = kit.SmallCNN(batchnorm=cfg.batchnorm), "ce"
    elif cfg.family in ("rnn", "transformer"):
        train, val, vocab = kit.text_tokens(seed)
        if cfg.family == "rnn":
            net = kit.RNNLM(vocab, cfg.variant, hidden=max(cfg.width, 48))
        else:
            net = kit.TinyTransformer(
                vocab, d_model=cfg.width, layers=min(cfg.depth, 2), norm_first=cfg.variant == "preln"
            )
        loss = "lm"
    elif cfg.family == "vae":
        train, val = kit.digits(seed)
        net, loss = VAE(width=max(cfg.width, 64)), "vae"
    elif cfg.family == "nbeats":
        train, val = _seasonal(seed, 3000)
        net, loss = NBeatsLike(width=max(cfg.width, 64), blocks=cfg.depth + 1, layers=2), "mse"
    else:  # embedding
        if cfg.variant == "tabular":
            train, val = _categorical(seed, 3000, noise)
            net, loss = TabularEmbedding((10, 20, 50), 4, max(cfg.width, 64), 4, cfg.dropout), "ce"
            collate = _tabular_collate
        else:
            train, val = _bag(seed, 3000, noise)
            net, loss = BagOfEmbeddings(200, max(cfg.width, 64), 4), "ce"
    return (Container(net) if cfg.wrapped else net), loss, train, _cut_val(val), collate


def _noisy(ds: TensorDataset, noise: float, classes: int, seed: int) -> TensorDataset:
    if not noise:
        return ds
    x, y = ds.tensors
    g = torch.Generator().manual_seed(5000 + seed)
    y = y.clone()
    flip = torch.rand(len(y), generator=g) < noise
    y[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
    return TensorDataset(x, y)


def build(cfg: Config) -> Run:
    """The :class:`Run` of a configuration (model, loaders, Trainer arguments)."""
    net, loss, train, val, collate = _net_and_data(cfg)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + cfg.index)
    train_dl = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=g, collate_fn=collate)
    val_dl = DataLoader(val, batch_size=256, collate_fn=collate)
    steps = cfg.epochs * _steps_per_epoch(cfg)
    model = GenTask(net, cfg, loss, total_steps=steps)
    trainer: dict[str, Any] = {"max_epochs": cfg.epochs, "accumulate_grad_batches": cfg.accumulate}
    if cfg.limit_batches is not None:
        trainer["limit_train_batches"] = cfg.limit_batches
    if cfg.clip is not None:
        trainer["gradient_clip_val"] = cfg.clip
    if cfg.precision == "16-mixed":
        from lightning.pytorch.plugins.precision import MixedPrecision

        trainer["plugins"] = [
            MixedPrecision("16-mixed", "cpu")
        ]  # the real GradScaler (precision="16-mixed" is bf16 on CPU)
    elif cfg.precision == "bf16-mixed":
        trainer["precision"] = "bf16-mixed"
    return Run(model, train_dl, val_dl, trainer, monitor="val_loss")


# -- running --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GenResult:
    """One generated run: the runner's result, and whether the configuration itself was healthy."""

    config: Config
    result: Result
    initial_loss: float
    final_loss: float
    val_losses: list[float]

    @property
    def learned(self) -> bool:
        ok = all(math.isfinite(v) for v in (self.initial_loss, self.final_loss))
        if not ok:
            return False
        if self.initial_loss > 0:
            return self.final_loss <= LEARN_RATIO * self.initial_loss
        return self.final_loss <= self.initial_loss - 0.2 * abs(self.initial_loss)

    @property
    def overfit(self) -> bool:
        vals = [v for v in self.val_losses if math.isfinite(v)]
        if len(vals) < 3:
            return False
        best = min(vals)
        # sustained: the last two evaluations both above the best (one noisy evaluation is not overfitting)
        return min(vals[-2:]) > best * (1 + OVERFIT_TOLERANCE) + 1e-3

    @property
    def healthy(self) -> bool:
        """The configuration is what it claims: it learned and did not overfit (otherwise it is not scored).

        A run the suite stopped (blocked) or that crashed cannot show it learned: it is scored as blocked/crashed
        (the configuration itself is checked by ``--bare``, where it runs without the suite).
        """
        if self.result.status != "finished":
            return True
        return self.learned and not self.overfit

    @property
    def false_alarm(self) -> bool:
        """A scored run with any warning/error finding (a blocked run has the error that blocked it)."""
        return self.healthy and bool(self.result.found)

    @property
    def blocked(self) -> bool:
        return self.result.status == "stopped"

    @property
    def crashed(self) -> bool:
        return self.result.status == "crashed"


def scenario_of(cfg: Config, holder: dict[str, Any] | None = None) -> Scenario:
    """The configuration as a corpus scenario; the built model is kept in ``holder[cfg.name]``."""

    def make(_seed: int) -> Run:
        run = build(cfg)
        if holder is not None:
            holder[cfg.name] = run.model
        return run

    return Scenario(cfg.name, "healthy", (), f"generated healthy run {cfg.name}", make)


def _bare(scenario: Scenario, seed: int) -> Result:
    """Fit without the suite (the configuration alone), in the runner's quiet Trainer."""
    import tempfile

    from lightning.pytorch.loggers import CSVLogger

    start = time.perf_counter()
    status, error = "finished", None
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), _quiet_lightning():
                pl.seed_everything(seed, verbose=False)
                run = scenario.build(seed)
                trainer = pl.Trainer(
                    accelerator="cpu",
                    devices=1,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    enable_checkpointing=False,
                    logger=CSVLogger(tmp, name="run"),
                    num_sanity_val_steps=0,
                    **run.trainer_kwargs,
                )
                trainer.fit(run.model, run.train_dataloaders, run.val_dataloaders)
        except Exception as exc:
            status, error = "crashed", f"{type(exc).__name__}: {str(exc)[:300]}"
    return Result(
        scenario.name, "healthy", seed, [], [], [], None, status, error, round(time.perf_counter() - start, 2)
    )


def run_config(cfg: Config, *, bare: bool = False) -> GenResult:
    """Fit one configuration (with the suite, through the corpus runner; ``bare``: without it)."""
    holder: dict[str, Any] = {}
    scenario = scenario_of(cfg, holder)
    seed = cfg.seed * 1000 + cfg.index
    result = _bare(scenario, seed) if bare else run_scenario(scenario, seed)
    model = holder.get(cfg.name)
    losses = list(getattr(model, "step_losses", []))
    finite = [v for v in losses if math.isfinite(v)]
    head = max(3, len(losses) // 20)
    tail = max(3, len(losses) // 5)
    initial = sum(finite[:head]) / len(finite[:head]) if finite[:head] else float("nan")
    final_values = [v for v in losses[-tail:] if math.isfinite(v)]
    final = sum(final_values) / len(final_values) if final_values else float("nan")
    return GenResult(cfg, result, initial, final, list(getattr(model, "val_losses", [])))


def _line(r: GenResult) -> str:
    res = r.result
    if res.status == "crashed":
        verdict = "CRASH"
    elif res.status == "stopped":
        verdict = "BLOCKED"
    elif not r.healthy:
        verdict = "NOT HEALTHY" + (" (did not learn)" if not r.learned else " (overfit)")
    elif res.found:
        verdict = "FALSE ALARM"
    else:
        verdict = "ok"
    err = f" [{res.status}: {res.error}]" if res.error else ""
    return (
        f"{r.config.name:62} {verdict:12} found={','.join(res.found) or '-'} primary={res.primary or '-'} "
        f"loss {r.initial_loss:.3g}->{r.final_loss:.3g} ({res.seconds:.1f}s){err}"
    )


def summary(results: Sequence[GenResult]) -> dict[str, Any]:
    healthy = [r for r in results if r.healthy]
    alarms = [r for r in healthy if r.result.found]
    by_code: collections.Counter[str] = collections.Counter(c for r in alarms for c in r.result.found)
    by_family: collections.Counter[str] = collections.Counter(r.config.family for r in alarms)
    return {
        "runs": len(results),
        "healthy": len(healthy),
        "not_healthy": [r.config.name for r in results if not r.healthy],
        "false_alarms": len(alarms),
        "false_alarm_codes": dict(by_code.most_common()),
        "false_alarm_families": dict(by_family.most_common()),
        "blocked": [r.config.name for r in results if r.blocked],
        "crashes": [r.config.name for r in results if r.crashed],
        "seconds": round(sum(r.result.seconds for r in results), 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", type=int, nargs="+", default=None, metavar="INDEX")
    parser.add_argument("--families", nargs="+", default=None, choices=FAMILIES)
    parser.add_argument(
        "--bare", action="store_true", help="fit without the suite (do the configurations learn?)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: small models)"
    )
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--verbose", action="store_true", help="print every finding of every run")
    parser.add_argument(
        "--rescore", default=None, metavar="PATH", help="score the runs of a --json file again"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: list[GenResult] = []
    if args.rescore:
        with open(args.rescore, encoding="utf-8") as handle:
            saved = json.load(handle)
        for run in saved["runs"]:
            r = GenResult(
                Config(**run["config"]),
                Result(**run["result"]),
                run["initial_loss"],
                run["final_loss"],
                run["val_losses"],
            )
            results.append(r)
            print(_line(r))
        wall = float(saved.get("wall_seconds", 0.0))
    else:
        configs = generate(args.count, args.seed)
        if args.only is not None:
            configs = [c for c in configs if c.index in set(args.only)]
        if args.families:
            configs = [c for c in configs if c.family in args.families]
        for cfg in configs:
            r = run_config(cfg, bare=args.bare)
            results.append(r)
            print(_line(r), flush=True)
            if args.verbose:
                for line in r.result.details:
                    print(f"      {line[:300]}")
        wall = time.perf_counter() - start
    s = summary(results)
    print()
    print(
        f"{s['runs']} runs (seed {args.seed}{', bare' if args.bare else ''}): {s['healthy']} healthy, "
        f"{len(s['not_healthy'])} not healthy (not scored), false alarms {s['false_alarms']}/{s['healthy']}, "
        f"blocked {len(s['blocked'])}, crashes {len(s['crashes'])}, {wall:.0f} s wall ({s['seconds']:.0f} s in runs)"
    )
    if s["false_alarm_codes"]:
        print("false alarms by code:   " + ", ".join(f"{c} {n}" for c, n in s["false_alarm_codes"].items()))
        print(
            "false alarms by family: " + ", ".join(f"{c} {n}" for c, n in s["false_alarm_families"].items())
        )
    for key in ("not_healthy", "blocked", "crashes"):
        if s[key]:
            print(f"{key}: {' '.join(s[key])}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "seed": args.seed,
                    "bare": args.bare,
                    "wall_seconds": round(wall, 1),
                    "summary": s,
                    "runs": [
                        {
                            "config": dataclasses.asdict(r.config),
                            "name": r.config.name,
                            "learned": r.learned,
                            "overfit": r.overfit,
                            "initial_loss": r.initial_loss,
                            "final_loss": r.final_loss,
                            "val_losses": r.val_losses,
                            "result": dataclasses.asdict(r.result),
                        }
                        for r in results
                    ],
                },
                handle,
                indent=2,
            )
    return 0 if not (s["false_alarms"] or s["blocked"] or s["crashes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
