"""Held-out categories (issue 23): the failures the suite missed on runs nobody here wrote, and the healthy runs it
warned on. Same format as ``failures.py``; each run takes a few seconds on a CPU.

Failures (expected codes name the cause; where two codes both describe what is true, both are accepted):

- ``attention_pool_over_batch``: attention pooling over token embeddings whose softmax runs over the batch
  dimension (``dim=0``) instead of the positions: each sample's output depends on the other samples (measured, seed
  0, bare: training loss 0.002 with batches of 32, validation 0.38 with batches of 256). ``batch_dependence``.
- ``big_model_tiny_subset``: a 1.3M-parameter MLP on 90 training digits. Measured (seed 0, bare, 40 epochs):
  training loss 1.9 -> 0.000, validation best 0.406 at epoch 5, then rising at every epoch to 0.459. EarlyStop of
  the suite ends the run a few epochs after the best, while the rise is still only 1-2%. ``overfitting``.
- ``adam_l2_extreme``: Adam with coupled L2 ``weight_decay=1.0`` on a CNN (a value meant for a decoupled AdamW-style
  factor of 1e-2..1e-1, or a copy/paste of a dropout probability): the decay term dominates the adaptive step and
  the weights are held near 0; the loss stalls at ``ln(10)`` with validation following it (measured, seed 0, bare:
  2.290, 2.302, then 2.303 for 4 epochs, validation 2.303). ``underfitting``
  (the truthful description: a model that cannot fit the training data, train and validation close) or
  ``loss_plateau``.
- ``frozen_random_backbone``: a convolutional backbone meant to be pretrained, never loaded, frozen
  (``requires_grad=False``) at its random initialisation, ending in an 8-unit tanh bottleneck; only the linear
  head trains. Nothing in the gradients or values is wrong (the frozen parameters are out of the optimizer), the
  only evidence is the curve: it stalls high, train and validation together. ``underfitting`` or ``loss_plateau``
  (``cannot_overfit_batch`` where the overfit check runs).
- ``manual_no_zero_grad_small_lr``: manual optimization that never calls ``optimizer.zero_grad()``, plain SGD at a
  small rate on a regression: the gradient sum grows linearly, so the effective step does too. Measured (seed 0,
  bare): over 6 epochs the loss still falls (1.76 -> 0.26, validation 0.22): a truly silent bug, only
  ``stale_gradients`` can name it.
- ``transformer_no_warmup_adamw``: a 3-layer post-LN transformer LM, AdamW at 3e-2 from step 0 (Xiong et al.
  2020). Measured (seed 0, bare): the loss drops to the unigram entropy within ~10 steps and stays there (train
  3.17, validation 3.21 after 6 epochs), while the same model at 1e-2 reaches 1.28/1.42 and, with a 40-step warmup
  at 3e-2, 2.36 before the rate proves too high anyway. The cause is a rate too high at the start (``loss_spike``,
  ``exploding_gradients``, ``divergence``: the first-steps evidence); what the curve shows is a plateau at a high
  loss with validation following training (``loss_plateau``, ``underfitting``). All five are accepted, as for the
  corpus' ``transformer_no_warmup``.

Healthy look-alikes (no warning/error finding allowed):

- ``lstm_long_sequences`` / ``gru_sgd_clipfree``: LSTM/GRU language models whose gradient norm surges when they
  start to use longer contexts, then settles, while the loss falls steadily.
- ``onecycle_sgd_cnn``: SGD + momentum with OneCycle to max_lr 0.4 on a small CNN: the gradient norm rises with
  the rate in the first third and settles as it anneals.
- ``label_noise_floor``: well-separated clusters with 40% of the labels random, trained to convergence: the loss
  floor is the label noise (train and validation flat and close at ~1.2 nats), not underfitting.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

from benchmarks.diagnosis import kit
from benchmarks.diagnosis.scenario import Run, Scenario

__all__ = ["SCENARIOS"]


def _run(model, train, val, batch_size=32, seed=0, epochs=4, shuffle=True, monitor="val_loss", **trainer):
    train_dl, val_dl = kit.loaders(train, val, batch_size=batch_size, seed=seed, shuffle=shuffle)
    trainer = {"max_epochs": epochs, **trainer}
    return Run(model, train_dl, val_dl if monitor else None, trainer, monitor=monitor)


# -- batch dependence: attention pooling normalised over the batch --------------------------------------------------
def _token_classes(seed: int, n: int = 1200, vocab: int = 120, length: int = 20, classes: int = 4):
    """Token sequences whose class is set by a few marker words placed anywhere (attention finds them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(classes, vocab, (n, length), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    positions = torch.randint(0, length, (n, 2), generator=g)
    rows = torch.arange(n)
    x[rows, positions[:, 0]] = y
    x[rows, positions[:, 1]] = y
    cut = n * 3 // 4
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


class AttentionPool(nn.Module):
    """Embeddings -> attention pooling -> head. ``dim=0`` normalises the scores over the batch (the bug)."""

    def __init__(self, vocab: int = 120, classes: int = 4, width: int = 64, dim: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.score = nn.Linear(width, 1)
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # [B, T, W]
        weights = torch.softmax(self.score(h).squeeze(-1), dim=self.dim)  # [B, T]
        return self.head((weights.unsqueeze(-1) * h).sum(1))


def attention_pool_over_batch(seed):
    train, val = _token_classes(seed)
    return _run(kit.Task(AttentionPool(dim=0), lr=3e-3), train, val, seed=seed, epochs=4)


# -- overfitting hidden by early stopping ---------------------------------------------------------------------------
def big_model_tiny_subset(seed):
    train, val = kit.digits(seed)
    x, y = train.tensors
    train = TensorDataset(x[:90], y[:90])
    return _run(
        kit.Task(kit.mlp([64, 1024, 1024, 10]), lr=1e-3), train, val, batch_size=16, seed=seed, epochs=40
    )


# -- extreme weight decay ---------------------------------------------------------------------------------------------
def adam_l2_extreme(seed):
    train, val = kit.digits_images(seed)
    return _run(
        kit.Task(kit.SmallCNN(), optimizer="adam", lr=2e-3, weight_decay=1.0), train, val, seed=seed, epochs=6
    )


# -- a frozen randomly initialised backbone ---------------------------------------------------------------------------
class RandomBackbone(nn.Module):
    """A conv backbone whose pretrained weights were never loaded, frozen at its random init, and a trained head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 8),
            nn.Tanh(),
        )
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def frozen_random_backbone(seed):
    train, val = kit.digits_images(seed)
    return _run(kit.Task(RandomBackbone(), lr=3e-3), train, val, seed=seed, epochs=8)


# -- manual optimization without zero_grad ----------------------------------------------------------------------------
def manual_no_zero_grad_small_lr(seed):
    train, val = kit.regression(seed, n=768)
    task = kit.Task(
        kit.mlp([8, 64, 64, 1]), loss="mse", optimizer="sgd", lr=2e-3, momentum=0.0, manual_no_zero_grad=True
    )
    return _run(task, train, val, seed=seed, epochs=6)


# -- transformer without warmup ---------------------------------------------------------------------------------------
def transformer_no_warmup_adamw(seed):
    train, val, vocab = kit.text_tokens(seed, n=800)
    net = kit.TinyTransformer(vocab, d_model=64, layers=3)
    return _run(kit.Task(net, loss="lm", optimizer="adamw", lr=3e-2), train, val, seed=seed, epochs=6)


# -- healthy look-alikes ----------------------------------------------------------------------------------------------
def lstm_long_sequences(seed):
    train, val, vocab = kit.text_tokens(seed, seq_len=64, n=600)
    return _run(
        kit.Task(kit.RNNLM(vocab, "lstm", hidden=128), loss="lm", lr=1e-2), train, val, seed=seed, epochs=5
    )


def gru_sgd_clipfree(seed):
    train, val, vocab = kit.text_tokens(seed, seq_len=48, n=600)
    return _run(
        kit.Task(kit.RNNLM(vocab, "gru", hidden=96), loss="lm", optimizer="sgd", lr=1.0, momentum=0.9),
        train,
        val,
        batch_size=16,
        seed=seed,
        epochs=4,
    )


def onecycle_sgd_cnn(seed):
    train, val = kit.digits_images(seed)
    epochs, steps = 5, 5 * math.ceil(len(train) / 32)
    task = kit.Task(
        kit.SmallCNN(batchnorm=True),
        optimizer="sgd",
        lr=0.4,
        momentum=0.9,
        scheduler="onecycle",
        total_steps=steps,
    )
    return _run(task, train, val, seed=seed, epochs=epochs)


def label_noise_floor(seed):
    train, val = kit.blobs(seed, n=1600, spread=0.5)
    g = torch.Generator().manual_seed(100 + seed)
    noisy = []
    for ds in (train, val):
        x, y = ds.tensors
        y = y.clone()
        flip = torch.rand(len(y), generator=g) < 0.4
        y[flip] = torch.randint(0, 4, (int(flip.sum()),), generator=g)
        noisy.append(TensorDataset(x, y))
    return _run(kit.Task(kit.mlp([16, 64, 4]), lr=3e-3), *noisy, seed=seed, epochs=12)


F, H = "failure", "healthy"
_TRANSFORMER_CODES = ("loss_spike", "exploding_gradients", "divergence", "loss_plateau", "underfitting")
SCENARIOS: list[Scenario] = [
    Scenario(
        "attention_pool_over_batch",
        F,
        ("batch_dependence",),
        "attention pooling over token embeddings with softmax(dim=0): the weights are normalised over the batch",
        attention_pool_over_batch,
    ),
    Scenario(
        "big_model_tiny_subset",
        F,
        ("overfitting",),
        "a 1.3M-parameter MLP on 90 training digits; EarlyStop ends it soon after the validation loss turns up",
        big_model_tiny_subset,
    ),
    Scenario(
        "adam_l2_extreme",
        F,
        ("underfitting", "loss_plateau"),
        "Adam with coupled L2 weight_decay=1.0 on a CNN: the weights are held near 0, the loss stalls near ln(10)",
        adam_l2_extreme,
    ),
    Scenario(
        "frozen_random_backbone",
        F,
        ("underfitting", "loss_plateau", "cannot_overfit_batch"),
        "a backbone whose pretrained weights were never loaded, frozen at random init (8-unit tanh output); only "
        "the head trains",
        frozen_random_backbone,
    ),
    Scenario(
        "manual_no_zero_grad_small_lr",
        F,
        ("stale_gradients",),
        "manual optimization without optimizer.zero_grad(), plain SGD at 2e-3 on a regression: gradients pile up",
        manual_no_zero_grad_small_lr,
    ),
    Scenario(
        "transformer_no_warmup_adamw",
        F,
        _TRANSFORMER_CODES,
        "a 3-layer post-LN transformer LM, AdamW at 3e-2 from step 0 (no warmup): stuck at the unigram entropy",
        transformer_no_warmup_adamw,
    ),
    Scenario(
        "lstm_long_sequences",
        H,
        (),
        "an LSTM LM on 64-character windows with Adam 1e-2: the norm surges as it learns longer contexts, then settles",
        lstm_long_sequences,
    ),
    Scenario(
        "gru_sgd_clipfree",
        H,
        (),
        "a GRU LM with SGD 1.0 + momentum, no clipping: norms surge and settle, the loss falls steadily",
        gru_sgd_clipfree,
    ),
    Scenario(
        "onecycle_sgd_cnn",
        H,
        (),
        "OneCycle SGD (max_lr 0.4, momentum 0.9) on a BatchNorm CNN: the norm rises with the rate, then settles",
        onecycle_sgd_cnn,
    ),
    Scenario(
        "label_noise_floor",
        H,
        (),
        "separable clusters with 40% random labels, trained to convergence: the loss floor is the label noise",
        label_noise_floor,
    ),
]
