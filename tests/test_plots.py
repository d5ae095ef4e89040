"""End-of-run plots: written next to diagnosis.json, logged as figures, annotated; text-only without matplotlib."""

from __future__ import annotations

import json

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag import GradNormMonitor, OverfitDetector, WarmupCosine
from lightning_diag.report import plots
from tests.callbacks.curve_helpers import SCENARIOS, Net, loaders
from tests.helpers import trainer
from tests.readers import tb_tags


def fit_overfitting(tmp_path):
    kwargs, _, _, epochs, _ = SCENARIOS["overfitting"]
    t = trainer(
        max_epochs=epochs,
        num_sanity_val_steps=0,
        log_every_n_steps=2,
        logger=TensorBoardLogger(tmp_path, name="run"),
        callbacks=[WarmupCosine(warmup_ratio=0.05), GradNormMonitor(depth=2), OverfitDetector(action="stop")],
    )
    t.fit(Net(**kwargs), *loaders("overfitting"))
    return t


def test_plots_are_saved_and_logged(tmp_path, capsys) -> None:
    t = fit_overfitting(tmp_path)
    run_dir = tmp_path / "run" / "version_0"
    report = json.loads((run_dir / "diagnosis.json").read_text())
    assert report["plots"] == ["learning_curves.png", "lr_schedule.png", "grad_norms.png"]
    for name in report["plots"]:
        assert (run_dir / name).stat().st_size > 5_000
    images = tb_tags(str(run_dir))["images"]
    assert {"diag/learning_curves", "diag/lr_schedule", "diag/grad_norms"} <= set(images)
    assert "Plots: learning_curves.png, lr_schedule.png, grad_norms.png" in capsys.readouterr().out
    assert t.state.finished


def test_learning_curve_annotations() -> None:
    series = {"curve": [(1, 1.0, 1.1), (2, 0.5, 0.7), (3, 0.3, 0.75), (4, 0.2, 0.8)], "stopped_at": 4}
    findings = [{"code": "overfitting", "severity": "warning", "evidence": {"onset_x": 3}}]
    figure = plots.build_figures(series, findings)["learning_curves"]
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    # x counts epochs done (2 = the end of epoch 1): labels and positions use the progress bar's epoch index
    assert labels == [
        "train loss",
        "validation loss",
        "best val 0.7 (epoch 1)",
        "overfitting onset (epoch 2)",
        "stopped (epoch 3)",
    ]
    assert list(figure.axes[0].lines[0].get_xdata()) == [0, 1, 2, 3]


def test_best_is_the_restored_value_not_the_curve_minimum() -> None:
    series = {
        "curve": [(1, 1.0, 1.1), (2, 0.5, 0.7), (3, 0.3, 0.75)],
        "val_key": "val_loss",
        "early_stop": {
            "best_x": 3,
            "best_value": 0.75,
            "monitor": "val_loss",
            "mode": "min",
            "restored": True,
        },
    }
    figure = plots.build_figures(series)["learning_curves"]
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert "best val 0.75 (epoch 2, restored)" in labels


def test_grad_norm_heatmap_has_one_row_per_layer() -> None:
    norms = {"net.0": [(1, 1.0), (2, 0.5)], "net.2": [(1, 1e-6), (2, 1e-7)]}
    figure = plots.build_figures({"grad_norms": norms})["grad_norms"]
    image = figure.axes[0].images[0].get_array()
    assert image.shape == (2, 2) and image[1, 1] == pytest.approx(-7)


def test_text_only_without_matplotlib(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(plots, "available", lambda: False)
    fit_overfitting(tmp_path)
    run_dir = tmp_path / "run" / "version_0"
    report = json.loads((run_dir / "diagnosis.json").read_text())
    assert report["plots"] == [] and not list(run_dir.glob("*.png"))
    assert "Plots:" not in capsys.readouterr().out


def test_evaluations_inside_an_epoch_are_labelled_with_their_step() -> None:
    # val_check_interval=0.5 on one long epoch (charlm): every point is in epoch 0, the step tells them apart
    series = {"curve": [(0.5, 2.0, 2.1), (1.0, 1.5, 1.4717), (1.5, 1.2, 1.6)], "curve_steps": [60, 120, 180]}
    figure = plots.build_figures(series)["learning_curves"]
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert "best val 1.4717 (epoch 0)" in labels  # x=1.0 is the end of epoch 0
    series["curve"][1] = (0.75, 1.5, 1.4717)
    figure = plots.build_figures(series)["learning_curves"]
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert "best val 1.4717 (epoch 0, step 120)" in labels
