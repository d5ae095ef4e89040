"""Activation health: dead ReLU layers, saturated tanh units, initialisations that shrink or grow the signal with
depth, and the healthy networks that look like them (ActivationMonitor, SanityCheck's activation_scale)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from benchmarks.diagnosis import kit
from benchmarks.diagnosis.scenario import Run, Scenario


def _run(model, train, val, batch_size=32, seed=0, epochs=4, **trainer):
    train_dl, val_dl = kit.loaders(train, val, batch_size=batch_size, seed=seed)
    return Run(model, train_dl, val_dl, {"max_epochs": epochs, **trainer}, monitor="val_loss")


def _scaled(ds: TensorDataset, factor: float) -> TensorDataset:
    return TensorDataset(ds.tensors[0] * factor, ds.tensors[1])


# -- failures (and one look-alike) -----------------------------------------------------------------------------------------------------
def relu_dead_bias(seed):
    train, val = kit.digits(seed)
    net = kit.mlp([64, 64, 32, 10])
    with torch.no_grad():
        net[2].bias.fill_(-10.0)  # a bias loaded or initialised far below 0: the layer never fires
    return _run(kit.Task(net, lr=1e-3), train, val, seed=seed, epochs=5)


def relu_killed_by_lr(seed):
    train, val = kit.digits(seed)
    net = kit.mlp([64, 128, 128, 10])
    return _run(kit.Task(net, optimizer="sgd", lr=1.0, momentum=0.9), train, val, seed=seed, epochs=5)


def tanh_inputs_x50(seed):
    train, val = kit.digits(seed)
    net = kit.mlp([64, 64, 64, 10], act=nn.Tanh)
    return _run(kit.Task(net, lr=1e-3), _scaled(train, 50.0), _scaled(val, 50.0), seed=seed, epochs=4)


def deep_tanh_std(std, epochs=1, optimizer="sgd", lr=0.01, **trainer):
    def build(seed):
        train, val = kit.digits(seed)
        net = kit.mlp([64] + [64] * 20 + [10], act=nn.Tanh, init_std=std)
        return _run(
            kit.Task(net, optimizer=optimizer, lr=lr), train, val, seed=seed, epochs=epochs, **trainer
        )

    return build


# -- healthy look-alikes ------------------------------------------------------------------------------------------
def kaiming_relu_mlp(seed):
    train, val = kit.digits(seed)
    net = kit.mlp([64, 128, 128, 128, 10])
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return _run(kit.Task(net, lr=1e-3), train, val, seed=seed, epochs=4)


def sparse_inputs_relu(seed):
    train, val = kit.digits(seed, normalise=False)  # pixel intensities 0-16: about half are exactly 0
    train, val = _scaled(train, 1 / 16), _scaled(val, 1 / 16)
    return _run(kit.Task(kit.mlp([64, 128, 64, 10]), lr=2e-3), train, val, seed=seed, epochs=4)


def relu_few_dead_units(seed):
    train, val = kit.digits(seed)
    net = kit.mlp([64, 64, 10])
    with torch.no_grad():
        net[0].bias[:6] = -20.0  # 6 of 64 units never fire; the rest learn
    return _run(kit.Task(net, lr=2e-3), train, val, seed=seed, epochs=4)


class GELUTransformer(kit.TinyTransformer):
    """The corpus transformer with an ``nn.GELU`` module in its feed-forward blocks (hooked, dormant scores)."""

    def __init__(self, vocab: int) -> None:
        super().__init__(vocab, norm_first=True)
        layer = nn.TransformerEncoderLayer(
            64,
            nhead=4,
            dim_feedforward=128,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
            activation=nn.GELU(),
        )
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def gelu_transformer(seed):
    train, val, vocab = kit.text_tokens(seed)
    task = kit.Task(
        GELUTransformer(vocab), loss="lm", optimizer="adamw", lr=1e-3, scheduler="warmup", warmup_steps=20
    )
    return _run(task, train, val, seed=seed, epochs=4)


class ProbabilityTask(kit.Task):
    """A binary classifier whose net ends in ``nn.Sigmoid`` and whose loss takes probabilities (``BCELoss``)."""

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy(out.squeeze(-1), y.float())


def sigmoid_head(seed):
    train, val = kit.moons(seed)
    net = nn.Sequential(kit.mlp([2, 32, 32, 1]), nn.Sigmoid())
    return _run(ProbabilityTask(net, lr=5e-3), train, val, seed=seed, epochs=5)


F, H = "failure", "healthy"
SCENARIOS: list[Scenario] = [
    Scenario(
        "relu_dead_bias",
        F,
        ("dead_units",),
        "a ReLU layer whose bias is -10 (a bad init or checkpoint): it never fires, the loss stays at ln(10)",
        relu_dead_bias,
    ),
    Scenario(
        "relu_killed_by_lr",
        F,
        ("dead_units", "exploding_gradients", "loss_spike", "divergence"),
        "SGD at lr=1 kills a hidden ReLU layer in the first steps (the 'dying ReLU' of CS231n); the loss stalls",
        relu_killed_by_lr,
    ),
    Scenario(
        "deep_tanh_init_0.01",
        F,
        ("activation_scale", "vanishing_gradients"),
        "a 20-layer tanh MLP initialised with std 0.01: the signal shrinks ~12x per layer (Glorot & Bengio 2010)",
        deep_tanh_std(0.01),
    ),
    Scenario(
        "deep_tanh_init_1.5",
        F,
        ("activation_scale", "loss_at_init", "saturated_activations", "vanishing_gradients"),
        "a 20-layer tanh MLP initialised with std 1.5: every layer multiplies by ~12x and saturates; the early "
        "layers get exactly 0 gradient",
        deep_tanh_std(1.5, epochs=2, log_every_n_steps=20),
    ),
    Scenario(
        "deep_tanh_default_init",
        F,
        ("vanishing_gradients", "loss_plateau"),
        "the same 20-layer tanh MLP with PyTorch's default init: the activation scale settles (no activation_scale), "
        "but the first layers' gradients vanish and SGD at 0.01 leaves the loss at ln(10) for 4 epochs (it was a "
        "healthy look-alike over 1 epoch, where the loss did not move either)",
        deep_tanh_std(None, epochs=4),
    ),
    Scenario(
        "tanh_inputs_x50",
        H,
        (),
        "inputs x50 into a tanh MLP: 85% of the first layer's pre-activations are saturated, yet the loss falls "
        "(1.55 -> 0.37): saturated_activations and input_scale stay info",
        tanh_inputs_x50,
    ),
    Scenario("kaiming_relu_mlp", H, (), "a 4-layer ReLU MLP with Kaiming init", kaiming_relu_mlp),
    Scenario(
        "sparse_inputs_relu",
        H,
        (),
        "unstandardised pixel intensities scaled to [0, 1], half of them exactly 0: sparse ReLU inputs",
        sparse_inputs_relu,
    ),
    Scenario(
        "relu_few_dead_units",
        H,
        (),
        "6 of 64 ReLU units never fire; the other 58 learn the task",
        relu_few_dead_units,
    ),
    Scenario(
        "gelu_transformer",
        H,
        (),
        "a pre-LN transformer with nn.GELU feed-forward blocks and warmup",
        gelu_transformer,
    ),
    Scenario(
        "sigmoid_head",
        H,
        (),
        "an nn.Sigmoid output head with BCELoss on probabilities: confident, not saturated",
        sigmoid_head,
    ),
]
