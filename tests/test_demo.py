"""`lightning-diag demo`: the failure scenarios shipped inside the package run in seconds and say what they claim."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lightning_diag.cli import main
from lightning_diag.demo import SCENARIOS


def test_list_names_every_scenario_without_importing_torch() -> None:
    code = (
        "import sys; sys.argv = ['lightning-diag']; from lightning_diag.cli import main; "
        "rc = main(['demo', '--list']); assert rc == 0, rc; "
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'imported torch'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name, scenario in SCENARIOS.items():
        assert f"  {name}" in proc.stdout and scenario.description in proc.stdout


def test_an_unknown_scenario_is_a_clear_error(capsys) -> None:
    assert main(["demo", "lr_too_hihg"]) == 2
    assert "no demo named 'lr_too_hihg'; `lightning-diag demo --list` shows" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_scenario_reports_its_failure(name, tmp_path, capsys) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["demo", name, "--root", str(tmp_path)]) == 0
    ours = [w for w in caught if "lightning_diag" in w.filename.replace("\\", "/").split("/")]
    assert not ours, [str(w.message) for w in ours]
    (report_path,) = Path(tmp_path, name).rglob("diagnosis.json")
    report = json.loads(report_path.read_text())
    codes = {f["code"] for f in report["findings"]}
    assert set(SCENARIOS[name].codes) <= codes, codes
    html = report_path.with_name("diagnosis.html")
    assert all(f'data-code="{c}"' in html.read_text() for c in codes)
    out = capsys.readouterr().out
    assert "lightning_diag: run finished" in out and f"open {html} in a browser" in out
    for code in SCENARIOS[name].codes:
        assert f"] {code} (" in out  # printed, one line each
