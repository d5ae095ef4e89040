"""Both namespaces: the callbacks work, and the report lands in the logger's version directory, under
``lightning.pytorch.Trainer`` and under the standalone ``pytorch_lightning.Trainer`` that many libraries still use.
A run whose callbacks were deep-copied (as some libraries do) still yields its findings through ``load_report``.
"""

from __future__ import annotations

import copy
import importlib
import os
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_diag as ld

NAMESPACES = ["lightning.pytorch", "pytorch_lightning"]


def _namespace(name: str) -> Any:
    if name == "pytorch_lightning":
        return pytest.importorskip("pytorch_lightning")  # installed with the `integration` extra
    return importlib.import_module(name)


def _model(pl: Any) -> Any:
    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return Regression()


def _loader(nan_at: int | None = None, n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    if nan_at is not None:
        x[nan_at * 8, 1] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _suite() -> list[Any]:
    return [
        ld.SanityCheck(),
        ld.GradNormMonitor(),
        ld.NaNGuard(),
        ld.SpeedMonitor(),
        ld.SilentBugDetector(),
        ld.ActivationMonitor(),
        ld.OverfitDetector(),
        ld.EarlyStop(monitor="val_loss"),
    ]


def _fit(namespace: str, tmp_path: Any, callbacks: list[Any], logger: str = "TensorBoardLogger", **data: Any):
    pl = _namespace(namespace)
    loggers = importlib.import_module(f"{namespace}.loggers")
    run_logger = getattr(loggers, logger)(str(tmp_path / "logs"), name="run")
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=run_logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=4,
        default_root_dir=str(tmp_path / "root"),
    )
    trainer.fit(_model(pl), _loader(**data), _loader(n=16))
    return trainer, run_logger


@pytest.mark.parametrize("logger", ["TensorBoardLogger", "CSVLogger"])
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_a_healthy_run_is_quiet_and_reports_into_the_loggers_version_directory(
    namespace: str, logger: str, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    trainer, run_logger = _fit(namespace, tmp_path, _suite(), logger)
    assert trainer.state.finished
    assert os.path.isfile(os.path.join(run_logger.log_dir, "diagnosis.json"))
    assert os.path.isfile(os.path.join(run_logger.log_dir, "diagnosis.html"))
    assert not os.path.exists(tmp_path / "diagnosis.json")  # never the working directory
    assert [f for f in ld.collect_findings(trainer) if f.severity != "info"] == []


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_a_fault_is_found_and_handled_in_either_namespace(namespace: str, tmp_path) -> None:
    guard = ld.NaNGuard()
    trainer, run_logger = _fit(namespace, tmp_path, [guard], nan_at=3)
    assert trainer.state.finished and guard.skipped_steps >= 1
    finding = next(f for f in guard.findings if f.code == "non_finite_input")
    assert finding.evidence["phase"] == "input"
    report = ld.load_report(run_logger.log_dir)
    assert report.primary is not None and report.primary.code == "non_finite_input"


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_findings_of_deep_copied_callbacks_come_back_through_load_report(namespace: str, tmp_path) -> None:
    mine = [ld.NaNGuard()]
    trainer, run_logger = _fit(namespace, tmp_path, copy.deepcopy(mine), nan_at=2)  # what some libraries do
    assert mine[0].findings == []  # the objects the user holds never ran
    last, by_path = ld.load_report(), ld.load_report(run_logger.log_dir)
    assert last.path == by_path.path == os.path.abspath(os.path.join(run_logger.log_dir, "diagnosis.json"))
    assert [f.code for f in last.findings] == [f.code for f in ld.collect_findings(trainer)]
    assert last.primary is not None and last.primary.code == "non_finite_input" and not last.healthy
