"""_logging against real loggers, read back from disk: same keys, same steps, for every backend."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_diag import _logging
from lightning_diag.callbacks import DiagCallback
from lightning_diag.core.verdict import Verdict
from tests.helpers import Regression, loader, trainer
from tests.readers import csv_scalars, mlflow_metrics, tb_scalars, tb_tags, wandb_history

STEPS_PER_EPOCH, EPOCHS = 4, 2


class Probe(DiagCallback):
    """Logs through every _logging route and records one finding."""

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        _logging.log_step(pl_module, {"diag/test/step": torch.tensor(float(trainer.global_step))})

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        _logging.log_epoch(pl_module, {"diag/test/epoch": float(trainer.current_epoch + 10)})

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        _logging.log_direct(trainer, {"diag/test/direct": torch.tensor(7.0)}, step=trainer.global_step)
        _logging.log_histogram(trainer, "diag/test/hist", torch.arange(101.0), step=trainer.global_step)
        self.record(trainer, Verdict("loss_plateau", "warning", "probe finding", evidence={"x": 1.0}))


EXPECTED = {
    "diag/test/step": [(s, float(s)) for s in range(STEPS_PER_EPOCH * EPOCHS)],
    "diag/test/epoch": [(STEPS_PER_EPOCH - 1, 10.0), (2 * STEPS_PER_EPOCH - 1, 11.0)],
    "diag/test/direct": [(STEPS_PER_EPOCH * EPOCHS, 7.0)],
}


def fit_with(logger: Any) -> Any:
    t = trainer(max_epochs=EPOCHS, logger=logger, log_every_n_steps=1, callbacks=[Probe()])
    t.fit(Regression(), loader(n=32), loader(n=16))
    return t


def assert_expected(series: dict[str, list[tuple[int, float]]]) -> None:
    for key, expected in EXPECTED.items():
        assert sorted(series.get(key, [])) == expected, key


def assert_report(directory: str) -> None:
    report = json.loads(Path(os.path.join(directory, "diagnosis.json")).read_text())
    assert [f["code"] for f in report["findings"]] == ["loss_plateau"]
    assert report["summary"]["status"] == "finished"


def test_tensorboard(tmp_path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    fit_with(logger)
    assert_expected(tb_scalars(logger.log_dir))
    tags = tb_tags(logger.log_dir)
    assert "diag/test/hist" in tags["histograms"]
    assert any(t.startswith("diag/diagnosis") for t in tags["tensors"])  # the summary as text
    assert_report(logger.log_dir)


def test_csv(tmp_path) -> None:
    logger = CSVLogger(str(tmp_path), name="csv")
    fit_with(logger)
    series = csv_scalars(os.path.join(logger.log_dir, "metrics.csv"))
    assert_expected(series)
    # no histogram support: quantile scalars instead
    assert sorted(series["diag/test/hist/q50"]) == [(STEPS_PER_EPOCH * EPOCHS, 50.0)]
    assert series["diag/test/hist/q100"] == [(STEPS_PER_EPOCH * EPOCHS, 100.0)]
    assert_report(logger.log_dir)


def test_wandb_offline(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lightning_diag_test")
    try:
        fit_with(logger)
    finally:
        import wandb

        wandb.finish()
    assert_expected(wandb_history(str(tmp_path)))
    assert_report(str(tmp_path))


def test_mlflow_local_store(tmp_path) -> None:
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a local store (MLflow 3 retired the plain-file store)
    logger = MLFlowLogger(experiment_name="lightning_diag", tracking_uri=uri)
    fit_with(logger)
    series = mlflow_metrics(uri, logger.run_id)
    assert_expected(series)
    assert series["diag/test/hist/q0"] == [(STEPS_PER_EPOCH * EPOCHS, 0.0)]


def test_no_logger_still_records_and_reports(tmp_path, capsys) -> None:
    t = trainer(max_epochs=1, default_root_dir=str(tmp_path), callbacks=[Probe()])
    t.fit(Regression(), loader(n=16))
    assert [f.code for f in t.callbacks[0].findings] == ["loss_plateau"]
    assert "diag/test/step" in t.callback_metrics  # monitorable even without a logger
    assert_report(str(tmp_path))
    assert "lightning_diag: run finished" in capsys.readouterr().out


def test_should_log_step_follows_log_every_n_steps() -> None:
    seen: list[int] = []

    class Spy(DiagCallback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if _logging.should_log_step(trainer):
                seen.append(trainer.global_step)

    logger = CSVLogger(".", name="spy")
    trainer(max_epochs=1, logger=logger, log_every_n_steps=3, callbacks=[Spy()]).fit(
        Regression(), loader(n=80)
    )
    assert seen == [2, 5, 8]  # (step + 1) % 3 == 0, as Lightning flushes
