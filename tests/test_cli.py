from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from lightning_diag import EarlyStop, __version__
from lightning_diag.cli import main
from lightning_diag.findings import Finding, build_report, write_report
from tests.helpers import Scripted, loader, trainer


def report_with(tmp_path, severity: str) -> str:
    finding = Finding(code="loss_spike", severity=severity, message="m", step=1, epoch=0, source="T")
    return write_report(build_report([finding], status="finished", global_step=2, epoch=0), tmp_path / "run")


@pytest.mark.parametrize(
    ("severity", "fail_on", "code"),
    [
        ("error", "error", 1),
        ("warning", "error", 0),
        ("warning", "warning", 1),
        ("error", "never", 0),
        ("info", "warning", 0),
    ],
)
def test_report_exit_status_gates_on_severity(tmp_path, capsys, severity, fail_on, code) -> None:
    path = report_with(tmp_path, severity)
    assert main(["report", path, "--fail-on", fail_on]) == code
    assert "loss_spike" in capsys.readouterr().out


def test_report_finds_the_newest_in_a_run_directory(tmp_path, capsys) -> None:
    t = trainer(max_epochs=6, default_root_dir=str(tmp_path), callbacks=[EarlyStop("val_loss", patience=1)])
    t.fit(Scripted([3, 3, 3]), loader(n=16), loader(n=8))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "early_stopped" in out and os.path.join(str(tmp_path), "diagnosis.json") in out


def test_errors_are_clear(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no diagnosis.json under" in capsys.readouterr().err
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"a": 1}))
    assert main(["report", str(bad)]) == 2
    assert "is not a lightning_diag report" in capsys.readouterr().err


def test_codes_lists_the_contract(capsys) -> None:
    assert main(["codes"]) == 0
    assert "non_finite_loss" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    exe = shutil.which("lightning-diag") or os.path.join(os.path.dirname(sys.executable), "lightning-diag")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == f"lightning-diag {__version__}"
