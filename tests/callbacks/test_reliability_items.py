"""Issue "never break a run", items 4, 6, 7 and 8, on real Trainers: bad metrics, AMP with every GradClip mode,
localisation that knows when it cannot know, and a summary that tells how the run ended."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_diag import EarlyStop, GradClip, NaNGuard, NonFiniteError, OverfitDetector
from tests.callbacks.nan_helpers import Faulty, faulty_loader
from tests.helpers import Regression, Scripted, find, loader, trainer


# -- 4. bad metrics ---------------------------------------------------------------------------------------------
def test_a_nan_validation_loss_is_a_finding_of_the_overfit_detector() -> None:
    detector = OverfitDetector()
    t = trainer(max_epochs=4, callbacks=[detector])
    t.fit(Scripted([1.0, float("nan")]), loader(n=32), loader(n=8))
    finding = find(detector.findings, "non_finite_metric")
    assert finding is not None and finding.severity == "warning"
    assert finding.evidence["metric"] == "val_loss" and finding.step > 0 and finding.count == 3
    assert "val_loss" in finding.message


def test_a_nan_monitored_metric_is_a_finding_of_early_stop() -> None:
    stop = EarlyStop("val_loss", patience=5)
    t = trainer(max_epochs=4, callbacks=[stop])
    t.fit(Scripted([1.0, float("inf")]), loader(n=32), loader(n=8))
    finding = find(stop.findings, "non_finite_metric")
    assert finding is not None and finding.severity == "warning" and finding.evidence["metric"] == "val_loss"


def test_a_monitored_key_never_logged_is_an_info_finding_at_fit_end() -> None:
    stop = EarlyStop("val_acc", strict=False)
    t = trainer(max_epochs=2, callbacks=[stop])
    t.fit(Regression(), loader(n=32), loader(n=8))
    finding = find(stop.findings, "missing_metric")
    assert finding is not None and finding.severity == "info" and finding.evidence["metric"] == "val_acc"
    assert "val_loss" in finding.message  # what was logged instead


def test_a_finite_run_has_no_metric_findings() -> None:
    detector, stop = OverfitDetector(), EarlyStop("val_loss")
    trainer(max_epochs=2, callbacks=[detector, stop]).fit(Regression(), loader(n=32), loader(n=8))
    assert not [
        f for f in detector.findings + stop.findings if f.code in ("non_finite_metric", "missing_metric")
    ]


# -- 6. AMP: non-finite steps are left to the GradScaler in every GradClip mode ------------------------------------
class FusedOrNot(Regression):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=self.fused)


class StepWatch(pl.Callback):
    """Whether the gradients of the first optimizer step held an Inf (first in the callbacks list: before any
    clipping) and whether that step changed the weights."""

    def __init__(self) -> None:
        self.inf_grads: bool | None = None
        self.first_changed: bool | None = None
        self.scales: list[float] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.initial = [p.detach().clone() for p in pl_module.parameters()]

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.inf_grads is None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.inf_grads = any(bool(torch.isinf(g).any()) for g in grads)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == 1 and self.first_changed is None:
            self.first_changed = any(
                not torch.equal(a, p) for a, p in zip(self.initial, pl_module.parameters(), strict=True)
            )
            self.scales.append(trainer.precision_plugin.scaler.get_scale())


MODES: dict[str, dict[str, Any]] = {
    "norm": {"max_norm": 1.0},
    "value": {"clip_value": 0.5},
    "agc": {},
    "autoclip": {},
    "zscore": {"zscore_warmup_steps": 0},
}


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("mode", list(MODES))
def test_overflowing_steps_are_left_to_the_grad_scaler(mode: str, fused: bool, accumulate: int) -> None:
    torch.manual_seed(0)
    # A scale of 2**16 makes the first step's float16 backward overflow to Inf (no NaN): the scaler must skip it.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, backoff_factor=2.0**-20, growth_interval=1000)
    watch = StepWatch()
    t = trainer(
        max_steps=2,
        accumulate_grad_batches=accumulate,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        callbacks=[watch, GradClip(algorithm=mode, **MODES[mode])],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        t.fit(FusedOrNot(fused), loader(n=64))
    assert watch.inf_grads, "the test needs an overflowing first step"
    assert watch.first_changed is False, "the overflowed step was applied"
    assert watch.scales[0] < 2.0**16, "the loss scale did not drop"


# -- 7. localisation that knows when it cannot know ---------------------------------------------------------------
class InfOnce(nn.Module):
    """Returns Inf in its first call of each step listed in ``at`` only: a replay of that step is finite."""

    def __init__(self) -> None:
        super().__init__()
        self.at: set[int] = set()
        self.step = -1
        self.fired: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step in self.at and self.step not in self.fired:
            self.fired.add(self.step)
            return x * float("inf")
        return x


class Flaky(Regression):
    def __init__(self, at: tuple[int, ...]) -> None:
        super().__init__(optimizer="adamw")
        self.flaky = InfOnce()
        self.flaky.at = set(at)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.flaky(self.net[1](self.net[0](x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.flaky.step = self.global_step
        return super().training_step(batch, batch_idx)


def test_a_fault_the_replay_does_not_reproduce_names_no_module() -> None:
    guard = NaNGuard(action="skip")
    t = trainer(max_steps=5, callbacks=[guard])
    t.fit(Flaky(at=(2,)), loader())
    (finding,) = [f for f in guard.findings if f.code.startswith("non_finite")]
    assert finding.evidence["reproduced"] == 0
    assert not finding.evidence.get("module"), finding.evidence
    assert "did not reproduce" in finding.message
    assert any("nondeterministic" in a or "stateful" in a for a in finding.advice)


class ManualFaulty(Faulty):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y)
        if self.global_step in self.at:
            loss = loss * torch.tensor(float("nan"))  # NaN in the loss, and so in every gradient
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss.detach()


def test_under_manual_optimization_a_nan_loss_is_attributed_to_the_loss() -> None:
    guard = NaNGuard(action="skip")
    trainer(max_steps=5, callbacks=[guard]).fit(ManualFaulty(inject="loss", at=(2,)), faulty_loader())
    finding = find(guard.findings, "non_finite_loss")
    assert finding is not None, [f.code for f in guard.findings]
    assert finding.evidence["phase"] == "loss" and not finding.evidence.get("module")


# -- 8. the summary tells how the run ended -----------------------------------------------------------------------
def test_a_non_finite_error_stop_counts_as_an_error(tmp_path, capsys) -> None:
    t = trainer(max_steps=6, callbacks=[NaNGuard(action="raise")], default_root_dir=str(tmp_path))
    with pytest.raises(NonFiniteError):
        t.fit(Faulty(inject="loss", at=(2,)), faulty_loader())
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    assert report["summary"]["status"] == "failed" and report["summary"]["counts"]["error"] >= 1
    out = capsys.readouterr().out
    assert "stopped by: NonFiniteError" in out and "nothing looked wrong" not in out


def test_an_exception_stop_without_findings_is_not_reported_healthy(tmp_path, capsys) -> None:
    class Broken(Regression):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == 2:
                raise RuntimeError("user bug")
            return super().training_step(batch, batch_idx)

    t = trainer(max_steps=6, callbacks=[NaNGuard()], default_root_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="user bug"):
        t.fit(Broken(), loader())
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    assert report["summary"]["counts"]["error"] == 1 and report["summary"]["healthy"] is False
    out = capsys.readouterr().out
    assert "stopped by: RuntimeError: user bug" in out and "nothing looked wrong" not in out


def test_the_printed_action_is_the_action_taken(tmp_path, capsys) -> None:
    guard = NaNGuard(action="skip", max_consecutive_skips=1, escalate_to="rollback", snapshot_every_n_steps=1)
    t = trainer(max_steps=8, callbacks=[guard], default_root_dir=str(tmp_path))
    t.fit(Faulty(inject="loss", at=(3, 4)), faulty_loader())
    assert guard.skipped_steps == 2 and guard.rollbacks == 1
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    actions = sorted(f["evidence"]["action"] for f in report["findings"] if f["code"] == "non_finite_loss")
    assert actions == ["rollback", "skip"]
    out = capsys.readouterr().out
    assert "step skipped" in out and "rolled back to the snapshot of step" in out


# -- 1. patterns the matrix does not reach --------------------------------------------------------------------------
class TwoOptimizers(Regression):
    """A GAN-shaped manual loop: two heads, each with its optimizer, both stepped every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.other = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        first, second = self.optimizers()
        for opt, out in ((first, self(x)), (second, self.other(x))):
            loss = nn.functional.mse_loss(out, y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss.detach()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(self.net.parameters(), lr=0.1),
            torch.optim.SGD(self.other.parameters(), lr=0.1),
        ]


def test_warmup_cosine_declines_a_manual_run_bounded_by_max_steps() -> None:
    from lightning_diag import LightningDiagWarning, WarmupCosine

    schedule = WarmupCosine(warmup_steps=2)
    with pytest.warns(LightningDiagWarning, match="max_steps=8"):
        trainer(max_steps=8, callbacks=[schedule]).fit(TwoOptimizers(), loader())
    (finding,) = schedule.findings
    assert finding.code == "declined" and finding.evidence["reason"] == "manual_max_steps"


def test_warmup_cosine_follows_the_batches_with_two_manual_optimizers() -> None:
    from lightning_diag import WarmupCosine

    schedule = WarmupCosine(warmup_steps=2)
    model = TwoOptimizers()
    trainer(max_epochs=2, callbacks=[schedule]).fit(model, loader(n=32))
    assert schedule.batches_done == 8 and schedule.resolved_total_steps == 8
    last = schedule.lr_at(7, 0.1)
    assert [opt.param_groups[0]["lr"] for opt in model.optimizers(use_pl_optimizer=False)] == [last, last]
