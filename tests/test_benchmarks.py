"""The overhead benchmark runs (tiny settings): its numbers are reported, never asserted as thresholds."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_overhead_benchmark_runs(capsys) -> None:
    spec = importlib.util.spec_from_file_location("overhead", os.path.join(ROOT, "benchmarks", "overhead.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["overhead"] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    configs = ["GradNormMonitor+GradClip", "Lightning grad_norm+log_dict"]
    results = module.main(
        ["--steps", "3", "--warmup", "1", "--rounds", "1", "--workloads", "mlp12", "--configs", *configs]
    )
    assert set(results["mlp12"]) == {"bare", *configs}
    assert results["mlp12"]["bare"] == (1.0, 1.0)
    assert all(ratio > 0 for pair in results["mlp12"].values() for ratio in pair)
    out = capsys.readouterr().out
    assert "| GradNormMonitor+GradClip |" in out
    assert "| in hooks, quiet step | in hooks, logging step | host syncs per quiet step | end of fit |" in out
    row = next(line for line in out.splitlines() if line.startswith("| GradNormMonitor+GradClip |"))
    assert row.split("|")[-3].strip() == "0"  # the audited host syncs of a quiet step


@pytest.mark.slow
def test_scale_benchmark_runs(capsys) -> None:
    spec = importlib.util.spec_from_file_location("scale", os.path.join(ROOT, "benchmarks", "scale.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--steps", "3", "--rounds", "1", "--shapes", "2"])
    assert [r[0] for r in rows] == ["10 tensors, width 64", "100 tensors, width 64"]
    assert all(r[1] > 0 and r[2] > 0 and r[3] > 0 for r in rows)
    assert "| 100 tensors, width 64 |" in capsys.readouterr().out
