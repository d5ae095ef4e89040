"""GradClip on real Trainers: what the optimizer steps with, under every precision and with accumulation."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_diag import GradClip, GradNormMonitor
from lightning_diag.core.clipping import unitwise_norm
from tests.callbacks.grad_helpers import PRECISIONS, GradRecorder, precision_kwargs
from tests.helpers import Regression, loader, trainer
from tests.readers import csv_scalars


def fit(*callbacks: Any, model: Any = None, epochs: int = 2, **kwargs: Any) -> Any:
    t = trainer(max_epochs=epochs, log_every_n_steps=1, callbacks=list(callbacks), **kwargs)
    t.fit(model or Regression(lr=0.05), loader(n=48))
    return t


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_norm_mode_steps_with_clipped_gradients(tmp_path, precision: str, accumulate: int) -> None:
    before, after = GradRecorder(), GradRecorder()
    t = fit(
        before,
        GradClip(max_norm=0.3),
        after,
        logger=CSVLogger(str(tmp_path)),
        accumulate_grad_batches=accumulate,
        **precision_kwargs(precision),
    )
    assert before.norms and all(n > 0.3 for n in before.norms.values())  # the threshold really bites
    assert all(n <= 0.3 * (1 + 1e-5) for n in after.norms.values())
    series = csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))
    for step, value in series["diag/clip/pre_norm"]:
        assert value == pytest.approx(before.norms[step], rel=1e-5)
    for step, value in series["diag/clip/post_norm"]:
        assert value == pytest.approx(after.norms[step], rel=1e-4)
    assert all(v == 1.0 for _, v in series["diag/clip/rate"])
    assert all(v == pytest.approx(0.3) for _, v in series["diag/clip/threshold"])


def test_clip_runs_before_the_monitor_in_any_order(tmp_path) -> None:
    """The monitor reports the pre-clip norm even when it comes after the clipper in the callbacks list."""
    before = GradRecorder()
    t = fit(before, GradClip(max_norm=0.1), GradNormMonitor(), logger=CSVLogger(str(tmp_path)))
    series = csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))
    for step, value in series["diag/grad_norm/total"]:
        assert value == pytest.approx(before.norms[step], rel=1e-5)


def test_fused_optimizer_under_a_grad_scaler_is_clipped_correctly() -> None:
    class Fused(Regression):
        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    after = GradRecorder()  # unscales by the scaler's scale for fused optimizers
    fit(GradClip(max_norm=0.2), after, model=Fused(), **precision_kwargs("16-mixed-scaler"))
    assert after.norms and all(n <= 0.2 * (1 + 1e-3) for n in after.norms.values())


def test_value_mode() -> None:
    before, after = GradRecorder(), GradRecorder()
    fit(before, GradClip(algorithm="value", clip_value=0.05), after)
    assert max(before.max_abs.values()) > 0.05
    assert all(v <= 0.05 * (1 + 1e-6) for v in after.max_abs.values())  # float32(0.05) > 0.05


def test_agc_keeps_unit_ratios_and_spares_the_head() -> None:
    before, after = GradRecorder(), GradRecorder()
    model = Regression(lr=0.05)
    weights: dict[int, dict[str, torch.Tensor]] = {}

    class Weights(GradRecorder):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            weights[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    fit(before, Weights(), GradClip(algorithm="agc", agc_factor=0.01), after, model=model)
    for step in after.grads:
        for name in ("net.0.weight", "net.0.bias"):
            limit = 0.01 * unitwise_norm(weights[step][name]).clamp(min=1e-3)
            assert (unitwise_norm(after.grads[step][name]) <= limit * (1 + 1e-4)).all()
        for name in ("net.2.weight", "net.2.bias"):  # the last layer (the "head") is excluded by default
            assert torch.equal(after.grads[step][name], before.grads[step][name])


@pytest.mark.parametrize("algorithm", ["autoclip", "zscore"])
def test_adaptive_algorithms_log_their_threshold_and_respect_the_cap(tmp_path, algorithm: str) -> None:
    after = GradRecorder()
    tuning = {"percentile": 50} if algorithm == "autoclip" else {"zscore_warmup_steps": 3}
    t = fit(
        GradClip(algorithm=algorithm, max_norm=0.5, **tuning),
        after,
        epochs=3,
        logger=CSVLogger(str(tmp_path)),
    )
    series = csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))
    assert all(v <= 0.5 for _, v in series["diag/clip/threshold"])
    assert all(n <= 0.5 * (1 + 1e-5) for n in after.norms.values())
    assert any(v < 1.0 for _, v in series["diag/clip/coef"])


def test_refuses_double_clipping() -> None:
    with pytest.raises(ValueError, match=r"GradClip and `Trainer\(gradient_clip_val=1.0\)` would both clip"):
        fit(GradClip(max_norm=1.0), gradient_clip_val=1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"algorithm": "huber"},
            r"`algorithm` must be one of 'norm', 'value', 'agc', 'autoclip', 'zscore', got 'huber'",
        ),
        ({}, r"`max_norm` must be set for algorithm='norm'"),
        ({"max_norm": 0.0}, r"`max_norm` must be > 0, got 0\.0"),
        ({"max_norm": -1.0}, r"`max_norm` must be > 0, got -1\.0"),
        ({"algorithm": "autoclip", "percentile": 0}, r"`percentile` must be in \(0, 100\], got 0"),
        ({"algorithm": "autoclip", "percentile": 101}, r"`percentile` must be in \(0, 100\], got 101"),
        ({"algorithm": "value", "clip_value": 0.0}, r"`clip_value` must be > 0, got 0\.0"),
        ({"algorithm": "agc", "agc_factor": -0.1}, r"`agc_factor` must be > 0, got -0\.1"),
        ({"algorithm": "zscore", "zscore_threshold": 0.0}, r"`zscore_threshold` must be > 0, got 0\.0"),
        ({"algorithm": "zscore", "zscore_warmup_steps": -1}, r"`zscore_warmup_steps` must be >= 0, got -1"),
        ({"algorithm": "autoclip", "history_size": 0}, r"`history_size` must be >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradClip(**kwargs)
