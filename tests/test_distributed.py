"""Real 2-process DDP on CPU (gloo): decisions agree across ranks and only rank 0 writes the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "ddp_run.py")


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_ddp_two_processes_decide_alike(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=200,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # Rank 0's plateau decides for both: rank 1's own (improving) values would never have stopped it.
    assert r0["stopped_epoch"] == r1["stopped_epoch"] == 4
    assert r0["best_epoch"] == r1["best_epoch"] == 2
    assert r0["restored_epoch"] == r1["restored_epoch"] == 2
    assert r0["global_step"] == r1["global_step"]
    assert r0["lrs"] == r1["lrs"] and len(r0["lrs"]) == r0["global_step"]
    assert r0["weights"] == r1["weights"]  # replicas identical after restoring the best weights
    # I/O on global rank 0 only
    assert (tmp_path / "root0" / "diagnosis.json").exists()
    assert not (tmp_path / "root1" / "diagnosis.json").exists()
    assert proc.stdout.count("lightning_diag: run finished") == 1
