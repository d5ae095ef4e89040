"""The example projects run from their README commands (fast settings) and produce what they claim."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readers import tb_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "example_projects", "digits")


def run(args: list[str], cwd: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def single(pattern_dir: str, name: str) -> str:
    found = [os.path.join(d, name) for d, _, files in os.walk(pattern_dir) if name in files]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_digits_cli_main_job(tmp_path) -> None:
    proc = run(
        [
            os.path.join(DIGITS, "main.py"),
            "fit",
            "--config",
            os.path.join(DIGITS, "config.yaml"),
            "--trainer.max_epochs=4",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=str(tmp_path),
    )
    report_path = single(str(tmp_path / "runs" / "digits"), "diagnosis.json")
    report = json.loads(Path(report_path).read_text())
    assert report["summary"]["status"] == "finished"
    assert (
        report["summary"]["counts"]["warning"] == report["summary"]["counts"]["error"] == 0
    )  # a healthy run
    lrs = tb_scalars(os.path.dirname(report_path))["diag/lr/group0"]
    steps = [s for s, _ in lrs]
    assert steps == sorted(steps) and steps[0] == 4 and steps[1] - steps[0] == 5  # every log_every_n_steps=5
    values = [v for _, v in lrs]
    assert values[0] == pytest.approx(3e-3, rel=1e-5)  # warmup (4 steps) done: the peak
    assert all(b < a for a, b in itertools.pairwise(values))  # then the cosine decay
    assert "lightning_diag: run finished" in proc.stdout


@pytest.mark.slow
def test_digits_python_form_learns(tmp_path) -> None:
    proc = run(
        [os.path.join(DIGITS, "train.py"), "--max-epochs", "6", "--root", str(tmp_path)], cwd=str(tmp_path)
    )
    acc = float(proc.stdout.strip().splitlines()[-1].split("val_acc = ")[1])
    assert acc > 0.85, proc.stdout[-2000:]
    assert os.path.exists(single(str(tmp_path), "diagnosis.json"))


@pytest.mark.slow
def test_nan_guard_before_after(tmp_path) -> None:
    script = os.path.join(ROOT, "example_projects", "nan_guard", "before_after.py")
    proc = run([script, "--steps", "40", "--root", str(tmp_path)], cwd=str(tmp_path))
    without, with_guard = proc.stdout.split("== with NaNGuard(action='skip') ==")
    assert "NaN from step 6 on; last loss nan; weights finite: False" in without
    assert "weights finite: True; skipped steps: 3" in with_guard
    assert "forward pass of `net.0` (LogFeatures)" in with_guard  # the localisation message, printed
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    (finding,) = report["findings"]
    assert finding["code"] == "non_finite_loss" and finding["count"] == 3
    assert finding["evidence"]["module"] == "net.0" and finding["evidence"]["batch_idx"] == "6"


@pytest.mark.slow
def test_curves_overfit_example(tmp_path) -> None:
    script = os.path.join(ROOT, "example_projects", "curves", "overfit.py")
    proc = run([script, "--root", str(tmp_path)], cwd=str(tmp_path))
    report_path = single(str(tmp_path), "diagnosis.json")
    report = json.loads(Path(report_path).read_text())
    codes = {(f["code"], f["severity"], f["source"]) for f in report["findings"]}
    assert ("overfitting", "warning", "OverfitDetector") in codes
    assert ("early_stopped", "info", "OverfitDetector") in codes
    assert report["plots"] == ["learning_curves.png", "lr_schedule.png", "grad_norms.png"]
    assert "EarlyStop: restored the best weights" in proc.stdout and "at epoch 10)" in proc.stdout
    # the same run, diagnosed again from its TensorBoard logs by the command
    cli = subprocess.run(
        [sys.executable, "-m", "lightning_diag.cli", "report", str(tmp_path), "--fail-on", "warning"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 1 and "overfitting" in cli.stdout


@pytest.mark.slow
def test_failure_gallery_reports_what_it_claims_and_matches_the_docs(tmp_path) -> None:
    script = os.path.join(ROOT, "example_projects", "gallery", "run_all.py")
    proc = run([script, "--root", str(tmp_path)], cwd=str(tmp_path))  # exits 1 on a mismatch
    rows = [
        line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| entry")
    ]
    assert len(rows) == 10
    # the table's one copy (run_all.py --write-docs), and the README while it still holds one
    copies = {"docs/generated/gallery.md": Path(ROOT, "docs", "generated", "gallery.md").read_text("utf-8")}
    readme = Path(ROOT, "README.md").read_text(encoding="utf-8")
    if "| entry | symptom |" in readme:
        copies["README.md"] = readme
    for name, text in copies.items():
        for row in rows:
            assert row in text, f"{name}: the gallery table is stale (python {script} --write-docs): {row}"
    healthy = json.loads(Path(single(str(tmp_path / "healthy"), "diagnosis.json")).read_text())
    assert healthy["summary"]["healthy"] is True


@pytest.mark.slow
def test_charlm_recipe_runs_healthy_in_bf16(tmp_path) -> None:
    main = os.path.join(ROOT, "example_projects", "charlm", "main.py")
    config = os.path.join(ROOT, "example_projects", "charlm", "config.yaml")
    run(
        [
            main,
            "fit",
            "--config",
            config,
            "--trainer.max_steps=12",
            "--trainer.val_check_interval=6",
            "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false",
            "--data.max_chars=40000",
        ],
        cwd=str(tmp_path),
    )
    report = json.loads(Path(single(str(tmp_path / "runs" / "charlm"), "diagnosis.json")).read_text())
    assert report["summary"]["status"] == "finished" and report["summary"]["healthy"], report["findings"]
    scalars = tb_scalars(os.path.dirname(single(str(tmp_path / "runs" / "charlm"), "diagnosis.json")))
    assert "diag/clip/pre_norm" in scalars and "diag/nan/skipped_steps" in scalars and "val_bpc" in scalars
    assert (
        scalars["diag/lr/group0"][0][1] < scalars["diag/lr/group0"][-1][1]
        or len(scalars["diag/lr/group0"]) == 1
    )
