"""Building blocks of the corpus scenarios: small data sets, small models and one configurable LightningModule.

Everything here is local and fast: sklearn's bundled data (``load_digits``, ``make_moons``), synthetic tensors and
token ids from stdlib text. A scenario composes a :class:`Task` with a data set and a few knobs that model its bug.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "SlowDataset",
    "Task",
    "blobs",
    "digits",
    "digits_images",
    "fresh_heap",
    "loaders",
    "mlp",
    "moons",
    "regression",
    "text_tokens",
]


def fresh_heap() -> None:
    """Give the memory freed so far back to the OS, as a new process would start: a process RSS does not grow into
    memory the C allocator kept from an earlier run (so a leak right after a large run would show late), which the
    corpus runner, the memory scenarios and MemoryMonitor's tests all need before they measure.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- data ---------------------------------------------------------------------------------------------------------
def _split(
    x: torch.Tensor, y: torch.Tensor, seed: int, val_share: float = 0.25
) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    cut = int(len(x) * (1 - val_share))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def _digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        data = load_digits()
        _DIGITS = (torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target, dtype=torch.long))
    return _DIGITS


def digits(
    seed: int, normalise: bool = True, label_noise: float = 0.0, n: int | None = None
) -> tuple[Dataset, Dataset]:
    """sklearn's 8x8 digits as 64 features (1797 samples, 10 classes), standardised unless ``normalise=False``."""
    x, y = _digits_raw()
    x = (x - x.mean(0)) / (x.std(0) + 1.0) if normalise else x.clone()
    y = y.clone()
    if label_noise:
        g = torch.Generator().manual_seed(1000 + seed)
        flip = torch.rand(len(y), generator=g) < label_noise
        y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    if n is not None:
        x, y = x[:n], y[:n]
    return _split(x, y, seed)


def digits_images(seed: int) -> tuple[Dataset, Dataset]:
    """The digits as 1x8x8 images (for small CNNs)."""
    train, val = digits(seed)
    to_img = lambda ds: TensorDataset(ds.tensors[0].view(-1, 1, 8, 8), ds.tensors[1])  # noqa: E731
    return to_img(train), to_img(val)


def moons(seed: int, n: int = 600, noise: float = 0.15) -> tuple[Dataset, Dataset]:
    """sklearn's two moons (2 features, 2 classes); a large ``noise`` gives a high Bayes error."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    return _split(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long), seed)


def blobs(
    seed: int, n: int = 800, features: int = 16, classes: int = 4, spread: float = 1.0
) -> tuple[Dataset, Dataset]:
    """Gaussian class clusters; ``spread`` > 1 overlaps them (a Bayes error the model cannot beat)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g) * 2.0
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + spread * torch.randn(n, features, generator=g)
    return _split((x - x.mean(0)) / x.std(0), y, seed)  # standardised, as a user would


def regression(
    seed: int, n: int = 512, features: int = 8, noise: float = 0.1, scale: float = 1.0
) -> tuple[Dataset, Dataset]:
    """A noisy linear-plus-tanh regression target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, 1, generator=g)
    y = (
        torch.tanh(x @ w / math.sqrt(features)) * 2
        + 0.3 * (x[:, :1] ** 2)
        + noise * torch.randn(n, 1, generator=g)
    )
    return _split(x * scale, y, seed)


_TEXT = None


def _corpus_text() -> str:
    global _TEXT
    if _TEXT is None:
        import codecs
        import contextlib
        import inspect
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
            import this  # stdlib text, rot13-encoded in the module

        zen = codecs.decode(this.s, "rot13")  # type: ignore[attr-defined]
        _TEXT = zen + "\n" + (inspect.getdoc(inspect) or "") + "\n" + (inspect.getdoc(codecs) or "")
    return _TEXT


def text_tokens(seed: int, seq_len: int = 24, n: int = 600) -> tuple[Dataset, Dataset, int]:
    """Character-level next-token windows over stdlib text: (inputs, targets) of token ids, and the vocab size."""
    text = _corpus_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len - 1, (n,), generator=g)
    x = torch.stack([ids[s : s + seq_len] for s in starts])
    y = torch.stack([ids[s + 1 : s + seq_len + 1] for s in starts])
    train, val = _split(x, y, seed)
    return train, val, len(vocab)


class SlowDataset(Dataset):
    """A map-style data set whose every sample costs ``delay`` seconds (per-sample decoding / disk reads)."""

    def __init__(self, base: Dataset, delay: float) -> None:
        self.base = base
        self.delay = delay

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        time.sleep(self.delay)
        return self.base[i]


def loaders(
    train: Dataset, val: Dataset | None, batch_size: int = 32, seed: int = 0, shuffle: bool = True
) -> tuple[DataLoader, DataLoader | None]:
    g = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(train, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)
    val_dl = DataLoader(val, batch_size=256) if val is not None else None
    return train_dl, val_dl


# -- models -------------------------------------------------------------------------------------------------------
def mlp(
    sizes: Sequence[int],
    act: Callable[[], nn.Module] = nn.ReLU,
    dropout: float = 0.0,
    batchnorm: bool = False,
    init_std: float | None = None,
) -> nn.Sequential:
    """A plain ``nn.Sequential`` MLP; ``init_std`` replaces the default init of every weight (bias zero)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    net = nn.Sequential(*layers)
    if init_std is not None:
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)
                nn.init.zeros_(m.bias)
    return net


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32) if batchnorm else nn.Identity()
        self.head = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.head(x.flatten(1))


class RNNLM(nn.Module):
    """Embedding -> LSTM/GRU -> linear head over token ids."""

    def __init__(self, vocab: int, cell: str = "lstm", hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(32, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


class TinyTransformer(nn.Module):
    """A 2-layer causal transformer language model over token ids."""

    def __init__(
        self, vocab: int, d_model: int = 64, layers: int = 2, seq_len: int = 24, norm_first: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(1, seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        h = self.blocks(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(h)


# -- the LightningModule ------------------------------------------------------------------------------------------
class Task(pl.LightningModule):
    """One configurable supervised task (classification, regression or language modelling).

    Args:
        net: the model.
        loss: ``"ce"`` (class ids), ``"bce"`` (binary with logits, labels 0/1), ``"mse"`` or ``"lm"`` (token CE).
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` (with ``momentum``) or a callable ``params -> optimizer``.
        lr, weight_decay, momentum: optimizer settings.
        scheduler: ``None``, ``"onecycle"``, ``"cosine"``, ``"warmup"`` (linear warmup over ``warmup_steps`` then
            constant), ``"exp_up"`` (rate multiplied by ``gamma`` each step) or a callable ``optimizer -> scheduler``.
        output_bug: ``"softmax"`` (softmax before cross-entropy), ``"sigmoid"`` (sigmoid before BCEWithLogits).
        loss_bug: ``"log"`` (hand-written BCE: log of a sigmoid that saturates), ``"sqrt"`` (sqrt at 0),
            ``"div"`` (division by a batch statistic that can be 0).
        manual_no_zero_grad: manual optimisation that never zeroes the gradients.
        bad_batch_at: from this step on, one batch in ``bad_batch_every`` has its targets scaled by 1e3.
        total_steps: steps for the schedulers.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: str = "ce",
        optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | Callable[..., Any] | None = None,
        total_steps: int = 200,
        warmup_steps: int = 20,
        gamma: float = 1.05,
        output_bug: str | None = None,
        loss_bug: str | None = None,
        manual_no_zero_grad: bool = False,
        bad_batch_at: int | None = None,
        bad_batch_every: int = 10**9,
        forward_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_kind = loss
        self.opt_kind = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.sched_kind = scheduler
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.gamma = gamma
        self.output_bug = output_bug
        self.loss_bug = loss_bug
        self.manual_no_zero_grad = manual_no_zero_grad
        self.bad_batch_at = bad_batch_at
        self.bad_batch_every = bad_batch_every
        self.forward_hook = forward_hook
        if manual_no_zero_grad:
            self.automatic_optimization = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return self.forward_hook(out) if self.forward_hook is not None else out

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = nn.functional
        if self.loss_kind == "lm":
            return f.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        if self.loss_kind == "mse":
            if self.loss_bug == "sqrt":
                # a distance term sqrt(sum(d^2)) whose argument is exactly 0: d/dx sqrt(0) = inf, inf * 0 = NaN
                distance = torch.sqrt(((out - out.detach()) ** 2).sum(-1)).mean()
                return f.mse_loss(out, y) + 0.1 * distance
            if self.loss_bug == "div":
                return (((out - y) ** 2).mean(0) / (y - y.round()).abs().mean(0)).mean()
            return f.mse_loss(out, y)
        if self.loss_kind == "bce":
            logits = out.squeeze(-1)
            if self.output_bug == "sigmoid":
                logits = torch.sigmoid(logits)
            if self.loss_bug == "log":
                # BCE written by hand: sigmoid saturates to exactly 1.0 in float32, log(1 - p) = -inf, 0 * -inf = NaN
                p, t = torch.sigmoid(logits), y.float()
                return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
            return f.binary_cross_entropy_with_logits(logits, y.float())
        if self.output_bug == "softmax":
            out = torch.softmax(out, dim=-1)
        return f.cross_entropy(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if (
            self.bad_batch_at is not None
            and self.global_step >= self.bad_batch_at
            and (self.global_step - self.bad_batch_at) % self.bad_batch_every == 0
        ):
            y = y * 1000.0 if y.is_floating_point() else y
            x = x * 30.0
        loss = self._loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=False)
        if self.manual_no_zero_grad:
            opt = self.optimizers()
            self.manual_backward(loss)
            opt.step()  # type: ignore[union-attr]  (and never opt.zero_grad(): the bug)
        return loss
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self._loss(self(x), y), prog_bar=False)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if callable(self.opt_kind):
            opt = self.opt_kind(params)
        elif self.opt_kind == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        elif self.opt_kind == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.sched_kind is None:
            return opt
        if callable(self.sched_kind):
            sched = self.sched_kind(opt)
        elif self.sched_kind == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.total_steps + 5)
        elif self.sched_kind == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps)
        elif self.sched_kind == "warmup":
            w = self.warmup_steps
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / w))
        elif self.sched_kind == "exp_up":
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.gamma)
        else:
            raise ValueError(self.sched_kind)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
