"""GradNormMonitor on real Trainers: logged norms equal torch's, under every precision, accumulation, AMP."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_diag import GradClip, GradNormMonitor, NaNGuard, collect_findings
from tests.callbacks.grad_helpers import PRECISIONS, Enter, Exit, GradRecorder, SyncCounter, precision_kwargs
from tests.helpers import Regression, find, loader, trainer
from tests.readers import csv_scalars, tb_tags


def logged(t: Any) -> dict[str, list[tuple[int, float]]]:
    return csv_scalars(os.path.join(t.logger.log_dir, "metrics.csv"))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("accumulate", [1, 3])
def test_logged_total_norm_equals_get_total_norm(tmp_path, precision: str, accumulate: int) -> None:
    rec = GradRecorder()
    t = trainer(
        max_epochs=2,
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=1,
        accumulate_grad_batches=accumulate,
        callbacks=[GradNormMonitor(depth=2), rec],
        **precision_kwargs(precision),
    )
    t.fit(Regression(), loader(n=48))
    series = logged(t)
    assert sorted(s for s, _ in series["diag/grad_norm/total"]) == sorted(rec.norms)
    for step, value in series["diag/grad_norm/total"]:
        assert value == pytest.approx(rec.norms[step], rel=1e-5), step
    for step, value in series["diag/grad_norm/net.0"]:
        ref = torch.nn.utils.get_total_norm([rec.grads[step]["net.0.weight"], rec.grads[step]["net.0.bias"]])
        assert value == pytest.approx(float(ref), rel=1e-5)
    assert "diag/param_norm/total" in series and "diag/update_ratio/net.2" in series
    if precision == "16-mixed-scaler":
        assert series["diag/amp/scale"][0][1] == 256.0 and "diag/amp/skipped_steps" in series


def test_fused_optimizer_under_a_grad_scaler_is_unscaled(tmp_path) -> None:
    class Fused(Regression):
        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    rec = GradRecorder()
    t = trainer(
        max_epochs=1,
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=1,
        callbacks=[GradNormMonitor(), rec],
        **precision_kwargs("16-mixed-scaler"),
    )
    t.fit(Fused(), loader(n=32))
    for step, value in logged(t)["diag/grad_norm/total"]:
        assert value == pytest.approx(rec.norms[step], rel=1e-4)


def test_update_ratio_is_the_relative_weight_change(tmp_path) -> None:
    before: dict[int, dict[str, torch.Tensor]] = {}

    class Weights(GradRecorder):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            before[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    model = Regression(lr=0.1)
    after: dict[int, dict[str, torch.Tensor]] = {}

    class After(GradRecorder):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            after[trainer.global_step - 1] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    t = trainer(
        max_epochs=1,
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=2,
        callbacks=[GradNormMonitor(depth=2), Weights(), After()],
    )
    t.fit(model, loader(n=64))
    rows = logged(t)["diag/update_ratio/net.0"]
    assert [s for s, _ in rows] == [1, 3, 5, 7]
    for step, value in rows:
        delta = torch.cat(
            [(after[step][k] - before[step][k]).flatten() for k in ("net.0.weight", "net.0.bias")]
        )
        weight = torch.cat([before[step][k].flatten() for k in ("net.0.weight", "net.0.bias")])
        assert value == pytest.approx(float(delta.norm() / weight.norm()), rel=1e-4)


class Spiky(Regression):
    """A finite gradient spike at one step (the loss scaled by 1e4)."""

    def __init__(self, spike_step: int) -> None:
        super().__init__(lr=1e-7)  # too small to move the weights: the spike stays a single event
        self.spike_step = spike_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 1e4 if self.global_step == self.spike_step else loss


def test_exploding_spike_is_found_with_the_worst_step() -> None:
    monitor = GradNormMonitor(spike_warmup_steps=10, log_param_norms=False, log_update_ratio=False)
    t = trainer(max_epochs=5, log_every_n_steps=8, callbacks=[monitor])
    t.fit(Spiky(spike_step=25), loader(n=64))
    finding = find(collect_findings(t), "exploding_gradients")
    assert finding is not None and finding.evidence["worst_step"] == 25
    assert finding.evidence["ratio_to_mean"] > 1000 and finding.count == 1
    assert "net." in finding.evidence["largest_tensors"] and finding.advice


def test_with_nan_guard_one_spike_is_one_finding_from_its_one_owner() -> None:
    monitor = GradNormMonitor(spike_warmup_steps=10, log_param_norms=False, log_update_ratio=False)
    guard = NaNGuard(action="warn", spike_warmup_steps=10)
    t = trainer(max_epochs=5, log_every_n_steps=8, callbacks=[monitor, guard])
    t.fit(Spiky(spike_step=25), loader(n=64))  # a spike is a symptom: no live warning, the report judges it
    exploding = [f for f in collect_findings(t) if f.code == "exploding_gradients"]
    assert [(f.source, f.step) for f in exploding] == [("NaNGuard", 25)]  # NaNGuard can act on it: it owns it
    assert monitor.norm_history  # the monitor still logs the norms
    # the loss recovered at once (lr=1e-7 cannot move the weights): no consequence, so the spike is info
    assert exploding[0].severity == "info" and exploding[0].evidence["harm"].startswith("none measured")


def test_absolute_threshold_and_no_false_positive_on_a_healthy_run() -> None:
    healthy = trainer(max_epochs=4, log_every_n_steps=4, callbacks=[GradNormMonitor()])
    healthy.fit(Regression(), loader(n=64))
    assert collect_findings(healthy) == []
    flagged = trainer(
        max_epochs=1, log_every_n_steps=4, callbacks=[GradNormMonitor(exploding_threshold=1e-3)]
    )
    flagged.fit(Regression(), loader(n=64))
    finding = find(collect_findings(flagged), "exploding_gradients")
    assert finding is not None and "exploding_threshold" in finding.message and finding.count == 2


class DeadBranch(Regression):
    """`dead` is in the graph but multiplied by zero: its gradients are exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        self.dead = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.0 * self.dead(x)


def test_vanishing_needs_a_window_and_names_the_layer() -> None:
    short = trainer(max_epochs=1, log_every_n_steps=4, callbacks=[GradNormMonitor(patience=3)])
    short.fit(DeadBranch(), loader(n=64))  # 2 logging checks < window
    assert find(collect_findings(short), "vanishing_gradients") is None
    long = trainer(max_epochs=2, log_every_n_steps=4, callbacks=[GradNormMonitor(patience=3)])
    long.fit(DeadBranch(), loader(n=64))
    finding = find(collect_findings(long), "vanishing_gradients")
    assert finding is not None and finding.evidence["layers"] == "dead" and finding.step == 11


class Overflow(Regression):
    """Gradients beyond fp16's range at every step: the GradScaler skips them all and halves its scale."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * 1e30


def test_amp_accounting_counts_skips_and_reports_a_collapse(tmp_path) -> None:
    monitor = GradNormMonitor(amp_max_consecutive_skips=5)
    t = trainer(
        max_epochs=2,
        logger=CSVLogger(str(tmp_path)),
        log_every_n_steps=4,
        callbacks=[monitor],
        **precision_kwargs("16-mixed-scaler"),
    )
    t.fit(Overflow(), loader(n=64))
    series = logged(t)
    assert series["diag/amp/skipped_steps"][-1] == (15, 16.0)
    assert series["diag/amp/scale"][-1][1] < 1.0  # 256 halved 16 times
    finding = find(collect_findings(t), "amp_overflow")
    assert finding is not None and finding.severity == "warning"
    assert (
        int(monitor.state_dict()["spikes"]["count"]) == 0
    )  # skipped steps never entered the running statistics
    assert find(collect_findings(t), "non_finite_gradients") is None  # AMP overflow is not a failure


def test_non_finite_gradients_without_a_scaler_are_an_error() -> None:
    class NanAt(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * torch.tensor(float("nan")) if self.global_step == 2 else loss

    t = trainer(max_epochs=1, log_every_n_steps=4, callbacks=[GradNormMonitor()])
    t.fit(NanAt(), loader(n=64))
    finding = find(collect_findings(t), "non_finite_gradients")
    assert finding is not None and finding.severity == "error"


def test_histogram_goes_to_tensorboard(tmp_path) -> None:
    logger = TensorBoardLogger(str(tmp_path))
    trainer(
        max_epochs=1,
        logger=logger,
        log_every_n_steps=2,
        callbacks=[GradNormMonitor(log_histogram=True, group_by="parameter")],
    ).fit(Regression(), loader(n=32))
    tags = tb_tags(logger.log_dir)
    assert "diag/grad_norm/hist" in tags["histograms"]
    assert "diag/grad_norm/net.0.weight" in tags["scalars"]


def test_no_host_sync_on_a_step_that_does_not_log() -> None:
    mode = SyncCounter()
    per_step: dict[int, int] = {}
    callbacks = [
        Enter(mode),
        GradClip(max_norm=0.5),
        GradClip(algorithm="zscore", zscore_warmup_steps=2),
        GradNormMonitor(),
        Exit(mode, per_step),
    ]
    trainer(max_epochs=1, log_every_n_steps=5, callbacks=callbacks).fit(Regression(), loader(n=80))
    quiet = [s for s in per_step if (s + 1) % 5 != 0]
    assert len(quiet) == 8 and all(per_step[s] == 0 for s in quiet), per_step

    # positive control: the counter does see a sync made inside the same window
    class Syncs(Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            float(next(pl_module.parameters()).grad.norm())

    control: dict[int, int] = {}
    mode = SyncCounter()
    trainer(max_epochs=1, callbacks=[Enter(mode), Syncs(), Exit(mode, control)]).fit(
        Regression(), loader(n=32)
    )
    assert control and all(count >= 1 for count in control.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_by": "layer"}, r"`group_by` must be one of 'total', 'module', 'parameter', got 'layer'"),
        ({"depth": -1}, r"`depth` must be >= 1, got -1"),
        ({"exploding_threshold": 0.0}, r"`exploding_threshold` must be > 0, got 0\.0"),
        ({"spike_ratio": 1.0}, r"`spike_ratio` must be > 1, got 1\.0"),
        ({"spike_window": 0}, r"`spike_window` must be >= 1, got 0"),
        ({"patience": 0}, r"`patience` must be >= 1, got 0"),
        ({"norm_type": -2.0}, r"`norm_type` must be >= 1, got -2\.0"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradNormMonitor(**kwargs)


class DeepSigmoid(Regression):
    """A 14-layer sigmoid nn.Sequential: the early layers' gradients are ~1e-10 of the head's."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(13):
            layers += [nn.Linear(8, 8), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(8, 1))


def test_vanishing_is_judged_per_layer_and_at_fit_end_whatever_the_grouping() -> None:
    # depth=1 puts the whole stack in one group `net`, and 40 steps never reach the logging interval of 50
    t = trainer(max_steps=40, callbacks=[GradNormMonitor()])
    t.fit(DeepSigmoid(), loader(n=320))
    finding = find(collect_findings(t), "vanishing_gradients")
    assert finding is not None and finding.evidence["layers"].startswith("net.0")
    assert finding.evidence["smallest_norm"] < 1e-4 * finding.evidence["late_max_norm"]
    healthy = trainer(max_steps=40, callbacks=[GradNormMonitor()])
    healthy.fit(Regression(), loader(n=320))
    assert find(collect_findings(healthy), "vanishing_gradients") is None


def test_the_weights_norm_ratio_counts_from_before_the_first_step() -> None:
    # A weight decay that holds the weights near 0 (Adam's coupled L2 at 1.0) shrinks them long before the first
    # logging step: measured from there, the collapse was invisible and the vanishing-gradient advice did not name
    # the decay. The reference is the norm before the first update (kept on the device, read with that step's data).
    model = Regression(lr=0.05)
    initial = torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in model.parameters()])).item()

    class Decayed(Regression):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05, weight_decay=5.0)

    decayed = Decayed()
    decayed.load_state_dict(model.state_dict())
    monitor = GradNormMonitor()
    trainer(callbacks=[monitor], max_epochs=3, log_every_n_steps=10).fit(decayed, loader(n=80))
    assert monitor._first_param_norm == pytest.approx(initial, rel=1e-5)
    assert monitor._param_ratio is not None and monitor._param_ratio < 0.25  # the weights collapsed (<25%)
