"""ActivationMonitor (and SanityCheck's activation_scale) on real Trainers: the failures it names, the healthy
look-alikes it leaves alone, what it logs, accumulation and torch.compile."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import (
    ActivationMonitor,
    DiagCallback,
    GradNormMonitor,
    LightningDiagWarning,
    NaNGuard,
    SanityCheck,
    collect_findings,
)
from lightning_diag.core.verdict import Verdict
from lightning_diag.findings import build_report
from tests.helpers import trainer
from tests.readers import csv_scalars


def blobs(
    n: int = 512, features: int = 16, classes: int = 4, scale: float = 1.0, seed: int = 0
) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, features, generator=g)
    return TensorDataset((x - x.mean(0)) / x.std(0) * scale, y)


def data(scale: float = 1.0, sparse: bool = False) -> DataLoader:
    ds = blobs(scale=scale)
    if sparse:  # 90% exact zeros, as bag-of-words or one-hot features
        x = ds.tensors[0] * (
            torch.rand(ds.tensors[0].shape, generator=torch.Generator().manual_seed(1)) < 0.1
        )
        ds = TensorDataset(x * 3, ds.tensors[1])
    return DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))


class Task(pl.LightningModule):
    """A classifier around ``net``; ``loss="bce"`` trains ``net``'s first output against ``y % 2`` with BCELoss
    on probabilities (a sigmoid head)."""

    def __init__(self, net: nn.Module, lr: float = 1e-2, optimizer: str = "adam", loss: str = "ce") -> None:
        super().__init__()
        self.net, self.lr, self.opt, self.loss_kind = net, lr, optimizer, loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.loss_kind == "bce":
            return nn.functional.binary_cross_entropy(out[:, 0], (y % 2).float())
        return nn.functional.cross_entropy(out, y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self) -> Any:
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def mlp(*sizes: int, act: Callable[[], nn.Module] = nn.ReLU, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def fit(
    task: pl.LightningModule,
    loader: DataLoader,
    *callbacks: Any,
    epochs: int = 4,
    val: Any = None,
    **kwargs: Any,
) -> pl.Trainer:
    t = trainer(max_epochs=epochs, callbacks=list(callbacks), **kwargs)
    t.fit(task, loader, val)
    return t


def ours(t: pl.Trainer, code: str) -> list[Any]:
    return [f for f in collect_findings(t) if f.code == code]


# -- failures -----------------------------------------------------------------------------------------------------
def test_a_layer_killed_by_a_negative_bias_is_named_and_logged(tmp_path) -> None:
    net = mlp(16, 32, 32, 4)
    with torch.no_grad():
        net[2].bias.fill_(-10.0)
    # checks at the logging interval; NaNGuard reads the losses the end-of-fit gate measures
    monitor = ActivationMonitor()
    logger = CSVLogger(str(tmp_path))
    t = fit(Task(net), data(), monitor, NaNGuard(), logger=logger, log_every_n_steps=8, epochs=2)
    (found,) = ours(t, "dead_units")
    assert found.severity == "warning" and found.evidence["layer"] == "net.2"
    assert found.evidence["dead_units"] == 32 and found.evidence["activation"] == "net.3"
    assert "bias averages -10" in found.advice[0] and "barely moved" in found.evidence["harm"]
    assert found.step == 7  # the first of the 3 checks
    series = csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))
    assert [s for s, _ in series["diag/activations/net.2/dead_frac"]] == [7, 15, 23, 31]
    assert {v for _, v in series["diag/activations/net.2/dead_frac"]} == {1.0}
    assert {v for _, v in series["diag/activations/net.0/dead_frac"]} == {0.0}  # starved, but it fires
    assert all(v == pytest.approx(10.0, rel=0.05) for _, v in series["diag/activations/net.2/rms"])


def test_relus_killed_by_a_too_high_learning_rate() -> None:
    task = Task(mlp(16, 64, 64, 4), lr=5.0, optimizer="sgd")
    t = fit(task, data(), ActivationMonitor(), GradNormMonitor(), epochs=5, log_every_n_steps=8)
    (found,) = ours(t, "dead_units")
    assert found.evidence["layer"] == "net.2" and found.evidence["dead_frac"] == 1
    # killed within the first interval: dead at the check that ends it (step 7), not only from the next one
    assert found.evidence["source"] == "gradients" and found.step == 7
    # a symptom made a warning by the end-of-fit gate: the layers below it get exactly 0 gradient
    assert found.severity == "warning" and found.evidence["harm"].startswith("led to vanishing_gradients")
    report = build_report(collect_findings(t), status="finished", global_step=t.global_step, epoch=0)
    entry = next(f for f in report["findings"] if f["code"] == "dead_units")
    assert entry["caused_by"].startswith("exploding_gradients@")  # the blow-up that killed them came first


def test_gradient_accumulation_judges_the_accumulated_step() -> None:
    net = mlp(16, 32, 32, 4)
    with torch.no_grad():
        net[2].bias.fill_(-10.0)
    monitor = ActivationMonitor(check_every_n_steps=4)
    t = fit(Task(net), data(), monitor, NaNGuard(), accumulate_grad_batches=2, epochs=2)
    (found,) = ours(t, "dead_units")
    assert found.evidence["layer"] == "net.2" and found.severity == "warning"


class Plateau(DiagCallback):
    """Another callback of the run that reports a plateau (what OverfitDetector would)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record(trainer, Verdict("loss_plateau", "warning", "flat", {}, []))


@pytest.mark.parametrize("symptom", [False, True], ids=["loss_falls_info", "plateau_warning"])
def test_tanh_inputs_times_50_saturate_the_first_layer(symptom: bool) -> None:
    extra = [Plateau()] if symptom else []
    t = fit(
        Task(mlp(16, 32, 32, 4, act=nn.Tanh), lr=1e-3),
        data(scale=50.0),
        ActivationMonitor(8),
        *extra,
        epochs=2,
    )
    (found,) = ours(t, "saturated_activations")
    assert found.evidence["layer"] == "net.0" and found.evidence["saturated_frac"] > 0.5
    assert found.severity == ("warning" if symptom else "info")  # the gate: a consequence, or none
    assert "standardise the inputs" in found.advice[0]
    assert found.evidence["harm"].startswith("led to loss_plateau" if symptom else "none measured")
    assert not ours(t, "dead_units")


# -- healthy look-alikes ------------------------------------------------------------------------------------------
class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.view(-1, 1, 4, 4)).flatten(1))


class GELUBlock(nn.Module):
    """A pre-norm transformer block with an nn.GELU MLP, over 4 tokens of 4 features."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 4, 4))
        n = self.norm1(h)
        h = h + self.attn(n, n, n, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


def kaiming(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def few_dead() -> nn.Module:
    net = mlp(16, 32, 4)
    with torch.no_grad():
        net[0].bias[:3] = -20.0  # 3 of 32 units never fire; the other 29 learn
    return net


def gelu_block() -> nn.Module:
    torch.manual_seed(0)
    return GELUBlock()


LOOK_ALIKES: dict[str, Callable[[], tuple[Task, DataLoader]]] = {
    "kaiming_relu_mlp": lambda: (Task(kaiming(mlp(16, 64, 64, 64, 4)), lr=1e-3), data()),
    "batchnorm_relu_cnn": lambda: (Task(CNN(), lr=1e-3), data()),
    "dropout_mlp": lambda: (Task(mlp(16, 128, 128, 4, dropout=0.5), lr=1e-3), data()),
    "sparse_inputs": lambda: (Task(mlp(16, 64, 64, 4), lr=1e-3), data(sparse=True)),
    "gelu_transformer": lambda: (Task(gelu_block(), lr=1e-3), data()),
    "sigmoid_head": lambda: (Task(nn.Sequential(mlp(16, 32, 1), nn.Sigmoid()), lr=1e-2, loss="bce"), data()),
    "relu_with_a_few_dead_units": lambda: (Task(few_dead(), lr=1e-2), data()),
}


@pytest.mark.parametrize("name", list(LOOK_ALIKES))
def test_healthy_look_alikes_stay_quiet(name: str, tmp_path) -> None:
    task, loader = LOOK_ALIKES[name]()
    monitor = ActivationMonitor(check_every_n_steps=5)
    t = fit(
        task, loader, monitor, SanityCheck(), logger=CSVLogger(str(tmp_path)), log_every_n_steps=5, epochs=2
    )
    assert monitor.findings == []  # not even info
    assert [f.code for f in collect_findings(t) if f.severity != "info"] == []
    series = csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))
    assert any(k.endswith("/dead_frac") for k in series) and any(k.endswith("/rms") for k in series)
    if name == "relu_with_a_few_dead_units":
        assert series["diag/activations/net.0/dead_frac"][-1][1] == pytest.approx(3 / 32)
    if name == "sigmoid_head":
        assert "diag/activations/net.0.2/saturated_frac" in series  # the head is watched, and not saturated
    if name == "gelu_transformer":
        assert "diag/activations/net.mlp.0/dead_frac" in series  # the dormant score of the GELU units


# -- cost and compile ---------------------------------------------------------------------------------------------
def test_hooks_are_attached_for_the_check_batch_only() -> None:
    class Count(pl.Callback):
        def __init__(self) -> None:
            self.hooked: list[int] = []

        def on_before_backward(self, trainer: pl.Trainer, pl_module: Any, loss: Any) -> None:
            if any(m._forward_hooks or m._forward_pre_hooks for m in pl_module.modules()):
                self.hooked.append(trainer.global_step)

    count = Count()
    t = fit(Task(mlp(16, 32, 4)), data(), ActivationMonitor(check_every_n_steps=10), count, epochs=2)
    assert count.hooked == [9, 19, 29] and t.global_step == 32
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in t.lightning_module.modules())


def test_torch_compile_declines_the_hooks_and_keeps_the_gradient_rows() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    net = mlp(16, 32, 32, 4)
    with torch.no_grad():
        net[2].bias.fill_(-10.0)
    counter = CompileCounter()
    frames: list[int] = []

    class Frames(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            frames.append(counter.frame_count)

    monitor = ActivationMonitor(check_every_n_steps=5)
    with pytest.warns(LightningDiagWarning, match="torch.compile"):
        t = fit(torch.compile(Task(net), backend=counter), data(), monitor, Frames(), epochs=3)
    assert [f.evidence["reason"] for f in ours(t, "declined")] == ["torch_compile"]
    assert frames[2] > 0 and frames[-1] == frames[2]  # no recompile after the first steps
    (found,) = ours(t, "dead_units")
    assert found.evidence["layer"] == "net.2" and found.evidence["source"] == "gradients"


# -- SanityCheck: activation_scale --------------------------------------------------------------------------------
def deep_tanh(std: float | None) -> nn.Module:
    net = mlp(16, *([64] * 20), 4, act=nn.Tanh)
    if std is not None:
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
    return net


@pytest.mark.parametrize(
    ("std", "direction", "enabled"),
    [(0.01, "shrink", True), (1.5, "grow", True), (None, None, True), (0.01, None, False)],
    ids=["std_0.01", "std_1.5", "default_init", "check_off"],
)
def test_sanity_check_activation_scale(std: float | None, direction: str | None, enabled: bool) -> None:
    check = SanityCheck(fail_on="warning", check_activation_scale=enabled)  # a symptom never stops the run
    t = fit(Task(deep_tanh(std)), data(), check, max_steps=1)
    found = ours(t, "activation_scale")
    if direction is None:
        assert found == []
        return
    (finding,) = found
    assert (
        finding.evidence["direction"] == direction and finding.evidence["layers"] == 20 and finding.step == 0
    )
    assert finding.severity == "info" and finding.evidence["harm"].startswith("none measured")  # one step


def test_activation_scale_is_a_warning_when_the_run_learns_nothing() -> None:
    t = fit(Task(deep_tanh(0.01), lr=1e-3), data(), SanityCheck(), NaNGuard(), epochs=2)
    (finding,) = ours(t, "activation_scale")
    assert finding.severity == "warning" and "barely moved" in finding.evidence["harm"]
