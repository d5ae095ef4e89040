"""What lightning_diag prints: above Lightning's progress bar (never onto it), one line per finding by default,
the advice with `verbose`, the primary finding first with its causes."""

from __future__ import annotations

from typing import Any

import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lightning_diag import EarlyStop, OverfitDetector
from lightning_diag.findings import Finding, build_report, format_summary
from tests.helpers import Regression, Scripted, loader, trainer


def segments(out: str) -> list[str]:
    """What a terminal shows as separate writes: lines, and the carriage-return redraws of a progress bar."""
    return [seg for line in out.split("\n") for seg in line.split("\r")]


def starts_clean(out: str, needle: str) -> bool:
    hits = [s for s in segments(out) if needle in s]
    return bool(hits) and all(s.startswith(needle) for s in hits)


def test_end_of_fit_lines_go_above_the_progress_bar(tmp_path, capsys) -> None:
    t = trainer(
        max_epochs=4,
        enable_progress_bar=True,
        default_root_dir=str(tmp_path),
        callbacks=[EarlyStop("val_loss", patience=1), TQDMProgressBar()],
    )
    t.fit(Scripted([1.0, 0.5, 0.9, 0.9]), loader(n=16), loader(n=8))
    out = capsys.readouterr().out
    assert "Epoch 2: 100%" in out  # the bar was drawn on this stream
    assert starts_clean(out, "EarlyStop: restored the best weights")
    assert starts_clean(out, "lightning_diag: run finished")


def test_the_summary_reaches_the_console_under_the_rich_progress_bar(tmp_path, capsys) -> None:
    pytest.importorskip("rich")  # Lightning's default bar whenever rich is installed
    t = trainer(
        max_epochs=4,
        enable_progress_bar=True,
        default_root_dir=str(tmp_path),
        callbacks=[EarlyStop("val_loss", patience=1), RichProgressBar()],
    )
    t.fit(Scripted([1.0, 0.5, 0.9, 0.9]), loader(n=16), loader(n=8))
    out = capsys.readouterr().out
    assert "lightning_diag: run finished" in out and "early_stopped" in out


class FailsMidEpoch(Regression):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.current_epoch == 1 and batch_idx == 1:
            raise ValueError("boom")
        return super().training_step(batch, batch_idx)


def test_a_failed_run_reports_above_the_open_bar(tmp_path, capsys) -> None:
    t = trainer(
        max_epochs=3,
        enable_progress_bar=True,
        default_root_dir=str(tmp_path),
        callbacks=[OverfitDetector(), TQDMProgressBar()],
    )
    with pytest.raises(ValueError, match="boom"):
        t.fit(FailsMidEpoch(), loader(n=32), loader(n=8))
    out = capsys.readouterr().out
    assert "Epoch 1:" in out
    assert starts_clean(out, "lightning_diag: run failed at step")
    assert "(epoch 1)" in out  # the epoch the bar showed when it failed


def two_findings() -> dict:
    findings = [
        Finding(
            "loss_spike",
            "warning",
            "a spike",
            step=3,
            epoch=0,
            advice=["look at batch 3", "clip"],
            source="T",
        ),
        Finding("early_stopped", "info", "stopped", step=9, epoch=1, advice=["raise patience"], source="E"),
    ]
    return build_report(findings, status="finished", global_step=10, epoch=1)


def test_one_line_per_finding_and_advice_only_when_verbose() -> None:
    report = two_findings()
    short = format_summary(report, "/run/diagnosis.json").splitlines()
    assert [line.split("]")[1].split()[0] for line in short if line.startswith(("  [", "=>["))] == [
        "loss_spike",
        "early_stopped",
    ]
    assert short[1].startswith("=>[WARNING] loss_spike")  # the report's primary finding, marked and first
    assert not any("look at batch 3" in line for line in short)
    assert "  Advice: `lightning-diag report /run/diagnosis.json --verbose`, or the HTML report." in short
    verbose = format_summary(report, "/run/diagnosis.json", verbose=True).splitlines()
    assert "            - look at batch 3" in verbose and "            - raise patience" in verbose
    assert not any(line.startswith("  Advice:") for line in verbose)


def test_the_verbose_switch_at_fit_end(tmp_path, capsys, monkeypatch) -> None:
    def fit() -> str:
        t = trainer(
            max_epochs=4, default_root_dir=str(tmp_path), callbacks=[EarlyStop("val_loss", patience=1)]
        )
        t.fit(Scripted([1.0, 0.5, 0.9, 0.9]), loader(n=16), loader(n=8))
        return capsys.readouterr().out

    out = fit()
    assert "early_stopped" in out and "            - " not in out
    monkeypatch.setenv("LIGHTNING_DIAG_VERBOSE", "1")
    assert "            - The monitored metric stopped improving" in fit()


def test_primary_first_with_its_causes_and_severity_order_without() -> None:
    report = two_findings()
    report["findings"][0].update(id="f1", caused_by=["f2"])
    report["findings"][1].update(id="f2", caused_by=[])
    without = [line for line in format_summary(report).splitlines() if "] " in line]
    assert "loss_spike" in without[0] and "early_stopped" in without[1]  # warning before info
    report["primary"] = "f2"
    lines = [line for line in format_summary(report).splitlines() if "] " in line]
    assert lines[0].startswith("=>[INFO   ] early_stopped")
    assert lines[1].startswith("  [WARNING] loss_spike") and lines[1].endswith(
        "(caused by early_stopped [f2])"
    )
